"""cryoSPARC rows <-> core types: exposures -> Micrograph, particles -> Particles, picks -> a particles Dataset.

The one place where cryoSPARC's centre fractions meet pixels: ``x = center_x_frac * nx``, ``y = center_y_frac * ny``
with ``(ny, nx)`` the shape of the micrograph array as read (``micrograph_blob/shape`` is ``(ny, nx)``), x = column,
y = row, no y-flip. Imports only ``cryosparc.dataset`` (no HTTP client), so offline use stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from cryosparc.dataset import Dataset

from crisp_ext.errors import InputError
from crisp_ext.types import CTF, Micrograph, Particles

# The particle ``location`` fields we write: the v4 minimum plus the two newer servers add (reference §7).
LOCATION_FIELDS: list[tuple] = [
    ("location/micrograph_uid", "<u8"),
    ("location/exp_group_id", "<u4"),
    ("location/micrograph_path", "O"),
    ("location/micrograph_shape", "<u4", (2,)),
    ("location/center_x_frac", "<f4"),
    ("location/center_y_frac", "<f4"),
    ("location/micrograph_psize_A", "<f4"),
    ("location/min_dist_A", "<f4"),
]
PICK_STATS_FIELDS: list[tuple] = [
    ("pick_stats/ncc_score", "<f4"),
    ("pick_stats/power", "<f4"),
    ("pick_stats/template_idx", "<u4"),
    ("pick_stats/angle_rad", "<f4"),
]
PARTICLE_FIELDS = LOCATION_FIELDS + PICK_STATS_FIELDS
DEFAULT_EXP_GROUP = 1  # used when the exposures carry no exposure group (guess: cryoSPARC numbers groups from 1)


# -- the conversion --------------------------------------------------------------------------------------------------

def fractions_to_pixels(frac_x, frac_y, shape) -> np.ndarray:
    """Centre fractions -> ``(N, 2)`` pixel (x, y); ``shape`` is ``(ny, nx)`` (one, or one per row)."""
    shape = np.asarray(shape, dtype=np.float64).reshape(-1, 2)
    x = np.asarray(frac_x, dtype=np.float64) * shape[:, 1]
    y = np.asarray(frac_y, dtype=np.float64) * shape[:, 0]
    return np.stack([x, y], axis=1).reshape(-1, 2)


def pixels_to_fractions(xy, shape) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (x, y) ``(N, 2)`` -> (center_x_frac, center_y_frac); ``shape`` is ``(ny, nx)``."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    shape = np.asarray(shape, dtype=np.float64).reshape(-1, 2)
    return xy[:, 0] / shape[:, 1], xy[:, 1] / shape[:, 0]


# -- exposures -> micrographs ----------------------------------------------------------------------------------------

def _column(dset: Dataset, *names: str, default=None):
    for name in names:
        if name in dset:
            return np.asarray(dset[name])
    return default


def _ctf(row: Mapping[str, object]) -> CTF | None:
    df1 = float(row.get("ctf/df1_A", 0.0) or 0.0)
    if df1 <= 0:
        return None
    return CTF(
        defocus_u_A=df1,
        defocus_v_A=float(row.get("ctf/df2_A", df1)),
        defocus_angle_deg=float(np.degrees(row.get("ctf/df_angle_rad", 0.0))),
        voltage_kV=float(row.get("ctf/accel_kv", 300.0)),
        cs_mm=float(row.get("ctf/cs_mm", 2.7)),
        amplitude_contrast=float(row.get("ctf/amp_contrast", 0.1)),
        phase_shift_deg=float(np.degrees(row.get("ctf/phase_shift_rad", 0.0))),
    )


def micrographs_from_exposures(exposures: Dataset, local_path: Callable[[str], Path], *, where: str = "exposures"
                               ) -> list[Micrograph]:
    """One :class:`Micrograph` per exposure row.

    ``id`` is the exposure ``uid`` as a decimal string; ``path`` is ``local_path(micrograph_blob/path)``; ``shape``
    and ``pixel_size`` come from ``micrograph_blob``. ``meta`` keeps what the particles output needs verbatim:
    ``uid``, ``micrograph_path``, ``blob_shape`` (ny, nx), ``exp_group_id`` and ``psize_A``.
    """
    if "micrograph_blob/path" not in exposures:
        raise InputError(f"{where} has no micrograph_blob slot (fields: {', '.join(exposures.fields()[:8])} ...); "
                         f"give the exposures output of a motion-correction, CTF or curation job")
    n = len(exposures)
    uids = np.asarray(exposures["uid"], dtype=np.uint64)
    paths = [str(p) for p in exposures["micrograph_blob/path"]]
    shapes = _column(exposures, "micrograph_blob/shape", default=np.zeros((n, 2), dtype=np.uint32)).reshape(n, 2)
    psizes = _column(exposures, "micrograph_blob/psize_A", default=np.zeros(n, dtype=np.float32))
    groups = _column(exposures, "ctf/exp_group_id", "mscope_params/exp_group_id",
                     default=np.full(n, DEFAULT_EXP_GROUP, dtype=np.uint32))
    ctf_fields = [f for f in exposures.fields() if f.startswith("ctf/")]
    mics = []
    for i in range(n):
        ny, nx = int(shapes[i, 0]), int(shapes[i, 1])
        psize = float(psizes[i])
        ctf = _ctf({f: exposures[f][i] for f in ctf_fields}) if ctf_fields else None
        meta = {"uid": int(uids[i]), "micrograph_path": paths[i], "blob_shape": (ny, nx),
                "exp_group_id": int(groups[i]), "psize_A": psize}
        mics.append(Micrograph(id=str(int(uids[i])), path=local_path(paths[i]),
                               pixel_size=psize if psize > 0 else None,
                               shape=(ny, nx) if ny > 0 and nx > 0 else None, ctf=ctf, meta=meta))
    return mics


# -- particles -> Particles ------------------------------------------------------------------------------------------

def particles_from_dataset(particles: Dataset, micrographs: Sequence[Micrograph], *, where: str = "particles"
                           ) -> tuple[Particles, int]:
    """Curated particles in original pixels of the micrographs; returns ``(particles, n_unmatched)``.

    Rows are tied to micrographs by ``location/micrograph_uid`` (the exposure uid), or failing that by the file
    name of ``location/micrograph_path``; rows matching no micrograph are left out and counted. Pixel positions use
    the micrograph's ``shape`` (the array the pipeline reads). With ``alignments3D`` the poses become RELION Euler
    angles, and the shifts (pixels of ``alignments3D/psize_A``) are applied: centre = location - shift.
    """
    for name in ("location/micrograph_uid", "location/center_x_frac", "location/center_y_frac"):
        if name not in particles:
            raise InputError(f"{where} has no {name} field: give a particles output with a location slot")
    by_uid = {int(m.meta.get("uid", m.id)): m for m in micrographs}
    by_name = {PurePosixPath(str(m.meta.get("micrograph_path", m.path))).name: m for m in micrographs}
    uids = np.asarray(particles["location/micrograph_uid"], dtype=np.uint64)
    paths = particles["location/micrograph_path"] if "location/micrograph_path" in particles else None
    owner: list[Micrograph | None] = []
    for i, uid in enumerate(uids):
        mic = by_uid.get(int(uid))
        if mic is None and paths is not None:
            mic = by_name.get(PurePosixPath(str(paths[i])).name)
        owner.append(mic)
    keep = np.array([m is not None for m in owner], dtype=bool)
    n_unmatched = int((~keep).sum())
    owners = [m for m in owner if m is not None]
    if not owners:
        return Particles.empty(), n_unmatched
    for m in owners:
        if m.shape is None:
            raise InputError(f"micrograph {m.meta.get('micrograph_path', m.path)} has no known shape; cannot turn "
                             f"centre fractions into pixels")
    shapes = np.array([m.shape for m in owners], dtype=np.float64)
    xy = fractions_to_pixels(np.asarray(particles["location/center_x_frac"])[keep],
                             np.asarray(particles["location/center_y_frac"])[keep], shapes)
    angles = shifts = None
    if "alignments3D/pose" in particles:
        from .poses import cryosparc_pose_to_euler, cryosparc_shift_to_origin_A

        angles = cryosparc_pose_to_euler(np.asarray(particles["alignments3D/pose"])[keep])
        if "alignments3D/shift" in particles:
            psize = _column(particles, "alignments3D/psize_A", default=np.zeros(len(particles)))[keep]
            mic_psize = np.array([m.pixel_size or 0.0 for m in owners], dtype=np.float64)
            origin_A = cryosparc_shift_to_origin_A(np.asarray(particles["alignments3D/shift"])[keep], psize)
            scale = np.divide(1.0, mic_psize, out=np.zeros_like(mic_psize), where=mic_psize > 0)
            shifts = origin_A * scale[:, None]
            xy = xy - shifts
    return Particles([m.id for m in owners], xy[:, 0], xy[:, 1], angles=angles, shifts=shifts), n_unmatched


# -- picks -> particles Dataset --------------------------------------------------------------------------------------

def allocate_particles(n: int) -> Dataset:
    """An empty particles Dataset with every field we write (offline use; live jobs use ``alloc_output``)."""
    return Dataset.allocate(n, PARTICLE_FIELDS)


def fill_particles(dset: Dataset, picks: Particles, micrographs: Mapping[str, Micrograph],
                   min_dist_A: Mapping[str, float] | float, score_range: tuple[float, float] = (0.0, 1.0),
                   *, declared_only: bool = False) -> Dataset:
    """Fill ``location`` and ``pick_stats`` of ``dset`` (allocated with ``len(picks)`` rows) from the picks.

    Fields the server did not announce but cryoSPARC's own pickers write (``micrograph_psize_A``, ``min_dist_A``)
    are added. ``ncc_score`` and ``power`` carry the pick score mapped to [0, 1]; ``template_idx`` and ``angle_rad``
    are 0. Returns ``dset``.
    """
    n = len(picks)
    if len(dset) != n:
        raise ValueError(f"dataset has {len(dset)} rows for {n} picks")
    have = set(dset.fields())
    missing = [f for f in PARTICLE_FIELDS if f[0] not in have]
    if missing and not declared_only:  # offline .cs: the full set; live: exactly what the server declares
        dset.add_fields(missing)
    if n == 0:
        return dset
    mics = [micrographs[m] for m in picks.micrograph]
    shapes = np.array([_pixel_shape(m) for m in mics], dtype=np.float64)
    fx, fy = pixels_to_fractions(picks.xy, shapes)
    dset = _FieldWriter(dset)
    dset["location/micrograph_uid"] = np.array([int(m.meta["uid"]) for m in mics], dtype=np.uint64)
    dset["location/exp_group_id"] = np.array([int(m.meta.get("exp_group_id", DEFAULT_EXP_GROUP)) for m in mics],
                                             dtype=np.uint32)
    dset["location/micrograph_path"] = [str(m.meta["micrograph_path"]) for m in mics]
    # the exposure's recorded shape, or the file's when it recorded none ((0, 0))
    dset["location/micrograph_shape"] = np.array([_recorded_shape(m) for m in mics], dtype=np.uint32).reshape(n, 2)
    dset["location/center_x_frac"] = fx.astype(np.float32)
    dset["location/center_y_frac"] = fy.astype(np.float32)
    dset["location/micrograph_psize_A"] = np.array([m.meta.get("psize_A") or m.pixel_size or 0.0 for m in mics],
                                                   dtype=np.float32)
    if isinstance(min_dist_A, Mapping):
        dset["location/min_dist_A"] = np.array([min_dist_A.get(m.id, 0.0) for m in mics], dtype=np.float32)
    else:
        dset["location/min_dist_A"] = np.float32(min_dist_A)
    score = unit_score(picks.score, score_range, n)
    dset["pick_stats/ncc_score"] = score
    dset["pick_stats/power"] = score
    dset["pick_stats/template_idx"] = 0
    dset["pick_stats/angle_rad"] = 0.0
    return dset.dataset


class _FieldWriter:
    """Assigns the fields a dataset has; the others (not declared by a live server) are left out."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.fields = set(dataset.fields())

    def __setitem__(self, name: str, value) -> None:
        if name in self.fields:
            self.dataset[name] = value


