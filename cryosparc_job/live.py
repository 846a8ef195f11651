"""Picking on a live CryoSPARC v5 instance: the picks become the ``particles`` output of a new External job.

    job_uid = pick_live("http://cryosparc:39000", "P3", "W1", particles=("J12", "particles_selected"),
                        exposures=("J8", "exposures"), diameter_A=190, email=..., password=...)

Flow: connect (versions checked) -> check the sources -> create a titled External job (markdown description) ->
connect its inputs to the source outputs (lineage) -> add the ``particles`` output (``location`` + ``pick_stats``)
-> ``with job.run()``: load inputs, get micrograph pixels (mounted project directory, else ``download_mrc`` into
a cache), train or load the picker, pick, ``alloc_output`` + fill + ``save_output``, plots -> completed. Any error
inside ends the job failed with the reason (and re-raises); it is never left running.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from crisp_ext.errors import Aborted, InputError
from crisp_ext.footprints import reference_unused
from crisp_ext.progress import ProgressCallback, ProgressEvent
from crisp_ext.types import Micrograph

from . import records, settings
from .connect import CryoSPARCError, check_version, connect, error_text
from .files import attach_files
from .lookup import find_project, find_source, find_workspace
from .paths import PathMap, locate
from .picking import curated_particles, pick_to_dataset
from .reference import INPUT_NAME as REFERENCE_INPUT
from .reference import find_live_output, parse_reference

DEFAULT_TITLE = "CRISP particle picks"
MICROGRAPHS_INPUT = "micrographs"
PARTICLES_INPUT = "curated_particles"
OUTPUT = "particles"


class JobFailed(RuntimeError):
    """The External job ended failed (its event log holds the traceback); ``__cause__`` is the error."""

    def __init__(self, job_uid: str, error: BaseException):
        super().__init__(f"job {job_uid} failed: {error_text(error)}")
        self.job_uid = job_uid


@dataclass
class LiveRun:
    """What a live run did: the job, the pipeline's result, and the particles dataset it saved."""

    job_uid: str
    project_uid: str
    work_dir: Path
    result: object  # crisp_ext.pipeline.PipelineResult
    particles: object  # cryosparc.dataset.Dataset, as saved
    micrographs: list[Micrograph] = field(default_factory=list)


class EventLog:
    """Messages and progress into the job's event log, echoed to ``echo``.

    Progress events (with a total) update one line per stage in place (``job.log(..., name=...)``), at most every
    ``min_interval`` seconds and always on a stage's last step; other events become their own lines.
    """

    def __init__(self, job, echo: ProgressCallback | None = None, min_interval: float = 1.0):
        self.job, self.echo, self.min_interval = job, echo, min_interval
        self._last: dict[str, float] = {}

    def text(self, message: str) -> None:
        self.job.log(message)
        if self.echo:
            self.echo(ProgressEvent("cryosparc", message=message))

    def warning(self, message: str) -> None:
        self.job.log(message, level="warning")
        if self.echo:
            self.echo(ProgressEvent("warning", message=message))

    def __call__(self, event: ProgressEvent) -> None:
        if self.echo:
            self.echo(event)
        if not event.total:
            self.job.log(event.line())
            return
        now = time.monotonic()
        last = self._last.get(event.stage)
        if last is None or event.done >= event.total or now - last >= self.min_interval:
            self.job.log(event.line(), name=f"crisp-progress-{event.stage}")
            self._last[event.stage] = now


def pick_live(cs_or_url, project: str, workspace: str, particles=None, exposures=None, diameter_A: float | None = None,
              config=None, **options) -> str:
    """Pick on a live instance and save the picks as a new External job's ``particles`` output; returns its uid.

    ``cs_or_url``: a ``cryosparc.tools.CryoSPARC`` or the instance URL (then ``email=``/``password=`` or a saved
    login; ``CRYOSPARC_*`` variables as defaults). ``particles`` / ``exposures``: ``("J12", "particles_selected")``,
    ``"J12"`` (its only suitable output) or ``"J12:particles_selected"``. ``config``: a PickerConfig, a config file,
    or a dict of dotted overrides. Further options: see :func:`run_live`.
    """
    return run_live(cs_or_url, project, workspace, particles=particles, exposures=exposures, diameter_A=diameter_A,
                    config=config, **options).job_uid


