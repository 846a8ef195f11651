"""The fake cryoSPARC v5 server (tests/fakes/cryosparc_server.py) driven by the real cryosparc-tools client."""

import json
import os
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
from cryosparc import mrc
from cryosparc.dataset import Dataset
from cryosparc.errors import APIError
from cryosparc.tools import CryoSPARC
from fakes.cryosparc_openapi import openapi_document
from fakes.cryosparc_server import (  # noqa: F401 (fixtures)
    FakeCryoSPARC,
    cryosparc_fake,
    cryosparc_inprocess,
    cryosparc_loopback,
    isolate_client_config,
    unused_url,
)

# Operations of reference §10.2 (plus health) that a picker's flow needs.
PICKER_OPERATIONS = {
    "health", "login", "users.me", "config.get_version", "projects.find_one", "projects.get_directory",
    "projects.download_file", "workspaces.find_one", "jobs.find_one", "jobs.get_directory", "jobs.create",
    "jobs.add_external_input", "jobs.add_external_output", "jobs.connect", "jobs.get_output_fields",
    "jobs.save_output", "jobs.load_output", "jobs.load_input", "jobs.mark_running", "jobs.mark_completed",
    "jobs.mark_failed", "jobs.add_event_log", "jobs.update_event_log", "jobs.add_image_log", "assets.upload",
}  # fmt: skip

SHAPES = [(64, 96), (96, 64), (80, 72)]  # (ny, nx), deliberately non-square
COORDS = [[(10.5, 20.0), (90.0, 60.0)], [(30.0, 40.0), (5.0, 90.0), (60.0, 3.0)], [(36.0, 40.0)]]  # pixel (x, y)
CURATED = {0: COORDS[0], 2: COORDS[2]}  # the curated particles cover a subset of the micrographs


@pytest.fixture(params=["inprocess", "loopback"])
def fake(request, cryosparc_fake):
    """The fake reached either in-process (MockTransport) or over loopback HTTP."""
    mode = cryosparc_fake.in_process() if request.param == "inprocess" else cryosparc_fake.serve()
    with mode:
        yield cryosparc_fake


def seed(fake, **exposure_kw):
    mics = fake.seed_exposures(SHAPES, psize_A=1.5, ctf={"df1_A": [12000.0, 21000.0, 9000.0]}, **exposure_kw)
    parts = fake.seed_particles(mics, CURATED, poses=np.arange(9, dtype=np.float32).reshape(3, 3))
    return mics, parts


def assert_same_rows(a: Dataset, b: Dataset):
    """Equal fields and values, compared row by row in uid order."""
    assert sorted(a.fields()) == sorted(b.fields())
    ia, ib = np.argsort(a["uid"]), np.argsort(b["uid"])
    for name in a.fields():
        assert np.array_equal(np.asarray(a[name])[ia], np.asarray(b[name])[ib]), name


def picker_job(cs, *, slots=("location", "pick_stats")):
    job = cs.find_project("P1").create_external_job("W1", title="CRISP picks", desc="params")
    job.connect("micrographs", "J1", "exposures", slots=["micrograph_blob", "?ctf"])
    job.add_output("particle", "particles", slots=list(slots), title="Picked particles")
    return job


def fill_picks(job, mics: Dataset, xy_per_mic):
    """Allocate via the server's field list and fill location/pick_stats for each micrograph."""
    parts = []
    for row, xy in zip(mics.rows(), xy_per_mic):
        xy = np.asarray(xy, dtype=np.float64)
        ny, nx = row["micrograph_blob/shape"]
        out = job.alloc_output("particles", len(xy))
        out["location/micrograph_uid"] = row["uid"]
        out["location/exp_group_id"] = row["ctf/exp_group_id"]
        out["location/micrograph_path"] = row["micrograph_blob/path"]
        out["location/micrograph_shape"] = np.tile([ny, nx], (len(xy), 1))
        out["location/center_x_frac"] = xy[:, 0] / nx
        out["location/center_y_frac"] = xy[:, 1] / ny
        out["pick_stats/ncc_score"] = 0.75
        out["pick_stats/power"] = 0.75
        parts.append(out)
    return Dataset.append_many(*parts)


