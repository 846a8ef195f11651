"""RELION job inputs -> core types: ``--in_mics`` micrographs, ``--in_parts`` / ``--in_coords`` training picks.

Micrograph ids are ``rlnMicrographName`` verbatim (paths relative to the project directory, the job's cwd); pixel
sizes come from the optics table of ``--in_mics``. Particle centres are corrected by their origin offsets with the
*micrograph* pixel size (particles may have been extracted at another one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from crisp_ext.errors import InputError
from crisp_ext.io.coords import read_coordinates
from crisp_ext.io.mrc import read_info
from crisp_ext.io.star import read_relion_micrographs, read_relion_particles, read_star
from crisp_ext.types import Micrograph, Particles

from .nodes import post, without_extension


def read_micrographs(in_mics: str) -> list[Micrograph]:
    """The micrographs to pick, in the order of ``--in_mics``."""
    if not in_mics:
        raise InputError("--in_mics is missing: give the micrographs STAR (e.g. CtfFind/job003/micrographs_ctf.star)")
    if not Path(in_mics).is_file():
        raise InputError(f"--in_mics {in_mics}: file not found (paths are relative to the project directory)")
    try:
        mics = read_relion_micrographs(in_mics)
    except InputError as exc:
        raise InputError(f"--in_mics: {exc}") from None
    seen: set[str] = set()
    for m in mics:
        if m.id in seen:
            raise InputError(f"--in_mics {in_mics}: micrograph {m.id!r} is listed twice")
        seen.add(m.id)
    return mics


def check_micrographs(mics: Sequence[Micrograph], in_mics: str) -> list[Micrograph]:
    """Open every micrograph's header (missing or corrupt files fail here, before any training) and record its
    shape; a pixel size missing from the STAR is taken from the header."""
    out = []
    for m in mics:
        try:
            info = read_info(m.path)
        except InputError as exc:
            raise InputError(f"{exc} (listed in {in_mics})") from None
        out.append(m.with_(shape=info.shape, pixel_size=m.pixel_size or info.pixel_size))
    return out


def _resolver(mics: Sequence[Micrograph]):
    """Map a micrograph name from another STAR onto an id of ``mics``: exact, else the same normalised path."""
    ids = {m.id for m in mics}
    norm = {os.path.normpath(m.id): m.id for m in mics}

    def resolve(name: str) -> str | None:
        if name in ids:
            return name
        return norm.get(os.path.normpath(name))

    return resolve


def _keep_known(parts: Particles, mics: Sequence[Micrograph], source: str, in_mics: str, log) -> Particles:
    resolve = _resolver(mics)
    mapped = [resolve(n) for n in parts.micrograph]
    known = np.array([m is not None for m in mapped], dtype=bool)
    if not known.any():
        example = parts.micrograph[0] if len(parts) else "?"
        raise InputError(f"{source}: none of its micrographs (e.g. {example!r}) is in --in_mics {in_mics}; give the "
                         f"micrographs the particles were picked on")
    if not known.all():
        unknown = sorted(set(parts.micrograph[~known]))
        log(f"warning: {int((~known).sum())} training particles on {len(unknown)} micrograph(s) not in --in_mics "
            f"(e.g. {unknown[0]!r}) are left out")
    ids = np.array([m for m in mapped if m is not None], dtype=object)
    kept = parts.subset(np.nonzero(known)[0])
    return kept.with_(micrograph=ids)


def read_particles(in_parts: str, mics: Sequence[Micrograph], in_mics: str, log=print) -> Particles:
    """Training picks from a particles STAR (Extract / Select / Refine output): centres = coordinate − origin (Å)
    / micrograph pixel size. Particles on micrographs outside ``--in_mics`` are left out (with a warning)."""
    if not Path(in_parts).is_file():
        raise InputError(f"--in_parts {in_parts}: file not found (paths are relative to the project directory)")
    sizes = {m.pixel_size for m in mics}
    if len(sizes) == 1:
        pixel_size = next(iter(sizes))
    else:  # several pixel sizes: one per micrograph name the particles use
        blocks = read_star(in_parts)
        names = set()
        for block in blocks.values():
            if "rlnMicrographName" in block.columns and "rlnCoordinateX" in block.columns:
                names.update(block["rlnMicrographName"].astype(str))
        resolve = _resolver(mics)
        by_id = {m.id: m.pixel_size for m in mics}
        # Unknown micrographs get a placeholder; their particles are dropped below.
        pixel_size = {n: (by_id[resolve(n)] if resolve(n) else 1.0) or np.nan for n in names}
    try:
        parts = read_relion_particles(in_parts, micrograph_pixel_size=pixel_size)
    except InputError as exc:
        raise InputError(f"--in_parts: {exc}") from None
    if len(parts) == 0:
        raise InputError(f"--in_parts {in_parts}: holds no particles; give a curated particle set to train on")
    return _keep_known(parts, mics, f"--in_parts {in_parts}", in_mics, log)


def read_coords(in_coords: str, mics: Sequence[Micrograph], in_mics: str, log=print) -> Particles:
    """Training picks from a coordinates node: a 3.1 ``coords_suffix_<name>.star`` (files at
    ``<its dir>/post(micrograph).withoutExtension()_<name>.star``) or a 4/5 ``data_coordinate_files`` list."""
    path = Path(in_coords)
    if not path.is_file():
        raise InputError(f"--in_coords {in_coords}: file not found (paths are relative to the project directory)")
    files: list[tuple[str, str]] = []  # (micrograph id, coordinate file)
    if "coords_suffix" in path.name:
        suffix = path.name.split("coords_suffix", 1)[1]
        coord_dir = in_coords[: len(in_coords) - len(path.name)]
        for m in mics:
            files.append((m.id, coord_dir + without_extension(post(m.id)) + suffix))
        files = [(m, f) for m, f in files if Path(f).is_file()]
    else:
        blocks = read_star(in_coords)
        table = next((b for b in blocks.values() if {"rlnMicrographName", "rlnMicrographCoordinates"}
                      <= set(b.columns)), None)
        if table is None:
            raise InputError(f"--in_coords {in_coords}: neither a coords_suffix file nor a coordinate_files list "
                             f"(rlnMicrographName, rlnMicrographCoordinates)")
        resolve = _resolver(mics)
        unknown = []
        for name, f in zip(table["rlnMicrographName"].astype(str), table["rlnMicrographCoordinates"].astype(str)):
            mid = resolve(name)
            if mid is None:
                unknown.append(name)
            elif Path(f).is_file():
                files.append((mid, f))
            else:  # the list names it: a missing file is lost picks, never a silent skip
                raise InputError(f"--in_coords {in_coords}: lists {f} for {name}, but that file is missing; restore "
                                 f"it or give a list without it")
        if unknown and not files:
            raise InputError(f"--in_coords {in_coords}: none of its micrographs (e.g. {unknown[0]!r}) is in "
                             f"--in_mics {in_mics}; give the micrographs the coordinates were picked on")
        if unknown:
            log(f"warning: coordinates of {len(unknown)} micrograph(s) not in --in_mics (e.g. {unknown[0]!r}) "
                f"are left out")
    parts = [Particles.for_one(mid, read_coordinates(f).xy) for mid, f in files]
    picks = Particles.concat(parts) if parts else Particles.empty()
    if len(picks) == 0:
        raise InputError(f"--in_coords {in_coords}: no coordinates found for the micrographs of --in_mics "
                         f"{in_mics}; give picked coordinates to train on")
    return picks
