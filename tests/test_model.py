import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from crisp_ext.config import ModelConfig, PickerConfig
from crisp_ext.errors import InputError
from crisp_ext.losses import build_loss, parse_spec
from crisp_ext.model import build_model, size_multiple
from crisp_ext.model_dir import load_model_dir, save_model_dir, update_model_info
from crisp_ext.predict import predict_map

TINY = dict(arch="unet", encoder="tu-test_resnet", encoder_depth=3, decoder_channels=[16, 8, 4])


def tiny_config() -> PickerConfig:
    cfg = PickerConfig()
    cfg.model = ModelConfig(**TINY)
    cfg.predict.tile, cfg.predict.overlap, cfg.predict.bf16 = 32, 8, False
    return cfg


@pytest.mark.parametrize("arch", ["unet", "unetplusplus", "fpn"])
def test_models_take_one_channel_and_give_one_logit(arch):
    depth = 3 if arch != "fpn" else 5
    model = build_model(ModelConfig(arch=arch, encoder="tu-test_resnet", encoder_depth=depth,
                                    decoder_channels=[16, 8, 4, 4, 4]))
    m = size_multiple(model)
    x = torch.randn(2, 1, 2 * m, 3 * m)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 1, 2 * m, 3 * m)


def test_bad_model_settings_are_one_line_errors():
    with pytest.raises(InputError, match="arch"):
        build_model(ModelConfig(arch="transformer"))
    with pytest.raises(InputError, match="decoder_channels"):
        build_model(ModelConfig(arch="unet", encoder="tu-test_resnet", encoder_depth=3, decoder_channels=[8, 4]))
    with pytest.raises(InputError, match="encoder"):
        build_model(ModelConfig(arch="unet", encoder="no-such-encoder"))


def _three_channel_encoder_state():
    from crisp_ext._torchvision_guard import load_smp

    torch.manual_seed(5)
    rgb = load_smp().create_model("unet", encoder_name="tu-test_resnet", encoder_weights=None, in_channels=3,
                                  classes=1, encoder_depth=3, decoder_channels=[16, 8, 4])
    return rgb.encoder.state_dict()


def test_encoder_weights_load_from_a_local_file(tmp_path):
    state = _three_channel_encoder_state()
    path = tmp_path / "imagenet_like.pth"
    torch.save({"encoder." + k: v for k, v in state.items()} | {"head.fc.weight": torch.zeros(3, 3)}, path)
    model = build_model(ModelConfig(**TINY, encoder_weights=str(path)))
    loaded = model.encoder.state_dict()
    first = next(k for k, v in state.items() if v.ndim == 4)
    torch.testing.assert_close(loaded[first], state[first].sum(dim=1, keepdim=True))  # RGB conv -> 1 channel
    for key, value in state.items():
        if key != first and not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(loaded[key], value)


def test_encoder_weights_with_other_names_load_in_order(tmp_path):
    state = _three_channel_encoder_state()
    path = tmp_path / "renamed.pt"
    torch.save({f"tensor{i:03d}": v for i, v in enumerate(state.values())}, path)
    model = build_model(ModelConfig(**TINY, encoder_weights=str(path)))
    key = [k for k in state if not k.endswith("num_batches_tracked")][-1]
    torch.testing.assert_close(model.encoder.state_dict()[key], state[key])


def test_encoder_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(7, 3, 3, 3)}, path)
    with pytest.raises(InputError, match="do not fit"):
        build_model(ModelConfig(**TINY, encoder_weights=str(path)))
    with pytest.raises(InputError, match="not found"):
        build_model(ModelConfig(**TINY, encoder_weights=str(tmp_path / "missing.pt")))


def test_imagenet_download_failure_is_a_one_line_error():
    code = ("from crisp_ext.config import ModelConfig\nfrom crisp_ext.model import build_model\n"
            "from crisp_ext.errors import InputError\n"
            "try:\n    build_model(ModelConfig(arch='unet', encoder='resnet18', encoder_weights='imagenet'))\n"
            "except InputError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ERR")]
    if not lines and out.returncode == 0:
        pytest.skip("ImageNet weights are available here (cached); nothing to fail")
    assert len(lines) == 1 and "ImageNet weights" in lines[0], out.stdout + out.stderr


