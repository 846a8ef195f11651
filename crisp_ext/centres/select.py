"""Automatic choice of centre finder, settings and score threshold on validation micrographs.

Every finder runs over its grid on the *predicted* maps of the validation micrographs; its picks go through the same
edge rule and de-duplication as in picking; each candidate is scored by the average precision of its real scores
against the validation picks (:mod:`crisp_ext.metrics`, pooled, one-to-one matching within ``match_radius_px``) and
within half of it; the best mean of the two APs wins (ties: higher F1, then faster). The strict radius makes
well-centred settings win over ones that only land within the loose radius: extraction needs centred boxes. A score threshold is then chosen for the winner on the same
micrographs by the objective:

- ``f1`` (default): maximum F1;
- ``fbeta:<b>``: maximum F-beta (b > 1 favours recall);
- ``recall``: the same as ``fbeta:2``; ``precision``: the same as ``fbeta:0.5`` (pure recall or precision would
  pick the lowest or the highest score, which is useless).

Differences smaller than one validation match are noise: among the thresholds whose objective is within one
match's worth of the best (``(1 + b²) / (b² · validation picks + picks kept)``, e.g. 0.007 F1 for 130 validation
picks, 0.001 for 1000), the lowest wins. Curated picks leave true particles out, and those count as false positives
against them, so near-ties are settled towards recall; on sparse data with saturated scores the F1 maximum is a
plateau whose highest edge can sit on the steep side of the score distribution (a simulated sparse scene: the best
validation F1 0.836 at threshold 0.90, 0.833 at 0.85, test F1 0.959 and 0.990). The threshold lies halfway between
the score of the last pick kept and the next lower score, so that it does not sit on a validation pick. Each
candidate in the table also carries P/R/F1 at its own chosen threshold.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import PRCurve, pr_curve
from .base import CentreSet, check_diameter, check_map
from .finders import get_finder
from .postprocess import EDGE_MODES, finish_picks

DEFAULT_FINDERS = ("nms", "trackpy", "morphology")


def objective_beta(objective: str) -> float:
    """The F-beta that an objective name stands for (see the module docstring)."""
    name = str(objective).strip().lower()
    if name == "f1":
        return 1.0
    if name == "recall":
        return 2.0
    if name == "precision":
        return 0.5
    if name.startswith("fbeta:"):
        try:
            beta = float(name.split(":", 1)[1])
        except ValueError:
            beta = -1.0
        if beta > 0:
            return beta
    raise ValueError(f"threshold objective {objective!r} not understood (use f1, recall, precision or fbeta:<b>)")


def choose_threshold(curve: PRCurve, objective: str = "f1") -> tuple[float, int]:
    """(threshold, index into the curve): the lowest threshold whose objective is within one validation match's
    worth of the best (see the module docstring)."""
    if len(curve.thresholds) == 0:
        return 0.0, -1
    beta = objective_beta(objective)
    f = curve.fbeta(beta)
    best = int(np.argmax(f))
    b2 = beta * beta
    one_match = (1 + b2) / max(b2 * curve.n_true + float(curve.n_pred[best]), 1.0)
    k = int(np.flatnonzero(f >= f[best] - one_match - 1e-12)[-1])
    t = curve.thresholds
    thr = 0.5 * (t[k] + t[k + 1]) if k + 1 < len(t) else float(t[k])
    return float(thr), k


@dataclass
class Candidate:
    """One finder setting on the validation maps: AP over all ranked picks, and P/R/F1 at its best threshold."""

    finder: str
    params: dict[str, Any]
    ap: float
    threshold: float
    precision: float
    recall: float
    f1: float
    n_pred: int  # picks at or above the threshold
    n_true: int
    n_matched: int
    seconds: float  # finder seconds per map (work shared between grid points divided evenly)
    ap_strict: float = 0.0  # AP with half the match radius (rewards well-centred picks)

    @property
    def score(self) -> float:
        """What selection maximises: the mean of the AP at the match radius and at half of it."""
        return 0.5 * (self.ap + self.ap_strict)


@dataclass
class Selection:
    """The chosen finder, its full parameters and score threshold, with the table of every candidate tried."""

    finder: str
    params: dict[str, Any]
    threshold: float
    objective: str
    diameter_px: float  # at the working scale
    match_radius_px: float
    edge: str
    box_px: float
    min_distance_px: float
    n_maps: int
    candidates: list[Candidate] = field(default_factory=list)
    seconds: float = 0.0  # the whole selection
    refine_sigma_px: float = 0.0  # centre refinement used (0 = none)

    @property
    def best(self) -> Candidate:
        """The chosen candidate's row of the table."""
        for c in self.candidates:
            if c.finder == self.finder and c.params == self.params:
                return c
        raise LookupError("the chosen finder is not in the candidate table")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Selection:
        data = dict(data)
        try:
            data["candidates"] = [Candidate(**c) for c in data.get("candidates", [])]
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"not a finder selection record: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write as JSON (atomically)."""
        from ..io.atomic import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read the finder selection: {exc}") from None

    def table(self) -> str:
        """The candidate table as text, best selection score first."""
        rows = sorted(self.candidates, key=lambda c: -c.score)
        lines = [f"{'finder':<11}{'params':<34}{'AP':>7}{'AP/2':>7}{'thr':>8}{'P':>7}{'R':>7}{'F1':>7}{'s/map':>8}"]
        for c in rows:
            grid = get_finder(c.finder).grid
            p = ", ".join(f"{k}={c.params[k]:g}" for k in grid if k in c.params)
            mark = " *" if c.finder == self.finder and c.params == self.params else ""
            lines.append(f"{c.finder:<11}{p:<34}{c.ap:7.3f}{c.ap_strict:7.3f}{c.threshold:8.3f}{c.precision:7.3f}"
                         f"{c.recall:7.3f}{c.f1:7.3f}{c.seconds:8.3f}{mark}")
        return "\n".join(lines)


