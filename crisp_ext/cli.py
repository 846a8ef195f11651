"""The ``crisp-ext`` command: ``train``, ``pick``, ``evaluate`` and ``demo`` on offline projects.

Micrographs: a directory of MRC files, a glob, or a RELION micrographs STAR. Picks: a folder of per-micrograph
coordinate files (STAR/box/CSV, matched to micrographs by name) or a RELION particles STAR. Coordinates everywhere
are pixels of the micrograph, x = column, y = row, origin at the first array element (use ``--flip-y`` for files
written y-up, e.g. CryoPPP STAR converted without ``--inverty``). With ``--mask``/``--map`` and a particles STAR
with angles, training labels are the 3D mask's projections at each particle's pose instead of disks.

Heavy imports (torch, smp) happen only inside the subcommands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from . import __version__

EXIT_INPUT = 2


def _diameter(text: str) -> tuple[float | None, float | None]:
    """'190A', '190Å', '190 A' -> (190, None); '27px' -> (None, 27)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(a|å|ang|angstrom|px|pix|pixels?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"diameter {text!r}: give a number with its unit, e.g. 190A or 27px")
    value = float(m.group(1))
    if value <= 0:
        raise argparse.ArgumentTypeError("diameter must be positive")
    return (value, None) if m.group(2).startswith(("a", "å")) else (None, value)


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text.startswith("@"):
        from .errors import InputError

        try:
            content = Path(text[1:]).read_text()
        except OSError as exc:
            raise InputError(f"{text[1:]}: cannot read the list of micrograph names "
                             f"({exc.strerror or exc.__class__.__name__})") from None
        return [t.strip() for t in content.split() if t.strip()]
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_common(p: argparse.ArgumentParser, picks_required: bool = False) -> None:
    p.add_argument("--mics", required=True, help="micrographs: a directory, a glob ('mics/*.mrc') or a RELION "
                                                 "micrographs STAR")
    p.add_argument("--picks", required=picks_required,
                   help="curated picks: a folder of coordinate files (.star/.box/.csv) or a RELION particles STAR")
    p.add_argument("--diameter", type=_diameter, help="particle diameter with unit: 190A or 27px")
    p.add_argument("--pixel-size", type=float, help="pixel size in Å/px (overrides MRC headers / STAR)")
    p.add_argument("--flip-y", action="store_true", help="coordinate files are y-up: use y -> height - y")
    p.add_argument("--config", type=Path, help="picker configuration (TOML, YAML or JSON)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=20 (repeatable)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only log lines")


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-mics", help="micrograph names to train on (comma separated or @file)")
    p.add_argument("--val-mics", help="micrograph names to validate on (comma separated or @file)")
    p.add_argument("--epochs", type=int, help="training epochs (shortcut for --set train.epochs=N)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--mask", type=Path, help="3D mask (MRC) of the particle: with --picks a particles STAR with "
                                               "angles (e.g. Refine3D run_data.star), labels are its projections at "
                                               "each particle's pose instead of disks")
    ref.add_argument("--map", type=Path, help="3D map (MRC) to make that mask from (thresholded and dilated)")
    p.add_argument("--map-pixel-size", type=float, help="pixel size of --mask/--map in Å/px (default: its header)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crisp-ext", description=(
        "CRISP particle picking: a segmentation network (+ optional CRF) trained on a few curated micrographs, "
        "then centre finding on every micrograph."))
    parser.add_argument("--version", action="version", version=f"crisp-ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a picker on curated picks and save a model directory")
    _add_common(p, picks_required=True)
    _add_training(p)
    p.add_argument("--out", type=Path, required=True, help="output directory (the model goes to OUT/model)")

    p = sub.add_parser("pick", help="pick every micrograph (training first when --picks is given)")
    _add_common(p)
    _add_training(p)
    p.add_argument("--model", type=Path, help="a model directory from 'crisp-ext train' (skips training)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--threshold", type=float, help="score threshold (default: chosen on validation micrographs)")
    p.add_argument("--overwrite", action="store_true", help="pick again micrographs that already have output")
    p.add_argument("--save-maps", action="store_true", help="write probability maps (MRC) to OUT/maps")
    p.add_argument("--extract", type=int, metavar="BOX", help="also write particle stacks of BOX px (.mrcs)")
    p.add_argument("--suffix", default="crisp", help="coordinate file suffix: <micrograph>_<suffix>.star")

    p = sub.add_parser("evaluate", help="compare picks with reference picks (precision, recall, F1, AP)")
    p.add_argument("--mics", required=True, help="micrographs (directory, glob or STAR), for names and shapes")
    p.add_argument("--picks", required=True, help="picks to evaluate (folder of coordinate files, or STAR)")
    p.add_argument("--truth", required=True, help="reference picks (folder of coordinate files, or STAR)")
    p.add_argument("--diameter", type=_diameter, required=True, help="particle diameter with unit: 190A or 27px")
    p.add_argument("--pixel-size", type=float, help="pixel size in Å/px (overrides MRC headers)")
    p.add_argument("--radius", type=float, default=0.5, help="match radius as a fraction of the diameter (0.5)")
    p.add_argument("--only", help="evaluate these micrograph names only (comma separated or @file)")
    p.add_argument("--flip-y", action="store_true", help="the truth files are y-up")
    p.add_argument("--json", type=Path, help="write the metrics as JSON here")

    p = sub.add_parser("config", help="print the default configuration as a commented TOML template")
    p.add_argument("--paper", action="store_true", help="the paper's recipe (GPU) instead of the CPU default")
    p.add_argument("--out", type=Path, help="write it to this file instead of stdout")

    p = sub.add_parser("demo", help="simulate a small project, train, pick, evaluate (a few minutes on a CPU)")
    p.add_argument("--out", type=Path, default=Path("crisp_demo"), help="output directory (default ./crisp_demo)")
    p.add_argument("--quick", action="store_true", help="an even smaller run (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not args.command:
        parser.print_help()
        return 0
    from .errors import Aborted, InputError

    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "pick":
            return _cmd_pick(args)
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.out, quick=args.quick, seed=args.seed, quiet=args.quiet)
    except InputError as exc:
        _say(args, f"crisp-ext: error: {exc}", sys.stderr)
        return EXIT_INPUT
    except (ValueError, KeyError) as exc:
        if args.command in ("train", "pick") and _is_config_error(exc):
            _say(args, f"crisp-ext: error: {exc}", sys.stderr)
            return EXIT_INPUT
        _say(args, f"crisp-ext: failed: {exc.__class__.__name__}: {exc}", sys.stderr)
        raise
    except Aborted as exc:
        _say(args, f"crisp-ext: aborted: {exc}", sys.stderr)
        return 130
    except KeyboardInterrupt:
        _say(args, "crisp-ext: interrupted; run the same command again to resume", sys.stderr)
        return 130
    finally:
        if getattr(args, "run_log", None) is not None:
            args.run_log.close()
    return 0


