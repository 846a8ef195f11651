"""The ``crisp-ext`` command: ``train``, ``pick``, ``evaluate``, ``config`` and ``demo`` on offline projects (one
module each in :mod:`crisp_ext.commands`).

Micrographs: a directory of MRC files, a glob, or a RELION micrographs STAR. Picks: a folder of per-micrograph
coordinate files (STAR/box/CSV, matched to micrographs by name) or a RELION particles STAR. Coordinates everywhere
are pixels of the micrograph, x = column, y = row, origin at the first array element (use ``--flip-y`` for files
written y-up, e.g. CryoPPP STAR converted without ``--inverty``). With ``--mask``/``--map`` and a particles STAR
with angles, training labels are the 3D mask's projections at each particle's pose instead of disks.

Exit codes: 0 done, 1 failed (e.g. the Dask scheduler was lost; one line), 2 bad input (one line naming the file or
option), 130 interrupted (run again to resume).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__

EXIT_INPUT = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse with the house's error form: one line naming the option, exit 2 (no usage block)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .commands import COMMANDS

    parser = OneLineParser(prog="crisp-ext", description=(
        "CRISP particle picking: a segmentation network (+ optional CRF) trained on a few curated micrographs, "
        "then centre finding on every micrograph."))
    parser.add_argument("--version", action="version", version=f"crisp-ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    from .commands import COMMANDS
    from .commands.common import say
    from .errors import Aborted, InputError, RunFailed

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not args.command:
        parser.print_help()
        return 0
    command = next(c for c in COMMANDS if c.NAME == args.command)
    try:
        return command.run(args)
    except InputError as exc:  # ConfigError included
        say(args, f"crisp-ext: error: {exc}", sys.stderr)
        return EXIT_INPUT
    except RunFailed as exc:
        say(args, f"crisp-ext: failed: {exc}", sys.stderr)
        return 1
    except Aborted as exc:
        say(args, f"crisp-ext: aborted: {exc}", sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        say(args, "crisp-ext: interrupted; run the same command again to resume", sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if getattr(args, "run_log", None) is not None:
            args.run_log.close()


if __name__ == "__main__":
    raise SystemExit(main())
