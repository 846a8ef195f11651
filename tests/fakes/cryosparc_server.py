"""A fake CryoSPARC v5 HTTP API for tests, driven by the real cryosparc-tools 5.0.x client.

It publishes ``/api/cmd/openapi.json`` with the operations a picker uses (see
``fakes.cryosparc_openapi.OPERATIONS``), keeps projects/workspaces/jobs/events as real
``cryosparc.models`` objects, enforces the server rules below, and mirrors every job to a real
project directory on disk (``J#/job.json``, ``.cs`` files, micrograph MRCs).

Start it
    fake = FakeCryoSPARC(tmp_path / "CS-proj")   # P1, W1; user ali@example.com / "password123"
        # server_project_dir="/srv/CS-proj" makes the server report another path than the local
        # one (prefix remap); job_json_layout="v5" writes job.json in the v5 layout.
    with fake.in_process():        # httpx.MockTransport; patches cryosparc.tools.APIClient
        cs = fake.connect()        # = CryoSPARC(fake.base_url, email=, password=, host=None, base_port=None)
    with fake.serve() as url:      # ThreadingHTTPServer on http://127.0.0.1:<free port>, no patching
        subprocess.run([..., url])
    Fixtures (import them into a test module): ``cryosparc_fake`` (fake + XDG_CONFIG_HOME in
    tmp), ``cryosparc_inprocess``, ``cryosparc_loopback``. ``isolate_client_config(monkeypatch,
    dir)`` does the XDG part alone. ``fake.write_saved_login()`` stores a token as
    ``python -m cryosparc.tools login`` would. ``fake.handle(method, path, query, headers, body)``
    serves one raw request (e.g. to check a 401).

Seed data (returns ``SeededJob(uid, output, dataset, images, paths, coords)``)
    mics = fake.seed_exposures([(64, 96), (96, 64)], psize_A=1.5, ctf={"df1_A": [1e4, 2e4]})
        -> J1 "exposures" (micrograph_blob + ctf) in J1/J1_exposures.cs; MRCs (float32, written by
           cryosparc.mrc.write) at J1/motioncorrected/<uid>_mic_000_patch_aligned_doseweighted.mrc;
           or images=[arrays]; exp_group_id=, with_ctf=False, write_mrc=False, names=.
    parts = fake.seed_particles(mics, [[(10.5, 20)], [(30, 40), (5, 6)]], poses=np.zeros((3, 3)))
        -> J2 "particles_selected": location (v4 minimum + micrograph_psize_A, min_dist_A)
           [+ alignments3D]; coords are pixel (x = column, y = row) per exposure row, or
           {row: coords} for a subset; stored as center_x_frac = x / nx, center_y_frac = y / ny.
    fake.seed_output_job(dataset, output_name=..., type=..., job_type=...)  # any dataset
    fake.add_workspace(title="Picking")  -> "W2"
    ``passthrough_slots=`` puts those slots in a ``J#/J#_passthrough_<output>.cs`` file instead.

Inspect
    fake.job("J3") (a copy of the ``Job`` model), fake.jobs, fake.events("J3"),
    fake.event_texts("J3"), fake.assets {fileid: StoredAsset(data=bytes, ...)}, fake.requests
    [RecordedRequest(method, summary, path, query, status)], fake.calls [(METHOD, summary)]
    (discovery is ("GET", "openapi.json")), fake.summaries(), fake.project_dir,
    fake.load_saved("J3", "particles") (read from disk), fake.write_job_json("J1", layout="v5").
    save_output writes J#/<output>.cs (numpy format; ``filename=`` overrides) and, for an output
    with ``passthrough=<input>``, J#/J#_passthrough_<output>.cs with that input's other slots.

Scenarios
    fake.version = "v4.7.1" (client warns); fake.reachable = False (in-process connection
    refused); unused_url() (loopback URL where nothing listens); wrong password -> 401;
    fake.fail_next("jobs.save_output", 500, "disk full"); fake.output_fields["location"]
    (slot dtype -> [(field, "f4" | "2u4" | "O" ...)] for get_output_fields; v4 minimum by default).

Rules enforced (answers are JSON ``{"detail": ...}`` with a declared status, which the client
raises as ``cryosparc.errors.APIError`` with ``.code``):
    401 without a valid bearer token (all but health/login); login only with sha256-hex password.
    jobs.create only type "snowflake" (422 otherwise), status "building".
    add_external_input/output and connect only while building/running/waiting (409), only
    on External jobs for add_*; names must match ^[A-Za-z][0-9A-Za-z_]*$ (422); output slot
    dtypes must be in ``output_fields`` (422).
    connect: source job/output must exist (404), same type (422), with every required input
    slot (422), count_max respected (422).
    mark_running only on External jobs (422), from building/running/waiting (409), and only when
    every input has count_min connections (422). mark_completed only from running/waiting (or
    failed/killed) (409). mark_failed stores the error (errors_run + an "error" event).
    save_output only while running/waiting (409); dataset must hold every announced field with
    its dtype, and no slot the output does not declare (422). load_input 422 with no
    connection; load_output 404 for a missing output, 422 when it has no saved data.
    load_output/load_input slots: "default" = non-passthrough, "passthrough", "all", or names.
    update_event_log edits the event in place (404 for an unknown id).

Strict mode (``strict=True``, the default in the tests), each rule marked by where it comes from:
    - results are typed: every slot of a volume/mask output is a "blob" result [observed: the client's own
      test fixtures model a map as OutputResult(name="map", dtype="blob")]; exposure/particle results are
      typed by their slot name (micrograph_blob, ctf, location, pick_stats, alignments3D) [observed: the
      client's SlotSpec docstring, cryosparc/spec.py: a string slot is "<slot>" of the known type "<slot>"];
    - add_external_input refuses a slot type it does not know (422) [guessed: the message and code];
    - connect takes a result only into a slot of the same type (a required slot left empty: 422)
      [observed: slots are {"name", "dtype"} pairs, cryosparc/spec.py Slot; the 422 is guessed];
    - save_output refuses fields the output does not declare, naming them (422), as it refuses missing ones
      [guessed: the real server is known to 422 on missing required fields; undeclared ones are unknown,
      so the adapter writes exactly the declared fields in live mode];
    - status changes: mark_running only from building/running/waiting (a failed or completed job must be
      cleared first), mark_completed only from running/waiting, or failed/killed (409) [observed: the job
      states in the client's models; the codes and the failed -> completed allowance guessed].
    ``strict=False`` keeps the lenient behaviour of before (names matched without types, extra fields kept).

Guessed, not observed on a real v5 server: URL paths, status codes and messages of errors,
extra fields inside a declared slot being kept while undeclared slots are refused, dtype
checking on save, the count_min check at start, save file names, the v5 job.json layout.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import secrets
import socket
import threading
import urllib.parse
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any, get_args
from unittest import mock

import httpx
import numpy as np
import pytest
from cryosparc import mrc
from cryosparc.dataset import Dataset
from cryosparc.errors import DatasetLoadError
from cryosparc.models.asset import GridFSAsset
from cryosparc.models.auth import Token
from cryosparc.models.event import CheckpointEvent, ImageEvent, TextEvent
from cryosparc.models.job import Job, JobStatus, RunError, UiTileImage
from cryosparc.models.job_spec import (
    Connection,
    Input,
    InputResult,
    InputSlot,
    InputSpec,
    Output,
    OutputResult,
    OutputSlot,
    OutputSpec,
)
from cryosparc.models.project import Project
from cryosparc.models.user import User
from cryosparc.models.workspace import Workspace
from cryosparc.spec import ASSET_CONTENT_TYPES
from pydantic import BaseModel, ValidationError

from fakes.cryosparc_data import (
    SLOT_FIELDS,
    exposures_dataset,
    particles_dataset,
    prefix_of,
    same_dtype,
    write_job_json,
)
from fakes.cryosparc_openapi import API_PREFIX, OPERATIONS, OPERATIONS_BY_SUMMARY, Operation, openapi_document

EDITABLE = ("building", "running", "waiting")
NAME_PATTERN = re.compile(r"^[A-Za-z][0-9A-Za-z_]*$")
STATUS_NUM = {status: i for i, status in enumerate(get_args(JobStatus))}
DEFAULT_OUTPUT_FIELDS = {dtype: list(fields) for dtype, fields in SLOT_FIELDS.items()}


class FakeAPIError(Exception):
    """An HTTP error answer: ``status`` and the ``detail`` text."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class RecordedRequest:
    method: str
    summary: str | None
    path: str
    query: dict[str, list[str]]
    status: int = 0


