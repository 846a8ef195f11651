"""crisp_ext.footprints: choosing the labels, reading the 3D reference, footprints at any working scale, and the
standalone command's --mask/--map wiring (train on a particles STAR with angles, model directory records it)."""

import json
from argparse import Namespace

import numpy as np
import pytest

from crisp_ext.config import LabelConfig
from crisp_ext.errors import InputError
from crisp_ext.footprints import (
    FootprintMaker,
    ReferenceMask,
    _coarsen,
    looks_like_mask,
    read_reference,
    resolve_label_kind,
)
from crisp_ext.io.mrc import write_mrc
from crisp_ext.reprojection import Projector, threshold

import reprojection_scene as rs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference():
    return ReferenceMask(rs.mask_volume(), rs.MAP_PIXEL_SIZE, source="phantom.mrc")


def test_label_kind_auto_uses_reprojection_only_with_a_reference_and_poses():
    ref = _reference()
    assert resolve_label_kind("auto", ref, True)[0] == "reprojection"
    kind, why = resolve_label_kind("auto", None, True)
    assert kind == "disk" and "no 3D mask or map" in why
    kind, why = resolve_label_kind("auto", ref, False)
    assert kind == "disk" and "no angles" in why
    kind, why = resolve_label_kind("disk", ref, True)
    assert kind == "disk" and "not used" in why
    with pytest.raises(InputError, match="no angles"):
        resolve_label_kind("reprojection", ref, False)
    with pytest.raises(InputError, match="unknown"):
        resolve_label_kind("disks", ref, True)
    assert LabelConfig().kind == "auto"


def test_read_reference_takes_the_header_pixel_size_unless_given(tmp_path):
    vol = rs.mask_volume()
    path = write_mrc(tmp_path / "mask.mrc", vol, pixel_size=rs.MAP_PIXEL_SIZE)
    ref = read_reference(path)
    assert ref.volume.shape == vol.shape and ref.pixel_size == pytest.approx(rs.MAP_PIXEL_SIZE)
    assert ref.is_mask and ref.source == str(path) and "3D mask" in ref.describe()
    np.testing.assert_array_equal(ref.volume, vol)
    assert read_reference(path, pixel_size=2.5, is_mask=False).pixel_size == 2.5
    write_mrc(tmp_path / "nops.mrc", vol)
    with pytest.raises(InputError, match="no pixel size"):
        read_reference(tmp_path / "nops.mrc")
    write_mrc(tmp_path / "flat.mrc", vol[0], pixel_size=3.0)
    with pytest.raises(InputError, match="3D volume"):
        read_reference(tmp_path / "flat.mrc")
    with pytest.raises(InputError, match="not found"):
        read_reference(tmp_path / "missing.mrc")


def test_a_map_given_as_a_mask_is_thresholded_first():
    density = rs.map_volume() * 7.0 - 0.5  # not within [0, 1]
    assert looks_like_mask(rs.mask_volume()) and not looks_like_mask(density)
    maker = FootprintMaker(ReferenceMask(density, rs.MAP_PIXEL_SIZE, is_mask=True), LabelConfig())
    assert maker.converted and set(np.unique(maker.mask)) == {0.0, 1.0}
    assert maker.summary()["mask_from_map"] is True
    with pytest.raises(InputError, match="empty"):
        FootprintMaker(ReferenceMask(np.zeros((8, 8, 8), np.float32), 1.0), LabelConfig())
    with pytest.raises(InputError, match="constant"):
        FootprintMaker(ReferenceMask(np.ones((8, 8, 8), np.float32) * 3, 1.0, is_mask=False), LabelConfig())
    with pytest.raises(InputError, match="threshold"):
        FootprintMaker(_reference(), LabelConfig(threshold="median"))