def run_live(cs_or_url, project: str, workspace: str, *, exposures, particles=None, diameter_A: float | None = None,
             config=None, email: str | None = None, password: str | None = None, model_dir: str | Path | None = None,
             title: str = DEFAULT_TITLE, path_map: Sequence[str] | PathMap = (), download: str = "auto",
             work_dir: str | Path | None = None, progress: ProgressCallback | None = None, mask=None,
             volume=None, placement=None) -> LiveRun:
    """:func:`pick_live` returning the details.

    ``model_dir``: a trained model directory (then ``particles`` are optional: nothing is trained). ``mask`` /
    ``volume``: a 3D mask, or a map to make one from (``"J15:volume"``, ``("J20", "mask")`` or a local MRC file);
    with particles that carry ``alignments3D`` poses, labels are its projections at each pose (see
    :mod:`cryosparc_job.reference`). ``path_map``:
    ``["SERVER_PREFIX=LOCAL_PREFIX", ...]`` when the project directory is mounted elsewhere here. ``download``:
    ``auto`` (read mounted files, download the others), ``always`` or ``never``. ``work_dir``: model, plots and
    downloaded micrographs (default ``./crisp-cryosparc/<project>``); this run's files go to ``work_dir/<job>``.
    ``progress``: also receives every progress event (e.g. a terminal printer).
    """
    if download not in ("auto", "always", "never"):
        raise InputError(f"download must be 'auto', 'always' or 'never', not {download!r}")
    if exposures is None:
        raise InputError("give the micrographs to pick: exposures=('J8', 'exposures') (--exposures J8)")
    model_dir = Path(model_dir) if model_dir else None
    if model_dir is None and particles is None:
        raise InputError("give curated particles to train on (particles=('J12', 'particles_selected'), --particles "
                         "J12) or a trained model directory (model_dir=..., --model)")
    if model_dir is not None and not (model_dir / "model.json").is_file():
        raise InputError(f"{model_dir} is not a crisp-ext model directory (no model.json); give the 'model' folder "
                         f"of an earlier run")
    cfg = settings.make_config(config, diameter_A)
    settings.check_size(cfg, model_dir)
    pmap = path_map if isinstance(path_map, PathMap) else PathMap.parse(path_map)

    if isinstance(cs_or_url, str) or cs_or_url is None:
        cs = connect(cs_or_url, email=email, password=password)
    else:
        cs = cs_or_url
        check_version(cs)
    proj = find_project(cs, project)
    wspace = find_workspace(cs, proj.uid, workspace)
    exp = find_source(proj, exposures, "exposure")
    parts = find_source(proj, particles, "particle") if particles is not None else None
    ref = parse_reference(mask, volume)
    notes = []
    why = ref and reference_unused(f"{ref.flag} {ref.text}", with_model=model_dir is not None,
                                   has_particles=parts is not None,
                                   has_poses=parts is not None and "alignments3D" in parts.slots,
                                   poses_hint=f"{parts.label if parts else ''} has no alignments3D; give refined "
                                              f"particles, e.g. a refinement's particles")
    if why:
        notes.append(why)
        ref = None
    ref_output = find_live_output(proj, ref) if ref is not None and ref.source is not None else None

    sources = [("micrographs", exp.label)] + ([("curated particles", parts.label)] if parts else [])
    if ref is not None:
        sources.append((ref.what, f"{ref_output[0]}:{ref_output[1]} ({ref_output[2]})" if ref_output else ref.text))
    job = proj.create_external_job(wspace.uid, title=title, desc=settings.description(cfg, sources, model_dir))
    try:  # from here any interrupt ends the job failed, never "building"
        base = Path(work_dir) if work_dir else Path.cwd() / "crisp-cryosparc" / proj.uid
        run_dir = base / job.uid
        log = EventLog(job, echo=progress)
    except BaseException as exc:
        _fail_quietly(job, f"setting up the job failed: {error_text(exc)}")
        raise
    try:
        _setup(job, exp, parts, ref_output, ref)
        with job.run():
            try:
                for note in notes:
                    log.warning(note)
                return _run(job, proj, log, cfg, exp, parts, model_dir, pmap, download, base, run_dir, sources,
                            ref, ref_output, placement)
            except KeyboardInterrupt as exc:
                raise Aborted("interrupted by the user") from exc
            except Exception as exc:
                job.log(f"Error: {error_text(exc)}", level="error")
                raise
    except (InputError, Aborted):
        raise
    except Exception as exc:
        raise JobFailed(job.uid, exc) from exc


