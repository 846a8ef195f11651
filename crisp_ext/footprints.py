"""Per-particle label footprints from a 3D mask (or map) at each particle's refined pose.

    reference = read_reference("mask.mrc")                       # or ReferenceMask(volume, pixel_size)
    maker = FootprintMaker(reference, cfg.labels)
    footprints = maker(parts.angles, centres_working_px, working_pixel_size)   # (N, h, w) bool
    make_labels(shape, centres_working_px, diameter, cfg.labels, footprints=footprints)

A map is turned into a mask once (:func:`crisp_ext.reprojection.mask_from_map`). A mask much finer than the working
scale is block-averaged first (odd factors, centre voxel kept), then one
:class:`~crisp_ext.reprojection.Projector` per working pixel size projects the particles of a micrograph in batches;
each projection is thresholded (``labels.threshold``) into a binary footprint whose centre pixel lands, once
pasted at the rounded centre, on the particle's exact sub-pixel centre. Centres already include the particles'
origin offsets (see :class:`crisp_ext.types.Particles`), so projections are otherwise centred.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import LabelConfig
from .errors import InputError

LABEL_KINDS = ("auto", "disk", "reprojection")


@dataclass(frozen=True)
class ReferenceMask:
    """A 3D mask (or a map to be thresholded) for labels by reprojection; ``volume`` is (z, y, x), its centre at
    ``shape // 2`` (RELION's convention), ``pixel_size`` in Å/px; ``source`` names it in logs."""

    volume: np.ndarray
    pixel_size: float
    is_mask: bool = True  # False: a map; it is thresholded and dilated into a mask first
    source: str = ""

    def describe(self) -> str:
        what = "mask" if self.is_mask else "map"
        shape = "×".join(str(s) for s in self.volume.shape)
        return f"3D {what} {self.source or '(array)'} ({shape} voxels, {self.pixel_size:g} Å/px)"


