"""Micrograph files for cryoSPARC exposures: find each one locally (or fetch it), and check it reads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from crisp_ext.errors import InputError
from crisp_ext.io.mrc import read_info
from crisp_ext.types import Micrograph


def attach_files(micrographs: Sequence[Micrograph], resolve: Callable[[Micrograph], Path | None],
                 warn: Callable[[str], None]) -> list[Micrograph]:
    """Micrographs with ``path`` set to a readable local MRC and ``shape`` to that file's (ny, nx).

    ``resolve(mic)`` returns the file or None (or raises :class:`InputError`); such micrographs are left out with a
    warning. When the file's shape differs from cryoSPARC's ``micrograph_blob/shape``, positions are converted with
    the file's shape (fractions are independent of the pixel grid), with a warning.
    """
    out = []
    for mic in micrographs:
        name = mic.meta.get("micrograph_path", str(mic.path))
        try:
            path = resolve(mic)
            if path is None:
                warn(f"micrograph {name}: no readable file found; skipped")
                continue
            info = read_info(path)
        except InputError as exc:
            warn(f"micrograph {name}: {exc}; skipped")
            continue
        if mic.shape is not None and tuple(info.shape) != tuple(mic.shape):
            warn(f"micrograph {name}: file {path} is {info.shape[1]}×{info.shape[0]} px but cryoSPARC records "
                 f"{mic.shape[1]}×{mic.shape[0]}; positions use the file's grid")
        out.append(mic.with_(path=Path(path), shape=info.shape))
    return out
