"""The one pipeline behind every entry point (RELION External job, cryoSPARC job, standalone command).

    run(micrographs, config, particles=..., work_dir=...) -> PipelineResult

Contract (adapters rely on it):
- ``micrographs``: every micrograph to pick (core :class:`~crisp_ext.types.Micrograph`).
- ``particles``: the curated picks used for training (original pixels, see :mod:`crisp_ext.types`); may be None
  when ``model_dir`` points at an existing model directory.
- ``model_dir``: an existing model directory to load instead of training; when None, the model is trained and
  saved under ``work_dir / "model"``. A model directory is self-describing (weights, config, scale, finder choice).
- ``reference``: a 3D mask (+ pixel size) for labels by reprojection when the particles carry poses.
- ``train_ids`` / ``val_ids``: the micrographs to train and validate on (default: chosen at random, seeded, among
  those with picks, up to ``train.n_train`` + ``train.n_val``).
- ``on_ready(picker)``: called once the picker is trained or loaded (its ``threshold`` is then known).
- ``skip(micrograph) -> bool``: micrographs already done (resume / RELION continue); they are not picked again.
- ``on_picked(micrograph, picks)``: called as soon as one micrograph is picked, so the caller can write its
  output file at once (atomic writes, resumable jobs).
- ``map_path(micrograph) -> Path``: where to write the probability map (MRC, working scale) when
  ``predict.save_maps`` is on; default ``work_dir/maps/<name>_probability.mrc``.
- ``should_abort() -> bool``: polled between micrographs and epochs; raises :class:`Aborted` when true.
- ``progress``: one callback (see :mod:`crisp_ext.progress`).
The returned picks carry scores (the finder's score; higher is better) in original pixels of each micrograph.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import PickerConfig
from .edges import choose_edge_rule, learn_edge_margin
from .errors import Aborted, InputError
from .footprints import FootprintMaker, ReferenceMask, plot_footprints, resolve_label_kind
from .input_checks import (chance_f1, check_inputs, check_micrographs, check_training_picks, training_set_warnings,
                           validation_warnings)
from .picking import (REFINE_CHOICES, MicrographLoader, centre_options,  # noqa: F401 (re-exported)
                      micrograph_diameter, micrograph_pixel_size, pick_stream)
from .preprocess import WorkingImage
from .progress import ProgressCallback, ProgressEvent, silent
from .types import Micrograph, Particles, micrographs_by_id

__all__ = ["run", "prepare_picker", "pick", "Picker", "PipelineResult", "ReferenceMask", "Aborted", "InputError",
           "choose_split", "MicrographLoader"]


@dataclass
class PipelineResult:
    picks: Particles  # all picks of this run (skipped micrographs not included), with scores
    model_dir: Path
    finder: str  # the centre finder used
    finder_params: dict
    threshold: float  # score threshold applied (finder scores live in [0, 1])
    counts: dict[str, int] = field(default_factory=dict)  # micrograph id -> number of picks
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    validation: dict = field(default_factory=dict)  # metrics on validation micrographs (when trained)
    config: PickerConfig | None = None  # the picker's config (a loaded model's scale and diameter, unless given)
    plots: list[Path] = field(default_factory=list)  # PNGs written by this run
    skipped: list[str] = field(default_factory=list)  # micrograph ids skipped (already done)


def choose_split(ids_with_picks: Sequence[str], n_train: int, n_val: int, seed: int,
                 train_ids: Sequence[str] | None = None, val_ids: Sequence[str] | None = None
                 ) -> tuple[list[str], list[str]]:
    """Training and validation micrographs among those with picks (explicit lists win).

    With one micrograph it serves both roles; otherwise at least one goes to validation and about a quarter at most.
    """
    ids = list(ids_with_picks)
    if train_ids is not None or val_ids is not None:
        missing = [m for m in list(train_ids or []) + list(val_ids or []) if m not in ids]
        if missing:
            raise InputError(f"micrograph {missing[0]!r} was chosen for training/validation but has no picks")
        train = list(train_ids) if train_ids is not None else [m for m in ids if m not in set(val_ids or [])]
        val = list(val_ids) if val_ids is not None else []
        if not val:
            rest = [m for m in ids if m not in set(train)]
            val = rest[: max(1, n_val)] if rest else train[:1]
        return train[: max(1, len(train))], val
    if len(ids) == 1:
        return ids, ids
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_v = int(min(n_val, max(1, len(ids) // 4)))
    n_t = int(min(n_train, len(ids) - n_v))
    return order[n_v:n_v + n_t], order[:n_v]


# -- training -------------------------------------------------------------------------------------------------------

def _prepare(mic: Micrograph, parts: Particles, cfg: PickerConfig, loader: MicrographLoader,
             footprints: FootprintMaker | None):
    from .labels import make_labels
    from .train import LabeledImage

    wi = loader(mic)
    centres = wi.scale.to_working(parts.xy)
    diameter_w = wi.scale.length_to_working(micrograph_diameter(mic, cfg))
    shapes = None
    if cfg.labels.kind == "reprojection":
        ps = wi.pixel_size or micrograph_pixel_size(mic, cfg)
        shapes = footprints(parts.angles, centres, ps / wi.scale.factor if ps else None)
    labels = make_labels(wi.image.shape, centres, diameter_w, cfg.labels, footprints=shapes)
    return LabeledImage(image=wi.image, labels=labels, name=mic.name, truth_xy=centres, diameter_px=diameter_w), wi


def _train(micrographs, by_id, particles: Particles, cfg: PickerConfig, work_dir: Path, reference, train_ids,
           val_ids, progress, should_abort, timings):
    from .model_dir import save_model_dir
    from .train import train_model

    ids_with_picks = [m for m in particles.micrograph_ids() if m in by_id]
    train, val = choose_split(ids_with_picks, cfg.train.n_train, cfg.train.n_val, cfg.train.seed, train_ids, val_ids)
    progress(ProgressEvent("prepare", message=f"training on {len(train)} micrograph(s), validating on {len(val)}; "
                                              f"{len(particles)} picks on {len(ids_with_picks)} micrograph(s)"))
    for line in training_set_warnings(len(particles), train, val):
        progress(ProgressEvent("warning", message=line))
    kind, why = resolve_label_kind(cfg.labels.kind, reference, particles.has_poses)
    cfg = cfg.updated({"labels.kind": kind})
    progress(ProgressEvent("prepare", message=f"labels: {why}"))
    maker = FootprintMaker(reference, cfg.labels, device=None) if kind == "reprojection" else None
    loader = MicrographLoader(cfg)
    t0 = time.perf_counter()
    groups = particles.by_micrograph()
    prepared: dict[str, tuple] = {}
    for i, mid in enumerate(dict.fromkeys(train + val)):
        prepared[mid] = _prepare(by_id[mid], groups[mid], cfg, loader, maker)
        progress(ProgressEvent("prepare", i + 1, len(set(train + val)), f"labels for {by_id[mid].name}"))
        if should_abort():
            raise Aborted("aborted while preparing training data")
    timings["prepare"] = time.perf_counter() - t0
    label_info = {"kind": kind, "why": why, **(maker.summary() if maker else {})}
    if maker is not None:  # a picture for the user to check the footprints against their particles
        item, wi = prepared[train[0]]
        plot = plot_footprints(item.image, item.labels.target, item.truth_xy,
                               wi.scale.length_to_working(micrograph_diameter(by_id[train[0]], cfg)),
                               work_dir / "plots" / "label_footprints.png",
                               title=f"{item.name}: labels by reprojection (orange), particle diameter (dashed)")
        if plot is not None:
            label_info["plot"] = str(plot)

    t0 = time.perf_counter()
    model_dir = work_dir / "model"
    result = train_model([prepared[m][0] for m in train], [prepared[m][0] for m in val], cfg, model_dir / "training",
                         progress=progress, should_abort=should_abort)
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    diam_w = {m: prepared[m][1].scale.length_to_working(micrograph_diameter(by_id[m], cfg)) for m in prepared}
    base_cfg = cfg
    cfg, selection, threshold, vm, val_picks, chance = _select(result.model, cfg, prepared, diam_w, val, progress)
    timings["select"] = time.perf_counter() - t0
    for round_ in range(1, cfg.train.self_training + 1):
        t0 = time.perf_counter()
        result = _self_train(round_, result, base_cfg, cfg, selection, threshold, val_picks, micrographs, by_id,
                             groups, prepared, diam_w, train, val, loader, model_dir, progress, should_abort)
        timings["train"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        cfg, selection, threshold, vm, val_picks, chance = _select(result.model, base_cfg, prepared, diam_w, val,
                                                                   progress)
        timings["select"] += time.perf_counter() - t0
    if vm.n_true and vm.f1 == 0:
        raise InputError(f"the trained picker finds none of the {vm.n_true} picks on the validation micrographs "
                         f"({', '.join(by_id[m].name for m in val)}): validation F1 is 0, so no model is saved; check "
                         f"the particle diameter and its unit, the coordinates, and train longer (train.epochs)")
    for line in validation_warnings(vm, chance):
        progress(ProgressEvent("warning", message=line))
    validation = {"micrographs": [by_id[m].name for m in val], "picking": vm.as_dict(), "chance_f1": chance,
                  "best_epoch": result.best_epoch, "best_metric": result.best_metric,
                  "train_micrographs": [by_id[m].name for m in train],
                  "pictures": [str(p) for p in _validation_pictures(work_dir, [by_id[m] for m in val], prepared,
                                                                    val_picks, diam_w, cfg)]}
    diameters_px = [micrograph_diameter(by_id[m], cfg) for m in train]
    pixel_sizes = [prepared[m][1].pixel_size for m in train if prepared[m][1].pixel_size]
    pixel_size = float(np.median(pixel_sizes)) if pixel_sizes else None
    info = {
        "diameter_px": float(np.median(diameters_px)),
        # the physical size whenever a pixel size is known, so that picking at another pixel size rescales
        "diameter_A": cfg.particle.diameter_A or (float(np.median(diameters_px)) * pixel_size if pixel_size else None),
        "pixel_size": pixel_size,
        "working_diameter_px": cfg.preprocess.target_diameter_px,
        "labels": cfg.labels.kind,
        "labels_detail": label_info,
        "crf": cfg.crf.kind,
        "selection": selection.to_dict(),
        "threshold": float(threshold),
        "validation": validation,
    }
    save_model_dir(model_dir, result.model, cfg, info)
    return result.model, cfg, info, model_dir, validation


def _validation_pictures(work_dir: Path, val: Sequence[Micrograph], prepared: dict, val_picks, diam_w: dict,
                         cfg: PickerConfig) -> list[Path]:
    """``plots/validation_<name>.png``: the picks on each validation micrograph against the user's picks there,
    matched (green), not among the user's picks (red: particles the curation left out, or false picks) and the
    user's picks missed (yellow); in working pixels."""
    from .evaluation import matches_picture

    paths = []
    for mic, cs in zip(val, val_picks):
        item = prepared[mic.id][0]
        paths.append(matches_picture(item.image, cs.xy, item.truth_xy, diam_w[mic.id], cfg.centres.match_radius,
                                     work_dir / "plots" / f"validation_{mic.name}.png",
                                     f"{mic.name} (validation): {len(cs.xy)} picks, {len(item.truth_xy)} of yours"))
    return paths


