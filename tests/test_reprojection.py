"""The mask projector against RELION's own relion_project, the pose conventions, and footprint placement."""

import shutil
import subprocess

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryosparc_job.poses import cryosparc_pose_to_euler, cryosparc_pose_to_matrix, cryosparc_shift_to_origin_A
from crisp_ext.reprojection import (
    THRESHOLD_METHODS,
    angles_to_matrices,
    clean_footprint,
    euler_to_matrix,
    mask_from_map,
    matrix_to_euler,
    paste_footprints,
    project,
    subpixel_shifts,
    threshold,
)

D = 48
ANGPIX = 2.0
# (rot, tilt, psi) with tilt 0, near and at 90 and near 180, and RELION origin offsets in Å
ANGLES = np.array([[0, 0, 0], [90, 0, 0], [0, 90, 0], [30, 89.5, -40], [123, 90, 17], [77, 91, 200],
                   [200, 45, 300], [-60, 120, 33], [10, 179, 5], [315, 60, 95]], dtype=float)
ORIGINS_A = np.array([[0, 0], [6, -4], [0, 0], [5, 5], [0, 0], [0, -10], [-2.4, 6.6], [10, 0], [0, 0], [-7, 3]],
                     dtype=float)


def _blobs(size=D):
    """A non-symmetric volume: four Gaussian blobs of different widths and weights inside the inscribed sphere."""
    z, y, x = (np.mgrid[:size, :size, :size] - size // 2).astype(np.float64)
    vol = np.zeros((size,) * 3)
    for cx, cy, cz, s, a in [(8, 0, 0, 2.5, 1.0), (0, 12, 0, 2.0, 0.7), (0, 0, -6, 3.0, 0.5), (-5, -5, 5, 1.5, 1.5)]:
        vol += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def _ncc(a, b):
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _iou(a, b):
    return float((a & b).sum() / (a | b).sum())


def _write_angles_star(path, angles, origins_A):
    head = ["", "# version 30001", "", "data_optics", "", "loop_", "_rlnOpticsGroupName #1", "_rlnOpticsGroup #2",
            "_rlnImagePixelSize #3", "_rlnImageSize #4", "_rlnImageDimensionality #5", "_rlnVoltage #6",
            "_rlnSphericalAberration #7", "_rlnAmplitudeContrast #8", f"opticsGroup1 1 {ANGPIX} {D} 2 300 2.7 0.1",
            "", "# version 30001", "", "data_particles", "", "loop_", "_rlnAngleRot #1", "_rlnAngleTilt #2",
            "_rlnAnglePsi #3", "_rlnOriginXAngst #4", "_rlnOriginYAngst #5", "_rlnOpticsGroup #6"]
    rows = [f"{a[0]:.4f} {a[1]:.4f} {a[2]:.4f} {o[0]:.4f} {o[1]:.4f} 1" for a, o in zip(angles, origins_A)]
    path.write_text("\n".join(head + rows) + "\n")


@pytest.fixture(scope="module")
def relion_projections(tmp_path_factory):
    """relion_project's projections of the test volume at ANGLES / ORIGINS_A, at 2 Å/px and rescaled to 4 Å/px."""
    if shutil.which("relion_project") is None or shutil.which("relion_image_handler") is None:
        pytest.skip("RELION (relion_project, relion_image_handler) not on PATH")
    import mrcfile

    tmp = tmp_path_factory.mktemp("relion_project")
    with mrcfile.new(tmp / "vol.mrc") as m:
        m.set_data(_blobs())
        m.voxel_size = ANGPIX
    _write_angles_star(tmp / "angles.star", ANGLES, ORIGINS_A)
    for cmd in (["relion_project", "--i", "vol.mrc", "--o", "proj", "--ang", "angles.star", "--angpix", str(ANGPIX)],
                ["relion_image_handler", "--i", "proj.mrcs", "--o", "proj4.mrcs", "--angpix", str(ANGPIX),
                 "--rescale_angpix", str(2 * ANGPIX)]):
        run = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    with mrcfile.open(tmp / "proj.mrcs") as m:
        full = m.data.astype(np.float64)
    with mrcfile.open(tmp / "proj4.mrcs") as m:
        coarse = m.data.astype(np.float64)
    return full, coarse


@pytest.mark.relion
def test_projection_matches_relion_project(relion_projections):
    ref, _ = relion_projections
    assert ref.shape == (len(ANGLES), D, D)
    mine = project(_blobs(), ANGLES, ORIGINS_A / ANGPIX, out_size=D).numpy()
    scores = [_ncc(r, m) for r, m in zip(ref, mine)]
    assert min(scores) >= 0.99, dict(zip(map(tuple, ANGLES), np.round(scores, 4)))
    # the comparison can tell the conventions apart: flipped origins or the transposed matrix do not match
    shifted = np.abs(ORIGINS_A).sum(1) > 0
    flipped = project(_blobs(), ANGLES, -ORIGINS_A / ANGPIX, out_size=D).numpy()
    assert max(_ncc(r, m) for r, m, s in zip(ref, flipped, shifted) if s) < 0.9
    transposed = project(_blobs(), None, ORIGINS_A / ANGPIX, out_size=D,
                         matrices=np.swapaxes(angles_to_matrices(ANGLES), 1, 2)).numpy()
    assert min(_ncc(r, m) for r, m in zip(ref, transposed)) < 0.9


@pytest.mark.relion
def test_rescaled_projection_matches_relion(relion_projections):
    _, ref = relion_projections
    n = ref.shape[-1]
    mine = project(_blobs(), ANGLES, ORIGINS_A / (2 * ANGPIX), out_size=n, map_pixel_size=ANGPIX,
                   out_pixel_size=2 * ANGPIX).numpy()
    scores = [_ncc(r, m) for r, m in zip(ref, mine)]
    assert min(scores) >= 0.99, np.round(scores, 4)


def test_projection_geometry_without_relion():
    """A point-like blob at volume (x, y, z) = (8, 0, 0) lands at A @ r, shifted by minus the origin."""
    z, y, x = (np.mgrid[:32, :32, :32] - 16).astype(float)
    vol = np.exp(-((x - 8) ** 2 + y ** 2 + z ** 2) / 2.0).astype(np.float32)
    angles = np.array([[0, 0, 0], [90, 0, 0], [0, 90, 0], [0, 0, 0]])
    shifts = np.array([[0, 0], [0, 0], [0, 0], [3, -2]])
    proj = project(vol, angles, shifts).numpy()
    for img, a, s in zip(proj, angles, shifts):
        expected = euler_to_matrix(*a) @ np.array([8.0, 0, 0])
        row, col = np.unravel_index(np.argmax(img), img.shape)
        assert (col - 16, row - 16) == (round(expected[0] - s[0]), round(expected[1] - s[1]))
    # values are line integrals in map voxels whatever the output pixel size
    coarse = project(vol, angles[:1], out_pixel_size=2.0, out_size=16).numpy()
    assert coarse.sum() * 4 == pytest.approx(proj[0].sum(), rel=0.02)
    assert proj[0].sum() == pytest.approx(vol.sum(), rel=0.01)


def test_chunking_and_torch_inputs_agree():
    vol = _blobs(24)
    angles = np.random.default_rng(0).uniform(0, 180, (7, 3))
    shifts = np.random.default_rng(1).normal(0, 2, (7, 2))
    whole = project(vol, angles, shifts, out_size=24)
    chunked = project(torch.from_numpy(vol), torch.from_numpy(angles), torch.from_numpy(shifts), out_size=24,
                      max_points=1)
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert project(vol, np.zeros((0, 3)), out_size=8).shape == (0, 8, 8)


def test_window_around_a_compact_support_loses_nothing():
    """Only the window that can hold signal is computed; by linearity, a far corner voxel that forces the full
    window must add exactly its own projection."""
    z, y, x = (np.mgrid[:40, :40, :40] - 20).astype(float)
    compact = (((x - 4) ** 2 + y ** 2 + (z + 3) ** 2) <= 16).astype(np.float32)
    corner = np.zeros_like(compact)
    corner[1, 1, 1] = 1.0
    angles = np.random.default_rng(2).uniform(0, 180, (6, 3))
    shifts = np.array([[0, 0], [9, -7], [-12, 3], [4.5, 11], [0, -13], [13, 13]])
    for kw in ({}, dict(out_pixel_size=2.0, out_size=24)):
        s = 2.0 if kw else 1.0
        alone = project(compact, angles, shifts / s, **kw)
        joint = project(compact + corner, angles, shifts / s, **kw) - project(corner, angles, shifts / s, **kw)
        assert alone.abs().sum() > 0
        assert torch.allclose(alone, joint, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_projection_on_cuda_matches_cpu():
    vol = _blobs(32)
    angles = np.random.default_rng(0).uniform(0, 180, (5, 3))
    cpu = project(vol, angles, out_size=32)
    gpu = project(vol, angles, out_size=32, device="cuda")
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-3)


def test_project_rejects_bad_input():
    with pytest.raises(ValueError, match="3D"):
        project(np.zeros((8, 8)), [[0, 0, 0]])
    with pytest.raises(ValueError, match="shape"):
        project(np.zeros((8, 8, 8)), [[0, 0, 0]], shifts_px=[[0, 0], [1, 1]])
    with pytest.raises(ValueError, match="pixel sizes"):
        project(np.zeros((8, 8, 8)), [[0, 0, 0]], out_pixel_size=-1.0)


def test_euler_matrix_is_relion_convention():
    rng = np.random.default_rng(3)
    angles = np.concatenate([rng.uniform(-180, 360, (50, 3)), [[10, 0, 20], [10, 180, 20], [0, 90, 0]]])
    mats = angles_to_matrices(angles)
    # RELION's A is the transpose of the active intrinsic ZYZ rotation Rz(rot) Ry(tilt) Rz(psi)
    expected = np.swapaxes(Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix(), 1, 2)
    np.testing.assert_allclose(mats, expected, atol=1e-12)
    back = matrix_to_euler(mats)
    assert ((back[:, 1] >= 0) & (back[:, 1] <= 180)).all()
    np.testing.assert_allclose(angles_to_matrices(back), mats, atol=1e-9)
    as_torch = euler_to_matrix(*torch.from_numpy(angles).T)
    np.testing.assert_allclose(as_torch.numpy(), mats, atol=1e-12)


def test_cryosparc_pose_matches_euler_path():
    rng = np.random.default_rng(4)
    angles = np.concatenate([rng.uniform(0, 360, (20, 3)), [[30, 90, 60], [0, 0, 45]]])
    relion = angles_to_matrices(angles)
    # a cryoSPARC pose is the rotation vector whose (active, Rodrigues) matrix is RELION's A transposed
    pose = Rotation.from_matrix(np.swapaxes(relion, 1, 2)).as_rotvec()
    np.testing.assert_allclose(cryosparc_pose_to_matrix(pose), relion, atol=1e-9)
    np.testing.assert_allclose(angles_to_matrices(cryosparc_pose_to_euler(pose)), relion, atol=1e-9)
    np.testing.assert_allclose(cryosparc_pose_to_matrix(np.zeros((1, 3))), np.eye(3)[None], atol=0)
    vol = _blobs(32)
    via_euler = project(vol, angles[:4], out_size=32)
    via_pose = project(vol, cryosparc_pose_to_euler(pose[:4]), out_size=32)
    via_matrix = project(vol, None, out_size=32, matrices=cryosparc_pose_to_matrix(pose[:4]))
    assert torch.allclose(via_euler, via_pose, atol=1e-4) and torch.allclose(via_euler, via_matrix, atol=1e-4)
    np.testing.assert_allclose(cryosparc_shift_to_origin_A([[2.0, -1.5]], [1.3]), [[2.6, -1.95]])


def _ellipsoid(size=48, axes=(14, 6, 5)):
    z, y, x = (np.mgrid[:size, :size, :size] - size // 2).astype(float)
    return (((x / axes[0]) ** 2 + (y / axes[1]) ** 2 + (z / axes[2]) ** 2) <= 1).astype(np.float32)


def _ellipse(size, a, b, rot_deg=0.0, pixel=1.0):
    y, x = (np.mgrid[:size, :size] - size // 2).astype(float) * pixel
    c, s = np.cos(np.deg2rad(rot_deg)), np.sin(np.deg2rad(rot_deg))
    u, v = c * x + s * y, -s * x + c * y
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def test_thresholds_give_the_projected_outline():
    mask = _ellipsoid()
    # psi = 30: the long axis of the elongated particle turns to -30° in the image (A maps x to (cos, -sin))
    proj = project(mask, [[0, 0, 30]], out_size=48)
    truth = _ellipse(48, 14, 6, rot_deg=-30)
    # Li (the default), mean and a 10 % fraction follow the outline; Otsu cuts the thin rim, Yen and triangle
    # take a little more of the interpolation skirt
    floors = {"li": 0.95, "mean": 0.95, "fraction": 0.95, "otsu": 0.8, "yen": 0.8, "triangle": 0.8}
    assert set(floors) == set(THRESHOLD_METHODS)
    for method in THRESHOLD_METHODS:
        fp = threshold(proj, method)[0]
        assert _iou(fp, truth) >= floors[method], method
        assert _iou(fp, _ellipse(48, 14, 6, rot_deg=30)) < 0.5  # the orientation is right
    coarse = project(mask, [[0, 0, 30]], out_size=24, map_pixel_size=1.0, out_pixel_size=2.0)
    assert _iou(threshold(coarse)[0], _ellipse(24, 14, 6, rot_deg=-30, pixel=2.0)) >= 0.85
    # a higher fraction gives a smaller footprint; a flat projection gives none
    areas = [threshold(proj, "fraction", f).sum() for f in (0.05, 0.3, 0.6)]
    assert areas[0] > areas[1] > areas[2] > 0
    assert not threshold(np.zeros((1, 16, 16))).any()
    with pytest.raises(ValueError, match="unknown threshold"):
        threshold(proj, "median")


def test_clean_keeps_the_central_component():
    m = np.zeros((21, 21), dtype=bool)
    m[8:13, 8:13] = True  # centre
    m[0:4, 0:4] = True  # another particle's tail
    m[20, 20] = True  # a speck
    assert clean_footprint(m).sum() == 25
    assert clean_footprint(m, keep_centre=False, min_size=2).sum() == 25 + 16
    ring = np.zeros((21, 21), dtype=bool)
    ring[5:16, 5:16] = True
    ring[8:13, 8:13] = False  # centre in a hole: keep the nearest component
    ring[0, 0] = ring[0, 1] = True
    assert clean_footprint(ring, min_size=1).sum() == 121 - 25


@pytest.mark.parametrize("size", [15, 16])
def test_paste_centres_the_footprint(size):
    z, y, x = (np.mgrid[:32, :32, :32] - 16).astype(float)
    blob = (x ** 2 + y ** 2 + z ** 2 <= 36).astype(np.float32)  # a symmetric particle
    fp = threshold(project(blob, [[0, 0, 0]], out_size=size))[0]
    for cx, cy in [(40.0, 30.0), (40.4, 30.6), (40.5, 29.5), (12.49, 50.51)]:
        label = paste_footprints((64, 80), [(cx, cy)], fp[None])
        rows, cols = np.nonzero(label)
        assert label.sum() == fp.sum()
        assert abs(cols.mean() - cx) <= 0.5 and abs(rows.mean() - cy) <= 0.5, (cx, cy, cols.mean(), rows.mean())


def test_subpixel_shifts_put_the_projection_on_the_exact_centre():
    z, y, x = (np.mgrid[:32, :32, :32] - 16).astype(float)
    blob = np.exp(-(x ** 2 + y ** 2 + z ** 2) / 8.0).astype(np.float32)
    centres = np.array([[40.3, 30.8], [12.5, 7.49], [3.0, 3.0]])
    shifts = subpixel_shifts(centres)
    np.testing.assert_allclose(shifts, [[-0.3, 0.2], [0.5, -0.49], [0, 0]], atol=1e-12)
    proj = project(blob, np.zeros((3, 3)), shifts, out_size=24).numpy()
    rows, cols = np.mgrid[:24, :24]
    for img, (cx, cy) in zip(proj, centres):
        # pasted at round(centre) with its centre pixel 12, the grey centroid lands on the exact centre
        gx = (cols * img).sum() / img.sum() - 12 + np.floor(cx + 0.5)
        gy = (rows * img).sum() / img.sum() - 12 + np.floor(cy + 0.5)
        assert abs(gx - cx) < 0.02 and abs(gy - cy) < 0.02


def test_paste_union_and_borders():
    a = np.zeros((9, 9), dtype=bool)
    a[2:7, 1:8] = True
    b = np.ones((5, 5), dtype=bool)
    one = paste_footprints((40, 50), [(20, 20)], [a])
    two = paste_footprints((40, 50), [(23, 21)], [b])
    both = paste_footprints((40, 50), [(20, 20), (23, 21)], [a, b])
    np.testing.assert_array_equal(both, one | two)
    assert both.sum() == a.sum() + b.sum() - (one & two).sum() and (one & two).any()
    edge = paste_footprints((40, 50), [(0, 39), (49.4, 0), (-100, -100)], b)  # one 2D footprint for all
    assert edge.sum() == 9 + 9
    assert edge[39, 0] and edge[0, 49]
    into = np.zeros((40, 50), dtype=bool)
    assert paste_footprints((40, 50), [(20, 20)], [a], out=into) is into and into.sum() == a.sum()
    with pytest.raises(ValueError, match="footprints for"):
        paste_footprints((40, 50), [(1, 1), (2, 2)], [a])


def test_mask_from_map():
    rng = np.random.default_rng(5)
    vol = _blobs(32) + rng.normal(0, 0.02, (32, 32, 32)).astype(np.float32)
    mask = mask_from_map(vol, dilate_px=0)
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    assert mask[16, 16, 16 + 8] == 1 and mask[16, 16 + 12, 16] == 1  # blob cores
    assert mask[0, 0, 0] == 0 and mask[16, 16, 16 - 14] == 0
    dilated = mask_from_map(vol, dilate_px=2)
    assert dilated.sum() > mask.sum() and (dilated >= mask).all()
    assert mask_from_map(vol, level=0.5, dilate_px=0).sum() < mask.sum()
    only_largest = mask_from_map(vol, dilate_px=0, min_component_fraction=1.0)
    assert only_largest[16, 16, 16 + 8] == 1 and only_largest[16, 16 + 12, 16] == 0
    with pytest.raises(ValueError, match="above the map"):
        mask_from_map(vol, level=100.0)
