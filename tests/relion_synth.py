"""A tiny synthetic RELION project for the crisp-relion tests: micrographs from :mod:`crisp_ext.simulate`, a
micrographs STAR as CtfFind writes it, and a curated particles STAR as Extract/Select write it (optics with another
image pixel size, origin offsets in Å), with the simulator's ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crisp_ext.io.mrc import write_mrc
from crisp_ext.io.star import write_star
from crisp_ext.simulate import simulate_micrograph

PIXEL_SIZE = 3.0  # Å/px of the micrographs
DIAMETER_A = 84.0  # 28 px
IMAGE_PIXEL_SIZE = 6.0  # the particles were extracted binned by 2


@dataclass
class Project:
    root: Path
    names: list[str]  # rlnMicrographName of each micrograph, as in the micrographs STAR
    truth: dict[str, np.ndarray]  # name -> (N, 2) true centres (x, y), micrograph pixels
    defocus: dict[str, float]  # name -> defocus in Å
    mics_star: str = ""  # relative to root
    parts_star: str = ""
    curated: dict[str, np.ndarray] = field(default_factory=dict)  # name -> centres in the particles STAR


def simulate(root: Path, *, n_mics: int = 5, shape=(384, 384), mic_dir: str = "MotionCorr/job002/Movies",
             seed: int = 0, snr: float = 0.1) -> Project:
    """Write ``n_mics`` micrographs under ``root/mic_dir`` (names relative to ``root``)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    names, truth, defocus = [], {}, {}
    for i in range(n_mics):
        sim = simulate_micrograph(shape, n_particles=int(rng.integers(22, 32)), diameter_px=DIAMETER_A / PIXEL_SIZE,
                                  pixel_size=PIXEL_SIZE, snr=snr, defocus_um=float(rng.uniform(1.2, 2.4)),
                                  seed=seed * 100 + i)
        name = f"{mic_dir}/mic{i + 1:03d}.mrc"
        write_mrc(root / name, sim.image, pixel_size=PIXEL_SIZE)
        names.append(name)
        truth[name] = sim.centres
        defocus[name] = sim.defocus_A
    return Project(root=root, names=names, truth=truth, defocus=defocus)


def optics_micrographs(pixel_size: float = PIXEL_SIZE) -> dict:
    return {"rlnOpticsGroupName": np.array(["opticsGroup1"], dtype=object), "rlnOpticsGroup": np.array([1]),
            "rlnMicrographOriginalPixelSize": np.array([pixel_size]), "rlnVoltage": np.array([300.0]),
            "rlnSphericalAberration": np.array([2.7]), "rlnAmplitudeContrast": np.array([0.1]),
            "rlnMicrographPixelSize": np.array([pixel_size])}


def write_micrographs_star(project: Project, path: str, names: list[str] | None = None) -> str:
    """A CtfFind-like micrographs STAR (optics + micrographs with CTF values) at ``root/path``."""
    names = project.names if names is None else names
    n = len(names)
    d = np.array([project.defocus.get(m, 15000.0) for m in names])
    table = {"rlnMicrographName": np.array(names, dtype=object), "rlnOpticsGroup": np.ones(n, dtype=int),
             "rlnCtfImage": np.array([m.rsplit(".", 1)[0] + ".ctf:mrc" for m in names], dtype=object),
             "rlnDefocusU": d, "rlnDefocusV": d, "rlnCtfAstigmatism": np.zeros(n), "rlnDefocusAngle": np.zeros(n),
             "rlnCtfFigureOfMerit": np.full(n, 0.2), "rlnCtfMaxResolution": np.full(n, 6.0)}
    write_star(project.root / path, {"optics": optics_micrographs(), "micrographs": table},
               loops=["optics", "micrographs"])
    project.mics_star = path
    return path


