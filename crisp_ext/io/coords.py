"""Per-micrograph coordinate files: RELION coordinate STAR, EMAN .box, CSV.

All in the frame of :mod:`crisp_ext.types`: pixels of the micrograph, x = column, y = row, origin at array element
[0, 0] (RELION reads its STAR and .box files this way; no flip). ``flip_y_height`` converts files written in a
y-up frame (CryoPPP STAR/CSV from pyem without ``--inverty``) with ``y -> height - y``.

- STAR: ``_rlnCoordinateX/Y`` [+ ``_rlnAutopickFigureOfMerit``, ``_rlnClassNumber``, ``_rlnAnglePsi``].
- .box (EMAN): ``x_corner y_corner width height [score]``; centre = corner + size / 2.
- CSV: a header naming the columns; CryoPPP's ``X-Coordinate,Y-Coordinate,Diameter`` or ``x,y[,score]``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .atomic import atomic_write_text
from .star import format_star, read_star

COORDINATE_SUFFIXES = (".star", ".box", ".csv")


@dataclass(frozen=True)
class CoordinateTable:
    xy: np.ndarray  # (N, 2) x = column, y = row, pixels
    score: np.ndarray | None = None  # (N,)
    diameter: np.ndarray | None = None  # (N,) pixels, when the file gives one (CSV, .box width)

    def __len__(self) -> int:
        return int(self.xy.shape[0])


def read_coordinates(path: str | Path, *, flip_y_height: float | None = None) -> CoordinateTable:
    """Read a STAR, .box or CSV coordinate file (format from the suffix)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: coordinate file not found")
    suffix = path.suffix.lower()
    if suffix == ".star":
        table = _read_star(path)
    elif suffix == ".box":
        table = _read_box(path)
    elif suffix == ".csv":
        table = _read_csv(path)
    else:
        raise InputError(f"{path}: unknown coordinate format {suffix!r}; use .star, .box or .csv")
    if not np.all(np.isfinite(table.xy)):
        raise InputError(f"{path}: coordinates contain NaN or infinite values")
    if flip_y_height is not None:
        xy = table.xy.copy()
        xy[:, 1] = float(flip_y_height) - xy[:, 1]
        table = CoordinateTable(xy, table.score, table.diameter)
    return table


def _read_star(path: Path) -> CoordinateTable:
    _check_text(path)
    blocks = read_star(path)
    if not blocks:
        if "data_" in path.read_text(errors="replace"):
            return CoordinateTable(np.zeros((0, 2)))  # a STAR file with empty blocks: no picks
        raise InputError(f"{path}: not a STAR file (no data_ block); remove it from the folder or fix it")
    if all(len(b) == 0 for b in blocks.values()):
        return CoordinateTable(np.zeros((0, 2)))
    block = next((b for b in blocks.values() if "rlnCoordinateX" in b.columns or "rlnCoordinateY" in b.columns),
                 None)
    if block is None or not {"rlnCoordinateX", "rlnCoordinateY"} <= set(block.columns):
        raise InputError(f"{path}: needs both _rlnCoordinateX and _rlnCoordinateY columns; is this a coordinate STAR "
                         f"file?")
    try:
        xy = block[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path}: _rlnCoordinateX/Y hold values that are not numbers") from None
    score = block["rlnAutopickFigureOfMerit"].to_numpy(np.float64) if "rlnAutopickFigureOfMerit" in block else None
    return CoordinateTable(xy, score)


