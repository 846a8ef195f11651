#!/usr/bin/env python
"""Side-by-side picking benchmark on EMPIAR-10017: crisp-ext against Topaz and an untrained LoG baseline.

Every picker trains on the same training micrographs, chooses its score threshold on the same validation
micrographs (maximum F1), and picks the test micrographs. Reported per picker: precision, recall, F1 (one-to-one
Hungarian matching of centres within one particle radius, pooled over micrographs), average precision ranked by
score, training wall time, picking throughput (test micrographs per second, preprocessing included) and peak resident
memory of the process that trained / picked. Output: a table on stdout, ``results.json``, ``results.md`` and
``overlay.png`` under ``--out``.

Run from the repo root with crisp-ext's venv active::

    python benchmarks/compare_topaz.py                 # 4 training micrographs, 14 test
    python benchmarks/compare_topaz.py --quick         # smoke run: short Topaz training, 2 test micrographs

Topaz (``topaz-em`` from the registry) lives in its own venv (``--topaz-venv``, default ``.venv-topaz``), created on
first use with ``torch==2.13.0`` pinned in the same pip command so that no CUDA torch is pulled in.

Topaz compatibility notes (topaz-em 0.3.20, torch 2.13.0+cpu, numpy 2.4, Python 3.11):
- The registry's torchvision 0.28.0 is CUDA-linked; ``import torchvision`` (done by ``topaz.utils.data``) fails on
  CPU torch with "operator torchvision::nms does not exist". Setup copies crisp-ext's
  ``_torchvision_guard.py`` into the Topaz venv and adds a ``.pth`` hook that runs it lazily, just before the first
  ``import torchvision`` (not at every interpreter start, so pip and ``topaz --help`` do not pay for importing torch).
- Nothing else was needed: Topaz's preprocess, train and extract run unchanged on numpy 2 / Python 3.11.
- A Topaz bug worth knowing (not a compatibility issue): ``topaz.stats.pixels_given_radius`` builds a 3D grid
  even for 2D data, so it counts (2r+1) × the disk's pixels (203 instead of 29 for r = 3). Both the expected
  positive fraction pi (from ``-n``) and the observed labelled fraction are inflated by the same factor, and the
  GE-binomial target is their difference, so with ``-n`` equal to the labelled count per micrograph (as here) the
  effect is a tiny, still near-zero target; passing ``--pi`` by hand would be worse (it falls below the inflated
  observed fraction and Topaz switches to plain PN). Left as Topaz ships it.

Topaz settings (see ``topaz_settings``): micrographs are 7.08 Å/px with a 27 px particle, which is already the scale
Topaz recommends (its docs: downsample to roughly 4–8 Å/px so that the particle fits well inside the ResNet's
receptive field of 71 px for resnet8), so preprocessing uses ``-s 1`` (GMM normalisation only, Topaz's default
alpha/beta/sample/niters). Training uses Topaz defaults (resnet8, 32 units, initialised from its pretrained weights,
GE-binomial, positive radius 3, lr 2e-4, minibatch 256) with ``-n`` = mean particles per training micrograph. Its
default schedule (10 epochs × 1000 updates of ≈ 1.3 s each on one CPU core) would take ≈ 3.6 h, so the schedule is
``--topaz-epochs`` × ``--topaz-epoch-size``, default 4 × 250 (≈ 25 min on a shared 2-core machine). Longer does not
help on this data: with 10 × 250 the held-out AUPRC wandered between 0.43 and 0.53 from epoch 1 on, and the test F1 /
AP were 0.856 / 0.899 (best epoch 6) against 0.865 / 0.903 and 0.846 / 0.888 in two runs of 4 × 250, at 2.5× the
training time. Topaz's run-to-run spread (random minibatches, a noisy per-epoch AUPRC) is about ±0.01 in F1. The validation micrographs are Topaz's held-out set during training, and
the epoch with the best held-out AUPRC (Topaz's own per-epoch report) is used, as Topaz's tutorials do. Extraction uses
that model with the particle radius (13 px) as the non-maximum-suppression radius and a score floor of -10 (below
Topaz's default -6, so that the floor never binds); the threshold is then chosen on the validation micrographs by
maximum F1, like every other picker's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crisp_ext.metrics import picking_metrics, pr_curve

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "empiar10017"
DIAMETER_PX = 27.0
RADIUS_PX = DIAMETER_PX / 2  # matching radius: one particle radius
TOPAZ_PIN = ["topaz-em==0.3.20", "torch==2.13.0"]

SPLIT_TRAIN = ["Falcon_2012_06_12-14_57_34_0", "Falcon_2012_06_12-15_07_41_0",
               "Falcon_2012_06_12-15_14_01_0", "Falcon_2012_06_12-15_17_31_0"]
SPLIT_VAL = ["Falcon_2012_06_12-15_27_22_0", "Falcon_2012_06_12-15_30_21_0"]


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    train: list[str]
    val: list[str]
    test: list[str]


@dataclass
class Dataset:
    root: Path
    names: list[str]
    truths: dict[str, np.ndarray]  # (M, 2) x = column, y = row, MRC array frame
    diameter_px: float = DIAMETER_PX  # particle diameter, original px
    paths: dict[str, Path] | None = None  # micrograph files, when not root/micrographs/<name>.mrc

    def mrc(self, name: str) -> Path:
        if self.paths is not None:
            return self.paths[name]
        return self.root / "micrographs" / f"{name}.mrc"

    @property
    def radius_px(self) -> float:
        return self.diameter_px / 2


def load_dataset(root: Path) -> Dataset:
    import starfile

    mic_dir, coord_dir = root / "micrographs", root / "coords"
    if not mic_dir.is_dir() or not coord_dir.is_dir():
        raise SystemExit(f"error: {root} has no micrographs/ and coords/ folders; point --data at EMPIAR-10017")
    names = sorted(p.stem for p in mic_dir.glob("*.mrc"))
    truths = {}
    for name in names:
        star = coord_dir / f"{name}.star"
        if not star.is_file():
            raise SystemExit(f"error: no coordinate file {star} for micrograph {name}")
        table = starfile.read(star)
        truths[name] = table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(dtype=np.float64)
    return Dataset(root, names, truths)


def make_split(ds: Dataset, train_set: int, quick: bool) -> Split:
    missing = [n for n in SPLIT_TRAIN + SPLIT_VAL if n not in ds.names]
    if missing:
        raise SystemExit(f"error: {ds.root} lacks the split's micrographs {missing}")
    rest = [n for n in ds.names if n not in SPLIT_TRAIN + SPLIT_VAL]
    if train_set == 4:
        train, test = list(SPLIT_TRAIN), rest
    else:  # 16: the suggested 4 plus the first 12 others (sorted by name); test on what is left
        train, test = SPLIT_TRAIN + rest[:12], rest[12:]
    if quick:
        test = test[:2]
    return Split(train, list(SPLIT_VAL), test)


def read_micrograph(path: Path) -> np.ndarray:
    import mrcfile

    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------
def choose_threshold(preds, scores, truths, radius: float) -> float:
    """The score threshold with maximum pooled F1 on these micrographs (ties: the highest such threshold)."""
    curve = pr_curve(preds, scores, truths, radius)
    if len(curve.thresholds) == 0:
        return float("-inf")
    return float(curve.thresholds[int(np.argmax(curve.f1))])


@dataclass
class PickSet:
    """One picker's picks on a list of micrographs (original 1024² frame)."""

    names: list[str]
    xy: list[np.ndarray]
    score: list[np.ndarray]


