"""Pixel and picking metrics: hand cases, brute-force agreement, and the ranking rule of average precision."""

from __future__ import annotations

import numpy as np
import pytest

from crisp_ext.metrics import box_map, match_centres, picking_metrics, pixel_metrics, pooled_pixel_metrics, pr_curve

# -- pixel metrics ---------------------------------------------------------------------------------------------------

def test_pixel_metrics_hand_case():
    pred = np.array([[1, 1, 0, 0]], bool)
    true = np.array([[1, 0, 1, 0]], bool)
    m = pixel_metrics(pred, true)
    assert m == pytest.approx({"iou": 1 / 3, "precision": 0.5, "recall": 0.5, "accuracy": 0.5, "f1": 0.5})
    ign = np.array([[0, 1, 0, 0]], bool)  # ignore the false positive
    m = pixel_metrics(pred, true, ignore=ign)
    assert m == pytest.approx({"iou": 0.5, "precision": 1.0, "recall": 0.5, "accuracy": 2 / 3, "f1": 2 / 3})


def test_pooled_pixel_metrics_pool_counts_not_ratios():
    a_pred, a_true = np.ones((2, 2), bool), np.ones((2, 2), bool)  # 4 TP
    b_pred, b_true = np.array([[1, 0]], bool), np.array([[0, 1]], bool)  # 1 FP, 1 FN
    m = pooled_pixel_metrics([a_pred, b_pred], [a_true, b_true])
    assert m["iou"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


# -- brute force helpers ---------------------------------------------------------------------------------------------

def _all_matchings(ok: np.ndarray):
    """Every one-to-one partial matching of rows to columns allowed by ``ok``, as lists of (row, col)."""
    n, m = ok.shape

    def rec(i, used):
        if i == n:
            yield []
            return
        yield from rec(i + 1, used)
        for j in range(m):
            if ok[i, j] and j not in used:
                for rest in rec(i + 1, used | {j}):
                    yield [(i, j)] + rest

    yield from rec(0, frozenset())


def _brute(pred, true, radius):
    """(largest matching size, least total distance among the largest matchings)."""
    if len(pred) == 0 or len(true) == 0:
        return 0, 0.0
    dist = np.linalg.norm(pred[:, None] - true[None], axis=2)
    best = (0, 0.0)
    for mt in _all_matchings(dist <= radius):
        total = sum(dist[i, j] for i, j in mt)
        if len(mt) > best[0] or (len(mt) == best[0] and total < best[1]):
            best = (len(mt), total)
    return best


def test_hungarian_matches_brute_force_on_small_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(150):
        n, m = rng.integers(0, 6, size=2)
        pred = rng.uniform(0, 12, (n, 2))
        true = rng.uniform(0, 12, (m, 2))
        radius = rng.uniform(1.5, 5)
        pi, ti, d = match_centres(pred, true, radius)
        size, total = _brute(pred, true, radius)
        assert len(pi) == size
        assert d.sum() == pytest.approx(total, abs=1e-9)
        assert len(set(pi.tolist())) == len(pi) and len(set(ti.tolist())) == len(ti)
        assert np.all(np.linalg.norm(pred[pi] - true[ti], axis=1) <= radius + 1e-12)


def test_ranked_counts_equal_brute_force_at_every_threshold():
    rng = np.random.default_rng(1)
    for _ in range(80):
        n, m = rng.integers(1, 7), rng.integers(0, 6)
        pred = rng.uniform(0, 10, (n, 2))
        true = rng.uniform(0, 10, (m, 2))
        score = rng.permutation(n).astype(float)
        radius = rng.uniform(1.5, 4)
        curve = pr_curve([pred], [score], [true], radius)
        order = np.argsort(-score)
        for k in range(n):
            assert curve.n_pred[k] == k + 1
            assert curve.n_matched[k] == _brute(pred[order[: k + 1]], true, radius)[0]
        thr = float(np.median(score))
        pm = picking_metrics([pred], [score], [true], radius, threshold=thr)
        keep = score >= thr
        assert pm.n_matched == _brute(pred[keep], true, radius)[0]
        assert pm.n_pred == keep.sum() and pm.n_true == m


# -- average precision ---------------------------------------------------------------------------------------------

def test_ap_is_one_for_perfect_ranking_and_lower_when_false_picks_outrank():
    true = np.array([[10.0, 10], [30, 10], [50, 10]])
    false = np.array([[90.0, 90], [70, 90]])
    pred = np.vstack([true + 0.5, false])
    good = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    assert picking_metrics([pred], [good], [true], 5).ap == pytest.approx(1.0)
    bad = np.array([0.5, 0.4, 0.3, 0.9, 0.8])
    assert picking_metrics([pred], [bad], [true], 5).ap == pytest.approx((1 / 3) * (1 / 3 + 2 / 4 + 3 / 5))
    const = np.ones(5)
    m = picking_metrics([pred], [const], [true], 5)
    assert m.ap == pytest.approx(m.precision * m.recall) and m.ap < 1


def test_ap_hand_value_and_threshold_metrics():
    true = np.array([[0.0, 0], [20, 0], [40, 0]])
    pred = np.array([[1.0, 0], [80, 0], [21, 0]])  # TP, FP, TP
    score = np.array([0.9, 0.8, 0.7])
    m = picking_metrics([pred], [score], [true], 3)
    assert m.ap == pytest.approx(1 * (1 / 3) + (2 / 3) * (1 / 3))
    m = picking_metrics([pred], [score], [true], 3, threshold=0.85)
    assert (m.n_pred, m.n_matched, m.precision, m.recall) == (1, 1, 1.0, pytest.approx(1 / 3))
    assert m.mean_distance == pytest.approx(1.0)
    assert m.f1 == pytest.approx(0.5)


def test_higher_scores_claim_truths_first():
    # Hungarian on all picks would give the truth to the closer, low-scoring pick and count the top pick false.
    true = np.array([[0.0, 0.0]])
    pred = np.array([[3.0, 0.0], [1.0, 0.0]])
    score = np.array([0.9, 0.1])
    c = pr_curve([pred], [score], [true], 5)
    assert list(c.n_matched) == [1, 1]
    assert c.ap == pytest.approx(1.0)


def test_ranked_matching_reroutes_to_keep_the_maximum():
    # The top pick is nearest truth A; the second pick can only take A. Greedy nearest matching would lose it.
    true = np.array([[0.0, 0.0], [8.0, 0.0]])
    pred = np.array([[3.5, 0.0], [-3.0, 0.0]])
    c = pr_curve([pred], [np.array([0.9, 0.5])], [true], 5)
    assert list(c.n_matched) == [1, 2]
    assert c.ap == pytest.approx(1.0)


def test_matching_never_crosses_micrographs_and_ties_form_one_step():
    true = [np.array([[5.0, 5.0]]), np.zeros((0, 2))]
    pred = [np.zeros((0, 2)), np.array([[5.0, 5.0]])]
    m = picking_metrics(pred, [np.zeros(0), np.ones(1)], true, 3)
    assert m.n_matched == 0 and m.precision == 0 and m.recall == 0 and m.ap == 0
    c = pr_curve([np.array([[0.0, 0], [50, 0]])], [np.array([0.5, 0.5])], [np.array([[0.0, 0]])], 2)
    assert len(c.thresholds) == 1 and c.precision[0] == 0.5


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="scores"):
        picking_metrics([np.zeros((2, 2))], [np.zeros(3)], [np.zeros((1, 2))], 1)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        match_centres(np.zeros((3, 3)), np.zeros((1, 2)), 1)
    with pytest.raises(ValueError, match="per micrograph"):
        pr_curve([np.zeros((1, 2))], None, [], 1)


def test_box_map():
    d = 20.0
    true = np.array([[50.0, 50], [150, 50], [50, 150]])
    assert box_map([true], [np.array([3.0, 2, 1])], [true], d)["map"] == pytest.approx(1.0)
    # a quarter-box offset gives IoU 0.75 / 1.25 = 0.6: matched for t = 0.50, 0.55, 0.60 only
    r = box_map([true + [d / 4, 0]], [np.array([3.0, 2, 1])], [true], d)
    assert r["ap@0.50"] == pytest.approx(1.0) and r["ap@0.60"] == pytest.approx(1.0)
    assert r["ap@0.65"] == 0.0
    assert r["map"] == pytest.approx(0.3)
