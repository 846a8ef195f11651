"""Live mode: the real cryosparc-tools client against the fake CryoSPARC v5 server."""

import numpy as np
import pytest
from cryosparc.dataset import Dataset
from cryosparc_scene import DIAMETER_A, SHAPE, TINY, seed_scene, tiny_model_dir  # noqa: F401 (fixture)
from fakes.cryosparc_server import (  # noqa: F401 (fixtures)
    FakeCryoSPARC,
    cryosparc_fake,
    cryosparc_inprocess,
    isolate_client_config,
    unused_url,
)

import cryosparc_job
from crisp_ext.errors import InputError
from cryosparc_job import records
from cryosparc_job.connect import CryoSPARCError, connect
from cryosparc_job.live import JobFailed, pick_live, run_live

LOCATION = ["location/micrograph_uid", "location/exp_group_id", "location/micrograph_path", "location/micrograph_shape",
            "location/center_x_frac", "location/center_y_frac"]  # the v4 minimum a server declares
# the three declared field lists the live path is run against: the v4 minimum, + min_dist_A, + micrograph_psize_A
DECLARED = {"v4 minimum": [], "+min_dist_A": [("min_dist_A", "f4")],
            "+min_dist_A+micrograph_psize_A": [("min_dist_A", "f4"), ("micrograph_psize_A", "f4")]}
