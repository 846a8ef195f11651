import csv
import json

import numpy as np
import pytest
import torch

from crisp_ext.config import CRFConfig, LabelConfig, ModelConfig, PickerConfig
from crisp_ext.errors import Aborted, InputError
from crisp_ext.labels import make_labels
from crisp_ext.preprocess import normalise
from crisp_ext.simulate import simulate_micrograph
from crisp_ext.train import LabeledImage, _state_copy, configure_threads, resolve_device, train_model


def tiny_config(epochs: int = 3) -> PickerConfig:
    cfg = PickerConfig()
    cfg.model = ModelConfig(arch="unet", encoder="tu-test_resnet", encoder_depth=3, decoder_channels=[16, 8, 8])
    t = cfg.train
    t.epochs, t.patch_size, t.batch_size, t.patches_per_micrograph = epochs, 48, 4, 4
    t.lr, t.threads, t.early_stop_patience, t.device, t.min_patches_per_epoch = 1e-2, 1, 0, "cpu", 0
    cfg.predict.tile, cfg.predict.overlap, cfg.predict.bf16 = 64, 16, False
    return cfg


def synthetic_set(n: int, size: int = 80, seed: int = 0) -> list[LabeledImage]:
    out = []
    for i in range(n):
        sim = simulate_micrograph((size, size), n_particles=8, diameter_px=12.0, snr=2.0, seed=seed + i)
        labels = make_labels(sim.image.shape, sim.centres, 12.0, LabelConfig())
        out.append(LabeledImage(normalise(sim.image), labels, f"mic{i}", sim.centres))
    return out


@pytest.fixture(scope="module")
def data():
    return synthetic_set(3)


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tiny_model_overfits_a_tiny_set(data, tmp_path):
    cfg = tiny_config(epochs=25)
    cfg.train.patches_per_micrograph = 8
    events = []
    result = train_model(data[:2], data[:2], cfg, tmp_path, progress=events.append)
    hist = [r for r in result.history if r["phase"] == "cnn"]
    first, last = np.mean([r["loss"] for r in hist[:3]]), np.mean([r["loss"] for r in hist[-3:]])
    assert last < 0.7 * first
    assert result.best_metric > 0.5 and result.best_metric > hist[0]["val_iou"] + 0.2
    assert not result.model.training
    for name in ("history.csv", "history.json", "training_curve.png", "checkpoint.pt", "best.pt"):
        assert (tmp_path / name).is_file(), name
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert len(rows) == 25 and {"epoch", "loss", "lr", "val_iou", "val_f1"} <= set(rows[0])
    assert json.loads((tmp_path / "history.json").read_text())[-1]["epoch"] == 25
    assert [e.done for e in events if e.total] == list(range(1, 26))
    # the returned model holds the best epoch's weights, which are a copy, not the last epoch's
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["epoch"] == result.best_epoch
    assert _same(_weights(result.model), best["state"])


def test_state_copy_is_a_deep_copy():
    layer = torch.nn.Linear(2, 2)
    saved = _state_copy(layer)
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not torch.equal(saved["weight"], layer.weight)


def test_seeded_runs_are_reproducible(data, tmp_path):
    cfg = tiny_config(epochs=2)
    a = train_model(data[:2], data[2:], cfg, tmp_path / "a")
    b = train_model(data[:2], data[2:], cfg, tmp_path / "b")
    assert _same(_weights(a.model), _weights(b.model))
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    cfg.train.seed = 1
    c = train_model(data[:2], data[2:], cfg, tmp_path / "c")
    assert not _same(_weights(a.model), _weights(c.model))


