"""The 3D mask or map for labels by reprojection: a local MRC file, or a cryoSPARC job's volume/mask output.

    --mask J20:mask | --mask J15:volume (its mask_refine / mask_fsc slot) | --mask /data/mask.mrc
    --volume J15:volume (its map slot, thresholded into a mask) | --volume /data/map.mrc

Volume outputs carry blob slots ``<slot>/path`` (project-relative) and ``<slot>/psize_A``. The slot names tried,
in order, are :data:`MASK_SLOTS` for ``--mask`` and :data:`MAP_SLOTS` for ``--volume``; they follow cryoSPARC's
refinement and Volume Tools outputs as public scripts read them, not a check against a running server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from crisp_ext.errors import InputError
from crisp_ext.footprints import ReferenceMask, read_reference

from .lookup import Source

MASK_SLOTS = ("mask", "mask_refine", "mask_fsc", "mask_fsc_auto")
MAP_SLOTS = ("map", "map_sharp")
INPUT_NAME = "reference"
MRC_SUFFIXES = (".mrc", ".map", ".mrcs")


@dataclass(frozen=True)
class ReferenceSpec:
    """What the user gave: a local ``path`` or a job output ``source``; ``is_mask`` (``--mask``) or a map
    (``--volume``)."""

    text: str
    is_mask: bool
    path: Path | None = None
    source: Source | None = None
    pixel_size: float | None = None  # override for a local file

    @property
    def flag(self) -> str:
        return "--mask" if self.is_mask else "--volume"

    @property
    def slots(self) -> tuple[str, ...]:
        return MASK_SLOTS if self.is_mask else MAP_SLOTS

    @property
    def what(self) -> str:
        return "3D mask" if self.is_mask else "3D map"


def parse_reference(mask=None, volume=None, pixel_size: float | None = None) -> ReferenceSpec | None:
    """``mask`` or ``volume`` (at most one): a path to an MRC file, or ``J15[:output]`` / ``("J15", "volume")``."""
    if mask is not None and volume is not None:
        raise InputError("give either a 3D mask (--mask) or a map (--volume), not both")
    value = mask if mask is not None else volume
    if value is None:
        return None
    is_mask = mask is not None
    if isinstance(value, Path) or (isinstance(value, str) and (value.lower().endswith(MRC_SUFFIXES)
                                                                or Path(value).is_file())):
        return ReferenceSpec(str(value), is_mask, path=Path(value), pixel_size=pixel_size)
    try:
        source = Source.parse(value)
    except InputError as exc:  # CryoSPARCError: add the flag and the other form to the message
        raise InputError(f"{'--mask' if is_mask else '--volume'} {value!r}: {exc}; give JOB[:OUTPUT] (e.g. J15:volume) "
                         f"or an MRC file") from None
    return ReferenceSpec(str(source), is_mask, source=source)


def choose_slot(spec: ReferenceSpec, outputs: Iterable[tuple[str, Iterable[str]]]) -> tuple[str, str]:
    """The (output, slot) of a job to read: the named output (or the only one with a fitting slot) and its first
    slot among ``spec.slots``. ``outputs``: (name, slot names) pairs."""
    outputs = [(name, set(slots)) for name, slots in outputs]
    names = [n for n, _ in outputs]
    if spec.source.output is not None:
        found = [(n, s) for n, s in outputs if n == spec.source.output]
        if not found:
            raise InputError(f"{spec.flag} {spec.text}: job {spec.source.job} has no output "
                             f"{spec.source.output!r} (outputs: {', '.join(names) or 'none'})")
    else:
        found = [(n, s) for n, s in outputs if s & set(spec.slots)]
        if len(found) != 1:
            raise InputError(f"{spec.flag} {spec.text}: job {spec.source.job} has {'no' if not found else 'several'} "
                             f"outputs with a {' / '.join(spec.slots)} slot (outputs: {', '.join(names) or 'none'}); "
                             f"give one as {spec.source.job}:OUTPUT")
    name, slots = found[0]
    slot = next((s for s in spec.slots if s in slots), None)
    if slot is None:
        raise InputError(f"{spec.flag} {spec.text}: output {spec.source.job}:{name} has no "
                         f"{' / '.join(spec.slots)} slot (slots: {', '.join(sorted(slots)) or 'none'})"
                         + ("; give the volume with --volume instead" if spec.is_mask and "map" in slots else ""))
    return name, slot


def blob_of(dset, slot: str, label: str) -> tuple[str, float | None]:
    """The file path (project-relative as cryoSPARC stores it) and pixel size of a volume slot's first row."""
    field = f"{slot}/path"
    if field not in dset or len(dset) == 0:
        raise InputError(f"{label}: no {field} in the output; give a volume or mask output")
    path = str(dset[field][0])
    if isinstance(dset[field][0], bytes):
        path = dset[field][0].decode()
    psize = float(dset[f"{slot}/psize_A"][0]) if f"{slot}/psize_A" in dset else 0.0
    return path, (psize if psize > 0 else None)


