"""Self-training's pseudo-labels: confident unpicked particles become positives, uncertain ones are ignored, the
user's picks stay as they were."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from crisp_ext.centres.postprocess import pick_centres
from crisp_ext.centres.select import Selection
from crisp_ext.config import PickerConfig
from crisp_ext.labels import make_labels
from crisp_ext.picking import centre_options
from crisp_ext.pseudo_labels import confident_threshold, pseudo_labelled, unpicked_micrographs
from crisp_ext.train import LabeledImage

D = 16.0


class MapAsLogits(nn.Module):
    """Stand-in network: the image is the logit map, on both output channels."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.cat([x, x], dim=1) + self.dummy


def _scene():
    """Particles on a grid, the logit map peaking at each: strong (+6) where the picker is sure, weak (+0.2)
    elsewhere; the user picked half of the strong ones."""
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float64)
    strong = np.array([[24.0, 24.0], [24.0, 64.0], [64.0, 24.0], [64.0, 64.0], [104.0, 24.0], [104.0, 64.0]])
    weak = np.array([[24.0, 104.0], [64.0, 104.0]])
    logits = np.full((128, 128), -6.0)
    for pts, height in ((strong, 12.0), (weak, 6.2)):
        for x, y in pts:
            logits = np.maximum(logits, -6.0 + height * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * (D / 5) ** 2)))
    return logits.astype(np.float32), strong, weak


def _setup():
    cfg = PickerConfig().updated({"particle.diameter_px": D, "predict.tile": 64, "predict.overlap": 16,
                                  "predict.bf16": False, "centres.map": "segmentation", "centres.edge": "keep"})
    sel = Selection("nms", {"sigma": 0.0, "overlap": 0.0}, 0.5, "f1", D, 0.5 * D, "keep", D, 0.5 * D, 1, [], 0.0)
    return cfg, sel


def test_confident_picks_become_positives_and_uncertain_ones_are_ignored():
    logits, strong, weak = _scene()
    cfg, sel = _setup()
    picked = strong[::2]
    item = LabeledImage(image=logits, labels=make_labels(logits.shape, picked, D, cfg.labels), truth_xy=picked)
    out, added = pseudo_labelled(MapAsLogits(), item, cfg, cfg.labels, D, sel, threshold=0.3, high=0.9)
    assert added == 3  # the three strong particles the user left out
    r = int(0.5 * D) - 1
    for x, y in strong:
        assert out.labels.target[int(y), int(x)] == 1 and out.labels.weight[int(y), int(x)] == 1
        assert out.labels.centre[int(y), int(x)] == pytest.approx(1.0, abs=0.05)
    for x, y in weak:  # picked above the threshold but not confidently: neither particle nor background
        assert out.labels.target[int(y), int(x)] == 0
        assert (out.labels.weight[int(y) - r:int(y) + r, int(x) - r:int(x) + r] == 0).mean() > 0.5
    assert out.labels.weight[5, 100] == 1 and out.labels.target[5, 100] == 0  # plain background stays
    assert len(out.truth_xy) == 6
    np.testing.assert_array_equal(item.labels.target, make_labels(logits.shape, picked, D, cfg.labels).target)


def test_a_micrograph_without_picks_gets_labels_from_the_confident_picks_alone():
    logits, strong, _ = _scene()
    cfg, sel = _setup()
    out, added = pseudo_labelled(MapAsLogits(), LabeledImage(image=logits, labels=None), cfg, cfg.labels, D, sel,
                                 threshold=0.3, high=0.9)
    assert added == len(strong)
    assert out.labels.centre is not None and out.labels.target.shape == logits.shape


def test_confident_threshold_is_the_typical_score_of_validation_picks_the_user_agrees_with():
    logits, strong, weak = _scene()
    cfg, sel = _setup()
    picks = [pick_centres(1 / (1 + np.exp(-logits)), D, sel.finder, sel.params, 0.3, **centre_options(cfg, D))]
    assert len(picks[0]) == len(strong) + len(weak)
    high = confident_threshold(picks, [strong], 0.5 * D, 0.3)  # the weak peaks are not the user's picks
    weak_score = 1 / (1 + np.exp(-0.2))
    assert weak_score < high <= 1 / (1 + np.exp(-6.0))
    assert confident_threshold(picks, [np.array([[5.0, 5.0]])], 0.5 * D, 0.3) is None


def test_unpicked_micrographs_are_a_seeded_choice_in_order():
    ids = [f"m{i}" for i in range(10)]
    got = unpicked_micrographs(ids, {"m0", "m1"}, 3, seed=4)
    assert len(got) == 3 and not {"m0", "m1"} & set(got) and got == sorted(got, key=ids.index)
    assert got == unpicked_micrographs(ids, {"m0", "m1"}, 3, seed=4)
    assert unpicked_micrographs(ids, set(ids), 3, seed=4) == []


def test_self_training_runs_in_the_pipeline_and_keeps_the_users_validation_picks(tmp_path):
    """Also: the refinement width chosen on the validation micrographs (centres.refine = auto)."""
    from crisp_ext.io.mrc import write_mrc
    from crisp_ext.pipeline import prepare_picker
    from crisp_ext.simulate import simulate_micrograph
    from crisp_ext.types import Micrograph, Particles

    from test_train import tiny_config

    mics, parts = [], []
    for i in range(5):
        sim = simulate_micrograph((96, 96), n_particles=8, diameter_px=12.0, snr=2.0, seed=40 + i)
        path = tmp_path / f"m{i}.mrc"
        write_mrc(path, sim.image, pixel_size=1.0)
        mics.append(Micrograph(id=f"m{i}", path=path))
        if i < 3:  # picks on three micrographs, a quarter of the particles left out on the training ones
            keep = sim.centres if i == 2 else sim.centres[: max(1, 3 * len(sim.centres) // 4)]
            parts.append(Particles.for_one(f"m{i}", keep))
    cfg = tiny_config(epochs=15).updated({"particle.diameter_px": 12.0, "preprocess.target_diameter_px": 12.0,
                                          "train.self_training": 1, "train.patches_per_micrograph": 8})
    lines = []
    picker = prepare_picker(mics, cfg, work_dir=tmp_path / "work", particles=Particles.concat(parts),
                            train_ids=["m0", "m1"], val_ids=["m2"], progress=lambda e: lines.append(e.line()))
    said = [ln for ln in lines if "self-training round 1" in ln]
    assert len(said) == 1 and "added on 2 training and 2 unpicked micrograph(s)" in said[0], lines
    assert (tmp_path / "work" / "model" / "training_self1" / "history.csv").is_file()
    assert picker.validation["micrographs"] == ["m2"] and picker.validation["picking"]["n_true"] == 8
    assert (picker.model_dir / "model.json").is_file()
    # centres.refine = auto: a width chosen on the validation micrographs, saved, and used by a loaded model
    from crisp_ext.picking import REFINE_CHOICES

    assert picker.config.centres.refine in REFINE_CHOICES
    assert any("refinement 0:" in ln for ln in lines) and any("refinement 0.25:" in ln for ln in lines)
    loaded = prepare_picker(mics, PickerConfig().updated({"train.device": "cpu", "train.threads": 1}),
                            work_dir=tmp_path / "again", model_dir=picker.model_dir)
    assert loaded.config.centres.refine == picker.config.centres.refine
