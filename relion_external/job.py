"""The job directory as RELION sees it: exit/abort marker files, continue mode, and the running RELION version.

RELION ignores exit codes: a job is finished only when ``RELION_JOB_EXIT_SUCCESS``, ``..._FAILURE`` or
``..._ABORTED`` exists in its directory, and the GUI asks for an abort by creating ``RELION_JOB_ABORT_NOW``.
Before launching, RELION writes ``<o>job.star`` (``_rlnJobIsContinue 1`` on "Continue!") and removes stale markers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .nodes import job_prefix

MARKER_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
MARKER_FAILURE = "RELION_JOB_EXIT_FAILURE"
MARKER_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
MARKERS = (MARKER_SUCCESS, MARKER_FAILURE, MARKER_ABORTED)

_VERSION_HEADER = re.compile(r"^#\s*version\s+(\d+)", re.MULTILINE)


def _general_value(text: str, label: str) -> str | None:
    """The value of ``_rlnLabel value`` in a general (non-loop) block, or None."""
    m = re.search(rf"^\s*{re.escape(label)}\s+(\S+)", text, re.MULTILINE)
    return m.group(1).strip("\"'") if m else None


@dataclass(frozen=True)
class JobStar:
    """What the job needs from ``job.star``: the header version, the job type fields and the continue flag."""

    header_version: int | None
    job_type: str | None  # 3.1: _rlnJobType (99 for External)
    job_type_label: str | None  # 4.x/5.x: _rlnJobTypeLabel (relion.external)
    is_continue: bool
    options: dict[str, str] = field(default_factory=dict)  # _rlnJobOptionVariable -> _rlnJobOptionValue


def parse_job_star(text: str) -> JobStar:
    m = _VERSION_HEADER.search(text)
    cont = _general_value(text, "_rlnJobIsContinue")
    options: dict[str, str] = {}
    block = re.search(r"data_joboptions_values(.*?)(?=^data_|\Z)", text, re.MULTILINE | re.DOTALL)
    if block:
        for line in block.group(1).splitlines():
            line = line.strip()
            if not line or line.startswith(("_", "#", "loop_")):
                continue
            parts = re.findall(r'"[^"]*"|\'[^\']*\'|\S+', line)
            if len(parts) >= 2:
                options[parts[0]] = parts[1].strip("\"'")
    return JobStar(
        header_version=int(m.group(1)) if m else None,
        job_type=_general_value(text, "_rlnJobType"),
        job_type_label=_general_value(text, "_rlnJobTypeLabel"),
        is_continue=cont is not None and cont.lower() in ("1", "true", "yes"),
        options=options,
    )


def read_job_star(job_dir: str | Path) -> JobStar | None:
    path = Path(job_dir) / "job.star"
    try:
        return parse_job_star(path.read_text(errors="replace"))
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None


def version_from_job_star(job: JobStar | None) -> str | None:
    """3.1 writes ``_rlnJobType``; 4.x and 5.x write ``_rlnJobTypeLabel`` under ``# version 30001`` / ``50001``."""
    if job is None:
        return None
    if job.header_version is not None and job.header_version >= 50001:
        return "5"
    if job.job_type_label is not None:
        return "4"
    if job.job_type is not None:
        return "3.1"
    return None


def version_from_pipeline(text: str) -> str:
    """``default_pipeline.star``: ``# version 50001`` is 5.x; type labels without it are 4.x; otherwise 3.1."""
    m = _VERSION_HEADER.search(text)
    if m and int(m.group(1)) >= 50001:
        return "5"
    if "_rlnPipeLineNodeTypeLabel" in text or "_rlnPipeLineProcessTypeLabel" in text:
        return "4"
    return "3.1"


def parse_version(text: str) -> str | None:
    """A user's version override: ``3``, ``3.1``, ``4``, ``4.0``, ``5``, ``5.0``; ``auto`` or empty -> None."""
    t = text.strip().lower().lstrip("v")
    if t in ("", "auto"):
        return None
    major = t.split(".")[0]
    if major == "3":
        return "3.1"
    if major in ("4", "5"):
        return major
    raise ValueError(f"relion_version {text!r}: give 3.1, 4 or 5 (or auto)")


def detect_version(job_dir: str | Path, project_dir: str | Path = ".", override: str | None = None
                   ) -> tuple[str | None, str]:
    """The RELION major version running this job and how it was found: the override, ``<o>job.star``, then
    ``default_pipeline.star`` in the project directory. ``(None, ...)`` when nothing tells."""
    if override:
        return override, "relion_version parameter"
    v = version_from_job_star(read_job_star(job_dir))
    if v:
        return v, "job.star"
    pipeline = Path(project_dir) / "default_pipeline.star"
    try:
        return version_from_pipeline(pipeline.read_text(errors="replace")), "default_pipeline.star"
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None, "no job.star or default_pipeline.star"


class JobDir:
    """The ``--o`` directory: markers and the abort request."""

    def __init__(self, o: str):
        self.o = job_prefix(o)
        self.path = Path(self.o)

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def clear_exit_markers(self) -> None:
        """Remove exit markers of an earlier run (RELION does this itself; command-line runs need it too)."""
        for name in MARKERS:
            try:
                (self.path / name).unlink()
            except FileNotFoundError:
                pass

    def abort_requested(self) -> bool:
        return (self.path / ABORT_NOW).exists()

    def mark(self, marker: str) -> Path:
        if marker not in MARKERS:
            raise ValueError(f"not a RELION exit marker: {marker}")
        path = self.path / marker
        self.path.mkdir(parents=True, exist_ok=True)
        path.touch()
        return path

    def marker(self) -> str | None:
        """The exit marker present, if any."""
        return next((m for m in MARKERS if (self.path / m).exists()), None)
