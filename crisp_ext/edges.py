"""The micrograph edge and the curated picks: distances to the edge, and the edge rule and margin that the curator
kept, learnt from the labelled micrographs (working scale) when a picker is trained."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def edge_distance(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Each centre's distance to the nearest edge of a micrograph of ``shape`` (ny, nx)."""
    ny, nx = shape
    return np.minimum.reduce([x, y, nx - x, ny - y])


def near_edge(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], half_box: float) -> np.ndarray:
    """Which centres lie within ``half_box`` of the edge of a micrograph of ``shape`` (ny, nx)."""
    return edge_distance(x, y, shape) < half_box


def edge_band(shape: tuple[int, int], width: float) -> float:
    """The fraction of a micrograph of ``shape`` (ny, nx) that lies within ``width`` of its edge."""
    ny, nx = shape
    return 1.0 - max(0.0, nx - 2 * width) * max(0.0, ny - 2 * width) / float(nx * ny)


def choose_edge_rule(items, diameters_w: Sequence[float], box_fraction: float) -> tuple[str, str]:
    """``keep`` when the curated picks (``items``: labelled micrographs at the working scale) include particles within
    half a box of the edge at least half as often as their density predicts, else ``drop``; and why (a log line)."""
    seen = expected = 0.0
    for item, d in zip(items, diameters_w):
        ny, nx = item.image.shape
        h = 0.5 * box_fraction * d
        seen += float(near_edge(item.truth_xy[:, 0], item.truth_xy[:, 1], (ny, nx), h).sum())
        expected += edge_band((ny, nx), h) * len(item.truth_xy)
    if expected <= 0:
        return "drop", "edge rule drop (no picks to judge by)"
    ratio = seen / expected
    rule = "keep" if ratio >= 0.5 else "drop"
    return rule, (f"edge rule {rule}: {seen:.0f} curated picks lie within half a box of the edge, {ratio:.0%} of "
                  f"what their density predicts")


EDGE_STRAYS = 0.002  # share of the curated picks nearest the edge set aside when learning the edge margin
EDGE_MARGIN_STEP = 0.1  # diameters: a margin less than this wider than the edge rule's is the same rule
EDGE_MARGIN_MAX = 2.0  # diameters: a wider empty band says more about where the curator looked than about the edge


def learn_edge_margin(items, diameters_w: Sequence[float], wider_than: float) -> tuple[float, str]:
    """The margin (in diameters) that the curated picks (``items``: labelled micrographs at the working scale) keep
    from the micrograph edge, when it is wider than ``wider_than`` and no accident: the distance of the pick nearest
    the edge once the nearest :data:`EDGE_STRAYS` are set aside, where their density predicts at least 10, and ten
    times as many picks as lie inside it. Else 0 (nothing beyond the edge rule), also when it is less than
    :data:`EDGE_MARGIN_STEP` wider (simulated picks, kept whole inside the micrograph, keep 0.5); at most
    :data:`EDGE_MARGIN_MAX`. And why (a log line)."""
    dist = [edge_distance(it.truth_xy[:, 0], it.truth_xy[:, 1], it.image.shape) / d
            for it, d in zip(items, diameters_w) if len(it.truth_xy)]
    if not dist:
        return 0.0, "edge margin: no picks to judge by"
    e = np.sort(np.concatenate(dist))
    margin = float(e[int(EDGE_STRAYS * len(e))])
    seen = int((e < margin).sum())
    expected = sum(edge_band(it.image.shape, margin * d) * len(it.truth_xy) for it, d in zip(items, diameters_w))
    what = (f"the curated picks keep {margin:.2f} diameters from the micrograph edge ({seen} nearer, where their "
            f"density predicts {expected:.0f})")
    if margin < wider_than + EDGE_MARGIN_STEP or expected < 10 or seen > 0.1 * expected:
        return 0.0, f"edge margin: none beyond the edge rule; {what}"
    used = min(margin, EDGE_MARGIN_MAX)
    return used, f"edge margin {used:.2f} diameters: {what}; picks nearer the edge are dropped"
