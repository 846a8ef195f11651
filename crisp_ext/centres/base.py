"""Common ground of the centre finders: the result type, the finder interface and greedy suppression.

Everything here works at the *working scale*: ``prob`` is a probability map in [0, 1] of shape ``(H, W)`` (numpy
array, or a torch tensor for the finders that run on tensors), ``diameter_px`` the particle diameter in its
pixels, and centres are ``(x, y)`` = (column, row) with the origin at array element ``[0, 0]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class CentreSet:
    """Picks of one micrograph: ``xy`` (N, 2) float64 (x = column, y = row) and ``score`` (N,) float64, higher is
    better. The meaning and range of the score belong to the finder that made it (documented there)."""

    xy: np.ndarray
    score: np.ndarray

    def __post_init__(self):
        xy = np.asarray(self.xy, dtype=np.float64).reshape(-1, 2)
        score = np.asarray(self.score, dtype=np.float64).reshape(-1)
        if len(score) != len(xy):
            raise ValueError(f"CentreSet: {len(score)} scores for {len(xy)} centres")
        object.__setattr__(self, "xy", xy)
        object.__setattr__(self, "score", score)

    @classmethod
    def empty(cls) -> CentreSet:
        return cls(np.zeros((0, 2)), np.zeros(0))

    def __len__(self) -> int:
        return len(self.score)

    def subset(self, index) -> CentreSet:
        return CentreSet(self.xy[index], self.score[index])

    def above(self, threshold: float | None) -> CentreSet:
        """The picks with score >= threshold (all when None)."""
        return self if threshold is None else self.subset(self.score >= threshold)

    def sorted(self) -> CentreSet:
        """Highest score first (stable)."""
        return self.subset(np.argsort(-self.score, kind="stable"))


def check_map(prob, what: str = "probability map") -> np.ndarray:
    """``prob`` as a float32 (H, W) numpy array in [0, 1], or a clear error."""
    try:
        import torch

        if isinstance(prob, torch.Tensor):
            prob = prob.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.asarray(prob, dtype=np.float32)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"{what} must be a 2D (H, W) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{what} must hold probabilities in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return np.clip(arr, 0.0, 1.0)


def check_diameter(diameter_px) -> float:
    d = float(diameter_px)
    if not np.isfinite(d) or d < 2:
        raise ValueError(f"particle diameter at the working scale must be >= 2 px, got {diameter_px}")
    return d


class Finder:
    """A centre finder. Subclasses set ``name``, ``defaults`` (every parameter with its default) and ``grid``
    (two parameters — candidate density, filtering strength — with the values tried by automatic selection) and
    implement :meth:`_find`, which may keep work shared between parameter sets (e.g. a filtered map) in ``cache``
    (one dict per map, shared by the calls of :meth:`find_grid`)."""

    name: str = ""
    defaults: ClassVar[dict[str, Any]] = {}
    grid: ClassVar[dict[str, list]] = {}

    def params(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated with ``overrides``; an unknown name is an error listing the known ones."""
        out = dict(self.defaults)
        for key, value in (overrides or {}).items():
            if key not in out:
                raise ValueError(f"finder {self.name!r} has no parameter {key!r} (known: {', '.join(out)})")
            out[key] = type(out[key])(value) if isinstance(out[key], (int, float)) and not isinstance(
                out[key], bool) else value
        return out

    def grid_points(self, grid: dict[str, Sequence] | None = None) -> list[dict[str, Any]]:
        """All combinations of the grid values (this finder's grid unless one is given), as full parameter sets."""
        grid = self.grid if grid is None else grid
        keys = list(grid)
        return [self.params(dict(zip(keys, values))) for values in itertools.product(*(grid[k] for k in keys))]

    def find(self, prob, diameter_px: float, **params) -> CentreSet:
        """Centres and scores of one probability map."""
        return self._find(self._prepare(prob), check_diameter(diameter_px), self.params(params), {})

    def find_grid(self, prob, diameter_px: float, points: list[dict[str, Any]]) -> list[CentreSet]:
        """:meth:`find` for each parameter set in ``points`` (same order), sharing work between them."""
        prob = self._prepare(prob)
        d = check_diameter(diameter_px)
        cache: dict = {}
        return [self._find(prob, d, self.params(p), cache) for p in points]

    def _prepare(self, prob):
        """The map in the form :meth:`_find` takes (default: a checked float32 numpy array)."""
        return check_map(prob)

    def _find(self, prob, diameter_px: float, params: dict[str, Any], cache: dict) -> CentreSet:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<finder {self.name}>"


def greedy_keep(score: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Indices kept by greedy suppression in score order (ties: lower index first): a pick is kept unless it is
    in a conflict ``pairs`` (K, 2) with a pick already kept. Returned highest score first."""
    n = len(score)
    order = np.argsort(-score, kind="stable")
    if n == 0 or len(pairs) == 0:
        return order
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    a, b = pairs[:, 0], pairs[:, 1]
    swap = rank[a] > rank[b]
    strong = np.where(swap, b, a)
    weak = np.where(swap, a, b)
    srt = np.argsort(strong, kind="stable")
    strong, weak = strong[srt], weak[srt]
    starts = np.searchsorted(strong, np.arange(n + 1)).tolist()
    weak_l = weak.tolist()
    removed = np.zeros(n, dtype=bool)
    kept = []
    for i in order.tolist():
        if removed[i]:
            continue
        kept.append(i)
        for k in range(starts[i], starts[i + 1]):
            removed[weak_l[k]] = True
    return np.asarray(kept, dtype=np.int64)