# ---- openapi and authentication ---------------------------------------------------------------


def test_openapi_publishes_picker_operations_with_model_schemas():
    doc = openapi_document()
    summaries = {e["summary"] for methods in doc["paths"].values() for e in methods.values()}
    assert PICKER_OPERATIONS <= summaries
    schemas = doc["components"]["schemas"]
    assert {"Job", "Project", "Workspace", "User", "Token", "TextEvent", "ImageEvent", "GridFSAsset"} <= set(schemas)
    assert "spec" in schemas["Job"]["properties"] and "status" in schemas["Job"]["properties"]


def test_connect_with_real_client(fake):
    cs = fake.connect()
    assert cs.user.emails[0].address == fake.email
    assert cs.test_connection()
    assert fake.calls[:4] == [("GET", "openapi.json"), ("POST", "login"), ("GET", "users.me"),
                              ("GET", "config.get_version")]  # fmt: skip


def test_wrong_password_is_refused(fake):
    with pytest.raises(RuntimeError, match="Could not connect to CryoSPARC") as err:
        fake.connect(password="not-the-password")
    assert isinstance(err.value.__cause__, APIError) and err.value.__cause__.code == 401


def test_login_wants_the_sha256_hex_password_and_requests_need_the_token(cryosparc_inprocess):
    fake = cryosparc_inprocess
    cs = fake.connect()
    with pytest.raises(APIError) as err:
        cs.api.login(grant_type="password", username=fake.email, password=fake.password)  # plain text
    assert err.value.code == 401
    assert fake.handle("GET", "/api/cmd/projects/P1", [], {}, b"")[0] == 401
    assert fake.handle("GET", "/api/cmd/projects/P1", [], {"authorization": "Bearer nope"}, b"")[0] == 401
    assert fake.handle("GET", "/api/cmd/health", [], {}, b"")[0] == 200


def test_version_mismatch_warns_with_the_pip_command(cryosparc_inprocess):
    cryosparc_inprocess.version = "v4.7.1"
    with pytest.warns(UserWarning, match=r"pip install --force cryosparc-tools~=4\.7\.0"):
        cryosparc_inprocess.connect()


@pytest.mark.filterwarnings("ignore:.*API client")
def test_unreachable_server(cryosparc_inprocess):
    with pytest.raises(RuntimeError, match="Could not connect"):
        CryoSPARC(unused_url(), email="a@b.c", password="x", host=None, base_port=None)
    cryosparc_inprocess.reachable = False
    with pytest.raises(RuntimeError, match="Could not connect"):
        cryosparc_inprocess.connect()


@pytest.mark.filterwarnings("ignore:.*API client")
def test_unreachable_loopback_port(cryosparc_fake):
    with pytest.raises(RuntimeError, match="Could not connect"):
        cryosparc_fake.connect(base_url=unused_url())


def test_saved_login_token_is_accepted(cryosparc_inprocess):
    cryosparc_inprocess.write_saved_login()
    cs = CryoSPARC(cryosparc_inprocess.base_url, host=None, base_port=None)  # no email/password
    assert cs.find_project("P1").uid == "P1"


def test_cli_login_command_saves_a_working_token(cryosparc_inprocess, tmp_path, monkeypatch, capsys):
    from argparse import Namespace

    from cryosparc.auth import get_default_auth_config_path
    from cryosparc.cli import login

    isolate_client_config(monkeypatch, tmp_path / "fresh-config")
    fake = cryosparc_inprocess
    login(Namespace(url=fake.base_url, email=fake.email, password=fake.password, expires=None))
    assert "Success" in capsys.readouterr().out and get_default_auth_config_path().is_file()
    assert CryoSPARC(fake.base_url, host=None, base_port=None).find_project("P1").uid == "P1"


# ---- finding and reading --------------------------------------------------------------------


