import numpy as np
import pytest

from crisp_ext.config import LabelConfig, PreprocessConfig
from crisp_ext.errors import InputError
from crisp_ext.labels import disk_mask, make_labels
from crisp_ext.preprocess import make_scale, resample


def _blob_centroids(target: np.ndarray, centres: np.ndarray, radius: float) -> np.ndarray:
    rows, cols = np.indices(target.shape)
    out = []
    for x, y in centres:
        near = (rows - y) ** 2 + (cols - x) ** 2 <= (radius + 1.5) ** 2
        m = target * near
        out.append([(m * cols).sum() / m.sum(), (m * rows).sum() / m.sum()])
    return np.array(out)


def test_disk_pixels_are_those_within_the_radius_of_the_subpixel_centre():
    centre = np.array([[10.3, 20.7]])
    target = make_labels((40, 30), centre, 7.0, LabelConfig()).target
    rows, cols = np.indices(target.shape)
    expected = (cols - 10.3) ** 2 + (rows - 20.7) ** 2 <= 3.5 ** 2
    assert target.dtype == np.float32
    np.testing.assert_array_equal(target > 0, expected)
    assert target[21, 10] == 1 and target[20, 14] == 0  # (14 - 10.3)² + 0.7² > 3.5²


def test_labels_sit_on_the_picks_and_keep_their_size():
    rng = np.random.default_rng(1)
    centres = np.stack([rng.uniform(20, 180, 12), rng.uniform(20, 100, 12)], 1)
    centres = centres[np.argsort(centres[:, 0])]
    keep = [0]
    for i in range(1, len(centres)):  # keep disks apart so each centroid is its own
        if np.min(np.hypot(*(centres[keep] - centres[i]).T)) > 24:
            keep.append(i)
    centres = centres[keep]
    labels = make_labels((120, 200), centres, 16.0, LabelConfig(disk_fraction=0.75))
    np.testing.assert_allclose(_blob_centroids(labels.target, centres, 6.0), centres, atol=0.2)
    area = labels.target.sum() / len(centres)
    assert abs(area - np.pi * 6.0 ** 2) < 0.1 * np.pi * 36
    assert np.all(labels.weight == 1)


def test_labels_convert_exactly_between_scales():
    """Disks drawn at the original scale and binned agree with disks drawn from the converted picks."""
    rng = np.random.default_rng(3)
    shape, diameter = (480, 640), 36.0
    centres = np.stack([rng.uniform(30, 610, 40), rng.uniform(30, 450, 40)], 1)
    for binning in ("mean", "fourier"):
        scale = make_scale(shape, diameter, PreprocessConfig(target_diameter_px=12.0, binning=binning))
        work_xy = scale.to_working(centres)
        np.testing.assert_allclose(scale.to_original(work_xy), centres, atol=1e-9)
        d_work = scale.length_to_working(diameter)
        assert d_work == pytest.approx(12.0, rel=1e-3)
        working = make_labels(scale.working_shape, work_xy, d_work, LabelConfig()).target > 0
        original = make_labels(shape, centres, diameter, LabelConfig()).target
        binned = resample(original, scale) > 0.5
        inter, union = np.count_nonzero(working & binned), np.count_nonzero(working | binned)
        assert inter / union > 0.9, binning


def test_ignore_band_and_background_weight():
    centres = np.array([[30.0, 30.0]])
    cfg = LabelConfig(ignore_band=0.25, background_weight=0.2, ignore_far=1.5)
    lab = make_labels((100, 100), centres, 20.0, cfg)
    rows, cols = np.indices((100, 100))
    d = np.hypot(cols - 30.0, rows - 30.0)
    assert np.all(lab.weight[d <= 10] == 1)  # the particle itself is always scored
    assert np.all(lab.weight[(d > 10.8) & (d < 14.5)] == 0)  # band of 0.25 * 20 = 5 px around the disk
    assert np.all(lab.weight[(d > 15.5) & (d < 29)] == 1)  # near the pick: plain background
    assert np.all(lab.weight[d > 31] == pytest.approx(0.2))  # farther than 1.5 diameters: down-weighted
    assert lab.ignore.sum() == np.count_nonzero(lab.weight == 0)


def test_background_weight_everywhere_when_no_far_distance():
    lab = make_labels((50, 50), [[25, 25]], 10.0, LabelConfig(background_weight=0.5))
    assert set(np.unique(lab.weight)) == {0.5, 1.0}
    assert np.all(lab.weight[lab.target > 0] == 1)


def test_reprojection_footprints_are_pasted_at_the_rounded_centre():
    fp = np.zeros((5, 5), dtype=bool)
    fp[2, 1:5] = True  # asymmetric: a bar to the right of the centre
    lab = make_labels((20, 20), [[6.4, 9.6]], 5.0, LabelConfig(kind="reprojection"), footprints=[fp])
    assert np.argwhere(lab.target > 0).tolist() == [[10, 5], [10, 6], [10, 7], [10, 8]]
    with pytest.raises(InputError, match="footprints"):
        make_labels((20, 20), [[6, 9]], 5.0, LabelConfig(kind="reprojection"))


def test_bad_label_settings_are_clear_errors():
    with pytest.raises(InputError, match="label kind"):
        make_labels((10, 10), [[5, 5]], 4.0, LabelConfig(kind="box"))
    with pytest.raises(InputError, match="diameter"):
        make_labels((10, 10), [[5, 5]], 0.0, LabelConfig())
    with pytest.raises(InputError, match="not finite"):
        disk_mask((10, 10), [[np.nan, 5]], 2.0)


def test_picks_outside_or_on_the_border_are_clipped():
    lab = make_labels((20, 20), [[-1.0, 10.0], [19.5, 19.5], [100.0, 100.0]], 6.0, LabelConfig())
    assert lab.target[10, 0] == 1 and lab.target[19, 19] == 1
    assert lab.target.sum() < 2 * np.pi * 9


def test_centre_target_peaks_on_each_pick_and_keeps_touching_particles_apart():
    from crisp_ext.labels import centre_map

    centres = np.array([[20.3, 30.6], [31.0, 30.0], [60.0, 12.4]])  # the first two touch (0.55 D apart at D = 20)
    labels = make_labels((48, 80), centres, 20.0, LabelConfig(centre_weight=1.0, centre_sigma=0.1))
    assert labels.centre is not None and labels.centre.dtype == np.float32
    assert len(labels.channels()) == 2
    c = labels.centre
    assert c.max() <= 1.0 and c.min() >= 0.0
    from scipy import ndimage

    peaks = np.argwhere((c == ndimage.maximum_filter(c, size=5)) & (c > 0.5))
    found = sorted((float(x), float(y)) for y, x in peaks)
    # one peak per particle, on the integer pixel nearest each sub-pixel centre
    assert found == sorted((float(np.floor(x + 0.5)), float(np.floor(y + 0.5))) for x, y in centres)
    # the maximum of Gaussians, not their sum: the saddle between touching particles stays well below the peaks
    assert c[30, 25] < 0.6
    sigma = 2.0
    np.testing.assert_allclose(c[31, 20], np.exp(-((20 - 20.3) ** 2 + (31 - 30.6) ** 2) / (2 * sigma ** 2)),
                               rtol=1e-5)
    np.testing.assert_array_equal(centre_map((10, 10), np.zeros((0, 2)), 2.0), 0)
    assert make_labels((48, 80), centres, 20.0, LabelConfig(centre_weight=0.0)).centre is None
    with pytest.raises(InputError, match="centre"):
        make_labels((48, 80), centres, 20.0, LabelConfig(centre_weight=-1.0))
