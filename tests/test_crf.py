"""Dense CRF: filters against the brute-force dense filter, gradients, behaviour on synthetic maps, fine-tuning."""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from crf_synthetic import iou, make_scene, uncertain_mass
from scipy import ndimage
from torch.autograd import gradcheck
from torch.func import functional_call

from crisp_ext.config import CRFConfig
from crisp_ext.crf import CRFSegmenter, DenseCRF, build_crf_segmenter, standardize
from crisp_ext.crf_filters import (
    BilateralGrid,
    WindowKernel,
    dense_reference,
    gaussian_conv,
    gaussian_fft,
    window_geometry,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(size=96, n_particles=6, n_specks=8, n_holes=4, seed=s) for s in (0, 1)]


def _batch(scenes, attr):
    return torch.cat([getattr(s, attr) for s in scenes])


# ---------------------------------------------------------------- filters

def test_spatial_filters_match_dense_reference():
    torch.manual_seed(0)
    q = torch.rand(2, 1, 23, 31, dtype=torch.float64)
    for sigma in (1.5, 3.0):
        ref = dense_reference(q, None, sigma, None)
        assert (gaussian_fft(q, sigma) - ref).abs().max() < 1e-4
        assert (gaussian_conv(q, sigma) - ref).abs().max() < 1e-4
    ones = torch.ones(1, 1, 17, 9, dtype=torch.float64)
    assert torch.allclose(gaussian_fft(ones, 2.0), ones)


def test_appearance_backends_against_dense_reference():
    torch.manual_seed(1)
    scene = make_scene(size=40, n_particles=2, n_specks=2, n_holes=1, seed=3)
    q = torch.sigmoid(scene.logits).double()
    guide = standardize(scene.logits.double())
    ref = dense_reference(q, guide, 4.0, 0.5)
    exact = WindowKernel(guide, 4.0, 0.5, *window_geometry(4.0, stride=1)).apply(q)
    assert (exact - ref).abs().max() < 0.02
    grid = BilateralGrid(guide, 4.0, 0.5).apply(q)
    assert (grid - ref).abs().mean() < 0.01 and (grid - ref).abs().max() < 0.1
    coarse = WindowKernel(guide, 4.0, 0.5, *window_geometry(4.0)).apply(q)
    assert (coarse - ref).abs().mean() < 0.1
    ones = torch.ones_like(q)
    for kern in (WindowKernel(guide, 4.0, 0.5, 2, 5), BilateralGrid(guide, 4.0, 0.5)):
        assert torch.allclose(kern.apply(ones), ones)


def test_vector_guide_window_matches_dense_at_stride_one():
    torch.manual_seed(2)
    q = torch.rand(1, 1, 20, 24, dtype=torch.float64)
    guide = F.normalize(F.avg_pool2d(torch.randn(1, 3, 20, 24, dtype=torch.float64), 5, 1, 2), dim=1)
    ref = dense_reference(q, guide, 3.0, 0.5)
    out = WindowKernel(guide, 3.0, 0.5, *window_geometry(3.0, stride=1, reach=4.0)).apply(q)
    assert (out - ref).abs().max() < 1e-3


# ---------------------------------------------------------------- gradients

def _gradcheck_crf(crf: DenseCRF, u: torch.Tensor, g: torch.Tensor | None):
    crf = crf.double()
    names = [n for n, _ in crf.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in crf.named_parameters()]

    def fn(u, *args):
        guide = args[0] if g is not None else None
        ps = args[1:] if g is not None else args
        return functional_call(crf, dict(zip(names, ps)), (u, guide))

    inputs = (u,) + ((g,) if g is not None else ()) + tuple(params)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("solver", ["mf", "fw"])
def test_gradcheck_window_backend_all_inputs(solver):
    torch.manual_seed(3)
    u = (2 * torch.randn(1, 1, 6, 7, dtype=torch.float64)).requires_grad_(True)
    g = torch.randn(1, 2, 6, 7, dtype=torch.float64).requires_grad_(True)
    # theta_gamma = 1.3: the FFT's padding (5 theta) is far from a step, see gaussian_fft
    crf = DenseCRF(solver=solver, iterations=3, theta_alpha=2.0, theta_gamma=1.3, appearance="window",
                   learn_bandwidths=True)
    _gradcheck_crf(crf, u, g)


@pytest.mark.parametrize("solver,reg,scheme", [("mf", "l2", "fixed"), ("fw", "l2", "fixed"),
                                               ("fw", "entropy", "standard")])