@pytest.mark.parametrize("size", [30, 31, 32, 33])
@pytest.mark.parametrize("factor", [3, 5])
def test_coarsening_keeps_the_centre_voxel_the_centre(size, factor):
    vol = np.zeros((size, size + 1, size + 2), np.float32)
    vol[size // 2, (size + 1) // 2, (size + 2) // 2] = 1.0
    out = _coarsen(vol, factor)
    assert np.unravel_index(np.argmax(out), out.shape) == tuple(n // 2 for n in out.shape)
    assert out.sum() * factor ** 3 == pytest.approx(1.0)


def test_a_fine_mask_is_coarsened_without_moving_or_changing_the_footprints():
    """A 1 Å/px mask projected to 8 Å/px (coarsened 3x first) against the same projection without coarsening."""
    fine = rs.mask_volume(1.0, box=None)
    rng = np.random.default_rng(3)
    angles = np.stack([rng.uniform(-180, 180, 12), np.degrees(np.arccos(rng.uniform(-1, 1, 12))),
                       rng.uniform(-180, 180, 12)], 1)
    maker = FootprintMaker(ReferenceMask(fine, 1.0), LabelConfig())
    coarse = maker(angles, np.zeros((12, 2)), 8.0)
    assert maker.projector(8.0).map_pixel_size == 3.0  # block-averaged by 3
    size = coarse.shape[-1]
    plain = Projector(fine, 1.0, 8.0)(angles, None, size).numpy()
    coarse_proj = maker.projector(8.0)(angles, None, size).numpy()
    direct = threshold(plain)
    ious = []
    for a, b, pa, pb in zip(coarse, direct, coarse_proj, plain):
        assert np.corrcoef(pa.ravel(), pb.ravel())[0, 1] > 0.995
        ious.append(rs.iou(a, b))  # footprints of 8 px: a pixel more or less on the edge costs ~0.05
        grid = np.indices(pa.shape)
        ya, xa = (grid * pa).sum((1, 2)) / pa.sum()
        yb, xb = (grid * pb).sum((1, 2)) / pb.sum()
        assert abs(ya - yb) < 0.1 and abs(xa - xb) < 0.1  # the centre has not moved
    assert np.mean(ious) > 0.9 and min(ious) > 0.75


def test_footprints_reject_bad_poses_and_pixel_sizes():
    maker = FootprintMaker(_reference(), LabelConfig())
    with pytest.raises(InputError, match="non-finite angle"):
        maker([[0, np.nan, 0]], [[10, 10]], 4.0)
    with pytest.raises(InputError, match="pixel size"):
        maker([[0, 0, 0]], [[10, 10]], None)
    out = maker(np.zeros((0, 3)), np.zeros((0, 2)), 4.0)
    assert out.shape[0] == 0 and out.shape[1] % 2 == 1


# -- the standalone command ------------------------------------------------------------------------------------------

def _project(tmp_path):
    sims = rs.simulate(2, seed=21)
    mic_dir = tmp_path / "mics"
    mics, _ = rs.write_micrographs(mic_dir, sims)
    star = rs.write_particles_star(tmp_path / "run_data.star", sims, [f"mics/{m.path.name}" for m in mics],
                                   origin_px=3.0)
    mask = write_mrc(tmp_path / "mask.mrc", rs.mask_volume(), pixel_size=rs.MAP_PIXEL_SIZE)
    return sims, mic_dir, star, mask


def _sets():
    out = []
    for k, v in rs.TINY.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def test_cli_train_with_a_mask_and_refined_particles_records_reprojection_labels(tmp_path, capsys):
    from crisp_ext.cli import main

    _, mic_dir, star, mask = _project(tmp_path)
    out = tmp_path / "out"
    rc = main(["train", "--mics", str(mic_dir), "--picks", str(star), "--mask", str(mask), "--diameter",
               f"{rs.DIAMETER_A}A", "--out", str(out), "--quiet", *_sets()])
    assert rc == 0
    text = capsys.readouterr().out
    assert "labels: reprojection of the 3D mask" in text and "labels: reprojection" in text.splitlines()[-2]
    info = json.loads((out / "model" / "model.json").read_text())
    assert info["labels"] == info["label_kind"] == "reprojection"
    detail = info["labels_detail"]
    assert detail["reference"] == str(mask) and detail["reference_pixel_size"] == pytest.approx(rs.MAP_PIXEL_SIZE)
    assert detail["threshold"] == "li" and not detail["mask_from_map"]
    png = out / "plots" / "label_footprints.png"
    assert png.is_file() and png.read_bytes().startswith(b"\x89PNG") and detail["plot"] == str(png)
    assert 'kind = "reprojection"' in (out / "model" / "config.toml").read_text()


def test_cli_reference_is_used_only_with_angles(tmp_path, capsys):
    from crisp_ext.cli import build_parser
    from crisp_ext.commands.common import reference as _reference
    from crisp_ext.io.inputs import find_micrographs, read_picks

    sims, mic_dir, star, mask = _project(tmp_path)
    mics = find_micrographs(mic_dir)
    picks = read_picks(star, mics, micrograph_pixel_size=rs.PIXEL_SIZE)
    assert picks.has_poses
    # centres = coordinate - origin: the true centres come back
    np.testing.assert_allclose(picks.for_micrograph("m0").xy, sims[0].centres, atol=1e-3)
    args = build_parser().parse_args(["train", "--mics", str(mic_dir), "--picks", str(star), "--out", "o",
                                      "--map", str(mask), "--map-pixel-size", "2.5"])
    ref = _reference(args, picks)
    assert not ref.is_mask and ref.pixel_size == 2.5
    assert _reference(args, picks.with_(angles=None)) is None
    assert "--map" in capsys.readouterr().out
    with pytest.raises(InputError, match="flip-y"):
        _reference(Namespace(**{**vars(args), "flip_y": True}), picks)
    with pytest.raises(SystemExit):  # one of --mask / --map
        build_parser().parse_args(["train", "--mics", "m", "--picks", "p", "--out", "o", "--mask", "a.mrc",
                                   "--map", "b.mrc"])
