"""What the ``crisp-ext`` subcommands share: their common options, the picker configuration built from them, the
inputs they read, progress on the terminal and in ``OUT/crisp-ext.log``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError, parse_diameter
from ..errors import InputError


def diameter_arg(text: str) -> tuple[float | None, float | None]:
    """argparse type for ``--diameter``: ``190A`` (Å) or ``27px`` (pixels), the unit required."""
    try:
        return parse_diameter(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def names(text: str | None) -> list[str] | None:
    """Micrograph names given as ``a,b,c`` or ``@file`` (names separated by white space)."""
    if text is None:
        return None
    if text.startswith("@"):
        try:
            content = Path(text[1:]).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{text[1:]}: cannot read the list of micrograph names "
                             f"({getattr(exc, 'strerror', None) or exc.__class__.__name__})") from None
        return [t.strip() for t in content.split() if t.strip()]
    return [t.strip() for t in text.split(",") if t.strip()]


def add_common(p: argparse.ArgumentParser, picks_required: bool = False) -> None:
    p.add_argument("--mics", required=True, help="micrographs: a directory, a glob ('mics/*.mrc') or a RELION "
                                                 "micrographs STAR")
    p.add_argument("--picks", required=picks_required,
                   help="curated picks: a folder of coordinate files (.star/.box/.csv) or a RELION particles STAR")
    p.add_argument("--diameter", type=diameter_arg, help="particle diameter with unit: 190A or 27px")
    p.add_argument("--pixel-size", type=float, help="pixel size in Å/px (overrides MRC headers / STAR)")
    p.add_argument("--flip-y", action="store_true", help="coordinate files are y-up: use y -> height - y")
    p.add_argument("--config", type=Path, help="picker configuration (TOML, YAML or JSON)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=20 (repeatable)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only log lines")


def add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-mics", help="micrograph names to train on (comma separated or @file)")
    p.add_argument("--val-mics", help="micrograph names to validate on (comma separated or @file)")
    p.add_argument("--epochs", type=int, help="training epochs (shortcut for --set train.epochs=N)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--mask", type=Path, help="3D mask (MRC) of the particle: with --picks a particles STAR with "
                                               "angles (e.g. Refine3D run_data.star), labels are its projections at "
                                               "each particle's pose instead of disks")
    ref.add_argument("--map", type=Path, help="3D map (MRC) to make that mask from (thresholded and dilated)")
    p.add_argument("--map-pixel-size", type=float, help="pixel size of --mask/--map in Å/px (default: its header)")


SHORTCUTS = (("--pixel-size", "pixel_size", "preprocess.pixel_size"), ("--epochs", "epochs", "train.epochs"),
             ("--device", "device", "train.device"), ("--threads", "threads", "train.threads"),
             ("--threshold", "threshold", "centres.threshold"))


def build_config(args):
    """The picker configuration: ``--config`` (or the defaults), then ``--set``, then the shortcut options; every
    value checked (a bad shortcut is an error naming its option)."""
    from ..config import PickerConfig, check_value, load_config, parse_overrides

    cfg = load_config(args.config) if args.config else PickerConfig()
    overrides = parse_overrides(args.set)
    if getattr(args, "diameter", None):
        a, px = args.diameter
        overrides["particle.diameter_A"], overrides["particle.diameter_px"] = a, px
    for option, attr, key in SHORTCUTS:
        value = getattr(args, attr, None)
        if value is not None:
            problem = check_value(key, value)
            if problem:
                raise ConfigError(f"{option} {value}: {problem}")
            overrides[key] = value
    if getattr(args, "save_maps", False):
        overrides["predict.save_maps"] = True
    return cfg.updated(overrides) if overrides else cfg


def add_placement_options(p: argparse.ArgumentParser, title: str = "where picking runs (default: this process)",
                          workers_help: str = "local:N worker processes here (one per GPU when there are GPUs), or "
                                              "N batch jobs: slurm:N (also pbs, sge, lsf, ...)") -> None:
    g = p.add_argument_group(title)
    g.add_argument("--workers", metavar="KIND:N", help=workers_help)
    g.add_argument("--scheduler", metavar="ADDRESS|FILE", help="an existing Dask scheduler (tcp://host:8786) or its "
                                                               "scheduler file")
    g.add_argument("--cluster-option", action="append", default=[], metavar="KEY=VALUE",
                   help="batch job setting for dask-jobqueue, e.g. queue=gpu, walltime=02:00:00, memory=8GiB "
                        "(repeatable; defaults from ~/.config/dask/jobqueue.yaml)")


def placement(args):
    from ..distributed import parse_placement

    return parse_placement(args.workers, args.scheduler, args.cluster_option)


def add_output_options(p: argparse.ArgumentParser, help_out: str) -> None:
    p.add_argument("--out", type=Path, required=True, help=help_out)
    p.add_argument("--wait", action="store_true", help="when another crisp-ext run uses --out, wait for it to finish "
                                                       "instead of stopping")


def use_output_dir(args, stack) -> Path:
    """Check, lock (for this run, in ``stack``) and tidy ``--out`` before any work; returns it."""
    from ..io.outdir import output_lock, prepare_output_dir, remove_leftovers

    out = prepare_output_dir(args.out)
    stack.enter_context(output_lock(out, wait=args.wait))
    removed = remove_leftovers(out)
    if removed:
        print(f"crisp-ext: removed {len(removed)} temporary file(s) an interrupted run left in {out}", flush=True)
    return out


def progress(args):
    """Progress on the terminal (bars, or lines with --quiet / no terminal) and in ``OUT/crisp-ext.log``."""
    from .. import __version__
    from ..progress import LinePrinter, RunLog, TqdmReporter, fanout

    shown = LinePrinter(sys.stdout) if args.quiet or not sys.stderr.isatty() else TqdmReporter()
    args.run_log = RunLog(args.out / "crisp-ext.log",
                          header=f"crisp-ext {__version__}: crisp-ext {' '.join(map(str, args.argv))}")
    return fanout(shown, args.run_log)


def say(args, text: str, stream=None) -> None:
    """Print a line and keep it in the run's log (when one is open)."""
    print(text, file=stream or sys.stdout, flush=True)
    log = getattr(args, "run_log", None)
    if log is not None:
        log.write(text)


