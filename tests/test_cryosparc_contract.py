"""Every request the live adapter makes is an operation of the installed cryosparc-tools' API (its shipped
``api.pyi``), with query parameters that operation takes: an upgrade that moves an endpoint or renames a parameter
fails here rather than in a user's job."""

from __future__ import annotations

import ast
from pathlib import Path

import cryosparc
from cryosparc_scene import DIAMETER_A, TINY, seed_scene  # noqa: F401
from fakes.cryosparc_server import cryosparc_fake, cryosparc_inprocess  # noqa: F401 (fixtures)


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
