"""Segmentation and picking metrics.

Pixel metrics compare boolean masks. Picking metrics compare centres one-to-one: a pick and a true centre may be
matched when they are within ``radius`` (Euclidean, inclusive); every truth and every pick is used at most once,
and the number of matched pairs is the *maximum* possible (Hungarian assignment, as Topaz's ``match_coordinates``).
Among maximum matchings the one with the smallest total distance is taken (that is what ``mean_distance`` reports).
Micrographs are pooled: counts add up over micrographs, a pick is only ever matched within its own micrograph.

Ranking and matching (average precision). Picks are ranked by score, highest first, and each pick is a true
positive exactly when it increases the maximum one-to-one matching of the picks ranked above it (Kuhn's
augmenting-path algorithm run in score order; this is the greedy basis of a transversal matroid). Hence, for every
score threshold, the number of true positives among the picks at or above it equals what a Hungarian matching of
just those picks would give, so the precision-recall curve is made of the same P/R that ``picking_metrics``
reports at any threshold, and higher scores claim truths first (a pick never loses its truth to a lower one, but
may be re-routed to another truth to make room). Plain Hungarian on all picks followed by ranking is *not* used:
a low-scoring pick could take the truth of a high-scoring one and make AP depend on picks below the threshold.
Greedy nearest-truth matching in score order (COCO) is not used either: it can match fewer picks than possible,
which is unfair in densely packed micrographs.

AP = Σ_k P(t_k) · (R(t_k) − R(t_{k−1})) over the distinct score thresholds t_k (ties in score form one step, so a
constant score gives AP = P · R rather than rewarding list order), with recall relative to all truths; no
interpolation (as Topaz and scikit-learn). With no picks or no truths the ratios are 0 by definition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

# -- pixel metrics -------------------------------------------------------------------------------------------------


def _confusion(pred_mask, true_mask, ignore=None) -> np.ndarray:
    pred = np.asarray(pred_mask, dtype=bool)
    true = np.asarray(true_mask, dtype=bool)
    if pred.shape != true.shape:
        raise ValueError(f"pixel_metrics: prediction shape {pred.shape} differs from truth shape {true.shape}")
    keep = np.ones(pred.shape, dtype=bool)
    if ignore is not None:
        ign = np.asarray(ignore, dtype=bool)
        if ign.shape != pred.shape:
            raise ValueError(f"pixel_metrics: ignore mask shape {ign.shape} differs from {pred.shape}")
        keep = ~ign
    tp = np.count_nonzero(pred & true & keep)
    fp = np.count_nonzero(pred & ~true & keep)
    fn = np.count_nonzero(~pred & true & keep)
    tn = np.count_nonzero(keep) - tp - fp - fn
    return np.array([tp, fp, fn, tn], dtype=np.int64)


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b > 0 else 0.0


def _pixel_scores(c: np.ndarray) -> dict[str, float]:
    tp, fp, fn, tn = (int(v) for v in c)
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def pixel_metrics(pred_mask, true_mask, ignore=None) -> dict[str, float]:
    """IoU, precision, recall, accuracy and F1 of the foreground of two boolean masks; ``ignore`` pixels
    (boolean mask, True = not scored) are left out. Ratios with an empty denominator are 0."""
    return _pixel_scores(_confusion(pred_mask, true_mask, ignore))


def pooled_pixel_metrics(pred_masks: Sequence, true_masks: Sequence, ignores: Sequence | None = None) -> dict:
    """:func:`pixel_metrics` over several micrographs, pooling the pixel counts (not averaging the ratios)."""
    if len(pred_masks) != len(true_masks):
        raise ValueError(f"pooled_pixel_metrics: {len(pred_masks)} predictions for {len(true_masks)} truths")
    ignores = [None] * len(pred_masks) if ignores is None else list(ignores)
    total = np.zeros(4, dtype=np.int64)
    for p, t, i in zip(pred_masks, true_masks, ignores):
        total += _confusion(p, t, i)
    return _pixel_scores(total)


# -- centre matching -----------------------------------------------------------------------------------------------


def _as_xy(a, what: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what} must be an (N, 2) array of (x, y), got shape {arr.shape}")
    return arr


def _pairs_within(pred: np.ndarray, true: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (pred, true) index pairs with distance <= radius, and their distances."""
    if len(pred) == 0 or len(true) == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0)
    sdm = cKDTree(pred).sparse_distance_matrix(cKDTree(true), radius, output_type="ndarray")
    return sdm["i"].astype(np.int64), sdm["j"].astype(np.int64), sdm["v"].astype(np.float64)


