"""Segmentation losses from ``segmentation_models_pytorch.losses`` with per-pixel weights.

``build_loss(spec)`` returns ``loss(logits, target, weight) -> scalar``; ``logits``, ``target`` and ``weight`` are
``(B, 1, H, W)``, the weight is >= 0 with 0 = ignored pixel. ``spec`` is one name or a weighted sum:
``"dice"``, ``"dice+bce"``, ``"0.5*dice+focal"``. Names: dice, jaccard, tversky, lovasz, bce, focal, nnpu.

How the weight enters: pixel losses (bce, focal) are weighted means. Region losses (dice, jaccard, tversky) get
the probability multiplied by the weight and the target zeroed where the weight is 0, so an ignored pixel adds
nothing and a down-weighted background pixel adds only ``weight * p`` to the false positives; this is the exact
weighted score when foreground weights are 0 or 1 (as :func:`crisp_ext.labels.make_labels` makes them). Lovász
honours only ignored pixels (weight 0); other weights count as 1.

``nnpu`` is binary cross-entropy as a positive-unlabelled risk (Kiryo et al. 2017, non-negative form), for
curated picks that leave particles out: label-0 pixels are *unlabelled*, a fraction ``prior`` of them (the
argument of :func:`build_loss`) assumed to belong to unpicked particles that look like the picked ones. With P the
labelled pixels, U the unlabelled, ``ℓ±`` the BCE of a pixel taken as particle / background and ``N = |P| + |U|``:
``risk = (|P| + prior·|U|)/N · mean_P ℓ+  +  |U|/N · max(0, mean_U ℓ- − prior · mean_P ℓ-)``. With ``prior = 0`` it
is plain BCE; the ``max`` keeps the estimated background risk from going negative (over-fitting to the positives).
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import Tensor

from .config import LOSS_NAMES as NAMES
from .errors import InputError

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
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


def nnpu_loss(prior: float) -> LossFn:
    """Non-negative positive-unlabelled BCE with ``prior`` = the fraction of unlabelled pixels that are particle
    (see the module docstring); pixel weights weigh every mean (0 = ignored)."""
    prior = float(prior)
    if not 0.0 <= prior < 1.0:
        raise InputError(f"the positive-unlabelled prior must be in [0, 1), got {prior}")
    sp = torch.nn.functional.softplus

    def loss(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        z = logits.float()
        wp = weight * (target > 0.5)
        wu = weight * (target <= 0.5)
        n_p, n_u = wp.sum(), wu.sum()
        n = (n_p + n_u).clamp_min(1e-6)
        pos_as_pos = (sp(-z) * wp).sum() / n_p.clamp_min(1e-6)  # BCE of labelled pixels taken as particle
        pos_as_neg = (sp(z) * wp).sum() / n_p.clamp_min(1e-6)   # ... and as background
        unl_as_neg = (sp(z) * wu).sum() / n_u.clamp_min(1e-6)
        negative = unl_as_neg - prior * pos_as_neg  # pos_as_neg is 0 without labelled pixels
        return (n_p + prior * n_u) / n * pos_as_pos + n_u / n * torch.clamp(negative, min=0.0)

    return loss


def single_loss(name: str, prior: float = 0.0) -> LossFn:
    if name == "nnpu":
        return nnpu_loss(prior)
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


def build_loss(spec: str, prior: float = 0.0) -> LossFn:
    """The loss named by ``spec`` (see the module docstring); ``prior`` is the ``nnpu`` term's class prior."""
    terms = [(w, single_loss(name, prior)) for w, name in parse_spec(spec)]

    def loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        if weight is None:
            weight = torch.ones_like(target)
        total = None
        for w, fn in terms:
            value = w * fn(logits, target, weight)
            total = value if total is None else total + value
        return total

    return loss
