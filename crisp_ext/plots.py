"""Diagnostic figures (matplotlib, Agg backend, atomic writes): training curves, pick overlays, histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .io.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 110) -> Path:
    plt = _pyplot()
    path = Path(path)
    try:
        # zlib level 1: a noisy micrograph barely compresses at any level; level 1 took half the time (0.2-0.3 s vs
        # 0.45-0.5 s for an 880 px overlay) and gave a smaller file here
        extra = {"pil_kwargs": {"compress_level": 1}} if path.suffix.lower() == ".png" else {}
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", **extra)
    finally:
        plt.close(fig)
    return path


def plot_training_curve(history: Sequence[dict], path: str | Path) -> Path:
    """Training loss (left axis) and validation metrics (right axis) per epoch; CRF fine-tuning epochs follow
    the network's, marked by a vertical line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = list(history)
    x = np.arange(1, len(rows) + 1)
    loss = np.array([r.get("loss", np.nan) for r in rows], dtype=float)
    ax.plot(x, loss, color="tab:red", label="training loss")
    ax.set_xlabel("epoch (all phases)")
    ax.set_ylabel("training loss")
    ax2 = ax.twinx()
    for key, colour in (("val_iou", "tab:blue"), ("val_f1", "tab:green"), ("val_dice", "tab:purple")):
        values = np.array([r.get(key, np.nan) for r in rows], dtype=float)
        if np.isfinite(values).any():
            ok = np.isfinite(values)
            ax2.plot(x[ok], values[ok], "o-", ms=3, color=colour, label=key.replace("_", " "))
    ax2.set_ylabel("validation")
    ax2.set_ylim(0, 1)
    phases = [r.get("phase", "cnn") for r in rows]
    if "crf" in phases:
        ax.axvline(phases.index("crf") + 0.5, color="grey", ls="--", lw=1)
    best = [i + 1 for i, r in enumerate(rows) if r.get("best")]
    if best:
        ax.axvline(best[-1], color="black", ls=":", lw=1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title("training (dotted: best epoch)")
    return _save(fig, Path(path))


def _micrograph_axes(image: np.ndarray, inches: float):
    """A figure showing ``image`` (grey, 1st-99th percentile), its longest side ``inches`` long."""
    plt = _pyplot()
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
    h, w = img.shape
    scale = inches / max(h, w)
    fig, ax = plt.subplots(figsize=(max(3, w * scale), max(3, h * scale)))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    return fig, ax


def _circles(ax, xy: np.ndarray, diameter_px: float, colour: str, linestyle: str = "-") -> None:
    """One collection, not a patch per circle: 5x faster with hundreds of picks."""
    from matplotlib.collections import EllipseCollection

    if len(xy):
        d = np.full(len(xy), float(diameter_px))
        ax.add_collection(EllipseCollection(d, d, np.zeros(len(xy)), units="xy", offsets=xy,
                                            offset_transform=ax.transData, facecolors="none", edgecolors=colour,
                                            linewidths=0.8, linestyles=linestyle))


def plot_overlay(image: np.ndarray, picks_xy, path: str | Path, truth_xy=None, diameter_px: float = 20.0,
                 title: str = "") -> Path:
    """The micrograph with picks (circles) and, optionally, true centres (crosses), in the image's pixels."""
    fig, ax = _micrograph_axes(image, 8.0)
    _circles(ax, np.asarray(picks_xy, dtype=float).reshape(-1, 2), diameter_px, "tab:orange")
    if truth_xy is not None:
        t = np.asarray(truth_xy, dtype=float).reshape(-1, 2)
        ax.plot(t[:, 0], t[:, 1], "+", color="tab:cyan", ms=6, mew=1.3)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, Path(path), dpi=150)


def plot_matches(image: np.ndarray, picks_xy, truth_xy, matched_picks, matched_truth, path: str | Path,
                 diameter_px: float = 20.0, title: str = "") -> Path:
    """The micrograph with picks compared with reference picks, in the image's pixels: picks matched to a
    reference pick (green circles), picks matched to none (red circles: are they particles the reference left
    out?) and reference picks no pick matched (yellow dashed circles)."""
    from matplotlib.lines import Line2D

    fig, ax = _micrograph_axes(image, 10.0)
    picks = np.asarray(picks_xy, dtype=float).reshape(-1, 2)
    truth = np.asarray(truth_xy, dtype=float).reshape(-1, 2)
    hit = np.zeros(len(picks), dtype=bool)
    hit[np.asarray(matched_picks, dtype=int)] = True
    found = np.zeros(len(truth), dtype=bool)
    found[np.asarray(matched_truth, dtype=int)] = True

    missed = truth[~found]
    legend = []
    for xy, colour, label in ((picks[hit], "tab:green", "matched"), (picks[~hit], "red", "no reference pick")):
        _circles(ax, xy, diameter_px, colour)
        legend.append(Line2D([], [], ls="", marker="o", mfc="none", mec=colour, label=f"{label} ({len(xy)})"))
    _circles(ax, missed, diameter_px, "yellow", linestyle="--")
    legend.append(Line2D([], [], ls="", marker="o", mfc="none", mec="yellow", label=f"missed ({len(missed)})"))
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, Path(path), dpi=150)


def plot_histogram(values, path: str | Path, bins: int = 50, title: str = "", xlabel: str = "probability",
                   threshold: float | None = None, log: bool = True) -> Path:
    """A histogram (e.g. of map probabilities or pick scores), optionally with the threshold marked."""
    plt = _pyplot()
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(v, bins=bins, color="tab:blue", log=log and v.size > 0)
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:.3g}")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, Path(path))
