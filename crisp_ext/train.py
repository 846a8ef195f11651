"""Training of the segmentation network on a handful of labelled micrographs.

Each epoch draws ``patches_per_micrograph`` random square patches from every training micrograph (more when
needed to reach ``min_patches_per_epoch`` in all; flips, 90° rotations and intensity jitter when ``augment``), in
shuffled batches; Adam with a one-cycle schedule stepped per
batch. After each epoch (every ``val_every``) the whole validation micrographs are predicted with the tiled
predictor and scored (pixel IoU / F1 at 0.5, soft Dice; ignored pixels left out); early stopping watches
``monitor``. The best weights are copied (not referenced) and restored at the end.

Reproducible: the model is initialised from ``seed`` and every epoch re-seeds its patch sampler and torch's RNG from
``(seed, phase, epoch)``, so a run interrupted and resumed from ``checkpoint.pt`` ends with the same weights as an
uninterrupted one (same device and thread count).

With ``crf.kind != "none"`` a second phase fine-tunes the network wrapped in the CRF
(:func:`crisp_ext.crf.build_crf_segmenter`) with discriminative learning rates (``crf.lr_cnn`` / ``crf.lr_crf``,
one-cycle) for ``crf.finetune_epochs``; its epoch 0 is the wrapped best network before fine-tuning.

Files in ``out_dir``: ``history.csv`` / ``history.json`` (one row per epoch, rewritten each epoch),
``training_curve.png``, ``checkpoint.pt`` (last epoch: weights, optimiser, scheduler, counters; for resuming) and
``best.pt`` (best weights so far).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .config import PickerConfig
from .errors import Aborted, InputError
from .io.atomic import atomic_path, atomic_write_text
from .labels import Labels
from .losses import build_loss
from .model import build_model, count_parameters, size_multiple
from .predict import autocast_context, predict_maps
from .progress import ProgressCallback, ProgressEvent

CHECKPOINT_VERSION = 1
MONITORS = ("iou", "f1", "dice", "ap")


@dataclass
class LabeledImage:
    """One training or validation micrograph at the working scale."""

    image: np.ndarray  # float32 (H, W), normalised
    labels: Labels
    name: str = ""
    truth_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (N, 2) working px
    diameter_px: float = 0.0  # particle diameter in working px (0: the working scale's target)


@dataclass
class TrainResult:
    model: nn.Module  # best weights restored, eval mode
    history: list[dict]
    best_epoch: int
    best_metric: float
    seconds: float
    device: torch.device = torch.device("cpu")
    resumed: bool = False


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given (checked)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InputError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {spec!r} asked for but CUDA is not available here; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise InputError(f"unsupported device {spec!r} (use auto, cpu, cuda or cuda:N)")
    return device


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None) -> int:
    """Set torch's CPU threads (``None`` or 0 = all cores this process may use) and glibc's heap thresholds for its
    large buffers (:mod:`crisp_ext.allocator`); returns the number of threads set."""
    from .allocator import keep_large_buffers

    keep_large_buffers()
    n = int(threads) if threads else available_cores()
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


# -- data ----------------------------------------------------------------------------------------------------------


def _check_items(items: list[LabeledImage], what: str) -> None:
    for it in items:
        if it.image.ndim != 2 or it.image.shape != it.labels.target.shape:
            raise InputError(f"{what} micrograph {it.name or '?'}: image {it.image.shape} and labels "
                             f"{it.labels.target.shape} must be 2D and equal in shape")
        if not np.isfinite(it.image).all():
            raise InputError(f"{what} micrograph {it.name or '?'}: image holds NaN or infinite values")


def film_edge(size: int, rng: np.random.Generator) -> np.ndarray:
    """An additive ``(size, size)`` film edge for a normalised patch: a step of -2..2 (in the image's standard
    deviations) across a random, slightly curved line through the patch, 1-3 px wide, with a fringe of -1.5..1.5
    along it."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2.0
    theta = rng.uniform(0.0, 2.0 * np.pi)
    along = -xx * np.sin(theta) + yy * np.cos(theta)
    dist = xx * np.cos(theta) + yy * np.sin(theta) - rng.uniform(-0.4, 0.4) * size
    dist += rng.uniform(-1.0, 1.0) * along ** 2 / size  # a hole's rim: curved
    width = rng.uniform(1.0, 3.0)
    step = 1.0 / (1.0 + np.exp(-np.clip(dist / width, -30.0, 30.0)))
    fringe = np.exp(-0.5 * (dist / width) ** 2)
    return (rng.uniform(-2.0, 2.0) * step + rng.uniform(-1.5, 1.5) * fringe).astype(np.float32)


