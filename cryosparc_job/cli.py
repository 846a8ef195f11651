"""The ``crisp-cryosparc`` command.

    crisp-cryosparc live --url http://cryosparc:39000 --email me@lab.org --project P3 --workspace W1 \\
        --particles J12:particles_selected --exposures J8:exposures --diameter 190A
    crisp-cryosparc offline --project-dir /data/CS-myproject --particles J12 --exposures J8 --diameter 190A \\
        --out crisp_picks

Exit status: 0 done, 2 bad input (unknown uid, login, versions, files), 1 the job failed otherwise, 130 interrupted.
Heavy imports (torch, cryosparc.tools) happen only when a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

EXIT_INPUT = 2
EXIT_FAILED = 1
EXIT_ABORTED = 130
PROG = "crisp-cryosparc"


def _diameter(text: str):
    """argparse type for ``--diameter``: 190A, 190 (Å) or 27px."""
    from crisp_ext.config import ConfigError, parse_diameter

    try:
        return parse_diameter(text, default_unit="A")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_picker_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("picker")
    g.add_argument("--particles", metavar="JOB[:OUTPUT]",
                   help="curated particles to train on, e.g. J12:particles_selected (not needed with --model)")
    g.add_argument("--exposures", metavar="JOB[:OUTPUT]", required=True,
                   help="micrographs to pick, e.g. J8:exposures (output name optional when unambiguous)")
    g.add_argument("--diameter", type=_diameter, help="particle diameter: 190A (or 190) in Å, or 27px")
    g.add_argument("--model", type=Path, help="a trained model directory (skips training)")
    ref = g.add_mutually_exclusive_group()
    ref.add_argument("--mask", metavar="JOB[:OUTPUT]|FILE",
                     help="3D mask for labels by reprojection when the particles carry alignments3D poses: a mask "
                          "or volume output (e.g. J20:mask, J15:volume for its refinement mask) or an MRC file")
    ref.add_argument("--volume", metavar="JOB[:OUTPUT]|FILE",
                     help="3D map to make that mask from (thresholded and dilated), e.g. J15:volume or an MRC file")
    g.add_argument("--config", type=Path, help="picker configuration (TOML, YAML or JSON)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=20 (repeatable)")
    g.add_argument("--epochs", type=int, help="training epochs (shortcut for --set train.epochs=N)")
    g.add_argument("--threshold", type=float, help="score threshold (default: chosen on validation micrographs)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    g.add_argument("--path-map", action="append", default=[], metavar="SERVER=LOCAL",
                   help="read server paths starting with SERVER from LOCAL instead (repeatable)")
    g.add_argument("--work-dir", type=Path, help="model, plots and downloads (live default: ./crisp-cryosparc/<P>; "
                                                 "offline default: OUT/work)")
    g.add_argument("--quiet", action="store_true", help="plain log lines instead of progress bars")
    g = p.add_argument_group("where picking runs (default: this process; cryoSPARC cannot queue External jobs, so "
                             "this script reaches the cluster itself)")
    g.add_argument("--workers", metavar="KIND:N", help="local:N worker processes here, or slurm:N batch jobs (also "
                                                        "pbs, sge, lsf, ...) through dask-jobqueue")
    g.add_argument("--scheduler", metavar="ADDRESS|FILE", help="an existing Dask scheduler or its scheduler file")
    g.add_argument("--cluster-option", action="append", default=[], metavar="KEY=VALUE",
                   help="batch job setting for dask-jobqueue, e.g. queue=gpu (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    import crisp_ext

    parser = argparse.ArgumentParser(prog=PROG, description=(
        "CRISP particle picking for cryoSPARC: train on curated particles, pick every micrograph, and save the picks "
        "as a new External job (live) or as a .cs/.csg result group (offline)."))
    parser.add_argument("--version", action="version", version=f"{PROG} (crisp-ext {crisp_ext.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("live", help="pick on a running CryoSPARC v5 instance; picks become an External job")
    c = p.add_argument_group("connection")
    c.add_argument("--url", help="CryoSPARC web address, e.g. http://cryosparc:39000 (default: CRYOSPARC_BASE_URL)")
    c.add_argument("--email", help="login email (default: CRYOSPARC_EMAIL; or a saved "
                                   "`python -m cryosparc.tools login`)")
    c.add_argument("--password", help="password (default: CRYOSPARC_PASSWORD; prompted when only --email is given)")
    c.add_argument("--password-file", type=Path, help="read the password from this file")
    c.add_argument("--project", required=True, help="project uid, e.g. P3")
    c.add_argument("--workspace", required=True, help="workspace uid for the new job, e.g. W1")
    c.add_argument("--title", default=None, help="title of the new External job")
    c.add_argument("--download", choices=("auto", "always", "never"), default="auto",
                   help="micrographs: read the mounted project directory, downloading those not found (auto)")
    _add_picker_options(p)

    p = sub.add_parser("record-fixtures", help="record, read-only, a real instance's API shapes for crisp-ext's "
                                               "test fake (send the folder to the developers)")
    p.add_argument("--url", help="CryoSPARC web address (default: CRYOSPARC_BASE_URL)")
    p.add_argument("--email", help="login email (default: CRYOSPARC_EMAIL)")
    p.add_argument("--password", help="password (default: CRYOSPARC_PASSWORD)")
    p.add_argument("--password-file", type=Path, help="read the password from this file")
    p.add_argument("--project", required=True, help="project uid, e.g. P3")
    p.add_argument("--particles", required=True, metavar="JOB:OUTPUT", help="a particle output, e.g. J12:particles")
    p.add_argument("--exposures", required=True, metavar="JOB:OUTPUT", help="an exposures output, e.g. J8:exposures")
    p.add_argument("--out", type=Path, required=True, help="folder to write the recording to")

    p = sub.add_parser("offline", help="pick in a cryoSPARC project directory; write a .cs + .csg to import")
    p.add_argument("--project-dir", type=Path, required=True, help="the cryoSPARC project directory (read only)")
    p.add_argument("--out", type=Path, required=True, help="output directory for NAME.cs and NAME.csg")
    p.add_argument("--name", default="crisp_particles", help="output file name stem (default crisp_particles)")
    _add_picker_options(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    from crisp_ext.errors import Aborted, InputError

    try:
        if args.command == "record-fixtures":
            return _record(args)
        return _live(args) if args.command == "live" else _offline(args)
    except InputError as exc:
        _error(str(exc))
        return EXIT_INPUT
    except (Aborted, KeyboardInterrupt) as exc:
        _error(f"interrupted ({exc or 'Ctrl-C'})" if args.command == "offline" else
               f"interrupted ({exc or 'Ctrl-C'}); the job was marked failed")
        return EXIT_ABORTED


def _error(message: str) -> None:
    print(f"{PROG}: error: {message.strip().splitlines()[0] if message.strip() else 'unknown error'}",
          file=sys.stderr)


def _overrides(args) -> dict:
    from crisp_ext.config import parse_overrides

    out = parse_overrides(args.set)
    if args.diameter:
        a, px = args.diameter
        out["particle.diameter_A"], out["particle.diameter_px"] = a, px
    for key, value in (("train.epochs", args.epochs), ("centres.threshold", args.threshold),
                       ("train.device", args.device), ("train.threads", args.threads)):
        if value is not None:
            out[key] = value
    return out


def _config(args):
    from .settings import make_config

    base = make_config(args.config) if args.config else None
    return make_config(base, overrides=_overrides(args))


def _progress(args):
    from crisp_ext.progress import LinePrinter, TqdmReporter

    return LinePrinter(sys.stdout) if args.quiet or not sys.stderr.isatty() else TqdmReporter()


def _password(args) -> str | None:
    from crisp_ext.errors import InputError

    if args.password_file:
        try:
            return args.password_file.read_text().strip()
        except OSError as exc:
            raise InputError(f"--password-file {args.password_file}: cannot read ({exc.strerror or exc})") from None
    if args.password:
        return args.password
    email = args.email or os.environ.get("CRYOSPARC_EMAIL")
    if email and not os.environ.get("CRYOSPARC_PASSWORD") and args.email and sys.stdin.isatty():
        return getpass.getpass(f"CryoSPARC password for {email}: ")
    return None


def _placement(args):
    from crisp_ext.distributed import parse_placement

    return parse_placement(args.workers, args.scheduler, args.cluster_option)


def _live(args) -> int:
    from crisp_ext.errors import Aborted, InputError

    from .connect import error_text
    from .live import DEFAULT_TITLE, JobFailed, run_live

    cfg = _config(args)
    try:
        run = run_live(args.url, args.project, args.workspace, particles=args.particles, exposures=args.exposures,
                       config=cfg, email=args.email, password=_password(args), model_dir=args.model,
                       title=args.title or DEFAULT_TITLE, path_map=args.path_map, download=args.download,
                       work_dir=args.work_dir, progress=_progress(args), mask=args.mask, volume=args.volume,
                       placement=_placement(args))
    except JobFailed as exc:
        _error(f"{exc} (the traceback is in the job's event log)")
        return EXIT_FAILED
    except (InputError, Aborted, KeyboardInterrupt):
        raise
    except Exception as exc:  # e.g. the connection dropped before a job existed: one line, not a traceback
        _error(error_text(exc))
        return EXIT_FAILED
    print(f"{run.job_uid}: saved {len(run.particles)} particles on {len(run.result.counts)} micrographs as output "
          f"'particles' of {run.project_uid} {run.job_uid}", flush=True)
    return 0


def _record(args) -> int:
    from .connect import connect
    from .record import record_fixtures

    cs = connect(args.url, email=args.email, password=_password(args))
    files = record_fixtures(cs, args.project, args.out, particles=args.particles, exposures=args.exposures,
                            base_url=args.url)
    print(f"recorded {len(files)} file(s) in {args.out}; nothing on the instance was changed", flush=True)
    return 0


def _offline(args) -> int:
    from .offline import pick_offline

    run = pick_offline(args.project_dir, args.exposures, args.out, particles=args.particles, config=_config(args),
                       model_dir=args.model, path_map=args.path_map, name=args.name, work_dir=args.work_dir,
                       progress=_progress(args), mask=args.mask, volume=args.volume, placement=_placement(args))
    print(f"wrote {len(run.particles)} particles to {run.cs_path} and {run.csg_path}; import {run.csg_path.name} "
          f"with Import Result Group", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