def match_centres(pred_xy, true_xy, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of picks to true centres within ``radius`` (inclusive).

    Returns ``(pred_idx, true_idx, distances)`` of the matched pairs: a maximum-cardinality matching, and among
    those the one with the least total distance (Hungarian, ``scipy.optimize.linear_sum_assignment``, solved
    separately on each connected group of picks and truths that could be matched).
    """
    pred = _as_xy(pred_xy, "pred_xy")
    true = _as_xy(true_xy, "true_xy")
    if radius < 0:
        raise ValueError(f"match radius must be >= 0, got {radius}")
    i, j, d = _pairs_within(pred, true, radius)
    if len(i) == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0)
    n_p, n_t = len(pred), len(true)
    graph = coo_matrix((np.ones(len(i)), (i, n_p + j)), shape=(n_p + n_t, n_p + n_t))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[i]
    order = np.argsort(edge_comp, kind="stable")
    i, j, d, edge_comp = i[order], j[order], d[order], edge_comp[order]
    starts = np.flatnonzero(np.r_[True, edge_comp[1:] != edge_comp[:-1]])
    ends = np.r_[starts[1:], len(i)]
    out_p, out_t, out_d = [], [], []
    for s, e in zip(starts, ends):
        ci, cj, cd = i[s:e], j[s:e], d[s:e]
        if e - s == 1:
            out_p.append(ci), out_t.append(cj), out_d.append(cd)
            continue
        rows, ri = np.unique(ci, return_inverse=True)
        cols, cj_inv = np.unique(cj, return_inverse=True)
        # A pair that is not allowed costs more than any set of allowed ones, so the assignment first maximises
        # the number of allowed pairs, then minimises their total distance.
        big = radius * (min(len(rows), len(cols)) + 1) + 1.0
        cost = np.full((len(rows), len(cols)), big)
        cost[ri, cj_inv] = cd
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] < big
        out_p.append(rows[r[ok]]), out_t.append(cols[c[ok]]), out_d.append(cost[r[ok], c[ok]])
    return np.concatenate(out_p), np.concatenate(out_t), np.concatenate(out_d)


# -- ranked matching and average precision -------------------------------------------------------------------------

PairFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _ranked_true_positives(csr: tuple[np.ndarray, np.ndarray], order: np.ndarray, n_true: int) -> np.ndarray:
    """Kuhn's algorithm with picks added in ``order``: flag the picks that enlarge the maximum matching.

    ``csr = (indptr, indices)`` lists, for each pick, the truths it may be matched to.
    """
    indptr, indices = csr
    n_pred = len(indptr) - 1
    ptr = indptr.tolist()
    adj = indices.tolist()
    owner = [-1] * n_true  # pick matched to each truth
    mate = [-1] * n_pred  # truth matched to each pick
    # Truths seen by a failed search cannot lead to a free truth while the matching is unchanged, so they stay
    # marked until the next successful augmentation (the usual Kuhn speed-up).
    dead = [False] * n_true
    dead_list: list[int] = []
    is_tp = np.zeros(n_pred, dtype=bool)
    for p in order.tolist():
        a, b = ptr[p], ptr[p + 1]
        free = -1
        for k in range(a, b):  # fast path: a free truth next to p
            if owner[adj[k]] < 0:
                free = adj[k]
                break
        if free < 0 and a < b:
            via: dict[int, int] = {}  # truth -> pick it was reached from
            stack = [[p, a]]
            while stack and free < 0:
                top = stack[-1]
                q, k = top
                end = ptr[q + 1]
                pushed = False
                while k < end:
                    t = adj[k]
                    k += 1
                    if t in via or dead[t]:
                        continue
                    via[t] = q
                    if owner[t] < 0:
                        free = t
                        break
                    top[1] = k
                    nxt = owner[t]
                    stack.append([nxt, ptr[nxt]])
                    pushed = True
                    break
                if free < 0 and not pushed:
                    stack.pop()
            if free < 0:
                for t in via:
                    dead[t] = True
                dead_list.extend(via)
            else:
                t = free
                while True:  # flip the alternating path back to p
                    q = via[t]
                    old = mate[q]
                    owner[t] = q
                    mate[q] = t
                    if q == p:
                        break
                    t = old
        elif free >= 0:
            owner[free] = p
            mate[p] = free
        if free >= 0:
            is_tp[p] = True
            for t in dead_list:
                dead[t] = False
            dead_list = []
    return is_tp


def _csr(n_pred: int, pi: np.ndarray, tj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((tj, pi))
    pi, tj = pi[order], tj[order]
    indptr = np.zeros(n_pred + 1, dtype=np.int64)
    np.add.at(indptr, pi + 1, 1)
    return np.cumsum(indptr), tj


def _check_lists(preds, scores, truths) -> tuple[list, list, list]:
    preds, truths = list(preds), list(truths)
    scores = [None] * len(preds) if scores is None else list(scores)
    if not (len(preds) == len(scores) == len(truths)):
        raise ValueError(f"picking metrics: {len(preds)} pick sets, {len(scores)} score sets, "
                         f"{len(truths)} truth sets (one of each per micrograph)")
    P, S, T = [], [], []
    for k, (p, s, t) in enumerate(zip(preds, scores, truths)):
        p = _as_xy(p, f"picks of micrograph {k}")
        t = _as_xy(t, f"truths of micrograph {k}")
        s = np.ones(len(p)) if s is None else np.asarray(s, dtype=np.float64).reshape(-1)
        if len(s) != len(p):
            raise ValueError(f"micrograph {k}: {len(s)} scores for {len(p)} picks")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"micrograph {k}: scores must be finite")
        P.append(p), S.append(s), T.append(t)
    return P, S, T


def _distance_pairs(radius: float) -> PairFn:
    def pairs(p, t):
        i, j, _ = _pairs_within(p, t, radius)
        return i, j
    return pairs


def _box_iou_pairs(box: float, iou: float) -> PairFn:
    def pairs(p, t):
        if len(p) == 0 or len(t) == 0:
            e = np.zeros(0, dtype=np.int64)
            return e, e
        sdm = cKDTree(p).sparse_distance_matrix(cKDTree(t), box, p=np.inf, output_type="ndarray")
        i, j = sdm["i"].astype(np.int64), sdm["j"].astype(np.int64)
        d = p[i] - t[j]
        inter = np.clip(box - np.abs(d[:, 0]), 0, None) * np.clip(box - np.abs(d[:, 1]), 0, None)
        ok = inter / (2 * box * box - inter) >= iou - 1e-12
        return i[ok], j[ok]
    return pairs


@dataclass(frozen=True)
class PRCurve:
    """Precision/recall/F1 at every distinct score threshold, thresholds descending; ``n_pred[k]`` picks have
    score >= ``thresholds[k]`` and ``n_matched[k]`` of them are matched (maximum one-to-one matching)."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    n_pred: np.ndarray
    n_matched: np.ndarray
    n_true: int

    @property
    def ap(self) -> float:
        """Average precision: Σ P · ΔR over the thresholds (non-interpolated)."""
        if self.n_true == 0 or len(self.thresholds) == 0:
            return 0.0
        dr = np.diff(np.r_[0.0, self.recall])
        return float(np.sum(self.precision * dr))

    def fbeta(self, beta: float) -> np.ndarray:
        b2 = beta * beta
        den = b2 * self.precision + self.recall
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (1 + b2) * self.precision * self.recall / den
        return np.where(den > 0, out, 0.0)


def _curve(P, S, T, pair_fn: PairFn) -> PRCurve:
    n_true = int(sum(len(t) for t in T))
    pick_off = np.cumsum([0] + [len(p) for p in P])
    true_off = np.cumsum([0] + [len(t) for t in T])
    pis, tjs = [], []
    for k, (p, t) in enumerate(zip(P, T)):
        i, j = pair_fn(p, t)
        pis.append(i + pick_off[k]), tjs.append(j + true_off[k])
    n_pred = int(pick_off[-1])
    scores = np.concatenate(S) if S else np.zeros(0)
    if n_pred == 0:
        z = np.zeros(0)
        return PRCurve(z, z, z, z, np.zeros(0, np.int64), np.zeros(0, np.int64), n_true)
    pi = np.concatenate(pis) if pis else np.zeros(0, np.int64)
    tj = np.concatenate(tjs) if tjs else np.zeros(0, np.int64)
    csr = _csr(n_pred, pi.astype(np.int64), tj.astype(np.int64))
    order = np.argsort(-scores, kind="stable")
    tp = _ranked_true_positives(csr, order, max(n_true, 1))
    s_sorted = scores[order]
    ctp = np.cumsum(tp[order])
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])  # last pick of each tie group
    n_at = last + 1
    matched = ctp[last]
    precision = matched / n_at
    recall = matched / n_true if n_true else np.zeros(len(last))
    den = precision + recall
    f1 = np.where(den > 0, 2 * precision * recall / np.where(den > 0, den, 1), 0.0)
    return PRCurve(s_sorted[last], precision, recall, f1, n_at.astype(np.int64), matched.astype(np.int64), n_true)


