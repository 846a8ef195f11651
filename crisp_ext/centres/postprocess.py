"""After a finder: centre refinement, the edge rule, de-duplication, and the score threshold (:func:`pick_centres`
does all four).

Refinement. A network trained on disk labels predicts flat-topped blobs, on which the maximum a finder climbs to is
ill-defined (on EMPIAR-10017 the NMS/trackpy maxima sat 3–6 px from the curated centres at a 24 px diameter while
the blobs' centroids sat within 0.5 px). :func:`refine_centres` moves each pick to the probability-weighted centroid
under a Gaussian window (mean shift, ``sigma`` ≈ D/4, a few iterations), which is where the particle's mass is.

Edge rule. A pick at (x, y) has the box ``[x − b/2, x + b/2] × [y − b/2, y + b/2]`` (``b`` = box size). With
``edge="drop"`` a pick is kept only when ``b/2 <= x <= nx − b/2`` and the same for y: then a box of ``b`` pixels
(even ``b``) centred on the rounded coordinate lies inside the micrograph, as RELION/cryoSPARC extraction needs.
With ``edge="keep"`` every pick is kept, its coordinates clipped into ``[0, nx − 1] × [0, ny − 1]`` (strictly
inside ``[0, nx) × [0, ny)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import map_coordinates
from scipy.spatial import cKDTree

from .base import CentreSet, greedy_keep
from .finders import get_finder

EDGE_MODES = ("drop", "keep")


def apply_edge(picks: CentreSet, shape: tuple[int, int], box_px: float, edge: str = "drop") -> CentreSet:
    """The edge rule (module docstring) for a micrograph of ``shape = (ny, nx)`` at the picks' scale."""
    if edge not in EDGE_MODES:
        raise ValueError(f"edge must be one of {', '.join(EDGE_MODES)}, got {edge!r}")
    ny, nx = int(shape[0]), int(shape[1])
    x, y = picks.xy[:, 0], picks.xy[:, 1]
    if edge == "keep":
        xy = np.stack([np.clip(x, 0, nx - 1), np.clip(y, 0, ny - 1)], axis=1)
        return CentreSet(xy, picks.score)
    if box_px < 0:
        raise ValueError(f"edge box size must be >= 0 px, got {box_px}")
    h = box_px / 2
    inside = (x >= h) & (x <= nx - h) & (y >= h) & (y <= ny - h)
    return picks.subset(inside)


def deduplicate(picks: CentreSet, min_distance_px: float) -> CentreSet:
    """The picks kept when every pick closer than ``min_distance_px`` to a higher-scoring kept pick is removed
    (equal scores: the earlier pick wins), highest score first."""
    return picks.subset(kept_indices(picks.xy, picks.score, min_distance_px))


def kept_indices(xy: np.ndarray, score: np.ndarray, min_distance_px: float) -> np.ndarray:
    """Indices of the centres :func:`deduplicate` keeps: none closer than ``min_distance_px`` to a higher-scoring
    kept one (equal scores: the earlier wins), highest score first."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if min_distance_px <= 0 or len(xy) < 2:
        return np.argsort(-score, kind="stable")
    pairs = cKDTree(xy).query_pairs(min_distance_px, output_type="ndarray")
    if len(pairs):
        d = np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1)
        pairs = pairs[d < min_distance_px]
    return greedy_keep(score, pairs)


def refine_centres(prob, xy: np.ndarray, sigma_px: float, iterations: int = 5) -> np.ndarray:
    """Mean-shift each centre to the probability-weighted centroid under a Gaussian window of ``sigma_px``
    (bilinear sampling of ``prob``; outside the map counts as 0). Returns new ``(N, 2)`` centres."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0 or sigma_px <= 0:
        return xy.copy()
    prob = np.asarray(prob.detach().cpu() if hasattr(prob, "detach") else prob, dtype=np.float32)
    r = int(np.ceil(2.5 * sigma_px))
    off = np.arange(-r, r + 1, dtype=np.float64)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    window = np.exp(-(ox ** 2 + oy ** 2) / (2.0 * sigma_px ** 2))[None]
    for _ in range(max(1, int(iterations))):
        gx = xy[:, 0, None, None] + ox[None]
        gy = xy[:, 1, None, None] + oy[None]
        p = map_coordinates(prob, [gy.ravel(), gx.ravel()], order=1, mode="constant", cval=0.0).reshape(gx.shape)
        w = window * np.clip(p, 0.0, None)
        total = w.sum(axis=(1, 2))
        ok = total > 1e-6
        new = xy.copy()
        new[ok, 0] = (w * gx).sum(axis=(1, 2))[ok] / total[ok]
        new[ok, 1] = (w * gy).sum(axis=(1, 2))[ok] / total[ok]
        if np.max(np.abs(new - xy), initial=0.0) < 0.01:
            xy = new
            break
        xy = new
    return xy


def finish_picks(picks: CentreSet, shape: tuple[int, int], box_px: float, edge: str = "drop",
                min_distance_px: float = 0.0, prob=None, refine_sigma_px: float = 0.0) -> CentreSet:
    """Centre refinement on ``prob`` (when given and ``refine_sigma_px`` > 0), the edge rule, then de-duplication (a
    pick that the edge rule drops does not suppress a neighbour; picks that refinement pulled together merge). All
    commute with a score threshold, so thresholding may come before or after."""
    if prob is not None and refine_sigma_px > 0 and len(picks):
        picks = CentreSet(refine_centres(prob, picks.xy, refine_sigma_px), picks.score)
    return deduplicate(apply_edge(picks, shape, box_px, edge), min_distance_px)


def pick_centres(prob, diameter_px: float, finder: str, params: dict[str, Any] | None = None,
                 threshold: float | None = None, edge: str = "drop", box_px: float | None = None,
                 min_distance_px: float | None = None, refine_sigma_px: float = 0.0) -> CentreSet:
    """Find, post-process and threshold the picks of one map: what the pipeline does per micrograph.

    ``box_px`` defaults to the diameter, ``min_distance_px`` to half of it (``CentreConfig``'s defaults)."""
    picks = get_finder(finder).find(prob, diameter_px, **(params or {}))
    box = float(diameter_px) if box_px is None else float(box_px)
    md = 0.5 * float(diameter_px) if min_distance_px is None else float(min_distance_px)
    return finish_picks(picks, np.shape(prob)[-2:], box, edge, md, prob, refine_sigma_px).above(threshold)
