"""Picking accuracy across kinds of data: every scene trained and picked with the defaults and with each candidate.

    python benchmarks/accuracy.py [--scenes empiar10017,apoferritin,crowded,crowded_noisy,sparse_large,sparse_elongated]
        [--candidates before,default] [--set NAME:KEY=VALUE] [--threads 2] [--out bench_out/accuracy] [--fresh]
        [--val N] [--train-on-val] [--pictures]

Scenes (train / validation / test micrographs):
- ``empiar10017``: ../shared/data/empiar10017, β-gal, 27 px, crowded, CryoPPP picks; the README's 4 / 2 / 14.
- ``apoferritin``: ../shared/data/apoferritin10146, 61 px, touching in patches, no pixel size; split.json's 4 / 2 / 13.
- ``crowded``: simulated, 36 px particles at 0.7 D minimum separation (touching, overlapping), ≈ 600 per 1024²
  micrograph, SNR 0.03, carbon edge on some, ice blobs and an ice gradient; 4 / 2 / 4.
- ``crowded_noisy``: as ``crowded`` at SNR 0.01, 0.65 D minimum separation, lower defocus (weaker contrast).
- ``sparse_large``: simulated, 64 px particles, ≈ 90 per 1024² micrograph, SNR 0.02; 4 / 2 / 4.
- ``sparse_elongated``: simulated, 56 px long asymmetric rods (aspect 2, a knob at one end), ≈ 90 per 1024²
  micrograph, SNR 0.015, defocus 1.2-1.8 µm; 4 / 2 / 4.
- ``crowded_noisy_jitter``: ``crowded_noisy``'s micrographs and left-out particles, every curated pick moved by
  N(0, 0.1 D) in x and y (hand-clicked centres); scored against the exact centres.
- ``sparse_junk``: simulated, 56 px particles, ≈ 90 per 1024² micrograph, SNR 0.02, among 16 objects per
  micrograph that no curator picks (aggregates of 3-6 overlapping particles, small dark ice crystals); 4 / 2 / 4.
The simulated scenes train on an incomplete "curated" set (a random 30 % of each training and validation
micrograph's particles left out, as curation does) and are scored against every particle.

Each run goes through ``crisp_ext.pipeline.run`` exactly as the commands do (train on the training micrographs,
choose the finder and threshold on the validation ones, pick the test ones). Reported on the test micrographs,
pooled: precision / recall / F1 with one-to-one matching within r = D/2 and r/2 = D/4, AP (picks ranked by their
score) at r, the mean distance of matched picks to the truth at r (original px), training seconds and picking
seconds per micrograph (wall). Results are cached in ``OUT/<scene>/<candidate>/result.json`` with the whole
config they ran with; a re-run computes only what is missing or was computed with another config (the defaults
or the candidate's overrides changed since; the old run is moved to ``<candidate>.stale``). ``--fresh``
recomputes everything asked for. ``--pictures`` writes ``OUT/<scene>/<candidate>/pictures/matches_<mic>.png`` for
each test micrograph of the runs it computes (picks matched to the truth green, unmatched red, truth missed yellow;
``crisp-ext evaluate --pictures`` on written picks does the same). The real scenes are read from ../shared/data, or
from ``$CRISP_BENCH_DATA``.
Candidate ``paper`` is ``crisp-ext config --paper`` (for a GPU). Candidate ``topaz`` is Topaz 0.3.20 (resnet8,
GE-binomial with the training picks' count per micrograph, 4 × 250 updates, the best epoch by its held-out AUPRC on
the validation micrographs, the threshold by their F1; ``compare_topaz.run_topaz``, in its own venv ``.venv-topaz``
created on first use) on the same micrographs and picks, scored the same way: its picks above that threshold.
Candidates ``topaz_2``, ``topaz_3`` ... are further Topaz runs (its training is not seeded: each run differs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crisp_ext.config import PickerConfig  # noqa: E402
from crisp_ext.io.coords import read_coordinates, write_coordinates  # noqa: E402
from crisp_ext.io.mrc import write_mrc  # noqa: E402
from crisp_ext.metrics import picking_metrics  # noqa: E402
from crisp_ext.types import Micrograph, Particles  # noqa: E402

# the real datasets; CRISP_BENCH_DATA names another folder holding empiar10017/ and apoferritin10146/ (a machine
# where ../shared is not beside the checkout, such as the device machine: benchmarks/device_figures.sh)
SHARED = Path(os.environ.get("CRISP_BENCH_DATA") or ROOT.parent / "shared" / "data")


def _differences(cfg: PickerConfig) -> dict:
    """``cfg`` as dotted overrides of the defaults (the keys where it differs)."""
    base, mine = PickerConfig().to_dict(), cfg.to_dict()
    return {f"{section}.{key}": value for section, values in mine.items() for key, value in values.items()
            if base[section][key] != value}

# Candidate settings (dotted config keys); "default" is the package's defaults as they are.
CANDIDATES: dict[str, dict] = {
    "default": {},
    # the defaults before the accuracy work (issue 14): one segmentation channel, picks near the edge dropped,
    # refinement fixed at 0.25 D, 64 patches per epoch, no noise augmentation
    "before": {"labels.centre_weight": 0.0, "centres.map": "auto", "centres.edge": "drop", "centres.refine": 0.25,
               "train.min_patches_per_epoch": 64, "train.noise_augment": 0.0},
    "edge_auto": {"labels.centre_weight": 0.0, "centres.map": "auto", "centres.edge": "auto"},
    "centre_only": {"labels.centre_weight": 1.0, "centres.map": "centre", "centres.edge": "drop"},
    "centre_auto": {"labels.centre_weight": 1.0, "centres.map": "auto", "centres.edge": "auto"},
    "disk05": {"labels.disk_fraction": 0.5},
    "centre_disk05": {"labels.centre_weight": 1.0, "labels.disk_fraction": 0.5},
    "tta2": {"predict.tta": 2},
    "tta8": {"predict.tta": 8},
    "lite0": {"model.encoder": "tu-efficientnet_lite0", "model.encoder_weights": "packaged"},
    "centre_lite0": {"labels.centre_weight": 1.0, "centres.map": "auto", "centres.edge": "auto",
                     "model.encoder": "tu-efficientnet_lite0", "model.encoder_weights": "packaged"},
    # issue 14's objectives for incomplete picks: self-training (one round), positive-unlabelled BCE
    "self1": {"train.self_training": 1},
    "pu30": {"train.loss": "dice+nnpu", "labels.unpicked_fraction": 0.3},
    "centre_tta2": {"labels.centre_weight": 1.0, "centres.map": "auto", "centres.edge": "auto", "predict.tta": 2},
}
# the published recipe (``crisp-ext config --paper``: U-Net++ / EfficientNet-b5 at 512², CD-CRF), for a GPU
CANDIDATES["paper"] = _differences(PickerConfig.paper())


# -- scenes -----------------------------------------------------------------------------------------------------------

class Scene:
    def __init__(self, name, mics, truth, train, val, test, diameter_px, curated=None):
        self.name = name
        self.micrographs: list[Micrograph] = mics
        self.truth: dict[str, np.ndarray] = truth  # micrograph id -> every particle (x, y), original px
        self.curated = curated or truth  # the picks a user would give for training
        self.train, self.val, self.test = train, val, test
        self.diameter_px = float(diameter_px)

    def training_picks(self) -> Particles:
        return Particles.concat([Particles.for_one(m, self.curated[m]) for m in self.train + self.val])


def _real_scene(name: str, folder: Path, diameter_px: float, split: tuple[list, list, list]) -> Scene:
    mics, truth = [], {}
    for mrc in sorted((folder / "micrographs").glob("*.mrc")):
        mics.append(Micrograph(id=mrc.stem, path=mrc))
        truth[mrc.stem] = read_coordinates(folder / "coords" / f"{mrc.stem}.star").xy
    return Scene(name, mics, truth, *split, diameter_px)


def empiar10017() -> Scene:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from eval_empiar10017 import split_names

    folder = SHARED / "empiar10017"
    stems = [p.stem for p in sorted((folder / "micrographs").glob("*.mrc"))]
    return _real_scene("empiar10017", folder, 27.0, split_names(stems))


def apoferritin() -> Scene:
    folder = SHARED / "apoferritin10146"
    split = json.loads((folder / "split.json").read_text())
    return _real_scene("apoferritin", folder, 61.0,
                       (split["split"]["train"], split["split"]["valid"], split["split"]["test"]))


def _simulated(name: str, out: Path, n: int, kwargs_for, seed: int, drop: float = 0.3, jitter: float = 0.0,
               images_of: str | None = None) -> Scene:
    """``n`` simulated micrographs (made once, then read from ``out/scenes/<images_of or name>``); the curated picks
    leave out a random ``drop`` of the particles and, with ``jitter``, are moved by N(0, jitter·D) in x and y (a
    curator's clicks). The test micrographs are scored against every particle's exact centre."""
    from crisp_ext.simulate import simulate_micrograph

    stem = images_of or name
    folder = out / "scenes" / stem
    mics, truth, curated = [], {}, {}
    rng = np.random.default_rng(seed)
    jitter_rng = np.random.default_rng(seed + 1)  # its own stream: the same particles left out as without jitter
    diameter = None
    for i in range(n):
        mid = f"{stem}_{i:02d}"
        path = folder / f"{mid}.mrc"
        star = folder / f"{mid}_truth.star"
        if not (path.is_file() and star.is_file()):
            sim = simulate_micrograph(seed=seed * 100 + i, **kwargs_for(i))
            write_mrc(path, sim.image, pixel_size=sim.pixel_size)
            write_coordinates(star, sim.centres)
        xy = read_coordinates(star).xy
        diameter = kwargs_for(i)["diameter_px"]
        mics.append(Micrograph(id=mid, path=path))
        truth[mid] = xy
        keep = rng.random(len(xy)) >= drop
        curated[mid] = xy[keep]
        if jitter:
            curated[mid] = curated[mid] + jitter_rng.normal(0.0, jitter * diameter, size=curated[mid].shape)
    ids = [m.id for m in mics]
    return Scene(name, mics, truth, ids[:4], ids[4:6], ids[6:], diameter, curated)


def crowded(out: Path) -> Scene:
    def kwargs(i):
        return dict(shape=(1024, 1024), n_particles=650, diameter_px=36.0, pixel_size=2.0, snr=0.03,
                    placement="dense", min_separation=0.7, carbon_edge=(i % 3 == 1), ice_blobs=1 + i % 2)
    return _simulated("crowded", out, 10, kwargs, seed=17)


def crowded_noisy_kwargs(i: int) -> dict:
    return dict(shape=(1024, 1024), n_particles=650, diameter_px=36.0, pixel_size=2.0, snr=0.01,
                placement="dense", min_separation=0.65, carbon_edge=(i % 3 == 1), ice_blobs=1 + i % 2,
                defocus_um=0.8 + 0.2 * (i % 4))


def crowded_noisy(out: Path) -> Scene:
    return _simulated("crowded_noisy", out, 10, crowded_noisy_kwargs, seed=29)


def crowded_noisy_jitter(out: Path) -> Scene:
    # crowded_noisy's micrographs, curated by a less careful hand: besides the 30 % left out, every pick is off the
    # particle's centre by N(0, 0.1 D) in x and y (3.6 px here; mean distance 0.125 D), as clicked picks are
    return _simulated("crowded_noisy_jitter", out, 10, crowded_noisy_kwargs, seed=29, jitter=0.1,
                      images_of="crowded_noisy")


def sparse_large(out: Path) -> Scene:
    def kwargs(i):
        return dict(shape=(1024, 1024), n_particles=90, diameter_px=64.0, pixel_size=2.5, snr=0.02,
                    placement="sparse", min_separation=1.3, carbon_edge=(i % 4 == 2), ice_blobs=i % 2)
    return _simulated("sparse_large", out, 10, kwargs, seed=23)


def sparse_elongated(out: Path) -> Scene:
    from crisp_ext.simulate import Phantom

    def kwargs(i):
        # an asymmetric rod twice as long as wide, with a knob at one end: its outline is no disk around the
        # centre the picks give (the rod's middle), so centring is not the blob's peak
        return dict(shape=(1024, 1024), n_particles=90, diameter_px=56.0, pixel_size=2.5, snr=0.015,
                    placement="sparse", min_separation=1.2, carbon_edge=(i % 4 == 1), ice_blobs=i % 2,
                    defocus_um=1.2 + 0.3 * (i % 3), phantom=Phantom.elongated(aspect=2.0))
    return _simulated("sparse_elongated", out, 10, kwargs, seed=31)


def sparse_junk(out: Path) -> Scene:
    def kwargs(i):
        # large sparse particles among objects a curator leaves unpicked, as real micrographs have: 16 per
        # micrograph, aggregates of 3-6 overlapping particles and small dark ice crystals (in no one's truth)
        return dict(shape=(1024, 1024), n_particles=90, diameter_px=56.0, pixel_size=2.5, snr=0.02,
                    placement="sparse", min_separation=1.3, carbon_edge=(i % 4 == 2), ice_blobs=i % 2, junk=16)
    return _simulated("sparse_junk", out, 10, kwargs, seed=37)


SCENES = {"empiar10017": lambda out: empiar10017(), "apoferritin": lambda out: apoferritin(),
          "crowded": crowded, "crowded_noisy": crowded_noisy, "sparse_large": sparse_large,
          "sparse_elongated": sparse_elongated, "crowded_noisy_jitter": crowded_noisy_jitter,
          "sparse_junk": sparse_junk}


# -- one run -----------------------------------------------------------------------------------------------------------

def effective_config(scene: Scene, overrides: dict, threads: int) -> PickerConfig:
    return PickerConfig().updated({"particle.diameter_px": scene.diameter_px, "train.threads": threads,
                                   **overrides})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def stale_because(cached: dict, cfg: PickerConfig) -> str | None:
    """Why a cached result no longer stands for ``cfg`` (None when it does): the defaults or the candidate's
    overrides changed since it was computed."""
    if "config" not in cached:
        return "it records no config (computed before results did)"
    now = _flat(json.loads(json.dumps(cfg.to_dict(), default=float)))
    then = _flat(cached["config"])
    diff = [f"{k} {then.get(k, '(none)')!r} -> {now.get(k, '(none)')!r}" for k in sorted(set(now) | set(then))
            if now.get(k) != then.get(k)]
    return None if not diff else "its config differs: " + "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")


def scored(preds: list, scores: list, truths: list, diameter: float) -> dict:
    """The table's figures of one picker's test picks: P / R / F1 / AP one-to-one within r = D/2 and r/2, the mean
    distance of the matches at r (original px)."""
    at_r = picking_metrics(preds, scores, truths, 0.5 * diameter)
    at_r2 = picking_metrics(preds, scores, truths, 0.25 * diameter)
    return {"P": at_r.precision, "R": at_r.recall, "F1": at_r.f1, "AP": at_r.ap,
            "P_r2": at_r2.precision, "R_r2": at_r2.recall, "F1_r2": at_r2.f1, "AP_r2": at_r2.ap,
            "centre_error_px": at_r.mean_distance, "n_pred": at_r.n_pred, "n_true": at_r.n_true}


def run_one(scene: Scene, candidate: str, overrides: dict, out: Path, threads: int, pictures: bool = False) -> dict:
    from crisp_ext.evaluation import picture_matches
    from crisp_ext.pipeline import run

    cfg = effective_config(scene, overrides, threads)
    work = out / scene.name / candidate
    test = set(scene.test)
    t0 = time.perf_counter()
    result = run(scene.micrographs, cfg, work_dir=work, particles=scene.training_picks(),
                 train_ids=scene.train, val_ids=scene.val, skip=lambda m: m.id not in test,
                 progress=lambda e: print(f"  [{scene.name}/{candidate}] {e.line()}", flush=True)
                 if e.stage not in ("pick", "prepare") or not e.total or e.done == e.total else None)
    wall = time.perf_counter() - t0
    by_mic = result.picks.by_micrograph()
    preds = [by_mic[m].xy if m in by_mic else np.zeros((0, 2)) for m in scene.test]
    scores = [by_mic[m].score if m in by_mic else np.zeros(0) for m in scene.test]
    truths = [scene.truth[m] for m in scene.test]
    d = scene.diameter_px
    if pictures:
        mics = {m.id: m for m in scene.micrographs}
        for m, xy, t in zip(scene.test, preds, truths):
            picture_matches(mics[m], xy, t, d, 0.5, None, work / "pictures")
    report = {
        "scene": scene.name, "candidate": candidate, "overrides": overrides, **scored(preds, scores, truths, d),
        "train_s": result.timings.get("prepare", 0) + result.timings.get("train", 0)
        + result.timings.get("select", 0),
        "pick_s_per_mic": result.timings.get("pick", 0.0) / max(1, len(scene.test)),
        "wall_s": wall, "finder": result.finder, "finder_params": result.finder_params,
        "threshold": result.threshold, "validation": result.validation.get("picking"),
        "config": cfg.to_dict(),
    }
    (work / "result.json").write_text(json.dumps(report, indent=1, default=float))
    return report


def run_topaz_scene(scene: Scene, candidate: str, out: Path, threads: int) -> dict:
    """Topaz trained and picking on ``scene`` exactly as crisp-ext does (same picks, same split, same scoring)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare_topaz import Dataset, Split, run_topaz

    work = out / scene.name / candidate
    ids = [m.id for m in scene.micrographs]
    # Topaz learns from (and chooses its threshold on) the curated picks, as crisp-ext does; the test set is scored
    # against every particle below
    ds = Dataset(root=work, names=ids, truths=scene.curated, diameter_px=scene.diameter_px,
                 paths={m.id: Path(m.path).resolve() for m in scene.micrographs})
    opts = SimpleNamespace(topaz_venv=ROOT / ".venv-topaz", threads=threads, topaz_epochs=4, topaz_epoch_size=250)
    t0 = time.perf_counter()
    row = run_topaz(ds, Split(scene.train, scene.val, scene.test), opts, work / "topaz_work")
    wall = time.perf_counter() - t0
    picks = row.test_picks
    keep = [s >= row.threshold for s in picks.score]  # the picks it would write, as crisp-ext's are
    preds = [xy[k] for xy, k in zip(picks.xy, keep)]
    scores = [sc[k] for sc, k in zip(picks.score, keep)]
    truths = [scene.truth[m] for m in picks.names]
    d = scene.diameter_px
    report = {
        "scene": scene.name, "candidate": candidate, "overrides": {}, **scored(preds, scores, truths, d),
        "AP_every_pick": picking_metrics(picks.xy, picks.score, truths, 0.5 * d).ap, "train_s": row.train_s,
        "pick_s_per_mic": row.pick_s / max(1, len(scene.test)),
        "wall_s": wall, "finder": "topaz", "finder_params": row.details.get("settings"),
        "threshold": row.threshold, "validation": {"f1": row.val_f1}, "config": {"topaz": row.details},
    }
    (work / "result.json").write_text(json.dumps(report, indent=1, default=float))
    return report


def is_topaz(candidate: str) -> bool:
    return candidate == "topaz" or candidate.startswith("topaz_")


def table(rows: list[dict]) -> str:
    head = ("| scene | candidate | P | R | F1@r | F1@r/2 | AP | centre err px | train s | pick s/mic | finder |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['scene']} | {r['candidate']} | {r['P']:.3f} | {r['R']:.3f} | {r['F1']:.3f} | "
                     f"{r['F1_r2']:.3f} | {r['AP']:.3f} | {r['centre_error_px']:.2f} | {r['train_s']:.0f} | "
                     f"{r['pick_s_per_mic']:.2f} | {r['finder']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", default=",".join(SCENES))
    ap.add_argument("--candidates", default="before,default")
    ap.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="define or extend a candidate, e.g. --set mine:labels.disk_fraction=0.7")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench_out/accuracy"))
    ap.add_argument("--fresh", action="store_true", help="recompute cached results")
    ap.add_argument("--val", type=int, default=None, metavar="N",
                    help="validate on only the first N of each scene's validation micrographs (the team's held-out "
                         "protocol uses 1); the others are left out entirely. Cached as CANDIDATE_valN.")
    ap.add_argument("--train-on-val", action="store_true",
                    help="train on the validation micrographs too (they still choose the epoch, finder and "
                         "threshold: an upper bound on what more curated micrographs give). Cached as "
                         "CANDIDATE_trainval.")
    ap.add_argument("--one-micrograph", action="store_true",
                    help="curated picks on the first training micrograph only, as a user who picked one micrograph "
                         "(the pipeline then trains and validates on it). Cached as CANDIDATE_one.")
    ap.add_argument("--pictures", action="store_true",
                    help="a PNG of the matches for each test micrograph of the runs computed (not of cached ones)")
    args = ap.parse_args(argv)
    candidates = {k: dict(v) for k, v in CANDIDATES.items()}
    for cand in args.candidates.split(","):
        if is_topaz(cand):  # topaz, and topaz_2, topaz_3 ...: more runs (its training is not seeded, runs differ)
            candidates[cand] = {}
    for item in args.set:
        name, kv = item.split(":", 1)
        key, value = kv.split("=", 1)
        try:
            value = json.loads(value)
        except ValueError:
            pass
        candidates.setdefault(name, {})[key] = value
    rows = []
    for scene_name in args.scenes.split(","):
        scene = SCENES[scene_name](args.out)
        if args.val is not None:
            scene.val = scene.val[: max(1, args.val)]
        if args.train_on_val:
            scene.train = scene.train + scene.val
        if args.one_micrograph:
            scene.train, scene.val = scene.train[:1], []
        for cand in args.candidates.split(","):
            run_name = cand if args.val is None else f"{cand}_val{len(scene.val)}"  # its own cache
            run_name += "_trainval" if args.train_on_val else ""
            run_name += "_one" if args.one_micrograph else ""
            work = args.out / scene.name / run_name
            cached = json.loads((work / "result.json").read_text()) if (work / "result.json").is_file() else None
            why = "--fresh" if args.fresh and work.exists() else None
            if cached is not None and not args.fresh:
                # a Topaz run has no crisp-ext config to go stale by
                why = None if is_topaz(cand) else stale_because(
                    cached, effective_config(scene, candidates[cand], args.threads))
                if why is None:
                    rows.append(cached)
                    print(table(rows[-1:]).splitlines()[-1] + " (cached)", flush=True)
                    continue
            if why is not None:  # from scratch: the pipeline would otherwise reuse the trained model
                import shutil

                stale = work.with_name(run_name + ".stale")
                shutil.rmtree(stale, ignore_errors=True)
                work.rename(stale)
                print(f"  [{scene.name}/{run_name}] recomputing ({why}); the old run is in {stale}", flush=True)
            # else: a run without a result was interrupted, and the pipeline continues it where it stopped
            rows.append(run_topaz_scene(scene, run_name, args.out, args.threads) if is_topaz(cand) else
                        run_one(scene, run_name, candidates[cand], args.out, args.threads, args.pictures))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    (args.out / "table.md").write_text(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
