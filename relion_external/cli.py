"""``crisp-relion``: the program a RELION External job runs.

RELION calls it from the project directory as::

    crisp-relion --o External/job003/ --in_mics CtfFind/job002/micrographs_ctf.star --in_parts Select/job010/particles.star
                 --diameter 150 [--<param> <value> ...] --j 4 [--pipeline_control External/job003/]

It trains a picker on the curated particles (or loads a model directory), picks every micrograph of ``--in_mics``,
writes one coordinate STAR per micrograph as it goes, then the coordinate node files and
``RELION_OUTPUT_NODES.star`` for the running RELION version, and finally the exit marker RELION waits for. Unknown
arguments are ignored; a parameter with an empty value arrives as a bare flag.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crisp_ext import __version__
from crisp_ext.errors import Aborted, InputError, RunFailed

from . import nodes
from .job import MARKER_ABORTED, MARKER_FAILURE, MARKER_SUCCESS, JobDir, detect_version, parse_version, read_job_star

PROG = "crisp-relion"
EXIT_INPUT = 2
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # aborted (RELION_JOB_ABORT_NOW) or interrupted, as the other commands

# The Params tab (at most 10 rows in RELION's External job): label -> help.
PARAMS = {
    "diameter": "particle diameter in Å (e.g. 150; '27px' for pixels); required unless 'model' is given",
    "ntrain": "number of micrographs to train on, chosen among those with particles (default 16, plus up to 6 "
              "for validation)",
    "model": "a model directory to pick with instead of training (e.g. External/job012/model)",
    "threshold": "score threshold 0-1 (default: chosen on the validation micrographs); higher = fewer, surer picks",
    "gpu": "GPU to use, RELION style ('0'; empty = any GPU); without it: a GPU if one is visible, else the CPU",
    "pickname": "name of the coordinate files: <micrograph>_<pickname>.star (default autopick)",
    "save_maps": "also write each micrograph's probability map as MRC next to its coordinates (yes/no)",
    "workers": "where picking runs: empty = this job's process; local:N = N worker processes (threads shared); "
               "slurm:N = N SLURM jobs via dask-jobqueue (settings from ~/.config/dask/jobqueue.yaml)",
    "config": "a crisp-ext configuration file (TOML/YAML/JSON) for everything else",
    "set": "config overrides without spaces, comma separated: train.patch_size=128,centres.finder=nms",
}
# Accepted as well (e.g. in 'Additional arguments'), not meant for the Params tab.
EXTRA = {
    "device": "auto, cpu, cuda or cuda:N (instead of 'gpu')",
    "relion_version": "3.1, 4 or 5: the node format to write when it cannot be detected (default auto)",
    "epochs": "training epochs (default 50)",
    "scheduler": "an existing Dask scheduler (tcp://host:8786) or its scheduler file, instead of 'workers'",
    "cluster_option": "batch job settings for 'workers' slurm:N, comma separated: queue=gpu,walltime=02:00:00",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="CRISP particle picking as a RELION External job: train on curated particles, pick every "
                    "micrograph, write a coordinates node for Extract.",
        epilog="Unknown arguments are ignored. Values are taken as text and checked after the job has started, so "
               "that every error ends in RELION_JOB_EXIT_FAILURE with the reason in run.err.")
    g = p.add_argument_group("set by RELION")
    g.add_argument("--o", nargs="?", const="", metavar="DIR", help="job directory (External/jobNNN/)")
    for flag, what in (("in_movies", "movies STAR (ignored)"), ("in_mics", "micrographs STAR to pick"),
                       ("in_parts", "curated particles STAR to train on"),
                       ("in_coords", "coordinates node to train on (coords_suffix file or coordinate list)"),
                       ("in_3dref", "3D map for labels by reprojection (particles with angles)"),
                       ("in_mask", "3D mask for labels by reprojection (particles with angles)")):
        g.add_argument(f"--{flag}", nargs="?", const="", metavar="FILE", help=what)
    g.add_argument("--j", nargs="?", const="", metavar="N", help="CPU threads")
    g.add_argument("--pipeline_control", nargs="?", const="", metavar="DIR", help="ignored")
    g = p.add_argument_group("parameters (RELION's Params tab: label and value)")
    for name, text in {**PARAMS, **EXTRA}.items():
        g.add_argument(f"--{name}", nargs="?", const="", metavar="VALUE", help=text)
    p.add_argument("--version", action="version", version=f"{PROG} (crisp-ext {__version__})")
    return p


# -- options --------------------------------------------------------------------------------------------------------

_TRUE = ("", "1", "yes", "y", "true", "on")
_FALSE = ("0", "no", "n", "false", "off")


def _flag(name: str, value: str | None) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InputError(f"parameter {name} = {value!r}: give yes or no")


def _number(name: str, value: str | None, kind=float, low=None, high=None):
    if value is None:
        return None
    if value.strip() == "":
        raise InputError(f"parameter {name} has no value; give a number or remove the row")
    try:
        x = kind(value)
    except ValueError:
        raise InputError(f"parameter {name} = {value!r} is not a{'n integer' if kind is int else ' number'}") from None
    if (low is not None and x < low) or (high is not None and x > high) or (kind is float and not math.isfinite(x)):
        lo = "" if low is None else f" >= {low}"
        hi = "" if high is None else f" <= {high}"
        raise InputError(f"parameter {name} = {value!r} is out of range (must be{lo}{' and' if lo and hi else ''}{hi})")
    return x


def parse_diameter(value: str | None) -> tuple[float | None, float | None]:
    """'150', '150A', '150Å' -> (150 Å, None); '27px' -> (None, 27 px) (:func:`crisp_ext.config.parse_diameter`)."""
    from crisp_ext.config import ConfigError, parse_diameter as parse

    if value is None:
        return None, None
    try:
        return parse(value, default_unit="A")
    except ConfigError:
        raise InputError(f"parameter diameter = {value!r}: give the particle diameter in Å, e.g. 150 (or 27px)"
                         ) from None


def parse_device(gpu: str | None, device: str | None) -> str | None:
    """RELION's ``--gpu "0,1"`` (first id used; empty = any GPU) or an explicit device."""
    if device is not None and device.strip():
        d = device.strip().lower()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", d):
            raise InputError(f"parameter device = {device!r}: give auto, cpu, cuda or cuda:N")
        return d
    if gpu is None:
        return None
    ids = [t for t in re.split(r"[,:\s]+", gpu.strip().strip("\"'")) if t]
    if not ids:
        return "cuda"
    if not ids[0].isdigit():
        raise InputError(f"parameter gpu = {gpu!r}: give GPU numbers as RELION does, e.g. 0 or 0,1")
    return f"cuda:{ids[0]}"