def test_find_project_workspace_and_jobs(fake):
    seed(fake)
    cs = fake.connect()
    project = cs.find_project("P1")
    assert str(project.dir) == fake.server_project_dir
    assert cs.find_workspace("P1", "W1").uid == "W1"
    job = project.find_job("J2")
    assert (job.type, job.status, list(job.outputs)) == ("select_2D", "completed", ["particles_selected"])
    assert str(job.dir) == f"{fake.server_project_dir}/J2"
    assert [j.uid for j in project.find_jobs(type="select_2D")] == ["J2"]
    assert cs.find_workspace("P1", "W1").find_job("J1").uid == "J1"
    with pytest.raises(TypeError):
        cs.find_external_job("P1", "J1")
    for call in (
        lambda: cs.find_job("P1", "J99"),
        lambda: cs.find_project("P7"),
        lambda: cs.find_workspace("P1", "W9"),
    ):
        with pytest.raises(APIError) as err:
            call()
        assert err.value.code == 404


def test_load_outputs_equal_the_seeded_datasets(fake):
    mics, parts = seed(fake)
    cs = fake.connect()
    assert_same_rows(cs.find_job("P1", "J1").load_output("exposures"), mics.dataset)
    particles = cs.find_job("P1", "J2").load_output("particles_selected")
    assert_same_rows(particles, parts.dataset)
    location = cs.find_job("P1", "J2").load_output("particles_selected", slots=["location"])
    assert location.prefixes() == ["location"]


def test_seeded_particles_are_pixel_fractions_without_flip(cryosparc_fake):
    mics, parts = seed(cryosparc_fake)
    loc = parts.dataset
    assert len(loc) == 3 and len(parts.coords[1]) == 0
    np.testing.assert_array_equal(loc["alignments3D/pose"][2], [6, 7, 8])
    for i, xy in CURATED.items():
        rows = loc.query({"location/micrograph_uid": [mics.dataset["uid"][i]]})
        ny, nx = SHAPES[i]
        assert np.all(rows["location/micrograph_shape"] == [ny, nx])
        np.testing.assert_allclose(rows["location/center_x_frac"] * nx, [p[0] for p in xy], atol=1e-3)
        np.testing.assert_allclose(rows["location/center_y_frac"] * ny, [p[1] for p in xy], atol=1e-3)


def test_passthrough_layout_joins_two_files(cryosparc_inprocess):
    mics, _ = seed(cryosparc_inprocess, passthrough_slots=["micrograph_blob"])
    job = cryosparc_inprocess.connect().find_job("P1", "J1")
    assert_same_rows(job.load_output("exposures"), mics.dataset)
    assert job.load_output("exposures", slots="default").prefixes() == ["ctf"]
    results = job.model.spec.outputs.root["exposures"].results
    assert {r.name: r.metafiles[0] for r in results} == {
        "ctf": "J1/J1_exposures.cs",
        "micrograph_blob": "J1/J1_passthrough_exposures.cs",
    }


def test_download_mrc_returns_the_seeded_pixels(fake):
    mics, _ = seed(fake)
    project = fake.connect().find_project("P1")
    for path, image in zip(mics.paths, mics.images):
        header, data = project.download_mrc(path)
        assert data.shape == (1, *image.shape)
        np.testing.assert_array_equal(data[0], image)
        assert header.xlen / header.nx == pytest.approx(1.5)
        np.testing.assert_array_equal(mrc.read(fake.project_dir / path)[1], data)  # same file on disk
    _, data = project.download_mrc(f"{fake.server_project_dir}/{mics.paths[0]}")  # absolute server path
    np.testing.assert_array_equal(data[0], mics.images[0])
    for bad, code in (("J1/none.mrc", 404), ("../outside.mrc", 403)):
        with pytest.raises(APIError) as err:
            project.download_mrc(bad)
        assert err.value.code == code


# ---- the External job flow ----------------------------------------------------------------------


