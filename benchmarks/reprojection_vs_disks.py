"""Labels by reprojecting a 3D mask vs disks, on simulated micrographs of an elongated, asymmetric particle.

    python benchmarks/reprojection_vs_disks.py [--train 6] [--val 2] [--test 4] [--size 768] [--snr 0.05]
        [--epochs 20] [--threads 2] [--out bench_out/reprojection]

Data: ``Phantom.elongated`` particles (a rod one diameter long, a third as wide, with a knob) at uniformly random
poses, diameter 24 px at 4 Å/px (the working scale, so labels, maps and truth share one grid), SNR ``--snr``.
The 3D mask is the same phantom voxelised at 2 Å/px and thresholded at 0.1 of its maximum (the simulator's
footprints are each clean projection above 0.1 of its maximum). The true particles (centres and RELION angles)
are the curated set.

For each label kind (disk, reprojection) a picker is trained with the same data, split, seed and settings, then
on the held-out ``--test`` micrographs:

* label IoU: the training labels against the true projection footprints (``sim.mask``) on the training micrographs;
* pixel IoU / F1: the predicted map above 0.5 against the true footprints;
* picking: precision, recall, F1 at the threshold chosen on validation, and AP over all picks (threshold 0),
  matched within 0.5 diameter (and F1 within 0.25 diameter).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PIXEL_SIZE = 4.0
DIAMETER = 24.0
MAP_PIXEL_SIZE = 2.0


def simulate(n: int, size: int, snr: float, seed: int):
    from crisp_ext.simulate import Phantom, simulate_micrograph

    count = int(round(90 * (size / 768) ** 2))
    return [simulate_micrograph((size, size), n_particles=count, diameter_px=DIAMETER, pixel_size=PIXEL_SIZE,
                                snr=snr, phantom=Phantom.elongated(), defocus_um=1.2 + 0.2 * (i % 5), seed=seed + i)
            for i in range(n)]


def write(sims, folder: Path, prefix: str):
    from crisp_ext.io.mrc import write_mrc
    from crisp_ext.types import Micrograph, Particles

    mics, parts = [], []
    for i, sim in enumerate(sims):
        name = f"{prefix}{i:02d}"
        path = write_mrc(folder / f"{name}.mrc", sim.image, pixel_size=PIXEL_SIZE)
        mics.append(Micrograph(name, path, pixel_size=PIXEL_SIZE, shape=sim.image.shape))
        parts.append(Particles(np.full(len(sim.centres), name, dtype=object), sim.centres[:, 0], sim.centres[:, 1],
                               angles=sim.angles))
    return mics, Particles.concat(parts)


def config(kind: str, epochs: int, threads: int, seed: int):
    from crisp_ext.config import PickerConfig

    return PickerConfig().updated({
        "particle.diameter_px": DIAMETER, "preprocess.target_diameter_px": DIAMETER, "labels.kind": kind,
        "train.epochs": epochs, "train.threads": threads, "train.seed": seed, "train.early_stop_patience": 0,
        "predict.workers": 0, "centres.finder": "nms",
    })


def evaluate(picker, mics, sims, cfg) -> dict:
    from crisp_ext.metrics import picking_metrics, pooled_pixel_metrics
    from crisp_ext.picking import MicrographLoader, pick_micrograph
    from crisp_ext.predict import predict_map

    loader = MicrographLoader(picker.config)
    preds, scores, truths, maps = [], [], [], []
    for mic, sim in zip(mics, sims):
        wi = loader(mic)
        prob = predict_map(picker.model, wi.image, picker.config.predict)
        maps.append(prob > 0.5)
        picks = pick_micrograph(prob, wi, mic, DIAMETER, picker.config, picker.finder, picker.params, 0.0)
        preds.append(picks.xy)
        scores.append(picks.score)
        truths.append(sim.centres)
    pixel = pooled_pixel_metrics(maps, [s.mask for s in sims])
    full = picking_metrics(preds, scores, truths, 0.5 * DIAMETER, threshold=picker.threshold)
    tight = picking_metrics(preds, scores, truths, 0.25 * DIAMETER, threshold=picker.threshold)
    return {"pixel_iou": pixel["iou"], "pixel_f1": pixel["f1"], "precision": full.precision, "recall": full.recall,
            "f1": full.f1, "ap": full.ap, "f1_quarter_d": tight.f1, "threshold": picker.threshold,
            "finder": picker.finder}


def label_iou(mics, parts, sims, cfg, reference) -> float:
    from crisp_ext.footprints import FootprintMaker
    from crisp_ext.pipeline import MicrographLoader, _prepare

    maker = FootprintMaker(reference, cfg.labels) if cfg.labels.kind == "reprojection" else None
    loader = MicrographLoader(cfg)
    inter = union = 0
    for mic, sim in zip(mics, sims):
        item, _ = _prepare(mic, parts.for_micrograph(mic.id), cfg, loader, maker)
        lab = item.labels.target > 0.5
        inter += int((lab & sim.mask).sum())
        union += int((lab | sim.mask).sum())
    return inter / max(1, union)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=6)
    ap.add_argument("--val", type=int, default=2)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", nargs="+", default=["disk", "reprojection"])
    ap.add_argument("--out", type=Path, default=Path("bench_out/reprojection"))
    args = ap.parse_args(argv)

    import torch

    from crisp_ext.footprints import ReferenceMask
    from crisp_ext.pipeline import prepare_picker
    from crisp_ext.simulate import Phantom, phantom_volume

    torch.set_num_threads(args.threads)
    data = args.out / "data"
    sims = simulate(args.train + args.val + args.test, args.size, args.snr, 1000 * args.seed)
    fit_sims, test_sims = sims[:args.train + args.val], sims[args.train + args.val:]
    mics, parts = write(fit_sims, data, "fit")
    test_mics, _ = write(test_sims, data, "test")
    train_ids = [m.id for m in mics[:args.train]]
    val_ids = [m.id for m in mics[args.train:]]
    mask = phantom_volume(Phantom.elongated(), DIAMETER * PIXEL_SIZE, MAP_PIXEL_SIZE, mask_level=0.1)
    reference = ReferenceMask(mask, MAP_PIXEL_SIZE, source="elongated phantom, 0.1 of max")
    print(f"{len(mics)} + {len(test_mics)} micrographs of {args.size}², {len(parts)} curated particles, SNR "
          f"{args.snr}; mask {mask.shape[0]}³ at {MAP_PIXEL_SIZE} Å/px; {args.epochs} epochs, {args.threads} "
          f"thread(s)", flush=True)

    rows = {}
    for kind in args.kinds:
        cfg = config(kind, args.epochs, args.threads, args.seed)
        t0 = time.perf_counter()
        picker = prepare_picker(mics, cfg, work_dir=args.out / kind, particles=parts, reference=reference,
                                train_ids=train_ids, val_ids=val_ids)
        seconds = time.perf_counter() - t0
        row = {"label_iou": label_iou(mics[:args.train], parts, fit_sims[:args.train], picker.config, reference),
               **evaluate(picker, test_mics, test_sims, picker.config), "train_s": seconds,
               "labels": picker.info.get("labels")}
        rows[kind] = row
        print(f"{kind:>13}: label IoU {row['label_iou']:.3f} | test pixel IoU {row['pixel_iou']:.3f} F1 "
              f"{row['pixel_f1']:.3f} | picking P {row['precision']:.3f} R {row['recall']:.3f} F1 {row['f1']:.3f} "
              f"AP {row['ap']:.3f} (F1 at D/4 {row['f1_quarter_d']:.3f}) | train {seconds:.0f} s", flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
