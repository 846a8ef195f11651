"""The core's types: the only language the adapters and the core share.

Coordinate convention (everywhere in the core, in every type here):
    pixels of the *original* micrograph that ``Micrograph.path`` points to; ``x`` = column, ``y`` = row, origin at
    array element ``[0, 0]`` of the 2D array as ``mrcfile`` returns it (shape ``(ny, nx)``), so ``image[y, x]``.
    This is RELION's ``rlnCoordinateX/Y`` frame on the same MRC, and cryoSPARC's ``center_x_frac * nx``,
    ``center_y_frac * ny`` — no y-flip between any of them. Conversions to the working (binned) scale live in
    :mod:`crisp_ext.preprocess`, conversions to host conventions in the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class CTF:
    """CTF parameters of a micrograph (RELION units). Optional everywhere: nothing in picking requires them."""

    defocus_u_A: float
    defocus_v_A: float
    defocus_angle_deg: float = 0.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    phase_shift_deg: float = 0.0


@dataclass(frozen=True)
class Micrograph:
    """One micrograph as a host tool knows it.

    ``id`` is the key the host uses and that particles refer to: RELION's ``rlnMicrographName`` verbatim, the
    cryoSPARC exposure uid as a decimal string, or the file stem for offline projects. ``path`` is where the
    pixels are on this machine. ``shape`` is ``(ny, nx)`` in original pixels when known (filled in on reading).
    ``pixel_size`` is in Å/px; ``None`` means "take it from the MRC header". ``meta`` carries host fields the
    adapter needs on the way back (e.g. cryoSPARC ``micrograph_blob/path``); the core never reads it.
    """

    id: str
    path: Path
    pixel_size: float | None = None
    shape: tuple[int, int] | None = None
    ctf: CTF | None = None
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if self.shape is not None:
            object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))

    @property
    def name(self) -> str:
        """A short human name (file stem) for logs and file names."""
        return self.path.stem

    def with_(self, **changes) -> "Micrograph":
        return replace(self, **changes)


def _as_float_array(values, n: int, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{what} has {arr.shape[0]} values for {n} particles")
    return arr


@dataclass(frozen=True)
class Particles:
    """A particle set: one row per particle, columnar.

    ``micrograph`` holds the ``Micrograph.id`` of each particle; ``x``, ``y`` are centres in pixels of that original
    micrograph (x = column, y = row, origin at array element [0, 0]). ``score`` is the picker's score (higher is
    better; for curated sets usually absent). ``angles`` are RELION ZYZ Euler angles (rot, tilt, psi) in degrees,
    ``shifts`` the in-plane origin offsets in original pixels (RELION ``rlnOriginX/YAngst`` divided by the
    micrograph pixel size), both present only for refined particles; ``centre = coordinate - shift`` is already
    applied to ``x``, ``y`` by the adapters, and ``shifts`` is kept for reprojection.
    """

    micrograph: np.ndarray
    x: np.ndarray
    y: np.ndarray
    score: np.ndarray | None = None
    angles: np.ndarray | None = None
    shifts: np.ndarray | None = None

    def __post_init__(self):
        mic = np.asarray(self.micrograph, dtype=object).reshape(-1)
        n = mic.shape[0]
        object.__setattr__(self, "micrograph", np.array([str(m) for m in mic], dtype=object))
        object.__setattr__(self, "x", _as_float_array(self.x, n, "x"))
        object.__setattr__(self, "y", _as_float_array(self.y, n, "y"))
        if self.score is not None:
            object.__setattr__(self, "score", _as_float_array(self.score, n, "score"))
        if self.angles is not None:
            ang = np.asarray(self.angles, dtype=np.float64).reshape(n, 3)
            object.__setattr__(self, "angles", ang)
        if self.shifts is not None:
            sh = np.asarray(self.shifts, dtype=np.float64).reshape(n, 2)
            object.__setattr__(self, "shifts", sh)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, with_score: bool = False) -> "Particles":
        return cls(np.empty(0, dtype=object), np.empty(0), np.empty(0), np.empty(0) if with_score else None)

    @classmethod
    def for_one(cls, micrograph_id: str, xy: np.ndarray, score: np.ndarray | None = None) -> "Particles":
        """Particles of one micrograph from an ``(N, 2)`` array of (x, y)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return cls(np.full(len(xy), micrograph_id, dtype=object), xy[:, 0], xy[:, 1], score)

    @classmethod
    def concat(cls, parts: Iterable["Particles"]) -> "Particles":
        parts = [p for p in parts]
        if not parts:
            return cls.empty()

        def cat(attr):
            vals = [getattr(p, attr) for p in parts]
            if all(v is None for v in vals):
                return None
            if attr == "score":  # a set without scores joins as NaN scores
                vals = [v if v is not None else np.full(len(p), np.nan) for v, p in zip(vals, parts)]
            if any(v is None for v in vals):
                return None
            return np.concatenate(vals)

        return cls(
            np.concatenate([p.micrograph for p in parts]),
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            cat("score"),
            cat("angles"),
            cat("shifts"),
        )

    # -- access -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def xy(self) -> np.ndarray:
        """``(N, 2)`` array of (x, y) = (column, row) in original pixels."""
        return np.stack([self.x, self.y], axis=1)

    @property
    def has_poses(self) -> bool:
        return self.angles is not None

    def micrograph_ids(self) -> list[str]:
        """Micrograph ids in order of first appearance."""
        seen: dict[str, None] = {}
        for m in self.micrograph:
            seen.setdefault(m, None)
        return list(seen)

    def subset(self, index) -> "Particles":
        idx = np.asarray(index)
        return Particles(
            self.micrograph[idx],
            self.x[idx],
            self.y[idx],
            None if self.score is None else self.score[idx],
            None if self.angles is None else self.angles[idx],
            None if self.shifts is None else self.shifts[idx],
        )

    def for_micrograph(self, micrograph_id: str) -> "Particles":
        return self.subset(self.micrograph == str(micrograph_id))

    def by_micrograph(self) -> dict[str, "Particles"]:
        return {m: self.for_micrograph(m) for m in self.micrograph_ids()}

    def with_(self, **changes) -> "Particles":
        return replace(self, **changes)


def micrographs_by_id(micrographs: Sequence[Micrograph]) -> dict[str, Micrograph]:
    """Index micrographs by id; duplicate ids are an error (they would make picks ambiguous)."""
    out: dict[str, Micrograph] = {}
    for m in micrographs:
        if m.id in out:
            raise ValueError(f"micrograph id {m.id!r} appears twice ({out[m.id].path} and {m.path})")
        out[m.id] = m
    return out