@dataclass
class Options:
    o: str
    in_mics: str | None
    in_parts: str | None
    in_coords: str | None
    in_3dref: str | None
    in_mask: str | None
    pickname: str
    model: str | None
    version_override: str | None
    save_maps: bool
    threads: int | None
    overrides: dict
    config_file: str | None
    placement: object = None  # crisp_ext.distributed.Placement, or None (this process)


def options_from(args: argparse.Namespace, extra: list[str]) -> Options:
    """Check and convert the parsed arguments (every problem is an :class:`InputError`)."""
    from crisp_ext.config import parse_overrides

    pickname = (args.pickname or "autopick").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", pickname):
        raise InputError(f"parameter pickname = {args.pickname!r}: use letters, digits, '_', '-' or '.'")
    try:
        version = parse_version(args.relion_version or "")
    except ValueError as exc:
        raise InputError(f"parameter {exc}") from None
    overrides: dict[str, object] = {}
    sets = [args.set] if args.set else []
    # RELION does not quote values: "--set a=1, b=2" arrives as several tokens; keep those that look like KEY=VALUE.
    sets += [t for t in extra if re.fullmatch(r"[A-Za-z_]+\.[A-Za-z_.]+=.*", t)]
    overrides.update(parse_overrides(sets))
    if args.diameter is not None and args.diameter.strip() == "":
        raise InputError("parameter diameter has no value; give the particle diameter in Å, e.g. 150")
    d_a, d_px = parse_diameter(args.diameter)
    if d_a or d_px:
        overrides["particle.diameter_A"], overrides["particle.diameter_px"] = d_a, d_px
    ntrain = _number("ntrain", args.ntrain, int, low=1)
    if ntrain is not None:
        overrides["train.n_train"] = ntrain
    epochs = _number("epochs", args.epochs, int, low=1)
    if epochs is not None:
        overrides["train.epochs"] = epochs
    threshold = _number("threshold", args.threshold, float, low=0.0, high=1.0)
    if threshold is not None:
        overrides["centres.threshold"] = threshold
    device = parse_device(args.gpu, args.device)
    if device is not None:
        overrides["train.device"] = device
    threads = _number("--j", args.j or None, int, low=1)
    if threads is not None:
        overrides["train.threads"] = threads
    save_maps = _flag("save_maps", args.save_maps)
    if save_maps:
        overrides["predict.save_maps"] = True
    model = args.model.strip() if args.model and args.model.strip() else None
    if args.model is not None and model is None:
        raise InputError("parameter model has no value; give a model directory or remove the row")
    from crisp_ext.distributed import parse_placement

    placement = parse_placement((args.workers or "").strip() or None, (args.scheduler or "").strip() or None,
                                [args.cluster_option] if args.cluster_option else [])
    return Options(placement=placement, o=args.o, in_mics=args.in_mics, in_parts=args.in_parts, in_coords=args.in_coords,
                   in_3dref=args.in_3dref, in_mask=args.in_mask, pickname=pickname, model=model,
                   version_override=version, save_maps=save_maps, threads=threads, overrides=overrides,
                   config_file=args.config.strip() if args.config and args.config.strip() else None)


