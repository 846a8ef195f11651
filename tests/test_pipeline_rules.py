"""The pipeline's data-driven rules: the edge rule and edge margin chosen from the curated picks, the training-set
sanity check; its steady-state picking figure."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from crisp_ext.centres.base import CentreSet
from crisp_ext.config import ConfigError, PickerConfig
from crisp_ext.edges import choose_edge_rule, learn_edge_margin
from crisp_ext.errors import InputError
from crisp_ext.input_checks import chance_f1, check_training_picks, training_set_warnings, validation_warnings
from crisp_ext.io.mrc import write_mrc
from crisp_ext.picking import centre_options
from crisp_ext.pipeline import _picking_config, choose_split, steady_state
from crisp_ext.types import Micrograph, Particles


def _item(xy, shape=(200, 300)):
    return SimpleNamespace(image=np.zeros(shape, np.float32), truth_xy=np.asarray(xy, float).reshape(-1, 2))


def test_edge_rule_keeps_when_the_curators_picked_near_the_edge():
    rng = np.random.default_rng(0)
    uniform = np.stack([rng.uniform(0, 300, 400), rng.uniform(0, 200, 400)], 1)  # picks everywhere, edges included
    inner = uniform[(uniform[:, 0] > 12) & (uniform[:, 0] < 288) & (uniform[:, 1] > 12) & (uniform[:, 1] < 188)]
    rule, why = choose_edge_rule([_item(uniform)], [24.0], 1.0)
    assert rule == "keep" and "edge" in why
    assert choose_edge_rule([_item(inner)], [24.0], 1.0)[0] == "drop"
    assert choose_edge_rule([_item(np.zeros((0, 2)))], [24.0], 1.0)[0] == "drop"


def _uniform(n, shape, margin, rng):
    """``n`` picks uniform over a micrograph of ``shape`` (ny, nx), none nearer than ``margin`` to its edge."""
    ny, nx = shape
    return np.stack([rng.uniform(margin, nx - margin, n), rng.uniform(margin, ny - margin, n)], 1)


def test_edge_margin_is_the_one_the_curators_kept():
    rng = np.random.default_rng(1)
    shape, d = (400, 500), 20.0
    kept = [_item(_uniform(300, shape, 1.2 * d, rng), shape) for _ in range(3)]  # as EMPIAR-10017's expert picks
    margin, why = learn_edge_margin(kept, [d] * 3, 0.5)
    assert 1.2 <= margin < 1.25 and "1.2" in why and "dropped" in why
    # a stray pick at the very edge does not hide it
    strays = [_item(np.vstack([kept[0].truth_xy, [[3.0, 200.0]]]), shape)] + kept[1:]
    assert 1.2 <= learn_edge_margin(strays, [d] * 3, 0.5)[0] < 1.25
    # picks up to the edge, or a margin no wider than the edge rule's half box: nothing more
    assert learn_edge_margin([_item(_uniform(900, shape, 0.0, rng), shape)], [d], 0.5)[0] == 0.0
    assert learn_edge_margin([_item(_uniform(900, shape, 0.4 * d, rng), shape)], [d], 0.5)[0] == 0.0
    assert learn_edge_margin([_item(_uniform(900, shape, 0.55 * d, rng), shape)], [d], 0.5)[0] == 0.0  # about the same
    # an empty band wider than two diameters: two
    middle = [_item(_uniform(900, shape, 3.0 * d, rng), shape)]
    assert learn_edge_margin(middle, [d], 0.5)[0] == 2.0
    # too few picks to tell a habit from chance (fewer than 10 expected inside the margin)
    few = [_item(_uniform(12, shape, 1.2 * d, rng), shape)]
    margin, why = learn_edge_margin(few, [d], 0.5)
    assert margin == 0.0 and "none beyond the edge rule" in why
    assert learn_edge_margin([_item(np.zeros((0, 2)), shape)], [d], 0.5)[0] == 0.0


def test_edge_margin_drops_picks_nearer_the_edge():
    from crisp_ext.centres.postprocess import apply_edge

    d = 20.0
    picks = CentreSet(np.array([[5.0, 100.0], [15.0, 100.0], [30.0, 100.0], [100.0, 100.0]]), np.ones(4))
    cfg = PickerConfig().updated({"centres.edge": "drop", "centres.edge_margin": 1.2})
    opts = centre_options(cfg, d)
    assert opts["edge"] == "drop" and opts["box_px"] == pytest.approx(48.0)
    assert apply_edge(picks, (200, 200), opts["box_px"], opts["edge"]).xy[:, 0].tolist() == [30.0, 100.0]
    # a margin narrower than half a box changes nothing; with the keep rule a margin still drops
    assert centre_options(cfg.updated({"centres.edge_margin": 0.3}), d)["box_px"] == pytest.approx(20.0)
    keep = centre_options(cfg.updated({"centres.edge": "keep", "centres.edge_margin": 0.5}), d)
    assert keep["edge"] == "drop" and keep["box_px"] == pytest.approx(20.0)
    assert centre_options(cfg.updated({"centres.edge": "keep", "centres.edge_margin": 0.0}), d)["edge"] == "keep"
    # not yet chosen (a model saved before the margin existed): none
    assert centre_options(cfg.updated({"centres.edge_margin": "auto"}), d)["box_px"] == pytest.approx(20.0)
    with pytest.raises(ConfigError, match="centres.edge_margin.*auto or a distance"):
        cfg.updated({"centres.edge_margin": -1})


def test_a_loaded_model_keeps_its_edge_margin_unless_given():
    saved = PickerConfig().updated({"centres.edge": "drop", "centres.edge_margin": 1.19})
    assert _picking_config(saved, PickerConfig(), {}).centres.edge_margin == 1.19
    given = PickerConfig().updated({"centres.edge_margin": 0.0})
    assert _picking_config(saved, given, {}).centres.edge_margin == 0.0
    assert _picking_config(saved, given.updated({"centres.threshold": 0.3}), {}).centres.edge_margin == 0.0
    assert _picking_config(saved, given.updated({"centres.map": "centre"}), {}).centres.map == "centre"
    assert saved.centres.edge_margin == 1.19 and saved.centres.map == "auto"  # the saved config is left as it was
    older = PickerConfig().updated({"centres.edge": "drop"})  # saved before the margin was learned
    assert centre_options(_picking_config(older, PickerConfig(), {}), 20.0)["box_px"] == pytest.approx(20.0)


def _mics(tmp_path, n=2, shape=(100, 120)):
    out = []
    for i in range(n):
        path = write_mrc(tmp_path / f"m{i}.mrc", np.zeros(shape, np.float32), pixel_size=2.0)
        out.append(Micrograph(id=f"m{i}", path=path))
    return out


def test_training_picks_outside_their_micrograph(tmp_path):
    mics = _mics(tmp_path)
    cfg = PickerConfig().updated({"particle.diameter_px": 10.0})
    events = []
    inside = Particles.for_one("m0", [[10, 10], [50, 50], [110, 90]])
    assert len(check_training_picks(mics, inside, cfg, events.append)) == 3
    some = Particles.concat([inside, Particles.for_one("m1", [[400, 20]])])  # one of four outside
    kept = check_training_picks(mics, some, cfg, events.append)
    assert len(kept) == 3 and any("1 of 4 training picks lie outside" in e.message for e in events)
    binned = Particles.for_one("m0", [[250, 30], [300, 180], [60, 40]])  # coordinates of a 2x larger micrograph
    with pytest.raises(InputError, match="2 of 3 training picks lie outside.*binning"):
        check_training_picks(mics, binned, cfg)


def test_training_picks_repeated_are_used_once_and_overlapping_ones_refused(tmp_path):
    mics = _mics(tmp_path, shape=(400, 400))
    cfg = PickerConfig().updated({"particle.diameter_px": 20.0})
    grid = np.stack(np.meshgrid(np.arange(30, 380, 40.0), np.arange(30, 380, 40.0)), -1).reshape(-1, 2)  # 2 D apart
    events = []
    assert len(check_training_picks(mics, Particles.for_one("m0", grid), cfg, events.append)) == len(grid)
    assert not any(e.stage == "warning" for e in events)
    twice = Particles.concat([Particles.for_one("m0", grid), Particles.for_one("m0", grid + 1.0)])  # 0.07 D off
    kept = check_training_picks(mics, twice, cfg, events.append)
    assert len(kept) == len(grid) and np.array_equal(kept.xy, grid)  # the first of each pair
    assert any("81 training pick(s) repeat another" in e.message and "used once" in e.message for e in events)
    for diameter, refused in ((60.0, False), (100.0, False), (150.0, True)):  # spacing 0.67, 0.4, 0.27 D
        strict = cfg.updated({"particle.diameter_px": diameter})
        if refused:
            with pytest.raises(InputError, match="median 40 px from their nearest neighbour, 0.27 of the particle "
                                                 "diameter .150 px.*too large"):
                check_training_picks(mics, Particles.for_one("m0", grid), strict)
        else:
            assert len(check_training_picks(mics, Particles.for_one("m0", grid), strict)) == len(grid)
    both = Particles.concat([Particles.for_one("m0", grid), Particles.for_one("m1", grid)])
    events.clear()
    check_training_picks(mics, both, cfg, events.append)
    assert not any(e.stage == "warning" for e in events)
    binned = Particles.concat([Particles.for_one("m0", grid / 2), Particles.for_one("m1", grid / 2)])
    check_training_picks(mics, binned, cfg.updated({"particle.diameter_px": 10.0}), events.append)
    assert any("all 162 training picks on 2 micrographs lie in their top-left quarter" in e.message
               and "binned by 2" in e.message for e in events)
    few = Particles.for_one("m0", grid[:10])  # too few picks to judge their spacing
    assert len(check_training_picks(mics, few, cfg.updated({"particle.diameter_px": 150.0}))) == 10


def test_chance_is_what_the_picks_turned_about_the_centre_score():
    rng = np.random.default_rng(0)
    sparse = [rng.uniform(20, 380, (20, 2))]  # 20 particles at random on a 400² map: their turns rarely meet one
    assert chance_f1(sparse, [(400, 400)], sparse, radius=5) < 0.2
    grid = [np.stack(np.meshgrid(np.arange(10, 400, 20.0), np.arange(10, 300, 20.0)), -1).reshape(-1, 2)]
    assert chance_f1(grid, [(301, 401)], grid, radius=5) == pytest.approx(1.0)  # the grid is its own turn
    assert chance_f1([np.zeros((0, 2))], [(300, 400)], grid, radius=5) == 0


def test_a_picker_no_better_than_chance_is_warned_about():
    from crisp_ext.metrics import picking_metrics

    truth = [np.stack([np.arange(10, 410, 20.0), np.full(20, 50.0)], 1)]
    weak = picking_metrics([truth[0][:6]], None, truth, radius=5)  # 6 of 20: F1 0.46
    assert validation_warnings(weak, chance=0.05) == []  # far better than chance
    (line,) = validation_warnings(weak, chance=0.40)  # on a crowded micrograph picks anywhere would do as well
    assert "no better on the validation micrographs than chance (F1 0.46; its picks turned 180° score 0.40)" in line
    assert "other edge" in line and "diameter" in line
    # a curator who picked a tenth of the particles: precision 0.1 is no sign of trouble
    sparse = picking_metrics([np.vstack([truth[0], truth[0] + [0, 100]] * 5)], None, truth, radius=5)
    assert sparse.precision == pytest.approx(0.1) and validation_warnings(sparse, chance=0.0) == []
    assert validation_warnings(picking_metrics([truth[0][:1]], None, [truth[0][:10]], radius=5), chance=0.5) == []


def test_a_weak_curated_set_is_warned_about():
    train, val = choose_split(["m0"], 16, 6, 0)  # one micrograph with picks serves both roles
    assert train == val == ["m0"]
    few, itself, one = training_set_warnings(6, train, val)
    assert "only 6 curated picks" in few and "also trained on" in itself and "one micrograph only" in one
    train, val = choose_split([f"m{i}" for i in range(8)], 16, 6, 0)
    assert training_set_warnings(400, train, val) == []
    assert len(training_set_warnings(400, ["m0", "m1"], ["m1"])) == 1  # the same one given for both


def test_steady_state_adds_up_the_workers_rates():
    # one process: 5 micrographs picked 1 s apart after a long start-up
    assert steady_state([10.0, 11.0, 12.0, 13.0, 14.0], []) == {"pick_steady_s_per_mic": 1.0}
    # two workers, 2 s per micrograph each, the second up 6 s after the first and idle at the end: together 1 s per
    # micrograph once both run; the span also counts the late start and the tail
    spans = [("a", 4, 0.0, 6.0), ("a", 4, 8.0, 14.0), ("b", 4, 6.0, 12.0)]
    figures = steady_state([0.0] * 12, spans)
    assert figures["pick_steady_s_per_mic"] == pytest.approx(1.0 / (7 / 14 + 3 / 6))
    assert figures["pick_span_s_per_mic"] == pytest.approx(14.0 / 11)
    assert steady_state([0.0], spans) == {}