def _resolve_edge(cfg: PickerConfig, prepared: dict, diam_w: dict, progress) -> PickerConfig:
    """``centres.edge`` and ``centres.edge_margin`` chosen from the curated picks where they are ``auto``."""
    items, diameters = [prepared[m][0] for m in prepared], [diam_w[m] for m in prepared]
    if cfg.centres.edge == "auto":
        edge, why = choose_edge_rule(items, diameters, cfg.centres.box_fraction)
        cfg = cfg.updated({"centres.edge": edge})
        progress(ProgressEvent("select", message=why))
    if cfg.centres.edge_margin == "auto":
        margin, why = 0.0, "edge margin: none (edge rule keep)"
        if cfg.centres.edge == "drop":
            margin, why = learn_edge_margin(items, diameters, 0.5 * cfg.centres.box_fraction)
        cfg = cfg.updated({"centres.edge_margin": margin})
        progress(ProgressEvent("select", message=why))
    return cfg


def _select(model, cfg: PickerConfig, prepared: dict, diam_w: dict, val: list[str], progress):
    """The map, centre finder, its settings and the threshold, chosen on the validation micrographs' predicted
    maps; returns the config with ``centres.map``, ``centres.edge``, ``centres.edge_margin`` and ``centres.refine``
    resolved, the selection, the threshold, the validation metrics at it and the validation picks (a ``CentreSet``
    per micrograph)."""
    from .centres.postprocess import pick_centres
    from .centres.select import select_finder
    from .metrics import picking_metrics
    from .predict import predict_maps

    progress(ProgressEvent("select", message="choosing the centre finder on the validation micrographs"))
    val_channels = [predict_maps(model, prepared[m][0].image, cfg.predict) for m in val]
    val_truth = [prepared[m][0].truth_xy for m in val]
    diameter_w = float(np.median([diam_w[m] for m in val]))
    cfg = _resolve_edge(cfg, prepared, diam_w, progress)
    finders = ("nms", "trackpy", "morphology") if cfg.centres.finder == "auto" else (cfg.centres.finder,)
    names = ["segmentation", "centre"][: cfg.output_channels()]
    tried = names if cfg.centres.map == "auto" else [cfg.centres.map]
    widths = REFINE_CHOICES if cfg.centres.refine == "auto" else (float(cfg.centres.refine),)
    selection, chosen, width = None, None, None
    for name in tried:  # the finder, its settings and threshold on each candidate map; the best map wins
        for w in widths:  # ... and the refinement width (on one map, the first width wins ties)
            sel = select_finder([c[names.index(name)] for c in val_channels], val_truth, diameter_w,
                                finders=finders, match_radius_px=cfg.centres.match_radius * diameter_w,
                                objective=cfg.centres.threshold_objective, params=cfg.centres.params or None,
                                **centre_options(cfg.updated({"centres.refine": w}), diameter_w))
            if len(tried) > 1 or len(widths) > 1:
                progress(ProgressEvent("select", message=f"{name} map, refinement {w:g}: {sel.finder}, validation "
                                                         f"score {sel.best.score:.3f}"))
            margin = cfg.centres.map_margin if name == "centre" and chosen == "segmentation" else 0.0
            if selection is None or sel.best.score > selection.best.score + margin:
                selection, chosen, width = sel, name, w
    cfg = cfg.updated({"centres.map": chosen, "centres.refine": width})
    options = centre_options(cfg, diameter_w)
    threshold = cfg.centres.threshold if cfg.centres.threshold is not None else selection.threshold
    picks = [pick_centres(c[names.index(chosen)], diameter_w, selection.finder, selection.params, threshold,
                          **options) for c in val_channels]
    radius = cfg.centres.match_radius * diameter_w
    vm = picking_metrics([cs.xy for cs in picks], [cs.score for cs in picks], val_truth, radius)
    chance = chance_f1([cs.xy for cs in picks], [c.shape[-2:] for c in val_channels], val_truth, radius)
    progress(ProgressEvent("select", message=f"{chosen} map, finder {selection.finder} {selection.params}, threshold "
                                             f"{threshold:.3g}: validation precision {vm.precision:.3f} recall "
                                             f"{vm.recall:.3f} F1 {vm.f1:.3f} (by chance {chance:.3f})"))
    return cfg, selection, float(threshold), vm, picks, chance