# -- losses ---------------------------------------------------------------------------------------------------------


def test_loss_specs_parse_and_combine():
    assert parse_spec("0.5*dice+bce") == [(0.5, "dice"), (1.0, "bce")]
    with pytest.raises(InputError, match="loss"):
        parse_spec("dice+hinge")
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.7).float()
    w = torch.ones_like(target)
    combo = build_loss("dice+0.5*bce")(logits, target, w)
    assert combo == pytest.approx(float(build_loss("dice")(logits, target, w) + 0.5 * build_loss("bce")(logits,
                                                                                                         target, w)))


@pytest.mark.parametrize("name", ["dice", "jaccard", "tversky", "lovasz", "bce", "focal"])
def test_losses_ignore_zero_weight_pixels_and_reward_the_truth(name):
    torch.manual_seed(1)
    target = (torch.rand(2, 1, 16, 16) > 0.6).float()
    weight = torch.ones_like(target)
    weight[..., :4] = 0  # ignored columns
    fn = build_loss(name)
    logits = torch.randn_like(target)
    changed = logits.clone()
    changed[..., :4] = torch.randn_like(changed[..., :4]) * 10
    assert float(fn(logits, target, weight)) == pytest.approx(float(fn(changed, target, weight)), abs=1e-6)
    perfect = (target * 2 - 1) * 8
    assert float(fn(perfect, target, weight)) < float(fn(logits, target, weight))


def test_down_weighted_background_costs_less():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:4, 2:4] = 1
    logits = torch.full_like(target, -5.0)
    logits[..., 2:4, 2:4] = 5.0
    logits[..., 6:, 6:] = 5.0  # a false positive far away
    full, low = torch.ones_like(target), torch.ones_like(target)
    low[..., 5:, 5:] = 0.1
    for name in ("dice", "bce"):
        fn = build_loss(name)
        assert float(fn(logits, target, low)) < float(fn(logits, target, full))


# -- model directory ------------------------------------------------------------------------------------------------


