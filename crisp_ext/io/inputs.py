"""Offline projects as users have them: micrographs as a directory, glob or RELION micrographs STAR; picks as a
folder of per-micrograph coordinate files (STAR/box/CSV) or a RELION particles STAR.

Coordinate files are matched to micrographs by name: a file belongs to the micrograph whose file stem is the longest
prefix of the file's stem (``mic001.star``, ``mic001_autopick.star`` and ``mic001_manualpick.box`` all belong to
``mic001.mrc``).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..types import Micrograph, Particles
from .coords import COORDINATE_SUFFIXES, read_coordinates

MICROGRAPH_SUFFIXES = (".mrc", ".mrcs")


def find_micrographs(spec: str | Path, *, pixel_size: float | None = None) -> list[Micrograph]:
    """Micrographs from a directory (``*.mrc``), a glob pattern, a RELION micrographs STAR, or one MRC file."""
    text = str(spec)
    path = Path(text)
    if path.suffix.lower() == ".star":
        from .star import read_relion_micrographs

        mics = read_relion_micrographs(path, root=Path.cwd(), pixel_size=pixel_size)
        missing = [m for m in mics if not m.path.exists()]
        if missing:
            raise InputError(f"{path}: micrograph {missing[0].id} not found at {missing[0].path} "
                             f"({len(missing)} missing); run from the project directory the STAR file refers to")
        return mics
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in MICROGRAPH_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"{path}: no .mrc micrographs in this directory")
    elif any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).suffix.lower() in MICROGRAPH_SUFFIXES)
        if not files:
            raise InputError(f"{text}: no .mrc micrographs match this pattern")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"{path}: micrographs not found (give a directory, a glob such as 'mics/*.mrc', "
                         f"a RELION micrographs STAR or an MRC file)")
    stems = [f.stem for f in files]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise InputError(f"two micrographs share the name {sorted(dup)[0]!r}; give them distinct file names")
    return [Micrograph(id=f.stem, path=f, pixel_size=pixel_size) for f in files]


def match_coordinate_file(stem: str, micrograph_names: Sequence[str]) -> str | None:
    """The micrograph whose name is the longest prefix of ``stem`` (separated by ``_``, ``-``, ``.`` or nothing
    more), or None."""
    best = None
    for name in micrograph_names:
        if stem == name or (stem.startswith(name) and stem[len(name)] in "_-."):
            if best is None or len(name) > len(best):
                best = name
    return best


def read_picks(spec: str | Path, micrographs: Sequence[Micrograph], *, flip_y: bool = False,
               micrograph_pixel_size: dict[str, float] | None = None) -> Particles:
    """Picks for ``micrographs`` from a folder of coordinate files, one coordinate file, or a particles STAR.

    A coordinate file that matches no micrograph is an error (it usually means the names differ); micrographs
    without a file simply have no picks. ``flip_y`` converts y-up files (``y -> ny - y``). Scores a file carries
    (STAR figure of merit, .box 5th column, CSV score column) are kept (NaN for picks of files without them).
    """
    path = Path(spec)
    by_name = {m.name: m for m in micrographs}
    if path.is_file() and path.suffix.lower() == ".star" and _is_particles_star(path):
        from .star import read_relion_particles

        parts = read_relion_particles(path, micrograph_pixel_size=micrograph_pixel_size)
        return _map_particle_names(parts, micrographs, path, flip_y)
    if path.is_dir():
        # hidden files (a killed run's temporary ``.name.XXXX.tmp.star``) are never picks
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in COORDINATE_SUFFIXES and p.is_file()
                       and not p.name.startswith("."))
        if not files:
            raise InputError(f"{path}: no coordinate files (.star, .box, .csv) in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"{path}: picks not found (give a folder of coordinate files or a particles STAR)")
    parts = []
    for f in files:
        name = match_coordinate_file(f.stem, list(by_name))
        if name is None:
            raise InputError(f"{f}: coordinate file matches no micrograph (micrograph names look like "
                             f"{next(iter(by_name))!r}); rename it or remove it from the folder")
        mic = by_name[name]
        table = read_coordinates(f, flip_y_height=_height(mic) if flip_y else None)
        parts.append(Particles.for_one(mic.id, table.xy, table.score))
    return Particles.concat(parts)


def _height(mic: Micrograph) -> float:
    if mic.shape is not None:
        return float(mic.shape[0])
    from .mrc import read_info

    return float(read_info(mic.path).shape[0])


def _is_particles_star(path: Path) -> bool:
    head = path.read_text(errors="replace")[:20000]
    return "_rlnMicrographName" in head and "_rlnCoordinateX" in head


def _map_particle_names(parts: Particles, micrographs: Sequence[Micrograph], path: Path, flip_y: bool) -> Particles:
    """Particles STAR names micrographs by path; map them onto ``Micrograph.id`` (exact id, else file stem)."""
    ids = {m.id for m in micrographs}
    by_stem = {m.name: m for m in micrographs}
    out_ids = []
    for name in parts.micrograph:
        if name in ids:
            out_ids.append(name)
            continue
        stem = Path(name).stem
        if stem in by_stem:
            out_ids.append(by_stem[stem].id)
            continue
        raise InputError(f"{path}: particles refer to micrograph {name!r}, which is not among the given "
                         f"micrographs; check the names or give the matching micrographs")
    y = parts.y
    if flip_y:
        heights = {m.id: _height(m) for m in micrographs}
        y = np.array([heights[i] for i in out_ids]) - parts.y
    return Particles(np.array(out_ids, dtype=object), parts.x, y, parts.score, parts.angles, parts.shifts)