def test_an_interrupted_run_resumes_where_it_stopped(data, tmp_path):
    cfg = tiny_config(epochs=4)
    whole = train_model(data[:2], data[2:], cfg, tmp_path / "whole")
    calls = {"n": 0}
    steps_per_epoch = 2  # 2 micrographs x 4 patches / batch 4

    def abort_in_epoch_3():
        calls["n"] += 1
        return calls["n"] > 2 * steps_per_epoch

    with pytest.raises(Aborted):
        train_model(data[:2], data[2:], cfg, tmp_path / "cut", should_abort=abort_in_epoch_3)
    assert json.loads((tmp_path / "cut" / "history.json").read_text())[-1]["epoch"] == 2
    resumed = train_model(data[:2], data[2:], cfg, tmp_path / "cut")
    assert resumed.resumed
    assert _same(_weights(whole.model), _weights(resumed.model))
    assert [r["loss"] for r in whole.history] == [r["loss"] for r in resumed.history]
    assert resumed.best_epoch == whole.best_epoch
    # other settings do not resume from that checkpoint
    cfg.train.lr = 5e-3
    assert not train_model(data[:2], data[2:], cfg, tmp_path / "cut").resumed


def test_early_stopping_and_no_validation(data, tmp_path):
    cfg = tiny_config(epochs=30)
    cfg.train.lr = 0.0  # only batch-norm statistics move: the metric soon stops improving
    cfg.train.early_stop_patience = 3
    result = train_model(data[:1], data[2:], cfg, tmp_path / "stop")
    assert len(result.history) < 30 and len(result.history) == result.best_epoch + 3
    assert max(r["val_iou"] for r in result.history) == result.best_metric
    cfg = tiny_config(epochs=2)
    result = train_model(data[:1], [], cfg, tmp_path / "noval")
    assert result.best_epoch in (1, 2) and "val_iou" not in result.history[0]


def test_small_micrographs_and_bad_input(tmp_path):
    small = synthetic_set(1, size=40, seed=5)  # smaller than the patch: padded with ignored pixels
    cfg = tiny_config(epochs=1)
    cfg.train.patch_size = 64
    train_model(small, small, cfg, tmp_path / "small")
    with pytest.raises(InputError, match="no training micrographs"):
        train_model([], small, cfg, tmp_path / "x")
    bad = LabeledImage(np.zeros((10, 10), np.float32), small[0].labels, "bad")
    with pytest.raises(InputError, match="bad"):
        train_model([bad], [], cfg, tmp_path / "x")