def _setup(job, exp, parts, ref_output=None, ref=None) -> None:
    """Inputs connected to the sources (lineage) and the particles output; on failure the job ends failed."""
    try:
        job.connect(MICROGRAPHS_INPUT, exp.job.uid, exp.output, slots=["micrograph_blob", "?ctf"],
                    title="Micrographs")
        if parts:
            job.connect(PARTICLES_INPUT, parts.job.uid, parts.output, slots=["location", "?alignments3D"],
                        title="Curated particles")
        if ref_output:
            # the slot takes the source result's own name and type (volumes and masks are "blob" results)
            job.connect(REFERENCE_INPUT, ref_output[0], ref_output[1],
                        slots=[{"name": ref_output[2], "dtype": ref_output[3]}],
                        title=ref.what[:1].upper() + ref.what[1:] + " for the labels")
        job.add_output("particle", OUTPUT, slots=["location", "pick_stats"], title="Picked particles")
    except BaseException as exc:  # Ctrl-C included: a job that cannot run must not stay behind as "building"
        _fail_quietly(job, "setting up the job was interrupted" if isinstance(exc, KeyboardInterrupt) else
                      f"setting up the job failed: {error_text(exc)}")
        raise


def _run(job, proj, log: EventLog, cfg, exp, parts, model_dir, pmap: PathMap, download: str, base: Path,
         run_dir: Path, sources, ref=None, ref_output=None, placement=None) -> LiveRun:
    log.text(settings.summary_text(cfg, sources, model_dir, run_dir))
    mic_data = job.load_input(MICROGRAPHS_INPUT, slots="all")  # one row per micrograph; all slots (exposure groups)
    all_mics = records.micrographs_from_exposures(mic_data, PurePosixPath, where=exp.label)
    if not all_mics:
        raise InputError(f"{exp.label} holds no exposures; nothing to pick")
    local_dir = Path(pmap.apply(str(proj.dir)))
    mounted = local_dir.is_dir()
    if download != "always":
        log.text(f"Reading micrographs from {local_dir}" if mounted else
                 f"Project directory {proj.dir} is not mounted here (looked for {local_dir}); "
                 + ("downloading micrographs" if download == "auto" else "give --path-map SERVER=LOCAL"))
    fetcher = _Fetcher(proj, base / "downloads" / proj.uid, log)

    def resolve(mic: Micrograph) -> Path | None:
        blob = str(mic.meta["micrograph_path"])
        path = locate(blob, local_dir if mounted else None, pmap) if download != "always" else None
        if path is None and download != "never":
            path = fetcher(blob, mic.meta.get("psize_A"))
        return path

    mics = attach_files(all_mics, resolve, log.warning)
    if not mics:
        raise InputError(f"none of the {len(all_mics)} micrographs of {exp.label} could be read; mount the project "
                         f"directory (with --path-map) or allow downloads")
    curated = None
    if parts is not None:
        part_data = job.load_input(PARTICLES_INPUT, slots=_wanted(job, PARTICLES_INPUT, ["location", "alignments3D"]))
        curated = curated_particles(part_data, mics, parts.label, exp.label, have_model=model_dir is not None,
                                    warn=log.warning)
        log.text(f"{len(curated)} curated particles on {len(curated.micrograph_ids())} micrograph(s); picking "
                 f"{len(mics)} micrograph(s)")
    reference = None
    if ref is not None and curated is not None and len(curated):
        reference = _reference(job, proj, ref, ref_output, local_dir if mounted else None, pmap, download, log)
    def allocate(n: int):
        dset = job.alloc_output(OUTPUT, n)
        unknown = sorted(set(dset.fields()) - {"uid"} - {f[0] for f in records.PARTICLE_FIELDS})
        if unknown:
            log.warning(f"the server announces particle fields crisp-ext does not fill (left at 0): "
                        f"{', '.join(unknown)}")
        not_declared = sorted({f[0] for f in records.PARTICLE_FIELDS} - set(dset.fields()))
        if not_declared:
            log.text(f"the server does not declare {', '.join(not_declared)}; saving only the declared fields")
        return dset

    result, dset = pick_to_dataset(mics, cfg, work_dir=run_dir, curated=curated, model_dir=model_dir,
                                   reference=reference, progress=log, allocate=allocate, placement=placement,
                                   declared_only=True)
    picks = result.picks
    job.save_output(OUTPUT, dset)
    if not len(picks):
        log.warning("no particles were picked; check the particle diameter and the threshold")
    for path in result.plots:
        _log_plot(job, Path(path), result.threshold)
    log.text(f"{len(picks)} particles on {len(result.counts)} micrographs (finder {result.finder}, threshold "
             f"{result.threshold:.3g}); model directory: {result.model_dir}")
    return LiveRun(job.uid, proj.uid, run_dir, result, dset, mics)