def build_config(opts: Options):
    from crisp_ext.config import PickerConfig, load_config

    from crisp_ext.config import ConfigError

    try:
        cfg = load_config(opts.config_file) if opts.config_file else PickerConfig()
    except ConfigError as exc:
        raise ConfigError(f"parameter config: {exc}") from None
    try:
        return cfg.updated(opts.overrides) if opts.overrides else cfg
    except ConfigError as exc:
        raise ConfigError(f"parameter set: {exc}") from None


# -- the job --------------------------------------------------------------------------------------------------------

def _log(message: str) -> None:
    print(time.strftime("%H:%M:%S ") + message, flush=True)


def _is_model_dir(path: Path) -> bool:
    """A complete model directory left by an earlier run (``model.json`` is written last)."""
    return (path / "model.json").is_file()


def _reference(opts: Options, particles, log):
    """The 3D mask (``--in_mask``, preferred) or map (``--in_3dref``, thresholded into a mask) for labels by
    reprojection, when the training particles carry angles; None otherwise (with a log line saying why)."""
    from crisp_ext.footprints import read_reference, reference_unused

    source = opts.in_mask or opts.in_3dref
    if not source:
        return None
    flag = "--in_mask" if opts.in_mask else "--in_3dref"
    why = reference_unused(f"{flag} {source}", with_model=False, has_particles=particles is not None,
                           has_poses=particles is not None and particles.has_poses,
                           poses_hint="labels by reprojection need particles with angles, e.g. Refine3D "
                                      "run_data.star as Input particles")
    if why:
        log(why)
        return None
    if opts.in_mask and opts.in_3dref:
        log(f"--in_3dref {opts.in_3dref} is not used: the mask {opts.in_mask} is")
    return read_reference(source, is_mask=bool(opts.in_mask))


def suggested_box(diameter_px: float) -> int:
    """An even box about 1.5 particle diameters wide."""
    return int(2 * math.ceil(0.75 * diameter_px))


def run_job(opts: Options, job: JobDir, log=_log) -> dict:
    """Everything between the start and the exit marker; returns the summary written to ``summary.json``."""
    from crisp_ext.pipeline import run
    from crisp_ext.progress import LinePrinter

    t0 = time.perf_counter()
    version, how, is_continue = _start(opts, job, log)
    cfg = build_config(opts)
    mics = _micrographs(opts, log)
    model_dir = _model_to_use(opts, job, is_continue, log)
    particles = _training_set(opts, cfg, mics, model_dir, log)
    reference = _reference(opts, particles, log)  # the pipeline logs the labels
    writer = _CoordinateWriter(job, opts.pickname, mics, version, log)
    done = {m.id for m in mics if is_continue and writer.exists(m)}
    if done:
        log(f"continuing: {len(done)} micrograph(s) already have coordinates and are skipped")
    result = None
    if len(done) < len(mics):
        result = run(mics, cfg, work_dir=job.path, particles=particles, model_dir=model_dir, reference=reference,
                     skip=lambda m: m.id in done, on_ready=writer.ready, on_picked=writer.picked,
                     map_path=lambda m: Path(nodes.sibling_file(job.o, m.id, "_probability.mrc")),
                     should_abort=job.abort_requested, progress=LinePrinter(sys.stdout), placement=opts.placement)
    else:
        log("nothing left to pick")
    return _finish(opts, job, mics, writer, result, (version, how), is_continue, len(done), t0, log)


