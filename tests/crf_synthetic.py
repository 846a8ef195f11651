"""Synthetic inputs for the CRF tests and benchmark: disks, a noisy "CNN" logit map with specks and holes, and a
micrograph-like intensity image. Deterministic for a given seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage


@dataclass
class Scene:
    mask: np.ndarray  # [H, W] bool, the clean particle mask
    logits: torch.Tensor  # [1, 1, H, W] float32, the noisy unary
    image: torch.Tensor  # [1, 1, H, W] float32, micrograph-like intensity (particles dark), standardised
    specks: np.ndarray  # [H, W] bool, where false-positive specks were put
    holes: np.ndarray  # [H, W] bool, where holes were punched into particles


def _blobs(rng, shape, centres, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, bool)
    for cy, cx in centres:
        out |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    return out


def make_scene(size: int = 96, diameter: float = 24.0, n_particles: int = 6, n_specks: int = 8, n_holes: int = 4,
               amplitude: float = 3.0, noise: float = 1.5, speck_logit: float = 1.5,
               seed: int = 0) -> Scene:
    """A scene of ``size``² pixels. The unary is ``amplitude * (2 * soft mask - 1)`` plus correlated noise of std
    ``noise``, with specks (radius 2, logit ``+speck_logit``) in the background and holes (radius 2.5, logit ``-speck_logit``) inside particles."""
    rng = np.random.default_rng(seed)
    shape = (size, size)
    r = diameter / 2
    centres: list[tuple[float, float]] = []
    for _ in range(2000):
        if len(centres) == n_particles:
            break
        c = rng.uniform(r, size - r, 2)
        if all(np.hypot(*(c - np.array(o))) > 1.15 * diameter for o in centres):
            centres.append((float(c[0]), float(c[1])))
    mask = _blobs(rng, shape, centres, r)
    far = ndimage.distance_transform_edt(~mask) > 4
    speck_at = [tuple(p) for p in np.argwhere(far)[rng.choice(int(far.sum()), n_specks, replace=False)]]
    specks = _blobs(rng, shape, speck_at, 2.0)
    inner = ndimage.distance_transform_edt(mask) > 5
    hole_at = [tuple(p) for p in np.argwhere(inner)[rng.choice(int(inner.sum()), n_holes, replace=False)]]
    holes = _blobs(rng, shape, hole_at, 2.5) & mask
    soft = ndimage.gaussian_filter(mask.astype(float), 1.5)
    corr = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    u = amplitude * (2 * soft - 1) + noise * corr / corr.std()
    u[specks] = speck_logit
    u[holes] = -speck_logit
    img = -ndimage.gaussian_filter(mask.astype(float), 1.0) + 0.7 * rng.standard_normal(shape)
    img = (img - img.mean()) / img.std()
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return Scene(mask=mask, logits=as_t(u), image=as_t(img), specks=specks, holes=holes)


def iou(prob: torch.Tensor, mask: np.ndarray) -> float:
    pred = prob.detach().squeeze().numpy() > 0.5
    return float((pred & mask).sum() / max((pred | mask).sum(), 1))


def uncertain_mass(prob: torch.Tensor) -> float:
    """Fraction of pixels with probability in [0.1, 0.9] (lower = more bimodal)."""
    p = prob.detach()
    return float(((p >= 0.1) & (p <= 0.9)).float().mean())
