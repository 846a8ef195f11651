"""Projection throughput of crisp_ext.reprojection.project (projections per second).

Projects a compact mask (an elongated ellipsoid filling about half the box) at random poses, at the map's own
pixel size and at a 4x coarser working scale (the usual case for labels), for 64³ and 128³ maps.

    python benchmarks/bench_reprojection.py [--threads 1] [--n 64] [--device cpu] [--sizes 64 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from crisp_ext.reprojection import Projector


def ellipsoid(size: int) -> np.ndarray:
    z, y, x = (np.mgrid[:size, :size, :size] - size // 2).astype(np.float32)
    a, b, c = 0.3 * size, 0.15 * size, 0.12 * size
    return (((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2) <= 1).astype(np.float32)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(vol, angles, device, out_size, **kw) -> tuple[float, float]:
    """(seconds to prepare the volume, projections per second of the prepared projector; best of 3)."""
    t0 = time.perf_counter()
    projector = Projector(vol, device=device, **kw)
    _sync(device)
    setup = time.perf_counter() - t0
    projector(angles[:2], out_size=out_size)  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        projector(angles, out_size=out_size)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return setup, len(angles) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--n", type=int, default=64, help="projections per timed call")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    angles = np.random.default_rng(0).uniform(0, 180, (args.n, 3))
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, {args.n} projections/call")
    print(f"{'map':>6} {'output':>16} {'setup s':>8} {'proj/s':>10}")
    for size in args.sizes:
        vol = torch.from_numpy(ellipsoid(size)).to(device)
        for label, out, kw in (("map scale", size, {}), ("4x coarser", size // 4, dict(out_pixel_size=4.0))):
            setup, per_s = timed(vol, angles, device, out, **kw)
            print(f"{size:>5}³ {label + f' {out}²':>16} {setup:>8.3f} {per_s:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
