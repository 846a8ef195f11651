"""Crocker–Grier feature finding through ``trackpy.locate`` (bandpass, local maxima, centroid refinement).

Parameters in diameters of the particle: ``size`` is trackpy's feature ``diameter`` (rounded to an odd number of
pixels; it also sets the bandpass background scale: the filtering strength) and ``separation`` the least distance
between features (the candidate density). The map may first be shrunk by ``downscale`` (<= 1, area averaging; 0 =
automatic, so that the particle is about 14 px, which loses no accuracy and is several times faster); coordinates
are mapped back. The map is
padded with zeros so that trackpy's edge margin does not hide particles near the border (the edge rule is applied
later, in :mod:`crisp_ext.centres.postprocess`).

Score of a pick: trackpy's mass divided by the mass trackpy measures, with the same settings, for a lone disk of
probability 1 and the particle's diameter, so it is comparable across micrographs (about 1 for a clean isolated
particle; it can exceed 1 a little, e.g. for two merged particles). ``minmass`` is in the same normalised units.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .base import CentreSet, Finder

AUTO_DIAMETER_PX = 14.0  # particle diameter after automatic downscaling


def _odd(v: float) -> int:
    n = max(3, int(round(v)))
    return n if n % 2 else n + 1


def _shrink(prob: np.ndarray, factor: float) -> np.ndarray:
    if factor >= 1:
        return prob
    h, w = prob.shape
    size = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
    out = F.interpolate(torch.from_numpy(np.ascontiguousarray(prob))[None, None], size=size, mode="area")
    return out[0, 0].numpy()


def _locate(prob: np.ndarray, diameter_px: float, params: dict[str, Any],
            cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw trackpy results: (x, y) in the pixels of ``prob`` and mass."""
    import trackpy

    ds = float(params["downscale"])
    if ds == 0:
        ds = min(1.0, AUTO_DIAMETER_PX / diameter_px)
    if not 0 < ds <= 1:
        raise ValueError(f"trackpy: downscale must be in (0, 1] (or 0 = automatic), got {ds}")
    cache = {} if cache is None else cache
    if ("shrunk", ds) not in cache:
        cache[("shrunk", ds)] = _shrink(prob, ds)
    img = cache[("shrunk", ds)]
    fy, fx = img.shape[0] / prob.shape[0], img.shape[1] / prob.shape[1]
    size = _odd(params["size"] * diameter_px * ds)
    sep = max(1.0, params["separation"] * diameter_px * ds)
    pad = size + int(np.ceil(sep / 2)) + 1
    img = np.pad(img, pad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = trackpy.locate(img, size, minmass=0, separation=sep, characterize=False,
                            percentile=float(params["percentile"]))
    if len(df) == 0:
        return np.zeros((0, 2)), np.zeros(0)
    x = (df["x"].to_numpy(np.float64) - pad + 0.5) / fx - 0.5
    y = (df["y"].to_numpy(np.float64) - pad + 0.5) / fy - 0.5
    return np.stack([x, y], axis=1), df["mass"].to_numpy(np.float64)


@functools.lru_cache(maxsize=256)
def _reference_mass(diameter_px: float, frozen: tuple) -> float:
    """The mass of a lone disk of probability 1 (the particle's diameter) under the same settings."""
    params = dict(frozen)
    n = int(np.ceil(4 * diameter_px)) + 1
    c = (n - 1) / 2
    yy, xx = np.mgrid[:n, :n]
    disk = np.clip(diameter_px / 2 + 0.5 - np.hypot(xx - c, yy - c), 0, 1).astype(np.float32)
    xy, mass = _locate(disk, diameter_px, params)
    if len(mass) == 0:
        raise RuntimeError(f"trackpy found no reference particle for diameter {diameter_px} px and {params}")
    near = np.hypot(xy[:, 0] - c, xy[:, 1] - c) <= diameter_px / 2
    return float(mass[near].max() if near.any() else mass.max())


class TrackpyFinder(Finder):
    name = "trackpy"
    defaults: ClassVar[dict[str, Any]] = {
        "separation": 0.45,  # least distance between features, in diameters (candidate density)
        "size": 1.0,  # trackpy feature diameter, in diameters (bandpass and mask size: filtering strength)
        "minmass": 0.0,  # in units of the reference mass (see the module docstring)
        "downscale": 0.0,  # shrink the map by this factor first; 0 = automatic (particle about 14 px)
        "percentile": 64.0,  # trackpy: a peak must be brighter than this percentile of the map
    }
    grid: ClassVar[dict[str, list]] = {"separation": [0.3, 0.45, 0.6], "size": [0.8, 1.0, 1.2]}

    def _find(self, prob: np.ndarray, diameter_px: float, params: dict[str, Any], cache: dict) -> CentreSet:
        if params["size"] <= 0 or params["separation"] <= 0:
            raise ValueError(f"trackpy: size and separation must be > 0 diameters, got {params}")
        xy, mass = _locate(prob, diameter_px, params, cache)
        frozen = tuple(sorted((k, float(v)) for k, v in params.items() if k != "minmass"))
        score = mass / _reference_mass(round(float(diameter_px), 4), frozen)
        keep = score > params["minmass"]
        return CentreSet(xy[keep], score[keep])

