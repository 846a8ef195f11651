"""What the inputs must be before work starts, and what a user should hear about a curated set or a trained picker
that cannot be trusted: one line naming the file or option (:class:`InputError`, exit 2) or a warning."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .config import PickerConfig
from .edges import near_edge
from .errors import InputError
from .picking import micrograph_diameter
from .preprocess import check_particle_fits
from .progress import ProgressCallback, ProgressEvent, silent
from .types import Micrograph, Particles, micrographs_by_id


def check_inputs(micrographs: Sequence[Micrograph], particles: Particles | None,
                 model_dir: Path | None) -> dict[str, Micrograph]:
    """The micrographs by id, once there are some, every pick names one of them with finite coordinates, and there
    are picks to train on or a model to pick with."""
    if not micrographs:
        raise InputError("no micrographs given; nothing to pick")
    by_id = micrographs_by_id(micrographs)
    if particles is not None and len(particles):
        unknown = [m for m in particles.micrograph_ids() if m not in by_id]
        if unknown:
            raise InputError(
                f"picks refer to micrograph {unknown[0]!r}, which is not among the {len(by_id)} micrographs given "
                f"({len(unknown)} such micrograph(s)); check that coordinate files match micrograph names")
        bad = ~(np.isfinite(particles.x) & np.isfinite(particles.y))
        if bad.any():
            raise InputError(f"pick {int(np.argmax(bad))} on micrograph {particles.micrograph[bad][0]!r} has a "
                             f"non-finite coordinate")
    if model_dir is None and (particles is None or len(particles) == 0):
        raise InputError("no picks given to train on: give curated particle coordinates, or a trained model "
                         "directory to pick with")
    return by_id


def check_micrographs(micrographs: Sequence[Micrograph], cfg: PickerConfig,
                      progress: ProgressCallback | None = None, model_dir: Path | None = None) -> None:
    """Open every micrograph's header (no pixels read) and check that the particle fits in it, so that a corrupt or
    mismatched file fails the run in seconds rather than after training. ``model_dir``: the particle size comes
    from that model (named in the errors)."""
    from .io.mrc import read_info

    progress = progress or silent
    progress(ProgressEvent("check", message=f"checking {len(micrographs)} micrograph header(s)"))
    for mic in micrographs:
        info = read_info(mic.path)
        if cfg.particle.diameter_A is None and cfg.particle.diameter_px is None:
            continue  # the diameter comes from a model directory; checked when it is known
        # the header just read supplies a missing pixel size (no second open)
        try:
            diameter = micrograph_diameter(mic.with_(pixel_size=mic.pixel_size or info.pixel_size), cfg)
        except InputError:
            if model_dir is None:
                raise
            raise InputError(f"{mic.path}: the model {model_dir} knows its particle as {cfg.particle.diameter_A:g} Å, "
                             f"but this micrograph has no pixel size; give --pixel-size, or the diameter in pixels of "
                             f"these micrographs (--diameter NNpx)") from None
        check_particle_fits(mic.path, diameter, info.shape)


DUPLICATE_PICK = 0.1  # diameters: a training pick this near an earlier one on its micrograph is the same particle
OVERLAPPING_PICKS = 0.3  # diameters: curated picks a median nearer their neighbour than this mean a wrong diameter
MIN_PICKS_JUDGED = 20  # picks needed before their spacing, or a picker's validation F1, is judged
BINNED_REACH = 0.55  # picks on several micrographs none beyond this fraction of width and height: binned coordinates
CHANCE_MARGIN = 0.1  # a picker whose validation F1 beats chance by less than this gets a warning


def _repeats(xy: np.ndarray, radius: float) -> np.ndarray:
    """Which of these picks (one micrograph's) lie within ``radius`` px of an earlier one that is kept: what
    de-duplicating them in their own order removes."""
    from .centres.postprocess import kept_indices

    repeat = np.ones(len(xy), dtype=bool)
    repeat[kept_indices(xy, np.zeros(len(xy)), radius)] = False
    return repeat


def _spacing(xy: np.ndarray) -> np.ndarray:
    """Each pick's distance to its nearest other pick (px)."""
    from scipy.spatial import cKDTree

    return cKDTree(xy).query(xy, k=2)[0][:, 1] if len(xy) > 1 else np.zeros(0)


def check_training_picks(micrographs: Sequence[Micrograph], particles: Particles, cfg: PickerConfig,
                         progress: ProgressCallback | None = None) -> Particles:
    """The picks that lie on their micrograph, each particle once. Picks outside it are counted and left out with
    a warning; when most are outside (another binning, a y-flip, a wrong pixel size) or none is left, an
    :class:`InputError`. A pick within 0.1 diameters of an earlier one on its micrograph (a particle listed twice,
    symmetry-expanded particles) is left out with a warning; picks that lie a median under 0.3 diameters from their
    nearest neighbour (particles cannot overlap that much: the diameter is too large or in the wrong unit) are an
    :class:`InputError`; picks on several micrographs that all lie in their top-left quarter (coordinates of binned
    micrographs) get a warning."""
    from .io.mrc import read_info

    progress = progress or silent
    by_id = micrographs_by_id(micrographs)
    keep = np.ones(len(particles), dtype=bool)
    n_near_edge = 0
    worst = None  # (how far out, micrograph, x, y, nx, ny)
    n_repeats, repeated_on, spacing, inside_xy, diameters = 0, None, [], [], []
    reach = np.zeros(2)  # the farthest any pick lies along x and along y, as a fraction of its micrograph's size
    for mid in particles.micrograph_ids():
        mic = by_id[mid]
        ny, nx = mic.shape or read_info(mic.path).shape
        sel = np.flatnonzero(particles.micrograph == mid)
        x, y = particles.x[sel], particles.y[sel]
        inside = (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
        keep[sel] = inside
        if inside.any():
            reach = np.maximum(reach, [x[inside].max() / nx, y[inside].max() / ny])
        if (~inside).any():
            out = np.maximum.reduce([-x, x - (nx - 1), -y, y - (ny - 1)])
            k = int(np.argmax(out))
            if worst is None or out[k] > worst[0]:
                worst = (float(out[k]), mic.name, float(x[k]), float(y[k]), nx, ny)
        if cfg.particle.diameter_A or cfg.particle.diameter_px:
            diameter = micrograph_diameter(mic.with_(shape=(ny, nx)), cfg)
            check_particle_fits(mic.path, diameter, (ny, nx))  # before judging the picks by that diameter
            n_near_edge += int((inside & near_edge(x, y, (ny, nx), 0.5 * cfg.centres.box_fraction * diameter)).sum())
            xy = np.column_stack([x, y])[inside]
            repeat = _repeats(xy, DUPLICATE_PICK * diameter)
            spacing.append(_spacing(xy[~repeat]) / diameter)  # judged once each particle is there once
            inside_xy.append(xy)
            keep[sel[inside][repeat]] = False
            if repeat.any():
                n_repeats, repeated_on = n_repeats + int(repeat.sum()), repeated_on or mic.name
            diameters.append(diameter)
    n_out = int((~keep).sum()) - n_repeats
    if n_out:
        where = (f"e.g. ({worst[2]:.0f}, {worst[3]:.0f}) on {worst[1]}, which is {worst[4]}×{worst[5]} px")
        cause = ("coordinates in another binning, y measured from the other edge (--flip-y), or a wrong pixel size "
                 "in the particles' STAR")
        if n_out * 2 > len(particles):  # most (or all) of them
            raise InputError(f"{n_out} of {len(particles)} training picks lie outside their micrograph ({where}): "
                             f"likely {cause}; fix the coordinates before training")
        progress(ProgressEvent("warning", message=f"{n_out} of {len(particles)} training picks lie outside their "
                                                  f"micrograph ({where}) and are left out; check for {cause}"))
    if spacing and sum(map(len, spacing)) >= MIN_PICKS_JUDGED:
        median = float(np.median(np.concatenate(spacing)))
        if median < OVERLAPPING_PICKS:
            # what to tell: the spacing of the picks themselves (exact repeats once)
            d = float(np.median(diameters))
            given = float(np.median(np.concatenate([_spacing(xy[~_repeats(xy, 1.0)]) for xy in inside_xy])))
            raise InputError(f"the curated picks lie a median {given:.0f} px from their nearest neighbour, "
                             f"{given / d:.2f} of the particle diameter ({d:.0f} px): particles cannot overlap that "
                             f"much: the diameter given is too large or in the wrong unit (Å or px), or the picks "
                             f"list particles more than once; give the particle's own diameter")
    if n_repeats:
        progress(ProgressEvent("warning", message=f"{n_repeats} training pick(s) repeat another pick within "
                                                  f"{DUPLICATE_PICK:g} diameters of it on the same micrograph (e.g. "
                                                  f"on {repeated_on}: a particle listed twice, or symmetry-expanded "
                                                  f"particles); each particle is used once"))
    n_mics = len(particles.micrograph_ids())
    if n_mics > 1 and keep.sum() >= FEW_PICKS and (reach < BINNED_REACH).all():
        progress(ProgressEvent("warning", message=f"all {int(keep.sum())} training picks on {n_mics} micrographs "
                                                  f"lie in their top-left quarter (none beyond {reach[0]:.0%} of the "
                                                  f"width, {reach[1]:.0%} of the height): likely coordinates of "
                                                  f"micrographs binned by 2 or more; scale them to these "
                                                  f"micrographs' pixels"))
    if n_near_edge:
        progress(ProgressEvent("prepare", message=f"{n_near_edge} training pick(s) lie within half a box of the "
                                                  f"micrograph edge"))
    return particles.subset(keep) if not keep.all() else particles


FEW_PICKS = 50  # fewer curated picks than this get a warning


def training_set_warnings(n_picks: int, train: Sequence[str], val: Sequence[str]) -> list[str]:
    """What a user should hear about a curated set that trains a weak picker or validates it on its own data."""
    out = []
    if n_picks < FEW_PICKS:
        out.append(f"only {n_picks} curated picks: the picker learns what a particle is from these alone; a few "
                   f"hundred on several micrographs make a far better one")
    if set(train) & set(val):
        out.append("a validation micrograph is also trained on, so the validation figures are optimistic and the "
                   "threshold may be too strict; give picks on a micrograph that training does not use")
    if len(set(train) | set(val)) == 1:
        out.append("picks on one micrograph only: on the benchmarks a picker from one curated micrograph scores "
                   "0.02-0.09 lower F1 than one from six (four to train, two to validate); pick a few more "
                   "micrographs if you can")
    return out


def chance_f1(picks: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]], truth: Sequence[np.ndarray],
              radius: float) -> float:
    """The F1 of picks unrelated to the particles at this density: the picks (x, y) of each map of shape (ny, nx)
    turned 180° about its centre, against ``truth``. On crowded micrographs picks anywhere match some particle."""
    from .metrics import picking_metrics

    turned = [np.array([nx - 1, ny - 1], float) - np.asarray(xy, float).reshape(-1, 2)
              for xy, (ny, nx) in zip(picks, shapes)]
    return picking_metrics(turned, None, truth, radius).f1


def validation_warnings(vm, chance: float) -> list[str]:
    """What a user should hear about a trained picker that does no better on the validation micrographs than
    chance: ``vm`` its :class:`~crisp_ext.metrics.PickingMetrics` at the chosen threshold, ``chance`` the F1 of the
    same picks turned 180° (on crowded micrographs picks anywhere match some particle). Such a picker has not learnt
    the curated particles: picks y-flipped or in another binning, or a wrong diameter."""
    if vm.n_true < MIN_PICKS_JUDGED or vm.f1 >= chance + CHANCE_MARGIN:
        return []
    return [f"the trained picker does no better on the validation micrographs than chance (F1 {vm.f1:.2f}; its "
            f"picks turned 180° score {chance:.2f}): it has not learnt the curated particles; check the coordinates "
            f"(y measured from the other edge, another binning), the particle diameter and its unit, and the "
            f"validation pictures before using its picks"]