def _is_config_error(exc) -> bool:
    return "config" in str(exc)


# -- shared setup ---------------------------------------------------------------------------------------------------

def _config(args):
    from .config import PickerConfig, load_config

    if args.config and not args.config.is_file():
        from .errors import InputError

        raise InputError(f"{args.config}: config file not found (write one with 'crisp-ext config --out FILE')")
    cfg = load_config(args.config) if args.config else PickerConfig()
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE (config)")
        k, v = item.split("=", 1)
        overrides[k.strip()] = _parse_value(v.strip())
    if getattr(args, "diameter", None):
        a, px = args.diameter
        overrides["particle.diameter_A"], overrides["particle.diameter_px"] = a, px
    if getattr(args, "pixel_size", None):
        overrides["preprocess.pixel_size"] = args.pixel_size
    if getattr(args, "epochs", None):
        overrides["train.epochs"] = args.epochs
    if getattr(args, "device", None):
        overrides["train.device"] = args.device
    if getattr(args, "threads", None):
        overrides["train.threads"] = args.threads
    if getattr(args, "threshold", None) is not None:
        overrides["centres.threshold"] = args.threshold
    if getattr(args, "save_maps", False):
        overrides["predict.save_maps"] = True
    try:
        return cfg.updated(overrides) if overrides else cfg
    except KeyError as exc:
        raise ValueError(f"{exc.args[0]} (config)") from None


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _progress(args):
    """Progress on the terminal (bars, or lines with --quiet / no terminal) and in ``OUT/crisp-ext.log``."""
    from . import __version__
    from .progress import LinePrinter, RunLog, TqdmReporter, fanout

    shown = LinePrinter(sys.stdout) if args.quiet or not sys.stderr.isatty() else TqdmReporter()
    args.run_log = RunLog(args.out / "crisp-ext.log",
                          header=f"crisp-ext {__version__}: crisp-ext {' '.join(map(str, args.argv))}")
    return fanout(shown, args.run_log)