def test_save_load_gives_identical_predictions(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(2)
    model = build_model(cfg.model, cfg.output_channels())
    with torch.no_grad():  # make batch-norm statistics non-trivial
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.8, 1.2)
    model.eval()
    image = np.random.default_rng(0).normal(size=(70, 53)).astype(np.float32)
    before = predict_map(model, image, cfg.predict)
    save_model_dir(tmp_path / "m", model, cfg, {"diameter_px": 27.0})
    loaded = load_model_dir(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(predict_map(loaded.model, image, loaded.config.predict), before)
    assert loaded.config.model == cfg.model
    assert not loaded.model.training
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    assert info["diameter_px"] == 27.0 and info["target_diameter_px"] == cfg.preprocess.target_diameter_px
    assert info["torch_version"] == torch.__version__ and info["crf"] == "none" and info["label_kind"] == cfg.labels.kind
    update_model_info(tmp_path / "m", finder="nms", threshold=0.3)
    assert load_model_dir(tmp_path / "m").info["finder"] == "nms"


def test_model_dir_problems_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model_dir(tmp_path / "none")
    cfg = tiny_config()
    save_model_dir(tmp_path / "m", build_model(cfg.model), cfg, {})
    (tmp_path / "m" / "weights.pt").unlink()
    with pytest.raises(InputError, match="weights.pt is missing"):
        load_model_dir(tmp_path / "m")
    other = PickerConfig()
    other.model = ModelConfig(arch="unet", encoder="tu-test_resnet", encoder_depth=3, decoder_channels=[8, 8, 8])
    save_model_dir(tmp_path / "x", build_model(cfg.model), other, {})
    with pytest.raises(InputError, match="do not fit"):
        load_model_dir(tmp_path / "x")
    info = json.loads((tmp_path / "x" / "model.json").read_text())
    info["format_version"] = 99
    (tmp_path / "x" / "model.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match="newer"):
        load_model_dir(tmp_path / "x")


def test_batch_norm_momentum_is_set_everywhere_unless_zero():
    bns = lambda m: [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]  # noqa: E731
    model = build_model(ModelConfig(**TINY, bn_momentum=0.25))
    assert bns(model) and all(b.momentum == 0.25 for b in bns(model))
    kept = build_model(ModelConfig(**TINY, bn_momentum=0.0))
    assert all(b.momentum == 0.1 for b in bns(kept))  # the encoder's own (PyTorch default here)


def test_a_model_saved_before_the_centre_channel_still_loads(tmp_path):
    """A config.toml without labels.centre_weight comes from a crisp-ext that had one output channel: it loads as
    such (the default is now a centre channel), with identical predictions."""
    cfg = tiny_config()
    cfg.labels.centre_weight = 0.0
    torch.manual_seed(3)
    model = build_model(cfg.model, cfg.output_channels()).eval()
    image = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
    before = predict_map(model, image, cfg.predict)
    save_model_dir(tmp_path / "old", model, cfg, {"diameter_px": 27.0})
    config = tmp_path / "old" / "config.toml"
    config.write_text("\n".join(line for line in config.read_text().splitlines()
                                if not line.startswith(("centre_weight", "centre_sigma", "map"))) + "\n")
    loaded = load_model_dir(tmp_path / "old", device="cpu")
    assert loaded.config.output_channels() == 1
    np.testing.assert_array_equal(predict_map(loaded.model, image, loaded.config.predict), before)


def test_nnpu_is_bce_when_every_positive_is_labelled():
    torch.manual_seed(3)
    logits, target = torch.randn(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.7).float()
    weight = torch.ones_like(target)
    weight[..., :3] = 0
    assert float(build_loss("nnpu")(logits, target, weight)) == pytest.approx(
        float(build_loss("bce")(logits, target, weight)), rel=1e-5)
    assert float(build_loss("dice+nnpu", prior=0.0)(logits, target, weight)) == pytest.approx(
        float(build_loss("dice+bce")(logits, target, weight)), rel=1e-5)


def test_nnpu_lets_unlabelled_particles_be_and_never_goes_negative():
    from crisp_ext.losses import nnpu_loss

    target = torch.zeros(1, 1, 16, 16)
    target[..., 2:6, 2:6] = 1  # a picked particle
    weight = torch.ones_like(target)
    base = torch.full_like(target, -6.0)
    base[..., 2:6, 2:6] = 6.0
    found = base.clone()
    found[..., 10:14, 10:14] = 6.0  # the network also marks an unpicked particle of the same size
    bce, pu = build_loss("bce"), nnpu_loss(16 / (256 - 16))  # that particle's share of the unlabelled pixels
    assert float(bce(found, target, weight)) > 5 * float(bce(base, target, weight))  # PN: it is punished
    assert float(pu(found, target, weight)) < float(bce(found, target, weight)) / 5  # PU: hardly
    everything = torch.full_like(target, 6.0)  # calling every pixel particle is not free under PU either
    assert float(pu(everything, target, weight)) > float(pu(found, target, weight))
    assert float(nnpu_loss(0.9)(base, target, weight)) >= 0.0
    with pytest.raises(InputError):
        nnpu_loss(1.0)


def test_unlabelled_prior_from_the_unpicked_fraction():
    from crisp_ext.labels import Labels
    from crisp_ext.train import LabeledImage, unlabelled_prior

    target = np.zeros((10, 10), np.float32)
    target[:2, :5] = 1  # 10 labelled pixels, 90 unlabelled
    item = LabeledImage(image=np.zeros((10, 10), np.float32), labels=Labels(target, np.ones_like(target)))
    assert unlabelled_prior([item], 0.0) == 0.0
    assert unlabelled_prior([item], 0.5) == pytest.approx(10 / 90)  # as many unpicked as picked


def test_every_loss_the_configuration_accepts_builds_and_every_built_one_is_accepted():
    """The configuration's schema and the loss builder know the same names (``dice+nnpu`` was once refused)."""
    from crisp_ext.config import LOSS_NAMES, PickerConfig

    logits, target = torch.randn(1, 1, 8, 8), (torch.rand(1, 1, 8, 8) > 0.5).float()
    for name in LOSS_NAMES:
        cfg = PickerConfig().updated({"train.loss": f"dice+{name}", "labels.unpicked_fraction": 0.3})
        assert torch.isfinite(build_loss(cfg.train.loss, prior=0.1)(logits, target, torch.ones_like(target)))