def _check_text(path: Path) -> str:
    """The file's text; a binary or non-UTF-8 file is an error naming it (never silently no picks)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a text coordinate file (byte {exc.start} is not UTF-8); remove it from the "
                         f"folder or convert it") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    if "\x00" in text:
        raise InputError(f"{path}: not a text coordinate file (it holds NUL bytes); remove it from the folder")
    return text


def _read_box(path: Path) -> CoordinateTable:
    rows = []
    for lineno, line in enumerate(_check_text(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise InputError(f"{path}:{lineno}: not a .box line (expected x y width height)") from None
        if len(values) < 4:
            raise InputError(f"{path}:{lineno}: .box line needs 4 columns (x y width height)")
        rows.append(values[:5])
    if not rows:
        return CoordinateTable(np.zeros((0, 2)))
    width = max(len(r) for r in rows)
    arr = np.array([r + [np.nan] * (width - len(r)) for r in rows])
    xy = np.stack([arr[:, 0] + arr[:, 2] / 2.0, arr[:, 1] + arr[:, 3] / 2.0], axis=1)
    score = arr[:, 4] if width >= 5 and np.isfinite(arr[:, 4]).all() else None
    return CoordinateTable(xy, score, diameter=arr[:, 2].copy())


_X_NAMES = ("x-coordinate", "x", "x_coord", "xcoord", "coordinatex", "rlncoordinatex", "center_x")
_Y_NAMES = ("y-coordinate", "y", "y_coord", "ycoord", "coordinatey", "rlncoordinatey", "center_y")
_SCORE_NAMES = ("score", "fom", "rlnautopickfigureofmerit", "confidence")
_DIAMETER_NAMES = ("diameter", "diameter_px")


def _read_csv(path: Path) -> CoordinateTable:
    text = _check_text(path)
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        return CoordinateTable(np.zeros((0, 2)))

    def col(names):
        return next((header.index(n) for n in names if n in header), None)

    ix, iy, isc, idia = col(_X_NAMES), col(_Y_NAMES), col(_SCORE_NAMES), col(_DIAMETER_NAMES)
    if ix is None or iy is None:
        raise InputError(f"{path}: CSV header must name the x and y columns (e.g. X-Coordinate,Y-Coordinate)")
    xy, score, dia = [], [], []
    for lineno, row in enumerate(reader, 2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            xy.append((float(row[ix]), float(row[iy])))
            if isc is not None:
                score.append(float(row[isc]))
            if idia is not None:
                dia.append(float(row[idia]))
        except (ValueError, IndexError):
            raise InputError(f"{path}:{lineno}: cannot read coordinates from {','.join(row)!r}") from None
    arr = np.array(xy, dtype=np.float64).reshape(-1, 2)
    return CoordinateTable(arr, np.array(score) if isc is not None else None,
                           np.array(dia) if idia is not None else None)


def format_star_coordinates(xy: np.ndarray, score: np.ndarray | None = None) -> str:
    """A RELION coordinate STAR as ``relion_autopick`` writes it: X, Y, FOM, class 0, psi 0."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    table = {"rlnCoordinateX": xy[:, 0], "rlnCoordinateY": xy[:, 1]}
    if score is not None:
        table["rlnAutopickFigureOfMerit"] = np.asarray(score, dtype=np.float64)
    table["rlnClassNumber"] = np.zeros(len(xy), dtype=int)
    table["rlnAnglePsi"] = np.zeros(len(xy))
    return format_star({"": table}, loops=[""])


def write_coordinates(path: str | Path, xy: np.ndarray, score: np.ndarray | None = None, *,
                      box_size: float | None = None, diameter: float | None = None) -> Path:
    """Write one micrograph's picks; the format follows the suffix. ``box_size`` is needed for .box."""
    path = Path(path)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    suffix = path.suffix.lower()
    if suffix == ".star":
        return atomic_write_text(path, format_star_coordinates(xy, score))
    if suffix == ".box":
        if not box_size:
            raise ValueError("writing .box files needs a box size")
        b = float(box_size)
        lines = []
        for i, (x, y) in enumerate(xy):
            fields = [f"{x - b / 2:.2f}", f"{y - b / 2:.2f}", f"{b:.0f}", f"{b:.0f}"]
            if score is not None:
                fields.append(f"{float(score[i]):.6f}")
            lines.append("\t".join(fields))
        return atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    if suffix == ".csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        header = ["X-Coordinate", "Y-Coordinate"] + (["Diameter"] if diameter else []) + (
            ["Score"] if score is not None else [])
        writer.writerow(header)
        for i, (x, y) in enumerate(xy):
            row = [f"{x:.2f}", f"{y:.2f}"] + ([f"{float(diameter):g}"] if diameter else []) + (
                [f"{float(score[i]):.6f}"] if score is not None else [])
            writer.writerow(row)
        return atomic_write_text(path, out.getvalue())
    raise ValueError(f"{path}: unknown coordinate format {suffix!r}; use .star, .box or .csv")