def _say(args, text: str, stream=None) -> None:
    """Print a line and keep it in the run's log (when one is open)."""
    print(text, file=stream or sys.stdout, flush=True)
    log = getattr(args, "run_log", None)
    if log is not None:
        log.write(text)


def _inputs(args, cfg, need_picks: bool):
    from .io.inputs import find_micrographs, read_picks
    from .pipeline import micrograph_pixel_size

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
            from .errors import InputError

            raise InputError(f"{args.picks}: contains no picks; nothing to train on")
    elif need_picks:
        from .errors import InputError

        raise InputError("give --picks (curated coordinates to train on) or --model (a trained model directory)")
    if not (cfg.particle.diameter_A or cfg.particle.diameter_px) and not getattr(args, "model", None):
        from .errors import InputError

        raise InputError("give the particle diameter: --diameter 190A (Å) or --diameter 27px (pixels)")
    return mics, picks


def _reference(args, picks):
    """The 3D mask/map of ``--mask``/``--map`` for labels by reprojection (None when not given or not usable)."""
    source = getattr(args, "mask", None) or getattr(args, "map", None)
    if source is None:
        return None
    from .errors import InputError
    from .footprints import read_reference

    flag = "--mask" if args.mask else "--map"
    if getattr(args, "model", None):
        print(f"crisp-ext: {flag} {source} is not used: picking with the trained model {args.model}", flush=True)
        return None
    if picks is None or not picks.has_poses:
        print(f"crisp-ext: {flag} {source} is not used: the picks carry no angles (give a particles STAR with "
              f"rlnAngleRot/Tilt/Psi, e.g. Refine3D run_data.star); training on disk labels", flush=True)
        return None
    if args.flip_y:
        raise InputError(f"--flip-y mirrors the particles, so their angles no longer fit {flag} {source}; give the "
                         f"particles STAR in the micrographs' own frame")
    return read_reference(source, pixel_size=args.map_pixel_size, is_mask=bool(args.mask))


def _ids_for(names, mics):
    if names is None:
        return None
    from .errors import InputError

    by_name = {m.name: m.id for m in mics}
    by_id = {m.id for m in mics}
    out = []
    for n in names:
        stem = Path(n).stem
        if n in by_id:
            out.append(n)
        elif stem in by_name:
            out.append(by_name[stem])
        else:
            raise InputError(f"micrograph {n!r} given in --train-mics/--val-mics is not among the micrographs")
    return out


# -- config ---------------------------------------------------------------------------------------------------------

def _cmd_config(args) -> int:
    from .config import PickerConfig, config_to_toml
    from .io.atomic import atomic_write_text

    text = config_to_toml(PickerConfig.paper() if args.paper else PickerConfig(), comments=True)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}; edit it and pass it with --config")
    else:
        sys.stdout.write(text)
    return 0


# -- train ----------------------------------------------------------------------------------------------------------

