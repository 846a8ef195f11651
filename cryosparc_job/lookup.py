"""Finding the project, workspace and source outputs on a live instance, with one-line errors naming the uid."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryosparc.errors import APIError

from .connect import CryoSPARCError, error_text

# What each kind of source must provide: the output type and the slot the picker reads.
KINDS = {
    "exposure": ("micrograph_blob",
                 ("exposures (e.g. Patch CTF 'exposures' or Curate Exposures 'exposures_accepted')")),
    "particle": ("location",
                 ("particles with locations (e.g. Select 2D 'particles_selected', a picker's or Extract's "
                  "'particles')")),
}
_UID = {"project": r"P\d+", "workspace": r"W\d+", "job": r"J\d+"}


@dataclass(frozen=True)
class Source:
    """A job output: ``job`` uid and ``output`` name (None: the job's only output of the right kind)."""

    job: str
    output: str | None = None

    @classmethod
    def parse(cls, value) -> Source:
        """From ``("J12", "particles_selected")``, ``"J12"``, or ``"J12:particles_selected"`` (``.`` or ``/`` also
        separate)."""
        if isinstance(value, Source):
            return value
        if isinstance(value, (tuple, list)):
            if len(value) not in (1, 2):
                raise CryoSPARCError(f"source {value!r}: give (job_uid, output_name), e.g. ('J12', "
                                     f"'particles_selected')")
            job, output = (value[0], value[1] if len(value) == 2 else None)
        else:
            parts = re.split(r"[:./]", str(value).strip(), maxsplit=1)
            job, output = parts[0], (parts[1] if len(parts) == 2 else None)
        job = check_uid("job", str(job).strip())
        output = str(output).strip() if output else None
        if output is not None and not re.fullmatch(r"[A-Za-z][0-9A-Za-z_]*", output):
            raise CryoSPARCError(f"output name {output!r} of {job} is not valid: letters, digits and underscores, "
                                 f"e.g. particles_selected")
        return cls(job, output)

    def __str__(self) -> str:
        return f"{self.job}:{self.output}" if self.output else self.job


@dataclass(frozen=True)
class Found:
    """A located source: the job controller, the output name and the output's slot names."""

    job: object
    output: str
    slots: frozenset[str]

    @property
    def label(self) -> str:
        return f"{self.job.uid}:{self.output}"


def check_uid(kind: str, uid: str) -> str:
    uid = str(uid).strip().upper()
    if not re.fullmatch(_UID[kind], uid):
        example = {"project": "P3", "workspace": "W1", "job": "J12"}[kind]
        raise CryoSPARCError(f"{kind} uid {uid!r} is not valid: give it as shown in CryoSPARC, e.g. {example}")
    return uid


def _not_found(exc: APIError) -> bool:
    return exc.code == 404


def find_project(cs, project_uid: str):
    project_uid = check_uid("project", project_uid)
    try:
        return cs.find_project(project_uid)
    except APIError as exc:
        if _not_found(exc):
            raise CryoSPARCError(f"project {project_uid} not found on {cs.base_url}: check the project uid "
                                 f"(P<number>, shown in the CryoSPARC projects list)") from None
        raise CryoSPARCError(f"cannot open project {project_uid}: {error_text(exc)}") from None


def find_workspace(cs, project_uid: str, workspace_uid: str):
    workspace_uid = check_uid("workspace", workspace_uid)
    try:
        return cs.find_workspace(project_uid, workspace_uid)
    except APIError as exc:
        if _not_found(exc):
            raise CryoSPARCError(f"workspace {workspace_uid} not found in project {project_uid}: give an existing "
                                 f"workspace uid (W<number>)") from None
        raise CryoSPARCError(f"cannot open workspace {workspace_uid}: {error_text(exc)}") from None


def output_slots(output) -> frozenset[str]:
    """Slot names an output provides: declared slots and saved results (passthroughs included)."""
    return frozenset([s.name for s in output.slots] + [r.name for r in output.results if r.name])


def find_source(project, source, kind: str) -> Found:
    """The job and output for ``source``, checked to be of ``kind`` ("exposure" or "particle"), to have the slot
    the picker reads, and to hold saved data."""
    source = Source.parse(source)
    slot, what = KINDS[kind]
    try:
        job = project.find_job(source.job)
    except APIError as exc:
        if _not_found(exc):
            raise CryoSPARCError(f"job {source.job} not found in project {project.uid}: check the job uid (J<number>) "
                                 f"of the {what}") from None
        raise CryoSPARCError(f"cannot open job {source.job}: {error_text(exc)}") from None
    outputs = dict(job.outputs)
    if source.output is None:
        fitting = [n for n, o in outputs.items() if o.type == kind and slot in output_slots(o)]
        if len(fitting) != 1:
            listed = ", ".join(outputs) or "none"
            raise CryoSPARCError(f"job {job.uid} has {'no' if not fitting else 'several'} {kind} outputs with a "
                                 f"{slot} slot (outputs: {listed}); give one as {job.uid}:OUTPUT_NAME")
        name = fitting[0]
    else:
        name = source.output
        if name not in outputs:
            raise CryoSPARCError(f"job {job.uid} has no output {name!r} (outputs: {', '.join(outputs) or 'none'}); "
                                 f"give {what}")
    output = outputs[name]
    slots = output_slots(output)
    if slot not in slots:
        raise CryoSPARCError(f"output {job.uid}:{name} has no {slot} slot (slots: {', '.join(sorted(slots))}); "
                             f"give {what}")
    if not any(r.metafiles for r in output.results):
        raise CryoSPARCError(f"output {job.uid}:{name} holds no saved data (job status: {job.status}); wait for "
                             f"the job to complete or give another output")
    return Found(job, name, slots)