def _evaluate(finder: str, params: dict, picks: list[CentreSet], truths: list[np.ndarray], radius: float,
              objective: str, seconds: float) -> tuple[Candidate, PRCurve]:
    curve = pr_curve([p.xy for p in picks], [p.score for p in picks], truths, radius)
    thr, k = choose_threshold(curve, objective)
    n_true = curve.n_true
    if k < 0:
        return Candidate(finder, params, 0.0, thr, 0.0, 0.0, 0.0, 0, n_true, 0, seconds), curve
    strict = pr_curve([p.xy for p in picks], [p.score for p in picks], truths, 0.5 * radius).ap
    return Candidate(finder, params, curve.ap, thr, float(curve.precision[k]), float(curve.recall[k]),
                     float(curve.f1[k]), int(curve.n_pred[k]), n_true, int(curve.n_matched[k]), seconds,
                     float(strict)), curve


def select_finder(prob_maps: Sequence, truths: Sequence, diameter_px: float,
                  finders: Sequence[str] = DEFAULT_FINDERS, match_radius_px: float | None = None,
                  objective: str = "f1", edge: str = "drop", box_px: float | None = None,
                  min_distance_px: float | None = None, grids: dict[str, dict[str, list]] | None = None,
                  params: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None,
                  refine_sigma_px: float = 0.0) -> Selection:
    """Choose finder, parameters and threshold on validation maps (see the module docstring).

    ``prob_maps``: predicted probability maps (working scale); ``truths``: the validation picks of each map,
    (M_i, 2) arrays of (x, y) at the same scale; ``match_radius_px`` defaults to half the diameter, ``box_px`` (edge
    rule) to the diameter, ``min_distance_px`` (de-duplication) to half the diameter. ``grids`` may replace a
    finder's grid (``{"nms": {"sigma": [...], "overlap": [...]}}``). ``params`` fixes parameters given by the user
    (``CentreConfig.params``): in every finder that has the parameter it replaces the default and, if the parameter
    is on the grid, that grid axis; a name no finder in ``finders`` knows is an error. ``progress`` receives one
    line per finder. ``refine_sigma_px`` > 0 refines every pick to the local probability centroid first
    (:func:`~crisp_ext.centres.postprocess.refine_centres`), as picking does.
    """
    t_start = time.perf_counter()
    d = check_diameter(diameter_px)
    maps = [check_map(m, f"validation probability map {i}") for i, m in enumerate(prob_maps)]
    if not maps:
        raise ValueError("finder selection needs at least one validation micrograph")
    if len(truths) != len(maps):
        raise ValueError(f"finder selection: {len(maps)} probability maps but {len(truths)} sets of picks")
    true_xy = []
    for i, t in enumerate(truths):
        arr = np.asarray(t, dtype=np.float64)
        if arr.size == 0:
            arr = np.zeros((0, 2))
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"validation picks of map {i} must be an (M, 2) array of (x, y), got {arr.shape}")
        true_xy.append(arr)
    if sum(len(t) for t in true_xy) == 0:
        raise ValueError("finder selection: the validation micrographs have no picks to compare with")
    if edge not in EDGE_MODES:
        raise ValueError(f"edge must be one of {', '.join(EDGE_MODES)}, got {edge!r}")
    objective_beta(objective)  # fail early on a bad objective
    radius = 0.5 * d if match_radius_px is None else float(match_radius_px)
    box = d if box_px is None else float(box_px)
    min_dist = 0.5 * d if min_distance_px is None else float(min_distance_px)
    grids = grids or {}
    fixed = dict(params or {})
    known = {k for name in finders for k in get_finder(name).defaults}
    unknown = sorted(set(fixed) - known)
    if unknown:
        raise ValueError(f"centre finder parameter {unknown[0]!r} is not a parameter of {', '.join(finders)}")

    candidates: list[Candidate] = []
    for name in finders:
        finder = get_finder(name)
        grid = dict(grids.get(name) or finder.grid)
        mine = {k: v for k, v in fixed.items() if k in finder.defaults}
        grid.update({k: [v] for k, v in mine.items() if k in grid})
        points = [finder.params({**p, **mine}) for p in finder.grid_points(grid)]
        per_point: list[list[CentreSet]] = [[] for _ in points]
        t0 = time.perf_counter()
        for m in maps:
            for k, picks in enumerate(finder.find_grid(m, d, points)):
                per_point[k].append(finish_picks(picks, m.shape, box, edge, min_dist, m, refine_sigma_px))
        seconds = (time.perf_counter() - t0) / (len(maps) * len(points))
        best_ap = 0.0
        for point, picks in zip(points, per_point):
            cand, _ = _evaluate(name, point, picks, true_xy, radius, objective, seconds)
            candidates.append(cand)
            best_ap = max(best_ap, cand.score)
        if progress is not None:
            progress(f"finder {name}: {len(points)} settings, best mean AP {best_ap:.3f}, {seconds:.3f} s/map")

    best = max(candidates, key=lambda c: (round(c.score, 9), round(c.f1, 9), -c.seconds))
    return Selection(best.finder, dict(best.params), best.threshold, objective, d, radius, edge, box, min_dist,
                     len(maps), candidates, time.perf_counter() - t_start, float(refine_sigma_px))