def test_external_job_flow_ends_completed_with_the_saved_dataset_on_disk(fake):
    seed(fake)
    cs = fake.connect()
    job = picker_job(cs)
    with job.run():
        mics = job.load_input("micrographs")
        picks = fill_picks(job, mics, COORDS)
        job.log("picked", level="text")
        job.save_output("particles", picks)
    assert job.status == "completed" and fake.job(job.uid).status == "completed"
    flow = [s for s in fake.summaries() if s.startswith("jobs.") and s != "jobs.find_one"]
    assert flow[:8] == [
        "jobs.create", "jobs.add_external_input", "jobs.connect", "jobs.add_external_output",
        "jobs.mark_running", "jobs.load_input", "jobs.get_output_fields", "jobs.get_output_fields",
    ]  # fmt: skip
    assert flow[-3:] == ["jobs.add_event_log", "jobs.save_output", "jobs.mark_completed"]
    saved = Dataset.load(fake.project_dir / job.uid / "particles.cs")
    assert_same_rows(saved, picks)
    assert_same_rows(job.load_output("particles"), picks)
    assert_same_rows(fake.load_saved(job.uid, "particles"), picks)
    assert fake.job(job.uid).parents == ["J1"] and job.uid in fake.job("J1").children
    doc = json.loads((fake.project_dir / job.uid / "job.json").read_text())
    assert doc["status"] == "completed"
    assert {r["name"]: r["metafiles"] for r in doc["output_results"] if r["group_name"] == "particles"} == {
        "location": [f"{job.uid}/particles.cs"],
        "pick_stats": [f"{job.uid}/particles.cs"],
    }


def test_job_whose_body_raises_ends_failed_with_the_traceback(fake):
    seed(fake)
    job = picker_job(fake.connect())
    with pytest.raises(ValueError, match="no micrographs left"), job.run():
        raise ValueError("no micrographs left")
    model = fake.job(job.uid)
    assert model.status == "failed"
    assert "Traceback" in model.errors_run[-1].message and "no micrographs left" in model.errors_run[-1].message
    assert any(e.type == "error" and "no micrographs left" in e.text for e in fake.events(job.uid))


def test_save_output_only_while_running(cryosparc_inprocess):
    seed(cryosparc_inprocess)
    job = picker_job(cryosparc_inprocess.connect())
    picks = job.alloc_output("particles", 3)
    for step in ("building", "completed"):
        if step == "completed":
            with job.run():
                pass
        with pytest.raises(APIError) as err:
            job.save_output("particles", picks)
        assert err.value.code == 409 and "running or waiting" in str(err.value)


def test_no_new_inputs_or_outputs_after_completion(cryosparc_inprocess):
    seed(cryosparc_inprocess)
    job = picker_job(cryosparc_inprocess.connect())
    with job.run():
        pass
    for call in (
        lambda: job.add_output("particle", "more", slots=["location"]),
        lambda: job.add_input("particle", "extra", slots=["location"]),
        lambda: job.connect("particles_in", "J2", "particles_selected", slots=["location"]),
    ):
        with pytest.raises(APIError) as err:
            call()
        assert err.value.code == 409


def test_saved_dataset_is_checked_against_the_announced_fields(cryosparc_inprocess):
    seed(cryosparc_inprocess)
    job = picker_job(cryosparc_inprocess.connect())
    with job.run():
        picks = job.alloc_output("particles", 4)
        cases = {
            "pick_stats/power": picks.copy().drop_fields(["pick_stats/power"]),
            "wrong type": Dataset({**{f: picks[f] for f in picks.fields()}, "location/center_x_frac": np.zeros(4)}),
            "blob": picks.copy().add_fields([("blob/path", "O")]),
        }
        for expected, dset in cases.items():
            with pytest.raises(APIError) as err:
                job.save_output("particles", dset)
            assert err.value.code == 422 and expected in str(err.value)
        job.save_output("particles", picks)  # the allocated dataset itself is accepted
        # strict (the default): a field the output does not declare is refused, naming it
        with pytest.raises(APIError) as err:
            job.save_output("particles", picks.copy().add_fields([("location/min_dist_A", "f4")]))
        assert err.value.code == 422 and "location/min_dist_A" in str(err.value)
        # the lenient fake of before kept it
        cryosparc_inprocess.strict = False
        job.save_output("particles", picks.copy().add_fields([("location/min_dist_A", "f4")]))
    assert "location/min_dist_A" in cryosparc_inprocess.load_saved(job.uid, "particles").fields()


