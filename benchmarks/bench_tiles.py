"""The network's time and peak memory per map for tilings of the working map.

    python benchmarks/bench_tiles.py --model RUN/model [--sizes 910,1611,2880] [--tilings 512x4,1024x1]
        [--threads 2] [--repeat 3]

Each cell runs ``crisp_ext.predict.predict_maps`` on a random map of that size (working px) in a process of its own
(so that the peak resident memory is that cell's): one warm-up call, then the mean of ``--repeat`` calls.
``TILExBATCH`` sets ``predict.tile`` (the largest tile) and ``predict.batch_size`` (tiles per forward pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_cell(model_dir: str, size: int, tile: int, batch: int, threads: int, repeat: int) -> dict:
    import numpy as np
    import torch

    from crisp_ext.model_dir import load_model_dir
    from crisp_ext.model import size_multiple
    from crisp_ext.predict import predict_maps, tile_layout

    torch.set_num_threads(threads)
    loaded = load_model_dir(model_dir)
    cfg = dataclasses.replace(loaded.config.predict, tile=tile, batch_size=batch)
    image = np.random.default_rng(0).normal(size=(size, size)).astype(np.float32)
    predict_maps(loaded.model, image, cfg)
    start = time.perf_counter()
    for _ in range(repeat):
        predict_maps(loaded.model, image, cfg)
    seconds = (time.perf_counter() - start) / repeat
    layout = tile_layout(size, size, cfg, size_multiple(loaded.model))
    n, side = len(layout.rows), layout.th
    return {"size": size, "tile": tile, "batch": batch, "tiles": f"{n}x{n} of {side}",
            "network_mpx": round(n * n * side * side / 1e6, 2), "seconds": round(seconds, 3),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sizes", default="910,1611,2880")
    ap.add_argument("--tilings", default="512x4,1024x1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--_cell", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._cell:
        size, tile, batch = (int(v) for v in args._cell.split(","))
        print("RESULT " + json.dumps(one_cell(args.model, size, tile, batch, args.threads, args.repeat)))
        return 0
    print("| map px | largest tile x batch | tiles | Mpx through the network | s per map | peak MB |")
    print("|---|---|---|---|---|---|")
    for size in (int(v) for v in args.sizes.split(",")):
        for tiling in args.tilings.split(","):
            tile, batch = (int(v) for v in tiling.split("x"))
            proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
                                   "--repeat", str(args.repeat), "--_cell", f"{size},{tile},{batch}"],
                                  capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{size} {tiling} failed: {proc.stderr.strip()[-500:]}")
            r = json.loads(lines[-1][7:])
            print(f"| {size}² | {tile} x {batch} | {r['tiles']} | {r['network_mpx']} | {r['seconds']} | "
                  f"{r['peak_mb']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
