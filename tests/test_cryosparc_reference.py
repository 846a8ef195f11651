"""cryosparc_job with --mask / --volume: the 3D reference from a volume/mask output (live: connected as an input,
read from the project directory or downloaded; offline: through job.json) or a file, used when the particles carry
alignments3D poses."""

import json

import numpy as np
import pytest
from cryosparc.dataset import Dataset
from cryosparc_scene import DIAMETER_A, TINY, seed_scene, tiny_model_dir  # noqa: F401 (fixture)
from fakes.cryosparc_server import FakeCryoSPARC, cryosparc_fake, cryosparc_inprocess  # noqa: F401 (fixtures)

from crisp_ext.errors import InputError
from crisp_ext.io.mrc import write_mrc
from crisp_ext.simulate import Phantom, phantom_volume
from cryosparc_job.live import run_live
from cryosparc_job.offline import pick_offline
from cryosparc_job.paths import NO_MAP
from cryosparc_job.reference import choose_slot, fetch_reference, load_offline, parse_reference

MAP_PS = 3.0


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _volumes():
    density = phantom_volume(Phantom.elongated(), DIAMETER_A, MAP_PS, 32)
    return density, (density > 0.1 * density.max()).astype(np.float32)


def seed_volume(fake, slots=("map", "mask_refine")) -> str:
    """A completed refinement-like job whose ``volume`` output has a map and a refinement mask (MRC files)."""
    density, mask = _volumes()
    fields = []
    for slot in slots:
        fields += [(f"{slot}/path", "O"), (f"{slot}/psize_A", "<f4"), (f"{slot}/shape", "<u4", (3,))]
    dset = Dataset.allocate(1, fields)
    uid = f"J{len(fake.jobs) + 1}"
    for slot in slots:
        rel = f"{uid}/{uid}_volume_{slot}.mrc"
        write_mrc(fake.project_dir / rel, mask if slot.startswith("mask") else density, pixel_size=MAP_PS)
        dset[f"{slot}/path"] = [rel]
        dset[f"{slot}/psize_A"] = MAP_PS
        dset[f"{slot}/shape"] = [[32, 32, 32]]
    seeded = fake.seed_output_job(dset, output_name="volume", type="volume", job_type="homo_refine_new",
                                  title="Homogeneous Refinement")
    assert seeded.uid == uid
    return uid


def test_live_mask_from_a_refinement_output_gives_reprojection_labels(cryosparc_inprocess, tmp_path):
    fake = cryosparc_inprocess
    seed_scene(fake, poses=True)
    vol_uid = seed_volume(fake)
    run = run_live(fake.base_url, "P1", "W1", particles="J2", exposures="J1", config=TINY, diameter_A=DIAMETER_A,
                   email=fake.email, password=fake.password, work_dir=tmp_path / "work", mask=vol_uid)
    job = fake.job(run.job_uid)
    assert job.status == "completed"
    inputs = job.spec.inputs.root
    assert [c.job_uid for c in inputs["reference"].connections] == [vol_uid] and vol_uid in job.parents
    assert "| 3D mask | J3:volume (mask_refine) |" in job.description
    texts = fake.event_texts(run.job_uid)
    assert any(t.startswith("Read the 3D mask J3:volume/mask_refine") for t in texts)
    assert any("labels: reprojection of the 3D mask J3:volume/mask_refine" in t for t in texts)
    images = [e.text for e in fake.events(run.job_uid) if e.type == "image"]
    assert images[0].startswith("Training labels")
    info = json.loads((run.result.model_dir / "model.json").read_text())
    assert info["labels"] == "reprojection" and info["labels_detail"]["reference_pixel_size"] == MAP_PS


def test_live_reference_is_not_used_without_training(cryosparc_inprocess, tmp_path, tiny_model_dir):
    fake = cryosparc_inprocess
    seed_scene(fake, poses=True)
    vol_uid = seed_volume(fake)
    run = run_live(fake.base_url, "P1", "W1", exposures="J1", model_dir=tiny_model_dir, email=fake.email,
                   password=fake.password, work_dir=tmp_path / "work", volume=vol_uid)
    job = fake.job(run.job_uid)
    assert job.status == "completed" and list(job.spec.inputs.root) == ["micrographs"]
    assert any("--volume J3 is not used: picking with a trained model" in t for t in fake.event_texts(run.job_uid))