def _start(opts: Options, job: JobDir, log) -> tuple[str | None, str, bool]:
    """The RELION version (and how it was found) and whether this is a Continue; a pending abort stops here; old
    output nodes go."""
    jobstar = read_job_star(job.path)
    is_continue = bool(jobstar and jobstar.is_continue)
    version, how = detect_version(job.path, ".", opts.version_override)
    log(f"{PROG} (crisp-ext {__version__}) in {job.o}: RELION {version or 'unknown'} ({how}); "
        f"{'continuing' if is_continue else 'new run'}")
    if job.abort_requested():
        raise Aborted(f"{job.o}RELION_JOB_ABORT_NOW exists (remove it to run again)")
    nodes.remove_output_nodes(job.o)
    from crisp_ext.io.outdir import remove_leftovers

    if remove_leftovers(job.path):  # an interrupted run's temporary files (never read as outputs)
        log("removed the temporary files an interrupted run left")
    if opts.threads:  # RELION's --j; training sets it again, picking with a loaded model relies on this
        import torch

        torch.set_num_threads(opts.threads)
    return version, how, is_continue


def _micrographs(opts: Options, log):
    from .inputs import check_micrographs, read_micrographs

    mics = check_micrographs(read_micrographs(opts.in_mics), opts.in_mics)
    log(f"{len(mics)} micrograph(s) in {opts.in_mics}")
    return mics


def _model_to_use(opts: Options, job: JobDir, is_continue: bool, log) -> Path | None:
    """The parameter 'model', else on Continue the model this job trained before, else None (train one)."""
    if opts.model:
        model_dir = Path(opts.model)
        if not model_dir.is_dir():
            raise InputError(f"parameter model = {opts.model}: not a directory (give a model directory such as "
                             f"External/job012/model)")
        log(f"picking with the model in {model_dir}")
        return model_dir
    if is_continue and _is_model_dir(job.path / "model"):
        log(f"continuing: reusing the model trained in {job.path / 'model'}")
        return job.path / "model"
    return None


def _training_set(opts: Options, cfg, mics, model_dir: Path | None, log):
    """The curated particles (``--in_parts``) or coordinates (``--in_coords``) to train on; None with a model."""
    from .inputs import read_coords, read_particles

    if model_dir is not None:
        if opts.in_parts or opts.in_coords:
            log("input particles/coordinates are not used: picking with an existing model")
        return None
    if opts.in_parts:
        particles, source = read_particles(opts.in_parts, mics, opts.in_mics, log), opts.in_parts
    elif opts.in_coords:
        particles, source = read_coords(opts.in_coords, mics, opts.in_mics, log), opts.in_coords
    else:
        raise InputError("nothing to train on: give curated particles (Input particles: --in_parts) or "
                         "coordinates (--in_coords), or a trained model directory as parameter 'model'")
    if not (cfg.particle.diameter_A or cfg.particle.diameter_px):
        raise InputError("the particle diameter is needed to train: add the parameter 'diameter' (in Å)")
    log(f"training set: {len(particles)} particles on {len(particles.micrograph_ids())} micrograph(s) from {source}")
    return particles


