"""Offline mode on project directories written by the fake server (real Dataset.save / mrc.write files)."""

import hashlib
import shutil

import numpy as np
import pytest
import yaml
from cryosparc.dataset import Dataset
from cryosparc_scene import DIAMETER_A, SHAPE, TINY, seed_scene, tiny_model_dir  # noqa: F401 (fixture)
from fakes.cryosparc_server import FakeCryoSPARC

from crisp_ext.errors import InputError
from cryosparc_job import offline, project_files, records
from cryosparc_job.paths import PathMap


@pytest.fixture
def project(tmp_path):
    fake = FakeCryoSPARC(tmp_path / "CS-proj")
    scene = seed_scene(fake, poses=True)
    return fake, scene


def _micrographs(fake, scene):
    mic_data, _ = project_files.read_output(fake.project_dir, "J1", "exposure")
    return records.micrographs_from_exposures(mic_data, lambda p: fake.project_dir / p)


def _digest(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_outputs_read_through_both_job_json_layouts(project, layout):
    fake, scene = project
    for job in ("J1", "J2"):
        fake.write_job_json(job, layout=layout)
    exp, label = project_files.read_output(fake.project_dir, "J1", "exposure")
    assert label == "J1:exposures" and len(exp) == 3
    np.testing.assert_array_equal(exp["uid"], scene.exposures.dataset["uid"])
    assert list(exp["micrograph_blob/path"]) == scene.exposures.paths
    parts, label = project_files.read_output(fake.project_dir, ("J2", "particles_selected"), "particle")
    assert label == "J2:particles_selected" and set(parts.prefixes()) == {"location", "alignments3D"}
    # pixel -> fraction (Dataset.save on disk, f4) -> pixel, on 256 x 384 micrographs
    curated, unmatched = records.particles_from_dataset(parts.filter_prefixes(["location"]),
                                                        _micrographs(fake, scene))
    assert unmatched == 0
    for i in (0, 1):
        uid = str(int(scene.exposures.dataset["uid"][i]))
        got = curated.for_micrograph(uid).xy
        assert got.shape == scene.sims[i].centres.shape
        np.testing.assert_allclose(got, scene.sims[i].centres, atol=0.5)
        np.testing.assert_allclose(got, scene.sims[i].centres, atol=1e-3)  # in fact much closer


def test_passthrough_files_are_joined(tmp_path):
    fake = FakeCryoSPARC(tmp_path / "proj")
    scene = seed_scene(fake, passthrough_slots=["ctf"])
    exp, _ = project_files.read_output(fake.project_dir, "J1:exposures", "exposure")
    assert {"micrograph_blob", "ctf"} <= set(exp.prefixes())
    np.testing.assert_allclose(exp["ctf/df1_A"], [12000, 13000, 14000])
    assert list(exp["micrograph_blob/path"]) == scene.exposures.paths


def test_csg_and_bare_cs_fallbacks(project, tmp_path):
    fake, scene = project
    proj = fake.project_dir
    (proj / "J2" / "job.json").unlink()
    with pytest.raises(InputError, match="name the output"):
        project_files.read_output(proj, "J2", "particle")
    bare, _ = project_files.read_output(proj, "J2:particles_selected", "particle")  # J2/J2_particles_selected.cs
    assert len(bare) == len(scene.particles.dataset)
    export = tmp_path / "exports"
    export.mkdir()
    shutil.copy(proj / "J2" / "J2_particles_selected.cs", export / "picked.cs")
    csg = export / "picked.csg"
    csg.write_text(yaml.safe_dump({"group": {"name": "particles", "type": "particle"}, "results": {
        "location": {"metafile": ">picked.cs", "num_items": len(bare), "type": "particle.location"}}}))
    via_csg, label = project_files.read_output(proj, str(csg), "particle")
    assert label == str(csg) and via_csg.prefixes() == ["location"]
    np.testing.assert_array_equal(via_csg["location/center_x_frac"], bare["location/center_x_frac"])
    via_cs, _ = project_files.read_output(proj, str(export / "picked.cs"), "particle")
    assert len(via_cs) == len(bare)


@pytest.mark.parametrize("source, kind, message", [
    ("J9", "exposure", "job J9 not found"),
    ("J1:nothing", "exposure", "has no output 'nothing'"),
    ("J1:exposures", "particle", "has no location slot"),
    ("J2", "exposure", "no outputs with a micrograph_blob slot"),
    ("missing.csg", "particle", "file not found"),
])
def test_bad_sources_are_one_line_errors(project, source, kind, message):
    fake, _ = project
    with pytest.raises(InputError, match=message) as err:
        project_files.read_output(fake.project_dir, source, kind)
    assert "\n" not in str(err.value)


def test_result_group_files_are_what_import_result_group_reads(tmp_path):
    dset = records.allocate_particles(4)
    dset["location/center_x_frac"] = [0.1, 0.2, 0.3, 0.4]
    cs_path, csg_path = offline.write_result_group(dset, tmp_path / "out", "picks", title="T", description="D",
                                                   version="v4.7.1")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["picks.cs", "picks.csg"]  # no temp files left
    assert cs_path.read_bytes()[:6] == b"\x93NUMPY"
    np.testing.assert_allclose(Dataset.load(cs_path)["location/center_x_frac"], [0.1, 0.2, 0.3, 0.4])
    doc = yaml.safe_load(csg_path.read_text())
    assert doc["group"] == {"description": "D", "name": "particles", "title": "T", "type": "particle"}
    assert doc["results"] == {slot: {"metafile": ">picks.cs", "num_items": 4, "type": f"particle.{slot}"}
                              for slot in ("location", "pick_stats")}
    assert doc["version"] == "v4.7.1" and "created" in doc
    again = project_files.read_csg(csg_path)
    assert sorted(again.fields()) == sorted(dset.fields())


def test_offline_pick_writes_an_importable_group_without_touching_the_project(project, tmp_path, tiny_model_dir):
    fake, scene = project
    before = _digest(fake.project_dir)
    run = offline.pick_offline(fake.project_dir, "J1", tmp_path / "out", particles="J2", model_dir=tiny_model_dir,
                               config=TINY)
    assert _digest(fake.project_dir) == before
    assert run.csg_path == tmp_path / "out" / "crisp_particles.csg"
    saved = Dataset.load(run.cs_path)
    assert len(saved) == len(run.result.picks) > 0
    mics = {m.id: m for m in run.micrographs}
    assert set(map(str, saved["location/micrograph_uid"])) <= set(mics)
    assert all(tuple(s) == SHAPE for s in saved["location/micrograph_shape"])
    # the picks survive pixel -> fraction (f4 on disk) -> pixel well within half a pixel
    back = records.picks_from_dataset(saved, run.micrographs)
    np.testing.assert_array_equal(back.micrograph, run.result.picks.micrograph)
    assert np.abs(back.xy - run.result.picks.xy).max() < 0.5
    paths = {str(int(u)): p for u, p in zip(scene.exposures.dataset["uid"], scene.exposures.paths)}
    assert [paths[str(u)] for u in saved["location/micrograph_uid"]] == list(saved["location/micrograph_path"])
    doc = yaml.safe_load(run.csg_path.read_text())
    assert doc["results"]["location"]["num_items"] == len(saved)
    assert set(project_files.read_csg(run.csg_path).fields()) == set(saved.fields())


def test_offline_training_run_with_poses_and_v5_layout(tmp_path):
    fake = FakeCryoSPARC(tmp_path / "proj", job_json_layout="v5")
    seed_scene(fake, poses=True)
    run = offline.pick_offline(fake.project_dir, "J1:exposures", tmp_path / "out",
                               particles="J2:particles_selected", diameter_A=DIAMETER_A, config=TINY)
    assert (run.result.model_dir / "model.json").is_file()
    assert len(Dataset.load(run.cs_path)) == len(run.result.picks)


def test_output_directory_may_not_be_a_job_directory(project):
    fake, _ = project
    for out in (fake.project_dir, fake.project_dir / "J1" / "crisp"):
        with pytest.raises(InputError, match="separate directory"):
            offline.pick_offline(fake.project_dir, "J1", out, particles="J2", diameter_A=DIAMETER_A)


def test_missing_micrographs_are_an_error_naming_the_path_map(project, tmp_path):
    fake, _ = project
    shutil.rmtree(fake.project_dir / "J1" / "motioncorrected")
    with pytest.raises(InputError, match="--path-map"):
        offline.pick_offline(fake.project_dir, "J1", tmp_path / "out", particles="J2", diameter_A=DIAMETER_A)


def test_micrographs_found_through_a_path_map(tmp_path, tiny_model_dir):
    fake = FakeCryoSPARC(tmp_path / "proj")
    scene = seed_scene(fake)
    moved = tmp_path / "elsewhere"
    shutil.move(fake.project_dir / "J1" / "motioncorrected", moved)
    for path in scene.exposures.paths:  # like imports: links to the server's raw data directory
        link = fake.project_dir / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"/server/raw/{link.name}")
    run = offline.pick_offline(fake.project_dir, "J1", tmp_path / "out", model_dir=tiny_model_dir,
                               path_map=PathMap.parse([f"/server/raw={moved}"]))
    assert len(run.micrographs) == 3 and all(str(m.path).startswith(str(moved)) for m in run.micrographs)
