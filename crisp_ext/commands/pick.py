"""``crisp-ext pick``: pick every micrograph (training first when ``--picks`` is given).

Writes ``OUT/coordinates/<micrograph>_<suffix>.star`` as each micrograph is done (a re-run skips those), then
``OUT/particles.star`` and ``OUT/summary.json`` over every coordinate file in the folder (this run's and earlier
ones'), and with ``--extract`` particle stacks.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from . import common

NAME = "pick"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="pick every micrograph (training first when --picks is given)")
    common.add_common(p)
    common.add_training(p)
    p.add_argument("--model", type=Path, help="a model directory from 'crisp-ext train' (skips training)")
    common.add_output_options(p, "output directory")
    p.add_argument("--threshold", type=float, help="score threshold (default: chosen on validation micrographs)")
    p.add_argument("--overwrite", action="store_true", help="pick again micrographs that already have output")
    p.add_argument("--save-maps", action="store_true", help="write probability maps (MRC) to OUT/maps")
    p.add_argument("--extract", type=int, metavar="BOX", help="also write particle stacks of BOX px (.mrcs)")
    p.add_argument("--suffix", default="crisp", help="coordinate file suffix: <micrograph>_<suffix>.star")
    common.add_placement_options(p)


def run(args) -> int:
    with contextlib.ExitStack() as stack:
        return _run(args, stack)


def _check_box(box: int | None, mics) -> None:
    """``--extract BOX``: an even number of pixels that fits in every micrograph (checked before any work)."""
    from ..errors import InputError
    from ..io.mrc import read_info

    if box is None:
        return
    if box < 4 or box % 2:
        raise InputError(f"--extract {box}: give an even box size of at least 4 px (RELION's Extract needs even "
                         f"boxes), e.g. 1.5 particle diameters")
    smallest = min((m.shape or read_info(m.path).shape for m in mics), key=min)
    if box > min(smallest):
        raise InputError(f"--extract {box}: the box is larger than the smallest micrograph ({smallest[1]}×"
                         f"{smallest[0]} px); give a box of about 1.5 particle diameters")


def _run(args, stack) -> int:
    from ..config import save_config
    from ..io.atomic import atomic_write_text
    from ..io.outputs import CoordinateWriter, read_picked, write_particles_star
    from ..pipeline import micrograph_pixel_size, run as run_pipeline, summary_dict
    from ..scores import figure_of_merit

    cfg = common.build_config(args)
    where = common.placement(args)
    if args.extract is not None and args.extract < 4:
        _check_box(args.extract, [])
    mics, picks = common.read_inputs(args, cfg, need_picks=args.model is None)
    _check_box(args.extract, mics)
    train_ids = common.ids_for(common.names(args.train_mics), mics)
    val_ids = common.ids_for(common.names(args.val_mics), mics)
    reference = common.reference(args, picks)
    common.use_output_dir(args, stack)
    out: Path = args.out
    writer = CoordinateWriter(out / "coordinates", args.suffix)
    save_config(cfg, out / "config.toml")

    result = run_pipeline(mics, cfg, work_dir=out, particles=picks, model_dir=args.model, reference=reference,
                          train_ids=train_ids, val_ids=val_ids,
                          skip=lambda m: not args.overwrite and writer.path(m).exists(),
                          on_ready=writer.ready, on_picked=writer.picked, progress=common.progress(args),
                          map_path=lambda m: out / "maps" / f"{m.name}_probability.mrc", placement=where)

    # Everything present (this run and earlier ones) goes into the combined STAR.
    used = result.config  # with a loaded model: its diameter and scale, unless given here
    allp = read_picked(mics, writer.path, result.threshold)
    pixel_sizes = {m.id: micrograph_pixel_size(m, used) for m in mics if writer.path(m).exists()}
    fom = figure_of_merit(allp.score, result.threshold) if len(allp) else np.zeros(0)
    write_particles_star(out / "particles.star", allp, mics, pixel_sizes, fom=fom)
    if args.extract:
        _extract(args.extract, used, mics, allp, fom, pixel_sizes, out)
    # the summary describes the whole folder (earlier runs' micrographs too), this run's share beside it
    summary = summary_dict(result, mics)
    names = {m.id: m.name for m in mics}
    summary.update({"particles": int(len(allp)), "particles_this_run": int(len(result.picks)),
                    "micrographs_with_picks_file": len(pixel_sizes),
                    "counts": {names[m]: int((allp.micrograph == m).sum()) for m in pixel_sizes},
                    "counts_this_run": summary["counts"]})
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    common.say(args, f"{len(result.picks)} particles picked on {len(result.counts)} micrograph(s) "
                     f"({len(result.skipped)} skipped as done); {len(allp)} in {out / 'particles.star'}")
    common.say(args, f"finder {result.finder} {result.finder_params}, threshold {result.threshold:.3g}; "
                     f"timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    return 0


def _extract(box: int, cfg, mics, allp, fom, pixel_sizes, out: Path) -> None:
    """Stacks ``OUT/Particles/<micrograph>.mrcs`` and ``OUT/particles_extracted.star``. Image names are paths on
    the same footing as the micrograph names beside them (RELION's: relative to the current directory, i.e. the
    project directory, when ``--out`` is relative; absolute when it is absolute)."""
    from ..io.mrc import read_micrograph
    from ..io.outputs import extract_boxes, write_particles_star, write_stack
    from ..pipeline import micrograph_diameter

    names = []
    order = []
    for m in mics:
        sel = [i for i in range(len(allp)) if allp.micrograph[i] == m.id]
        if not sel:
            continue
        image, ps = read_micrograph(m.path, pixel_sizes.get(m.id))
        radius = 0.5 * micrograph_diameter(m, cfg)
        stack = extract_boxes(image, allp.xy[sel], box, normalise_radius=radius)
        stack_path = out / "Particles" / f"{m.name}.mrcs"
        write_stack(stack_path, stack, ps)
        names += [f"{k + 1:06d}@{stack_path}" for k in range(len(sel))]
        order += sel
    sub = allp.subset(order)
    write_particles_star(out / "particles_extracted.star", sub, mics, pixel_sizes, fom=fom[order],
                         image_names=names, box_size=box)
