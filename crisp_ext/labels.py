"""Training labels from picks at the working scale: a target map and a per-pixel loss weight.

``kind = "disk"``: a disk of ``disk_fraction * diameter`` at every centre; a pixel belongs to it when the pixel's
centre (integer row/column) lies within the radius of the (sub-pixel) pick. ``kind = "reprojection"``: given binary
footprints (one per centre, odd-sized, centred) are pasted with :func:`crisp_ext.reprojection.paste_footprints`.
``kind = "auto"``: footprints when given, else disks.

Curated pick sets are incomplete, so a plain label map teaches the network that unpicked particles are background.
Two remedies, both in the weight map (0 = pixel not scored):

* ``ignore_band`` (diameters): background pixels within this distance of the label foreground get weight 0, so
  the exact edge of a particle does not count;
* ``background_weight`` with ``ignore_far`` (diameters): background pixels farther than ``ignore_far`` from every
  pick get ``background_weight`` (``ignore_far = None``: every background pixel outside the band). Regions with no
  picks at all are where unpicked particles live; a small weight there lets them be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .config import LabelConfig
from .errors import InputError


@dataclass
class Labels:
    """``target``: float32 {0, 1} (H, W); ``weight``: float32 (H, W) >= 0, 0 = ignored pixel; ``centre``: float32
    (H, W) in [0, 1], a Gaussian peak at every pick (``LabelConfig.centre_weight > 0``), else None."""

    target: np.ndarray
    weight: np.ndarray
    centre: np.ndarray | None = None

    @property
    def ignore(self) -> np.ndarray:
        """Boolean mask of the pixels that are not scored."""
        return self.weight <= 0

    def __post_init__(self):
        if self.target.shape != self.weight.shape:
            raise ValueError(f"label target {self.target.shape} and weight {self.weight.shape} differ in shape")
        if self.centre is not None and self.centre.shape != self.target.shape:
            raise ValueError(f"label target {self.target.shape} and centre {self.centre.shape} differ in shape")

    def channels(self) -> list[np.ndarray]:
        """The training targets, one per network output channel."""
        return [self.target] + ([self.centre] if self.centre is not None else [])


def disk_mask(shape: tuple[int, int], centres_xy, radius: float) -> np.ndarray:
    """Boolean map of ``shape`` (rows, cols): pixels whose centre is within ``radius`` of any centre (x, y)."""
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), dtype=bool)
    centres = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    if radius <= 0 or len(centres) == 0:
        return out
    r2 = radius * radius
    reach = int(math.ceil(radius))
    for x, y in centres:
        if not (np.isfinite(x) and np.isfinite(y)):
            raise InputError(f"particle centre ({x}, {y}) is not finite; check the coordinate file")
        c0, c1 = max(int(math.floor(x)) - reach, 0), min(int(math.ceil(x)) + reach + 1, w)
        r0, r1 = max(int(math.floor(y)) - reach, 0), min(int(math.ceil(y)) + reach + 1, h)
        if c0 >= c1 or r0 >= r1:
            continue
        dx2 = (np.arange(c0, c1) - x) ** 2
        dy2 = (np.arange(r0, r1) - y) ** 2
        out[r0:r1, c0:c1] |= (dy2[:, None] + dx2[None, :]) <= r2
    return out


def centre_map(shape: tuple[int, int], centres_xy, sigma: float) -> np.ndarray:
    """float32 map of ``shape``: at every pixel the largest of the Gaussians ``exp(-d² / 2σ²)`` centred on the
    (sub-pixel) centres (x, y); 1 at a centre, separate peaks for touching particles."""
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), dtype=np.float32)
    centres = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    if sigma <= 0 or len(centres) == 0:
        return out
    reach = int(math.ceil(3.0 * sigma))
    for x, y in centres:
        c0, c1 = max(int(math.floor(x)) - reach, 0), min(int(math.ceil(x)) + reach + 1, w)
        r0, r1 = max(int(math.floor(y)) - reach, 0), min(int(math.ceil(y)) + reach + 1, h)
        if c0 >= c1 or r0 >= r1:
            continue
        gx = np.exp(-((np.arange(c0, c1) - x) ** 2) / (2 * sigma * sigma))
        gy = np.exp(-((np.arange(r0, r1) - y) ** 2) / (2 * sigma * sigma))
        np.maximum(out[r0:r1, c0:c1], (gy[:, None] * gx[None, :]).astype(np.float32), out=out[r0:r1, c0:c1])
    return out


def _distance_to(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of ``mask`` (inf when there is none)."""
    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    return ndimage.distance_transform_edt(~mask).astype(np.float32)


def _centre_pixels(shape: tuple[int, int], centres: np.ndarray) -> np.ndarray:
    h, w = shape
    out = np.zeros(shape, dtype=bool)
    if len(centres):
        cols = np.floor(centres[:, 0] + 0.5).astype(np.int64)
        rows = np.floor(centres[:, 1] + 0.5).astype(np.int64)
        ok = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        out[rows[ok], cols[ok]] = True
    return out


def make_labels(shape: tuple[int, int], centres_xy, diameter_px: float, cfg: LabelConfig,
                footprints: Sequence[np.ndarray] | np.ndarray | None = None) -> Labels:
    """Labels for one micrograph at the working scale (``centres_xy`` and ``diameter_px`` in working pixels)."""
    shape = (int(shape[0]), int(shape[1]))
    centres = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    if not diameter_px or diameter_px <= 0:
        raise InputError(f"particle diameter must be positive for labels (got {diameter_px} working px)")
    if cfg.kind == "disk" or (cfg.kind == "auto" and footprints is None):
        if cfg.disk_fraction <= 0:
            raise InputError(f"labels.disk_fraction must be positive (got {cfg.disk_fraction})")
        fg = disk_mask(shape, centres, 0.5 * cfg.disk_fraction * diameter_px)
    elif cfg.kind in ("reprojection", "auto"):
        if footprints is None:
            raise InputError("labels.kind = 'reprojection' needs particle footprints (poses and a 3D mask); "
                             "give a reference mask or use labels.kind = 'disk'")
        from .reprojection import paste_footprints

        fg = paste_footprints(shape, centres, footprints)
    else:
        raise InputError(f"unknown label kind {cfg.kind!r} (use auto, disk or reprojection)")
    if cfg.ignore_band < 0 or cfg.background_weight < 0 or (cfg.ignore_far is not None and cfg.ignore_far < 0):
        raise InputError("labels.ignore_band, labels.background_weight and labels.ignore_far must not be negative")

    weight = np.ones(shape, dtype=np.float32)
    band = cfg.ignore_band * diameter_px
    if band > 0 or cfg.background_weight != 1.0:
        to_fg = _distance_to(fg)
        if cfg.background_weight != 1.0:
            if cfg.ignore_far is None:
                far = ~fg
            else:
                far = _distance_to(_centre_pixels(shape, centres)) > cfg.ignore_far * diameter_px
                far &= ~fg
            weight[far] = cfg.background_weight
        if band > 0:
            weight[(to_fg > 0) & (to_fg <= band)] = 0.0
    centre = None
    if cfg.centre_weight < 0 or cfg.centre_sigma <= 0:
        raise InputError("labels.centre_weight must not be negative and labels.centre_sigma must be positive")
    if cfg.centre_weight > 0:
        centre = centre_map(shape, centres, cfg.centre_sigma * diameter_px)
    return Labels(fg.astype(np.float32), weight, centre)