def evaluate(picks: PickSet, ds: Dataset, threshold: float) -> dict:
    truths = [ds.truths[n] for n in picks.names]
    return picking_metrics(picks.xy, picks.score, truths, ds.radius_px, threshold=threshold).as_dict()


# ---------------------------------------------------------------------------------------------------------------
# measuring a picker in its own process
# ---------------------------------------------------------------------------------------------------------------
def _peak_mb_self() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _isolated_entry(queue, fn, args):
    try:
        result = fn(*args)
        queue.put(("ok", result, _peak_mb_self()))
    except BaseException as exc:  # report any failure to the parent, which re-raises
        queue.put(("error", f"{type(exc).__name__}: {exc}", _peak_mb_self()))


def run_isolated(fn, *args):
    """Run ``fn(*args)`` in a fresh (spawned) process; return (result, peak RSS of that process in MB)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_isolated_entry, args=(queue, fn, args))
    proc.start()
    while True:
        try:
            status, result, peak = queue.get(timeout=2.0)
            break
        except queue_mod.Empty:
            if not proc.is_alive():  # killed (e.g. out of memory) before it could report
                raise RuntimeError(f"{getattr(fn, '__name__', fn)} worker died with exit code {proc.exitcode}")
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its worker process: {result}")
    return result, peak


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run a command with output to ``log``; return (wall seconds, peak RSS in MB of it and its waited children)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone, unlike RUSAGE_CHILDREN's running max
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n" + "\n".join(tail))
    return wall, usage.ru_maxrss / 1024.0


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


# ---------------------------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    picker: str
    status: str = "ok"  # "ok" | "absent" | "failed"
    note: str = ""
    threshold: float | None = None
    metrics: dict = field(default_factory=dict)  # precision, recall, f1, ap, n_pred, n_true, n_matched, mean_distance
    val_f1: float | None = None
    train_s: float | None = None
    pick_s: float | None = None  # wall seconds to pick all test micrographs, preprocessing included
    n_test: int = 0
    train_peak_mb: float | None = None
    pick_peak_mb: float | None = None
    details: dict = field(default_factory=dict)
    val_picks: PickSet | None = None  # every pick with its score; saved to picks_<picker>.npz, not to the JSON
    test_picks: PickSet | None = None

    @property
    def mics_per_s(self) -> float | None:
        return self.n_test / self.pick_s if self.pick_s else None

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("val_picks", "test_picks")}
        out["mics_per_s"] = self.mics_per_s
        return out


# ---------------------------------------------------------------------------------------------------------------
# Topaz
# ---------------------------------------------------------------------------------------------------------------
_HOOK_SOURCE = '''"""Run crisp-ext's torchvision guard just before the first import of torchvision (written by compare_topaz.py)."""
import sys


