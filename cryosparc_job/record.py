"""``crisp-cryosparc record-fixtures``: dump, read-only, the shapes of a real cryoSPARC instance that the tests' fake
server otherwise guesses, so that a facility can send them back and the fake can be checked against them.

Written to ``OUT/``: ``version.json`` (the server's version and the client's), ``openapi.json`` (when the server
publishes it), ``output_fields_particles.json`` and ``output_fields_exposures.json`` (the fields the server declares
for those outputs: ``get_output_fields``), ``job_<J>.json`` (the jobs' own ``job.json``), and the particles job's
exported ``.csg`` when there is one. Nothing on the instance is created or changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from crisp_ext.io.atomic import atomic_write_text

from .lookup import Source


def record_fixtures(cs, project_uid: str, out: str | Path, *, particles: str, exposures: str,
                    base_url: str | None = None, say=print) -> list[Path]:
    """Record what the module docstring lists from the instance ``cs`` (a connected ``CryoSPARC``); returns the
    files written."""
    import io

    from cryosparc.errors import APIError

    from .connect import tools_version

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write(name: str, value) -> None:
        path = atomic_write_text(out / name, json.dumps(value, indent=1, default=str) + "\n")
        written.append(path)
        say(f"wrote {path}")

    write("version.json", {"server": cs.api.config.get_version(), "cryosparc_tools": tools_version()})
    try:
        import httpx

        res = httpx.get(str(base_url).rstrip("/") + "/api/openapi.json", timeout=30) if base_url else None
        if res is not None and res.status_code == 200:
            write("openapi.json", res.json())
        else:
            say("openapi.json not recorded (no answer at /api/openapi.json)")
    except Exception as exc:  # noqa: BLE001 - optional
        say(f"openapi.json not recorded ({type(exc).__name__})")
    project = cs.find_project(project_uid)
    for kind, spec in (("particles", particles), ("exposures", exposures)):
        src = Source.parse(spec)
        if src.output is None:
            raise ValueError(f"give {kind} as JOB:OUTPUT (e.g. J12:particles_selected)")
        fields = cs.api.jobs.get_output_fields(project_uid, src.job, src.output)
        write(f"output_fields_{kind}.json", {"job": src.job, "output": src.output,
                                             "fields": [list(f) for f in fields]})
        buffer = io.BytesIO()
        try:
            project.download_file(f"{src.job}/job.json", buffer)
            write(f"job_{src.job}.json", json.loads(buffer.getvalue()))
        except (APIError, ValueError) as exc:
            say(f"{src.job}/job.json not recorded ({type(exc).__name__})")
        if kind == "particles":
            for name in (f"{src.job}/{src.job}_{src.output}.csg", f"{src.job}/{src.output}.csg"):
                buffer = io.BytesIO()
                try:
                    project.download_file(name, buffer)
                except APIError:
                    continue
                path = out / Path(name).name
                path.write_bytes(buffer.getvalue())
                written.append(path)
                say(f"wrote {path}")
                break
    return written
