"""Speed (and accuracy on synthetic maps) of the centre finders and of automatic selection at the working scale.

Draws probability-like maps of ``--size``² px with about ``--particles`` densely packed particles of diameter
``--diameter`` (EMPIAR-10017 at 1024²: about 650 particles of 27 px): soft disks of ``--blob`` diameters with random
strength, a few particles left out, weak false blobs, smoothed noise. With ``--coords DIR`` the centres come from
RELION coordinate STAR files instead (e.g. the expert picks of /work/shared/data/empiar10017/coords).

Prints seconds per micrograph for every finder (default settings, median over maps), the selection time on the
first ``--val`` maps, the selection table, and precision/recall/F1/AP of each finder's best setting on the other
maps (threshold chosen on the validation maps). Timings depend on the machine and its load.

    python benchmarks/bench_centres.py [--threads 2] [--maps 8] [--val 6] [--coords DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from pathlib import Path

import numpy as np


def random_centres(n: int, size: int, diameter: float, rng) -> np.ndarray:
    """Random sequential packing with nearest neighbours at 0.6 diameters or more (as dense as EMPIAR-10017)."""
    from scipy.spatial import cKDTree

    pts = rng.uniform(diameter, size - diameter, (n * 6, 2))
    keep: list[np.ndarray] = []
    tree_pts = np.zeros((0, 2))
    for p in pts:
        if len(keep) == n:
            break
        if len(tree_pts) and cKDTree(tree_pts).query(p)[0] < 0.6 * diameter:
            continue
        keep.append(p)
        if len(keep) % 32 == 0 or len(keep) < 32:
            tree_pts = np.array(keep)
        else:
            tree_pts = np.vstack([tree_pts, p])
    return np.array(keep)


def draw_map(xy: np.ndarray, size: int, diameter: float, blob: float, rng) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    img = np.zeros((size, size), np.float32)

    def disk(x, y, r, a):
        y0, y1 = max(int(y - r - 2), 0), min(int(y + r + 3), size)
        x0, x1 = max(int(x - r - 2), 0), min(int(x + r + 3), size)
        if y0 >= y1 or x0 >= x1:
            return
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = np.maximum(img[y0:y1, x0:x1], a * np.clip(r + 0.5 - np.hypot(xx - x, yy - y), 0, 1))

    r = blob * diameter / 2
    for x, y in xy:
        if rng.random() < 0.05:  # missed by the network
            continue
        disk(x + rng.normal(0, 1), y + rng.normal(0, 1), r * rng.uniform(0.85, 1.15), rng.uniform(0.4, 1.0))
    for _ in range(len(xy) // 8):  # false blobs (ice, contamination)
        disk(*rng.uniform(0, size, 2), r * rng.uniform(0.5, 1.2), rng.uniform(0.2, 0.8))
    img = gaussian_filter(img, 1.5) + 0.24 * gaussian_filter(rng.normal(size=img.shape), 1.0)
    return np.clip(img, 0, 1).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--diameter", type=float, default=27.0)
    ap.add_argument("--particles", type=int, default=650)
    ap.add_argument("--blob", type=float, default=0.7, help="blob diameter, in particle diameters")
    ap.add_argument("--maps", type=int, default=8)
    ap.add_argument("--val", type=int, default=6, help="maps used for selection; the rest are test maps")
    ap.add_argument("--coords", type=Path, default=None, help="directory of RELION coordinate STAR files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from crisp_ext.centres import FINDERS, pick_centres, select_finder
    from crisp_ext.metrics import picking_metrics

    rng = np.random.default_rng(args.seed)
    centres = []
    if args.coords is not None:
        import starfile

        for f in sorted(glob.glob(str(args.coords / "*.star")))[: args.maps]:
            df = starfile.read(f)
            df = df["particles"] if isinstance(df, dict) else df
            centres.append(df[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float))
    else:
        centres = [random_centres(args.particles, args.size, args.diameter, rng) for _ in range(args.maps)]
    t0 = time.perf_counter()
    maps = [draw_map(xy, args.size, args.diameter, args.blob, rng) for xy in centres]
    n_mean = np.mean([len(c) for c in centres])
    print(f"{len(maps)} maps of {args.size}² px, {n_mean:.0f} particles each, diameter {args.diameter:g} px "
          f"(drawn in {time.perf_counter() - t0:.1f} s); {args.threads} thread(s)")

    d = args.diameter
    print("\nseconds per micrograph, default settings (find + edge rule + de-duplication), median over maps:")
    for name in FINDERS:
        times = []
        for m in maps:
            for _ in range(args.repeat):
                t = time.perf_counter()
                pick_centres(m, d, name)
                times.append(time.perf_counter() - t)
        print(f"  {name:<11} {np.median(times):.3f} s  (min {np.min(times):.3f}, max {np.max(times):.3f})")

    n_val = min(args.val, len(maps) - 1) if len(maps) > 1 else 1
    t = time.perf_counter()
    sel = select_finder(maps[:n_val], centres[:n_val], d)
    print(f"\nselection on {n_val} maps ({len(sel.candidates)} settings): {time.perf_counter() - t:.1f} s")
    print(sel.table())
    test_maps, test_truth = maps[n_val:], centres[n_val:]
    if not test_maps:
        return
    print(f"\nheld-out maps ({len(test_maps)}), each finder at its best setting and threshold, radius D/2 (D/4):")
    for name in FINDERS:
        rows = [c for c in sel.candidates if c.finder == name]
        if not rows:
            continue
        best = max(rows, key=lambda c: c.ap)
        picks = [pick_centres(m, d, name, best.params) for m in test_maps]
        xy, sc = [p.xy for p in picks], [p.score for p in picks]
        m1 = picking_metrics(xy, sc, test_truth, 0.5 * d, threshold=best.threshold)
        m2 = picking_metrics(xy, sc, test_truth, 0.25 * d, threshold=best.threshold)
        grid = ", ".join(f"{k}={best.params[k]:g}" for k in FINDERS[name].grid)
        print(f"  {name:<11} {grid:<28} P {m1.precision:.3f} R {m1.recall:.3f} F1 {m1.f1:.3f} AP {m1.ap:.3f} "
              f"(D/4: F1 {m2.f1:.3f} AP {m2.ap:.3f})  mean dist {m1.mean_distance:.2f} px")


if __name__ == "__main__":
    main()
