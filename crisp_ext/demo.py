"""``crisp-ext demo``: a small synthetic project, picked end to end by the library a user's command runs.

It simulates micrographs (:mod:`crisp_ext.simulate`), writes them as MRC files with curated picks (RELION
coordinate STAR, 10 % of the particles left unpicked as in real curated sets) on a few of them, reads them back as
``crisp-ext pick`` does, trains, chooses the centre finder and picks every micrograph (:func:`crisp_ext.pipeline.run`,
coordinate files written as ``crisp-ext pick`` writes them), and evaluates the micrographs nobody picked against the
simulator's ground truth (:func:`crisp_ext.evaluation.evaluate_picks`). The equivalent commands are printed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

DEMO_PIXEL_SIZE = 3.0  # Å/px
DEMO_DIAMETER_A = 120.0  # 40 px


def make_project(root: Path, *, n_micrographs: int, shape: tuple[int, int], n_picked: int, seed: int,
                 snr: float = 0.08) -> dict:
    """Write micrographs, curated picks (on the first ``n_picked``) and the full truth under ``root``."""
    from .io.coords import write_coordinates
    from .io.mrc import write_mrc
    from .simulate import simulate_micrograph

    rng = np.random.default_rng(seed)
    diameter_px = DEMO_DIAMETER_A / DEMO_PIXEL_SIZE
    mics, picks, truth = root / "micrographs", root / "picks", root / "truth"
    names = []
    for i in range(n_micrographs):
        name = f"mic{i + 1:03d}"
        dense = i % 3 == 2
        sim = simulate_micrograph(shape, n_particles=int(rng.integers(60, 90)) if not dense else 400,
                                  diameter_px=diameter_px, pixel_size=DEMO_PIXEL_SIZE, snr=snr,
                                  defocus_um=float(rng.uniform(1.2, 2.5)), placement="dense" if dense else "sparse",
                                  carbon_edge=(i % 4 == 1), ice_blobs=int(i % 5 == 3), seed=seed * 1000 + i)
        write_mrc(mics / f"{name}.mrc", sim.image, pixel_size=DEMO_PIXEL_SIZE)
        write_coordinates(truth / f"{name}.star", sim.centres)
        if i < n_picked:
            keep = rng.random(len(sim.centres)) > 0.1
            write_coordinates(picks / f"{name}.star", sim.centres[keep])
        names.append(name)
    return {"micrographs": mics, "picks": picks, "truth": truth, "names": names, "diameter_px": diameter_px}


def run_demo(out: Path, *, quick: bool = False, seed: int = 0, quiet: bool = False) -> int:
    import json

    from .config import PickerConfig
    from .evaluation import evaluate_picks
    from .io.atomic import atomic_write_text
    from .io.inputs import find_micrographs, read_picks
    from .io.outputs import CoordinateWriter
    from .pipeline import run
    from .progress import LinePrinter, TqdmReporter

    out = Path(out)
    t0 = time.perf_counter()
    n, shape, n_picked = (6, (512, 512), 4) if quick else (10, (1024, 1024), 6)
    print(f"crisp-ext demo: simulating {n} micrographs of {shape[1]}×{shape[0]} px "
          f"(particle {DEMO_DIAMETER_A:g} Å = {DEMO_DIAMETER_A / DEMO_PIXEL_SIZE:g} px), curated picks on {n_picked}",
          flush=True)
    project = make_project(out / "project", n_micrographs=n, shape=shape, n_picked=n_picked, seed=seed)
    names, test = project["names"], project["names"][n_picked:]
    train, val = names[: n_picked - 2], names[n_picked - 2: n_picked]
    settings = demo_settings(quick)
    print("same as: crisp-ext pick --mics {} --picks {} --diameter {:g}A --out {} --train-mics {} --val-mics {} {}"
          .format(project["micrographs"], project["picks"], DEMO_DIAMETER_A, out / "picks", ",".join(train),
                  ",".join(val), " ".join(f"--set {k}={v}" for k, v in settings.items())), flush=True)
    cfg = PickerConfig().updated({"particle.diameter_A": DEMO_DIAMETER_A, **settings})
    mics = find_micrographs(project["micrographs"])
    picks = read_picks(project["picks"], mics)
    writer = CoordinateWriter(out / "picks" / "coordinates", "crisp")
    result = run(mics, cfg, work_dir=out / "picks", particles=picks, train_ids=train, val_ids=val,
                 on_ready=writer.ready, on_picked=writer.picked,
                 progress=LinePrinter() if quiet else TqdmReporter())
    truth = read_picks(project["truth"], mics)
    held_out = [m for m in mics if m.name in set(test)]
    report = evaluate_picks(held_out, result.picks, truth, (DEMO_DIAMETER_A, None))
    atomic_write_text(out / "evaluation.json", json.dumps(report, indent=2) + "\n")
    total = report["total"]
    picture = _held_out_picture(out, project, test[-1])
    print(f"\ndemo result on {len(test)} micrographs nobody picked: precision {total['precision']:.3f}  "
          f"recall {total['recall']:.3f}  F1 {total['f1']:.3f}  AP {total['ap']:.3f}")
    print(f"pictures: {picture} (picks and truth on a micrograph nobody picked), {out / 'picks' / 'plots'}   "
          f"total time {time.perf_counter() - t0:.0f} s")
    return 0


def _held_out_picture(out: Path, project: dict, name: str) -> Path:
    """Picks (circles) and the simulator's truth (crosses) on one held-out micrograph, in its original pixels."""
    from .io.coords import read_coordinates
    from .io.mrc import read_micrograph
    from .plots import plot_overlay

    image, _ = read_micrograph(project["micrographs"] / f"{name}.mrc")
    picks = read_coordinates(out / "picks" / "coordinates" / f"{name}_crisp.star").xy
    truth = read_coordinates(project["truth"] / f"{name}.star").xy
    return plot_overlay(image, picks, out / "demo_picks.png", truth_xy=truth, diameter_px=project["diameter_px"],
                        title=f"{name} (not used for training): {len(picks)} picks (circles), "
                              f"{len(truth)} true particles (crosses)")


def demo_settings(quick: bool) -> dict:
    """Training settings for the demo: small enough for a 2-core CPU in a few minutes."""
    return {"train.epochs": 6 if quick else 25, "train.early_stop_patience": 8, "train.patches_per_micrograph": 8,
            "train.min_patches_per_epoch": 64, "train.patch_size": 128 if quick else 192}