PICK_STATS = ["pick_stats/ncc_score", "pick_stats/power", "pick_stats/template_idx", "pick_stats/angle_rad"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Runs without work_dir write to ./crisp-cryosparc: keep them in the test's directory."""
    monkeypatch.chdir(tmp_path)


def live(fake, tmp_path, **kw):
    args = dict(particles=("J2", "particles_selected"), exposures=("J1", "exposures"), config=TINY,
                email=fake.email, password=fake.password, work_dir=tmp_path / "work")
    args.update(kw)
    return run_live(fake.base_url, "P1", "W1", **args)


@pytest.mark.parametrize("declared", list(DECLARED))
def test_full_flow_trains_picks_and_saves_a_completed_external_job(cryosparc_inprocess, tmp_path, declared):
    fake = cryosparc_inprocess
    fake.output_fields["location"] = fake.output_fields["location"] + DECLARED[declared]
    scene = seed_scene(fake)
    run = live(fake, tmp_path, diameter_A=DIAMETER_A)
    job = fake.job(run.job_uid)
    assert (job.status, job.spec.type, job.title) == ("completed", "snowflake", "CRISP particle picks")
    assert "| particle diameter | 64 Å |" in job.description and "cryosparc-tools" in job.description
    assert sorted(job.parents) == ["J1", "J2"]  # lineage: both sources connected
    assert {n: [c.job_uid for c in i.connections] for n, i in job.spec.inputs.root.items()} == {
        "micrographs": ["J1"], "curated_particles": ["J2"]}
    output = job.spec.outputs.root["particles"]
    assert (output.type, sorted(s.name for s in output.slots)) == ("particle", ["location", "pick_stats"])

    saved = fake.load_saved(run.job_uid, "particles")  # what the server wrote to J3/particles.cs
    extra = [f"location/{f}" for f, _ in DECLARED[declared]]
    assert sorted(saved.fields()) == sorted(["uid"] + LOCATION + extra + PICK_STATS)  # exactly what is declared
    picks = run.result.picks
    assert len(saved) == len(picks) > 0
    exposures = scene.exposures.dataset
    row_of = {int(u): i for i, u in enumerate(exposures["uid"])}
    rows = [row_of[int(u)] for u in saved["location/micrograph_uid"]]
    assert list(saved["location/micrograph_path"]) == [scene.exposures.paths[r] for r in rows]
    assert saved["location/micrograph_shape"].tolist() == [list(SHAPE)] * len(saved)
    assert set(saved["location/exp_group_id"]) == {1}
    if "location/micrograph_psize_A" in extra:
        np.testing.assert_allclose(saved["location/micrograph_psize_A"], 4.0)
    if "location/min_dist_A" in extra:
        np.testing.assert_allclose(saved["location/min_dist_A"], 0.5 * DIAMETER_A, rtol=1e-5)
    # fractions (x / nx, y / ny, no flip) give back the pipeline's picks within half a pixel
    xy = records.fractions_to_pixels(saved["location/center_x_frac"], saved["location/center_y_frac"],
                                     saved["location/micrograph_shape"])
    assert [str(u) for u in saved["location/micrograph_uid"]] == list(picks.micrograph)
    assert np.abs(xy - picks.xy).max() < 0.5
    assert np.all((saved["location/center_x_frac"] >= 0) & (saved["location/center_x_frac"] < 1))
    np.testing.assert_allclose(saved["pick_stats/ncc_score"], np.clip(picks.score, 0, 1), atol=1e-6)
    assert saved["pick_stats/ncc_score"].min() >= 0 and saved["pick_stats/ncc_score"].max() <= 1

    texts = fake.event_texts(run.job_uid)
    assert texts[0].startswith("CRISP picker parameters:") and "J2:particles_selected" in texts[0]
    assert sum(t.startswith("[pick ") for t in texts) == 1  # one progress line per stage, updated in place
    assert any(t.startswith("[pick 3/3]") for t in texts) and any(t.startswith("[train 2/2]") for t in texts)
    assert texts[-1].startswith(f"{len(picks)} particles on 3 micrographs")
    images = [e for e in fake.events(run.job_uid) if e.type == "image"]
    assert [e.text.split(" ")[0] for e in images].count("Picks") >= 1 and images[-1].text.startswith("Pick scores")
    assert all(fake.assets[a.fileid].data.startswith(b"\x89PNG") for e in images for a in e.imgfiles)
    flow = [s for s in fake.summaries() if s in ("jobs.create", "jobs.mark_running", "jobs.save_output",
                                                 "jobs.mark_completed")]
    assert flow == ["jobs.create", "jobs.mark_running", "jobs.save_output", "jobs.mark_completed"]


def test_notebook_function_with_a_client_and_a_model_directory(cryosparc_inprocess, tmp_path, tiny_model_dir):
    fake = cryosparc_inprocess
    scene = seed_scene(fake)
    # Motion-correction exposures: no ctf slot, the exposure group in mscope_params (passed through the input)
    mics = scene.exposures.dataset.filter_prefixes(["micrograph_blob"], copy=True)
    mics.add_fields([("mscope_params/exp_group_id", "<u4")])
    mics["mscope_params/exp_group_id"] = 7
    motion = fake.seed_output_job(mics, output_name="micrographs", type="exposure",
                                  job_type="patch_motion_correction_multi")
    cs = fake.connect()
    uid = cryosparc_job.pick_live(cs, "P1", "W1", exposures=motion.uid, model_dir=tiny_model_dir,
                                  config={"predict.bf16": False}, work_dir=tmp_path / "w",
                                  title="CRISP from a notebook")
    job = fake.job(uid)
    assert (job.status, job.title, list(job.spec.inputs.root)) == ("completed", "CRISP from a notebook",
                                                                    ["micrographs"])
    saved = Dataset.load(fake.project_dir / uid / "particles.cs")
    assert len(saved) == job.spec.outputs.root["particles"].num_items > 0
    assert set(saved["location/exp_group_id"]) == {7}


def test_micrographs_are_downloaded_when_the_project_is_not_mounted(tmp_path, monkeypatch, tiny_model_dir):
    isolate_client_config(monkeypatch, tmp_path / "xdg")
    fake = FakeCryoSPARC(tmp_path / "server-side", server_project_dir="/nowhere/CS-proj")
    seed_scene(fake, n=2, curated=(0,))
    with fake.in_process():
        run = live(fake, tmp_path, particles=None, model_dir=tiny_model_dir)
        assert fake.summaries().count("projects.download_file") == 2
        cached = sorted(p.name for p in (tmp_path / "work" / "downloads" / "P1").rglob("*.mrc"))
        assert len(cached) == 2 and all(str(m.path).startswith(str(tmp_path / "work")) for m in run.micrographs)
        live(fake, tmp_path, particles=None, model_dir=tiny_model_dir)  # a second run reuses the cache
        assert fake.summaries().count("projects.download_file") == 2
        mapped = live(fake, tmp_path, particles=None, model_dir=tiny_model_dir,
                      path_map=[f"/nowhere/CS-proj={fake.project_dir}"], download="never")
        assert all(str(m.path).startswith(str(fake.project_dir)) for m in mapped.micrographs)
        assert fake.job(mapped.job_uid).status == "completed"


def test_error_mid_run_ends_the_job_failed_with_the_reason(cryosparc_inprocess, tmp_path, tiny_model_dir):
    fake = cryosparc_inprocess
    seed_scene(fake)
    fake.output_fields["location"].append(("future_field", "f4"))  # announced, unknown to us: warned about
    fake.fail_next("jobs.save_output", 500, "disk full")
    with pytest.raises(JobFailed, match=r"job J3 failed: disk full \(HTTP 500\)") as err:
        live(fake, tmp_path, model_dir=tiny_model_dir)
    assert err.value.job_uid == "J3" and err.value.__cause__.code == 500
    failed = fake.job("J3")
    assert failed.status == "failed" and "disk full" in failed.errors_run[-1].message
    assert any(e.type == "error" and e.text.startswith("Error:") for e in fake.events("J3"))
    assert any(e.type == "warning" and "location/future_field" in e.text for e in fake.events("J3"))


def test_setup_error_ends_the_new_job_failed(cryosparc_inprocess, tmp_path):
    fake = cryosparc_inprocess
    seed_scene(fake)
    fake.fail_next("jobs.add_external_output", 500, "database busy")
    with pytest.raises(JobFailed, match="database busy"):
        live(fake, tmp_path, diameter_A=DIAMETER_A)
    job = fake.job("J3")
    assert job.status == "failed" and "setting up the job failed: database busy" in job.errors_run[-1].message


def test_pipeline_error_ends_the_job_failed_and_is_raised_as_input_error(cryosparc_inprocess, tmp_path):
    fake = cryosparc_inprocess
    seed_scene(fake)
    with pytest.raises(InputError, match="unknown model.encoder"):  # found only when the network is built
        live(fake, tmp_path, diameter_A=DIAMETER_A, config={**TINY, "model.encoder": "nonsense"})
    job = fake.job("J3")
    assert job.status == "failed" and "unknown model.encoder" in job.errors_run[-1].message
    # a value the config's schema refuses never gets as far as creating a job
    with pytest.raises(InputError, match="model.arch"):
        live(fake, tmp_path, diameter_A=DIAMETER_A, config={**TINY, "model.arch": "nonsense"})
    assert "J4" not in fake.jobs


def test_interrupt_fails_the_job_instead_of_completing_it(cryosparc_inprocess, tmp_path, tiny_model_dir):
    fake = cryosparc_inprocess
    seed_scene(fake)

    def ctrl_c(event):
        if event.stage == "pick":
            raise KeyboardInterrupt

    with pytest.raises(Exception, match="interrupted"):
        live(fake, tmp_path, model_dir=tiny_model_dir, progress=ctrl_c)
    assert fake.job("J3").status == "failed"


@pytest.mark.parametrize("kw, message", [
    (dict(project="P9"), "project P9 not found"),
    (dict(workspace="W7"), "workspace W7 not found"),
    (dict(exposures="J99"), "job J99 not found in project P1"),
    (dict(particles=("J1", "exposures")), "output J1:exposures has no location slot"),
    (dict(particles="J2:particles"), "job J2 has no output 'particles'"),
    (dict(exposures="J2"), "no exposure outputs with a micrograph_blob slot"),
    (dict(project="project-1"), "project uid 'PROJECT-1' is not valid"),
])
def test_bad_uids_and_outputs_are_one_line_errors_before_any_job_exists(cryosparc_inprocess, tmp_path, kw, message):
    fake = cryosparc_inprocess
    seed_scene(fake)
    args = dict(project="P1", workspace="W1", particles="J2", exposures="J1")
    args.update(kw)
    with pytest.raises(CryoSPARCError, match=message) as err:
        run_live(fake.base_url, args.pop("project"), args.pop("workspace"), diameter_A=DIAMETER_A,
                 email=fake.email, password=fake.password, **args)
    assert "\n" not in str(err.value)
    assert fake.jobs == ["J1", "J2"]


def test_connection_errors_are_one_line(cryosparc_inprocess):
    fake = cryosparc_inprocess
    cases = [
        (lambda: connect(fake.base_url, email=fake.email, password="wrong"), "refused the login for ali@"),
        (lambda: connect(unused_url(), email="a@b.c", password="x"), "cannot reach CryoSPARC"),
        (lambda: connect(fake.base_url), "no login for CryoSPARC"),
        (lambda: connect(None), "no CryoSPARC URL"),
        (lambda: connect("cryosparc:39000", email="a", password="b"), "must start with http"),
    ]
    for call, message in cases:
        with pytest.raises(CryoSPARCError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_version_mismatch_is_an_error_with_the_pip_command(cryosparc_inprocess):
    fake = cryosparc_inprocess
    fake.version = "v5.1.2"
    with pytest.raises(CryoSPARCError, match=r"pip install --force cryosparc-tools~=5\.1\.0"):
        connect(fake.base_url, email=fake.email, password=fake.password)
    fake.version = "v5.0.3"
    cs = fake.connect()
    fake.version = "v4.7.1"  # a client made elsewhere is checked too
    with pytest.raises(CryoSPARCError, match=r"cryosparc-tools~=4\.7\.0"):
        pick_live(cs, "P1", "W1", particles="J2", exposures="J1", diameter_A=DIAMETER_A)


def test_environment_and_saved_login(cryosparc_inprocess, monkeypatch):
    fake = cryosparc_inprocess
    monkeypatch.setenv("CRYOSPARC_BASE_URL", fake.base_url)
    monkeypatch.setenv("CRYOSPARC_EMAIL", fake.email)
    monkeypatch.setenv("CRYOSPARC_PASSWORD", fake.password)
    monkeypatch.setenv("CRYOSPARC_MASTER_HOSTNAME", "worker-node")  # set inside CryoSPARC workers
    monkeypatch.setenv("CRYOSPARC_BASE_PORT", "39000")
    assert connect().find_project("P1").uid == "P1"
    monkeypatch.delenv("CRYOSPARC_PASSWORD")
    monkeypatch.delenv("CRYOSPARC_EMAIL")
    fake.write_saved_login()
    assert connect(fake.base_url).find_project("P1").uid == "P1"


def test_ctrl_c_during_setup_ends_the_job_failed_not_building(cryosparc_inprocess, tmp_path, monkeypatch):
    from cryosparc.controllers.job import ExternalJobController

    fake = cryosparc_inprocess
    seed_scene(fake)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ExternalJobController, "connect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        live(fake, tmp_path, diameter_A=DIAMETER_A)
    job = fake.job(fake.jobs[-1])
    assert job.spec.type == "snowflake" and job.status == "failed"
    assert "interrupted" in job.errors_run[-1].message


def test_plots_are_uploaded_under_short_safe_names_with_the_sentence_as_caption(cryosparc_inprocess, tmp_path):
    import re

    fake = cryosparc_inprocess
    seed_scene(fake)
    run = live(fake, tmp_path, diameter_A=DIAMETER_A)
    names = [a.filename for a in fake.assets.values() if a.job_uid == run.job_uid]
    assert names and all(re.fullmatch(r"[A-Za-z0-9_.-]{1,68}\.png", n) for n in names), names
    assert "score_histogram.png" in names
    texts = fake.event_texts(run.job_uid)
    assert any(t.startswith("Pick scores (threshold") for t in texts)
    # the validation micrographs' pictures, captioned as such
    assert any(n.startswith("validation_") for n in names), names
    assert any(t.startswith("Validation micrograph ") and "(red)" in t for t in texts)


def test_an_exposure_without_a_recorded_shape_gets_the_file_shape():
    from crisp_ext.types import Micrograph, Particles
    from cryosparc_job import records

    mic = Micrograph(id="7", path="x.mrc", shape=(100, 120),
                     meta={"uid": 7, "micrograph_path": "J1/x.mrc", "blob_shape": (0, 0), "psize_A": 1.0})
    picks = Particles.for_one("7", [[10.0, 20.0]], [0.9])
    dset = records.fill_particles(records.allocate_particles(1), picks, {"7": mic}, 10.0)
    assert dset["location/micrograph_shape"].tolist() == [[100, 120]]