def read_reference(path: str | Path, *, pixel_size: float | None = None, is_mask: bool = True) -> ReferenceMask:
    """A 3D mask/map from an MRC file; the pixel size comes from the header unless ``pixel_size`` is given."""
    import warnings

    import mrcfile

    path = Path(path)
    what = "mask" if is_mask else "map"
    if not path.is_file():
        raise InputError(f"{path}: 3D {what} not found; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True) as mrc:
                if mrc.data is None:
                    raise InputError(f"{path}: MRC file holds no data; give a 3D {what}")
                order = (int(mrc.header.mapc), int(mrc.header.mapr), int(mrc.header.maps))
                volume = np.array(mrc.data, dtype=np.float32)  # a writable copy (torch wants one)
                header_ps = float(mrc.voxel_size.x)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the 3D {what} ({exc}); give an MRC volume") from None
    if volume.ndim != 3 or min(volume.shape) < 2:
        raise InputError(f"{path}: expected a 3D volume, found shape {volume.shape}; give a 3D {what} (MRC)")
    if order not in ((1, 2, 3), (0, 0, 0)):
        raise InputError(f"{path}: axis order (mapc, mapr, maps) = {order} is not supported; re-save the {what} "
                         f"with x, y, z order (e.g. relion_image_handler --i in.mrc --o out.mrc)")
    if pixel_size is not None:
        if not pixel_size > 0:
            raise InputError(f"pixel size {pixel_size} for {path} must be positive")
        ps = float(pixel_size)
    elif header_ps > 0 and math.isfinite(header_ps):
        ps = header_ps
    else:
        raise InputError(f"{path}: the header holds no pixel size; give it (e.g. --map-pixel-size 1.06)")
    if not np.isfinite(volume).all():
        raise InputError(f"{path}: the {what} holds NaN or infinite values; re-export it")
    return ReferenceMask(volume=volume, pixel_size=ps, is_mask=is_mask, source=str(path))


def looks_like_mask(volume: np.ndarray) -> bool:
    """Values within [0, 1] (binary or soft-edged), with some voxels at or near 1."""
    v = np.asarray(volume)
    lo, hi = float(v.min()), float(v.max())
    return lo >= -1e-3 and 0.5 <= hi <= 1.0 + 1e-3


def reference_unused(given: str, *, with_model: bool, has_particles: bool, has_poses: bool,
                     poses_hint: str = "give refined particles, e.g. Refine3D run_data.star") -> str | None:
    """Why a 3D mask/map the user gave (``given``: the option and its value) cannot make labels, as one log line, or
    None when it can: picking with a trained model trains nothing, and reprojection needs particles with poses."""
    if with_model or not has_particles:
        return f"{given} is not used: picking with a trained model, nothing is trained"
    if not has_poses:
        return f"{given} is not used: the particles carry no angles ({poses_hint}); training on disk labels"
    return None


def resolve_label_kind(kind: str, reference: ReferenceMask | None, has_poses: bool) -> tuple[str, str]:
    """The label kind to use (``disk`` or ``reprojection``) for ``labels.kind``, and why (one line for the log).

    ``auto`` uses reprojection when a reference and particle poses are both there, else disks. ``reprojection``
    without either is an error naming what is missing.
    """
    if kind not in LABEL_KINDS:
        raise InputError(f"labels.kind = {kind!r} is unknown; use auto, disk or reprojection")
    if kind == "disk":
        why = "labels.kind = disk in the configuration"
        return "disk", why + (" (the 3D reference is not used)" if reference is not None else "")
    missing = []
    if reference is None:
        missing.append("no 3D mask or map was given")
    if not has_poses:
        missing.append("the particles carry no angles (rot, tilt, psi)")
    if missing:
        if kind == "reprojection":
            raise InputError("labels.kind = reprojection, but " + " and ".join(missing) + "; give a 3D mask/map and "
                             "refined particles (e.g. Refine3D run_data.star), or use labels.kind = disk")
        return "disk", "disks: " + " and ".join(missing)
    return "reprojection", f"reprojection of the {reference.describe()} at each particle's pose"


def _coarsen(volume: np.ndarray, factor: int) -> np.ndarray:
    """Block-average a volume by an odd ``factor``, padding so that the centre voxel ``shape // 2`` becomes the
    centre voxel of the result (``new_shape // 2``) on every axis."""
    if factor <= 1:
        return volume
    if factor % 2 == 0:
        raise ValueError(f"coarsening factor must be odd, got {factor}")
    half = (factor - 1) // 2
    pads = []
    sizes = []
    for n in volume.shape:
        m = max(1, math.ceil(n / factor))
        while True:
            front = (m // 2) * factor + half - n // 2
            back = m * factor - n - front
            if front >= 0 and back >= 0:
                break
            m += 1
        pads.append((front, back))
        sizes.append(m)
    padded = np.pad(volume, pads)
    d, h, w = sizes
    return padded.reshape(d, factor, h, factor, w, factor).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


class FootprintMaker:
    """Binary footprints of one reference at particle poses, for any working pixel size (one projector each)."""

    def __init__(self, reference: ReferenceMask, cfg: LabelConfig, *, device=None, batch: int = 256):
        from .reprojection import THRESHOLD_METHODS, mask_from_map

        if cfg.threshold.lower() not in THRESHOLD_METHODS:
            raise InputError(f"labels.threshold = {cfg.threshold!r} is unknown; use one of "
                             f"{', '.join(THRESHOLD_METHODS)}")
        volume = np.asarray(reference.volume, dtype=np.float32)
        if volume.ndim != 3:
            raise InputError(f"{reference.source or 'reference'}: expected a 3D volume, got shape {volume.shape}")
        if not float(volume.max()) > 0:
            raise InputError(f"{reference.source or 'reference'}: the 3D {'mask' if reference.is_mask else 'map'} is "
                             f"empty (no value above 0); give one with the particle in it")
        self.converted = not reference.is_mask or not looks_like_mask(volume)
        try:
            self.mask = mask_from_map(volume) if self.converted else volume
        except ValueError as exc:
            raise InputError(f"{reference.source or 'reference map'}: {exc}") from None
        if not self.mask.any():
            raise InputError(f"{reference.source or 'reference mask'}: the mask is empty; give a mask with a "
                             f"particle in it")
        self.reference = reference
        self.cfg = cfg
        self.device = device
        self.batch = int(batch)
        self._projectors: dict[float, object] = {}

    def projector(self, working_pixel_size: float):
        """The projector for one working pixel size (built once; the mask is block-averaged towards half the
        working pixel size first when it is much finer)."""
        from .reprojection import Projector

        key = round(float(working_pixel_size), 6)
        if key not in self._projectors:
            ratio = key / self.reference.pixel_size
            factor = max(1, int(math.floor(ratio / 2.0)))
            factor -= 1 - factor % 2  # odd, so the centre voxel stays a voxel centre
            volume = _coarsen(self.mask, factor)
            self._projectors[key] = Projector(volume, self.reference.pixel_size * factor, key, device=self.device)
        return self._projectors[key]

    def __call__(self, angles, centres_xy, working_pixel_size: float) -> np.ndarray:
        """Footprints ``(N, h, w)`` (bool, odd ``h = w``) for ``N`` poses (RELION rot, tilt, psi in degrees) and
        centres (x, y) in working pixels of ``working_pixel_size`` Å."""
        from .reprojection import subpixel_shifts, threshold

        angles = np.asarray(angles, dtype=np.float64).reshape(-1, 3)
        centres = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
        if len(angles) != len(centres):
            raise ValueError(f"{len(angles)} poses for {len(centres)} centres")
        bad = ~np.isfinite(angles).all(axis=1)
        if bad.any():
            raise InputError(f"particle {int(np.argmax(bad))} has a non-finite angle {angles[bad][0].tolist()}; "
                             f"check the refined particles' rlnAngleRot/Tilt/Psi")
        if not working_pixel_size or not working_pixel_size > 0:
            raise InputError("labels by reprojection need the micrographs' pixel size; give it (e.g. --pixel-size)")
        proj = self.projector(working_pixel_size)
        size = (proj.default_size + 2) | 1  # +2: room for the sub-pixel shift
        out = np.zeros((len(angles), size, size), dtype=bool)
        shifts = subpixel_shifts(centres)
        for start in range(0, len(angles), self.batch):
            stop = start + self.batch
            images = proj(angles[start:stop], shifts[start:stop], size)
            out[start:stop] = threshold(images, self.cfg.threshold, self.cfg.threshold_fraction)
        return out

    def summary(self) -> dict:
        """What the model directory records about these labels."""
        r = self.reference
        return {"reference": r.source or None, "reference_is_mask": bool(r.is_mask),
                "reference_shape": [int(s) for s in r.volume.shape], "reference_pixel_size": float(r.pixel_size),
                "mask_from_map": bool(self.converted), "threshold": self.cfg.threshold,
                **({"threshold_fraction": self.cfg.threshold_fraction} if self.cfg.threshold == "fraction" else {})}


def plot_footprints(image: np.ndarray, target: np.ndarray, centres_xy, diameter_px: float, path: str | Path,
                    n: int = 6, title: str = "") -> Path | None:
    """Crops of ``image`` (lightly low-passed so that particles show) around up to ``n`` particles (away from the
    border, spread over the list) with the label outline (``target`` > 0.5) in orange and a circle of ``diameter_px``
    (dashed) for comparison; returns the PNG path, or None when no particle fits."""
    from matplotlib.patches import Circle
    from scipy.ndimage import gaussian_filter

    from .plots import _pyplot, _save

    centres = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    h, w = image.shape
    half = int(math.ceil(0.9 * diameter_px))
    inside = np.nonzero((centres[:, 0] >= half) & (centres[:, 0] < w - half - 1) & (centres[:, 1] >= half)
                        & (centres[:, 1] < h - half - 1))[0]
    if len(inside) == 0:
        return None
    chosen = inside[np.linspace(0, len(inside) - 1, min(n, len(inside))).round().astype(int)]
    smooth = gaussian_filter(np.asarray(image, dtype=np.float32), max(0.5, diameter_px / 16.0))
    plt = _pyplot()
    cols = min(3, len(chosen))
    rows = int(math.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows + (0.3 if title else 0)), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, i in zip(axes.ravel(), chosen):
        x, y = centres[i]
        cx, cy = int(round(x)), int(round(y))
        crop = smooth[cy - half:cy + half + 1, cx - half:cx + half + 1]
        lab = target[cy - half:cy + half + 1, cx - half:cx + half + 1]
        lo, hi = np.percentile(crop, [1, 99])
        ax.imshow(crop, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        if lab.max() > 0.5:
            ax.contour(lab, levels=[0.5], colors="tab:orange", linewidths=1.2)
        ax.add_patch(Circle((x - cx + half, y - cy + half), diameter_px / 2.0, fill=False, ls="--", lw=0.8,
                            color="tab:cyan"))
        ax.plot([x - cx + half], [y - cy + half], "+", color="tab:cyan", ms=5)
        ax.set_title(f"particle {i + 1}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(fig, Path(path))


__all__ = ["LABEL_KINDS", "ReferenceMask", "read_reference", "looks_like_mask", "resolve_label_kind",
           "FootprintMaker", "plot_footprints"]