def test_reference_is_downloaded_when_the_project_is_not_mounted(cryosparc_inprocess):
    fake = cryosparc_inprocess
    vol_uid = seed_volume(fake)
    project = fake.connect().find_project("P1")
    spec = parse_reference(mask=f"{vol_uid}:volume")
    ref = fetch_reference(spec, f"{vol_uid}/{vol_uid}_volume_mask_refine.mrc", None, "J1:volume/mask_refine",
                          locate=lambda blob: None, download=project.download_mrc)
    assert ref.is_mask and ref.pixel_size == pytest.approx(MAP_PS)  # from the header: xlen / nx
    np.testing.assert_array_equal(ref.volume, _volumes()[1])
    assert "projects.download_file" in fake.summaries()


def test_slot_choice_and_parsing(tmp_path):
    mask = parse_reference(mask="J15")
    assert mask.is_mask and mask.source.job == "J15" and mask.path is None
    assert choose_slot(mask, [("volume", {"map", "mask_fsc", "mask_refine"})]) == ("volume", "mask_refine")
    assert choose_slot(parse_reference(volume="J15"), [("volume", {"map_sharp", "map"})]) == ("volume", "map")
    with pytest.raises(InputError, match="--volume instead"):
        choose_slot(parse_reference(mask="J15:volume"), [("volume", {"map"})])
    with pytest.raises(InputError, match="several"):
        choose_slot(parse_reference(volume="J15"), [("a", {"map"}), ("b", {"map"})])
    with pytest.raises(InputError, match="no output 'x'"):
        choose_slot(parse_reference(volume="J15:x"), [("volume", {"map"})])
    path = write_mrc(tmp_path / "m.mrc", _volumes()[1], pixel_size=MAP_PS)
    assert parse_reference(mask=str(path)).path == path
    assert parse_reference(volume="maps/not_yet.mrc").path is not None  # a file name, even when missing
    with pytest.raises(InputError, match="not both"):
        parse_reference(mask="J1", volume="J2")
    with pytest.raises(InputError, match="--mask"):
        parse_reference(mask="J1:bad name")
    assert parse_reference() is None


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_offline_reference_through_job_json(tmp_path, layout):
    fake = FakeCryoSPARC(tmp_path / "CS-proj")
    vol_uid = seed_volume(fake)
    fake.write_job_json(vol_uid, layout=layout)
    ref = load_offline(fake.project_dir, parse_reference(volume=vol_uid), NO_MAP)
    assert not ref.is_mask and ref.source == f"{vol_uid}:volume/map" and ref.pixel_size == MAP_PS
    np.testing.assert_allclose(ref.volume, _volumes()[0])
    ref = load_offline(fake.project_dir, parse_reference(mask=f"{vol_uid}:volume"), NO_MAP)
    assert ref.is_mask and ref.source.endswith("mask_refine")
    (fake.project_dir / vol_uid / f"{vol_uid}_volume_map.mrc").unlink()
    with pytest.raises(InputError, match="not found"):
        load_offline(fake.project_dir, parse_reference(volume=vol_uid), NO_MAP)


def test_offline_pick_with_a_map_file(tmp_path):
    fake = FakeCryoSPARC(tmp_path / "CS-proj")
    seed_scene(fake, poses=True)
    map_file = write_mrc(tmp_path / "map.mrc", _volumes()[0], pixel_size=MAP_PS)
    lines = []
    run = pick_offline(fake.project_dir, "J1", tmp_path / "out", particles="J2", config=TINY, diameter_A=DIAMETER_A,
                       volume=str(map_file), progress=lambda e: lines.append(e.line()))
    info = json.loads((run.result.model_dir / "model.json").read_text())
    assert info["labels"] == "reprojection" and info["labels_detail"]["mask_from_map"] is True
    assert any(f"labels: reprojection of the 3D map {map_file}" in line for line in lines)
    assert len(run.particles) > 0