def test_strict_connections_are_typed(cryosparc_inprocess):
    """A volume output's results are "blob"s: an input slot typed by the slot's name ("map") is an unknown type,
    and a slot of another known type does not take a blob result."""
    from cryosparc.dataset import Dataset as DS

    fake = cryosparc_inprocess
    seed(fake)
    dset = DS.allocate(1, [("map/path", "O"), ("map/psize_A", "<f4")])
    vol = fake.seed_output_job(dset, output_name="volume", type="volume", job_type="homo_refine_new")
    assert [r.dtype for r in fake.job(vol.uid).spec.outputs.root["volume"].results] == ["blob"]
    job = picker_job(fake.connect())
    with pytest.raises(APIError) as err:
        job.connect("ref", vol.uid, "volume", slots=["map"])
    assert err.value.code == 422 and "unknown slot type" in str(err.value)
    with pytest.raises(APIError) as err:
        job.connect("ref2", vol.uid, "volume", slots=[{"name": "map", "dtype": "location"}])
    assert err.value.code == 422 and "lacks required slot" in str(err.value)
    assert job.connect("ref3", vol.uid, "volume", slots=[{"name": "map", "dtype": "blob"}])


def test_output_fields_are_the_v4_minimum_and_configurable(cryosparc_inprocess):
    seed(cryosparc_inprocess)
    job = picker_job(cryosparc_inprocess.connect())
    fields = job.alloc_output("particles", 0).fields()
    assert fields == ["uid", "location/micrograph_uid", "location/exp_group_id", "location/micrograph_path",
                      "location/micrograph_shape", "location/center_x_frac", "location/center_y_frac",
                      "pick_stats/ncc_score", "pick_stats/power", "pick_stats/template_idx",
                      "pick_stats/angle_rad"]  # fmt: skip
    cryosparc_inprocess.output_fields["location"].append(("micrograph_psize_A", "f4"))
    assert "location/micrograph_psize_A" in job.alloc_output("particles", 0).fields()
    with pytest.raises(APIError) as err:
        job.add_output("particle", "typo", slots=["locations"])
    assert err.value.code == 422


def test_connect_needs_the_requested_slots(cryosparc_inprocess):
    seed(cryosparc_inprocess)
    job = cryosparc_inprocess.connect().find_project("P1").create_external_job("W1")
    with pytest.raises(APIError) as err:
        job.connect("particles_in", "J2", "particles_selected", slots=["location", "ctf"])
    assert err.value.code == 422 and "ctf" in str(err.value)
    job.connect("particles_in2", "J2", "particles_selected", slots=["location", "?ctf"])
    assert job.load_input("particles_in2", slots=["location"]).prefixes() == ["location"]
    with pytest.raises(APIError) as err:
        job.connect("particles_in2", "J1", "exposures")  # exposures into a particle input
    assert err.value.code == 422


def test_mark_running_only_on_external_jobs_with_connected_inputs(cryosparc_inprocess):
    seed(cryosparc_inprocess)
    cs = cryosparc_inprocess.connect()
    with pytest.raises(APIError) as err:
        cs.api.jobs.mark_running("P1", "J1", status="running")
    assert err.value.code == 422
    job = cs.find_project("P1").create_external_job("W1")
    job.add_input("exposure", "micrographs", min=1, slots=["micrograph_blob"])
    with pytest.raises(APIError) as err:
        job.load_input("micrographs")
    assert err.value.code == 422 and "no connections" in str(err.value)
    with pytest.raises(APIError) as err:
        job.start("running")
    assert err.value.code == 422


def test_only_external_jobs_can_be_created(cryosparc_inprocess):
    cs = cryosparc_inprocess.connect()
    job = cs.find_project("P1").create_external_job("W1", title="t")
    assert (job.status, job.type) == ("building", "snowflake")
    with pytest.raises(APIError) as err:
        cs.create_job("P1", "W1", "homo_abinit")
    assert err.value.code == 422


