"""Reading a cryoSPARC project directory without a running instance: a job's outputs from ``J#/job.json`` (v4 flat
``output_results`` or v5 ``spec.outputs``), else a ``.csg`` or bare ``.cs`` next to it, or a ``.cs``/``.csg`` path
given directly. Only reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryosparc.dataset import Dataset
from cryosparc.errors import DatasetLoadError

from crisp_ext.errors import InputError

from .lookup import KINDS, Source
from .paths import NO_MAP, PathMap


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


def load_results(results: Sequence[Result], project_dir: Path, path_map: PathMap, where: str) -> Dataset:
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
        return load_results(chosen, project_dir, path_map, f"{src.job}:{name}"), f"{src.job}:{name}"
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
