"""The ``crisp-ext`` subcommands, one module each (``train``, ``pick``, ``evaluate``, ``config``, ``demo``).

Each module has ``add_parser(subparsers)`` and ``run(args) -> int``; :mod:`crisp_ext.cli` builds the parser from
them and dispatches. Heavy imports (torch, smp) happen only inside ``run``, so ``--help`` is instant.
"""

from . import config, demo, evaluate, pick, train

COMMANDS = (train, pick, evaluate, config, demo)