class _PatchSampler:
    """Random (augmented) patches; images smaller than a patch are padded with ignored pixels."""

    def __init__(self, items: list[LabeledImage], patch: int, augment: bool, jitter: float, edges: float = 0.0,
                 scale: float = 0.0, noise: float = 0.0):
        self.patch = patch
        self.noise = float(noise)
        self.augment = augment
        self.jitter = float(jitter)
        self.edges = float(edges)
        self.scale = float(scale)
        self.stacks = []
        for it in items:
            img = it.image.astype(np.float32, copy=False)
            planes = [it.labels.weight.astype(np.float32)] + [t.astype(np.float32) for t in it.labels.channels()]
            ph, pw = max(0, patch - img.shape[0]), max(0, patch - img.shape[1])
            if ph or pw:
                img = np.pad(img, ((0, ph), (0, pw)), mode="reflect")
                planes = [np.pad(a, ((0, ph), (0, pw))) for a in planes]
            self.stacks.append(np.stack([img] + planes))
        if len({s.shape[0] for s in self.stacks}) > 1:
            raise InputError("training micrographs differ in their label channels (centre target on some only)")

    def _rescaled(self, stack: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A patch of image and labels magnified by exp(U(-scale, scale)): a crop of p / factor px resampled
        (bilinear) to p, so particles appear that much larger or smaller than the working diameter."""
        from scipy import ndimage

        p = self.patch
        h, w = stack.shape[1:]
        factor = float(np.exp(rng.uniform(-self.scale, self.scale)))
        src = int(min(h, w, max(8, round(p / factor))))
        r = int(rng.integers(0, h - src + 1))
        c = int(rng.integers(0, w - src + 1))
        crop = stack[:, r:r + src, c:c + src]
        if src == p:
            return crop
        # zoom's output is round(src * p / src) = p px on a side
        return np.stack([ndimage.zoom(plane, p / src, order=1, mode="nearest", grid_mode=True) for plane in crop])

    def epoch(self, rng: np.random.Generator, per_image: int) -> np.ndarray:
        """``(N, 2 + C, P, P)`` patches (image, weight, C targets) in shuffled order."""
        p = self.patch
        out = []
        for stack in self.stacks:
            h, w = stack.shape[1:]
            for _ in range(per_image):
                if self.augment and self.scale > 0:
                    patch = self._rescaled(stack, rng)
                else:
                    r = int(rng.integers(0, h - p + 1))
                    c = int(rng.integers(0, w - p + 1))
                    patch = stack[:, r:r + p, c:c + p]
                if self.augment:
                    patch = np.rot90(patch, int(rng.integers(4)), axes=(1, 2))
                    if rng.random() < 0.5:
                        patch = patch[:, :, ::-1]
                    patch = np.array(patch)
                    if self.jitter > 0:
                        gain = float(np.exp(rng.normal(0.0, self.jitter)))
                        patch[0] = patch[0] * gain + float(rng.normal(0.0, self.jitter))
                    if self.edges > 0 and rng.random() < self.edges:
                        patch[0] += film_edge(p, rng)
                    if self.noise > 0 and rng.random() < self.noise:
                        # fainter particles: white noise of up to 1.5 in the normalised image's units (its noise
                        # about 1), then back to about its variance (the particles' contrast down to 0.55 of theirs)
                        extra = rng.uniform(0.0, 1.5)
                        patch[0] = (patch[0] + rng.normal(0.0, extra, size=patch[0].shape)) / np.sqrt(1 + extra ** 2)
                out.append(np.ascontiguousarray(patch))
        order = rng.permutation(len(out))
        depth = self.stacks[0].shape[0] if self.stacks else 3
        return np.stack([out[i] for i in order]) if out else np.zeros((0, depth, p, p), np.float32)


# -- validation ----------------------------------------------------------------------------------------------------


def evaluate_maps(probs: list[np.ndarray], labels: list[Labels], threshold: float = 0.5) -> dict[str, float]:
    """Pooled pixel IoU / F1 / precision / recall at ``threshold`` and the soft Dice, ignored pixels left out."""
    from .metrics import pooled_pixel_metrics

    pred = [p >= threshold for p in probs]
    truth = [lab.target > 0.5 for lab in labels]
    scores = pooled_pixel_metrics(pred, truth, [lab.ignore for lab in labels])
    inter = sum(float((p * lab.target * lab.weight).sum()) for p, lab in zip(probs, labels))
    card = sum(float(((p + lab.target) * lab.weight).sum()) for p, lab in zip(probs, labels))
    return {"iou": scores["iou"], "f1": scores["f1"], "precision": scores["precision"],
            "recall": scores["recall"], "dice": 2 * inter / card if card > 0 else 0.0}


def picking_ap(maps: list[np.ndarray], val: list[LabeledImage], target_diameter_px: float) -> float:
    """Average precision of the picks the NMS finder (its default settings) makes on the validation maps, matched
    to the curated picks within half a diameter, pooled over micrographs; the better of the output channels (the
    picking map is chosen later, the same way)."""
    from .centres import get_finder
    from .metrics import pr_curve

    finder = get_finder("nms")
    diameters = [it.diameter_px or target_diameter_px for it in val]
    best = 0.0
    for channel in range(maps[0].shape[0]):
        found = [finder.find(m[channel], d) for m, d in zip(maps, diameters)]
        curve = pr_curve([f.xy for f in found], [f.score for f in found], [it.truth_xy for it in val],
                         0.5 * float(np.mean(diameters)))
        best = max(best, float(curve.ap))
    return best


def _validate(module: nn.Module, val: list[LabeledImage], cfg: PickerConfig, device: torch.device) -> dict:
    quick = dataclasses.replace(cfg.predict, tta=1)  # per-epoch validation: speed over the last percent
    maps = [predict_maps(module, it.image, quick, device) for it in val]
    metrics = evaluate_maps([m[0] for m in maps], [it.labels for it in val])  # the segmentation channel
    if cfg.train.monitor == "ap":
        metrics["ap"] = picking_ap(maps, val, cfg.preprocess.target_diameter_px)
    return metrics


# -- checkpoints ---------------------------------------------------------------------------------------------------


def _fingerprint(train: list[LabeledImage], val: list[LabeledImage], cfg: PickerConfig) -> str:
    """Identifies a training run: the settings that shape it and the data."""
    tcfg = dataclasses.asdict(cfg.train)
    for volatile in ("device", "threads", "self_training"):  # self_training: later rounds, not this one
        tcfg.pop(volatile, None)
    shape = {"model": dataclasses.asdict(cfg.model), "train": tcfg, "crf": dataclasses.asdict(cfg.crf),
             "version": CHECKPOINT_VERSION}
    if cfg.labels.unpicked_fraction > 0:  # changes the loss, not the label arrays
        shape["unpicked_fraction"] = cfg.labels.unpicked_fraction
    h = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode())
    for group in (train, val):
        h.update(b"|")
        for it in group:
            for arr in (it.image, it.labels.weight, *it.labels.channels()):
                h.update(str(arr.shape).encode())
                h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()


def _state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the weights on the CPU (a state_dict alone holds references to the live tensors)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _load_checkpoint(path: Path, fingerprint: str, progress) -> dict | None:
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged file: start again rather than fail
        _say(progress, f"ignoring unreadable checkpoint {path} ({exc.__class__.__name__}); training from scratch")
        return None
    if not isinstance(ckpt, dict) or ckpt.get("fingerprint") != fingerprint:
        _say(progress, f"checkpoint {path} belongs to other settings or data; training from scratch")
        return None
    return ckpt


def _say(progress, message: str) -> None:
    if progress is not None:
        progress(ProgressEvent("train", message=message))


# -- history -------------------------------------------------------------------------------------------------------


def _write_history(history: list[dict], out_dir: Path) -> None:
    atomic_write_text(out_dir / "history.json", json.dumps(history, indent=1))
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(out_dir / "history.csv", buf.getvalue())


# -- training ------------------------------------------------------------------------------------------------------


@dataclass
class _Phase:
    name: str  # cnn | crf
    index: int
    epochs: int
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def _make_phase(name: str, index: int, module: nn.Module, cfg: PickerConfig, steps_per_epoch: int) -> _Phase:
    if name == "cnn":
        epochs = int(cfg.train.epochs)
        groups = [{"params": list(module.parameters()), "lr": float(cfg.train.lr)}]
    else:
        epochs = int(cfg.crf.finetune_epochs)
        groups = module.param_groups(cfg.crf.lr_cnn, cfg.crf.lr_crf)
    opt = torch.optim.Adam(groups, lr=groups[0]["lr"], weight_decay=float(cfg.train.weight_decay))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups],
                                                total_steps=max(1, epochs * steps_per_epoch))
    return _Phase(name, index, epochs, module, opt, sched)


def train_model(train: list[LabeledImage], val: list[LabeledImage], cfg: PickerConfig, out_dir: Path,
                progress: ProgressCallback | None = None, should_abort: Callable[[], bool] | None = None,
                resume: bool = True, initial_state: dict | None = None) -> TrainResult:
    """Train a network on ``train``, validate on ``val``; see the module docstring. ``initial_state``: weights to
    start from (fine-tuning) instead of the encoder's initial ones."""
    t_start = time.perf_counter()
    train, val = list(train), list(val)
    if not train:
        raise InputError("no training micrographs with picks; give picks on at least one micrograph")
    _check_items(train, "training")
    _check_items(val, "validation")
    tcfg = cfg.train
    if tcfg.monitor not in MONITORS:
        raise InputError(f"unknown train.monitor {tcfg.monitor!r}; use one of {', '.join(MONITORS)}")
    if tcfg.epochs < 1 or tcfg.batch_size < 1 or tcfg.patches_per_micrograph < 1 or tcfg.patch_size < 8:
        raise InputError("train.epochs, batch_size and patches_per_micrograph must be >= 1, patch_size >= 8")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(tcfg.device)
    threads = configure_threads(tcfg.threads) if device.type == "cpu" else None
    loss_fn = _combined_loss(cfg, unlabelled_prior(train, cfg.labels.unpicked_fraction))
    fingerprint = _fingerprint(train, val, cfg)

    torch.manual_seed(int(tcfg.seed))
    model = build_model(cfg.model, cfg.output_channels()).to(device)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    multiple = size_multiple(model)
    patch = int(np.ceil(tcfg.patch_size / multiple) * multiple)
    sampler = _PatchSampler(train, patch, bool(tcfg.augment), tcfg.jitter if tcfg.augment else 0.0,
                            tcfg.edge_augment, tcfg.scale_augment, tcfg.noise_augment)
    per_image = max(int(tcfg.patches_per_micrograph), -(-int(tcfg.min_patches_per_epoch) // len(train)))
    n_patches = len(train) * per_image
    steps = int(np.ceil(n_patches / tcfg.batch_size))
    phase_names = ["cnn"] + (["crf"] if cfg.crf.kind != "none" and cfg.crf.finetune_epochs > 0 else [])

    ckpt = _load_checkpoint(out_dir / "checkpoint.pt", fingerprint, progress) if resume else None
    history: list[dict] = list(ckpt["history"]) if ckpt is not None else []
    earlier = float(ckpt["seconds"]) if ckpt is not None else 0.0  # time spent before an interruption
    _say(progress, f"training {cfg.model.arch}/{cfg.model.encoder} ({count_parameters(model) / 1e6:.1f} M "
                   f"parameters) on {len(train)} micrograph(s), validating on {len(val)}; {n_patches} patches of "
                   f"{patch}² per epoch, {steps} step(s); device {device}"
                   + (f", {threads} thread(s)" if threads else "")
                   + (f"; resuming after {ckpt['phase']} epoch {ckpt['epoch']}" if ckpt else ""))

    module: nn.Module = model
    best_state, best_epoch, best_metric = None, 0, -np.inf
    for index, name in enumerate(phase_names):
        if name == "crf":
            from .crf import build_crf_segmenter

            if best_state is not None:
                module.load_state_dict(best_state)
            module = build_crf_segmenter(module, cfg.crf).to(device)
        phase = _make_phase(name, index, module, cfg, steps)
        start, bad = 1, 0
        best_state, best_epoch, best_metric = None, 0, -np.inf
        if ckpt is not None and phase_names.index(ckpt["phase"]) > index:
            continue  # finished earlier; its best weights are in the checkpoint of the later phase
        if ckpt is not None and ckpt["phase"] == name:
            module.load_state_dict(ckpt["model"])
            phase.optimizer.load_state_dict(ckpt["optimizer"])
            phase.scheduler.load_state_dict(ckpt["scheduler"])
            best_state, best_epoch, best_metric = ckpt["best_state"], ckpt["best_epoch"], ckpt["best_metric"]
            start, bad = int(ckpt["epoch"]) + 1, int(ckpt["bad_epochs"])
            if ckpt["finished"]:
                start = phase.epochs + 1
        elif name == "crf":
            metrics = _validate(module, val, cfg, device) if val else {}
            row = {"phase": name, "epoch": 0, **{f"val_{k}": v for k, v in metrics.items()}}
            history.append(row)
            best_state, best_metric = _state_copy(module), metrics.get(tcfg.monitor, -np.inf)
            _save({"phase": name, "epoch": 0, "metric": best_metric, "state": best_state}, out_dir / "best.pt")
        for epoch in range(start, phase.epochs + 1):
            t0 = time.perf_counter()
            row = _run_epoch(phase, epoch, sampler, per_image, loss_fn, cfg, device, should_abort)
            t1 = time.perf_counter()
            last = epoch == phase.epochs
            if val and (epoch % max(1, tcfg.val_every) == 0 or last):
                metrics = _validate(module, val, cfg, device)
                row.update({f"val_{k}": v for k, v in metrics.items()})
                score = metrics[tcfg.monitor]
            elif not val:
                score = -row["loss"]
            else:
                score = None
            row["train_seconds"] = t1 - t0
            row["val_seconds"] = time.perf_counter() - t1
            improved = score is not None and score > best_metric
            if improved:
                best_state, best_epoch, best_metric, bad = _state_copy(module), epoch, float(score), 0
                _save({"phase": name, "epoch": epoch, "metric": best_metric, "state": best_state},
                      out_dir / "best.pt")
            elif score is not None:
                bad += max(1, tcfg.val_every)
            row["best"] = improved
            history.append(row)
            stop = tcfg.early_stop_patience > 0 and bad >= tcfg.early_stop_patience
            _save({"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "phase": name, "epoch": epoch,
                   "finished": last or stop, "model": module.state_dict(), "optimizer": phase.optimizer.state_dict(),
                   "scheduler": phase.scheduler.state_dict(), "best_state": best_state, "best_epoch": best_epoch,
                   "best_metric": best_metric, "bad_epochs": bad, "history": history,
                   "seconds": earlier + time.perf_counter() - t_start},
                  out_dir / "checkpoint.pt")
            _write_history(history, out_dir)
            if progress is not None:
                shown = {k: row[k] for k in ("loss", f"val_{tcfg.monitor}") if k in row}
                progress(ProgressEvent("train" if name == "cnn" else "crf", epoch, phase.epochs,
                                       f"epoch {epoch}" + (" (best)" if improved else ""), shown))
            if stop:
                _say(progress, f"early stop after {name} epoch {epoch}: no better {tcfg.monitor} for "
                               f"{bad} epoch(s); best at epoch {best_epoch}")
                break
        if best_state is not None:
            module.load_state_dict(best_state)

    _write_history(history, out_dir)
    from .plots import plot_training_curve

    plot_training_curve(history, out_dir / "training_curve.png")
    module.eval()
    return TrainResult(module, history, int(best_epoch), float(best_metric),
                       earlier + time.perf_counter() - t_start, device, ckpt is not None)


def unlabelled_prior(items: list[LabeledImage], unpicked_fraction: float) -> float:
    """The share of the unlabelled (scored, label 0) pixels that belong to unpicked particles, when the picks leave
    out ``unpicked_fraction`` of the particles and those look like the picked ones (the ``nnpu`` loss's prior)."""
    if unpicked_fraction <= 0:
        return 0.0
    n_pos = sum(float(((it.labels.target > 0.5) & (it.labels.weight > 0)).sum()) for it in items)
    n_unl = sum(float(((it.labels.target <= 0.5) & (it.labels.weight > 0)).sum()) for it in items)
    hidden = n_pos * unpicked_fraction / (1.0 - unpicked_fraction)
    return float(min(0.5, hidden / max(n_unl, 1.0)))


def _combined_loss(cfg: PickerConfig, prior: float = 0.0):
    """``train.loss`` on the segmentation channel (``prior``: its nnpu term's class prior), plus
    ``labels.centre_weight`` times the weighted BCE of the centre channel against its Gaussian target when the
    network has one."""
    segmentation = build_loss(cfg.train.loss, prior)
    w = float(cfg.labels.centre_weight)
    if cfg.output_channels() == 1:
        return segmentation

    def loss(logits, target, weight):
        total = segmentation(logits[:, 0:1], target[:, 0:1], weight)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1:2], target[:, 1:2], reduction="none")
        return total + w * (bce * weight).sum() / weight.sum().clamp_min(1e-6)

    return loss


def _run_epoch(phase: _Phase, epoch: int, sampler: _PatchSampler, per_image: int, loss_fn, cfg: PickerConfig,
               device: torch.device, should_abort) -> dict:
    tcfg = cfg.train
    seed = [int(tcfg.seed), phase.index, epoch]
    rng = np.random.default_rng(seed)
    torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    patches = sampler.epoch(rng, per_image)
    module = phase.module
    module.train()
    channels_last = bool(tcfg.channels_last)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    total, count = 0.0, 0
    for i in range(0, len(patches), tcfg.batch_size):
        if should_abort is not None and should_abort():
            raise Aborted(f"training stopped on request during {phase.name} epoch {epoch}")
        batch = torch.from_numpy(patches[i:i + tcfg.batch_size]).to(device)
        x, weight, target = batch[:, 0:1], batch[:, 1:2], batch[:, 2:2 + cfg.output_channels()]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        phase.optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, bool(tcfg.bf16)):
            logits = module(x)
        loss = loss_fn(logits.float(), target, weight)
        loss.backward()
        phase.optimizer.step()
        phase.scheduler.step()
        total += float(loss.detach()) * len(batch)
        count += len(batch)
    return {"phase": phase.name, "epoch": epoch, "lr": float(phase.scheduler.get_last_lr()[0]),
            "loss": total / max(1, count)}


__all__ = ["LabeledImage", "TrainResult", "train_model", "resolve_device", "configure_threads", "evaluate_maps"]