def pr_curve(preds: Sequence, scores: Sequence | None, truths: Sequence, radius: float) -> PRCurve:
    """Pooled precision/recall/F1 at each distinct score (see the module docstring for the matching rule).

    ``preds[i]`` (N_i, 2), ``scores[i]`` (N_i,), ``truths[i]`` (M_i, 2), one entry per micrograph; ``scores=None``
    means every pick scores 1 (one threshold)."""
    P, S, T = _check_lists(preds, scores, truths)
    return _curve(P, S, T, _distance_pairs(radius))


@dataclass(frozen=True)
class PickingMetrics:
    """Pooled picking accuracy. ``precision``/``recall``/``f1``/``n_*``/``mean_distance`` count the picks with
    score >= threshold; ``ap`` ranks all picks by score."""

    precision: float
    recall: float
    f1: float
    ap: float
    n_pred: int
    n_true: int
    n_matched: int
    mean_distance: float  # mean distance (px) of matched pairs; NaN when none
    radius: float
    threshold: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def picking_metrics(preds: Sequence, scores: Sequence | None, truths: Sequence, radius: float,
                    threshold: float | None = None) -> PickingMetrics:
    """Precision, recall, F1 (picks with score >= ``threshold``; all picks when None), AP over all ranked picks,
    and the mean matched distance, pooled over micrographs; one-to-one matching within ``radius``."""
    P, S, T = _check_lists(preds, scores, truths)
    ap = _curve(P, S, T, _distance_pairs(radius)).ap
    n_pred = n_matched = 0
    dist_sum = 0.0
    for p, s, t in zip(P, S, T):
        keep = np.ones(len(p), bool) if threshold is None else s >= threshold
        _, _, d = match_centres(p[keep], t, radius)
        n_pred += int(keep.sum())
        n_matched += len(d)
        dist_sum += float(d.sum())
    n_true = int(sum(len(t) for t in T))
    prec, rec = _ratio(n_matched, n_pred), _ratio(n_matched, n_true)
    f1 = _ratio(2 * prec * rec, prec + rec)
    mean_d = dist_sum / n_matched if n_matched else float("nan")
    return PickingMetrics(prec, rec, f1, ap, n_pred, n_true, n_matched, mean_d, float(radius),
                          None if threshold is None else float(threshold))


def box_map(preds: Sequence, scores: Sequence | None, truths: Sequence, box_px: float,
            iou_thresholds: Sequence[float] | None = None) -> dict[str, float]:
    """The paper's box mAP: square boxes of side ``box_px`` (the particle diameter) around each centre, a pick
    matches a truth when box IoU >= t, AP (as above, real scores, pooled) averaged over t = 0.50, 0.55, ..., 0.95.

    Returns ``{"map": mean, "ap@0.50": ..., ...}``. For equal squares IoU >= 0.5 means an offset of at most
    box/3 along each axis. Unlike the original (constant scores, per-micrograph VOC AP) the ranking is real.
    """
    if box_px <= 0:
        raise ValueError(f"box_map: box size must be > 0, got {box_px}")
    P, S, T = _check_lists(preds, scores, truths)
    ts = np.round(np.arange(0.5, 0.951, 0.05), 2) if iou_thresholds is None else np.asarray(iou_thresholds, float)
    out = {}
    for t in ts:
        out[f"ap@{t:.2f}"] = _curve(P, S, T, _box_iou_pairs(float(box_px), float(t))).ap
    out = {"map": float(np.mean(list(out.values()))) if out else 0.0, **out}
    return out
