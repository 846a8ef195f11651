import numpy as np
from scipy.spatial.distance import pdist

from crisp_ext.simulate import Phantom, place_centres, simulate_micrograph


def test_masks_sit_on_centres():
    sim = simulate_micrograph((512, 640), n_particles=60, diameter_px=24, snr=0.1, seed=2)
    assert sim.image.shape == (512, 640) and sim.mask.shape == (512, 640)
    assert len(sim.centres) == 60 and sim.angles.shape == (60, 3)
    for i, (x, y) in enumerate(sim.centres):
        ys, xs = np.nonzero(sim.instances == i + 1)
        assert len(xs) > 0.4 * np.pi * 12 ** 2  # a footprint of about the particle's size
        # the footprint surrounds its centre (centroid within a quarter diameter)
        assert np.hypot(xs.mean() - x, ys.mean() - y) < 6
        assert sim.mask[int(round(y)), int(round(x))]
    # every mask pixel is near some centre
    ys, xs = np.nonzero(sim.mask)
    d = np.min(np.hypot(xs[:, None] - sim.centres[None, :, 0], ys[:, None] - sim.centres[None, :, 1]), axis=1)
    assert d.max() < 0.75 * 24


def test_particles_are_dark_and_snr_is_honoured():
    sim = simulate_micrograph((512, 512), n_particles=40, diameter_px=24, snr=0.1, seed=4)
    bg = np.median(sim.clean[~sim.mask])
    assert np.median(sim.clean[sim.mask]) < bg
    noise = sim.image - sim.clean
    snr = sim.clean[sim.mask].var() / noise.var()
    assert 0.08 < snr < 0.12


def test_placement_separation_and_density():
    rng = np.random.default_rng(0)
    sparse = place_centres((1024, 1024), 200, 24, rng, min_separation=1.5)
    assert len(sparse) == 200 and pdist(sparse).min() >= 1.5 * 24
    dense = simulate_micrograph((1024, 1024), n_particles=650, diameter_px=27, placement="dense", seed=1)
    assert len(dense.centres) == 650 and pdist(dense.centres).min() >= 1.02 * 27 - 1e-9


def test_contaminants_keep_particles_away():
    sim = simulate_micrograph((512, 512), n_particles=80, diameter_px=20, carbon_edge=True, ice_blobs=2, seed=5)
    assert 0 < len(sim.centres) <= 80
    assert np.isfinite(sim.image).all()


def test_elongated_phantom_is_elongated():
    sim = simulate_micrograph((256, 256), n_particles=1, diameter_px=48, snr=1.0, seed=0,
                              phantom=Phantom.elongated(aspect=3.0), min_separation=1.0)
    ys, xs = np.nonzero(sim.instances == 1)
    cov = np.cov(np.vstack([xs, ys]))
    ev = np.sort(np.linalg.eigvalsh(cov))
    # any view shows at most the rod's length; the footprint is never larger than the particle
    assert np.sqrt(ev[-1]) < 48 / 2
    assert len(xs) < 0.8 * np.pi * 24 ** 2


def test_reproducible():
    a = simulate_micrograph((256, 256), n_particles=20, seed=9)
    b = simulate_micrograph((256, 256), n_particles=20, seed=9)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.centres, b.centres)


def test_junk_is_unpicked_and_leaves_the_rest_unchanged():
    from crisp_ext.simulate import _junk

    plain = simulate_micrograph((512, 512), n_particles=40, diameter_px=24, snr=0.1, seed=4)
    assert np.array_equal(plain.image, simulate_micrograph((512, 512), n_particles=40, diameter_px=24, snr=0.1,
                                                           seed=4, junk=0).image)
    protein, extra, excluded = _junk((512, 512), np.random.default_rng([4, 1]), 24.0, 6, Phantom.globular(), 0.1)
    assert protein.max() > 0 and extra.max() > 0.9  # aggregates and crystals both drawn
    strong = (protein > 0.05 * protein.max()) | (extra > 0.05)
    assert excluded[strong].all()  # the region particles are kept out of covers every object
    sim = simulate_micrograph((512, 512), n_particles=40, diameter_px=24, snr=0.1, seed=4, junk=6)
    assert len(sim.centres) == 40
    ix, iy = sim.centres.round().astype(int).T
    assert not excluded[iy.clip(0, 511), ix.clip(0, 511)].any()  # no particle centre on a junk object
    assert sim.mask[strong].mean() < 0.05  # junk is not in the particles' footprint mask
    assert np.abs(sim.clean - plain.clean).max() > 0