def _self_train(round_: int, result, base_cfg: PickerConfig, cfg: PickerConfig, selection, threshold: float,
                val_picks, micrographs, by_id, groups, prepared: dict, diam_w: dict, train: list[str], val: list[str],
                loader, model_dir: Path, progress, should_abort):
    """One round of self-training (see :mod:`crisp_ext.pseudo_labels`): the picker's confident picks become extra
    positives on the training micrographs and on unpicked micrographs, and the network is fine-tuned from its
    current weights. The validation micrographs keep the user's picks only."""
    from .pseudo_labels import confident_threshold, pseudo_labelled, unpicked_micrographs
    from .train import LabeledImage, train_model

    diameter_w = float(np.median([diam_w[m] for m in val]))
    high = confident_threshold(val_picks, [prepared[m][0].truth_xy for m in val],
                               cfg.centres.match_radius * diameter_w, threshold)
    if high is None:
        progress(ProgressEvent("train", message=f"self-training round {round_} skipped: none of the picker's "
                                                f"validation picks matches a pick of the user's"))
        return result
    extra_ids = unpicked_micrographs([m.id for m in micrographs], set(groups), len(train), cfg.train.seed + round_)
    items, added = [], 0
    for mid in list(train) + extra_ids:
        if mid in prepared:
            item, wi = prepared[mid]
        else:
            wi = loader(by_id[mid])
            diam_w[mid] = wi.scale.length_to_working(micrograph_diameter(by_id[mid], base_cfg))
            item = LabeledImage(image=wi.image, labels=None, name=by_id[mid].name)
        labelled, n_new = pseudo_labelled(result.model, item, cfg, base_cfg.labels, diam_w[mid], selection,
                                          threshold, high)
        items.append(labelled)
        added += n_new
        if should_abort():
            raise Aborted("aborted while self-training")
    epochs = max(1, base_cfg.train.epochs // 3)
    progress(ProgressEvent("train", message=f"self-training round {round_}: {added} confident picks (score >= "
                                            f"{high:.3g}) added on {len(train)} training and {len(extra_ids)} "
                                            f"unpicked micrograph(s); fine-tuning {epochs} epochs"))
    ft = base_cfg.updated({"train.epochs": epochs, "train.lr": base_cfg.train.lr * 0.3,
                           "train.early_stop_patience": 0})
    return train_model(items, [prepared[m][0] for m in val], ft, model_dir / f"training_self{round_}",
                       progress=progress, should_abort=should_abort, initial_state=result.model.state_dict())


# -- picking --------------------------------------------------------------------------------------------------------

@dataclass
class Picker:
    """A trained (or loaded) picker, ready to pick: the model, its config, and the centre finder choice."""

    model: object  # torch.nn.Module in eval mode
    config: PickerConfig
    model_dir: Path
    finder: str
    params: dict
    threshold: float
    info: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    plots: list = field(default_factory=list)  # PNGs written while training (label footprints, validation)


def prepare_picker(
    micrographs: Sequence[Micrograph],
    config: PickerConfig,
    *,
    work_dir: Path,
    particles: Particles | None = None,
    model_dir: Path | None = None,
    reference: ReferenceMask | None = None,
    train_ids: Sequence[str] | None = None,
    val_ids: Sequence[str] | None = None,
    should_abort: Callable[[], bool] | None = None,
    progress: ProgressCallback | None = None,
) -> Picker:
    """Train a picker on ``particles`` (saved to ``work_dir/model``), or load ``model_dir``."""
    from .model_dir import load_model_dir

    progress = progress or silent
    should_abort = should_abort or (lambda: False)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    micrographs = list(micrographs)
    by_id = check_inputs(micrographs, particles, model_dir)
    timings: dict[str, float] = {}
    validation: dict = {}
    trained = model_dir is None
    if model_dir is not None:
        from .train import configure_threads, resolve_device

        configure_threads(config.train.threads)
        loaded = load_model_dir(model_dir, device=resolve_device(config.train.device))
        model, info = loaded.model, loaded.info
        cfg = _picking_config(loaded.config, config, info)
        model_dir = Path(model_dir)
        progress(ProgressEvent("prepare", message=f"loaded model {model_dir} ({cfg.model.arch} / "
                                                  f"{cfg.model.encoder})"))
    else:
        particles = check_training_picks(micrographs, particles, config, progress)
        model, cfg, info, model_dir, validation = _train(micrographs, by_id, particles, config, work_dir, reference,
                                                         train_ids, val_ids, progress, should_abort, timings)
    selection = info.get("selection", {})
    finder = cfg.centres.finder if cfg.centres.finder != "auto" else selection.get("finder", "nms")
    params = dict(cfg.centres.params) if cfg.centres.params else dict(selection.get("params", {}))
    threshold = float(cfg.centres.threshold if cfg.centres.threshold is not None else info.get("threshold", 0.5))
    plots = []  # a loaded model's pictures are elsewhere
    if trained:
        plot = info.get("labels_detail", {}).get("plot")
        plots = ([Path(plot)] if plot else []) + [Path(p) for p in validation.get("pictures", [])]
    return Picker(model=model, config=cfg, model_dir=Path(model_dir), finder=finder, params=params,
                  threshold=threshold, info=info, validation=validation or info.get("validation", {}),
                  timings=timings, plots=plots)


def pick(
    picker: Picker,
    micrographs: Sequence[Micrograph],
    *,
    work_dir: Path,
    skip: Callable[[Micrograph], bool] | None = None,
    on_picked: Callable[[Micrograph, Particles], None] | None = None,
    map_path: Callable[[Micrograph], Path] | None = None,
    should_abort: Callable[[], bool] | None = None,
    progress: ProgressCallback | None = None,
    placement=None,
) -> PipelineResult:
    """Pick every micrograph not skipped with a prepared picker: in this process, or on Dask workers
    (``placement``, see :mod:`crisp_ext.distributed`)."""
    from .train import configure_threads

    progress = progress or silent
    should_abort = should_abort or (lambda: False)
    work_dir = Path(work_dir)
    cfg = picker.config
    configure_threads(cfg.train.threads)
    micrographs = list(micrographs)
    micrographs_by_id(micrographs)
    timings = dict(picker.timings)
    todo = [m for m in micrographs if not (skip and skip(m))]
    skipped = [m.id for m in micrographs if skip and skip(m)]
    if skipped:
        progress(ProgressEvent("pick", message=f"{len(skipped)} micrograph(s) already done, skipped"))
    t0 = time.perf_counter()
    by_mic: dict[str, Particles] = {}
    counts: dict[str, int] = {}
    plots: list[Path] = list(picker.plots)
    # the first three micrographs, drawn once picking is over: drawing (and, for a Dask worker's micrograph,
    # reading it again here) in the loop held up one process's network, and took a core from busy Dask workers
    overlays: list[tuple[Micrograph, WorkingImage | None, Particles]] = []

    def map_file(mic: Micrograph) -> Path:
        return Path(map_path(mic)) if map_path else work_dir / "maps" / f"{mic.name}_probability.mrc"

    arrivals: list[float] = []
    spans: list[tuple[str, int, float, float]] = []  # Dask, per chunk: worker, micrographs, first and last picked

    def done(i: int, mic: Micrograph, picks: Particles, wi: WorkingImage | None, where: str = "") -> None:
        arrivals.append(time.perf_counter())
        if len(overlays) < 3:
            overlays.append((mic, wi, picks))
        if on_picked:
            on_picked(mic, picks)
        by_mic[mic.id] = picks
        counts[mic.id] = len(picks)
        progress(ProgressEvent("pick", i + 1, len(todo), f"{mic.name}: {len(picks)} picks{where}"))
        if should_abort():
            raise Aborted(f"aborted after {i + 1} of {len(todo)} micrographs")

    if placement is not None and todo:
        from .distributed import pick_distributed

        stream = pick_distributed(picker, todo, placement, map_path=map_file, should_abort=should_abort,
                                  say=lambda text: progress(ProgressEvent("pick", message=text)))
        for batch, span in stream:
            spans.append((batch[0][3] if batch else "", len(batch), *span))
            for mic, xy, score, worker in batch:
                done(len(arrivals), mic, Particles.for_one(mic.id, xy, score), None, f" (worker {worker})")
    else:
        # the next micrographs read ahead, one micrograph's centres found while the network predicts the next
        for k, (mic, picks, wi, _) in enumerate(pick_stream(picker.model, todo, cfg, picker.finder, picker.params,
                                                            picker.threshold, map_file=map_file)):
            done(k, mic, picks, wi)
    timings["pick"] = time.perf_counter() - t0
    timings.update(steady_state(arrivals, spans))
    t1, loader = time.perf_counter(), MicrographLoader(cfg)
    plots += [_overlay(work_dir, mic, wi or loader(mic), picks, micrograph_diameter(mic, cfg))
              for mic, wi, picks in overlays]
    timings["pictures"] = time.perf_counter() - t1
    # in the micrographs' order, whichever worker finished first
    done_picks = [by_mic[m.id] for m in todo if m.id in by_mic]
    picks = Particles.concat(done_picks) if done_picks else Particles.empty(with_score=True)
    if len(picks):
        plots.append(_score_histogram(work_dir, picks.score, picker.threshold))
    progress(ProgressEvent("done", message=f"{len(picks)} particles on {len(counts)} micrograph(s)"))
    return PipelineResult(picks=picks, model_dir=picker.model_dir, finder=picker.finder,
                          finder_params=picker.params, threshold=picker.threshold, counts=counts, timings=timings,
                          validation=picker.validation, config=cfg, plots=plots, skipped=skipped)


def run(
    micrographs: Sequence[Micrograph],
    config: PickerConfig,
    *,
    work_dir: Path,
    particles: Particles | None = None,
    model_dir: Path | None = None,
    reference: ReferenceMask | None = None,
    train_ids: Sequence[str] | None = None,
    val_ids: Sequence[str] | None = None,
    skip: Callable[[Micrograph], bool] | None = None,
    on_ready: Callable[[Picker], None] | None = None,
    on_picked: Callable[[Micrograph, Particles], None] | None = None,
    map_path: Callable[[Micrograph], Path] | None = None,
    should_abort: Callable[[], bool] | None = None,
    progress: ProgressCallback | None = None,
    placement=None,
) -> PipelineResult:
    """Check the headers of the micrographs to pick (:func:`check_micrographs`), train (or load) a picker and pick
    every micrograph: :func:`prepare_picker` then :func:`pick`.
    ``on_ready(picker)`` is called in between (e.g. to learn the threshold for figure-of-merit conversion)."""
    t0 = time.perf_counter()
    check_micrographs([m for m in micrographs if not (skip and skip(m))], config, progress)
    picker = prepare_picker(micrographs, config, work_dir=work_dir, particles=particles, model_dir=model_dir,
                            reference=reference, train_ids=train_ids, val_ids=val_ids, should_abort=should_abort,
                            progress=progress)
    if model_dir is not None:  # the particle size is known only now: check it against what is to be picked
        check_micrographs([m for m in micrographs if not (skip and skip(m))], picker.config, silent, model_dir)
    if on_ready:
        on_ready(picker)
    result = pick(picker, micrographs, work_dir=work_dir, skip=skip, on_picked=on_picked, map_path=map_path,
                  should_abort=should_abort, progress=progress, placement=placement)
    result.timings["total"] = time.perf_counter() - t0
    return result


def steady_state(arrivals: Sequence[float], spans: Sequence[tuple[str, int, float, float]]) -> dict[str, float]:
    """Seconds per micrograph once picking runs, start-up (a cluster, model loading, the first micrograph) left out.

    One process: from the first micrograph picked to the last, as they arrived (``arrivals``). Dask workers, from
    each chunk's ``(worker, micrographs, first picked, last picked)``: ``pick_steady_s_per_mic`` from the workers'
    rates added up, each from the first micrograph it picked to its last (how fast the workers pick together once
    all are up, as independent processes would be timed), and ``pick_span_s_per_mic`` from the first micrograph
    any worker picked to the last (which also counts workers starting at different times and the last chunks'
    tail)."""
    if len(arrivals) < 2:
        return {}
    if not spans:
        return {"pick_steady_s_per_mic": (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)}
    span = (max(e for *_, e in spans) - min(b for *_, b, _ in spans)) / (len(arrivals) - 1)
    rate = 0.0
    for worker in {w for w, *_ in spans}:
        mine = [s for s in spans if s[0] == worker]
        n, seconds = sum(s[1] for s in mine), max(s[3] for s in mine) - min(s[2] for s in mine)
        if n > 1 and seconds > 0:
            rate += (n - 1) / seconds
    return {"pick_steady_s_per_mic": 1.0 / rate if rate else span, "pick_span_s_per_mic": span}


def _picking_config(saved: PickerConfig, given: PickerConfig, info: dict) -> PickerConfig:
    """The config to pick with a loaded model: the model's scale, labels, architecture and CRF; the caller's
    prediction settings, centre-finding overrides and particle size (when given)."""
    cfg = PickerConfig.from_dict(saved.to_dict())
    cfg.predict = given.predict
    cfg.centres = dataclasses.replace(given.centres) if (given.centres.finder != "auto" or given.centres.params
                                                         or given.centres.threshold is not None) else cfg.centres
    # the map and edge rule chosen at training stay unless given (models from before the edge rule: drop)
    cfg.centres.map = given.centres.map if given.centres.map != "auto" else saved.centres.map
    cfg.centres.edge = given.centres.edge if given.centres.edge != "auto" else saved.centres.edge
    if cfg.centres.edge == "auto":
        cfg.centres.edge = "drop"
    # models from before the learned margin: none
    cfg.centres.edge_margin = (given.centres.edge_margin if given.centres.edge_margin != "auto"
                               else saved.centres.edge_margin)
    cfg.centres.refine = given.centres.refine if given.centres.refine != "auto" else saved.centres.refine
    cfg.centres.box_fraction = given.centres.box_fraction
    cfg.train.device, cfg.train.threads = given.train.device, given.train.threads
    if given.particle.diameter_A or given.particle.diameter_px:
        cfg.particle = given.particle
    elif info.get("diameter_A"):
        # the physical size: each micrograph's diameter in pixels follows from its own pixel size
        cfg.particle.diameter_A, cfg.particle.diameter_px = float(info["diameter_A"]), None
    elif not (cfg.particle.diameter_A or cfg.particle.diameter_px):
        cfg.particle.diameter_px = info.get("diameter_px")
    if given.preprocess.pixel_size:
        cfg.preprocess.pixel_size = given.preprocess.pixel_size
    return cfg


def _overlay(work_dir: Path, mic: Micrograph, wi: WorkingImage, picks: Particles, diameter_px: float) -> Path:
    from .plots import plot_overlay

    path = work_dir / "plots" / f"picks_{mic.name}.png"
    plot_overlay(wi.image, wi.scale.to_working(picks.xy), path, diameter_px=wi.scale.length_to_working(diameter_px),
                 title=f"{mic.name}: {len(picks)} picks")
    return path


def _score_histogram(work_dir: Path, scores: np.ndarray, threshold: float) -> Path:
    from .plots import plot_histogram

    path = work_dir / "plots" / "score_histogram.png"
    plot_histogram(scores, path, title="pick scores", xlabel="score", threshold=threshold)
    return path


def summary_dict(result: PipelineResult, micrographs: Sequence[Micrograph]) -> dict:
    """A JSON-able summary of a run (counts per micrograph, timings, finder choice)."""
    names = {m.id: m.name for m in micrographs}
    return {
        "particles": int(len(result.picks)),
        "micrographs_picked": len(result.counts),
        "micrographs_skipped": len(result.skipped),
        "counts": {names.get(k, k): v for k, v in result.counts.items()},
        "finder": result.finder,
        "finder_params": result.finder_params,
        "threshold": result.threshold,
        "model_dir": str(result.model_dir),
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "validation": json.loads(json.dumps(result.validation, default=float)),
    }
