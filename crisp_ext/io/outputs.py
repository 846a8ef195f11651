"""Standalone outputs: per-micrograph coordinate STAR, a combined RELION 3.1+ particles STAR, particle stacks.

Coordinates are written as RELION reads them: pixels of the micrograph, x = column, y = row, no flip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..types import Micrograph, Particles
from .atomic import atomic_path
from .star import write_star


def optics_table(micrographs: Sequence[Micrograph], pixel_sizes: dict[str, float | None],
                 extracted: tuple[float, int] | None = None) -> dict:
    """One optics group per distinct (pixel size, voltage, Cs, amplitude contrast); RELION 3.1+ layout."""
    groups: dict[tuple, int] = {}
    for m in micrographs:
        ps = pixel_sizes.get(m.id) or 1.0
        c = m.ctf
        key = (round(ps, 5), c.voltage_kV if c else 300.0, c.cs_mm if c else 2.7, c.amplitude_contrast if c else 0.1)
        groups.setdefault(key, len(groups) + 1)
    table = {
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups.values()],
        "rlnOpticsGroup": list(groups.values()),
        "rlnMicrographPixelSize": [k[0] for k in groups],
        "rlnMicrographOriginalPixelSize": [k[0] for k in groups],
        "rlnVoltage": [k[1] for k in groups],
        "rlnSphericalAberration": [k[2] for k in groups],
        "rlnAmplitudeContrast": [k[3] for k in groups],
    }
    if extracted is not None:
        table["rlnImagePixelSize"] = [extracted[0] or k[0] for k in groups]
        table["rlnImageSize"] = [int(extracted[1])] * len(groups)
        table["rlnImageDimensionality"] = [2] * len(groups)
    group_of = {}
    for m in micrographs:
        ps = pixel_sizes.get(m.id) or 1.0
        c = m.ctf
        key = (round(ps, 5), c.voltage_kV if c else 300.0, c.cs_mm if c else 2.7, c.amplitude_contrast if c else 0.1)
        group_of[m.id] = groups[key]
    return {"table": table, "group_of": group_of}


class CoordinateWriter:
    """Writes each picked micrograph's coordinate STAR at once, scores as RELION figures of merit (which need the
    picker's threshold: known once the picker is ready)."""

    def __init__(self, folder: Path, suffix: str):
        self.folder = folder
        self.suffix = suffix
        self.threshold: float | None = None

    def path(self, mic) -> Path:
        return self.folder / f"{mic.name}_{self.suffix}.star"

    def ready(self, picker) -> None:
        self.threshold = picker.threshold

    def picked(self, mic, picks) -> None:
        from .coords import write_coordinates
        from ..scores import figure_of_merit

        write_coordinates(self.path(mic), picks.xy, figure_of_merit(picks.score, self.threshold))


def read_picked(micrographs: Sequence[Micrograph], coordinate_path: Callable[[Micrograph], Path],
                threshold: float) -> Particles:
    """The picks of every micrograph whose coordinate file (``coordinate_path(micrograph)``) exists, scores back from
    the files' figures of merit (see :mod:`crisp_ext.scores`): what an output folder holds, whichever run wrote it."""
    from ..scores import score_from_figure_of_merit
    from .coords import read_coordinates

    parts = []
    for m in micrographs:
        f = coordinate_path(m)
        if f.exists():
            t = read_coordinates(f)
            score = score_from_figure_of_merit(t.score, threshold) if t.score is not None else None
            parts.append(Particles.for_one(m.id, t.xy, score))
    return Particles.concat(parts) if parts else Particles.empty(with_score=True)


def write_particles_star(path: Path, picks: Particles, micrographs: Sequence[Micrograph],
                         pixel_sizes: dict[str, float | None], fom: np.ndarray | None = None,
                         image_names: Sequence[str] | None = None, box_size: int | None = None) -> Path:
    """All picks in one RELION 3.1+ particles STAR (optics + particles), with CTF columns when known."""
    by_id = {m.id: m for m in micrographs}
    used = [by_id[i] for i in picks.micrograph_ids()] or list(micrographs)[:1]
    optics = optics_table(used, pixel_sizes, extracted=(None, box_size) if box_size else None)
    if box_size:
        optics["table"]["rlnImagePixelSize"] = [ps for ps in optics["table"]["rlnMicrographPixelSize"]]
    n = len(picks)
    table: dict[str, object] = {
        "rlnCoordinateX": picks.x,
        "rlnCoordinateY": picks.y,
        "rlnClassNumber": np.zeros(n, dtype=int),
        "rlnAutopickFigureOfMerit": fom if fom is not None else (picks.score if picks.score is not None
                                                               else np.zeros(n)),
        "rlnAnglePsi": np.zeros(n),
    }
    if image_names is not None:
        table["rlnImageName"] = list(image_names)
    table["rlnMicrographName"] = [str(by_id[i].path) if by_id[i].id == by_id[i].name else by_id[i].id
                                  for i in picks.micrograph]
    table["rlnOpticsGroup"] = [optics["group_of"].get(i, 1) for i in picks.micrograph]
    if n and all(by_id[i].ctf is not None for i in picks.micrograph_ids()):
        table["rlnDefocusU"] = [by_id[i].ctf.defocus_u_A for i in picks.micrograph]
        table["rlnDefocusV"] = [by_id[i].ctf.defocus_v_A for i in picks.micrograph]
        table["rlnDefocusAngle"] = [by_id[i].ctf.defocus_angle_deg for i in picks.micrograph]
        table["rlnPhaseShift"] = [by_id[i].ctf.phase_shift_deg for i in picks.micrograph]
    return write_star(path, {"optics": optics["table"], "particles": table}, loops=["optics", "particles"])


def extract_boxes(image: np.ndarray, xy: np.ndarray, box: int, *, invert: bool = False,
                  normalise_radius: float | None = None) -> np.ndarray:
    """Boxes of ``box``² pixels around each centre, placed as RELION does (``int(x) - box/2`` … with truncation),
    edge-replicated where a box leaves the micrograph. Optionally contrast-inverted and normalised to zero mean and
    unit variance of the background outside ``normalise_radius`` (pixels)."""
    ny, nx = image.shape
    box = int(box)
    half = box // 2
    out = np.empty((len(xy), box, box), dtype=np.float32)
    rows = np.arange(box) - half
    for i, (x, y) in enumerate(np.asarray(xy, dtype=np.float64).reshape(-1, 2)):
        r = np.clip(int(y) + rows, 0, ny - 1)
        c = np.clip(int(x) + rows, 0, nx - 1)
        out[i] = image[np.ix_(r, c)]
    if invert:
        out *= -1
    if normalise_radius is not None and len(out):
        yy, xx = np.mgrid[:box, :box] - half
        bg = (xx ** 2 + yy ** 2) > normalise_radius ** 2
        if bg.any():
            mu = out[:, bg].mean(axis=1)[:, None, None]
            sd = out[:, bg].std(axis=1)[:, None, None]
            out = (out - mu) / np.where(sd > 0, sd, 1.0)
    return out.astype(np.float32)


def write_stack(path: Path, stack: np.ndarray, pixel_size: float | None) -> Path:
    import mrcfile

    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(stack, dtype=np.float32))
            mrc.set_image_stack()
            if pixel_size:
                mrc.voxel_size = float(pixel_size)
    return path
