import numpy as np
import pytest

from crisp_ext.config import PreprocessConfig
from crisp_ext.errors import InputError
from crisp_ext.preprocess import (Scale, diameter_in_pixels, make_scale, normalise, resample, to_working)


@pytest.mark.parametrize("binning", ["fourier", "mean"])
@pytest.mark.parametrize("shape,diameter", [((1000, 1200), 100.0), ((777, 513), 61.0), ((4096, 4096), 108.0)])
def test_coordinates_round_trip_within_half_pixel(binning, shape, diameter):
    scale = make_scale(shape, diameter, PreprocessConfig(binning=binning))
    rng = np.random.default_rng(1)
    xy = np.column_stack([rng.uniform(0, shape[1] - 1, 500), rng.uniform(0, shape[0] - 1, 500)])
    back = scale.to_original(scale.to_working(xy))
    assert np.abs(back - xy).max() <= 1e-6
    # and through integer working pixels (what a label map or a pick on the working grid can express)
    snapped = scale.to_original(np.round(scale.to_working(xy)))
    assert np.abs(snapped - xy).max() <= 0.5 / scale.factor + 1e-6
    assert Scale.from_dict(scale.to_dict()) == scale


@pytest.mark.parametrize("binning", ["fourier", "mean"])
def test_binned_blob_lands_where_the_scale_says(binning):
    ny, nx = 600, 800
    yy, xx = np.mgrid[:ny, :nx]
    cx, cy = 301.3, 222.8
    img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 15.0 ** 2)).astype(np.float32)
    scale = make_scale(img.shape, 96.0, PreprocessConfig(binning=binning, target_diameter_px=24))
    w = resample(img, scale)
    assert w.shape == scale.working_shape
    Y, X = np.mgrid[: w.shape[0], : w.shape[1]]
    centroid = np.array([(w * X).sum() / w.sum(), (w * Y).sum() / w.sum()])
    assert np.allclose(centroid, scale.to_working([[cx, cy]])[0], atol=0.05)


def test_working_diameter_is_the_target():
    scale = make_scale((4096, 4096), 108.0, PreprocessConfig(target_diameter_px=24))
    assert scale.length_to_working(108.0) == pytest.approx(24.0, rel=0.01)
    assert scale.working_shape == (910, 910)


def test_fourier_keeps_mean():
    img = np.random.default_rng(0).normal(3.0, 1.0, (512, 640)).astype(np.float32)
    scale = make_scale(img.shape, 50.0, PreprocessConfig(target_diameter_px=20))
    assert resample(img, scale).mean() == pytest.approx(img.mean(), abs=1e-3)


def test_normalise_methods():
    rng = np.random.default_rng(0)
    img = rng.normal(100.0, 5.0, (256, 256)).astype(np.float32)
    img[:64] -= 60.0  # a dark carbon band must not set the scale for gmm
    r = normalise(img, "robust")
    assert abs(np.median(r)) < 0.05
    g = normalise(img, "gmm")
    assert abs(g[64:].mean()) < 0.1 and abs(g[64:].std() - 1.0) < 0.1
    with pytest.raises(InputError):
        normalise(img, "bogus")


def test_to_working_and_diameter_errors():
    img = np.random.default_rng(0).normal(size=(300, 200)).astype(np.float32)
    w = to_working(img, 40.0, PreprocessConfig(target_diameter_px=20))
    assert w.image.shape == (150, 100) and w.image.dtype == np.float32
    assert diameter_in_pixels(180.0, None, 2.0) == 90.0
    assert diameter_in_pixels(None, 33.0, None) == 33.0
    with pytest.raises(InputError, match="pixel size"):
        diameter_in_pixels(180.0, None, None)
    with pytest.raises(InputError, match="no particle diameter"):
        diameter_in_pixels(None, None, 2.0)


def _film_edge_scene(seed=0):
    """A 1024² micrograph of 48-px particles (dark Gaussian blobs) on noise, its left quarter darker (a carbon
    film's side) and a gentle ramp across the rest (an ice gradient)."""
    rng = np.random.default_rng(seed)
    ny = nx = 1024
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    img = rng.normal(0.0, 1.0, (ny, nx)).astype(np.float32)
    img += np.where(xx < 256, -3.0, 0.0).astype(np.float32) + (xx / nx * 2.0).astype(np.float32)
    centres = [(x, y) for x in (96, 160, 600, 800) for y in (200, 500, 800)]
    for x, y in centres:
        img -= 4.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 12.0 ** 2))
    return img, centres


def test_flatten_evens_out_film_edges_and_gradients_and_keeps_the_particles():
    img, centres = _film_edge_scene()
    plain = to_working(img, 48.0, PreprocessConfig())
    flat = to_working(img, 48.0, PreprocessConfig(flatten=4.0))
    assert flat.scale == plain.scale and flat.image.dtype == np.float32
    d = plain.scale.length_to_working(48.0)

    def background(w, x0, x1):  # away from the particles and the edge
        x0, x1 = (int(plain.scale.to_working([[x, 0]])[0, 0]) for x in (x0, x1))
        return float(np.median(w.image[:, x0:x1]))

    def contrast(w, x, y):  # the particle's depth below the ring around it
        cx, cy = plain.scale.to_working([[x, y]])[0]
        yy, xx = np.mgrid[: w.image.shape[0], : w.image.shape[1]]
        r = np.hypot(xx - cx, yy - cy)
        return float(np.median(w.image[(r > d) & (r < 1.5 * d)]) - w.image[r < d / 4].mean())

    # carbon side (x < 256, particles at 96 and 160 left out) against the ice far from it, before and after
    step_plain = background(plain, 400, 520) - background(plain, 20, 60)
    step_flat = background(flat, 400, 520) - background(flat, 20, 60)
    assert step_plain > 1.0 and abs(step_flat) < 0.25 * step_plain
    ramp_plain = background(plain, 900, 1000) - background(plain, 400, 520)
    ramp_flat = background(flat, 900, 1000) - background(flat, 400, 520)
    assert abs(ramp_flat) < 0.25 * abs(ramp_plain)
    # each particle keeps its contrast against its surroundings (relative to the noise of an empty patch of ice)
    def noise(w):
        x0, x1 = (int(plain.scale.to_working([[x, 0]])[0, 0]) for x in (400, 520))
        return float(w.image[:, x0:x1].std())

    for x, y in centres:
        before = contrast(plain, x, y) / noise(plain)
        after = contrast(flat, x, y) / noise(flat)
        assert after == pytest.approx(before, rel=0.1), (x, y)


def test_highpass_does_not_wrap_one_border_onto_the_other():
    from crisp_ext.preprocess import highpass

    img = np.zeros((256, 256), np.float32)
    img[:, 192:] = 10.0  # bright on the right only
    out = highpass(img, 32.0)
    # the left border is far (> 5 cutoffs) from the step: flat after the filter, as a mirrored image sees it
    assert np.abs(out[:, :16] - out[:, :16].mean()).max() < 1e-3
    assert np.abs(out[:, :16]).max() < 0.05
