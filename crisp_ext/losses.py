"""Segmentation losses from ``segmentation_models_pytorch.losses`` with per-pixel weights.

``build_loss(spec)`` returns ``loss(logits, target, weight) -> scalar``; ``logits``, ``target`` and ``weight`` are
``(B, 1, H, W)``, the weight is >= 0 with 0 = ignored pixel. ``spec`` is one name or a weighted sum:
``"dice"``, ``"dice+bce"``, ``"0.5*dice+focal"``. Names: dice, jaccard, tversky, lovasz, bce, focal.

How the weight enters: pixel losses (bce, focal) are weighted means. Region losses (dice, jaccard, tversky) get
the probability multiplied by the weight and the target zeroed where the weight is 0, so an ignored pixel adds
nothing and a down-weighted background pixel adds only ``weight * p`` to the false positives; this is the exact
weighted score when foreground weights are 0 or 1 (as :func:`crisp_ext.labels.make_labels` makes them). Lovász
honours only ignored pixels (weight 0); other weights count as 1.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import Tensor

from .errors import InputError

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
NAMES = ("dice", "jaccard", "tversky", "lovasz", "bce", "focal")
_IGNORE = -1


def _losses():
    from ._torchvision_guard import load_smp

    return load_smp().losses


def _region(cls, **kwargs) -> LossFn:
    fn = cls(mode="binary", from_logits=False, **kwargs)

    def loss(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        prob = torch.sigmoid(logits.float())
        return fn(prob * weight, target * (weight > 0))

    return loss


def _pixelwise(fn) -> LossFn:
    def loss(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        per_pixel = fn(logits.float(), target).reshape(weight.shape)
        return (per_pixel * weight).sum() / weight.sum().clamp_min(1e-6)

    return loss


def _lovasz(cls) -> LossFn:
    fn = cls(mode="binary", ignore_index=_IGNORE)

    def loss(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        return fn(logits.float(), torch.where(weight > 0, target, torch.full_like(target, _IGNORE)))

    return loss


def single_loss(name: str) -> LossFn:
    L = _losses()
    if name == "dice":
        return _region(L.DiceLoss)
    if name == "jaccard":
        return _region(L.JaccardLoss)
    if name == "tversky":  # alpha weighs false positives, beta false negatives (smp's defaults: 0.5, 0.5)
        return _region(L.TverskyLoss, alpha=0.3, beta=0.7)
    if name == "lovasz":
        return _lovasz(L.LovaszLoss)
    if name == "bce":
        return _pixelwise(L.SoftBCEWithLogitsLoss(reduction="none"))
    if name == "focal":
        return _pixelwise(L.FocalLoss(mode="binary", reduction="none"))
    raise InputError(f"unknown loss {name!r}; use one of {', '.join(NAMES)} or a sum such as 'dice+bce'")


_TERM = re.compile(r"^\s*(?:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*\*\s*)?([a-z]+)\s*$")


def parse_spec(spec: str) -> list[tuple[float, str]]:
    """``"0.5*dice+bce"`` -> ``[(0.5, "dice"), (1.0, "bce")]``."""
    terms = []
    for part in str(spec).lower().split("+"):
        m = _TERM.match(part)
        if not m or m.group(2) not in NAMES:
            raise InputError(f"cannot read loss {spec!r}: term {part.strip()!r}; use names from "
                             f"{', '.join(NAMES)} joined by '+', each optionally as 'weight*name'")
        terms.append((float(m.group(1)) if m.group(1) else 1.0, m.group(2)))
    return terms


def build_loss(spec: str) -> LossFn:
    """The loss named by ``spec`` (see the module docstring)."""
    terms = [(w, single_loss(name)) for w, name in parse_spec(spec)]

    def loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        if weight is None:
            weight = torch.ones_like(target)
        total = None
        for w, fn in terms:
            value = w * fn(logits, target, weight)
            total = value if total is None else total + value
        return total

    return loss
