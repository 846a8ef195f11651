"""``crisp-ext pick``: pick every micrograph (training first when ``--picks`` is given).

Writes ``OUT/coordinates/<micrograph>_<suffix>.star`` as each micrograph is done (a re-run skips those), then
``OUT/particles.star`` and ``OUT/summary.json`` over every coordinate file in the folder (this run's and earlier
ones'), and with ``--extract`` particle stacks.
"""

from __future__ import annotations

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
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--threshold", type=float, help="score threshold (default: chosen on validation micrographs)")
    p.add_argument("--overwrite", action="store_true", help="pick again micrographs that already have output")
    p.add_argument("--save-maps", action="store_true", help="write probability maps (MRC) to OUT/maps")
    p.add_argument("--extract", type=int, metavar="BOX", help="also write particle stacks of BOX px (.mrcs)")
    p.add_argument("--suffix", default="crisp", help="coordinate file suffix: <micrograph>_<suffix>.star")


def run(args) -> int:
    from ..config import save_config
    from ..io.atomic import atomic_write_text
    from ..io.outputs import CoordinateWriter, read_picked, write_particles_star
    from ..pipeline import micrograph_pixel_size, run as run_pipeline, summary_dict
    from ..scores import figure_of_merit

    cfg = common.build_config(args)
    mics, picks = common.read_inputs(args, cfg, need_picks=args.model is None)
    train_ids = common.ids_for(common.names(args.train_mics), mics)
    val_ids = common.ids_for(common.names(args.val_mics), mics)
    reference = common.reference(args, picks)
    out: Path = args.out
    writer = CoordinateWriter(out / "coordinates", args.suffix)
    writer.folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.toml")

    result = run_pipeline(mics, cfg, work_dir=out, particles=picks, model_dir=args.model, reference=reference,
                          train_ids=train_ids, val_ids=val_ids,
                          skip=lambda m: not args.overwrite and writer.path(m).exists(),
                          on_ready=writer.ready, on_picked=writer.picked, progress=common.progress(args),
                          map_path=lambda m: out / "maps" / f"{m.name}_probability.mrc")

    # Everything present (this run and earlier ones) goes into the combined STAR.
    used = result.config  # with a loaded model: its diameter and scale, unless given here
    allp = read_picked(mics, writer.path, result.threshold)
    pixel_sizes = {m.id: micrograph_pixel_size(m, used) for m in mics if writer.path(m).exists()}
    fom = figure_of_merit(allp.score, result.threshold) if len(allp) else np.zeros(0)
    write_particles_star(out / "particles.star", allp, mics, pixel_sizes, fom=fom)
    if args.extract:
        _extract(args.extract, used, mics, allp, fom, pixel_sizes, out)
    summary = summary_dict(result, mics)
    summary["particles_total"] = int(len(allp))
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
