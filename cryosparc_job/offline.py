"""Offline mode: a cryoSPARC project directory without a running instance.

Reads exposures and particles from the jobs' ``.cs`` files (through ``J#/job.json``, v4 flat ``output_results`` or
v5 ``spec.outputs``; else a ``.csg`` or bare ``.cs`` next to it; or a ``.cs``/``.csg`` path given directly), runs the
same pipeline, and writes ``<out>/<name>.cs`` (particles with ``location`` + ``pick_stats``) and ``<out>/<name>.csg``
for cryoSPARC's "Import Result Group". The project's own files are only read.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cryosparc.dataset import Dataset

from crisp_ext.errors import InputError
from crisp_ext.footprints import reference_unused
from crisp_ext.io.atomic import atomic_path, atomic_write_text
from crisp_ext.progress import ProgressCallback, ProgressEvent, silent
from crisp_ext.types import Micrograph

from . import records, settings
from .lookup import Source, check_uid
from .paths import PathMap, locate
from .picking import curated_particles, pick_to_dataset
from .project_files import read_output
from .reference import load_offline, parse_reference

DEFAULT_NAME = "crisp_particles"


@dataclass
class OfflineRun:
    cs_path: Path
    csg_path: Path
    result: object  # crisp_ext.pipeline.PipelineResult
    particles: Dataset
    micrographs: list[Micrograph] = field(default_factory=list)


# -- writing ---------------------------------------------------------------------------------------------------------

def write_result_group(dset: Dataset, out_dir: str | Path, name: str = DEFAULT_NAME, *, title: str = "",
                       description: str = "", version: str | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.cs`` and the ``<name>.csg`` that Import Result Group reads (atomically, .cs first)."""
    import yaml

    from .connect import tools_version

    out_dir = Path(out_dir)
    cs_path, csg_path = out_dir / f"{name}.cs", out_dir / f"{name}.csg"
    with atomic_path(cs_path) as tmp, open(tmp, "wb") as fh:
        dset.save(fh)
    n = len(dset)
    doc = {
        "created": _dt.datetime.now(),
        "group": {"description": description, "name": "particles", "title": title or "Picked particles",
                  "type": "particle"},
        "results": {slot: {"metafile": f">{cs_path.name}", "num_items": n, "type": f"particle.{slot}"}
                    for slot in dset.prefixes()},
        "version": version or f"v{tools_version()}",
    }
    atomic_write_text(csg_path, yaml.safe_dump(doc, sort_keys=False))
    return cs_path, csg_path


# -- the offline run -------------------------------------------------------------------------------------------------

