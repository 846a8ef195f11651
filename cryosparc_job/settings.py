"""Picker settings for a cryoSPARC run: the config from its possible forms, the job description (markdown), the
parameters summary for the event log, and the NMS distance written as ``location/min_dist_A``."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

from crisp_ext.config import PickerConfig
from crisp_ext.errors import InputError
from crisp_ext.types import Micrograph


def make_config(config=None, diameter_A: float | None = None, overrides: Mapping[str, object] | None = None
                ) -> PickerConfig:
    """A :class:`PickerConfig` from ``config`` (None, a PickerConfig, a TOML/YAML/JSON path, or a dict of dotted
    overrides such as ``{"train.epochs": 20}``), then ``overrides``, then ``diameter_A``."""
    from crisp_ext.config import load_config

    if config is None:
        cfg = PickerConfig()
    elif isinstance(config, PickerConfig):
        cfg = PickerConfig.from_dict(config.to_dict())
    elif isinstance(config, (str, Path)):
        cfg = load_config(config)
    elif isinstance(config, Mapping):
        cfg, overrides = PickerConfig(), {**dict(config), **dict(overrides or {})}
    else:
        raise InputError(f"config must be a PickerConfig, a config file path or a dict of overrides, not "
                         f"{type(config).__name__}")
    changes = dict(overrides or {})
    if diameter_A is not None:
        if not float(diameter_A) > 0:
            raise InputError(f"particle diameter {diameter_A!r} Å must be positive")
        changes["particle.diameter_A"], changes["particle.diameter_px"] = float(diameter_A), None
    if changes:
        cfg = cfg.updated(changes)
    return cfg


def check_size(cfg: PickerConfig, model_dir: Path | None) -> None:
    """Training needs the particle size; a model directory brings its own."""
    if model_dir is None and not (cfg.particle.diameter_A or cfg.particle.diameter_px):
        raise InputError("no particle diameter: give it in Å (diameter_A=..., --diameter 190A) or in the config "
                         "([particle] diameter_A)")


def versions() -> dict[str, str]:
    import crisp_ext

    from .connect import tools_version

    return {"crisp-ext": crisp_ext.__version__, "cryosparc-tools": tools_version(),
            "python": platform.python_version()}


def key_parameters(cfg: PickerConfig, model_dir: Path | None) -> list[tuple[str, str]]:
    """The settings a user looks for, as (name, value) pairs."""
    p = cfg.particle
    size = f"{p.diameter_A:g} Å" if p.diameter_A else (f"{p.diameter_px:g} px" if p.diameter_px else "from model")
    rows = [("particle diameter", size)]
    if model_dir is not None:
        rows.append(("model", f"loaded from {model_dir}"))
    else:
        t = cfg.train
        rows += [("network", f"{cfg.model.arch} / {cfg.model.encoder}"),
                 ("training", f"{t.epochs} epochs, {t.patch_size}² patches, loss {t.loss}, lr {t.lr:g}"),
                 ("CRF", cfg.crf.kind), ("labels", cfg.labels.kind)]
    c = cfg.centres
    chosen = "the model's" if model_dir is not None else "chosen on validation micrographs"
    if model_dir is None:
        rows.append(("working particle diameter", f"{cfg.preprocess.target_diameter_px:g} px"))
    rows += [("centre finder", chosen if c.finder == "auto" else c.finder),
             ("threshold", chosen if c.threshold is None else f"{c.threshold:g}"),
             ("edge rule", c.edge),
             ("edge margin", "the curated picks'" if c.edge_margin == "auto" else f"{c.edge_margin:g} diameters"),
             ("device", cfg.train.device)]
    return rows


def description(cfg: PickerConfig, sources: Sequence[tuple[str, str]], model_dir: Path | None) -> str:
    """Markdown for the External job's description: inputs, key parameters, versions."""
    lines = ["CRISP particle picking (segmentation network + centre finding), run by crisp-ext.", "",
             "| input | source |", "|---|---|"]
    lines += [f"| {name} | {src} |" for name, src in sources]
    lines += ["", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in key_parameters(cfg, model_dir)]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + "."]
    return "\n".join(lines)


def summary_text(cfg: PickerConfig, sources: Sequence[tuple[str, str]], model_dir: Path | None,
                 work_dir: Path) -> str:
    """The parameters summary logged at the start of a run (one block)."""
    rows = [(name, src) for name, src in sources] + key_parameters(cfg, model_dir)
    rows.append(("work directory", str(work_dir)))
    width = max(len(k) for k, _ in rows)
    return "CRISP picker parameters:\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def min_dist_A(micrographs: Sequence[Micrograph], cfg: PickerConfig) -> dict[str, float]:
    """Per micrograph, the de-duplication distance used by the picker, in Å (0 where the pixel size is unknown)."""
    from crisp_ext.pipeline import micrograph_diameter, micrograph_pixel_size

    out = {}
    for mic in micrographs:
        ps = micrograph_pixel_size(mic, cfg) or 0.0
        out[mic.id] = float(cfg.centres.min_distance * micrograph_diameter(mic, cfg) * ps) if ps else 0.0
    return out
