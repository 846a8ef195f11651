"""Centre finders, post-processing and automatic selection on small synthetic probability maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crisp_ext.centres import (
    FINDERS,
    CentreSet,
    Selection,
    apply_edge,
    deduplicate,
    find_centres,
    get_finder,
    pick_centres,
    select_finder,
)
from crisp_ext.centres.select import choose_threshold, objective_beta
from crisp_ext.metrics import match_centres, pr_curve

D = 20.0  # particle diameter (working px) in these tests


def _centres(n, shape, min_dist, margin, rng):
    """Random centres at least ``min_dist`` apart and ``margin`` from the border."""
    out = []
    for _ in range(5000):
        if len(out) == n:
            break
        p = rng.uniform([margin, margin], [shape[1] - margin, shape[0] - margin])
        if all(np.hypot(*(p - q)) >= min_dist for q in out):
            out.append(p)
    return np.array(out)


def _draw(xy, shape, kind="disk", amp=None, radius=0.4 * D, noise=0.0, seed=0):
    """Probability-like map: soft disks (or Gaussians) at ``xy`` with amplitudes ``amp``, plus smoothed noise."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape, np.float32)
    amp = np.ones(len(xy)) if amp is None else amp
    for (x, y), a in zip(xy, amp):
        r = np.hypot(xx - x, yy - y)
        blob = np.clip(radius + 0.5 - r, 0, 1) if kind == "disk" else np.exp(-0.5 * (r / (radius / 2)) ** 2)
        img = np.maximum(img, a * blob)
    if noise:
        from scipy.ndimage import gaussian_filter

        img = img + noise * gaussian_filter(np.random.default_rng(seed).normal(size=shape), 1.0) * 3
    return np.clip(img, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def isolated():
    rng = np.random.default_rng(3)
    shape = (256, 320)
    xy = _centres(40, shape, 2.0 * D, D, rng)
    xy = xy + rng.uniform(-0.5, 0.5, xy.shape)
    return shape, xy


@pytest.mark.parametrize("kind", ["disk", "gauss"])
@pytest.mark.parametrize("name", ["nms", "trackpy", "morphology"])
def test_each_finder_recovers_isolated_particles(isolated, name, kind):
    shape, xy = isolated
    prob = _draw(xy, shape, kind)
    picks = find_centres(prob, D, name)
    _, ti, _ = match_centres(picks.xy, xy, 2.0)
    assert len(ti) >= 0.95 * len(xy), f"{name} found {len(ti)} of {len(xy)} within 2 px"
    assert len(picks) <= 1.05 * len(xy)
    assert np.all(np.isfinite(picks.score))


@pytest.mark.parametrize("name", ["nms", "trackpy", "morphology"])
def test_scores_follow_particle_strength(isolated, name):
    shape, xy = isolated
    amp = np.linspace(0.55, 1.0, len(xy))
    prob = _draw(xy, shape, "disk", amp=amp)
    picks = find_centres(prob, D, name)
    pi, ti, _ = match_centres(picks.xy, xy, 2.0)
    s = picks.score[pi]
    assert np.ptp(s) > 0.1 * np.max(s)  # not constant
    rank_corr = np.corrcoef(np.argsort(np.argsort(s)), np.argsort(np.argsort(amp[ti])))[0, 1]
    assert rank_corr > 0.9


def test_nms_scores_in_unit_range_and_torch_input_agrees(isolated):
    shape, xy = isolated
    prob = _draw(xy, shape, "disk", noise=0.05)
    a = find_centres(prob, D, "nms")
    b = find_centres(torch.from_numpy(prob), D, "nms")
    assert np.all((a.score >= 0) & (a.score <= 1))
    assert len(a) == len(b)
    np.testing.assert_allclose(a.xy, b.xy, atol=1e-3)


def test_nms_score_map_paths_agree(isolated):
    from crisp_ext.centres.nms import _score_map

    shape, xy = isolated
    p = torch.from_numpy(_draw(xy, shape, "gauss", noise=0.05))
    cpu = _score_map(p, D, 0.12, conv=False)  # scipy (CPU tensors)
    conv = _score_map(p, D, 0.12, conv=True)  # conv2d (what GPU tensors use)
    torch.testing.assert_close(cpu, conv, atol=1e-5, rtol=0)
    flat = torch.ones(40, 40)
    assert float(_score_map(flat, D, 0.12)[20, 20]) == pytest.approx(1.0, abs=1e-5)  # a full window scores 1


def test_morphology_erosion_splits_touching_particles():
    xy = np.array([[40.0, 40.0], [40.0 + 0.9 * D, 40.0]])  # blobs of diameter 0.9 D joined by a 6 px neck
    prob = _draw(xy, (80, 100), "disk", radius=0.45 * D)
    assert len(find_centres(prob, D, "morphology", {"erosion": 0.0})) == 1
    split = find_centres(prob, D, "morphology", {"erosion": 0.4})
    assert len(match_centres(split.xy, xy, 3.0)[0]) == 2


def test_registry_grids_and_parameter_errors():
    assert set(FINDERS) >= {"nms", "trackpy", "morphology"}
    for f in FINDERS.values():
        assert len(f.grid) == 2 and all(k in f.defaults for k in f.grid)
        assert len(f.grid_points()) == np.prod([len(v) for v in f.grid.values()])
    with pytest.raises(ValueError, match="unknown centre finder 'blob'"):
        get_finder("blob")
    with pytest.raises(ValueError, match="no parameter 'sigmaa'"):
        find_centres(np.zeros((32, 32), np.float32), D, "nms", {"sigmaa": 1})


@pytest.mark.parametrize("bad, msg", [
    (np.full((16, 16), np.nan, np.float32), "NaN"),
    (np.zeros((2, 16, 16), np.float32), "2D"),
    (np.full((16, 16), 3.0, np.float32), r"\[0, 1\]"),
])
def test_bad_maps_are_refused(bad, msg):
    for name in ("nms", "trackpy", "morphology"):
        with pytest.raises(ValueError, match=msg):
            find_centres(bad, D, name)


@pytest.mark.parametrize("name", ["nms", "trackpy", "morphology"])
def test_particles_cut_by_the_border_are_found(name):
    xy = np.array([[6.0, 50.0], [50.0, 93.0], [50.0, 50.0]])
    prob = _draw(xy, (100, 100), "disk")
    picks = find_centres(prob, D, name)
    assert len(match_centres(picks.xy, xy, 3.0)[0]) == 3
    assert len(apply_edge(picks, (100, 100), D, "drop")) == 1


def test_empty_map_gives_no_picks():
    for name in ("nms", "trackpy", "morphology"):
        picks = find_centres(np.zeros((64, 64), np.float32), D, name)
        assert len(picks) == 0 and picks.xy.shape == (0, 2)


def test_edge_rule():
    picks = CentreSet(np.array([[5.0, 50], [10.0, 50], [50, 50], [90.0, 50], [95, 50], [50, 99.5]]),
                      np.arange(6.0))
    kept = apply_edge(picks, (100, 100), box_px=20, edge="drop")
    np.testing.assert_array_equal(kept.xy[:, 0], [10, 50, 90])
    clipped = apply_edge(picks, (100, 100), box_px=20, edge="keep")
    assert len(clipped) == 6
    assert np.all((clipped.xy >= 0) & (clipped.xy < 100)) and clipped.xy[5, 1] == 99
    with pytest.raises(ValueError, match="edge"):
        apply_edge(picks, (100, 100), 20, edge="crop")


def test_dedup_keeps_the_higher_score():
    xy = np.array([[0.0, 0], [3, 0], [10, 0], [20, 0], [22, 0]])
    score = np.array([0.2, 0.9, 0.5, 0.4, 0.3])
    out = deduplicate(CentreSet(xy, score), 5.0)
    assert sorted(map(tuple, out.xy)) == [(3, 0), (10, 0), (20, 0)]
    assert list(out.score) == sorted(out.score, reverse=True)
    assert list(deduplicate(CentreSet(xy, score), 5.0).score) == [0.9, 0.5, 0.4]
    assert list(deduplicate(CentreSet(xy, score), 0.0).score) == [0.9, 0.5, 0.4, 0.3, 0.2]  # none removed, by score


def test_pick_centres_applies_edge_dedup_and_threshold(isolated):
    shape, xy = isolated
    amp = np.linspace(0.55, 1.0, len(xy))
    prob = _draw(xy, shape, "disk", amp=amp)
    all_picks = pick_centres(prob, D, "nms")
    thr = float(np.median(all_picks.score))
    high = pick_centres(prob, D, "nms", threshold=thr)
    assert 0 < len(high) < len(all_picks) and np.all(high.score >= thr)
    h = D / 2
    assert np.all((all_picks.xy >= h) & (all_picks.xy <= np.array(shape[::-1]) - h))


def test_objectives_and_threshold_choice():
    assert objective_beta("f1") == 1 and objective_beta("recall") == 2 and objective_beta("fbeta:0.3") == 0.3
    with pytest.raises(ValueError, match="objective"):
        objective_beta("accuracy")
    # 40 validation picks; ours: 36 of them, 2 false, the other 4, then 10 false, scores descending
    true = np.c_[np.arange(40) * 20.0, np.zeros(40)]
    junk = np.c_[1000 + np.arange(12) * 20.0, np.zeros(12)]
    pred = np.r_[true[:36], junk[:2], true[36:], junk[2:]]
    scores = np.linspace(0.99, 0.4, len(pred))
    curve = pr_curve([pred], [scores], [true], 3)
    best = int(np.argmax(curve.f1))
    assert best == 41 and curve.f1[best] == pytest.approx(80 / 82)
    # one match's worth here is 2 / (40 + 42) = 0.024 of F1: one and two more false picks (F1 0.964, 0.952) are
    # within it, a third (0.941) is not, so the threshold goes below the 44th pick
    thr, k = choose_threshold(curve, "f1")
    assert k == 43 and thr == pytest.approx(0.5 * (scores[43] + scores[44]))
    # the same ranking on 100 micrographs: one match is worth 0.00024, the best F1 itself wins
    big = pr_curve([pred] * 100, [scores] * 100, [true] * 100, 3)
    assert choose_threshold(big, "f1")[1] == int(np.argmax(big.f1)) == 41
    # precision-leaning objective: best before the first false pick, which is within one match of it
    f = curve.fbeta(0.2)
    assert int(np.argmax(f)) == 35 and f[36] > f[35] - 1.04 / (0.04 * 40 + 36) > f[37]
    thr2, k2 = choose_threshold(curve, "fbeta:0.2")
    assert k2 == 36 and thr2 == pytest.approx(0.5 * (scores[36] + scores[37]))


@pytest.fixture(scope="module")
def validation_set():
    rng = np.random.default_rng(7)
    shape = (192, 192)
    maps, truths = [], []
    for i in range(3):
        xy = _centres(22, shape, 1.2 * D, D, rng)
        amp = rng.uniform(0.6, 1.0, len(xy))
        fakes = rng.uniform(D, shape[0] - D, (4, 2))  # weak false blobs
        prob = np.maximum(_draw(xy, shape, "disk", amp=amp, noise=0.05, seed=i),
                          _draw(fakes, shape, "disk", amp=np.full(4, 0.3), radius=0.3 * D))
        maps.append(prob)
        truths.append(xy)
    return maps, truths


def test_selection_picks_a_sensible_finder_and_round_trips(validation_set, tmp_path):
    maps, truths = validation_set
    lines = []
    sel = select_finder(maps, truths, D, progress=lines.append)
    assert sel.finder in ("nms", "trackpy", "morphology") and len(lines) == 3
    assert len(sel.candidates) == sum(len(f.grid_points()) for f in FINDERS.values())
    best = sel.best
    assert best.ap == max(c.ap for c in sel.candidates) and best.ap > 0.85
    assert best.f1 > 0.85 and best.threshold == sel.threshold
    assert 0.3 < sel.threshold < 1.0  # the weak fakes (about 0.3) fall below it
    assert any(c.ap < best.ap - 0.05 for c in sel.candidates)  # the grid really varies
    again = Selection.from_dict(json.loads(json.dumps(sel.to_dict())))
    assert again.to_dict() == sel.to_dict()
    path = sel.save(tmp_path / "finder.json")
    assert Selection.load(path).to_dict() == sel.to_dict()
    assert sel.finder in sel.table()
    # the chosen setting reproduces its table row through the picking path
    picks = [pick_centres(m, D, sel.finder, sel.params, sel.threshold) for m in maps]
    n_match = sum(len(match_centres(p.xy, t, sel.match_radius_px)[0]) for p, t in zip(picks, truths))
    assert n_match == best.n_matched and sum(len(p) for p in picks) == best.n_pred


def test_selection_recall_objective_keeps_more_picks(validation_set):
    maps, truths = validation_set
    grids = {"nms": {"sigma": [0.12], "overlap": [0.5]}}
    f1 = select_finder(maps, truths, D, finders=("nms",), grids=grids)
    rec = select_finder(maps, truths, D, finders=("nms",), grids=grids, objective="recall")
    assert rec.threshold <= f1.threshold and rec.best.recall >= f1.best.recall
    fixed = select_finder(maps, truths, D, finders=("nms", "trackpy"), params={"sigma": 0.1, "cell": 0.3})
    nms_rows = [c for c in fixed.candidates if c.finder == "nms"]
    assert len(nms_rows) == 3 and all(c.params["sigma"] == 0.1 and c.params["cell"] == 0.3 for c in nms_rows)
    assert len([c for c in fixed.candidates if c.finder == "trackpy"]) == 9
    with pytest.raises(ValueError, match="'erosion' is not a parameter"):
        select_finder(maps, truths, D, finders=("nms",), params={"erosion": 0.3})
    with pytest.raises(ValueError, match="2 sets of picks"):
        select_finder(maps, truths[:2], D)
    with pytest.raises(ValueError, match="no picks"):
        select_finder(maps[:1], [np.zeros((0, 2))], D)
