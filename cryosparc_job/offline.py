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
from cryosparc.errors import DatasetLoadError

from crisp_ext.errors import InputError
from crisp_ext.io.atomic import atomic_path, atomic_write_text
from crisp_ext.progress import ProgressCallback, ProgressEvent, silent
from crisp_ext.types import Micrograph, micrographs_by_id

from . import records, settings
from .lookup import KINDS, Source, check_uid
from .paths import NO_MAP, PathMap, locate
from .reference import load_offline, parse_reference

DEFAULT_NAME = "crisp_particles"


@dataclass(frozen=True)
class Result:
    """One slot of a job output as ``job.json`` lists it."""

    name: str
    metafiles: tuple[str, ...]
    passthrough: bool = False


@dataclass(frozen=True)
class OutputInfo:
    type: str
    results: tuple[Result, ...]


@dataclass
class OfflineRun:
    cs_path: Path
    csg_path: Path
    result: object  # crisp_ext.pipeline.PipelineResult
    particles: Dataset
    micrographs: list[Micrograph] = field(default_factory=list)


# -- reading ---------------------------------------------------------------------------------------------------------

def job_outputs(project_dir: Path, job_uid: str) -> tuple[dict[str, OutputInfo], dict]:
    """The outputs listed in ``<project>/<job>/job.json`` (either layout) and the document itself."""
    path = Path(project_dir) / job_uid / "job.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} not found: is {project_dir} a cryoSPARC project directory with job {job_uid}?"
                         ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read job.json ({exc})") from None
    outputs: dict[str, OutputInfo] = {}
    if isinstance(doc.get("output_results"), list):  # v4: flat list of results, grouped by group_name
        types = {g.get("name"): g.get("type", "") for g in doc.get("output_result_groups", []) or []}
        grouped: dict[str, list[Result]] = {}
        for r in doc["output_results"]:
            group = r.get("group_name")
            if not group or not r.get("name"):
                continue
            grouped.setdefault(group, []).append(
                Result(r["name"], tuple(r.get("metafiles") or ()), bool(r.get("passthrough"))))
            types.setdefault(group, str(r.get("type", "")).split(".")[0])
        outputs = {g: OutputInfo(types.get(g, ""), tuple(rs)) for g, rs in grouped.items()}
    elif isinstance(doc.get("spec"), dict) and isinstance(doc["spec"].get("outputs"), dict):  # v5: the Job model
        for name, out in doc["spec"]["outputs"].items():
            results = tuple(Result(r["name"], tuple(r.get("metafiles") or ()), bool(r.get("passthrough")))
                            for r in out.get("results", []) if r.get("name"))
            outputs[name] = OutputInfo(str(out.get("type", "")), results)
    else:
        raise InputError(f"{path}: unknown job.json layout (neither output_results nor spec.outputs)")
    return outputs, doc


def _resolve_metafile(metafile: str, project_dir: Path, base: Path | None, path_map: PathMap) -> Path:
    if metafile.startswith(">"):
        return (base or project_dir) / metafile[1:]
    p = PurePosixPath(metafile)
    return Path(path_map.apply(metafile)) if p.is_absolute() else Path(project_dir) / p


def _load(files: dict[Path, list[str]], where: str) -> Dataset:
    """Load each file's slots and join them on uid."""
    parts = []
    for path, slots in files.items():
        if not path.is_file():
            raise InputError(f"{where}: metafile {path} not found; is the project directory complete?")
        try:
            parts.append(Dataset.load(path, prefixes=sorted(set(slots)) or None))
        except (DatasetLoadError, OSError, ValueError, TypeError) as exc:
            raise InputError(f"{where}: cannot read {path} ({exc})") from None
    return parts[0] if len(parts) == 1 else Dataset.innerjoin_many(*parts)


def _load_results(results: Sequence[Result], project_dir: Path, path_map: PathMap, where: str) -> Dataset:
    files: dict[Path, list[str]] = {}
    for r in results:
        if not r.metafiles:
            raise InputError(f"{where}: slot {r.name} has no saved data; was the job completed?")
        metafile = r.metafiles[0] if r.passthrough else r.metafiles[-1]
        files.setdefault(_resolve_metafile(metafile, project_dir, None, path_map), []).append(r.name)
    return _load(files, where)