@dataclass
class StoredAsset:
    fileid: str
    filename: str
    filetype: str
    job_uid: str
    data: bytes


@dataclass
class SeededJob:
    """A job seeded into the fake: its uid, output name and the dataset it holds."""

    uid: str
    output: str
    dataset: Dataset
    images: list = field(default_factory=list)  # exposures: float32 (ny, nx) arrays, row order
    paths: list = field(default_factory=list)  # exposures: micrograph_blob/path per row
    coords: list = field(default_factory=list)  # particles: (n, 2) pixel (x, y) per exposure


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _oid() -> str:
    return secrets.token_hex(12)


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


def _title(name: str) -> str:
    return name.replace("_", " ").capitalize()


class FakeCryoSPARC:
    """In-memory CryoSPARC v5 instance with one project mirrored to ``project_dir``."""

    def __init__(
        self,
        project_dir: Path | str,
        *,
        email: str = "ali@example.com",
        password: str = "password123",
        version: str = "v5.0.3",
        project_uid: str = "P1",
        project_title: str = "Test project",
        workspace_uid: str = "W1",
        server_project_dir: str | None = None,
        job_json_layout: str = "v4",
        inprocess_url: str = "http://cryosparc.test:39000",
        strict: bool = True,
    ):
        # strict (the default in the tests): typed results and typed connections, as a real server (see the rules)
        self.strict = strict
        self.project_dir = Path(project_dir)
        self.project_dir.mkdir(parents=True, exist_ok=True)
        # What the server reports as the project directory (may differ from the local mount).
        self.server_project_dir = server_project_dir or str(self.project_dir.resolve())
        self.email = email
        self.password = password
        self.version = version
        self.reachable = True
        self.job_json_layout = job_json_layout
        self.inprocess_url = inprocess_url
        self.output_fields: dict[str, list[tuple[str, str]]] = {k: list(v) for k, v in DEFAULT_OUTPUT_FIELDS.items()}
        self.requests: list[RecordedRequest] = []
        self.assets: dict[str, StoredAsset] = {}
        self._tokens: set[str] = set()
        self._faults: dict[str, deque] = defaultdict(deque)
        self._events: dict[str, list] = defaultdict(list)
        self._jobs: dict[str, Job] = {}
        self._workspaces: dict[str, Workspace] = {}
        self._lock = threading.RLock()
        self._loopback_url: str | None = None
        now = _now()
        self.user = User.model_validate(
            {
                "_id": _oid(),
                "name": email.split("@")[0],
                "first_name": "Ali",
                "last_name": "Tester",
                "emails": [{"address": email, "verified": True}],
                "created_at": now,
            }
        )
        self.project = Project.model_validate(
            {
                "_id": _oid(),
                "uid": project_uid,
                "uid_num": int(project_uid[1:]),
                "project_dir": self.server_project_dir,
                "owner_user_id": self.user.id,
                "title": project_title,
                "size_last_updated": now,
                "created_at": now,
            }
        )
        (self.project_dir / "project.json").write_text(json.dumps(_dump(self.project), indent=2))
        self.add_workspace(workspace_uid, title="Workspace")

    # ---- connecting ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """URL to give ``CryoSPARC(...)``: the loopback URL while serving, else the in-process one."""
        return self._loopback_url or self.inprocess_url

    def connect(self, *, email: str | None = None, password: str | None = None, **kwargs):
        """A real ``cryosparc.tools.CryoSPARC`` for this fake (call inside in_process()/serve())."""
        from cryosparc.tools import CryoSPARC

        return CryoSPARC(
            kwargs.pop("base_url", self.base_url),
            email=self.email if email is None else email,
            password=self.password if password is None else password,
            host=None,
            base_port=None,
            **kwargs,
        )

    @contextmanager
    def in_process(self) -> Iterator[FakeCryoSPARC]:
        """Route every ``CryoSPARC(...)`` created inside the block to this fake via httpx.MockTransport."""
        import cryosparc.cli  # noqa: F401 (patched below)
        from cryosparc.api import APIClient

        transport = httpx.MockTransport(self._handle_httpx)

        def make_client(base_url=None, *, auth=None, headers=None, timeout=300, http_client=None):
            if http_client is None:
                http_client = httpx.Client(base_url=base_url, transport=transport, timeout=timeout)
            return APIClient(auth=auth, headers=headers, http_client=http_client)

        # tools.CryoSPARC and the ``python -m cryosparc.tools login`` command build their clients here.
        with mock.patch("cryosparc.tools.APIClient", make_client), mock.patch("cryosparc.cli.APIClient", make_client):
            yield self

    @contextmanager
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Serve on loopback in a background thread; yields the base URL."""
        server = _LoopbackServer((host, port), _LoopbackHandler)
        server.fake = self
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        self._loopback_url = f"http://{host}:{server.server_port}"
        try:
            yield self._loopback_url
        finally:
            self._loopback_url = None
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    def issue_token(self) -> Token:
        token = Token(access_token=secrets.token_hex(16), token_type="bearer")
        self._tokens.add(token.access_token)
        return token

    def write_saved_login(self, url: str | None = None, email: str | None = None, days: float = 14) -> Token:
        """Store a fresh token where ``python -m cryosparc.tools login`` would ($XDG_CONFIG_HOME)."""
        from cryosparc.auth import InstanceAuthSessions

        token = self.issue_token()
        sessions = InstanceAuthSessions.load()
        sessions.insert(url or self.base_url, email or self.email, token, _now() + timedelta(days=days))
        sessions.save()
        return token

    # ---- scenarios and inspection ------------------------------------------------------------

    def fail_next(self, summary: str, status: int = 500, detail: str = "injected failure") -> None:
        """Answer the next call of operation ``summary`` with ``status``/``detail``."""
        if summary not in OPERATIONS_BY_SUMMARY:
            raise ValueError(f"unknown operation {summary!r}; published: {sorted(OPERATIONS_BY_SUMMARY)}")
        self._faults[summary].append((status, detail))

    @property
    def calls(self) -> list[tuple[str, str | None]]:
        return [(r.method, r.summary) for r in self.requests]

    def summaries(self) -> list[str | None]:
        """Operation summaries called so far, without the openapi.json discovery requests."""
        return [r.summary for r in self.requests if r.summary != "openapi.json"]

    @property
    def jobs(self) -> list[str]:
        return list(self._jobs)

    def job(self, job_uid: str) -> Job:
        return self._jobs[job_uid].model_copy(deep=True)

    def events(self, job_uid: str) -> list:
        return [e.model_copy(deep=True) for e in self._events[job_uid]]

    def event_texts(self, job_uid: str) -> list[str]:
        return [e.text for e in self._events[job_uid] if hasattr(e, "text")]

    def load_saved(self, job_uid: str, output_name: str, slots: Any = "all") -> Dataset:
        """Read an output back from the project directory (the files the server wrote)."""
        job = self._jobs[job_uid]
        output = job.spec.outputs.root[output_name]
        return self._load_results(job, output_name, self._select(output.results, slots), "F")

    def write_job_json(self, job_uid: str, layout: str | None = None) -> Path:
        return write_job_json(self.project_dir, self._jobs[job_uid], layout or self.job_json_layout)

    # ---- seeding ------------------------------------------------------------------------------

    def add_workspace(self, uid: str | None = None, *, title: str = "") -> str:
        num = int(uid[1:]) if uid else max((w.uid_num for w in self._workspaces.values()), default=0) + 1
        uid = uid or f"W{num}"
        self._workspaces[uid] = Workspace.model_validate(
            {
                "_id": _oid(),
                "uid": uid,
                "uid_num": num,
                "project_uid": self.project.uid,
                "project_uid_num": self.project.uid_num,
                "workspace_type": "base",
                "title": title or f"Workspace {num}",
                "created_at": _now(),
            }
        )
        return uid

    def seed_output_job(
        self,
        dataset: Dataset,
        *,
        output_name: str,
        type: str,
        job_type: str,
        title: str = "",
        workspace_uid: str = "W1",
        passthrough_slots: Sequence[str] = (),
        parents: Sequence[str] = (),
        job_uid: str | None = None,
        slot_dtypes: Mapping[str, str] | None = None,
    ) -> SeededJob:
        """A completed job whose output ``output_name`` holds ``dataset`` (slots = its prefixes). Each result's
        dtype: ``slot_dtypes[slot]``, else ``blob`` for every slot of a ``volume``/``mask`` output (as the client's
        own fixtures type a map: ``OutputResult(name="map", dtype="blob")``), else the slot's name."""
        def dtype_of(slot: str) -> str:
            if slot_dtypes and slot in slot_dtypes:
                return slot_dtypes[slot]
            return "blob" if type in ("volume", "mask") and self.strict else slot

        job = self._jobs[job_uid] if job_uid else self._create_job(job_type, workspace_uid, title, "", "completed")
        slots = dataset.prefixes()
        unknown = set(passthrough_slots) - set(slots)
        if unknown:
            raise ValueError(f"passthrough_slots {sorted(unknown)} are not in the dataset ({slots})")
        results = []
        n = len(dataset)
        for passthrough in (False, True):
            group = [s for s in slots if (s in passthrough_slots) == passthrough]
            if not group:
                continue
            kind = "passthrough_" if passthrough else ""
            rel = f"{job.job_dir}/{job.uid}_{kind}{output_name}.cs"
            dataset.filter_prefixes(group, copy=True).save(self._local(rel))
            for slot in group:
                results.append(
                    OutputResult(
                        name=slot, dtype=dtype_of(slot), versions=[0], metafiles=[rel], num_items=[n],
                        passthrough=passthrough,
                    )
                )
        job.spec.outputs.root[output_name] = Output(
            type=type,
            title=_title(output_name),
            slots=[OutputSlot(name=s, dtype=dtype_of(s)) for s in slots],
            results=results,
            num_items=n,
        )
        for parent in parents:
            self._link(parent, job.uid)
        self._touch(job)
        return SeededJob(job.uid, output_name, dataset)

    def seed_exposures(
        self,
        shapes: Sequence[tuple[int, int]] | None = None,
        *,
        images: Sequence[np.ndarray] | None = None,
        psize_A: float | Sequence[float] = 1.0,
        ctf: Mapping[str, Any] | None = None,
        exp_group_id: int | Sequence[int] = 1,
        with_ctf: bool = True,
        names: Sequence[str] | None = None,
        write_mrc: bool = True,
        output_name: str = "exposures",
        job_type: str = "patch_ctf_estimation_multi",
        title: str = "Patch CTF Estimation",
        workspace_uid: str = "W1",
        passthrough_slots: Sequence[str] = (),
        mrc_dir: str = "motioncorrected",
        seed: int = 0,
    ) -> SeededJob:
        """Exposures (micrograph_blob [+ ctf]) with MRCs written by ``cryosparc.mrc.write``.

        Give ``shapes`` [(ny, nx), ...] for random float32 images, or the ``images`` themselves.
        """
        rng = np.random.default_rng((seed, len(self._jobs)))  # reproducible, distinct uids per job
        if images is None:
            if shapes is None:
                raise ValueError("give shapes=[(ny, nx), ...] or images=[array, ...]")
            images = [rng.normal(size=tuple(s)).astype(np.float32) for s in shapes]
        images = [np.asarray(im, dtype=np.float32) for im in images]
        if any(im.ndim != 2 for im in images):
            raise ValueError("each micrograph image must be a 2-D (ny, nx) array")
        n = len(images)
        names = list(names) if names is not None else [f"mic_{i:03d}" for i in range(n)]
        uids = rng.integers(1, 2**63, size=n, dtype=np.uint64)
        job = self._create_job(job_type, workspace_uid, title, "", "completed")
        paths = [
            f"{job.job_dir}/{mrc_dir}/{int(uid):021d}_{name}_patch_aligned_doseweighted.mrc"
            for uid, name in zip(uids, names)
        ]
        psizes = np.broadcast_to(np.asarray(psize_A, dtype=np.float32), (n,))
        if write_mrc:
            for path, image, psize in zip(paths, images, psizes):
                mrc.write(self._local(path), image, float(psize))
        dset = exposures_dataset(
            paths,
            [im.shape for im in images],
            psizes,
            uids=uids,
            exp_group_id=exp_group_id,
            ctf=ctf,
            with_ctf=with_ctf,
            vmin_vmax=[(float(im.min()), float(im.max())) for im in images],
        )
        self.seed_output_job(
            dset,
            output_name=output_name,
            type="exposure",
            job_type=job_type,
            passthrough_slots=passthrough_slots,
            job_uid=job.uid,
        )
        return SeededJob(job.uid, output_name, dset, images=images, paths=paths)

    def seed_particles(
        self,
        exposures: SeededJob | Dataset,
        coords: Sequence[Any] | Mapping[int, Any],
        *,
        poses: np.ndarray | None = None,
        shifts: np.ndarray | None = None,
        min_dist_A: float = 100.0,
        extra_location_fields: bool = True,
        output_name: str = "particles_selected",
        job_type: str = "select_2D",
        title: str = "Select 2D Classes",
        workspace_uid: str = "W1",
        passthrough_slots: Sequence[str] = (),
    ) -> SeededJob:
        """Curated particles (``location`` [+ ``alignments3D`` from ``poses``]) on seeded exposures.

        ``coords``: per exposure row (list, or {row: coords}) an (n, 2) array of pixel (x, y).
        """
        exp_dset = exposures.dataset if isinstance(exposures, SeededJob) else exposures
        if isinstance(coords, Mapping):
            coords = [coords.get(i, np.zeros((0, 2))) for i in range(len(exp_dset))]
        arrays = [np.asarray(c, dtype=np.float64).reshape(-1, 2) for c in coords]
        dset = particles_dataset(
            exp_dset,
            arrays,
            min_dist_A=min_dist_A,
            extra_location_fields=extra_location_fields,
            poses=poses,
            shifts=shifts,
        )
        parents = [exposures.uid] if isinstance(exposures, SeededJob) else []
        seeded = self.seed_output_job(
            dset,
            output_name=output_name,
            type="particle",
            job_type=job_type,
            title=title,
            workspace_uid=workspace_uid,
            passthrough_slots=passthrough_slots,
            parents=parents,
        )
        seeded.coords = arrays
        return seeded

    # ---- HTTP entry points ---------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, query: Sequence[tuple[str, str]], headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Serve one request; ``headers`` keys are lower-case. Returns (status, headers, body)."""
        with self._lock:
            multi: dict[str, list[str]] = defaultdict(list)
            for key, value in query:
                multi[key].append(value)
            record = RecordedRequest(method.upper(), None, raw_path, dict(multi))
            self.requests.append(record)
            status, out_headers, content = self._dispatch(record, method.lower(), raw_path, multi, headers, body)
            record.status = status
            return status, out_headers, content

    def _dispatch(self, record, method, raw_path, multi, headers, body):
        if not raw_path.startswith(API_PREFIX):
            return _error(404, "Not Found")
        sub = raw_path[len(API_PREFIX) :] or "/"
        if sub == "/openapi.json" and method == "get":
            record.summary = "openapi.json"
            doc = openapi_document()
            return _json(200, {**doc, "info": {**doc["info"], "version": self.version.lstrip("v")}})
        for op in OPERATIONS:
            match = op.pattern.match(sub)
            if op.method == method and match:
                break
        else:
            return _error(404, "Not Found")
        record.summary = op.summary
        if self._faults[op.summary]:
            return _error(*self._faults[op.summary].popleft())
        try:
            if op.auth:
                self._authenticate(headers)
            path_params = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
            query = _parse_query(op, multi)
            payload = _parse_body(op, body)
            result = getattr(self, "_op_" + op.summary.replace(".", "_"))(path_params, query, payload)
        except FakeAPIError as err:
            extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
            return _error(err.status, err.detail, extra)
        if op.response == "dataset":
            return 200, {"Content-Type": "application/x-cryosparc-dataset"}, b"".join(result.stream())
        if op.response == "stream":
            return 200, {"Content-Type": "application/octet-stream"}, result
        return _json(200, _dump(result))

    def _handle_httpx(self, request: httpx.Request) -> httpx.Response:
        url = httpx.URL(self.inprocess_url)
        if not self.reachable or (request.url.host, request.url.port) != (url.host, url.port):
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        path, _, qs = request.url.raw_path.decode("ascii").partition("?")
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, out_headers, content = self.handle(
            request.method, path, urllib.parse.parse_qsl(qs, keep_blank_values=True), headers, request.content
        )
        return httpx.Response(status, headers=out_headers, content=content)

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token not in self._tokens:
            raise FakeAPIError(401, "Not authenticated")

    # ---- operations: session, project, workspace ------------------------------------------------

    def _op_health(self, p, q, body):
        return "OK"

    def _op_login(self, p, q, form):
        expected = hashlib.sha256(self.password.encode()).hexdigest()
        if form.get("username") != self.email or form.get("password") != expected:
            raise FakeAPIError(401, "Invalid email or password")
        return self.issue_token()

    def _op_users_me(self, p, q, body):
        return self.user

    def _op_config_get_version(self, p, q, body):
        return self.version

    def _op_projects_find_one(self, p, q, body):
        return self._project(p["project_uid"])

    def _op_projects_get_directory(self, p, q, body):
        return self._project(p["project_uid"]).project_dir

    def _op_projects_download_file(self, p, q, body):
        self._project(p["project_uid"])
        path = q["path"]
        if not path:
            raise FakeAPIError(422, "path must not be empty")
        pure = PurePosixPath(path)
        if pure.is_absolute():
            try:
                pure = pure.relative_to(self.server_project_dir)
            except ValueError:
                raise FakeAPIError(403, f"{path} is outside the project directory {self.server_project_dir}")
        if ".." in pure.parts:
            raise FakeAPIError(403, f"{path} is outside the project directory")
        local = self.project_dir / pure
        if not local.is_file():
            raise FakeAPIError(404, f"File {path} does not exist in project {self.project.uid}")
        return local.read_bytes()

    def _op_workspaces_find_one(self, p, q, body):
        self._project(p["project_uid"])
        workspace = self._workspaces.get(p["workspace_uid"])
        if workspace is None:
            raise FakeAPIError(404, f"Workspace {p['project_uid']}-{p['workspace_uid']} does not exist")
        return workspace

    # ---- operations: jobs -----------------------------------------------------------------------

    def _op_jobs_find(self, p, q, body):
        filters = {
            "project_uid": lambda j: j.project_uid,
            "uid": lambda j: j.uid,
            "type": lambda j: j.spec.type,
            "status": lambda j: j.status,
        }
        jobs = [j for j in self._jobs.values() if j.deleted == bool(q["deleted"])]
        for name, key in filters.items():
            if q[name]:
                jobs = [j for j in jobs if key(j) in q[name]]
        if q["workspace_uid"]:
            jobs = [j for j in jobs if set(j.workspace_uids) & set(q["workspace_uid"])]
        if q["category"]:
            raise FakeAPIError(422, "Filtering jobs by category is not supported by this test server")
        for name, value in q.items():
            if name.endswith("_at") and value:
                start, end = (datetime.fromisoformat(v) for v in value)
                stamp = "last_exported_at" if name == "exported_at" else name
                jobs = [j for j in jobs if getattr(j, stamp) and start <= getattr(j, stamp) <= end]
        if q["order"] == -1:
            jobs.reverse()
        if q["after"]:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(q["after"]) + 1 :] if q["after"] in ids else []
        return jobs[: q["limit"]]

    def _op_jobs_find_one(self, p, q, body):
        return self._job(p)

    def _op_jobs_get_directory(self, p, q, body):
        job = self._job(p)
        return f"{self.server_project_dir.rstrip('/')}/{job.job_dir}"

    def _op_jobs_create(self, p, q, params):
        self._project(p["project_uid"])
        if p["workspace_uid"] not in self._workspaces:
            raise FakeAPIError(404, f"Workspace {p['project_uid']}-{p['workspace_uid']} does not exist")
        if q["type"] != "snowflake":
            raise FakeAPIError(422, f"Job type {q['type']!r} is not available on this test server (only 'snowflake')")
        if params:
            raise FakeAPIError(422, f"External jobs take no parameters, got {sorted(params)}")
        job = self._create_job("snowflake", p["workspace_uid"], q["title"], q["description"], "building")
        job.created_by_job_uid = q["created_by_job_uid"]
        self._touch(job)
        return job

    def _op_jobs_add_external_input(self, p, q, body):
        job = self._editable_external(p, "add an input")
        name = self._valid_name(p["input_name"])
        spec = _validate(InputSpec, body)
        slots = [_input_slot(s) for s in spec.slots]
        if not slots:
            raise FakeAPIError(422, f"Input {name} needs at least one slot")
        unknown = [sl.dtype for sl in slots if sl.dtype not in self.known_dtypes()]
        if self.strict and unknown:
            raise FakeAPIError(422, f"Input {name}: unknown slot type(s) {unknown}; known: {sorted(self.known_dtypes())}")
        job.spec.inputs.root[name] = Input(
            type=spec.type,
            title=spec.title,
            description=spec.description,
            slots=slots,
            count_min=spec.count_min,
            count_max=spec.count_max,
            repeat_allowed=spec.repeat_allowed,
        )
        self._touch(job)
        return job

    def _op_jobs_add_external_output(self, p, q, body):
        job = self._editable_external(p, "add an output")
        name = self._valid_name(p["output_name"])
        spec = _validate(OutputSpec, body)
        slots = [OutputSlot(name=s, dtype=s) if isinstance(s, str) else s for s in spec.slots]
        if not slots:
            raise FakeAPIError(422, f"Output {name} needs at least one slot")
        names = [s.name for s in slots]
        if len(set(names)) != len(names):
            raise FakeAPIError(422, f"Output {name} has duplicate slot names {names}")
        unknown = [s.dtype for s in slots if s.dtype not in self.output_fields]
        if unknown:
            raise FakeAPIError(422, f"Unknown slot type(s) {unknown}; known: {sorted(self.output_fields)}")
        if spec.passthrough and spec.passthrough not in job.spec.inputs.root:
            raise FakeAPIError(422, f"Passthrough input {spec.passthrough!r} does not exist on {job.uid}")
        job.spec.outputs.root[name] = Output(
            type=spec.type,
            title=spec.title,
            description=spec.description,
            slots=slots,
            passthrough=spec.passthrough,
            results=[OutputResult(name=s.name, dtype=s.dtype) for s in slots],
        )
        self._touch(job)
        return job

    def _op_jobs_connect(self, p, q, body):
        job = self._job(p)
        if job.status not in EDITABLE:
            raise FakeAPIError(409, f"Cannot connect inputs of {job.uid}: status is {job.status}")
        name = p["input_name"]
        inp = job.spec.inputs.root.get(name)
        if inp is None:
            raise FakeAPIError(404, f"Job {job.uid} has no input {name!r}")
        src_uid, src_name = q["source_job_uid"], q["source_output_name"]
        if src_uid == job.uid:
            raise FakeAPIError(422, f"Cannot connect job {job.uid} to itself")
        source = self._job({"project_uid": p["project_uid"], "job_uid": src_uid})
        output = source.spec.outputs.root.get(src_name)
        if output is None:
            raise FakeAPIError(404, f"Job {src_uid} has no output {src_name!r}")
        if output.type != inp.type:
            raise FakeAPIError(422, f"Input {name} takes {inp.type} data but {src_uid}.{src_name} is {output.type}")
        if inp.count_max != "inf" and len(inp.connections) >= inp.count_max:
            raise FakeAPIError(422, f"Input {name} accepts at most {inp.count_max} connection(s)")
        by_name = {r.name: r for r in output.results}
        results, used = [], set()
        missing = []
        for slot in inp.slots:
            res = by_name.get(slot.name) or next((r for r in output.results if r.dtype == slot.dtype), None)
            if self.strict and res is not None and res.dtype != slot.dtype:
                res = None  # a result connects only to a slot of its own type
            if res is None:
                if slot.required:
                    missing.append(slot.name)
                continue
            used.add(res.name)
            results.append(
                InputResult(name=slot.name, dtype=res.dtype, job_uid=src_uid, output=src_name, result=res.name)
            )
        if missing:
            raise FakeAPIError(422, f"{src_uid}.{src_name} lacks required slot(s) {missing} of input {name}")
        for res in output.results:
            if res.name not in used:
                results.append(
                    InputResult(name=None, dtype=res.dtype, job_uid=src_uid, output=src_name, result=res.name)
                )
        inp.connections.append(Connection(job_uid=src_uid, output=src_name, results=results))
        self._link(src_uid, job.uid)
        self._touch(job)
        return job

    def load_recording(self, folder: Path | str) -> None:
        """Take a real instance's shapes recorded by ``crisp-cryosparc record-fixtures``: its version and the fields
        it declares per slot type (from the particle and exposure outputs it was pointed at)."""
        folder = Path(folder)
        version = folder / "version.json"
        if version.is_file():
            self.version = json.loads(version.read_text())["server"]
        for name in ("output_fields_particles.json", "output_fields_exposures.json"):
            path = folder / name
            if not path.is_file():
                continue
            by_slot: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for field_name, dtype in json.loads(path.read_text())["fields"]:
                slot, _, sub = field_name.partition("/")
                if sub:
                    by_slot[slot].append((sub, dtype))
            self.output_fields.update(by_slot)

    def known_dtypes(self) -> set[str]:
        """Result types this server knows (those it declares fields for, and ``blob``)."""
        return set(self.output_fields) | {"blob"}

    def _op_jobs_get_output_fields(self, p, q, body):
        job = self._job(p)
        return self._output_fields(job, p["output_name"])

    def _op_jobs_save_output(self, p, q, dataset):
        job = self._job(p)
        self._external(job)
        if job.status not in ("running", "waiting"):
            raise FakeAPIError(409, f"Job {job.uid} must be running or waiting to save outputs (status: {job.status})")
        name = p["output_name"]
        output = self._output(job, name)
        expected = self._output_fields(job, name)
        descr = {entry[0]: entry for entry in dataset.descr()}
        missing = [f for f, _ in expected if f not in descr]
        if missing:
            raise FakeAPIError(422, f"Dataset for output {name} is missing field(s) {missing}")
        wrong = [f"{f} ({descr[f][1:]} != {dt})" for f, dt in expected if not same_dtype(dt, descr[f])]
        if wrong:
            raise FakeAPIError(422, f"Dataset for output {name} has field(s) of the wrong type: {wrong}")
        declared = {s.name for s in output.slots}
        extra = sorted({prefix_of(f) for f in dataset.fields(exclude_uid=True)} - declared)
        if extra:
            raise FakeAPIError(422, f"Output {name} has no slot(s) {extra}; declared: {sorted(declared)}")
        undeclared = sorted(set(dataset.fields(exclude_uid=True)) - {f for f, _ in expected})
        if self.strict and undeclared:
            raise FakeAPIError(422, f"Dataset for output {name} has undeclared field(s) {undeclared}")
        filename = q["filename"] or f"{name}.cs"
        if PurePosixPath(filename).is_absolute() or ".." in PurePosixPath(filename).parts:
            raise FakeAPIError(422, f"filename {filename!r} must be relative to the job directory")
        rel = f"{job.job_dir}/{filename}"
        dataset.save(self._local(rel))
        n, version = len(dataset), q["version"]
        results = [
            OutputResult(name=s.name, dtype=s.dtype, versions=[version], metafiles=[rel], num_items=[n])
            for s in output.slots
        ]
        if output.passthrough:
            results += self._save_passthrough(job, name, output, dataset)
        output.results = results
        output.num_items = n
        self._touch(job)
        return job

    def _op_jobs_load_output(self, p, q, body):
        job = self._job(p)
        name = p["output_name"]
        output = self._output(job, name)
        if not any(r.metafiles for r in output.results):
            raise FakeAPIError(422, f"Output {job.uid}.{name} is empty (nothing saved)")
        return self._load_results(job, name, self._select(output.results, q["slots"]), q["version"])

    def _op_jobs_load_input(self, p, q, body):
        job = self._job(p)
        return self._load_input(job, p["input_name"], q["slots"])

    def _op_jobs_mark_running(self, p, q, body):
        job = self._job(p)
        if job.spec.type != "snowflake":
            raise FakeAPIError(422, f"Only External jobs can be marked running; {job.uid} is {job.spec.type}")
        status = q["status"]
        if status not in ("running", "waiting"):
            raise FakeAPIError(422, f"status must be 'running' or 'waiting', not {status!r}")
        if job.status not in EDITABLE:
            raise FakeAPIError(409, f"Job {job.uid} is {job.status}; clear it before starting again")
        for name, inp in job.spec.inputs.root.items():
            if len(inp.connections) < inp.count_min:
                raise FakeAPIError(422, f"Input {name} of {job.uid} needs {inp.count_min} connection(s)")
        self._set_status(job, status)
        return job

    def _op_jobs_mark_completed(self, p, q, body):
        job = self._job(p)
        active_external = job.spec.type == "snowflake" and job.status in ("running", "waiting")
        if not (active_external or job.status in ("failed", "killed")):
            raise FakeAPIError(409, f"Job {job.uid} cannot be marked completed from status {job.status}")
        self._set_status(job, "completed")
        job.completed_count += 1
        self._touch(job)
        return job

    def _op_jobs_mark_failed(self, p, q, body):
        job = self._job(p)
        error = q["error"]
        if error:
            job.errors_run = (job.errors_run + [RunError(message=error)])[-10:]
            self._add_event(job, TextEvent, type="error", text=error)
        self._set_status(job, "failed")
        return job

    def _op_jobs_add_event_log(self, p, q, text):
        job = self._job(p)
        if not isinstance(text, str):
            raise FakeAPIError(422, "event text must be a string")
        return self._add_event(job, TextEvent, type=_event_type(q["type"]), text=text)

    def _op_jobs_update_event_log(self, p, q, text):
        job = self._job(p)
        event = next((e for e in self._events[job.uid] if e.id == p["event_id"]), None)
        if event is None:
            raise FakeAPIError(404, f"Event {p['event_id']} does not exist in job {job.uid}")
        if not isinstance(event, TextEvent):
            raise FakeAPIError(422, f"Event {event.id} is not a text event")
        if text is not None:
            event.text = text
        if q["type"] is not None:
            event.type = _event_type(q["type"])
        event.updated_at = _now()
        return event

    def _op_jobs_add_image_log(self, p, q, images):
        job = self._job(p)
        assets = [self._asset(a) for a in _validate_list(GridFSAsset, images)]
        return self._add_event(job, ImageEvent, type="image", text=q["text"], imgfiles=assets, flags=q["flags"])

    def _op_jobs_add_checkpoint(self, p, q, meta):
        job = self._job(p)
        return self._add_event(job, CheckpointEvent, type="checkpoint", meta=meta or {})

    def _op_jobs_set_output_image(self, p, q, body):
        job = self._job(p)
        self._external(job)
        output = self._output(job, p["output_name"])
        output.image = self._asset(_validate(GridFSAsset, body)).fileid
        self._touch(job)
        return job

    def _op_jobs_set_tile_image(self, p, q, body):
        job = self._job(p)
        self._external(job)
        asset = self._asset(_validate(GridFSAsset, body))
        job.ui_tile_images = [UiTileImage(name="tile0", fileid=asset.fileid)]
        self._touch(job)
        return job

    def _op_assets_upload(self, p, q, data):
        job = self._job(p)
        filename, fmt = q["filename"], q["format"]
        if not filename and not fmt:
            raise FakeAPIError(422, "Give a filename or a format for the asset")
        ext = (fmt or filename.rsplit(".", 1)[-1]).lower()
        if ext not in ASSET_CONTENT_TYPES:
            raise FakeAPIError(422, f"Unsupported asset format {ext!r}")
        if not data:
            raise FakeAPIError(422, "Asset body is empty")
        fileid = _oid()
        stored = StoredAsset(fileid, filename or f"{fileid}.{ext}", ASSET_CONTENT_TYPES[ext], job.uid, data)
        self.assets[fileid] = stored
        return GridFSAsset(fileid=fileid, filename=stored.filename, filetype=stored.filetype)

    # ---- helpers --------------------------------------------------------------------------------

    def _project(self, project_uid: str) -> Project:
        if project_uid != self.project.uid:
            raise FakeAPIError(404, f"Project {project_uid} does not exist")
        return self.project

    def _job(self, p: Mapping[str, str]) -> Job:
        self._project(p["project_uid"])
        job = self._jobs.get(p["job_uid"])
        if job is None:
            raise FakeAPIError(404, f"Job {p['project_uid']}-{p['job_uid']} does not exist")
        return job

    def _external(self, job: Job) -> None:
        if job.spec.type != "snowflake":
            raise FakeAPIError(422, f"Job {job.uid} is not an External job (type {job.spec.type})")

    def _editable_external(self, p, action: str) -> Job:
        job = self._job(p)
        self._external(job)
        if job.status not in EDITABLE:
            raise FakeAPIError(409, f"Cannot {action} on {job.uid}: status is {job.status}")
        return job

    @staticmethod
    def _valid_name(name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise FakeAPIError(422, f"Invalid name {name!r}: letters, digits and underscores, starting with a letter")
        return name

    def _output(self, job: Job, name: str) -> Output:
        output = job.spec.outputs.root.get(name)
        if output is None:
            raise FakeAPIError(404, f"Job {job.uid} has no output {name!r}")
        return output

    def _output_fields(self, job: Job, name: str) -> list[list[str]]:
        output = self._output(job, name)
        fields = [["uid", "<u8"]]
        for slot in output.slots:
            if slot.dtype not in self.output_fields:
                raise FakeAPIError(422, f"Unknown slot type {slot.dtype!r}")
            fields += [[f"{slot.name}/{f}", dt] for f, dt in self.output_fields[slot.dtype]]
        return fields

    def _asset(self, asset: GridFSAsset) -> GridFSAsset:
        if asset.fileid not in self.assets:
            raise FakeAPIError(404, f"Asset {asset.fileid} does not exist")
        return asset

    def _create_job(self, job_type: str, workspace_uid: str, title: str, description: str, status: str) -> Job:
        if workspace_uid not in self._workspaces:
            raise ValueError(f"workspace {workspace_uid} does not exist; add it with add_workspace()")
        num = max((j.uid_num for j in self._jobs.values()), default=0) + 1
        now = _now()
        job = Job.model_validate(
            {
                "_id": _oid(),
                "uid": f"J{num}",
                "uid_num": num,
                "project_uid": self.project.uid,
                "project_uid_num": self.project.uid_num,
                "workspace_uids": [workspace_uid],
                "spec": {"type": job_type, "ui_tile_width": 1, "ui_tile_height": 1, "resource_spec": {}},
                "job_dir": f"J{num}",
                "job_dir_size_last_updated": now,
                "title": title,
                "description": description,
                "status": status,
                "status_num": STATUS_NUM[status],
                "build_errors": [],
                "created_at": now,
                "updated_at": now,
                "created_by_user_id": self.user.id,
                "version_created": self.version,
                "version": self.version,
            }
        )
        self._jobs[job.uid] = job
        (self.project_dir / job.job_dir).mkdir(parents=True, exist_ok=True)
        self._touch(job)
        return job

    def _set_status(self, job: Job, status: str) -> None:
        job.status = status
        job.status_num = STATUS_NUM[status]
        stamp = {"running": "running_at", "waiting": "waiting_at", "completed": "completed_at", "failed": "failed_at"}
        setattr(job, stamp[status], _now())
        self._touch(job)

    def _touch(self, job: Job) -> None:
        job.updated_at = _now()
        write_job_json(self.project_dir, job, self.job_json_layout)

    def _link(self, parent_uid: str, child_uid: str) -> None:
        parent, child = self._jobs[parent_uid], self._jobs[child_uid]
        if child_uid not in parent.children:
            parent.children.append(child_uid)
            self._touch(parent)
        if parent_uid not in child.parents:
            child.parents.append(parent_uid)

    def _add_event(self, job: Job, model, **fields):
        now = _now()
        event = model.model_validate(
            {
                "_id": _oid(),
                "project_uid": job.project_uid,
                "job_uid": job.uid,
                "created_at": now,
                "updated_at": now,
                **fields,
            }
        )
        self._events[job.uid].append(event)
        return event

    def _local(self, rel: str) -> Path:
        path = self.project_dir / PurePosixPath(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _select(results: Sequence, slots: Any, name_of=lambda r: r.name) -> list:
        if slots == "default":
            return [r for r in results if not r.passthrough]
        if slots == "passthrough":
            return [r for r in results if r.passthrough]
        if slots == "all":
            return list(results)
        wanted = list(slots)
        chosen = [r for r in results if name_of(r) in wanted]
        missing = sorted(set(wanted) - {name_of(r) for r in chosen})
        if missing:
            raise FakeAPIError(422, f"No such slot(s) {missing}; available: {[name_of(r) for r in results]}")
        return chosen

    def _load_results(self, job: Job, output_name: str, results: Sequence[OutputResult], version: Any) -> Dataset:
        """Join the metafiles holding ``results`` of one output (passthroughs use their first file)."""
        if not results:
            raise FakeAPIError(422, f"No slots selected from {job.uid}.{output_name}")
        by_file: dict[str, list[str]] = {}
        for res in results:
            if not res.metafiles:
                raise FakeAPIError(422, f"Slot {res.name} of {job.uid}.{output_name} has no saved data")
            if res.passthrough:
                metafile = res.metafiles[0]
            elif version == "F":
                metafile = res.metafiles[-1]
            elif version in res.versions:
                metafile = res.metafiles[res.versions.index(version)]
            else:
                raise FakeAPIError(422, f"{job.uid}.{output_name} has no version {version} (has {res.versions})")
            by_file.setdefault(metafile, []).append(res.name)
        parts = [Dataset.load(self.project_dir / PurePosixPath(f), prefixes=names) for f, names in by_file.items()]
        return parts[0] if len(parts) == 1 else Dataset.innerjoin_many(*parts)

    def _load_input(self, job: Job, name: str, slots: Any) -> Dataset:
        inp = job.spec.inputs.root.get(name)
        if inp is None:
            raise FakeAPIError(404, f"Job {job.uid} has no input {name!r}")
        if not inp.connections:
            raise FakeAPIError(422, f"Input {name} of {job.uid} has no connections")
        parts = []
        for conn in inp.connections:
            source = self._jobs[conn.job_uid]
            output = source.spec.outputs.root[conn.output]
            chosen = self._select(conn.results, slots, name_of=lambda r: r.name or r.result)
            by_result = {r.name: r for r in output.results}
            dset = self._load_results(source, conn.output, [by_result[r.result] for r in chosen], "F")
            for r in chosen:
                if r.name and r.name != r.result:
                    dset.rename_prefix(r.result, r.name)
            parts.append(dset)
        return parts[0] if len(parts) == 1 else Dataset.append_many(*parts)

    def _save_passthrough(self, job: Job, name: str, output: Output, dataset: Dataset) -> list[OutputResult]:
        """Write the passthrough input's other slots for the saved rows (matched by uid)."""
        source = self._load_input(job, output.passthrough, "all")
        declared = {s.name for s in output.slots}
        keep = [s for s in source.prefixes() if s not in declared]
        if not keep:
            return []
        rows = Dataset({"uid": dataset["uid"]}).innerjoin(source.filter_prefixes(keep, copy=True))
        rel = f"{job.job_dir}/{job.uid}_passthrough_{name}.cs"
        rows.save(self._local(rel))
        inp = job.spec.inputs.root[output.passthrough]
        dtypes = {r.name or r.result: r.dtype for c in inp.connections for r in c.results}
        return [
            OutputResult(
                name=s, dtype=dtypes.get(s, s), versions=[0], metafiles=[rel], num_items=[len(rows)], passthrough=True
            )
            for s in keep
        ]


# ---- request parsing and responses -------------------------------------------------------------


def _json(status: int, value: Any, headers: Mapping[str, str] | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(value).encode()


def _error(status: int, detail: str, headers: Mapping[str, str] | None = None):
    return _json(status, {"detail": detail}, headers)


def _event_type(value: str) -> str:
    if value not in ("text", "warning", "error"):
        raise FakeAPIError(422, f"event type must be text, warning or error, not {value!r}")
    return value


def _input_slot(spec: Any) -> InputSlot:
    if isinstance(spec, str):
        required = not spec.startswith("?")
        name = spec.lstrip("?")
        return InputSlot(name=name, dtype=name, required=required)
    return spec


def _validate(model, value):
    try:
        return model.model_validate(value)
    except ValidationError as err:
        raise FakeAPIError(422, f"Invalid {model.__name__}: {err.errors()[0]['msg']}")


def _validate_list(model, value):
    if not isinstance(value, list):
        raise FakeAPIError(422, f"Expected a list of {model.__name__}")
    return [_validate(model, v) for v in value]


def _convert(kind: str, name: str, values: list[str]) -> Any:
    value = values[-1]
    try:
        if kind == "str":
            return value
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind in ("bool", "force_join"):
            if kind == "force_join" and value == "auto":
                return value
            if value.lower() in ("true", "1"):
                return True
            if value.lower() in ("false", "0"):
                return False
            raise ValueError(value)
        if kind == "strlist":
            return list(values)
        if kind == "version":
            return value if value == "F" else int(value)
        if kind == "slots":
            return value if len(values) == 1 and value in ("default", "passthrough", "all") else list(values)
    except ValueError:
        raise FakeAPIError(422, f"Invalid value {value!r} for query parameter {name!r}")
    raise AssertionError(f"unknown query kind {kind}")


def _parse_query(op: Operation, multi: Mapping[str, list[str]]) -> dict[str, Any]:
    out = {}
    for q in op.query:
        values = multi.get(q.name)
        if values:
            out[q.name] = _convert(q.kind, q.name, values)
        elif q.required:
            raise FakeAPIError(422, f"Missing query parameter {q.name!r}")
        else:
            out[q.name] = q.default
    return out


def _parse_body(op: Operation, body: bytes) -> Any:
    if op.body is None:
        return None
    if op.body.kind == "stream":
        return body
    if op.body.kind == "dataset":
        try:
            return Dataset.load(io.BytesIO(body))
        except DatasetLoadError as err:
            raise FakeAPIError(422, f"Could not read the uploaded dataset: {err}")
    if op.body.kind == "form":
        return dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
    if not body:
        if op.body.required:
            raise FakeAPIError(422, "Missing request body")
        return None
    try:
        return json.loads(body)
    except ValueError:
        raise FakeAPIError(422, "Request body is not valid JSON")


# ---- loopback server ----------------------------------------------------------------------------


class _LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeCryoSPARC


class _LoopbackHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes; avoid 40 ms ACK stalls
    timeout = 10  # a stalled client connection is dropped after this many seconds

    def _serve(self):
        body = self._read_body()
        path, _, qs = self.path.partition("?")
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, out_headers, content = self.server.fake.handle(
            self.command, path, urllib.parse.parse_qsl(qs, keep_blank_values=True), headers, body
        )
        self.send_response(status)
        for key, value in out_headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        # One request per connection: the client then holds no idle pooled sockets that would be
        # garbage-collected open (ResourceWarning) after the server is gone.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def log_message(self, format, *args):  # keep test output quiet
        pass


def unused_url(host: str = "127.0.0.1") -> str:
    """A base URL on a free local port where nothing listens (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    return f"http://{host}:{port}"


# ---- pytest fixtures (import them into a test module) -------------------------------------------


def isolate_client_config(monkeypatch, config_dir: Path) -> None:
    """Point cryosparc-tools' saved-login lookup at ``config_dir`` and drop CRYOSPARC_* env vars."""
    from cryosparc.auth import get_default_auth_config_path

    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_dir))
    for name in (
        "CRYOSPARC_BASE_URL",
        "CRYOSPARC_EMAIL",
        "CRYOSPARC_PASSWORD",
        "CRYOSPARC_LICENSE_ID",
        "CRYOSPARC_MASTER_HOSTNAME",
        "CRYOSPARC_BASE_PORT",
    ):
        monkeypatch.delenv(name, raising=False)
    get_default_auth_config_path.cache_clear()


# Where a facility's recording goes (tests/fixtures/cryosparc_recorded/); the fake uses it when present.
RECORDING = Path(__file__).resolve().parents[1] / "fixtures" / "cryosparc_recorded"


@pytest.fixture
def cryosparc_fake(tmp_path, monkeypatch):
    """A FakeCryoSPARC on ``tmp_path/cryosparc-project`` with the client's config dir in tmp."""
    from cryosparc.auth import get_default_auth_config_path

    isolate_client_config(monkeypatch, tmp_path / "xdg-config")
    fake = FakeCryoSPARC(tmp_path / "cryosparc-project")
    if RECORDING.is_dir():  # a real instance's shapes, recorded by crisp-cryosparc record-fixtures
        fake.load_recording(RECORDING)
    yield fake
    get_default_auth_config_path.cache_clear()


@pytest.fixture
def cryosparc_inprocess(cryosparc_fake):
    """The fake, with ``CryoSPARC(...)`` routed to it in-process for the test's duration."""
    with cryosparc_fake.in_process():
        yield cryosparc_fake


@pytest.fixture
def cryosparc_loopback(cryosparc_fake):
    """The fake, served on 127.0.0.1 (``cryosparc_loopback.base_url``) for the test's duration."""
    with cryosparc_fake.serve():
        yield cryosparc_fake