def test_event_log_name_updates_in_place(cryosparc_inprocess):
    seed(cryosparc_inprocess)
    job = picker_job(cryosparc_inprocess.connect())
    first = job.log("micrograph 1/2", name="progress")
    second = job.log("micrograph 2/2", name="progress")
    job.log("skipped one", level="warning")
    assert first == second
    assert cryosparc_inprocess.event_texts(job.uid) == ["micrograph 2/2", "skipped one"]
    assert [e.type for e in cryosparc_inprocess.events(job.uid)] == ["text", "warning"]
    with pytest.raises(APIError) as err:
        job.log("x", id="0123456789abcdef01234567")
    assert err.value.code == 404


def test_log_plot_uploads_matplotlib_figures(cryosparc_inprocess):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed(cryosparc_inprocess)
    job = picker_job(cryosparc_inprocess.connect())
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.hist([0.1, 0.5, 0.5, 0.9])
    job.log_plot(fig, "Score histogram")
    plt.close(fig)
    event = cryosparc_inprocess.events(job.uid)[-1]
    assert (event.type, event.text) == ("image", "Score histogram")
    blobs = [cryosparc_inprocess.assets[a.fileid].data for a in event.imgfiles]
    assert blobs[0].startswith(b"\x89PNG") and blobs[1].startswith(b"%PDF")
    assert [a.filetype for a in event.imgfiles] == ["image/png", "application/pdf"]


def test_job_json_in_both_layouts(cryosparc_inprocess):
    fake = cryosparc_inprocess
    seed(fake)
    v4 = json.loads((fake.project_dir / "J2" / "job.json").read_text())
    result = next(r for r in v4["output_results"] if r["name"] == "location")
    assert (result["group_name"], result["metafiles"], result["passthrough"]) == (
        "particles_selected", ["J2/J2_particles_selected.cs"], False,
    )  # fmt: skip
    assert ["center_x_frac", "f4"] in result["min_fields"]
    v5 = json.loads(fake.write_job_json("J2", layout="v5").read_text())
    results = v5["spec"]["outputs"]["particles_selected"]["results"]
    assert {r["name"] for r in results} == {"location", "alignments3D"}
    assert all(r["metafiles"] == ["J2/J2_particles_selected.cs"] for r in results)


def test_injected_failure_ends_the_job_failed(cryosparc_inprocess):
    seed(cryosparc_inprocess)
    job = picker_job(cryosparc_inprocess.connect())
    cryosparc_inprocess.fail_next("jobs.save_output", 500, "disk full")
    with pytest.raises(APIError), job.run():
        job.save_output("particles", job.alloc_output("particles", 1))
    assert cryosparc_inprocess.job(job.uid).status == "failed"


def test_server_project_dir_may_differ_from_the_local_mount(tmp_path, monkeypatch):
    isolate_client_config(monkeypatch, tmp_path / "xdg")
    fake = FakeCryoSPARC(tmp_path / "local-mount", server_project_dir="/cryosparc/projects/CS-test")
    mics = fake.seed_exposures([(32, 48)])
    with fake.in_process():
        project = fake.connect().find_project("P1")
        assert str(project.dir) == "/cryosparc/projects/CS-test"
        _, data = project.download_mrc(f"/cryosparc/projects/CS-test/{mics.paths[0]}")
    np.testing.assert_array_equal(data[0], mics.images[0])


def test_loopback_serves_a_client_in_another_process(cryosparc_loopback, tmp_path):
    seed(cryosparc_loopback)
    script = (
        "import sys; from cryosparc.tools import CryoSPARC; "
        "cs = CryoSPARC(sys.argv[1], email=sys.argv[2], password=sys.argv[3], host=None, base_port=None); "
        "job = cs.find_job('P1', 'J2'); print(job.status, len(job.load_output('particles_selected')))"
    )
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg-child")}
    done = subprocess.run(
        [sys.executable, "-c", script, cryosparc_loopback.base_url, cryosparc_loopback.email,
         cryosparc_loopback.password],
        check=False, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["completed", "3"]
    assert ("GET", "jobs.load_output") in cryosparc_loopback.calls
