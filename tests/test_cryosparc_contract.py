"""Every request the live adapter makes is an operation of the installed cryosparc-tools' API (its shipped
``api.pyi``), with query parameters that operation takes: an upgrade that moves an endpoint or renames a parameter
fails here rather than in a user's job."""

from __future__ import annotations

import ast
from pathlib import Path

import cryosparc
from cryosparc_scene import DIAMETER_A, TINY, seed_scene  # noqa: F401
from fakes.cryosparc_server import cryosparc_fake, cryosparc_inprocess, cryosparc_loopback  # noqa: F401


def shipped_api() -> dict[str, dict[str, set[str]]]:
    """``{namespace: {operation: parameter names}}`` from the client's api.pyi (``api.jobs.create`` ...)."""
    tree = ast.parse((Path(cryosparc.__file__).parent / "api.pyi").read_text())
    out: dict[str, dict[str, set[str]]] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and (n.name.endswith("API")
                                                                        or n.name == "APIClient")):
        doc = ast.get_docstring(cls) or ""
        marker = "" if cls.name == "APIClient" else (
            doc.split("``api.", 1)[1].split("``", 1)[0].split(".")[0] if "``api." in doc else None)
        if marker is None:
            continue
        ops = out.setdefault(marker, {})
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")):
            a = fn.args
            ops[fn.name] = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} - {"self"}
    return out


def test_the_shipped_api_is_read():
    api = shipped_api()
    assert {"create", "connect", "save_output", "mark_failed"} <= set(api["jobs"])
    assert "upload" in api["assets"]


def test_every_request_of_a_live_run_is_in_the_shipped_api(cryosparc_inprocess, tmp_path, monkeypatch):
    from test_cryosparc_reference import seed_volume

    from cryosparc_job.live import run_live

    monkeypatch.chdir(tmp_path)
    fake = cryosparc_inprocess
    seed_scene(fake, poses=True)
    vol = seed_volume(fake)
    run_live(fake.base_url, "P1", "W1", particles=("J2", "particles_selected"), exposures=("J1", "exposures"),
             config=TINY, email=fake.email, password=fake.password, work_dir=tmp_path / "work",
             diameter_A=DIAMETER_A, mask=f"{vol}:volume")
    api = shipped_api()
    seen = set()
    for req in fake.requests:
        if req.summary in (None, "openapi.json"):
            continue
        namespace, _, op = req.summary.rpartition(".")  # "login" is the client's own: namespace ""
        assert namespace in api and op in api[namespace], f"{req.summary} is not in cryosparc-tools' api.pyi"
        unknown = set(req.query) - api[namespace][op]
        assert not unknown, f"{req.summary}: query parameter(s) {sorted(unknown)} not in api.pyi"
        seen.add(req.summary)
    # the run used the operations that matter
    assert {"jobs.create", "jobs.connect", "jobs.save_output", "jobs.mark_completed", "assets.upload",
            "jobs.add_image_log"} <= seen


def test_record_fixtures_reads_an_instance_and_the_fake_takes_the_recording(cryosparc_loopback, tmp_path, capsys):
    """The recorder against the fake over loopback (read-only: no request changes anything), then a new fake
    built from the recording declares the same fields and version."""
    from fakes.cryosparc_server import FakeCryoSPARC

    from cryosparc_job.cli import main as cs_main

    fake = cryosparc_loopback
    fake.output_fields["location"] = fake.output_fields["location"] + [("min_dist_A", "f4")]
    seed_scene(fake)
    fake.write_job_json("J2")
    before = len(fake.jobs)
    out = tmp_path / "recorded"
    rc = cs_main(["record-fixtures", "--url", fake.base_url, "--email", fake.email, "--password", fake.password,
                  "--project", "P1", "--particles", "J2:particles_selected", "--exposures", "J1:exposures",
                  "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"version.json", "output_fields_particles.json", "output_fields_exposures.json", "job_J2.json"} <= names
    assert len(fake.jobs) == before
    writes = [r.summary for r in fake.requests if r.summary and r.summary.split(".")[-1].startswith(
        ("create", "save", "mark", "add", "update", "connect", "upload"))]
    assert writes == []  # read-only
    fresh = FakeCryoSPARC(tmp_path / "other")
    fresh.load_recording(out)
    assert ("min_dist_A", "f4") in fresh.output_fields["location"] and fresh.version == fake.version
