import os
import platform
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from crisp_ext.config import PredictConfig
from crisp_ext.errors import InputError
from crisp_ext.predict import blend_window, predict_many, predict_map, tile_size, tile_starts
from crisp_ext.preprocess import Scale, WorkingImage


class Constant(nn.Module):
    """Stand-in network: the same logit everywhere."""

    def __init__(self, value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x):
        assert x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0  # tiles respect the size multiple
        return torch.zeros_like(x) + self.value


class Identity(nn.Module):
    """Stand-in network: the input is the logit, so the stitched map must be sigmoid(image) exactly."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.dummy


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (64, 64, 16), (10, 32, 8), (1000, 512, 64)])
def test_tiles_cover_the_axis_with_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    if tile < length:
        assert starts[-1] == length - tile
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("length", [10, 64, 100, 910, 1000, 1024, 1025, 1611, 2048, 2880, 4096])
@pytest.mark.parametrize("largest", [64, 512, 1024])
def test_tiles_are_sized_to_the_axis(length, largest):
    overlap, multiple = 64 if largest > 64 else 16, 32
    tile = tile_size(length, largest, overlap, multiple)
    starts = tile_starts(max(length, tile), tile, overlap)
    assert tile % multiple == 0 and tile <= largest
    fewest = 1 if length <= largest else -(-(length - overlap) // (largest - overlap))
    assert len(starts) == fewest  # as few tiles as the largest allows...
    needed = length + (len(starts) - 1) * overlap
    assert len(starts) * tile < needed + len(starts) * multiple  # ...none larger than needed
    if length == 910 and largest == 1024:
        assert (tile, len(starts)) == (928, 1)


def test_blend_window_is_smooth_and_strictly_positive():
    w = blend_window(64, 16)
    assert w.min() > 0 and w.max() == 1 and np.all(w[16:48] == 1)
    np.testing.assert_allclose(w, w[::-1])
    assert np.all(np.diff(w[:16]) > 0)


CONFIGS = [PredictConfig(tile=64, overlap=16, batch_size=3, bf16=False, channels_last=False),
           PredictConfig(tile=64, overlap=30, batch_size=1, bf16=False, channels_last=True),
           PredictConfig(tile=512, overlap=64, batch_size=4, bf16=False)]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("shape", [(150, 97), (64, 64), (20, 45)])
def test_stitching_a_constant_map_is_constant_up_to_the_edges(cfg, shape):
    prob = predict_map(Constant(0.7), np.zeros(shape, np.float32), cfg)
    assert prob.shape == shape and prob.dtype == np.float32
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-0.7)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_stitching_puts_every_tile_back_in_its_place(cfg):
    image = np.random.default_rng(0).normal(size=(131, 170)).astype(np.float32)
    prob = predict_map(Identity(), image, cfg)
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-image)), rtol=0, atol=1e-6)


def test_bf16_prediction_stays_close():
    image = np.random.default_rng(1).normal(size=(96, 96)).astype(np.float32)
    fast = predict_map(Identity(), image, PredictConfig(tile=64, overlap=16, bf16=True))
    np.testing.assert_allclose(fast, 1 / (1 + np.exp(-image)), atol=2e-2)


def test_bf16_autocast_only_where_the_cpu_computes_it_natively(monkeypatch):
    import contextlib

    from crisp_ext import predict

    cpu = torch.device("cpu")
    monkeypatch.setattr(predict, "cpu_has_fast_bf16", lambda: False)  # emulated bf16 is ~10x slower than float32
    assert isinstance(predict.autocast_context(cpu, True), contextlib.nullcontext)
    monkeypatch.setattr(predict, "cpu_has_fast_bf16", lambda: True)
    ctx = predict.autocast_context(cpu, True)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert isinstance(predict.autocast_context(cpu, False), contextlib.nullcontext)


def _working(value: float) -> WorkingImage:
    scale = Scale(0.5, 0.5, 0.0, 0.0, (80, 100), (40, 50))
    return WorkingImage(np.full((40, 50), value, np.float32), scale, 2.0)


def _load(item):
    if item == "bad":
        raise InputError("bad.mrc: not an MRC file; check the path")
    return _working(float(item))


@pytest.mark.parametrize("workers,processes", [(0, True), (2, True), (1, False), (3, False)])
def test_predict_many_keeps_order_and_overlaps_loading(workers, processes):
    cfg = PredictConfig(tile=32, overlap=8, workers=workers, bf16=False)
    items = ["-1", "0", "2.5", "1", "-0.5"]
    threads = torch.get_num_threads()
    out = list(predict_many(Identity(), items, _load, cfg, processes=processes))
    assert torch.get_num_threads() == threads
    assert [o[0] for o in out] == items
    for item, working, prob in out:
        assert working.image.shape == prob.shape == (40, 50)
        np.testing.assert_allclose(prob, 1 / (1 + np.exp(-float(item))), atol=1e-6)


@pytest.mark.parametrize("workers,processes", [(0, True), (1, True), (2, False)])
def test_load_errors_reach_the_caller_unchanged(workers, processes):
    cfg = PredictConfig(tile=32, overlap=8, workers=workers, bf16=False)
    gen = predict_many(Identity(), ["1", "bad", "2"], _load, cfg, processes=processes)
    assert next(gen)[0] == "1"
    with pytest.raises(InputError) as info:
        next(gen)
    assert str(info.value) == "bad.mrc: not an MRC file; check the path"


class Skewed(nn.Module):
    """Stand-in network that is not symmetric: the logit is the input plus a ramp along x."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        ramp = torch.linspace(-1, 1, x.shape[-1])
        return x + ramp + self.dummy


