"""cryosparc_job.records / paths / lookup.Source / settings: conversions with the real cryosparc Dataset, no API."""

import os

import numpy as np
import pytest
from cryosparc.dataset import Dataset
from fakes.cryosparc_data import exposures_dataset, particles_dataset

from crisp_ext.errors import InputError
from cryosparc_job.poses import cryosparc_pose_to_euler
from crisp_ext.types import Particles
from cryosparc_job import records
from cryosparc_job.connect import CryoSPARCError, mismatch_message
from cryosparc_job.lookup import Source
from cryosparc_job.paths import PathMap, locate
from cryosparc_job.settings import make_config

SHAPES = [(256, 384), (300, 200)]  # (ny, nx), non-square both ways
PATHS = ["J1/motioncorrected/a_patch_aligned_doseweighted.mrc", "J1/motioncorrected/b_patch_aligned_doseweighted.mrc"]


def exposures(**kw):
    return exposures_dataset(PATHS, SHAPES, [1.5, 1.5], uids=[11, 22], exp_group_id=[3, 4],
                             ctf={"df1_A": [12000.0, 20000.0], "df2_A": [11000.0, 19000.0],
                                  "df_angle_rad": [np.pi / 2, 0.0]}, **kw)


def micrographs(dset=None):
    return records.micrographs_from_exposures(dset or exposures(), lambda p: f"/local/{p}")


def test_fractions_and_pixels_are_inverse_without_flip():
    shape = np.array([[256, 384], [300, 200]])
    xy = np.array([[383.2, 0.4], [10.0, 299.6]])  # near the far column of a wide, the far row of a tall one
    fx, fy = records.pixels_to_fractions(xy, shape)
    np.testing.assert_allclose(fx, [383.2 / 384, 10.0 / 200])
    np.testing.assert_allclose(fy, [0.4 / 256, 299.6 / 300])
    back = records.fractions_to_pixels(fx.astype(np.float32), fy.astype(np.float32), shape)
    np.testing.assert_allclose(back, xy, atol=1e-3)


def test_exposures_become_micrographs_with_the_fields_particles_need():
    mics = micrographs()
    assert [m.id for m in mics] == ["11", "22"]
    assert [str(m.path) for m in mics] == [f"/local/{p}" for p in PATHS]
    assert [m.shape for m in mics] == SHAPES and mics[0].pixel_size == pytest.approx(1.5)
    assert mics[1].meta == {"uid": 22, "micrograph_path": PATHS[1], "blob_shape": (300, 200), "exp_group_id": 4,
                            "psize_A": pytest.approx(1.5)}
    ctf = mics[0].ctf
    assert (ctf.defocus_u_A, ctf.defocus_v_A) == (12000.0, 11000.0)
    assert ctf.defocus_angle_deg == pytest.approx(90.0) and ctf.voltage_kV == pytest.approx(300.0)


def test_exposures_without_ctf_take_the_default_group_and_no_ctf():
    mics = micrographs(exposures(with_ctf=False))
    assert all(m.ctf is None and m.meta["exp_group_id"] == records.DEFAULT_EXP_GROUP for m in mics)


def test_exposures_without_micrograph_blob_are_refused():
    with pytest.raises(InputError, match="no micrograph_blob slot"):
        records.micrographs_from_exposures(Dataset.allocate(2, [("ctf/df1_A", "<f4")]), str, where="J5:x")


def test_particles_come_back_in_pixels_of_their_micrograph():
    coords = [np.array([[10.5, 20.25], [383.0, 255.0]]), np.array([[199.0, 1.0]])]
    parts, unmatched = records.particles_from_dataset(particles_dataset(exposures(), coords), micrographs())
    assert unmatched == 0 and list(parts.micrograph) == ["11", "11", "22"]
    np.testing.assert_allclose(parts.xy, np.concatenate(coords), atol=2e-3)
    assert parts.angles is None and parts.score is None


