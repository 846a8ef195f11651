"""STAR files: reading (through ``starfile``) and writing in RELION's own layout.

The writer produces what RELION writes itself: a ``# version 30001`` header, ``data_<name>`` blocks, ``loop_`` tables
with ``_rlnLabel #i`` columns, and single-row "general" blocks as ``_rlnLabel value`` pairs. Values with spaces are
quoted. Also the RELION micrographs / particles table readers shared by the standalone command and the RELION
adapter (coordinates in the original-micrograph pixel frame of :mod:`crisp_ext.types`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from .atomic import atomic_write_text

Table = Mapping[str, Sequence]  # column name (without "_rln" or with it) -> values


def read_star(path: str | Path) -> dict[str, "object"]:
    """All blocks of a STAR file as ``{block name: pandas.DataFrame}`` (general blocks become one-row frames)."""
    import pandas as pd
    import starfile

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: STAR file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted parser errors
        raise InputError(f"{path}: cannot parse STAR file ({type(exc).__name__}: {exc})") from None
    out = {}
    for name, block in blocks.items():
        if isinstance(block, dict):
            block = pd.DataFrame({k: [v] for k, v in block.items()})
        out[name] = block
    return out


def _label(name: str) -> str:
    return name if name.startswith("_") else ("_" + name if name.startswith("rln") else "_rln" + name)


def _format_value(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "nan"
        return f"{f:.6f}" if abs(f) < 1e7 else f"{f:.6e}"
    s = str(v)
    if s == "":
        return '""'
    if any(c.isspace() for c in s) or s.startswith(("_", "data_", "loop_", "#", '"', "'")):
        return '"' + s.replace('"', "'") + '"'
    return s


def format_star(blocks: Mapping[str, Table | Mapping[str, object]], *, loops: Sequence[str] | None = None,
                version: int | None = 30001) -> str:
    """Render blocks in RELION's layout. A block is written as a loop unless its name is not in ``loops`` and all
    its values are scalars (a general block). Column names may be given with or without ``_rln``."""
    lines: list[str] = []
    if version is not None:
        lines += [f"# version {version}", ""]
    for name, table in blocks.items():
        lines.append(f"data_{name}")
        lines.append("")
        cols = list(table.keys())
        scalar = all(np.ndim(table[c]) == 0 for c in cols)
        if scalar and (loops is None or name not in loops):
            width = max((len(_label(c)) for c in cols), default=0)
            for c in cols:
                lines.append(f"{_label(c):<{width}}    {_format_value(table[c])}")
            lines.append("")
            continue
        columns = [np.atleast_1d(np.asarray(table[c], dtype=object)) for c in cols]
        n = len(columns[0]) if columns else 0
        for c, col in zip(cols, columns):
            if len(col) != n:
                raise ValueError(f"STAR block {name}: column {c} has {len(col)} rows, expected {n}")
        lines.append("loop_")
        for i, c in enumerate(cols, 1):
            lines.append(f"{_label(c)} #{i}")
        for r in range(n):
            lines.append(" ".join(_format_value(col[r]) for col in columns))
        lines.append("")
    return "\n".join(lines) + "\n"


def write_star(path: str | Path, blocks: Mapping[str, Table | Mapping[str, object]], *,
               loops: Sequence[str] | None = None, version: int | None = 30001) -> Path:
    """Write blocks to ``path`` atomically (see :func:`format_star`)."""
    return atomic_write_text(Path(path), format_star(blocks, loops=loops, version=version))


# -- RELION tables --------------------------------------------------------------------------------------------------

def _find_block(blocks: dict, path: Path, preferred: Sequence[str], required_column: str):
    for name in preferred:
        if name in blocks and required_column in blocks[name].columns:
            return blocks[name]
    for block in blocks.values():
        if required_column in block.columns:
            return block
    raise InputError(f"{path}: no table with {required_column} found; is this the right STAR file?")


def _optics(blocks: dict) -> dict[int, dict]:
    optics = blocks.get("optics")
    if optics is None or "rlnOpticsGroup" not in getattr(optics, "columns", []):
        return {}
    return {int(row["rlnOpticsGroup"]): dict(row) for _, row in optics.iterrows()}


def read_relion_micrographs(path: str | Path, *, root: str | Path | None = None,
                            pixel_size: float | None = None):
    """Micrographs of a RELION micrographs STAR (3.0 or 3.1+ with optics).

    ``Micrograph.id`` is ``rlnMicrographName`` verbatim; ``path`` is it resolved against ``root`` (default: the
    current directory, as RELION runs jobs from the project directory). Pixel size: ``pixel_size`` if given, else
    the optics group's ``rlnMicrographPixelSize`` (or ``rlnImagePixelSize``), else ``rlnPixelSize`` / the MRC
    header later. CTF values are read when present but never required.
    """
    from ..types import CTF, Micrograph

    path = Path(path)
    blocks = read_star(path)
    table = _find_block(blocks, path, ("micrographs", ""), "rlnMicrographName")
    optics = _optics(blocks)
    root = Path(root) if root is not None else None
    mics = []
    for _, row in table.iterrows():
        name = str(row["rlnMicrographName"])
        group = optics.get(int(row["rlnOpticsGroup"])) if "rlnOpticsGroup" in row and optics else None
        ps = pixel_size
        if ps is None and group is not None:
            ps = group.get("rlnMicrographPixelSize", group.get("rlnImagePixelSize"))
        if ps is None:
            ps = row.get("rlnMicrographPixelSize", row.get("rlnPixelSize"))
        ps = float(ps) if ps is not None and float(ps) > 0 else None
        ctf = None
        if "rlnDefocusU" in row:
            src = group or {}
            ctf = CTF(
                defocus_u_A=float(row["rlnDefocusU"]),
                defocus_v_A=float(row.get("rlnDefocusV", row["rlnDefocusU"])),
                defocus_angle_deg=float(row.get("rlnDefocusAngle", 0.0)),
                voltage_kV=float(src.get("rlnVoltage", row.get("rlnVoltage", 300.0))),
                cs_mm=float(src.get("rlnSphericalAberration", row.get("rlnSphericalAberration", 2.7))),
                amplitude_contrast=float(src.get("rlnAmplitudeContrast", row.get("rlnAmplitudeContrast", 0.1))),
                phase_shift_deg=float(row.get("rlnPhaseShift", 0.0)),
            )
        file = Path(name) if root is None or Path(name).is_absolute() else root / name
        meta = {"optics_group": int(row["rlnOpticsGroup"])} if "rlnOpticsGroup" in row else {}
        mics.append(Micrograph(id=name, path=file, pixel_size=ps, ctf=ctf, meta=meta))
    if not mics:
        raise InputError(f"{path}: lists no micrographs")
    return mics


def read_relion_particles(path: str | Path, *, micrograph_pixel_size: Mapping[str, float] | float | None = None):
    """Particle centres of a RELION particles STAR (3.0 or 3.1+), in original micrograph pixels.

    centre = ``rlnCoordinate`` − ``rlnOrigin{X,Y}Angst`` / micrograph pixel size (RELION 3.1+; the particle image is
    the projection shifted by −origin), or − ``rlnOrigin{X,Y}`` (pixels, RELION 3.0). ``micrograph_pixel_size``: per
    ``rlnMicrographName`` or one value; needed only when Å origins are present (take it from the micrographs STAR,
    not from the particles' ``rlnImagePixelSize``, which changes when Extract rescales). Angles (rot, tilt, psi) are
    kept when all three are present.
    """
    from ..types import Particles

    path = Path(path)
    blocks = read_star(path)
    table = _find_block(blocks, path, ("particles", ""), "rlnCoordinateX")
    for col in ("rlnCoordinateY", "rlnMicrographName"):
        if col not in table.columns:
            raise InputError(f"{path}: particles table has no {col} column")
    mics = table["rlnMicrographName"].astype(str).to_numpy()
    x = table["rlnCoordinateX"].to_numpy(dtype=np.float64)
    y = table["rlnCoordinateY"].to_numpy(dtype=np.float64)
    shifts = None
    if "rlnOriginXAngst" in table.columns and "rlnOriginYAngst" in table.columns:
        if micrograph_pixel_size is None:
            raise InputError(f"{path}: particles have origin offsets in Å but no micrograph pixel size is known; "
                             f"give the micrographs STAR or the pixel size")
        if isinstance(micrograph_pixel_size, Mapping):
            missing = sorted(set(mics) - set(micrograph_pixel_size))
            if missing:
                raise InputError(f"{path}: no pixel size for micrograph {missing[0]!r} (not in the micrographs)")
            ps = np.array([micrograph_pixel_size[m] for m in mics], dtype=np.float64)
        else:
            ps = np.full(len(mics), float(micrograph_pixel_size))
        shifts = np.stack([table["rlnOriginXAngst"].to_numpy(float) / ps,
                           table["rlnOriginYAngst"].to_numpy(float) / ps], axis=1)
    elif "rlnOriginX" in table.columns and "rlnOriginY" in table.columns:
        shifts = np.stack([table["rlnOriginX"].to_numpy(float), table["rlnOriginY"].to_numpy(float)], axis=1)
    if shifts is not None:
        x = x - shifts[:, 0]
        y = y - shifts[:, 1]
    angles = None
    if all(c in table.columns for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        angles = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64)
    score = table["rlnAutopickFigureOfMerit"].to_numpy(float) if "rlnAutopickFigureOfMerit" in table else None
    return Particles(mics, x, y, score=score, angles=angles, shifts=shifts)