@pytest.mark.parametrize("tta", [2, 4, 8])
def test_test_time_augmentation_maps_every_view_back(tta):
    image = np.random.default_rng(1).normal(size=(96, 160)).astype(np.float32)
    cfg = PredictConfig(tile=64, overlap=16, bf16=False, tta=tta)
    # An equivariant network gives the same map with or without TTA: every view is mapped back to its place.
    np.testing.assert_allclose(predict_map(Identity(), image, cfg), 1 / (1 + np.exp(-image)), atol=1e-6)
    # A skewed one is averaged over its views, so the result differs from the single view.
    single = predict_map(Skewed(), image, PredictConfig(tile=64, overlap=16, bf16=False))
    assert np.abs(predict_map(Skewed(), image, cfg) - single).max() > 0.05


def test_unknown_tta_is_refused():
    with pytest.raises(ValueError, match="tta"):
        predict_map(Identity(), np.zeros((64, 64), np.float32), PredictConfig(tta=3))


_FAULTS = """
import resource, sys
import torch
if sys.argv[1] == "keep":
    from crisp_ext.allocator import keep_large_buffers
    assert keep_large_buffers()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    buf = torch.ones(8 << 20)  # 32 MiB of float32, every page touched, then freed
    del buf
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_buffers_are_reused_not_faulted_in_again_even_under_dasks_trim_setting():
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536: every large buffer then comes fresh from the
    kernel and faults in page by page; after keep_large_buffers() a freed buffer is reused."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, "MALLOC_TRIM_THRESHOLD_": "65536"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, check=True,
                                       capture_output=True, text=True).stdout)
              for mode in ("default", "keep")}
    pages = 100 * (32 << 20) // resource.getpagesize()
    assert faults["default"] > 0.8 * pages
    assert faults["keep"] < 0.3 * pages


@pytest.mark.parametrize("device,processes", [(None, False), ("cuda", True)])
def test_picking_reads_ahead_in_a_thread_on_the_cpu_and_in_processes_for_a_gpu(monkeypatch, device, processes):
    """On the CPU a loader process takes a core from the network (measured on 2 cores: 0.50-0.56 s per micrograph
    instead of 0.41-0.45 with a reader thread)."""
    from crisp_ext import predict
    from crisp_ext.config import PickerConfig
    from crisp_ext.picking import pick_stream

    seen = {}

    def fake_predict_many(model, items, load, cfg, device=None, channel=None, *, processes=True, network=None):
        seen["processes"] = processes
        return (x for x in ())

    monkeypatch.setattr(predict, "predict_many", fake_predict_many)
    assert list(pick_stream(Identity(), [], PickerConfig(), "nms", {}, 0.5, device=device)) == []
    assert seen["processes"] is processes


def test_reader_threads_load_that_many_micrographs_at_once():
    import threading
    import time

    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def slow_load(item):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        return _working(float(item))

    cfg = PredictConfig(tile=32, overlap=8, workers=3, bf16=False)
    out = list(predict_many(Identity(), [str(i) for i in range(8)], slow_load, cfg, processes=False))
    assert [o[0] for o in out] == [str(i) for i in range(8)]
    assert state["most"] == 3