def read_csg(path: Path, project_dir: Path | None = None, path_map: PathMap = NO_MAP,
             slots: Sequence[str] | None = None) -> Dataset:
    """A result group file: ``results: {slot: {metafile: '>file.cs', ...}}`` (``>`` = next to the .csg)."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read result group ({exc})") from None
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, dict) or not results:
        raise InputError(f"{path}: not a cryoSPARC result group (.csg) file: no results")
    files: dict[Path, list[str]] = {}
    for slot, entry in results.items():
        if slots is not None and slot not in slots:
            continue
        metafile = str((entry or {}).get("metafile", ""))
        if not metafile:
            raise InputError(f"{path}: slot {slot} has no metafile")
        files.setdefault(_resolve_metafile(metafile, Path(project_dir or Path(path).parent), Path(path).parent,
                                           path_map), []).append(slot)
    if not files:
        raise InputError(f"{path}: none of the slots {list(slots or [])} are in this result group")
    return _load(files, str(path))


def read_output(project_dir: str | Path, source, kind: str, *, path_map: PathMap = NO_MAP) -> tuple[Dataset, str]:
    """The dataset of a job output (or a ``.cs``/``.csg`` path) and a label for messages.

    ``kind`` ("exposure" or "particle") chooses the output when none is named and is checked: exposures must have
    ``micrograph_blob``, particles ``location``.
    """
    project_dir = Path(project_dir)
    slot, what = KINDS[kind]
    text = str(source) if not isinstance(source, (tuple, list, Source)) else None
    if text and text.endswith((".cs", ".csg")):
        path = Path(text)
        if not path.is_file() and (project_dir / text).is_file():
            path = project_dir / text
        if not path.is_file():
            raise InputError(f"{text}: file not found")
        dset = read_csg(path, project_dir, path_map) if path.suffix == ".csg" else _load({path: []}, str(path))
        _check_slot(dset, slot, str(path), what)
        return dset, str(path)
    src = Source.parse(source)
    if not (project_dir / src.job).is_dir():
        raise InputError(f"job {src.job} not found in {project_dir} (no {src.job} directory); check the job uid and "
                         f"the project directory")
    if (project_dir / src.job / "job.json").is_file():
        outputs, _ = job_outputs(project_dir, src.job)
        name = _choose_output(outputs, src, slot, what)
        wanted = {slot, "ctf", "mscope_params", "alignments3D"}
        chosen = [r for r in outputs[name].results if r.name in wanted]
        if slot not in {r.name for r in chosen}:
            have = sorted({r.name for r in outputs[name].results})
            raise InputError(f"output {src.job}:{name} has no {slot} slot (slots: {', '.join(have)}); give {what}")
        return _load_results(chosen, project_dir, path_map, f"{src.job}:{name}"), f"{src.job}:{name}"
    return _fallback(project_dir, src, slot, what, path_map)


def _choose_output(outputs: dict[str, OutputInfo], src: Source, slot: str, what: str) -> str:
    if src.output is not None:
        if src.output not in outputs:
            raise InputError(f"job {src.job} has no output {src.output!r} (outputs: {', '.join(outputs) or 'none'}); "
                             f"give {what}")
        return src.output
    fitting = [n for n, o in outputs.items() if slot in {r.name for r in o.results}]
    if len(fitting) != 1:
        raise InputError(f"job {src.job} has {'no' if not fitting else 'several'} outputs with a {slot} slot "
                         f"(outputs: {', '.join(outputs) or 'none'}); give one as {src.job}:OUTPUT_NAME")
    return fitting[0]


def _fallback(project_dir: Path, src: Source, slot: str, what: str, path_map: PathMap) -> tuple[Dataset, str]:
    """Without job.json: ``J#/J#_<output>.csg``, then ``J#/J#_<output>.cs`` (+ its passthrough file)."""
    if src.output is None:
        raise InputError(f"{project_dir / src.job / 'job.json'} not found; name the output as {src.job}:OUTPUT_NAME")
    job_dir = project_dir / src.job
    label = f"{src.job}:{src.output}"
    for csg in (job_dir / f"{src.job}_{src.output}.csg", job_dir / f"{src.output}.csg"):
        if csg.is_file():
            dset = read_csg(csg, project_dir, path_map)
            _check_slot(dset, slot, label, what)
            return dset, label
    main = [p for p in (job_dir / f"{src.job}_{src.output}.cs", job_dir / f"{src.output}.cs") if p.is_file()]
    if not main:
        raise InputError(f"no job.json, .csg or .cs for {label} in {job_dir}; check the job uid and output name")
    files = {main[0]: []}
    passthrough = job_dir / f"{src.job}_passthrough_{src.output}.cs"
    if passthrough.is_file():
        files[passthrough] = []
    dset = _load(files, label)
    _check_slot(dset, slot, label, what)
    return dset, label


def _check_slot(dset: Dataset, slot: str, label: str, what: str) -> None:
    if slot not in dset.prefixes():
        raise InputError(f"{label} has no {slot} slot (slots: {', '.join(dset.prefixes())}); give {what}")


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
                 progress: ProgressCallback | None = None, mask=None, volume=None) -> OfflineRun:
    """Pick the micrographs of ``exposures`` in a project directory; write ``<out_dir>/<name>.cs`` + ``.csg``.

    ``exposures`` / ``particles``: ``("J8", "exposures")``, ``"J8"``, ``"J8:exposures"`` or a ``.cs``/``.csg``
    path. ``work_dir`` (model, plots) defaults to ``<out_dir>/work``. ``mask`` / ``volume``: a 3D mask or map
    (``"J15:volume"`` or an MRC file) for labels by reprojection when the particles carry ``alignments3D`` poses.
    """
    from crisp_ext import pipeline

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
        curated, unmatched = records.particles_from_dataset(part_data, mics, where=part_label)
        if unmatched:
            warn(f"{unmatched} of {len(part_data)} curated particles lie on micrographs not available from "
                 f"{exp_label}; they are not used")
        if not len(curated) and model_dir is None:
            raise InputError(f"none of the {len(part_data)} particles of {part_label} lie on the micrographs of "
                             f"{exp_label}; give the exposures the particles were picked on")
    reference = None
    ref = parse_reference(mask, volume)
    if ref is not None:
        if model_dir is not None or curated is None or not curated.has_poses:
            warn(f"{ref.flag} {ref.text} is not used: " + ("picking with a trained model" if model_dir is not None
                 or curated is None else f"{sources[1][1]} carries no alignments3D poses"))
        else:
            reference = load_offline(project_dir, ref, pmap)
            sources.append((ref.what, reference.source))
    work = Path(work_dir) if work_dir else out_dir / "work"
    progress(ProgressEvent("prepare", message=settings.summary_text(cfg, sources, model_dir, work)))
    picker_box = {}
    result = pipeline.run(mics, cfg, work_dir=work, particles=curated if curated is not None and len(curated) else None,
                          model_dir=model_dir, reference=reference,
                          on_ready=lambda p: picker_box.setdefault("picker", p), progress=progress)
    picks = result.picks
    dset = records.fill_particles(records.allocate_particles(len(picks)), picks, micrographs_by_id(mics),
                                  settings.min_dist_A(mics, picker_box["picker"].config), result.score_range)
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
