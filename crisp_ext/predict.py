"""Tiled prediction of particle probability maps at the working scale.

A micrograph is cut into overlapping square tiles (the last tile on each axis sits flush with the border; a
micrograph smaller than a tile is reflect-padded to the network's size multiple). Each tile's probabilities are
weighted by a separable window that rises smoothly (sin²) over the overlap and is strictly positive everywhere,
summed, and divided by the summed weights, so every pixel gets a true weighted mean of the tiles that cover it: a
constant map stays constant up to the image edge, where the original code faded out.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Iterable, Iterator, NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn as nn

from .config import PredictConfig
from .model import size_multiple
from .preprocess import WorkingImage

T = TypeVar("T")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering ``length`` px with at least ``overlap`` px overlap; the
    first at 0, the last flush with the end, spread evenly."""
    if tile >= length:
        return [0]
    step = max(1, tile - overlap)
    n = int(math.ceil((length - tile) / step)) + 1
    return [int(round(i * (length - tile) / (n - 1))) for i in range(n)]


def tile_size(length: int, largest: int, overlap: int, multiple: int) -> int:
    """The tile (a multiple of ``multiple``, at most ``largest``) for an axis of ``length`` px: as few tiles as
    ``largest`` allows, each as small as still covers the axis with ``overlap`` px shared — so a micrograph of
    910 px is one 928 px tile, not four of 512 (a fifth more network time, for the overlap and the padding)."""
    largest = _round_up(max(largest, multiple), multiple)
    if length <= largest:
        return _round_up(length, multiple)
    n = int(math.ceil((length - overlap) / (largest - overlap)))
    return min(largest, _round_up(int(math.ceil((length + (n - 1) * overlap) / n)), multiple))


class TileLayout(NamedTuple):
    """How a map of (h, w) working px is cut: tiles of ``th`` x ``tw`` at ``rows`` x ``cols`` of the map
    reflect-padded to ``padded`` (hp, wp), each weighted by ``window`` (th, tw) when blended."""

    th: int
    tw: int
    rows: list[int]
    cols: list[int]
    padded: tuple[int, int]
    window: np.ndarray


def tile_layout(h: int, w: int, cfg: PredictConfig, multiple: int) -> TileLayout:
    """The tiles :func:`predict_maps` cuts a map of (h, w) working px into (``cfg.tile`` the largest)."""
    overlap = max(0, int(cfg.overlap))
    th = tile_size(h, int(cfg.tile), overlap, multiple)
    tw = tile_size(w, int(cfg.tile), overlap, multiple)
    hp, wp = max(h, th), max(w, tw)
    rows, cols = tile_starts(hp, th, overlap), tile_starts(wp, tw, overlap)
    window = np.outer(blend_window(th, overlap if len(rows) > 1 else 0),
                      blend_window(tw, overlap if len(cols) > 1 else 0)).astype(np.float32)
    return TileLayout(th, tw, rows, cols, (hp, wp), window)


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """1D weights of a tile: sin² ramp over ``overlap`` px at both ends, 1 inside, strictly positive."""
    w = np.ones(tile, dtype=np.float32)
    ramp = min(int(overlap), tile // 2)
    if ramp > 0:
        i = np.arange(ramp, dtype=np.float64)
        up = np.sin(0.5 * np.pi * (i + 0.5) / ramp) ** 2
        w[:ramp] = up
        w[tile - ramp:] = up[::-1]
    return w


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m)) * m


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 convolutions natively (oneDNN's check: AVX-512 BF16 / AMX and the like).
    Without it, bf16 autocast is emulated and ~10x *slower* than float32 (measured on an AVX2 EPYC: a training step
    of the default network 21 s instead of 2.1 s)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast where it helps (a CPU with native bf16, CUDA with bf16 support), else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    if device.type == "cpu" and not cpu_has_fast_bf16():
        return contextlib.nullcontext()
    if device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def predict_map(model: nn.Module, image: np.ndarray, cfg: PredictConfig, device: torch.device | None = None,
                channel: int | None = None) -> np.ndarray:
    """One output channel's probabilities (float32 (H, W) in [0, 1]) of a normalised working-scale micrograph:
    ``channel`` (0 = segmentation, 1 = centre), by default the last one (the centre channel when there is one)."""
    maps = predict_maps(model, image, cfg, device)
    return maps[-1 if channel is None else channel]


def predict_maps(model: nn.Module, image: np.ndarray, cfg: PredictConfig, device: torch.device | None = None
                 ) -> np.ndarray:
    """Every output channel's probabilities (float32 (C, H, W) in [0, 1]): channel 0 the segmentation, channel 1
    the centre target when the network has one."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"predict_map expects a 2D image, got shape {image.shape}")
    device = torch.device(device) if device is not None else model_device(model)
    multiple = size_multiple(model)
    h, w = image.shape
    th, tw, rows, cols, (hp, wp), window = tile_layout(h, w, cfg, multiple)
    padded = np.pad(image, ((0, hp - h), (0, wp - w)), mode="reflect") if (hp, wp) != (h, w) else image
    acc = None
    norm = np.zeros((hp, wp), dtype=np.float32)
    coords = [(r, c) for r in rows for c in cols]
    batch = max(1, int(cfg.batch_size))
    channels_last = bool(getattr(cfg, "channels_last", False))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast_context(device, bool(getattr(cfg, "bf16", False))):
            for i in range(0, len(coords), batch):
                chunk = coords[i:i + batch]
                x = torch.from_numpy(np.stack([padded[r:r + th, c:c + tw] for r, c in chunk]))[:, None]
                x = x.to(device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                prob = _forward(model, x, int(getattr(cfg, "tta", 1) or 1)).cpu().numpy()
                if acc is None:
                    acc = np.zeros((prob.shape[1], hp, wp), dtype=np.float32)
                for (r, c), p in zip(chunk, prob):
                    acc[:, r:r + th, c:c + tw] += p * window
                    norm[r:r + th, c:c + tw] += window
    finally:
        model.train(was_training)
    out = acc[:, :h, :w] / norm[None, :h, :w]
    return np.clip(out, 0.0, 1.0, out=out)


def _forward(model: nn.Module, x: torch.Tensor, tta: int) -> torch.Tensor:
    """Probabilities (N, C, H, W) of a batch; with ``tta`` > 1 the mean over that many of the square's symmetries
    (2: a flip, 4: the four rotations, 8: rotations and flips), each mapped back before averaging."""
    if tta not in (1, 2, 4, 8):
        raise ValueError(f"predict.tta must be 1, 2, 4 or 8, not {tta}")
    views = [(0, False), (0, True)] if tta == 2 else [(k, f) for f in (False, True) for k in range(4)][:tta]
    total = None
    for k, flip in views:
        v = torch.rot90(x, k, (2, 3)) if k else x
        v = torch.flip(v, (3,)) if flip else v
        p = torch.sigmoid(model(v).float())
        p = torch.flip(p, (3,)) if flip else p
        p = torch.rot90(p, -k, (2, 3)) if k else p
        total = p if total is None else total + p
    return total / len(views)


class _LoadAll(torch.utils.data.Dataset):
    """Items loaded by index; a failure travels back as the exception object, raised in the caller unchanged."""

    def __init__(self, items: list, load: Callable):
        self.items = items
        self.load = load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            return index, self.load(self.items[index]), None
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            return index, None, exc


def _as_is(x):
    return x


def _read_ahead(dataset: _LoadAll, threads: int = 1) -> Iterator[tuple]:
    """The dataset's items in order, the next ``threads`` of them read in as many threads while the caller works on
    this one (reading and Fourier binning release the GIL: two threads load two 4096² micrographs in the time of
    one)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    n, threads = len(dataset), max(1, int(threads))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="crisp-reader") as pool:
        ahead = deque(pool.submit(dataset.__getitem__, i) for i in range(min(n, threads)))
        for i in range(n):
            item = ahead.popleft().result()
            if i + threads < n:
                ahead.append(pool.submit(dataset.__getitem__, i + threads))
            yield item