def read_inputs(args, cfg, need_picks: bool):
    """The micrographs of ``--mics`` and the picks of ``--picks`` (None when not given)."""
    from ..io.inputs import find_micrographs, read_picks
    from ..pipeline import micrograph_pixel_size

    mics = find_micrographs(args.mics, pixel_size=args.pixel_size)
    picks = None
    if args.picks:
        pixel_sizes = None
        if Path(args.picks).suffix.lower() == ".star":
            pixel_sizes = {}
            for m in mics:
                ps = micrograph_pixel_size(m, cfg)
                if ps:
                    pixel_sizes[m.id] = ps
            if len(pixel_sizes) == len(mics) and len(set(pixel_sizes.values())) == 1:
                # one pixel size: no need to match the STAR's micrograph names (paths) to ids (file stems here)
                pixel_sizes = next(iter(pixel_sizes.values()))
        picks = read_picks(args.picks, mics, flip_y=args.flip_y, micrograph_pixel_size=pixel_sizes)
        if len(picks) == 0:
            raise InputError(f"{args.picks}: contains no picks; nothing to train on")
    elif need_picks:
        raise InputError("give --picks (curated coordinates to train on) or --model (a trained model directory)")
    if not (cfg.particle.diameter_A or cfg.particle.diameter_px) and not getattr(args, "model", None):
        raise InputError("give the particle diameter: --diameter 190A (Å) or --diameter 27px (pixels)")
    return mics, picks


def reference(args, picks):
    """The 3D mask/map of ``--mask``/``--map`` for labels by reprojection (None when not given or not usable)."""
    source = getattr(args, "mask", None) or getattr(args, "map", None)
    if source is None:
        return None
    from ..footprints import read_reference, reference_unused

    flag = "--mask" if args.mask else "--map"
    why = reference_unused(f"{flag} {source}", with_model=bool(getattr(args, "model", None)),
                           has_particles=picks is not None, has_poses=picks is not None and picks.has_poses,
                           poses_hint="give a particles STAR with rlnAngleRot/Tilt/Psi, e.g. Refine3D run_data.star")
    if why:
        print(f"crisp-ext: {why}", flush=True)
        return None
    if args.flip_y:
        raise InputError(f"--flip-y mirrors the particles, so their angles no longer fit {flag} {source}; give the "
                         f"particles STAR in the micrographs' own frame")
    return read_reference(source, pixel_size=args.map_pixel_size, is_mask=bool(args.mask))


def ids_for(given, mics):
    """Micrograph ids for names given by the user (ids, file names or stems)."""
    if given is None:
        return None
    by_name = {m.name: m.id for m in mics}
    by_id = {m.id for m in mics}
    out = []
    for n in given:
        stem = Path(n).stem
        if n in by_id:
            out.append(n)
        elif stem in by_name:
            out.append(by_name[stem])
        else:
            raise InputError(f"micrograph {n!r} given in --train-mics/--val-mics is not among the micrographs")
    return out