def pick_offline(project_dir: str | Path, exposures, out_dir: str | Path, *, particles=None,
                 diameter_A: float | None = None, config=None, model_dir: str | Path | None = None,
                 path_map: Sequence[str] | PathMap = (), name: str = DEFAULT_NAME, work_dir: str | Path | None = None,
                 progress: ProgressCallback | None = None, mask=None, volume=None, placement=None) -> OfflineRun:
    """Pick the micrographs of ``exposures`` in a project directory; write ``<out_dir>/<name>.cs`` + ``.csg``.

    ``exposures`` / ``particles``: ``("J8", "exposures")``, ``"J8"``, ``"J8:exposures"`` or a ``.cs``/``.csg``
    path. ``work_dir`` (model, plots) defaults to ``<out_dir>/work``. ``mask`` / ``volume``: a 3D mask or map
    (``"J15:volume"`` or an MRC file) for labels by reprojection when the particles carry ``alignments3D`` poses.
    """
    progress = progress or silent
    project_dir = Path(project_dir)
    if not project_dir.is_dir():
        raise InputError(f"project directory {project_dir} not found")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, project_dir)
    pmap = path_map if isinstance(path_map, PathMap) else PathMap.parse(path_map)
    model_dir = Path(model_dir) if model_dir else None
    if model_dir is None and particles is None:
        raise InputError("give curated particles to train on (--particles J12) or a trained model directory "
                         "(--model)")
    cfg = settings.make_config(config, diameter_A)
    settings.check_size(cfg, model_dir)

    exp_data, exp_label = read_output(project_dir, exposures, "exposure", path_map=pmap)
    all_mics = records.micrographs_from_exposures(exp_data, PurePosixPath, where=exp_label)
    if not all_mics:
        raise InputError(f"{exp_label} holds no exposures; nothing to pick")

    def warn(message: str) -> None:
        progress(ProgressEvent("warning", message=message))

    from .files import attach_files

    mics = attach_files(all_mics, lambda m: locate(str(m.meta["micrograph_path"]), project_dir, pmap), warn)
    if not mics:
        raise InputError(f"none of the {len(all_mics)} micrographs of {exp_label} were found under {project_dir} "
                         f"(first: {all_mics[0].meta['micrograph_path']}); give --path-map SERVER=LOCAL if they are "
                         f"elsewhere")
    curated = None
    sources = [("micrographs", exp_label)]
    if particles is not None:
        part_data, part_label = read_output(project_dir, particles, "particle", path_map=pmap)
        sources.append(("curated particles", part_label))
        curated = curated_particles(part_data, mics, part_label, exp_label, have_model=model_dir is not None,
                                    warn=warn)
    reference = None
    ref = parse_reference(mask, volume)
    if ref is not None:
        why = reference_unused(f"{ref.flag} {ref.text}", with_model=model_dir is not None,
                               has_particles=curated is not None, has_poses=curated is not None and curated.has_poses,
                               poses_hint=f"{sources[1][1] if curated is not None else ''} has no alignments3D poses")
        if why:
            warn(why)
        else:
            reference = load_offline(project_dir, ref, pmap)
            sources.append((ref.what, reference.source))
    work = Path(work_dir) if work_dir else out_dir / "work"
    progress(ProgressEvent("prepare", message=settings.summary_text(cfg, sources, model_dir, work)))
    result, dset = pick_to_dataset(mics, cfg, work_dir=work, curated=curated, model_dir=model_dir,
                                   reference=reference, progress=progress, allocate=records.allocate_particles,
                                   placement=placement)
    picks = result.picks
    desc = f"Picked by CRISP (crisp-ext) on {exp_label}" + (f", trained on {sources[1][1]}" if curated else "")
    cs_path, csg_path = write_result_group(dset, out_dir, name, title="CRISP picked particles", description=desc,
                                           version=_project_version(project_dir, exposures))
    progress(ProgressEvent("done", message=f"wrote {len(picks)} particles on {len(result.counts)} micrographs to "
                                           f"{csg_path} (import it with Import Result Group)"))
    return OfflineRun(cs_path, csg_path, result, dset, mics)


def _check_out_dir(out_dir: Path, project_dir: Path) -> None:
    out, proj = out_dir.resolve(), project_dir.resolve()
    if out == proj or (out.is_relative_to(proj) and len(out.relative_to(proj).parts) >= 1
                       and _is_job_dir(out.relative_to(proj).parts[0])):
        raise InputError(f"output directory {out_dir} is the project directory or one of its job directories; "
                         f"give a separate directory (the project's files are never modified)")
    from crisp_ext.io.outdir import prepare_output_dir, remove_leftovers

    prepare_output_dir(out_dir, option="--out")
    remove_leftovers(out_dir)


def _is_job_dir(part: str) -> bool:
    try:
        check_uid("job", part)
        return True
    except InputError:
        return False


def _project_version(project_dir: Path, exposures) -> str | None:
    """The cryoSPARC version recorded in the exposures job's job.json (for the .csg), if any."""
    try:
        src = Source.parse(exposures)
        doc = json.loads((project_dir / src.job / "job.json").read_text())
    except (InputError, OSError, ValueError):  # a .cs path, or no job.json: the .csg gets the tools version
        return None
    version = doc.get("version")
    return str(version) if isinstance(version, str) and version.startswith("v") else None
