"""The pipeline's data-driven rules: the edge rule chosen from the curated picks, the training-set sanity check; its
steady-state picking figure."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from crisp_ext.config import PickerConfig
from crisp_ext.errors import InputError
from crisp_ext.io.mrc import write_mrc
from crisp_ext.pipeline import check_training_picks, choose_edge_rule, steady_state
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