def _cmd_train(args) -> int:
    from .config import save_config
    from .pipeline import prepare_picker

    cfg = _config(args)
    mics, picks = _inputs(args, cfg, need_picks=True)
    train_ids, val_ids = _ids_for(_names(args.train_mics), mics), _ids_for(_names(args.val_mics), mics)
    reference = _reference(args, picks)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.toml")
    t0 = time.perf_counter()
    trained = prepare_picker(mics, cfg, work_dir=out, particles=picks, reference=reference, train_ids=train_ids,
                             val_ids=val_ids, progress=_progress(args))
    v = trained.validation.get("picking", {})
    _say(args, f"model written to {trained.model_dir}  ({time.perf_counter() - t0:.0f} s); labels: "
               f"{trained.info.get('labels', '?')}")
    if v:
        _say(args, f"validation: precision {v['precision']:.3f}  recall {v['recall']:.3f}  F1 {v['f1']:.3f}  "
                   f"AP {v['ap']:.3f}  (finder {trained.finder}, threshold {trained.threshold:.3g})")
    return 0


# -- pick -----------------------------------------------------------------------------------------------------------

def _cmd_pick(args) -> int:
    import numpy as np

    from .config import save_config
    from .io.atomic import atomic_write_text
    from .io.coords import read_coordinates, write_coordinates
    from .io.outputs import write_particles_star
    from .pipeline import micrograph_pixel_size, run, summary_dict
    from .scores import figure_of_merit, score_from_figure_of_merit
    from .types import Particles

    cfg = _config(args)
    mics, picks = _inputs(args, cfg, need_picks=args.model is None)
    train_ids, val_ids = _ids_for(_names(args.train_mics), mics), _ids_for(_names(args.val_mics), mics)
    reference = _reference(args, picks)
    out: Path = args.out
    coord_dir = out / "coordinates"
    coord_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.toml")

    def coord_path(m):
        return coord_dir / f"{m.name}_{args.suffix}.star"

    def skip(m):
        return not args.overwrite and coord_path(m).exists()

    state = {"threshold": None, "config": cfg}

    def on_ready(picker):
        state["threshold"] = picker.threshold
        state["config"] = picker.config  # with a loaded model: its diameter and scale, unless given here

    def on_picked(m, p):
        write_coordinates(coord_path(m), p.xy, figure_of_merit(p.score, state["threshold"]))

    result = run(mics, cfg, work_dir=out, particles=picks, model_dir=args.model, reference=reference,
                 train_ids=train_ids, val_ids=val_ids, skip=skip, on_ready=on_ready, on_picked=on_picked,
                 progress=_progress(args), map_path=lambda m: out / "maps" / f"{m.name}_probability.mrc")

    # Everything present (this run and earlier ones) goes into the combined STAR.
    used = state["config"]
    parts, pixel_sizes = [], {}
    for m in mics:
        f = coord_path(m)
        if f.exists():
            t = read_coordinates(f)
            score = score_from_figure_of_merit(t.score, result.threshold) if t.score is not None else None
            parts.append(Particles.for_one(m.id, t.xy, score))
            pixel_sizes[m.id] = micrograph_pixel_size(m, used)
    allp = Particles.concat(parts) if parts else Particles.empty(with_score=True)
    fom = figure_of_merit(allp.score, result.threshold) if len(allp) else np.zeros(0)
    write_particles_star(out / "particles.star", allp, mics, pixel_sizes, fom=fom)
    if args.extract:
        _extract(args, used, mics, allp, fom, pixel_sizes, out)
    summary = summary_dict(result, mics)
    summary["particles_total"] = int(len(allp))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _say(args, f"{len(result.picks)} particles picked on {len(result.counts)} micrograph(s) "
               f"({len(result.skipped)} skipped as done); {len(allp)} in {out / 'particles.star'}")
    _say(args, f"finder {result.finder} {result.finder_params}, threshold {result.threshold:.3g}; "
               f"timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    return 0


def _extract(args, cfg, mics, allp, fom, pixel_sizes, out: Path) -> None:
    """Stacks ``OUT/Particles/<micrograph>.mrcs`` and ``OUT/particles_extracted.star``. Image names are paths on
    the same footing as the micrograph names beside them (RELION's: relative to the current directory, i.e. the
    project directory, when ``--out`` is relative; absolute when it is absolute)."""
    from .io.mrc import read_micrograph
    from .io.outputs import extract_boxes, write_particles_star, write_stack
    from .pipeline import micrograph_diameter

    names = []
    order = []
    for m in mics:
        sel = [i for i in range(len(allp)) if allp.micrograph[i] == m.id]
        if not sel:
            continue
        image, ps = read_micrograph(m.path, pixel_sizes.get(m.id))
        radius = 0.5 * micrograph_diameter(m, cfg)
        stack = extract_boxes(image, allp.xy[sel], args.extract, normalise_radius=radius)
        stack_path = out / "Particles" / f"{m.name}.mrcs"
        write_stack(stack_path, stack, ps)
        names += [f"{k + 1:06d}@{stack_path}" for k in range(len(sel))]
        order += sel
    sub = allp.subset(order)
    write_particles_star(out / "particles_extracted.star", sub, mics, pixel_sizes, fom=fom[order],
                         image_names=names, box_size=args.extract)


# -- evaluate -------------------------------------------------------------------------------------------------------

def _cmd_evaluate(args) -> int:
    import numpy as np

    from .errors import InputError
    from .io.atomic import atomic_write_text
    from .io.inputs import find_micrographs, read_picks
    from .metrics import picking_metrics
    from .preprocess import diameter_in_pixels

    all_mics = find_micrographs(args.mics, pixel_size=args.pixel_size)
    pred = read_picks(args.picks, all_mics)
    truth = read_picks(args.truth, all_mics, flip_y=args.flip_y)
    only = _names(args.only)
    keep = set(_ids_for(only, all_mics)) if only else {m.id for m in all_mics}
    mics = [m for m in all_mics if m.id in keep]
    if len(truth) == 0:
        raise InputError(f"{args.truth}: no reference picks for these micrographs")
    from .io.mrc import read_info

    finite = pred.score[np.isfinite(pred.score)] if pred.score is not None else np.zeros(0)
    floor = float(finite.min()) - 1.0 if len(finite) else 0.0  # below every real score
    rows, preds, scores, truths, diam = [], [], [], [], []
    for m in mics:
        t = truth.for_micrograph(m.id)
        if len(t) == 0:
            continue
        p = pred.for_micrograph(m.id)
        ps = args.pixel_size or m.pixel_size or read_info(m.path).pixel_size
        d = diameter_in_pixels(args.diameter[0], args.diameter[1], ps, where=str(m.path))
        # the files' scores (figure of merit) rank the picks for AP; picks without one rank last
        s = np.where(np.isfinite(p.score), p.score, floor) if p.score is not None else np.ones(len(p))
        preds.append(p.xy)
        scores.append(s)
        truths.append(t.xy)
        diam.append(d)
        one = picking_metrics([p.xy], [s], [t.xy], args.radius * d)
        rows.append({"micrograph": m.name, **one.as_dict()})
    if not truths:
        raise InputError("no micrograph has both reference picks and a name among --mics")
    d = float(sorted(diam)[len(diam) // 2])
    total = picking_metrics(preds, scores, truths, args.radius * d)
    half = picking_metrics(preds, scores, truths, 0.5 * args.radius * d)
    print(f"{'micrograph':<40} {'n_pred':>7} {'n_true':>7} {'P':>6} {'R':>6} {'F1':>6} {'AP':>6}")
    for r in rows:
        print(f"{r['micrograph']:<40} {r['n_pred']:>7} {r['n_true']:>7} {r['precision']:6.3f} {r['recall']:6.3f} "
              f"{r['f1']:6.3f} {r['ap']:6.3f}")
    print(f"{'ALL (radius ' + format(args.radius, 'g') + ' D)':<40} {total.n_pred:>7} {total.n_true:>7} "
          f"{total.precision:6.3f} {total.recall:6.3f} {total.f1:6.3f} {total.ap:6.3f}")
    print(f"{'ALL (radius ' + format(args.radius / 2, 'g') + ' D)':<40} {half.n_pred:>7} {half.n_true:>7} "
          f"{half.precision:6.3f} {half.recall:6.3f} {half.f1:6.3f} {half.ap:6.3f}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"total": total.as_dict(), "half_radius": half.as_dict(),
                                                 "micrographs": rows, "diameter_px": d,
                                                 "radius_fraction": args.radius}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