def test_device_and_threads():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(InputError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            resolve_device("cuda")
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1
        assert configure_threads(None) >= 1
    finally:
        torch.set_num_threads(before)


def test_crf_fine_tuning_is_a_second_phase(data, tmp_path):
    from crisp_ext.model_dir import load_model_dir, save_model_dir
    from crisp_ext.predict import predict_map

    cfg = tiny_config(epochs=2)
    cfg.crf = CRFConfig(kind="standard", finetune_epochs=2, theta_alpha=4.0, theta_gamma=1.0)
    result = train_model(data[:2], data[2:], cfg, tmp_path / "run")
    phases = [(r["phase"], r["epoch"]) for r in result.history]
    assert phases == [("cnn", 1), ("cnn", 2), ("crf", 0), ("crf", 1), ("crf", 2)]
    assert hasattr(result.model, "crf")
    save_model_dir(tmp_path / "model", result.model, cfg, {})
    loaded = load_model_dir(tmp_path / "model", device="cpu")
    image = data[2].image
    np.testing.assert_array_equal(predict_map(loaded.model, image, cfg.predict),
                                  predict_map(result.model, image, cfg.predict))


def test_a_centre_channel_is_trained_saved_and_its_peaks_sit_on_the_particles(tmp_path):
    """Two output channels (segmentation, centre); the saved directory rebuilds them; predict_map gives the centre
    channel, whose peaks lie on the particle centres of a synthetic micrograph."""
    from crisp_ext.centres.postprocess import pick_centres
    from crisp_ext.metrics import picking_metrics
    from crisp_ext.model_dir import load_model_dir, save_model_dir
    from crisp_ext.predict import predict_map, predict_maps

    cfg = tiny_config(epochs=30)
    cfg.labels = LabelConfig(centre_weight=1.0, centre_sigma=0.15)
    cfg.train.patches_per_micrograph = 8
    items = []
    for i in range(3):
        sim = simulate_micrograph((80, 80), n_particles=8, diameter_px=12.0, snr=2.0, seed=i)
        items.append(LabeledImage(normalise(sim.image), make_labels(sim.image.shape, sim.centres, 12.0, cfg.labels),
                                  f"mic{i}", sim.centres))
    result = train_model(items[:2], items[2:], cfg, tmp_path / "run")
    maps = predict_maps(result.model, items[2].image, cfg.predict)
    assert maps.shape == (2, 80, 80)
    np.testing.assert_array_equal(predict_map(result.model, items[2].image, cfg.predict), maps[1])
    save_model_dir(tmp_path / "model", result.model, cfg, {})
    loaded = load_model_dir(tmp_path / "model", device="cpu")
    np.testing.assert_array_equal(predict_maps(loaded.model, items[2].image, cfg.predict), maps)
    # the centre channel's peaks are the particles (the training micrographs: this is about the target's geometry)
    for it in items[:2]:
        cs = pick_centres(predict_map(result.model, it.image, cfg.predict), 12.0, "nms", None, 0.3)
        m = picking_metrics([cs.xy], [cs.score], [it.truth_xy], 3.0)
        assert m.recall >= 0.85 and m.precision >= 0.85, m
    # with a CRF (which refines the segmentation alone) the network keeps one output
    crf = tiny_config(epochs=1)
    crf.labels = LabelConfig(centre_weight=1.0)
    crf.crf = CRFConfig(kind="standard", finetune_epochs=1)
    assert crf.output_channels() == 1
    assert predict_maps(train_model(items[:1], [], crf, tmp_path / "crf").model, items[2].image,
                        crf.predict).shape == (1, 80, 80)
    from crisp_ext.config import ConfigError

    with pytest.raises(ConfigError, match="centres.map"):
        PickerConfig().updated({"crf.kind": "standard", "centres.map": "centre"})


def test_the_picking_monitor_scores_maps_by_the_picks_they_give():
    from crisp_ext.labels import centre_map
    from crisp_ext.train import picking_ap

    rng = np.random.default_rng(3)
    truth = [rng.uniform(15, 105, size=(10, 2)) for _ in range(2)]
    val = [LabeledImage(np.zeros((120, 120), np.float32), None, f"v{i}", t, diameter_px=12.0)
           for i, t in enumerate(truth)]
    on = [centre_map((120, 120), t, 2.0)[None] for t in truth]  # peaks on the particles
    off = [centre_map((120, 120), t + 9.0, 2.0)[None] for t in truth]  # every peak 1.06 diameters away
    assert picking_ap(on, val, 24.0) > 0.95
    assert picking_ap(off, val, 24.0) < 0.05
    # two output channels: the better one counts (the picking map is chosen later)
    assert picking_ap([np.concatenate([o, g]) for o, g in zip(off, on)], val, 24.0) > 0.95


def test_the_picking_monitor_chooses_the_best_epoch(data, tmp_path):
    cfg = tiny_config(epochs=3)
    cfg.train.monitor = "ap"
    result = train_model(data[:2], data[2:], cfg, tmp_path)
    aps = [row["val_ap"] for row in result.history if "val_ap" in row]
    assert len(aps) >= 3 and all(0.0 <= a <= 1.0 for a in aps)
    assert result.best_metric == pytest.approx(max(aps))


def test_film_edge_augmentation_adds_a_step_to_the_image_and_keeps_the_labels(data):
    from crisp_ext.train import _PatchSampler, film_edge

    edge = film_edge(64, np.random.default_rng(5))
    assert edge.shape == (64, 64) and np.isfinite(edge).all()
    # a step and a fringe: the edge varies across the patch, within the step's and the fringe's ranges
    lo, hi = np.percentile(edge, [5, 95])
    assert hi - lo > 0.05 and np.abs(edge).max() <= 3.5 + 1e-6
    plain = _PatchSampler(data[:1], 48, augment=True, jitter=0.1, edges=0.0)
    edged = _PatchSampler(data[:1], 48, augment=True, jitter=0.1, edges=1.0)
    (a,), (b,) = plain.epoch(np.random.default_rng(0), 1), edged.epoch(np.random.default_rng(0), 1)
    # the same patch, cut, turned and jittered alike: only its image gains the edge; weight and targets are kept
    np.testing.assert_array_equal(a[1:], b[1:])
    diff = b[0] - a[0]
    assert np.abs(diff).max() > 0.05 and np.percentile(diff, 95) - np.percentile(diff, 5) > 0.05


def test_scale_augmentation_magnifies_image_and_labels_together():
    from crisp_ext.labels import Labels
    from crisp_ext.train import LabeledImage, _PatchSampler

    # one disk of diameter 20 px whose image is its own label: any misalignment between image and labels shows
    size, diameter = 160, 20.0
    yy, xx = np.mgrid[:size, :size]
    disk = ((xx - 80.0) ** 2 + (yy - 80.0) ** 2 <= (diameter / 2) ** 2).astype(np.float32)
    item = LabeledImage(disk.copy(), Labels(disk.copy(), np.ones_like(disk), disk.copy()), "one")
    plain = _PatchSampler([item], 64, augment=True, jitter=0.0)
    scaled = _PatchSampler([item], 64, augment=True, jitter=0.0, scale=0.4)
    rng = np.random.default_rng(3)
    areas = {"plain": [], "scaled": []}
    for name, sampler in (("plain", plain), ("scaled", scaled)):
        for _ in range(200):
            (patch,) = sampler.epoch(rng, 1)
            assert patch.shape == (4, 64, 64)
            np.testing.assert_allclose(patch[0], patch[2], atol=1e-6)  # image and segmentation target aligned
            np.testing.assert_allclose(patch[0], patch[3], atol=1e-6)  # ... and the centre target
            inside = patch[2] > 0.5
            # whole disks only (not cut by the patch border)
            if inside.any() and not (inside[0].any() or inside[-1].any() or inside[:, 0].any() or inside[:, -1].any()):
                areas[name].append(inside.sum())
    plain_d = 2 * np.sqrt(np.array(areas["plain"]) / np.pi)
    scaled_d = 2 * np.sqrt(np.array(areas["scaled"]) / np.pi)
    assert np.ptp(plain_d) < 1.0  # the plain sampler keeps the particle's size
    # magnified and shrunk by up to exp(±0.4) = 1.49 / 0.67: diameters from ~13 to ~30 px
    assert scaled_d.min() < 0.8 * diameter and scaled_d.max() > 1.25 * diameter
    assert scaled_d.min() > 0.6 * diameter and scaled_d.max() < 1.6 * diameter


def test_noise_augmentation_makes_particles_fainter_and_keeps_the_labels(data):
    from crisp_ext.train import _PatchSampler

    plain = _PatchSampler(data[:1], 48, augment=True, jitter=0.0)
    noisy = _PatchSampler(data[:1], 48, augment=True, jitter=0.0, noise=1.0)
    (a,), (b,) = plain.epoch(np.random.default_rng(0), 1), noisy.epoch(np.random.default_rng(0), 1)
    np.testing.assert_array_equal(a[1:], b[1:])  # the same patch, cut and turned alike; weight and targets kept
    # the image keeps its variance but resembles itself less: noise replaced part of it
    ratio = b[0].std() / a[0].std()
    corr = np.corrcoef(a[0].ravel(), b[0].ravel())[0, 1]
    assert 0.5 < ratio < 1.5 and 0.3 < corr < 0.999
