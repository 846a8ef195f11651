"""``crisp-ext evaluate``: picks against reference picks (precision, recall, F1, AP), per micrograph and pooled."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import common

NAME = "evaluate"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="compare picks with reference picks (precision, recall, F1, AP)")
    p.add_argument("--mics", required=True, help="micrographs (directory, glob or STAR), for names and shapes")
    p.add_argument("--picks", required=True, help="picks to evaluate (folder of coordinate files, or STAR)")
    p.add_argument("--truth", required=True, help="reference picks (folder of coordinate files, or STAR)")
    p.add_argument("--diameter", type=common.diameter_arg, required=True,
                   help="particle diameter with unit: 190A or 27px")
    p.add_argument("--pixel-size", type=float, help="pixel size in Å/px (overrides MRC headers)")
    p.add_argument("--radius", type=float, default=0.5, help="match radius as a fraction of the diameter (0.5)")
    p.add_argument("--only", help="evaluate these micrograph names only (comma separated or @file)")
    p.add_argument("--flip-y", action="store_true", help="the truth files are y-up")
    p.add_argument("--json", type=Path, help="write the metrics as JSON here")
    p.add_argument("--pictures", type=Path, metavar="DIR",
                   help="write a PNG per micrograph with reference picks here: picks matched to a reference pick "
                        "(green), picks matched to none (red: particles the reference left out, or false picks?) "
                        "and reference picks missed (yellow)")


def run(args) -> int:
    from ..errors import InputError
    from ..evaluation import evaluate_picks
    from ..io.atomic import atomic_write_text
    from ..io.inputs import find_micrographs, read_picks
    from ..progress import TqdmReporter

    if args.pictures is not None:
        try:
            args.pictures.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--pictures {args.pictures}: cannot make this folder ({exc.strerror}); give a folder "
                             "that can be written") from None
    all_mics = find_micrographs(args.mics, pixel_size=args.pixel_size)
    pred = read_picks(args.picks, all_mics)
    truth = read_picks(args.truth, all_mics, flip_y=args.flip_y)
    only = common.names(args.only)
    keep = set(common.ids_for(only, all_mics)) if only else {m.id for m in all_mics}
    mics = [m for m in all_mics if m.id in keep]
    if len(truth) == 0:
        raise InputError(f"{args.truth}: no reference picks for these micrographs")
    report = evaluate_picks(mics, pred, truth, args.diameter, radius=args.radius, pixel_size=args.pixel_size,
                            pictures=args.pictures, progress=TqdmReporter() if sys.stderr.isatty() else None)
    total, half = report["total"], report["half_radius"]
    print(f"{'micrograph':<40} {'n_pred':>7} {'n_true':>7} {'P':>6} {'R':>6} {'F1':>6} {'AP':>6}")
    for r in report["micrographs"]:
        print(f"{r['micrograph']:<40} {r['n_pred']:>7} {r['n_true']:>7} {r['precision']:6.3f} {r['recall']:6.3f} "
              f"{r['f1']:6.3f} {r['ap']:6.3f}")
    for label, m in ((format(args.radius, "g"), total), (format(args.radius / 2, "g"), half)):
        print(f"{'ALL (radius ' + label + ' D)':<40} {m['n_pred']:>7} {m['n_true']:>7} "
              f"{m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f} {m['ap']:6.3f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.pictures:
        print(f"pictures of the matches: {args.pictures}/matches_<micrograph>.png")
    return 0
