"""The one pipeline behind every entry point (RELION External job, cryoSPARC job, standalone command).

    run(micrographs, config, particles=..., work_dir=...) -> PipelineResult

Contract (adapters rely on it):
- ``micrographs``: every micrograph to pick (core :class:`~crisp_ext.types.Micrograph`).
- ``particles``: the curated picks used for training (original pixels, see :mod:`crisp_ext.types`); may be None
  when ``model_dir`` points at an existing model directory.
- ``model_dir``: an existing model directory to load instead of training; when None, the model is trained and
  saved under ``work_dir / "model"``. A model directory is self-describing (weights, config, scale, finder choice).
- ``reference``: a 3D mask (+ pixel size) for labels by reprojection when the particles carry poses.
- ``skip(micrograph) -> bool``: micrographs already done (resume / RELION continue); they are not picked again.
- ``on_picked(micrograph, picks)``: called as soon as one micrograph is picked, so the caller can write its
  output file at once (atomic writes, resumable jobs).
- ``should_abort() -> bool``: polled between micrographs and epochs; raises :class:`Aborted` when true.
- ``progress``: one callback (see :mod:`crisp_ext.progress`).
The returned picks carry scores (the finder's score; higher is better) in original pixels of each micrograph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import PickerConfig
from .errors import Aborted, InputError  # noqa: F401  (re-exported for adapters)
from .progress import ProgressCallback
from .types import Micrograph, Particles


@dataclass(frozen=True)
class ReferenceMask:
    """A 3D mask (or map to be thresholded) for labels by reprojection; ``volume`` is (z, y, x), cubic."""

    volume: np.ndarray
    pixel_size: float  # Å/px of the volume
    is_mask: bool = True  # False: a map; it is thresholded and dilated into a mask first


@dataclass
class PipelineResult:
    picks: Particles  # all picks of this run (skipped micrographs not included), with scores
    model_dir: Path
    finder: str  # the centre finder used
    finder_params: dict
    threshold: float  # score threshold applied
    counts: dict[str, int] = field(default_factory=dict)  # micrograph id -> number of picks
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    validation: dict = field(default_factory=dict)  # metrics on validation micrographs (when trained)
    score_range: tuple[float, float] = (0.0, 1.0)  # the range the finder's scores live in


def run(
    micrographs: Sequence[Micrograph],
    config: PickerConfig,
    *,
    work_dir: Path,
    particles: Particles | None = None,
    model_dir: Path | None = None,
    reference: ReferenceMask | None = None,
    skip: Callable[[Micrograph], bool] | None = None,
    on_picked: Callable[[Micrograph, Particles], None] | None = None,
    should_abort: Callable[[], bool] | None = None,
    progress: ProgressCallback | None = None,
) -> PipelineResult:
    """Train (or load) a picker and pick every micrograph. See the module docstring for the contract."""
    raise NotImplementedError("the pipeline lands with issue 6")
