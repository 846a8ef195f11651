"""A self-describing model directory: everything needed to pick later, elsewhere, without the training data.

Files (each written atomically; ``model.json`` last, so its presence means the directory is whole):

* ``weights.pt``: the network's state dict (with the CRF's parameters when it has one);
* ``config.toml``: the full :class:`~crisp_ext.config.PickerConfig` it was trained with (preprocessing scale,
  model, CRF, prediction and centre-finder settings);
* ``model.json``: format version, package/torch/smp versions, architecture, working target diameter, label kind,
  CRF kind, plus whatever the caller adds (``info``; :func:`update_model_info` adds keys later).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from .config import PickerConfig, load_config, save_config
from .errors import InputError, one_line
from .io.atomic import atomic_path, atomic_write_text

FORMAT = "crisp-ext model"
FORMAT_VERSION = 1
FILES = ("weights.pt", "config.toml", "model.json")


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode
    config: PickerConfig
    info: dict = field(default_factory=dict)
    path: Path | None = None


def _versions() -> dict:
    from . import __version__
    from ._torchvision_guard import load_smp

    return {"crisp_ext_version": __version__, "torch_version": torch.__version__,
            "smp_version": getattr(load_smp(), "__version__", "unknown")}


def _has_crf(model: nn.Module) -> bool:
    return hasattr(model, "crf") and hasattr(model, "model")


def save_model_dir(path: str | Path, model: nn.Module, cfg: PickerConfig, info: dict | None = None) -> Path:
    """Write ``model`` and ``cfg`` (and ``info``) into directory ``path`` (created if needed); returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    with atomic_path(path / "weights.pt") as tmp:
        tmp.write_bytes(buffer.getvalue())
    save_config(cfg, path / "config.toml")
    meta = dict(info or {})
    meta.update({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder,
        "target_diameter_px": cfg.preprocess.target_diameter_px,
        "label_kind": cfg.labels.kind,
        "crf": cfg.crf.kind if _has_crf(model) else "none",
        "parameters": int(sum(p.numel() for p in model.parameters())),
        **_versions(),
    })
    atomic_write_text(path / "model.json", json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
    return path


def read_model_info(path: str | Path) -> dict:
    """The ``model.json`` of a model directory (checked)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: model directory not found; give the directory written by training "
                         f"(it holds {', '.join(FILES)})")
    if not (path / "model.json").exists() and (path / "model" / "model.json").is_file():
        # the folder given to `crisp-ext train --out` (or a RELION/cryoSPARC job's) rather than its model
        raise InputError(f"{path}: not a model directory but the output folder of a training; give {path / 'model'}")
    for name in FILES:
        if not (path / name).is_file():
            raise InputError(f"{path}: incomplete model directory, {name} is missing; copy the whole directory or "
                             f"train again")
    try:
        info = json.loads((path / "model.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path / 'model.json'}: cannot read ({exc.__class__.__name__}: {exc}); "
                         f"the model directory is damaged") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise InputError(f"{path / 'model.json'}: not a crisp-ext model description")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"{path}: model format version {version!r} is newer than this crisp-ext reads "
                         f"({FORMAT_VERSION}); update crisp-ext")
    return info


def load_model_dir(path: str | Path, device: torch.device | str | None = None) -> LoadedModel:
    """Rebuild the network of a model directory and load its weights (eval mode) on ``device`` (default: CUDA
    when present, else CPU)."""
    from .model import build_model
    from .train import resolve_device

    path = Path(path)
    info = read_model_info(path)
    try:
        cfg = load_config(path / "config.toml")
    except (ValueError, OSError) as exc:
        raise InputError(f"{path / 'config.toml'}: cannot use it ({exc}); the model directory is damaged or from "
                         f"an incompatible crisp-ext") from None
    if "centre_weight" not in (path / "config.toml").read_text():
        # saved before the centre channel existed: its network has the segmentation output alone
        cfg.labels.centre_weight = 0.0
    device = resolve_device(device) if isinstance(device, str) or device is None else torch.device(device)
    # The weights file holds every tensor: do not fetch or read encoder weights again (the path may not exist here).
    model = build_model(replace(cfg.model, encoder_weights=None), cfg.output_channels())
    if info.get("crf", "none") != "none":
        from .crf import build_crf_segmenter

        model = build_crf_segmenter(model, cfg.crf)
    try:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"{path / 'weights.pt'}: weights do not fit the model that config.toml describes "
                         f"({one_line(exc)[:200]}); the directory is damaged or from an incompatible crisp-ext"
                         ) from None
    except Exception as exc:
        raise InputError(f"{path / 'weights.pt'}: cannot read ({exc.__class__.__name__}); the model directory is "
                         f"damaged") from None
    model.to(device).eval()
    return LoadedModel(model, cfg, info, path)


def update_model_info(path: str | Path, **keys) -> dict:
    """Add or replace keys of ``model.json`` (atomic rewrite); returns the new contents."""
    path = Path(path)
    info = read_model_info(path)
    info.update(keys)
    atomic_write_text(path / "model.json", json.dumps(info, indent=1, sort_keys=True, default=str) + "\n")
    return info