def test_gradcheck_grid_backend(solver, reg, scheme):
    torch.manual_seed(4)
    u = (2 * torch.randn(2, 1, 5, 6, dtype=torch.float64)).requires_grad_(True)
    g = torch.randn(2, 1, 5, 6, dtype=torch.float64).requires_grad_(True)
    crf = DenseCRF(solver=solver, iterations=3, theta_alpha=3.0, theta_gamma=1.3, fw_regularizer=reg, fw_scheme=scheme,
                   fw_stepsize=0.7, appearance="grid")
    _gradcheck_crf(crf, u, g)


# ---------------------------------------------------------------- behaviour

def _stray_pixels(pred: np.ndarray, mask: np.ndarray) -> int:
    labels, n = ndimage.label(pred)
    return sum(int((labels == k).sum()) for k in range(1, n + 1) if not mask[labels == k].any())


@pytest.mark.parametrize("solver", ["mf", "fw"])
@pytest.mark.parametrize("guide", ["logits", "image"])
def test_crf_cleans_synthetic_map(scenes, solver, guide):
    u = _batch(scenes, "logits")
    g = standardize(_batch(scenes, "logits" if guide == "logits" else "image"))
    crf = DenseCRF(solver=solver, theta_gamma=3.0, spatial_weight=4.0, theta_alpha=4.0, theta_beta=1.0,
                   bilateral_weight=1.0, x0_weight=0.25)  # pinned: the test is about the CRF, not the defaults
    with torch.no_grad():
        out = torch.sigmoid(crf(u, g))
    before = torch.sigmoid(u)
    for b, s in enumerate(scenes):
        assert iou(out[b], s.mask) > iou(before[b], s.mask) + 0.04
        pred_before = before[b, 0].numpy() > 0.5
        pred_after = out[b, 0].numpy() > 0.5
        assert pred_before[s.specks].mean() == 1.0 and (~pred_before[s.holes]).mean() == 1.0
        assert pred_after[s.specks].mean() < 0.05  # specks removed
        assert (~pred_after[s.holes]).mean() < 0.5  # holes mostly filled
        # isolated fragments (components off every particle): many before, at most a few pixels after
        assert _stray_pixels(pred_before, s.mask) > 0.9 * s.specks.sum()
        assert _stray_pixels(pred_after, s.mask) <= 0.05 * s.specks.sum()
        assert uncertain_mass(out[b]) < 0.6 * uncertain_mass(before[b])  # more bimodal


def test_zero_pairwise_weight_returns_unary(scenes):
    u = _batch(scenes, "logits")
    off = {"spatial_weight": 0.0, "bilateral_weight": 0.0}
    assert list(DenseCRF(**off).parameters()) == []
    assert torch.equal(DenseCRF(solver="mf", x0_weight=0.0, **off)(u), u)
    for x0 in (0.0, 0.25):
        assert torch.allclose(torch.sigmoid(DenseCRF(solver="mf", x0_weight=x0, **off)(u)), torch.sigmoid(u),
                              atol=1e-6)
        ent = DenseCRF(solver="fw", fw_regularizer="entropy", x0_weight=x0, **off)(u)
        assert torch.allclose(torch.sigmoid(ent), torch.sigmoid(u), atol=1e-6)
    # l2-regularised Frank-Wolfe: its unary-only solution is the two-class sparsemax, mixed with sigmoid(u)
    l2 = torch.sigmoid(DenseCRF(solver="fw", x0_weight=0.25, **off)(u))
    expected = 0.25 * torch.sigmoid(u) + 0.75 * ((u + 1) / 2).clamp(0, 1)
    assert torch.allclose(l2, expected.clamp(1e-6, 1 - 1e-6), atol=1e-5)


def test_batch_equals_single_images(scenes):
    u = _batch(scenes, "logits")
    for guide_kind, crf in (("image", DenseCRF(appearance="grid")), ("image", DenseCRF(appearance="window")),
                            ("features", DenseCRF(solver="mf"))):
        if guide_kind == "features":
            g = F.normalize(torch.cat([u, _batch(scenes, "image"), torch.ones_like(u)], 1), dim=1)
        else:
            g = standardize(_batch(scenes, "image"))
        with torch.no_grad():
            both = crf(u, g)
            single = torch.cat([crf(u[i:i + 1], g[i:i + 1]) for i in range(len(scenes))])
        assert torch.allclose(torch.sigmoid(both), torch.sigmoid(single), atol=1e-5)


def test_mixed_precision_and_input_checks(scenes):
    u = scenes[0].logits
    g = standardize(scenes[0].image)
    crf = DenseCRF()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crf(u.bfloat16(), g.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="needs a guide"):
        crf(u)
    with pytest.raises(ValueError, match="guide must have shape"):
        crf(u, g[..., :-1])
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        crf(torch.cat([u, u], 1), g)
    with pytest.raises(ValueError, match="solver must be one of"):
        DenseCRF(solver="admm")
    with pytest.raises(ValueError, match="1-channel guide"):
        DenseCRF(appearance="grid")(u, torch.cat([g, g], 1))