class _GuardFirst:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)  # once only; the guard itself looks torchvision up
            import crisp_tv_guard

            crisp_tv_guard.install()
        return None  # let the normal finders import it


sys.meta_path.insert(0, _GuardFirst())
'''


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_topaz_venv(venv: Path) -> Path:
    """Create the Topaz venv if needed and (re)install the torchvision guard hook; return its ``topaz`` command."""
    py = _venv_python(venv)
    if not py.exists():
        print(f"[setup] creating Topaz venv at {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('topaz-em'))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"[setup] installing {' '.join(TOPAZ_PIN)} into {venv} (about a minute)", flush=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *TOPAZ_PIN], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    site = Path(site)
    guard_src = (REPO / "crisp_ext" / "_torchvision_guard.py").read_text()
    for fname, text in (("crisp_tv_guard.py", guard_src), ("crisp_tv_guard_hook.py", _HOOK_SOURCE),
                        ("crisp-tv-guard.pth", "import crisp_tv_guard_hook\n")):
        target = site / fname
        if not target.exists() or target.read_text() != text:  # refresh when the repo's guard changes
            target.write_text(text)
    check = subprocess.run([str(py), "-c", "import topaz.utils.data.sampler, torchvision; print('ok')"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"error: Topaz in {venv} does not import even with the guard:\n{check.stderr[-2000:]}")
    return venv / "bin" / "topaz"


def topaz_version(venv: Path) -> str:
    out = subprocess.run([str(_venv_python(venv)), "-c",
                          "import importlib.metadata as m; print(m.version('topaz-em'), m.version('torch'))"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def topaz_settings(args, n_per_mic: float, diameter_px: float = DIAMETER_PX) -> dict:
    # EMPIAR-10017's 27 px particle is already at Topaz's working scale; larger particles are binned by the integer
    # factor that brings them nearest to it (61-64 px by 2), well inside resnet8's receptive field of 71 px.
    scale = max(1, int(round(diameter_px / DIAMETER_PX)))
    return {
        "preprocess_scale": scale,
        "model": "resnet8", "units": 32, "pretrained_init": True, "method": "GE-binomial",
        "train_radius": 3, "num_particles": round(n_per_mic), "minibatch_size": 256,
        "epochs": args.topaz_epochs, "epoch_size": args.topaz_epoch_size,
        # NMS radius in binned px: one particle radius
        "extract_radius": int(diameter_px / scale / 2), "extract_floor": -10.0, "threads": args.threads,
    }


def _link_micrographs(ds: Dataset, names: list[str], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        link = dest / f"{n}.mrc"
        if not link.exists():
            link.symlink_to(ds.mrc(n))
    return dest


def _write_topaz_targets(ds: Dataset, names: list[str], path: Path, scale: int) -> None:
    """Training targets in Topaz's coordinate table, at the preprocessed (down-scaled) pixel size."""
    lines = ["image_name\tx_coord\ty_coord"]
    for n in names:
        lines += [f"{n}\t{int(round(x / scale))}\t{int(round(y / scale))}" for x, y in ds.truths[n]]
    path.write_text("\n".join(lines) + "\n")


def _read_topaz_coords(path: Path, names: list[str]) -> PickSet:
    """Picks from ``topaz extract -o`` (x = column, y = row, already up-scaled with ``-x``) with their scores."""
    import pandas as pd

    table = pd.read_csv(path, sep="\t")
    xy, score = [], []
    for n in names:
        sub = table[table["image_name"].astype(str) == n]
        xy.append(sub[["x_coord", "y_coord"]].to_numpy(dtype=np.float64))
        score.append(sub["score"].to_numpy(dtype=np.float64))
    return PickSet(list(names), xy, score)


def run_topaz(ds: Dataset, split: Split, args, work: Path) -> Row:
    topaz = ensure_topaz_venv(args.topaz_venv)
    n_per_mic = float(np.mean([len(ds.truths[n]) for n in split.train]))
    cfg = topaz_settings(args, n_per_mic, ds.diameter_px)
    env = thread_env(args.threads)
    j = str(args.threads)
    scale = cfg["preprocess_scale"]
    work.mkdir(parents=True, exist_ok=True)
    timings, peaks = {}, {}

    def preprocess(part: str, names: list[str]) -> Path:
        src = _link_micrographs(ds, names, work / "raw" / part)
        dst = work / "pre" / part
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        cmd = [topaz, "preprocess", "-s", str(scale), "-d", "-1", "-t", "0", "-j", j, "-o", dst,
               *sorted(src.glob("*.mrc"))]
        timings[f"preprocess_{part}_s"], peaks[f"preprocess_{part}_mb"] = run_logged(
            cmd, work / f"preprocess_{part}.log", env)
        return dst

    def extract(part: str, pre: Path, model: Path) -> PickSet:
        out = work / f"extract_{part}.txt"
        cmd = [topaz, "extract", "-m", model, "-r", str(cfg["extract_radius"]), "-t", str(cfg["extract_floor"]),
               "-x", str(scale), "-d", "-1", "--num-workers", "0", "-j", j, "-o", out, *sorted(pre.glob("*.mrc"))]
        timings[f"extract_{part}_s"], peaks[f"extract_{part}_mb"] = run_logged(cmd, work / f"extract_{part}.log", env)
        names = split.val if part == "val" else split.test
        return _read_topaz_coords(out, names)

    print(f"[topaz] preprocess + train on {len(split.train)} micrographs "
          f"({cfg['epochs']} × {cfg['epoch_size']} updates, {args.threads} thread(s))", flush=True)
    pre_train = preprocess("train", split.train)
    targets, val_targets = work / "train_targets.txt", work / "val_targets.txt"
    _write_topaz_targets(ds, split.train, targets, scale)
    _write_topaz_targets(ds, split.val, val_targets, scale)
    pre_val = preprocess("val", split.val)
    model_prefix = work / "model" / "topaz"
    shutil.rmtree(model_prefix.parent, ignore_errors=True)  # no stale epochs from an earlier run
    model_prefix.parent.mkdir(parents=True)
    cmd = [topaz, "train", "-d", "-1", "--num-workers", "0", "-j", j,
           "--train-images", pre_train, "--train-targets", targets,
           "--test-images", pre_val, "--test-targets", val_targets,  # Topaz's per-epoch held-out score
           "-n", str(cfg["num_particles"]), "-r", str(cfg["train_radius"]),
           "--model", cfg["model"], "--units", str(cfg["units"]), "--method", cfg["method"],
           "--minibatch-size", str(cfg["minibatch_size"]),
           "--num-epochs", str(cfg["epochs"]), "--epoch-size", str(cfg["epoch_size"]),
           "--save-prefix", model_prefix, "-o", work / "train_curve.txt"]
    timings["train_s"], peaks["train_mb"] = run_logged(cmd, work / "train.log", env)
    epoch, val_auprc = _best_topaz_epoch(work / "train_curve.txt")
    model = _topaz_epoch_model(model_prefix, epoch)
    cfg.update(chosen_epoch=epoch, chosen_epoch_val_auprc=val_auprc)

    print(f"[topaz] epoch {epoch} chosen (validation pixel AUPRC {val_auprc:.3f}); choosing the threshold on the "
          "validation micrographs", flush=True)
    val = extract("val", pre_val, model)
    threshold = choose_threshold(val.xy, val.score, [ds.truths[n] for n in val.names], ds.radius_px)
    val_f1 = evaluate(val, ds, threshold)["f1"]

    print(f"[topaz] picking {len(split.test)} test micrographs", flush=True)
    test = extract("test", preprocess("test", split.test), model)
    row = Row("Topaz (resnet8, trained)", threshold=threshold, val_f1=val_f1, n_test=len(split.test))
    row.metrics = evaluate(test, ds, threshold)
    row.train_s = timings["preprocess_train_s"] + timings["train_s"]
    row.pick_s = timings["preprocess_test_s"] + timings["extract_test_s"]
    row.train_peak_mb = max(peaks["preprocess_train_mb"], peaks["train_mb"])
    row.pick_peak_mb = max(peaks["preprocess_test_mb"], peaks["extract_test_mb"])
    row.details = {"settings": cfg, "timings_s": timings, "peaks_mb": peaks, "version": topaz_version(args.topaz_venv)}
    row.val_picks, row.test_picks = val, test
    return row


def _best_topaz_epoch(curve: Path) -> tuple[int, float]:
    """(epoch, AUPRC) of the epoch whose held-out pixel AUPRC in Topaz's training curve is highest."""
    import pandas as pd

    table = pd.read_csv(curve, sep="\t")
    held = table[table["split"] == "test"]
    if held.empty:
        raise RuntimeError(f"Topaz's training curve {curve} has no held-out rows")
    best = held.loc[pd.to_numeric(held["auprc"]).idxmax()]
    return int(best["epoch"]), float(best["auprc"])


def _topaz_epoch_model(prefix: Path, epoch: int) -> Path:
    """The model Topaz saved after ``epoch`` (it pads the epoch number to the width of the epoch count)."""
    for path in prefix.parent.glob(f"{prefix.name}_epoch*.sav"):
        if int(path.stem.rsplit("_epoch", 1)[1]) == epoch:
            return path
    raise RuntimeError(f"Topaz saved no model for epoch {epoch} under {prefix.parent}")


# ---------------------------------------------------------------------------------------------------------------
# LoG baseline (untrained floor)
# ---------------------------------------------------------------------------------------------------------------
LOG_SIGMA_FACTORS = (0.35, 0.5, 0.6, 0.7, 0.85)  # σ = factor × radius; r/√2 ≈ 0.71 r is the ideal disk detector


def log_pick(paths: list[Path], sigma: float, min_distance: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Dark-blob picks: peaks of the scale-normalised LoG of the normalised micrograph, score = LoG response."""
    from scipy import ndimage
    from skimage.feature import peak_local_max

    out = []
    for path in paths:
        img = read_micrograph(path)
        img = (img - img.mean()) / (img.std() + 1e-6)
        # Particles are dark: the LoG of a dark disk is positive at its centre, so no inversion is needed.
        response = sigma ** 2 * ndimage.gaussian_laplace(img, sigma)
        border = int(np.ceil(RADIUS_PX))  # the filter sees padding there
        peaks = peak_local_max(response, min_distance=min_distance, exclude_border=border, threshold_abs=0.0)
        out.append((peaks[:, ::-1].astype(np.float64), response[peaks[:, 0], peaks[:, 1]].astype(np.float64)))
    return out


def _log_set(names, results) -> PickSet:
    return PickSet(list(names), [r[0] for r in results], [r[1] for r in results])


def run_log_baseline(ds: Dataset, split: Split, args) -> Row:
    min_distance = int(RADIUS_PX)
    best = None
    val_truths = [ds.truths[n] for n in split.val]
    for factor in LOG_SIGMA_FACTORS:  # σ and threshold are the baseline's only choices, both made on validation
        sigma = factor * RADIUS_PX
        val = _log_set(split.val, log_pick([ds.mrc(n) for n in split.val], sigma, min_distance))
        t = choose_threshold(val.xy, val.score, val_truths, RADIUS_PX)
        f1 = evaluate(val, ds, t)["f1"]
        if best is None or f1 > best[0]:
            best = (f1, sigma, t, val)
    val_f1, sigma, threshold, val = best
    print(f"[log] σ = {sigma:.1f} px chosen on validation (F1 {val_f1:.3f}); picking {len(split.test)} test "
          "micrographs", flush=True)
    t0 = time.perf_counter()
    results, peak = run_isolated(log_pick, [ds.mrc(n) for n in split.test], sigma, min_distance)
    pick_s = time.perf_counter() - t0
    test = _log_set(split.test, results)
    row = Row("LoG blobs (untrained)", threshold=threshold, val_f1=val_f1, n_test=len(split.test), train_s=0.0,
              pick_s=pick_s, pick_peak_mb=peak)
    row.metrics = evaluate(test, ds, threshold)
    row.details = {"sigma_px": sigma, "min_distance_px": min_distance,
                   "note": "pick time includes starting a fresh Python process (≈1 s)"}
    row.val_picks, row.test_picks = val, test
    return row


# ---------------------------------------------------------------------------------------------------------------
# crisp-ext (added by the lead once the pipeline exists)
# ---------------------------------------------------------------------------------------------------------------
CRISP_VARIANTS = ("default", "tuned", "paper")
# "tuned": the two settings that measured best on EMPIAR-10017 (README, "Accuracy and speed"): label disks of half
# the diameter (separates touching particles) and 8-view test-time augmentation (8 network passes per tile).
TUNED = {"labels.disk_fraction": 0.5, "predict.tta": 8}


def _crisp_inputs(ds: Dataset, names: list[str]):
    from crisp_ext.types import Micrograph, Particles

    mics = [Micrograph(id=n, path=ds.mrc(n)) for n in names]
    parts = Particles.concat([Particles.for_one(n, ds.truths[n]) for n in names])
    return mics, parts


def _crisp_config(variant: str, threads: int):
    from crisp_ext.config import PickerConfig

    cfg = PickerConfig.paper() if variant == "paper" else PickerConfig().updated(TUNED if variant == "tuned" else {})
    return cfg.updated({"particle.diameter_px": DIAMETER_PX, "train.threads": threads, "predict.workers": 0})


def _crisp_train(ds: Dataset, split: Split, variant: str, threads: int, work: str):
    """Train on split.train, choose finder + threshold on split.val; return the model dir, the threshold the
    pipeline chose, and every validation pick with its score (no threshold)."""
    from crisp_ext.pipeline import pick, prepare_picker

    cfg = _crisp_config(variant, threads)
    mics, parts = _crisp_inputs(ds, split.train + split.val)
    t0 = time.perf_counter()
    picker = prepare_picker(mics, cfg, work_dir=Path(work), particles=parts, train_ids=split.train,
                            val_ids=split.val)
    train_s = time.perf_counter() - t0
    chosen = picker.threshold
    picker.threshold = 0.0  # every pick, with its score, for AP and the benchmark's own threshold rule
    val = pick(picker, [m for m in mics if m.id in split.val], work_dir=Path(work) / "val_picks")
    val_set = _crisp_pickset(split.val, val.picks)
    return str(picker.model_dir), chosen, train_s, val_set, picker.finder, picker.params


def _crisp_pickset(names: list[str], picks) -> PickSet:
    xy, score = [], []
    for n in names:
        p = picks.for_micrograph(n)
        xy.append(p.xy)
        score.append(p.score)
    return PickSet(list(names), xy, score)


def _crisp_pick(ds: Dataset, names: list[str], model_dir: str, variant: str, threads: int, work: str):
    """Pick ``names`` with a trained model directory (model loading, reading, binning and prediction included)."""
    from crisp_ext.pipeline import pick, prepare_picker

    cfg = _crisp_config(variant, threads).updated({"centres.threshold": 0.0})
    mics, _ = _crisp_inputs(ds, names)
    t0 = time.perf_counter()
    picker = prepare_picker(mics, cfg, work_dir=Path(work), model_dir=Path(model_dir))
    result = pick(picker, mics, work_dir=Path(work))
    return _crisp_pickset(names, result.picks), time.perf_counter() - t0


def run_crisp_ext(ds: Dataset, split: Split, args, variant: str, work: Path) -> Row:
    """crisp-ext row for ``variant`` ("default" or "paper"): train on split.train, threshold on split.val (the
    benchmark's max-F1 rule on crisp-ext's validation picks, like every picker), pick split.test; training and
    picking each run in their own process for the time and peak-memory figures."""
    name = f"crisp-ext ({variant})"
    if variant == "paper" and not args.paper:
        raise NotImplementedError("paper config (U-Net++ / EfficientNet-b5, 512² at 108 px particles) needs a GPU: "
                                  "≈ 16.6 h of training on this CPU by bench_segmentation's extrapolation; run with "
                                  "--paper where a GPU is available")
    work.mkdir(parents=True, exist_ok=True)
    print(f"[crisp-ext {variant}] training on {len(split.train)} micrographs, validating on {len(split.val)}",
          flush=True)
    (model_dir, chosen, train_s, val, finder, params), train_peak = run_isolated(
        _crisp_train, ds, split, variant, args.threads, str(work))
    threshold = choose_threshold(val.xy, val.score, [ds.truths[n] for n in split.val], RADIUS_PX)
    print(f"[crisp-ext {variant}] trained in {train_s:.0f} s; finder {finder}; picking {len(split.test)} test "
          "micrographs", flush=True)
    t0 = time.perf_counter()
    (test, pick_s), pick_peak = run_isolated(_crisp_pick, ds, split.test, model_dir, variant, args.threads,
                                             str(work / "test"))
    row = Row(name, threshold=threshold, val_f1=evaluate(val, ds, threshold)["f1"], n_test=len(split.test),
              train_s=train_s, pick_s=pick_s, train_peak_mb=train_peak, pick_peak_mb=pick_peak)
    row.metrics = evaluate(test, ds, threshold)
    row.details = {"finder": finder, "finder_params": params, "pipeline_threshold": chosen,
                   "model_dir": model_dir, "pick_wall_incl_process_start_s": time.perf_counter() - t0}
    row.val_picks, row.test_picks = val, test
    return row


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table_lines(rows: list[Row]) -> list[str]:
    head = ["picker", "P", "R", "F1", "AP", "picks/truth", "thr (val F1)", "train s", "mics/s", "s/mic",
            "peak MB train/pick"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.status != "ok":
            lines.append("| " + r.picker + " | " + " | ".join(["—"] * (len(head) - 2)) + f" | {r.status}: {r.note} |")
            continue
        m = r.metrics
        s_per_mic = r.pick_s / r.n_test if r.pick_s and r.n_test else None
        cells = [r.picker, _fmt(m["precision"], ".3f"), _fmt(m["recall"], ".3f"), _fmt(m["f1"], ".3f"),
                 _fmt(m["ap"], ".3f"), f"{m['n_pred']}/{m['n_true']}",
                 f"{_fmt(r.threshold, '.3g')} ({_fmt(r.val_f1, '.3f')})", _fmt(r.train_s, ".0f"),
                 _fmt(r.mics_per_s, ".3f"), _fmt(s_per_mic, ".2f"),
                 f"{_fmt(r.train_peak_mb, '.0f')}/{_fmt(r.pick_peak_mb, '.0f')}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_overlay(ds: Dataset, name: str, rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    img = read_micrograph(ds.mrc(name))
    lo, hi = np.percentile(img, [1, 99])
    fig, ax = plt.subplots(figsize=(10, 10), dpi=110)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
    truth = ds.truths[name]
    for x, y in truth:
        ax.add_patch(Circle((x, y), RADIUS_PX, fill=False, lw=0.8, ec="lime", alpha=0.8))
    ax.plot([], [], "o", mfc="none", mec="lime", label=f"truth ({len(truth)}), circle = matching radius")
    styles = [("+", "red"), ("x", "deepskyblue"), ("1", "orange"), ("2", "magenta")]
    drawn = [r for r in rows if r.status == "ok" and r.test_picks is not None and name in r.test_picks.names]
    for r, (marker, colour) in zip(drawn, styles):
        k = r.test_picks.names.index(name)
        xy = r.test_picks.xy[k][r.test_picks.score[k] >= r.threshold]
        ax.plot(xy[:, 0], xy[:, 1], marker, ms=7, mew=1.2, color=colour, ls="none", label=f"{r.picker} ({len(xy)})")
    ax.set_title(f"{name}: picks above each picker's validation-chosen threshold")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def save_picks(path: Path, row: Row) -> None:
    """All validation and test picks with scores (to recompute metrics without re-running a picker)."""
    arrays = {}
    for part, picks in (("val", row.val_picks), ("test", row.test_picks)):
        if picks is None:
            continue
        for name, xy, score in zip(picks.names, picks.xy, picks.score):
            arrays[f"{part}/{name}/xy"] = xy
            arrays[f"{part}/{name}/score"] = score
    np.savez_compressed(path, threshold=np.float64(row.threshold), **arrays)


def write_outputs(out: Path, rows: list[Row], meta: dict, ds: Dataset, split: Split) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    lines = table_lines(rows)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": [r.to_json() for r in rows]}, indent=2,
                                                 default=float))
    md = [f"# Picking benchmark on EMPIAR-10017 ({meta['date']})", "",
          f"Train {len(split.train)}, validation {len(split.val)}, test {len(split.test)} micrographs; matching "
          f"radius {RADIUS_PX} px (Hungarian, one-to-one); threshold per picker = max F1 on validation; "
          f"{meta['threads']} thread(s); {meta['machine']}.", "", *lines, "",
          "P/R/F1 at the chosen threshold; AP over all picks ranked by score. mics/s and s/mic: test micrographs, "
          "preprocessing and process start included. Peak MB: maximum resident memory of the training / picking "
          "process.", ""]
    (out / "results.md").write_text("\n".join(md))
    write_overlay(ds, split.test[0], rows, out / "overlay.png")
    for r in rows:
        if r.test_picks is not None:
            save_picks(out / f"picks_{_slug(r.picker)}.npz", r)
    return lines


def reusable(previous: dict | None, prefix: str) -> bool:
    """Whether an earlier run's results (``--reuse``) hold a finished row whose picker starts with ``prefix``."""
    return previous is not None and any(r["picker"].startswith(prefix) and r["status"] == "ok"
                                        for r in previous["rows"])


def reuse_row(previous: dict, results: Path, prefix: str, ds: Dataset, split: Split) -> Row:
    """The row of an earlier run whose picker starts with ``prefix``; metrics recomputed from its saved picks."""
    old = next(r for r in previous["rows"] if r["picker"].startswith(prefix) and r["status"] == "ok")
    if previous["meta"]["split"] != split.__dict__:
        raise SystemExit(f"{results}: that run used another train/validation/test split")
    fields = {k: v for k, v in old.items() if k in Row.__dataclass_fields__}
    row = Row(**fields)
    arrays = np.load(results.parent / f"picks_{_slug(row.picker)}.npz")
    for part, names in (("val", split.val), ("test", split.test)):
        picks = PickSet(names, [arrays[f"{part}/{n}/xy"] for n in names], [arrays[f"{part}/{n}/score"] for n in names])
        setattr(row, f"{part}_picks", picks)
    row.metrics = evaluate(row.test_picks, ds, row.threshold)
    row.details = dict(row.details, reused_from=f"{results} ({previous['meta']['date']})")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="EMPIAR-10017 folder (micrographs/, coords/)")
    p.add_argument("--out", type=Path, default=REPO / "bench_out" / "compare_topaz", help="output folder")
    p.add_argument("--train-set", type=int, choices=(4, 16), default=4,
                   help="4: the suggested training micrographs, test on 14; 16: those plus 12 more, test on 2")
    p.add_argument("--quick", action="store_true", help="smoke run: short Topaz training, 2 test micrographs")
    p.add_argument("--topaz-venv", type=Path, default=REPO / ".venv-topaz", help="Topaz venv (created if missing)")
    p.add_argument("--skip-topaz", action="store_true", help="leave out the Topaz row")
    p.add_argument("--skip-crisp", action="store_true", help="leave out the crisp-ext rows")
    p.add_argument("--reuse", type=Path, default=None, metavar="RESULTS_JSON",
                   help="take the Topaz and crisp-ext rows that an earlier run's results.json has (status ok) from "
                        "there, re-scored from its picks_*.npz, instead of training them again (Topaz: ~25 min)")
    p.add_argument("--topaz-epochs", type=int, default=None, help="Topaz epochs (default 4; --quick 1)")
    p.add_argument("--topaz-epoch-size", type=int, default=None, help="updates per epoch (default 250; --quick 20)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every picker (default 1)")
    p.add_argument("--paper", action="store_true", help="also train crisp-ext's paper config (GPU-sized: hours on a CPU)")
    args = p.parse_args(argv)
    args.topaz_epochs = args.topaz_epochs or (1 if args.quick else 4)
    args.topaz_epoch_size = args.topaz_epoch_size or (20 if args.quick else 250)
    args.topaz_venv = args.topaz_venv.resolve()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # inherited by the spawned workers

    ds = load_dataset(args.data)
    split = make_split(ds, args.train_set, args.quick)
    print(f"train {len(split.train)}, validation {len(split.val)}, test {len(split.test)} micrographs", flush=True)
    rows: list[Row] = []

    rows.append(run_log_baseline(ds, split, args))
    previous = json.loads(args.reuse.read_text()) if args.reuse else None
    if reusable(previous, "Topaz"):
        rows.append(reuse_row(previous, args.reuse, "Topaz", ds, split))
    elif args.skip_topaz:
        rows.append(Row("Topaz (resnet8, trained)", status="absent", note="--skip-topaz"))
    else:
        try:
            rows.append(run_topaz(ds, split, args, args.out / "topaz_work"))
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"[topaz] failed: {exc}", file=sys.stderr)
            rows.append(Row("Topaz (resnet8, trained)", status="failed", note=str(exc).splitlines()[0]))
    for variant in CRISP_VARIANTS:
        name = f"crisp-ext ({variant})"
        if args.skip_crisp:
            rows.append(Row(name, status="absent", note="--skip-crisp"))
            continue
        if reusable(previous, name):
            rows.append(reuse_row(previous, args.reuse, name, ds, split))
            continue
        try:
            rows.append(run_crisp_ext(ds, split, args, variant, args.out / f"crisp_{variant}_work"))
        except NotImplementedError as exc:
            rows.append(Row(name, status="absent", note=str(exc)))

    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "split": split.__dict__, "radius_px": RADIUS_PX, "threads": args.threads, "quick": args.quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
    }
    lines = write_outputs(args.out, rows, meta, ds, split)
    print("\n".join(lines))
    print(f"\nsaved {args.out / 'results.json'}, results.md, overlay.png ({split.test[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
