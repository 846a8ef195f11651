"""A tiny cryoSPARC project for the cryosparc_job tests: simulated non-square micrographs seeded into the fake
server (real ``Dataset.save`` / ``cryosparc.mrc.write`` files), a tiny picker config that trains in seconds, and
one model directory trained once per session for tests that only need to pick."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

SHAPE = (256, 384)  # (ny, nx): non-square on purpose
PIXEL_SIZE = 4.0  # Å/px
DIAMETER_PX = 16.0
DIAMETER_A = DIAMETER_PX * PIXEL_SIZE

# Small enough that a full train + pick of three micrographs takes a few seconds on one CPU thread.
TINY = {
    "preprocess.target_diameter_px": 16.0,
    "model.arch": "unet",
    "model.encoder": "resnet18",
    "model.encoder_depth": 3,
    "model.decoder_channels": [32, 16, 8],
    "train.epochs": 2,
    "train.patch_size": 64,
    "train.batch_size": 4,
    "train.patches_per_micrograph": 2,
    "train.min_patches_per_epoch": 64,
    "train.threads": 1,
    "train.bf16": False,
    "predict.tile": 256,
    "predict.overlap": 16,
    "predict.bf16": False,
    "centres.finder": "nms",
}


@dataclass
class Scene:
    exposures: object  # fakes.cryosparc_server.SeededJob
    particles: object
    sims: list


def simulated(n: int = 3, shape=SHAPE, seed: int = 0) -> list:
    from crisp_ext.simulate import simulate_micrograph

    return [simulate_micrograph(shape, n_particles=20, diameter_px=DIAMETER_PX, pixel_size=PIXEL_SIZE,
                                seed=seed + i) for i in range(n)]


def seed_scene(fake, n: int = 3, curated=(0, 1), *, poses: bool = False, **exposure_kw) -> Scene:
    """Exposures J1 (simulated micrographs) and curated particles J2 (the true centres on ``curated``)."""
    sims = simulated(n)
    exposures = fake.seed_exposures(images=[s.image for s in sims], psize_A=PIXEL_SIZE,
                                    ctf={"df1_A": [12000.0 + 1000 * i for i in range(n)]}, **exposure_kw)
    coords = {i: sims[i].centres for i in curated}
    total = sum(len(c) for c in coords.values())
    pose = np.random.default_rng(1).uniform(-1, 1, size=(total, 3)).astype(np.float32) if poses else None
    particles = fake.seed_particles(exposures, coords, poses=pose)
    return Scene(exposures, particles, sims)


_TRAINED: dict = {}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A picker trained once per test session on two simulated micrographs (tiny settings); its model directory.

    Test modules import this fixture, so pytest sees one definition per module: the cache makes them share it."""
    if "model_dir" not in _TRAINED:
        _TRAINED["model_dir"] = _train(tmp_path_factory)
    return _TRAINED["model_dir"]


def _train(tmp_path_factory):
    import torch

    from crisp_ext import pipeline
    from crisp_ext.config import PickerConfig
    from crisp_ext.io.mrc import write_mrc
    from crisp_ext.types import Micrograph, Particles

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("crisp-model")
    mics, parts = [], []
    for i, sim in enumerate(simulated(2, seed=100)):
        path = write_mrc(root / f"m{i}.mrc", sim.image, pixel_size=PIXEL_SIZE)
        mics.append(Micrograph(str(i), path, pixel_size=PIXEL_SIZE))
        parts.append(Particles.for_one(str(i), sim.centres))
    cfg = PickerConfig().updated({**TINY, "particle.diameter_A": DIAMETER_A})
    result = pipeline.run(mics, cfg, work_dir=root / "work", particles=Particles.concat(parts))
    return result.model_dir