def test_particles_match_by_path_when_uids_differ_and_unknown_ones_are_counted():
    dset = particles_dataset(exposures(), [np.array([[5.0, 6.0]]), np.array([[7.0, 8.0]])])
    dset["location/micrograph_uid"] = [999, 998]  # another lineage: same files, other uids
    dset["location/micrograph_path"] = ["elsewhere/a_patch_aligned_doseweighted.mrc", "other.mrc"]
    parts, unmatched = records.particles_from_dataset(dset, micrographs())
    assert unmatched == 1 and list(parts.micrograph) == ["11"]
    np.testing.assert_allclose(parts.xy, [[5.0, 6.0]], atol=1e-3)


def test_poses_become_euler_angles_and_shifts_move_the_centre():
    pose = np.array([[0.1, -0.4, 0.9], [0.0, 0.0, 0.0]], dtype=np.float32)
    shift = np.array([[2.0, -1.0], [0.0, 0.0]], dtype=np.float32)  # pixels of alignments3D/psize_A = 3 Å
    dset = particles_dataset(exposures(), [np.array([[100.0, 50.0]]), np.array([[20.0, 30.0]])], poses=pose,
                             shifts=shift)
    dset["alignments3D/psize_A"] = 3.0
    parts, _ = records.particles_from_dataset(dset, micrographs())
    np.testing.assert_allclose(parts.angles, cryosparc_pose_to_euler(pose), atol=1e-4)
    np.testing.assert_allclose(parts.shifts, [[4.0, -2.0], [0.0, 0.0]], atol=1e-5)  # 3 Å / 1.5 Å per px
    np.testing.assert_allclose(parts.xy, [[96.0, 52.0], [20.0, 30.0]], atol=2e-3)


def test_particles_without_location_are_refused():
    with pytest.raises(InputError, match="location"):
        records.particles_from_dataset(exposures(), micrographs(), where="J1:exposures")


@pytest.mark.parametrize("server_fields", [False, True])
def test_picks_fill_every_location_and_pick_stats_field(server_fields):
    mics = micrographs()
    by_id = {m.id: m for m in mics}
    picks = Particles(["22", "11", "22"], [199.4, 0.0, 12.0], [299.5, 255.9, 7.0], score=[0.9, 0.25, 1.7])
    if server_fields:  # what alloc_output gives on a v4-minimum server: no micrograph_psize_A / min_dist_A
        dset = Dataset.allocate(3, [(n, *rest) for n, *rest in records.PARTICLE_FIELDS
                                    if n not in ("location/micrograph_psize_A", "location/min_dist_A")])
    else:
        dset = records.allocate_particles(3)
    records.fill_particles(dset, picks, by_id, {"11": 24.0, "22": 30.0})
    assert sorted(dset.fields()) == sorted(["uid"] + [f[0] for f in records.PARTICLE_FIELDS])
    assert list(dset["location/micrograph_uid"]) == [22, 11, 22]
    assert list(dset["location/micrograph_path"]) == [PATHS[1], PATHS[0], PATHS[1]]
    assert dset["location/micrograph_shape"].tolist() == [[300, 200], [256, 384], [300, 200]]
    assert list(dset["location/exp_group_id"]) == [4, 3, 4]
    np.testing.assert_allclose(dset["location/micrograph_psize_A"], 1.5)
    np.testing.assert_allclose(dset["location/min_dist_A"], [30.0, 24.0, 30.0])
    np.testing.assert_allclose(dset["pick_stats/ncc_score"], [0.9, 0.25, 1.0])  # clipped to [0, 1]
    np.testing.assert_array_equal(dset["pick_stats/power"], dset["pick_stats/ncc_score"])
    back = records.fractions_to_pixels(dset["location/center_x_frac"], dset["location/center_y_frac"],
                                       dset["location/micrograph_shape"])
    np.testing.assert_allclose(back, picks.xy, atol=0.01)
    again = records.picks_from_dataset(dset, mics)
    np.testing.assert_allclose(again.xy, picks.xy, atol=0.01)
    np.testing.assert_allclose(again.score, [0.9, 0.25, 1.0], atol=1e-6)