def unit_score(score, score_range: tuple[float, float], n: int) -> np.ndarray:
    """Scores mapped linearly from ``score_range`` to [0, 1] (clipped); missing scores become 1."""
    if score is None:
        return np.ones(n, dtype=np.float32)
    lo, hi = float(score_range[0]), float(score_range[1])
    s = np.asarray(score, dtype=np.float64)
    s = (s - lo) / (hi - lo) if hi > lo else s
    return np.clip(np.nan_to_num(s, nan=0.0), 0.0, 1.0).astype(np.float32)


def picks_from_dataset(dset: Dataset, micrographs: Sequence[Micrograph]) -> Particles:
    """Picks read back from a particles Dataset (with scores from ``pick_stats/ncc_score`` when present)."""
    parts, _ = particles_from_dataset(dset, micrographs)
    if "pick_stats/ncc_score" in dset and len(parts):
        known = {int(m.meta.get("uid", m.id)) for m in micrographs}
        rows = np.array([int(u) in known for u in dset["location/micrograph_uid"]], dtype=bool)
        parts = parts.with_(score=np.asarray(dset["pick_stats/ncc_score"], dtype=np.float64)[rows])
    return parts


def _recorded_shape(mic: Micrograph) -> tuple[int, int]:
    shape = mic.meta.get("blob_shape")
    if shape is not None and len(shape) == 2 and all(int(v) > 0 for v in shape):
        return (int(shape[0]), int(shape[1]))
    return _pixel_shape(mic)


def _pixel_shape(mic: Micrograph) -> tuple[int, int]:
    if mic.shape is None:
        raise InputError(f"micrograph {mic.path} has no known shape; cannot write centre fractions")
    return mic.shape