def reference_from_file(spec: ReferenceSpec, path: Path, pixel_size: float | None, label: str) -> ReferenceMask:
    """Read the MRC at ``path`` (the pixel size from the dataset when known, else the header)."""
    ref = read_reference(path, pixel_size=pixel_size, is_mask=spec.is_mask)
    return ReferenceMask(ref.volume, ref.pixel_size, ref.is_mask, source=label)


def reference_from_array(spec: ReferenceSpec, data: np.ndarray, pixel_size: float | None, label: str
                         ) -> ReferenceMask:
    """A downloaded volume (``(nz, ny, nx)``) as a reference; the pixel size must be known."""
    volume = np.asarray(data, dtype=np.float32)
    if volume.ndim != 3 or min(volume.shape) < 2:
        raise InputError(f"{label}: expected a 3D volume, got shape {volume.shape}")
    if not pixel_size:
        raise InputError(f"{label}: the pixel size of the {spec.what} is unknown")
    if not np.isfinite(volume).all():
        raise InputError(f"{label}: the {spec.what} holds NaN or infinite values")
    return ReferenceMask(volume, float(pixel_size), spec.is_mask, source=label)


def fetch_reference(spec: ReferenceSpec, blob: str, pixel_size: float | None, label: str,
                    locate: Callable[[str], Path | None], download: Callable[[str], tuple] | None) -> ReferenceMask:
    """The reference from its project path: the local file when ``locate`` finds it, else ``download(path)``
    (``project.download_mrc``: ``(header, array)``)."""
    local = locate(blob)
    if local is not None:
        return reference_from_file(spec, local, pixel_size, f"{label} ({local})")
    if download is None:
        raise InputError(f"{label}: {blob} was not found under the project directory; give --path-map "
                         f"SERVER=LOCAL or the MRC file itself")
    header, data = download(blob)
    if pixel_size is None and header is not None:
        try:
            pixel_size = float(header.xlen) / float(header.nx) if float(header.xlen) > 0 else None
        except (AttributeError, TypeError, ValueError, ZeroDivisionError):
            pixel_size = None
    return reference_from_array(spec, data, pixel_size, f"{label} (downloaded {PurePosixPath(blob).name})")


def find_live_output(project, spec: ReferenceSpec) -> tuple[str, str, str, str]:
    """(job uid, output, slot, the slot's result dtype) of ``spec.source`` on a live instance, checked to hold saved
    data. The dtype is the server's own (``blob`` for volumes and masks), for connecting an input of that type."""
    from cryosparc.errors import APIError

    from .connect import error_text
    from .lookup import output_slots

    try:
        job = project.find_job(spec.source.job)
    except APIError as exc:
        raise InputError(f"{spec.flag} {spec.text}: cannot open job {spec.source.job} in project {project.uid} "
                         f"({error_text(exc)})") from None
    outputs = dict(job.outputs)
    name, slot = choose_slot(spec, [(n, output_slots(o)) for n, o in outputs.items()])
    if not any(r.metafiles for r in outputs[name].results):
        raise InputError(f"{spec.flag} {spec.text}: output {job.uid}:{name} holds no saved data (job status: "
                         f"{job.status}); wait for the job to complete")
    dtype = next((r.dtype for r in outputs[name].results if r.name == slot), None) or slot
    return job.uid, name, slot, str(dtype)


def load_offline(project_dir: Path, spec: ReferenceSpec, path_map) -> ReferenceMask:
    """The reference of ``spec`` in a project directory (a job's output through ``job.json``, or a file)."""
    from .project_files import job_outputs, load_results
    from .paths import locate

    if spec.path is not None:
        return reference_from_file(spec, spec.path, spec.pixel_size, str(spec.path))
    outputs, _ = job_outputs(Path(project_dir), spec.source.job)
    name, slot = choose_slot(spec, [(n, [r.name for r in o.results]) for n, o in outputs.items()])
    label = f"{spec.source.job}:{name}/{slot}"
    result = next(r for r in outputs[name].results if r.name == slot)
    dset = load_results([result], Path(project_dir), path_map, label)
    blob, psize = blob_of(dset, slot, label)
    local = locate(blob, Path(project_dir), path_map)
    if local is None:
        raise InputError(f"{label}: {blob} not found under {project_dir}; give --path-map SERVER=LOCAL or the MRC "
                         f"file itself")
    return reference_from_file(spec, local, psize, label)


__all__ = ["MASK_SLOTS", "MAP_SLOTS", "INPUT_NAME", "ReferenceSpec", "parse_reference", "choose_slot", "blob_of",
           "reference_from_file", "reference_from_array", "fetch_reference", "find_live_output", "load_offline"]