def test_unit_score_maps_the_score_range():
    np.testing.assert_allclose(records.unit_score([-1.0, 0.0, 1.0, np.nan], (-1.0, 1.0), 4), [0, 0.5, 1, 0])
    np.testing.assert_array_equal(records.unit_score(None, (0, 1), 2), [1, 1])


def test_path_map_replaces_the_longest_prefix_on_component_boundaries():
    pm = PathMap.parse(["/cs/projects=/mnt/p", "/cs/projects/big=/fast/big"])
    assert pm.apply("/cs/projects/P1/J1/a.mrc") == "/mnt/p/P1/J1/a.mrc"
    assert pm.apply("/cs/projects/big/J1/a.mrc") == "/fast/big/J1/a.mrc"
    assert pm.apply("/cs/projects2/a.mrc") == "/cs/projects2/a.mrc"
    with pytest.raises(InputError, match="SERVER_PREFIX=LOCAL_PREFIX"):
        PathMap.parse(["/only/one/side"])


def test_locate_relative_absolute_and_imported_symlinks(tmp_path):
    proj, raw = tmp_path / "proj", tmp_path / "raw-local"
    (proj / "J1" / "imported").mkdir(parents=True)
    raw.mkdir()
    (raw / "m.mrc").write_bytes(b"x")
    (proj / "J1" / "rel.mrc").write_bytes(b"x")
    os.symlink("/server/raw/m.mrc", proj / "J1" / "imported" / "m.mrc")  # a server path, broken here
    pm = PathMap.parse([f"/server/raw={raw}"])
    assert locate("J1/rel.mrc", proj) == proj / "J1" / "rel.mrc"
    assert locate("/server/raw/m.mrc", proj, pm) == raw / "m.mrc"
    assert locate("J1/imported/m.mrc", proj, pm) == raw / "m.mrc"
    assert locate("J1/imported/m.mrc", proj) is None
    assert locate("J1/missing.mrc", proj) is None


@pytest.mark.parametrize("value, expected", [
    (("J12", "particles_selected"), Source("J12", "particles_selected")),
    ("J12", Source("J12", None)),
    ("j8:exposures", Source("J8", "exposures")),
    ("J8.exposures_accepted", Source("J8", "exposures_accepted")),
])
def test_source_parsing(value, expected):
    assert Source.parse(value) == expected


@pytest.mark.parametrize("bad", ["12", "J12:bad-name", ("J1", "x", "y")])
def test_bad_sources_are_one_line_errors(bad):
    with pytest.raises(CryoSPARCError) as err:
        Source.parse(bad)
    assert "\n" not in str(err.value)


def test_make_config_forms(tmp_path):
    assert make_config(None, 190).particle.diameter_A == 190.0
    assert make_config({"train.epochs": 3}).train.epochs == 3
    path = tmp_path / "c.toml"
    path.write_text("[train]\nepochs = 4\n")
    assert make_config(path, overrides={"train.lr": 0.01}).train.lr == 0.01
    with pytest.raises(InputError, match="unknown config key"):
        make_config({"train.epoch": 3})


def test_version_mismatch_message_has_the_pip_command():
    mismatch_message("v5.0.1", "5.0.3", "http://x")  # same minor: fine
    with pytest.raises(CryoSPARCError, match=r"pip install --force cryosparc-tools~=5\.1\.0"):
        mismatch_message("v5.1.0", "5.0.3", "http://x")
    with pytest.raises(CryoSPARCError, match=r"cryosparc-tools~=4\.7\.0.*offline"):
        mismatch_message("v4.7.1", "5.0.3", "http://x")