def _reference(job, proj, ref, ref_output, local_dir: Path | None, pmap: PathMap, download: str, log: EventLog):
    """The 3D mask/map: a local file, or the connected output's file (mounted project directory, else
    ``download_mrc``)."""
    from .reference import INPUT_NAME, blob_of, fetch_reference, reference_from_file

    if ref_output is None:
        reference = reference_from_file(ref, ref.path, ref.pixel_size, str(ref.path))
    else:
        uid, output, slot, _ = ref_output
        label = f"{uid}:{output}/{slot}"
        blob, psize = blob_of(job.load_input(INPUT_NAME, slots=[slot]), slot, label)
        reference = fetch_reference(
            ref, blob, psize, label,
            locate=lambda b: locate(b, local_dir, pmap) if download != "always" else None,
            download=proj.download_mrc if download != "never" else None)
    log.text(f"Read the {reference.describe()}")
    return reference


class _Fetcher:
    """Downloads micrographs with ``download_mrc`` into a cache directory (atomic writes, reused across runs)."""

    def __init__(self, project, cache: Path, log: EventLog):
        self.project, self.cache, self.log = project, cache, log

    def __call__(self, blob: str, psize_A) -> Path | None:
        from crisp_ext.io.mrc import write_mrc

        rel = PurePosixPath(blob)
        target = self.cache / (rel.relative_to(rel.anchor) if rel.is_absolute() else rel)
        if target.is_file():
            return target
        try:
            _, data = self.project.download_mrc(blob)
        except Exception as exc:  # a missing or unreadable file on the server skips this micrograph
            from cryosparc.errors import APIError

            if not isinstance(exc, (APIError, OSError, ValueError)):
                raise
            self.log.warning(f"micrograph {blob}: download failed ({error_text(exc)})")
            return None
        image = data[0] if data.ndim == 3 else data
        write_mrc(target, image, pixel_size=float(psize_A) if psize_A else None)
        return target


def _wanted(job, input_name: str, slots: Sequence[str]) -> list[str]:
    """The slots among ``slots`` that the input's connections provide (the first is required)."""
    inp = job.model.spec.inputs.root[input_name]
    have = {r.name or r.result for c in inp.connections for r in c.results}
    return [s for i, s in enumerate(slots) if i == 0 or s in have]


def _log_plot(job, path: Path, threshold: float) -> None:
    """Upload one PNG under a short safe file name and log it with its sentence as the caption (``log_plot`` would
    name the file after the sentence)."""
    import re

    from cryosparc.stream import Stream

    if path.stem == "score_histogram":
        text = f"Pick scores (threshold {threshold:.3g})"
    elif path.stem == "label_footprints":
        text = "Training labels: footprints of the 3D mask at each particle's pose"
    elif path.stem.startswith("validation_"):
        text = ("Validation micrograph " + path.stem.removeprefix("validation_") + ": picks matching the curated "
                "particles (green), not among them (red), curated particles missed (yellow)")
    else:
        text = "Picks on " + path.stem.removeprefix("picks_")
    name = (re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem).strip("._") or "plot")[:64] + ".png"
    api = job.cs.api
    asset = api.assets.upload(job.project_uid, job.uid, Stream.load(path), filename=name, format="png")
    api.jobs.add_image_log(job.project_uid, job.uid, [asset], text=text, flags=["plots"])


def _fail_quietly(job, message: str) -> None:
    try:
        job.stop(error=message)
    except Exception:  # the original error matters more than this one
        pass


__all__ = ["DEFAULT_TITLE", "CryoSPARCError", "EventLog", "LiveRun", "pick_live", "run_live"]
