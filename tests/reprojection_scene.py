"""Simulated micrographs of an elongated, asymmetric particle with known poses, and the 3D mask/map of the same
phantom, for the labels-by-reprojection tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crisp_ext.io.mrc import write_mrc
from crisp_ext.io.star import write_star
from crisp_ext.simulate import Phantom, phantom_volume, simulate_micrograph
from crisp_ext.types import Micrograph, Particles

PHANTOM = Phantom.elongated()
PIXEL_SIZE = 4.0  # Å/px of the micrographs
DIAMETER_PX = 16.0
DIAMETER_A = DIAMETER_PX * PIXEL_SIZE
MAP_PIXEL_SIZE = 3.0  # finer than the micrographs'
BOX = 32  # 96 Å: holds the phantom (about 80 Å long)
MASK_LEVEL = 0.1  # the simulator's footprints are its projections above 0.1 of their maximum


def simulate(n: int = 2, shape=(256, 256), *, diameter_px: float = DIAMETER_PX, seed: int = 0, snr: float = 0.1):
    return [simulate_micrograph(shape, n_particles=20, diameter_px=diameter_px, pixel_size=PIXEL_SIZE, snr=snr,
                                phantom=PHANTOM, seed=seed + i) for i in range(n)]


def mask_volume(pixel_size: float = MAP_PIXEL_SIZE, box: int | None = BOX, diameter_A: float = DIAMETER_A):
    return phantom_volume(PHANTOM, diameter_A, pixel_size, box, mask_level=MASK_LEVEL)


def map_volume(pixel_size: float = MAP_PIXEL_SIZE, box: int | None = BOX, diameter_A: float = DIAMETER_A):
    return phantom_volume(PHANTOM, diameter_A, pixel_size, box)


def write_micrographs(root: Path, sims) -> tuple[list[Micrograph], Particles]:
    """MRCs ``root/m<i>.mrc`` and the true particles (centres and poses)."""
    mics, parts = [], []
    for i, sim in enumerate(sims):
        path = write_mrc(Path(root) / f"m{i}.mrc", sim.image, pixel_size=PIXEL_SIZE)
        mics.append(Micrograph(f"m{i}", path, pixel_size=PIXEL_SIZE, shape=sim.image.shape))
        parts.append(Particles(np.full(len(sim.centres), f"m{i}", dtype=object), sim.centres[:, 0],
                               sim.centres[:, 1], angles=sim.angles))
    return mics, Particles.concat(parts)


def write_particles_star(path: Path, sims, names, *, origin_px: float = 0.0, seed: int = 0) -> Path:
    """A Refine3D-like particles STAR with the true poses; coordinates = centre + origin offset (Å origins)."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnAngleRot", "rlnAngleTilt",
                            "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnOpticsGroup")}
    for name, sim in zip(names, sims):
        for (x, y), (rot, tilt, psi) in zip(sim.centres, sim.angles):
            off = rng.uniform(-origin_px, origin_px, 2) if origin_px else np.zeros(2)
            for key, value in zip(rows, (name, x + off[0], y + off[1], rot, tilt, psi, off[0] * PIXEL_SIZE,
                                         off[1] * PIXEL_SIZE, 1)):
                rows[key].append(value)
    table = {k: np.array(v, dtype=object if k == "rlnMicrographName" else None) for k, v in rows.items()}
    optics = {"rlnOpticsGroupName": np.array(["opticsGroup1"], dtype=object), "rlnOpticsGroup": np.array([1]),
              "rlnImagePixelSize": np.array([PIXEL_SIZE]), "rlnImageSize": np.array([32]),
              "rlnImageDimensionality": np.array([2]), "rlnVoltage": np.array([300.0]),
              "rlnSphericalAberration": np.array([2.7]), "rlnAmplitudeContrast": np.array([0.1])}
    write_star(path, {"optics": optics, "particles": table}, loops=["optics", "particles"])
    return Path(path)


def iou(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float((a & b).sum() / max(1, (a | b).sum()))


# Trains and picks two 256² micrographs in a few seconds on one thread (the wiring tests check labels, not accuracy).
TINY = {
    "preprocess.target_diameter_px": 16.0,
    "model.arch": "unet",
    "model.encoder": "resnet18",
    "model.encoder_depth": 3,
    "model.decoder_channels": [32, 16, 8],
    "train.epochs": 1,
    "train.patch_size": 64,
    "train.batch_size": 4,
    "train.patches_per_micrograph": 2,
    "train.min_patches_per_epoch": 8,
    "train.threads": 1,
    "train.bf16": False,
    "predict.tile": 256,
    "predict.overlap": 16,
    "predict.bf16": False,
    "predict.workers": 0,
    "centres.finder": "nms",
}
