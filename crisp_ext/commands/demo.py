"""``crisp-ext demo``: simulate a small project, train, pick, evaluate (:func:`crisp_ext.demo.run_demo`)."""

from __future__ import annotations

from pathlib import Path

NAME = "demo"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="simulate a small project, train, pick, evaluate (a few minutes on a CPU)")
    p.add_argument("--out", type=Path, default=Path("crisp_demo"), help="output directory (default ./crisp_demo)")
    p.add_argument("--quick", action="store_true", help="an even smaller run (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    from ..demo import run_demo

    return run_demo(args.out, quick=args.quick, seed=args.seed, quiet=args.quiet)
