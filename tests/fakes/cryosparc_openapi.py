"""The operations the fake cryoSPARC v5 server publishes, and its ``openapi.json``.

cryosparc-tools 5.x builds one client function per operation, named by its ``summary``
(``"jobs.find_one"`` -> ``api.jobs.find_one``), fills path parameters positionally, sends
keyword arguments as query parameters and the next positional argument as the body (JSON,
form or a binary stream), and decodes responses through the ``cryosparc.models`` classes
named by ``$ref``. URL paths are therefore free for the fake to choose; parameter names,
locations, body kinds and response schemas follow the 5.0.3 ``api.pyi`` signatures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

API_PREFIX = "/api/cmd"

# Query parameter kinds -> JSON schema (the server parses values by kind).
_QUERY_SCHEMAS = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "strlist": {"type": "array", "items": {"type": "string"}},
    "version": {"anyOf": [{"type": "integer"}, {"const": "F"}]},
    "slots": {"anyOf": [{"enum": ["default", "passthrough", "all"]}, {"type": "array", "items": {"type": "string"}}]},
    "force_join": {"anyOf": [{"type": "boolean"}, {"const": "auto"}]},
}


@dataclass(frozen=True)
class Query:
    name: str
    kind: str = "str"
    required: bool = False
    default: object = None


@dataclass(frozen=True)
class Body:
    kind: str  # "json" | "form" | "dataset" | "stream"
    schema: dict
    required: bool = True


@dataclass(frozen=True)
class Operation:
    summary: str
    method: str
    path: str
    query: tuple[Query, ...] = ()
    body: Body | None = None
    response: str = "json"  # "json" | "dataset" | "stream"
    response_schema: dict | None = None
    auth: bool = True

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"{([^}]*)}", self.path)

    @property
    def pattern(self) -> re.Pattern:
        regex = re.sub(r"{([^}]*)}", r"(?P<\1>[^/:]+)", re.escape(self.path).replace(r"\{", "{").replace(r"\}", "}"))
        return re.compile(f"^{regex}$")


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_STR = {"type": "string"}
# Time-range filters of jobs.find: (start, end) ISO datetimes.
_JOB_STAMPS = ("created", "updated", "queued", "started", "waiting", "completed", "killed", "failed", "exported")
_JOB = "/projects/{project_uid}/jobs/{job_uid}"

OPERATIONS: tuple[Operation, ...] = (
    Operation("health", "get", "/health", response_schema=_STR, auth=False),
    Operation(
        "login", "post", "/login", body=Body("form", _ref("Body_login")), response_schema=_ref("Token"), auth=False
    ),
    Operation("users.me", "get", "/users/me", response_schema=_ref("User")),
    Operation("config.get_version", "get", "/config/version", response_schema=_STR),
    Operation("projects.find_one", "get", "/projects/{project_uid}", response_schema=_ref("Project")),
    Operation("projects.get_directory", "get", "/projects/{project_uid}/directory", response_schema=_STR),
    Operation(
        "projects.download_file",
        "get",
        "/projects/{project_uid}/files",
        query=(Query("path", "str", default=""),),
        response="stream",
    ),
    Operation(
        "workspaces.find_one",
        "get",
        "/projects/{project_uid}/workspaces/{workspace_uid}",
        response_schema={"anyOf": [_ref("Workspace"), _ref("Session")]},
    ),
    Operation(
        "jobs.find",
        "get",
        "/jobs",
        query=(
            Query("order", "int", default=1),
            Query("after", "str"),
            Query("limit", "int", default=100),
            Query("project_uid", "strlist"),
            Query("workspace_uid", "strlist"),
            Query("uid", "strlist"),
            Query("type", "strlist"),
            Query("status", "strlist"),
            Query("category", "strlist"),
            *(Query(f"{stamp}_at", "strlist") for stamp in _JOB_STAMPS),
            Query("deleted", "bool", default=False),
        ),
        response_schema={"type": "array", "items": _ref("Job")},
    ),
    Operation("jobs.find_one", "get", _JOB, response_schema=_ref("Job")),
    Operation("jobs.get_directory", "get", _JOB + "/directory", response_schema=_STR),
    Operation(
        "jobs.create",
        "post",
        "/projects/{project_uid}/workspaces/{workspace_uid}/jobs",
        query=(
            Query("type", "str", required=True),
            Query("title", "str", default=""),
            Query("description", "str", default=""),
            Query("created_by_job_uid", "str"),
            Query("enable_bench", "bool", default=False),
        ),
        body=Body("json", {"type": "object", "title": "Params", "default": {}}, required=False),
        response_schema=_ref("Job"),
    ),
    Operation(
        "jobs.add_external_input",
        "post",
        _JOB + "/external/inputs/{input_name}",
        body=Body("json", _ref("InputSpec")),
        response_schema=_ref("Job"),
    ),
    Operation(
        "jobs.add_external_output",
        "post",
        _JOB + "/external/outputs/{output_name}",
        body=Body("json", _ref("OutputSpec")),
        response_schema=_ref("Job"),
    ),
    Operation(
        "jobs.connect",
        "post",
        _JOB + "/inputs/{input_name}/connections",
        query=(Query("source_output_name", "str", required=True), Query("source_job_uid", "str", required=True)),
        response_schema=_ref("Job"),
    ),
    Operation(
        "jobs.get_output_fields",
        "post",
        _JOB + "/outputs/{output_name}/fields",
        body=Body("json", {"type": "object", "title": "Dtype Params", "default": {}}, required=False),
        response_schema={
            "type": "array",
            "items": {
                "type": "array",
                "prefixItems": [{"type": "string"}, {"type": "string"}],
                "minItems": 2,
                "maxItems": 2,
            },
        },
    ),
    Operation(
        "jobs.save_output",
        "post",
        _JOB + "/outputs/{output_name}/dataset",
        query=(Query("filename", "str"), Query("version", "int", default=0)),
        body=Body("dataset", {"title": "Dataset", "type": "string", "format": "binary"}),
        response_schema=_ref("Job"),
    ),
    Operation(
        "jobs.load_output",
        "get",
        _JOB + "/outputs/{output_name}/dataset",
        query=(Query("version", "version", default="F"), Query("slots", "slots", default="default")),
        response="dataset",
    ),
    Operation(
        "jobs.load_input",
        "get",
        _JOB + "/inputs/{input_name}/dataset",
        query=(Query("force_join", "force_join", default="auto"), Query("slots", "slots", default="default")),
        response="dataset",
    ),
    Operation(
        "jobs.mark_running",
        "post",
        _JOB + ":mark_running",
        query=(Query("status", "str", default="running"),),
        response_schema=_ref("Job"),
    ),
    Operation("jobs.mark_completed", "post", _JOB + ":mark_completed", response_schema=_ref("Job")),
    Operation(
        "jobs.mark_failed", "post", _JOB + ":mark_failed", query=(Query("error", "str"),), response_schema=_ref("Job")
    ),
    Operation(
        "jobs.add_event_log",
        "post",
        _JOB + "/events",
        query=(Query("type", "str", default="text"),),
        body=Body("json", {"type": "string", "title": "Text"}),
        response_schema=_ref("TextEvent"),
    ),
    Operation(
        "jobs.update_event_log",
        "put",
        _JOB + "/events/{event_id}",
        query=(Query("type", "str"),),
        body=Body("json", {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Text"}, required=False),
        response_schema=_ref("TextEvent"),
    ),
    Operation(
        "jobs.add_image_log",
        "post",
        _JOB + "/events/images",
        query=(Query("text", "str", required=True), Query("flags", "strlist", default=["plots"])),
        body=Body("json", {"type": "array", "items": _ref("GridFSAsset"), "title": "Images"}),
        response_schema=_ref("ImageEvent"),
    ),
    Operation(
        "jobs.add_checkpoint",
        "post",
        _JOB + "/events/checkpoints",
        body=Body("json", {"type": "object", "title": "Meta"}),
        response_schema=_ref("CheckpointEvent"),
    ),
    Operation(
        "jobs.set_output_image",
        "put",
        _JOB + "/outputs/{output_name}/image",
        body=Body("json", _ref("GridFSAsset")),
        response_schema=_ref("Job"),
    ),
    Operation(
        "jobs.set_tile_image",
        "put",
        _JOB + "/tile_image",
        body=Body("json", _ref("GridFSAsset")),
        response_schema=_ref("Job"),
    ),
    Operation(
        "assets.upload",
        "post",
        _JOB + "/assets",
        query=(Query("filename", "str"), Query("format", "str")),
        body=Body("stream", {"title": "Stream", "type": "string", "format": "binary"}),
        response_schema=_ref("GridFSAsset"),
    ),
)

OPERATIONS_BY_SUMMARY = {op.summary: op for op in OPERATIONS}

# Declared error statuses; the client turns a declared 4xx with a JSON body into APIError(code, data).
ERROR_STATUSES = ("401", "403", "404", "409", "422")

_LOGIN_FORM = {
    "title": "Body_login",
    "type": "object",
    "required": ["username", "password"],
    "properties": {
        "grant_type": {"anyOf": [{"type": "string", "pattern": "password"}, {"type": "null"}]},
        "username": {"type": "string"},
        "password": {"type": "string", "description": "sha256 hex digest of the password"},
        "scope": {"type": "string", "default": ""},
        "client_id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "client_secret": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "expires_in": {"type": "number", "default": 1209600},
    },
}

_HTTP_ERROR = {"title": "HTTPError", "type": "object", "properties": {"detail": {"title": "Detail"}}}


@lru_cache(maxsize=1)
def component_schemas() -> dict:
    """JSON schemas of the ``cryosparc.models`` classes the operations reference."""
    from cryosparc.models.asset import GridFSAsset
    from cryosparc.models.auth import Token
    from cryosparc.models.event import CheckpointEvent, ImageEvent, TextEvent
    from cryosparc.models.job import Job
    from cryosparc.models.job_spec import InputSpec, OutputSpec
    from cryosparc.models.project import Project
    from cryosparc.models.session import Session
    from cryosparc.models.user import User
    from cryosparc.models.workspace import Workspace
    from pydantic.json_schema import models_json_schema

    models = [Job, Project, Workspace, Session, User, Token, TextEvent, ImageEvent, CheckpointEvent, GridFSAsset]
    models += [InputSpec, OutputSpec]
    _, doc = models_json_schema([(m, "serialization") for m in models], ref_template="#/components/schemas/{model}")
    return {**doc["$defs"], "Body_login": _LOGIN_FORM, "HTTPError": _HTTP_ERROR}


def _parameters(op: Operation) -> list[dict]:
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in op.path_params]
    for q in op.query:
        schema = dict(_QUERY_SCHEMAS[q.kind])
        if q.default is not None:
            schema["default"] = q.default
        params.append({"name": q.name, "in": "query", "required": q.required, "schema": schema})
    return params


def _responses(op: Operation) -> dict:
    from cryosparc.dataset import Dataset
    from cryosparc.stream import Stream

    if op.response == "dataset":
        ok = Dataset.api_schema()
    elif op.response == "stream":
        ok = Stream.api_schema()
    else:
        ok = {"description": "Successful Response", "content": {"application/json": {"schema": op.response_schema}}}
    errors = {}
    for code in ERROR_STATUSES:
        errors[code] = {"description": "Error", "content": {"application/json": {"schema": _ref("HTTPError")}}}
    return {"200": ok, **errors}


_BODY_MIME = {
    "json": "application/json",
    "form": "application/x-www-form-urlencoded",
    "dataset": "application/x-cryosparc-dataset",
    "stream": "application/octet-stream",
}


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    """The ``/api/cmd/openapi.json`` document: info, paths (one entry per operation), components."""
    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        entry: dict = {"summary": op.summary, "operationId": op.summary.replace(".", "_")}
        params = _parameters(op)
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {
                "required": op.body.required,
                "content": {_BODY_MIME[op.body.kind]: {"schema": op.body.schema}},
            }
        entry["responses"] = _responses(op)
        if op.auth:
            entry["security"] = [{"OAuth2PasswordBearer": []}]
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "CryoSPARC API (test fake)", "version": "5.0.3"},
        "paths": paths,
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {
                "OAuth2PasswordBearer": {"type": "oauth2", "flows": {"password": {"scopes": {}, "tokenUrl": "login"}}}
            },
        },
    }
