"""``crisp-ext config``: the default configuration (or the paper's recipe) as a commented TOML template."""

from __future__ import annotations

import sys
from pathlib import Path

NAME = "config"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="print the default configuration as a commented TOML template")
    p.add_argument("--paper", action="store_true", help="the paper's recipe (GPU) instead of the CPU default")
    p.add_argument("--out", type=Path, help="write it to this file instead of stdout")


def run(args) -> int:
    from ..config import PickerConfig, config_to_toml
    from ..io.atomic import atomic_write_text

    text = config_to_toml(PickerConfig.paper() if args.paper else PickerConfig(), comments=True)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}; edit it and pass it with --config")
    else:
        sys.stdout.write(text)
    return 0
