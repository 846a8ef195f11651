"""Make torchvision importable against a CPU-only torch.

The registry's torchvision wheels are CUDA-linked. Against a CPU build of torch their compiled part fails to
load, and ``import torchvision`` then dies with "operator torchvision::nms does not exist" because its fake-kernel
registrations need the operator schemas that the compiled part would have defined. segmentation_models_pytorch
and timm import torchvision, so crisp-ext would not import at all.

:func:`install` defines the two missing schemas with :mod:`torch.library` *only* when the compiled part cannot be
loaded. Nothing in crisp-ext calls ``torchvision.ops.nms`` (it would still raise); smp, timm and the transforms work.
Call it before the first import of torchvision, smp or timm.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_installed = False
_library = None  # keep a reference: a torch.library.Library unregisters its definitions when collected


def _compiled_part_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to guard
    candidates = []
    for location in spec.submodule_search_locations:
        candidates += glob.glob(os.path.join(location, "_C.*so")) + glob.glob(os.path.join(location, "_C.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
        return True
    except (OSError, ImportError, RuntimeError):
        return False


def install() -> bool:
    """Register placeholder schemas if needed. Returns True when the guard had to step in."""
    global _installed, _library
    if _installed:
        return _library is not None
    _installed = True
    if "torchvision" in sys.modules:
        return False
    import torch

    if hasattr(torch.ops, "torchvision") and _has_op(torch, "nms"):
        return False
    if _compiled_part_loads():
        return False
    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


def _has_op(torch, name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def load_smp():
    """Import and return ``segmentation_models_pytorch`` with the guard in place."""
    install()
    import segmentation_models_pytorch as smp

    return smp