class _CoordinateWriter:
    """Writes each micrograph's coordinate STAR as soon as it is picked (figures of merit need the picker's
    threshold, known once it is ready), never a coordinate outside the micrograph."""

    def __init__(self, job: JobDir, pickname: str, mics, version: str | None, log):
        self.files = {m.id: nodes.coordinate_file(job.o, m.id, pickname) for m in mics}
        self.first = mics[0]
        self.shapes = {m.id: m.shape for m in mics}
        self.version = version
        self.log = log
        self.threshold = 0.5

    def exists(self, mic) -> bool:
        return Path(self.files[mic.id]).is_file()

    def ready(self, picker) -> None:
        from crisp_ext.pipeline import micrograph_diameter

        self.threshold = picker.threshold
        d_px = micrograph_diameter(self.first, picker.config)
        self.log(f"particle diameter {d_px:.1f} px: a box of about {suggested_box(d_px)} px suits Extract; "
                 f"threshold {self.threshold:.3g} is figure of merit 0 (Extract's FOM threshold keeps FOM > value)")

    def picked(self, mic, picks) -> None:
        from crisp_ext.scores import figure_of_merit

        ny, nx = self.shapes[mic.id]
        xy = picks.xy
        score = picks.score if picks.score is not None else np.full(len(picks), self.threshold)
        inside = np.isfinite(xy).all(axis=1) & (xy[:, 0] >= 0) & (xy[:, 0] < nx) & (xy[:, 1] >= 0) & (xy[:, 1] < ny)
        nodes.write_coordinates(self.files[mic.id], xy[inside], figure_of_merit(score[inside], self.threshold),
                                self.version)


def _finish(opts: Options, job: JobDir, mics, writer: _CoordinateWriter, result, version_how: tuple,
            is_continue: bool, skipped: int, t0: float, log) -> dict:
    """``summary.json`` and the output nodes over every coordinate file of the job (this run's and earlier)."""
    from crisp_ext.io.atomic import atomic_write_text
    from crisp_ext.pipeline import summary_dict

    version, how = version_how
    entries = [(m.id, writer.files[m.id]) for m in mics if writer.exists(m)]
    summary = summary_dict(result, mics) if result is not None else {"particles": 0, "micrographs_picked": 0}
    summary.update({
        "relion_version": version, "version_source": how, "continue": is_continue,
        "micrographs": len(mics), "micrographs_with_coordinates": len(entries),
        "micrographs_skipped": skipped, "pickname": opts.pickname,
        "coordinate_list": nodes.coordinate_list_node(job.o, opts.pickname),
        "coords_suffix": nodes.coords_suffix_node(job.o, opts.pickname),
        "wall_time_s": round(time.perf_counter() - t0, 2),
    })
    atomic_write_text(job.path / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    nodes.write_nodes(job.o, opts.pickname, opts.in_mics, entries, version)
    log(f"{summary['particles']} particles picked on {summary['micrographs_picked']} micrograph(s); "
        f"{len(entries)} coordinate files listed in {summary['coordinate_list']} "
        f"({time.perf_counter() - t0:.0f} s)")
    return summary


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the job; always ends with one of RELION's exit markers when ``--o`` is known."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not args.o:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: --o (the job directory) is required", file=sys.stderr)
        return EXIT_INPUT
    job = JobDir(args.o)
    try:
        job.create()
        job.clear_exit_markers()
    except OSError as exc:
        print(f"{PROG}: error: cannot use job directory {args.o}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if extra:
            _log(f"ignoring arguments: {' '.join(extra)}")
        run_job(options_from(args, extra), job)
    except Aborted as exc:
        _log(f"aborted: {exc}")
        job.mark(MARKER_ABORTED)
        return EXIT_INTERRUPTED
    except RunFailed as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        _log(f"failed: {exc}")
        job.mark(MARKER_FAILURE)
        return EXIT_ERROR
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        _log(f"error: {exc}")
        job.mark(MARKER_FAILURE)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (Ctrl-C); Continue the job to pick what is left", file=sys.stderr, flush=True)
        _log("interrupted (Ctrl-C)")
        job.mark(MARKER_ABORTED)
        return EXIT_INTERRUPTED
    except _Terminated as exc:
        print(f"{PROG}: error: {exc} (killed by the queue or by hand); Continue the job to pick what is left",
              file=sys.stderr, flush=True)
        _log(f"failed: {exc}")
        job.mark(MARKER_FAILURE)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: keep the traceback in run.err for the report
        traceback.print_exc(file=sys.stderr)
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        _log(f"failed: {type(exc).__name__}: {exc} (details in run.err)")
        job.mark(MARKER_FAILURE)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    job.mark(MARKER_SUCCESS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
