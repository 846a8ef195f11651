"""The study of issue 9: on simulated micrographs of an elongated, asymmetric particle with known poses, labels by
reprojecting a 3D mask of the same phantom match the true projection footprints (IoU >= 0.9); disks do not."""

import numpy as np
import pytest

from crisp_ext.config import PickerConfig
from crisp_ext.footprints import FootprintMaker, ReferenceMask
from crisp_ext.pipeline import MicrographLoader, _prepare
from crisp_ext.reprojection import paste_footprints

import reprojection_scene as rs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Two 256² micrographs, diameter 24 px = the working diameter (labels and truth on the same grid)."""
    root = tmp_path_factory.mktemp("rep_labels")
    sims = rs.simulate(2, diameter_px=24.0, seed=5)
    mics, parts = rs.write_micrographs(root, sims)
    return sims, mics, parts


def _labels(scene, kind, reference=None, **overrides):
    sims, mics, parts = scene
    cfg = PickerConfig().updated({"particle.diameter_px": 24.0, "preprocess.target_diameter_px": 24.0,
                                  "labels.kind": kind, **overrides})
    maker = FootprintMaker(reference, cfg.labels) if reference is not None else None
    loader = MicrographLoader(cfg)
    out = []
    for sim, mic in zip(sims, mics):
        item, wi = _prepare(mic, parts.for_micrograph(mic.id), cfg, loader, maker)
        assert wi.image.shape == sim.mask.shape  # working scale = original: the truth applies as it is
        out.append(item.labels.target > 0.5)
    return out


@pytest.mark.parametrize("map_pixel_size", [1.5, 3.0])
def test_reprojected_labels_match_the_true_footprints_and_disks_do_not(scene, map_pixel_size):
    sims = scene[0]
    truth = np.concatenate([s.mask for s in sims])
    mask = rs.mask_volume(map_pixel_size, box=None, diameter_A=24.0 * rs.PIXEL_SIZE)
    rep = np.concatenate(_labels(scene, "reprojection", ReferenceMask(mask, map_pixel_size)))
    disk = np.concatenate(_labels(scene, "disk"))
    best_disk = max(rs.iou(np.concatenate(_labels(scene, "disk", **{"labels.disk_fraction": f})), truth)
                    for f in (0.5, 0.7))
    assert rs.iou(rep, truth) >= 0.9
    assert rs.iou(disk, truth) < 0.6 and best_disk < 0.7


def test_a_map_thresholded_into_a_mask_also_gives_the_footprints(scene):
    sims = scene[0]
    truth = np.concatenate([s.mask for s in sims])
    density = rs.map_volume(2.0, box=None, diameter_A=24.0 * rs.PIXEL_SIZE)
    rep = np.concatenate(_labels(scene, "reprojection", ReferenceMask(density, 2.0, is_mask=False)))
    assert rs.iou(rep, truth) >= 0.85


def test_footprints_land_on_each_particle_at_a_coarser_working_scale():
    """Binned 2x (mean binning): each particle's footprint centroid is where its true footprint's is."""
    sims = rs.simulate(1, diameter_px=24.0, seed=9)
    sim = sims[0]
    from crisp_ext.config import PreprocessConfig
    from crisp_ext.preprocess import make_scale

    scale = make_scale(sim.image.shape, 24.0, PreprocessConfig(target_diameter_px=12.0, binning="mean"))
    centres = scale.to_working(sim.centres)
    maker = FootprintMaker(ReferenceMask(rs.mask_volume(2.0, box=None, diameter_A=96.0), 2.0),
                           PickerConfig().labels)
    footprints = maker(sim.angles, centres, rs.PIXEL_SIZE / scale.factor)
    errors = []
    for i, fp in enumerate(footprints):
        one = paste_footprints(scale.working_shape, centres[i:i + 1], fp)
        rows, cols = np.nonzero(sim.instances == i + 1)
        if not one.any() or len(rows) < 20 or one[0].any() or one[:, 0].any() or one[-1].any() or one[:, -1].any():
            continue  # clipped at the border
        true_centroid = scale.to_working(np.array([[cols.mean(), rows.mean()]]))[0]
        r, c = np.nonzero(one)
        errors.append(np.hypot(c.mean() - true_centroid[0], r.mean() - true_centroid[1]))
    assert len(errors) >= 10
    assert np.mean(errors) < 0.35 and np.max(errors) < 1.0
