"""Non-maximum suppression in the CASSPER/PIXER style, vectorised with torch (CPU or GPU tensors; no pycuda).

1. Score map: each pixel gets the Gaussian-weighted mean probability over a particle-sized window (a separable
   Gaussian of std ``sigma`` diameters truncated at one radius, weights summing to 1; outside the map counts as
   probability 0). A particle whose window is all probability 1 scores 1, so the score is in [0, 1].
2. Candidates: the best pixel of each grid cell of side ``cell`` diameters.
3. Each candidate climbs to a local maximum, one 8-neighbour step at a time, to its highest neighbour while that
   is strictly higher (all candidates at once), then the centre is refined to sub-pixel by a parabola per axis.
4. Candidates under ``min_score`` are dropped, then, strongest first, any candidate whose square box (side one
   diameter) overlaps a kept one by more than ``overlap`` of the box area is removed (the filtering strength).
   PIXER's extra step (moving the stronger candidate 20 % towards the removed one) is left out.

Score of a pick: the score map at its peak.

Tuned by selection: ``sigma`` (a narrower window gives more, sharper maxima: the candidate density; ``cell`` matters
little once candidates climb) and ``overlap`` (the filtering strength).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .base import CentreSet, Finder, check_map, greedy_keep


def _as_tensor(prob) -> torch.Tensor:
    if isinstance(prob, torch.Tensor):
        t = prob.detach()
        if t.ndim != 2:
            raise ValueError(f"probability map must be a 2D (H, W) tensor, got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("probability map contains NaN or infinite values")
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"probability map must hold probabilities in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        return t.to(torch.float32).clamp(0, 1)
    return torch.from_numpy(check_map(prob))


def _kernel(diameter_px: float, sigma: float) -> np.ndarray:
    half = max(1, int(math.floor(diameter_px / 2)))
    s = max(float(sigma) * diameter_px, 0.5)
    x = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / s) ** 2)
    return k / k.sum()


def _score_map(p: torch.Tensor, d: float, sigma: float, conv: bool | None = None) -> torch.Tensor:
    """Gaussian-weighted mean probability over a particle-sized window (std ``sigma`` diameters), in [0, 1], on
    the device of ``p``: scipy's separable filter on the CPU (several times faster there), ``conv2d`` elsewhere."""
    k = _kernel(d, sigma)
    if not (p.device.type != "cpu" if conv is None else conv):
        a = p.numpy()
        a = ndi.correlate1d(a, k.astype(np.float32), axis=1, mode="constant")
        a = ndi.correlate1d(a, k.astype(np.float32), axis=0, mode="constant")
        return torch.from_numpy(a).clamp_(0, 1)
    half = len(k) // 2
    kt = torch.as_tensor(k, dtype=torch.float32, device=p.device)
    img = F.conv2d(p[None, None], kt.view(1, 1, 1, -1), padding=(0, half))
    img = F.conv2d(img, kt.view(1, 1, -1, 1), padding=(half, 0))
    return img[0, 0].clamp_(0, 1)


_STEPS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))