def test_defaults_match_config():
    crf = DenseCRF()
    ref = DenseCRF.from_config(CRFConfig())
    assert crf.bandwidths() == ref.bandwidths()
    assert (crf.solver, crf.iterations, crf.x0_weight) == (ref.solver, ref.iterations, ref.x0_weight)
    assert all(torch.equal(a, b) for a, b in zip(crf.state_dict().values(), ref.state_dict().values()))


# ---------------------------------------------------------------- segmenter, fine-tuning, persistence

def _tiny_model(seed=0):
    from crisp_ext._torchvision_guard import load_smp

    torch.manual_seed(seed)
    smp = load_smp()
    return smp.Unet(encoder_name="resnet18", encoder_weights=None, encoder_depth=3,
                    decoder_channels=(16, 8, 4), in_channels=1, classes=1)


def test_build_crf_segmenter_kinds():
    model = _tiny_model()
    assert build_crf_segmenter(model, CRFConfig(kind="none")) is model
    std = build_crf_segmenter(model, CRFConfig(kind="standard"))
    assert isinstance(std, CRFSegmenter) and std.guide == "image" and std.project is None
    cd = build_crf_segmenter(model, CRFConfig(kind="cd", cd_guide="features", feature_channels=3))
    assert cd.guide == "features" and cd.project.out_channels == 3 and cd.project.in_channels == 4
    with pytest.raises(ValueError, match="kind must be one of"):
        build_crf_segmenter(model, CRFConfig(kind="dense"))


def _crop_data(scenes):
    images = _batch(scenes, "image")[..., :64, :64]
    target = torch.from_numpy(np.stack([s.mask[:64, :64] for s in scenes])[:, None].astype(np.float32))
    return images, target


@pytest.fixture(scope="module")
def pretrained(scenes):
    """A tiny network trained briefly without the CRF (fine-tuning starts from a trained network)."""
    torch.set_num_threads(1)
    model = _tiny_model()
    images, target = _crop_data(scenes)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(15):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(images), target).backward()
        opt.step()
    return model


@pytest.mark.parametrize("kind,cd_guide,channels", [("standard", "logits", 1), ("cd", "logits", 1),
                                                    ("cd", "features", 1), ("cd", "features", 3)])
def test_finetuning_moves_crf_parameters(scenes, pretrained, kind, cd_guide, channels):
    cfg = CRFConfig(kind=kind, cd_guide=cd_guide, iterations=3, feature_channels=channels)
    seg = build_crf_segmenter(copy.deepcopy(pretrained), cfg)
    images, target = _crop_data(scenes)
    groups = seg.param_groups(lr_cnn=1e-4, lr_crf=5e-2)
    assert [g["name"] for g in groups] == ["cnn", "crf"]
    assert [g["lr"] for g in groups] == [1e-4, 5e-2]
    n_crf = sum(p.numel() for p in seg.crf_parameters())
    assert n_crf == 4 + (4 * channels + channels if cd_guide == "features" and kind == "cd" else 0)
    assert {id(p) for p in seg.parameters()} == {id(p) for g in groups for p in g["params"]}
    before = [p.detach().clone() for p in seg.crf_parameters()]
    cnn_before = [p.detach().clone() for p in seg.cnn_parameters()]
    opt = torch.optim.Adam(groups)
    seg.train()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(seg(images), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(seg.crf_parameters(), before)]
    assert all(m > 1e-3 for m in moved), moved
    assert any(float((p.detach() - b).abs().max()) > 0 for p, b in zip(seg.cnn_parameters(), cnn_before))


def test_state_dict_round_trip(scenes):
    cfg = CRFConfig(kind="cd", cd_guide="features", iterations=2)
    seg = build_crf_segmenter(_tiny_model(0), cfg).eval()
    with torch.no_grad():
        for p in seg.crf_parameters():
            p.add_(0.1 * torch.randn_like(p))
    buf = io.BytesIO()
    torch.save(seg.state_dict(), buf)
    buf.seek(0)
    other = build_crf_segmenter(_tiny_model(1), dataclasses.replace(cfg)).eval()
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = scenes[0].image[..., :64, :64]
    with torch.no_grad():
        assert torch.equal(seg(x), other(x))
    assert set(seg.state_dict()) == set(other.state_dict())
    assert any(k.startswith("crf.") for k in seg.state_dict()) and any(k.startswith("model.") for k in
                                                                         seg.state_dict())