def write_particles_star(project: Project, path: str, on: list[str], *, keep: float = 0.9, origin_px: float = 6.0,
                         seed: int = 1) -> str:
    """A curated particles STAR: ``keep`` of the true particles of the micrographs ``on``, each with a random origin
    offset (so that rlnCoordinate = centre + origin / micrograph pixel size), extracted at IMAGE_PIXEL_SIZE."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("rlnCoordinateX", "rlnCoordinateY", "rlnImageName", "rlnMicrographName",
                            "rlnOpticsGroup", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                            "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnClassNumber")}
    k = 0
    for name in on:
        centres = project.truth[name]
        sel = centres[rng.random(len(centres)) < keep]
        project.curated[name] = sel
        for x, y in sel:
            off = rng.uniform(-origin_px, origin_px, 2)
            k += 1
            rows["rlnCoordinateX"].append(round(float(x + off[0]), 2))
            rows["rlnCoordinateY"].append(round(float(y + off[1]), 2))
            rows["rlnOriginXAngst"].append(float(off[0] * PIXEL_SIZE))
            rows["rlnOriginYAngst"].append(float(off[1] * PIXEL_SIZE))
            rows["rlnImageName"].append(f"{k:06d}@Extract/job007/{Path(name).stem}.mrcs")
            rows["rlnMicrographName"].append(name)
            rows["rlnOpticsGroup"].append(1)
            rows["rlnAngleRot"].append(float(rng.uniform(-180, 180)))
            rows["rlnAngleTilt"].append(float(rng.uniform(0, 180)))
            rows["rlnAnglePsi"].append(float(rng.uniform(-180, 180)))
            rows["rlnDefocusU"].append(project.defocus[name])
            rows["rlnDefocusV"].append(project.defocus[name])
            rows["rlnDefocusAngle"].append(0.0)
            rows["rlnClassNumber"].append(1)
    table = {c: np.array(v, dtype=object if c in ("rlnImageName", "rlnMicrographName") else None)
             for c, v in rows.items()}
    optics = {"rlnOpticsGroupName": np.array(["opticsGroup1"], dtype=object), "rlnOpticsGroup": np.array([1]),
              "rlnMicrographOriginalPixelSize": np.array([PIXEL_SIZE]), "rlnVoltage": np.array([300.0]),
              "rlnSphericalAberration": np.array([2.7]), "rlnAmplitudeContrast": np.array([0.1]),
              "rlnImagePixelSize": np.array([IMAGE_PIXEL_SIZE]), "rlnImageSize": np.array([24]),
              "rlnImageDimensionality": np.array([2])}
    write_star(project.root / path, {"optics": optics, "particles": table}, loops=["optics", "particles"])
    project.parts_star = path
    return path


def match(pred: np.ndarray, truth: np.ndarray, radius: float) -> np.ndarray:
    """Distances of greedily matched (nearest first) prediction-truth pairs within ``radius``."""
    pred = np.asarray(pred, dtype=float).reshape(-1, 2)
    truth = np.asarray(truth, dtype=float).reshape(-1, 2)
    if not len(pred) or not len(truth):
        return np.zeros(0)
    d = np.linalg.norm(pred[:, None, :] - truth[None, :, :], axis=2)
    pairs = sorted((d[i, j], i, j) for i, j in zip(*np.nonzero(d <= radius)))
    used_p, used_t, out = set(), set(), []
    for dist, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            out.append(dist)
    return np.array(out)


# Model and training settings that train in about 15 s on one CPU thread (crisp-relion's 'set' parameter); fewer
# epochs left some seeds under-trained (picks off by 4-5 px). Run with --j 1: on a busy machine two OpenMP threads
# per process were 5-20x slower than one.
TINY_SETTINGS = ",".join([
    "model.arch=unet", "model.encoder=tu-resnet10t", "model.encoder_depth=3",
    "model.decoder_channels=32,16,8", "preprocess.target_diameter_px=16", "train.patch_size=64",
    "train.patches_per_micrograph=16", "train.min_patches_per_epoch=64", "train.lr=0.003", "train.epochs=25",
    "predict.workers=0",
])