def _climb(score: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every (r, c) to its highest 8-neighbour while that is strictly higher, until all rest at maxima."""
    h, w = score.shape
    dr = torch.tensor([s[0] for s in _STEPS], device=score.device)
    dc = torch.tensor([s[1] for s in _STEPS], device=score.device)
    low = torch.tensor(-1.0, device=score.device)  # outside the map
    active = torch.arange(len(r), device=score.device)
    for _ in range(h + w):
        if len(active) == 0:
            break
        rr = r[active, None] + dr
        cc = c[active, None] + dc
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        vals = torch.where(ok, score[rr.clamp(0, h - 1), cc.clamp(0, w - 1)], low)
        best = vals.argmax(dim=1)
        moved = vals.gather(1, best[:, None])[:, 0] > vals[:, 4]
        active = active[moved]
        best = best[moved]
        r[active] += dr[best]
        c[active] += dc[best]
    return r, c


def _climbed_candidates(score: torch.Tensor, cell_px: int) -> torch.Tensor:
    """Flat indices of the local maxima reached from the best pixel of every grid cell (unique)."""
    h, w = score.shape
    ph, pw = (-h) % cell_px, (-w) % cell_px
    padded = F.pad(score[None, None], (0, pw, 0, ph), value=-1.0)
    _, idx = F.max_pool2d(padded, cell_px, stride=cell_px, return_indices=True)
    idx = idx.reshape(-1)
    r, c = _climb(score, idx // (w + pw), idx % (w + pw))
    return torch.unique(r * w + c)


def _subpixel(score: torch.Tensor, flat: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the peaks refined by a parabola through each peak and its two neighbours per axis."""
    h, w = score.shape
    r, c = flat // w, flat % w
    s0 = score[r, c]

    def offset(lo, hi):
        den = lo - 2 * s0 + hi
        off = torch.where(den < 0, 0.5 * (lo - hi) / den.clamp(max=-1e-12), torch.zeros_like(s0))
        return off.clamp(-0.5, 0.5)

    dx = offset(score[r, (c - 1).clamp(min=0)], score[r, (c + 1).clamp(max=w - 1)])
    dy = offset(score[(r - 1).clamp(min=0), c], score[(r + 1).clamp(max=h - 1), c])
    x = (c.to(torch.float64) + dx.to(torch.float64)).cpu().numpy()
    y = (r.to(torch.float64) + dy.to(torch.float64)).cpu().numpy()
    return x, y


def suppress_overlaps(xy: np.ndarray, score: np.ndarray, box_px: float, overlap: float) -> np.ndarray:
    """Indices kept by greedy suppression, strongest first: a centre is removed when its square box (side
    ``box_px``) overlaps an already kept box by more than ``overlap`` × box area. Returned in score order."""
    if len(xy) == 0:
        return np.zeros(0, dtype=np.int64)
    # pairs that can overlap at all: both axis offsets at most the box side
    pairs = cKDTree(xy).query_pairs(box_px, p=np.inf, output_type="ndarray")
    if len(pairs):
        d = np.abs(xy[pairs[:, 0]] - xy[pairs[:, 1]])
        inter = np.clip(box_px - d[:, 0], 0, None) * np.clip(box_px - d[:, 1], 0, None)
        pairs = pairs[inter > overlap * box_px * box_px]
    return greedy_keep(score, pairs)


class NMSFinder(Finder):
    name = "nms"
    defaults: ClassVar[dict[str, Any]] = {
        "sigma": 0.12,  # Gaussian std of the score window, in diameters (window one diameter wide): candidate density
        "overlap": 0.5,  # largest allowed box overlap between picks, fraction of the box area: filtering strength
        "cell": 0.4,  # grid cell side for candidates, in diameters (PIXER's extraction setting)
        "min_score": 0.05,  # candidates scoring below this are background
    }
    grid: ClassVar[dict[str, list]] = {"sigma": [0.08, 0.12, 0.17], "overlap": [0.3, 0.5, 0.7]}

    def _prepare(self, prob) -> torch.Tensor:
        return _as_tensor(prob)  # torch tensors stay on their device

    def _find(self, prob: torch.Tensor, diameter_px: float, params: dict[str, Any], cache: dict) -> CentreSet:
        if not 0 <= params["overlap"] <= 1:
            raise ValueError(f"nms: overlap must be in [0, 1], got {params['overlap']}")
        if params["cell"] <= 0:
            raise ValueError(f"nms: cell must be > 0 diameters, got {params['cell']}")
        key = ("score", params["sigma"])
        if key not in cache:
            cache[key] = _score_map(prob, diameter_px, params["sigma"])
        s = cache[key]
        cell_px = max(1, int(round(params["cell"] * diameter_px)))
        key = ("cand", params["sigma"], cell_px, params["min_score"])
        if key not in cache:
            flat = _climbed_candidates(s, cell_px)
            flat = flat[s.reshape(-1)[flat] >= params["min_score"]]
            x, y = _subpixel(s, flat)
            cache[key] = (np.stack([x, y], axis=1), s.reshape(-1)[flat].to(torch.float64).cpu().numpy())
        xy, score = cache[key]
        keep = suppress_overlaps(xy, score, diameter_px, params["overlap"])
        return CentreSet(xy[keep], score[keep])

