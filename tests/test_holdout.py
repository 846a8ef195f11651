"""Validation on a held-out strip when the curated picks lie on one micrograph: the strip is neither trained on nor
labelled in what training sees, its picks are shifted into its own pixels, and the pipeline validates there."""

from __future__ import annotations

import numpy as np
import pytest

from crisp_ext.config import LabelConfig, PickerConfig
from crisp_ext.holdout import MIN_PICKS, hold_out_strip
from crisp_ext.io.mrc import write_mrc
from crisp_ext.labels import make_labels
from crisp_ext.train import LabeledImage
from crisp_ext.types import Micrograph, Particles

D = 16.0


def _item(shape, xy) -> LabeledImage:
    xy = np.asarray(xy, float).reshape(-1, 2)
    labels = make_labels(shape, xy, D, LabelConfig(centre_weight=1.0))
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    return LabeledImage(image=image, labels=labels, name="m0", truth_xy=xy, diameter_px=D)


def _grid(shape, step=24.0):
    ny, nx = shape
    ys, xs = np.meshgrid(np.arange(step / 2, ny, step), np.arange(step / 2, nx, step), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], 1)


@pytest.mark.parametrize("shape", [(400, 240), (240, 400)])
def test_the_strip_is_cut_across_the_longer_side_and_training_sees_none_of_its_particles(shape):
    xy = _grid(shape)
    item = _item(shape, xy)
    strip = hold_out_strip(item, D, band_px=8.0)
    axis = 0 if shape[0] > shape[1] else 1
    along = xy[:, 1 - axis]  # y when the strip is the last rows
    assert strip.axis == axis and strip.start == 300 and strip.gap == 8
    # the validation strip: its image and labels are the micrograph's, its picks shifted to its first row/column
    # and those within the band of the cut left unscored
    sl = np.s_[300:, :] if axis == 0 else np.s_[:, 300:]
    np.testing.assert_array_equal(strip.val.image, item.image[sl])
    np.testing.assert_array_equal(strip.val.labels.centre, item.labels.centre[sl])
    expected = xy[along >= 300 + 8.0].copy()
    expected[:, 1 - axis] -= 300
    np.testing.assert_allclose(np.sort(strip.val.truth_xy, axis=0), np.sort(expected, axis=0))
    # training: everything before the gap, and no label of a held-out particle reaches it
    tsl = np.s_[:292, :] if axis == 0 else np.s_[:, :292]
    np.testing.assert_array_equal(strip.train.image, item.image[tsl])
    held = make_labels(shape, xy[along >= 300], D, LabelConfig(centre_weight=1.0))
    assert held.target[tsl].sum() == 0 and held.centre[tsl].max() < 0.01
    assert held.target[sl].sum() > 0
    kept = make_labels(shape, xy[along < 300], D, LabelConfig(centre_weight=1.0))
    np.testing.assert_array_equal(strip.train.labels.target, kept.target[tsl])
    assert np.all(strip.train.truth_xy[:, 1 - axis] < 292)


def test_no_strip_when_it_would_be_too_narrow_or_hold_too_few_picks():
    assert hold_out_strip(_item((100, 100), _grid((100, 100))), D) is None  # 25 px strip: under two diameters
    few = _grid((400, 240))[:MIN_PICKS]  # every pick in the first rows: none in the strip
    assert hold_out_strip(_item((400, 240), few), D) is None


def test_one_curated_micrograph_trains_on_most_of_it_and_validates_on_the_strip(tmp_path, monkeypatch):
    import crisp_ext.train as train_mod
    from crisp_ext.pipeline import run
    from crisp_ext.simulate import simulate_micrograph

    from cryosparc_scene import TINY

    sim = simulate_micrograph((256, 384), n_particles=90, diameter_px=D, pixel_size=4.0, snr=1.0, seed=5)
    path = write_mrc(tmp_path / "m0.mrc", sim.image, pixel_size=4.0)
    mics = [Micrograph(id="m0", path=path)]
    cfg = PickerConfig().updated({**TINY, "particle.diameter_px": D, "centres.edge": "drop",
                                  "centres.edge_margin": 0.0})
    seen = {}
    real = train_mod.train_model

    def spy(train, val, *args, **kwargs):
        seen["train"], seen["val"] = [it.image.shape for it in train], [len(it.truth_xy) for it in val]
        return real(train, val, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_model", spy)
    events = []
    result = run(mics, cfg, work_dir=tmp_path / "work", particles=Particles.for_one("m0", sim.centres),
                 progress=events.append)
    # the columns 288-384 of the 384 are held out (the longer side), 8 columns of gap
    assert seen["train"] == [(256, 280)]
    in_strip = int((sim.centres[:, 0] >= 288 + 8.0).sum())
    assert seen["val"] == [in_strip] and in_strip >= MIN_PICKS
    assert result.validation["picking"]["n_true"] == in_strip
    assert result.validation["held_out"] == {"axis": "columns", "from_px": 288, "gap_px": 8, "scale": "working"}
    lines = [e.message for e in events if e.message]
    assert any("validating on columns 288-384" in line for line in lines)
    assert not any("also trained on" in line for line in lines)
