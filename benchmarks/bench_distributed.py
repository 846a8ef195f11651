"""Picking throughput: one process against Dask workers, on real micrographs with one trained model.

    python benchmarks/bench_distributed.py --model DIR [--mics DIR] [--n 20] [--configs one:1,dask:1x1,dask:2x1]
        [--out bench_out/distributed]

Each configuration runs ``crisp-ext pick --model DIR`` in its own process on the same micrographs:
``one:T`` (today's path, T torch threads), ``dask:NxT`` (``--workers local:N --threads T``), ``split:NxT`` (N
independent one-process runs at once, each on 1/N of the micrographs: the ceiling N workers could reach here).
Reported: wall seconds (process start, model load and cluster start included) and of picking (cluster start and
model loading in the workers included); seconds per micrograph and micrographs per second in the steady state (one
process: from the first picked micrograph to the last; Dask: the workers' rates added up, each from the first
micrograph it picked to its last, as the split runs are added up); the span figure (Dask: from the first micrograph
any worker picked to the last, which also counts workers that started late and the last chunks' tail); CPU use
(user + system CPU-seconds of the process and its children over wall seconds); and whether the picks are identical
to the first configuration's. The speed-up of ``dask:2x1`` over ``one:1`` is the scale-out figure; the overhead of
``dask:1x1`` against ``one:1`` is the Dask path's cost per micrograph.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steady_s_per_mic(summary: dict) -> float:
    """Steady-state seconds per micrograph of one run's summary (all of picking when it has no steady state)."""
    t = summary["timings_s"]
    return t.get("pick_steady_s_per_mic") or t["pick"] / summary["micrographs_picked"]


def run_split(kind: str, model: Path, mics: Path, out: Path) -> dict:
    """``split:NxT``: N independent one-process runs (T threads each) on 1/N of the micrographs each, at the same
    time — what N workers could reach on this machine with no Dask at all."""
    n, t = (int(v) for v in kind.split(":")[1].split("x"))
    files = sorted(mics.glob("*.mrc"))
    procs, outs = [], []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    for k in range(n):
        part = out / f"mics{k}"
        part.mkdir(parents=True, exist_ok=True)
        for f in files[k::n]:
            if not (part / f.name).exists():
                os.symlink(f.resolve(), part / f.name)
        outs.append(out / f"out{k}")
        procs.append(subprocess.Popen([sys.executable, "-m", "crisp_ext.cli", "pick", "--mics", str(part), "--model",
                                       str(model), "--out", str(outs[-1]), "--quiet", "--overwrite", "--threads",
                                       str(t)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{kind} failed: {err.decode().strip()[-500:]}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    sums = [json.loads((o / "summary.json").read_text()) for o in outs]
    rate = sum(1.0 / steady_s_per_mic(s) for s in sums)
    coords = out / "coordinates"
    coords.mkdir(exist_ok=True)
    for o in outs:
        for f in (o / "coordinates").glob("*.star"):
            (coords / f.name).write_text(f.read_text())
    return {"config": kind, "micrographs": sum(s["micrographs_picked"] for s in sums), "wall_s": round(wall, 2),
            "pick_s": round(max(s["timings_s"]["pick"] for s in sums), 2), "mics_per_s": round(rate, 3),
            "s_per_mic": round(1.0 / rate, 3), "cpu_percent": round(100 * cpu / wall),
            "particles": sum(s["particles"] for s in sums)}


def run(kind: str, model: Path, mics: Path, out: Path) -> dict:
    if kind.startswith("split:"):
        return run_split(kind, model, mics, out)
    name, spec = kind.split(":")
    if name == "one":
        extra = ["--threads", spec]
    else:
        n, t = spec.split("x")
        extra = ["--workers", f"local:{n}", "--threads", t]
    cmd = [sys.executable, "-m", "crisp_ext.cli", "pick", "--mics", str(mics), "--model", str(model), "--out",
           str(out), "--quiet", "--overwrite", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{kind} failed: {proc.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = json.loads((out / "summary.json").read_text())
    n = summary["micrographs_picked"]
    pick_s = summary["timings_s"]["pick"]
    steady = steady_s_per_mic(summary)
    span = summary["timings_s"].get("pick_span_s_per_mic", steady)
    return {"config": kind, "micrographs": n, "wall_s": round(wall, 2), "pick_s": round(pick_s, 2),
            "mics_per_s": round(1.0 / steady, 3), "s_per_mic": round(steady, 3), "span_s_per_mic": round(span, 3),
            "cpu_percent": round(100 * cpu / wall), "particles": summary["particles"]}


def picks_of(out: Path) -> dict:
    return {p.name: p.read_text() for p in sorted((out / "coordinates").glob("*.star"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--mics", type=Path, default=ROOT.parent / "shared/data/empiar10017/micrographs")
    ap.add_argument("--n", type=int, default=20, help="micrographs to pick (the first N)")
    ap.add_argument("--repeat", type=int, default=1, help="link each micrograph this many times under other names "
                                                          "(a longer run: start-up weighs less)")
    ap.add_argument("--configs", default="one:1,dask:1x1,dask:2x1,one:2")
    ap.add_argument("--out", type=Path, default=Path("bench_out/distributed"))
    args = ap.parse_args(argv)
    mics = args.out / "mics"
    mics.mkdir(parents=True, exist_ok=True)
    for src in sorted(args.mics.glob("*.mrc"))[: args.n]:
        for k in range(args.repeat):
            name = src.name if k == 0 else f"{src.stem}_copy{k}{src.suffix}"
            if not (mics / name).exists():
                os.symlink(src.resolve(), mics / name)
    rows, reference = [], None
    for kind in args.configs.split(","):
        out = args.out / kind.replace(":", "_")
        row = run(kind, args.model.resolve(), mics.resolve(), out)
        picks = picks_of(out)
        reference = reference or picks
        row["identical_picks"] = picks == reference
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["config"] == "one:1"), None)
    if base:
        for r in rows:
            r["speedup_vs_one_1"] = round(r["mics_per_s"] / base["mics_per_s"], 2)
    print("\n| config | micrographs | wall s | pick s | steady s/mic | span s/mic | steady mics/s | CPU % | "
          "speed-up vs one:1 | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['micrographs']} | {r['wall_s']} | {r['pick_s']} | {r['s_per_mic']} | "
              f"{r.get('span_s_per_mic', '')} | "
              f"{r['mics_per_s']} | {r['cpu_percent']} | {r.get('speedup_vs_one_1', '')} | {r['identical_picks']} |")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
