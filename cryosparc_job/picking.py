"""What live and offline cryoSPARC runs share: host records -> core types -> :func:`crisp_ext.pipeline.run` ->
a particles dataset (``location`` + ``pick_stats``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from cryosparc.dataset import Dataset

from crisp_ext.errors import InputError
from crisp_ext.progress import ProgressCallback
from crisp_ext.types import Micrograph, Particles, micrographs_by_id

from . import records, settings


def curated_particles(part_data: Dataset, mics: Sequence[Micrograph], part_label: str, exp_label: str, *,
                      have_model: bool, warn: Callable[[str], None]) -> Particles:
    """The curated particles that lie on ``mics`` (those elsewhere are reported and left out); none at all is an
    error unless a trained model is given."""
    curated, unmatched = records.particles_from_dataset(part_data, mics, where=part_label)
    if unmatched:
        warn(f"{unmatched} of {len(part_data)} curated particles lie on micrographs not available from "
             f"{exp_label}; they are not used")
    if not len(curated) and not have_model:
        raise InputError(f"none of the {len(part_data)} particles of {part_label} lie on the micrographs of "
                         f"{exp_label}; give the exposures the particles were picked on")
    return curated


def pick_to_dataset(mics: Sequence[Micrograph], cfg, *, work_dir: Path, curated: Particles | None,
                    model_dir: Path | None, reference, progress: ProgressCallback,
                    allocate: Callable[[int], Dataset], placement=None, declared_only: bool = False):
    """Train (or load) and pick through the one pipeline; returns ``(PipelineResult, dataset)`` with the dataset
    from ``allocate(n)`` filled with the ``n`` picks (``declared_only``: only the fields it was allocated with)."""
    from crisp_ext import pipeline

    result = pipeline.run(mics, cfg, work_dir=work_dir, particles=curated if curated is not None and len(curated)
                          else None, model_dir=model_dir, reference=reference, progress=progress,
                          placement=placement)
    dset = records.fill_particles(allocate(len(result.picks)), result.picks, micrographs_by_id(mics),
                                  settings.min_dist_A(mics, result.config), declared_only=declared_only)
    return result, dset