def predict_many(model: nn.Module, items: Iterable[T], load: Callable[[T], WorkingImage], cfg: PredictConfig,
                 device: torch.device | None = None, channel: int | None = None, *, processes: bool = True,
                 network: contextlib.AbstractContextManager | None = None
                 ) -> Iterator[tuple[T, WorkingImage, np.ndarray]]:
    """Predict each item in order, yielding ``(item, working_image, probability_map)``.

    ``load(item)`` reads and preprocesses one micrograph; with ``cfg.workers > 0`` it runs ahead of the model, in
    that many DataLoader worker processes (with the ``spawn`` start method ``load`` must be picklable; on the CPU
    the model then uses that many torch threads fewer, at least one, until the iteration ends), or, with
    ``processes=False`` (the CPU, or a process that may not start any, such as a Dask worker), in that many
    threads, the model keeping its own. An exception from ``load`` is raised here, unchanged, when its item's turn
    comes. ``network``: held while the model runs (a lock, where several callers share one model and its cores).
    """
    items = list(items)
    device = torch.device(device) if device is not None else model_device(model)
    dataset = _LoadAll(items, load)
    workers = min(max(0, int(cfg.workers)), len(items)) if len(items) > 1 else 0
    if workers == 0:
        source: Iterable = (dataset[i] for i in range(len(items)))
    elif not processes:
        source, workers = _read_ahead(dataset, workers), 0
    else:
        source = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                             collate_fn=_as_is, prefetch_factor=2)
    # Worker processes read ahead on their own cores; the model takes the rest (oversubscribed OpenMP threads stall
    # each other at every barrier, which costs far more than one thread fewer).
    threads = torch.get_num_threads()
    iterator = iter(source)
    try:
        if workers and device.type == "cpu":
            torch.set_num_threads(max(1, threads - workers))
        for index, working, error in iterator:
            if error is not None:
                raise error
            with network or contextlib.nullcontext():
                prob = predict_map(model, working.image, cfg, device, channel)
            yield items[index], working, prob
    finally:
        torch.set_num_threads(threads)
        if hasattr(iterator, "close"):
            iterator.close()  # a thread reading ahead: wait for it here, not at garbage collection
        del iterator

