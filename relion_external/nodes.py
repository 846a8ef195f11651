"""What the job writes for RELION: coordinate file names, the coordinate STARs, the node files.

Facts (verified with RELION 3.1.3, 4.0.1 and 5.0.1; see the project's RELION reference):

- Extract finds a micrograph's coordinates at ``<coord_dir> + post(rlnMicrographName).withoutExtension() +
  <suffix>``, where ``post`` drops everything up to and including the first ``.../jobNNN/`` and
  ``withoutExtension`` cuts at the last ``.`` of the whole string. These are string operations, not path joins.
- 3.1 reads the node ``<o>coords_suffix_<pickname>.star`` (node type 2, content: the micrographs STAR path).
- 4.x/5.x read the node ``<o><pickname>.star``, a ``data_coordinate_files`` table of rlnMicrographName (byte for
  byte as in the micrographs STAR) and rlnMicrographCoordinates, with the node label of their own version.
- ``RELION_OUTPUT_NODES.star`` must carry the type (3.1) or label (4.x, 5.x) the running version expects; when the
  version is unknown, one row with both the int type and the 5.x label on the coords_suffix file is accepted by 3.1
  (it ignores the label) and 5.x.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from crisp_ext.errors import InputError
from crisp_ext.io.atomic import atomic_write_text
from crisp_ext.io.star import format_star

OUTPUT_NODES = "RELION_OUTPUT_NODES.star"
COORDS_TYPE_31 = 2  # 3.1's int node type for coordinates
COORDS_LABEL = {
    "4": "MicrographsCoords.star.relion.autopick",
    "5": "MicrographCoordsGroup.star.relion.autopick",
}
VERSIONS = ("3.1", "4", "5")


def job_prefix(o: str) -> str:
    """``--o`` as RELION spells it in node names: as given, with one trailing slash."""
    return o.rstrip("/") + "/"


def post(name: str) -> str:
    """RELION's ``decomposePipelineFileName`` tail: ``MotionCorr/job002/Movies/m.mrc`` -> ``Movies/m.mrc``.

    The first ``/`` followed by ``job`` and three digits marks the job directory; everything up to the next ``/``
    after it is dropped. RELION scans the slashes after the first character, then (through an index wrap-around)
    the start of the string, so ``job001/m.mrc`` also gives ``m.mrc``. A name without a job directory is returned
    whole.
    """
    starts = [i + 1 for i in range(1, len(name)) if name[i] == "/"] + [0]
    for s in starts:
        if name[s:s + 3] == "job" and name[s + 3:s + 6].isdigit() and len(name[s + 3:s + 6]) == 3:
            end = name.find("/", s + 5)
            return "" if end < 0 else name[end + 1:]
    return name


def without_extension(name: str) -> str:
    """RELION's ``withoutExtension``: everything before the last ``.`` of the string (or the string)."""
    dot = name.rfind(".")
    return name if dot < 0 else name[:dot]


def coordinate_file(o: str, micrograph_name: str, pickname: str) -> str:
    """The coordinate file Extract reads for ``micrograph_name`` (a path relative to the project, as a string)."""
    rel = without_extension(post(micrograph_name))
    if ".." in Path(rel.lstrip("/")).parts:
        raise InputError(f"micrograph name {micrograph_name!r} climbs out of its directory ('..'); RELION would "
                         f"place its coordinates outside the job directory. Import the micrographs with paths inside "
                         f"the project")
    return job_prefix(o) + rel + f"_{pickname}.star"


def sibling_file(o: str, micrograph_name: str, suffix: str) -> str:
    """A per-micrograph file next to its coordinates, e.g. the probability map ``<...>_probability.mrc``."""
    return job_prefix(o) + without_extension(post(micrograph_name)) + suffix


def coords_suffix_node(o: str, pickname: str) -> str:
    return job_prefix(o) + f"coords_suffix_{pickname}.star"


def coordinate_list_node(o: str, pickname: str) -> str:
    return job_prefix(o) + f"{pickname}.star"


def star_version(version: str | None) -> int:
    """The ``# version`` header RELION itself writes (4.x keeps 30001)."""
    return 50001 if version == "5" else 30001


# -- file contents --------------------------------------------------------------------------------------------------

def format_coordinates(xy: np.ndarray, fom: np.ndarray, version: str | None = None) -> str:
    """One micrograph's picks as ``relion_autopick`` writes them: X, Y, FOM, class 0, psi 0 (header-only when
    empty, which Extract reads as "no particles on micrograph")."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    fom = np.asarray(fom, dtype=np.float64).reshape(-1)
    if len(fom) != len(xy):
        raise ValueError(f"{len(xy)} coordinates but {len(fom)} figures of merit")
    table = {
        "rlnCoordinateX": xy[:, 0],
        "rlnCoordinateY": xy[:, 1],
        "rlnAutopickFigureOfMerit": fom,
        "rlnClassNumber": np.zeros(len(xy), dtype=int),
        "rlnAnglePsi": np.zeros(len(xy)),
    }
    return format_star({"": table}, loops=[""], version=star_version(version))


def format_coordinate_list(entries: Sequence[tuple[str, str]], version: str | None = None) -> str:
    """The 4/5 node: ``data_coordinate_files`` with (micrograph name, coordinate file) rows."""
    table = {
        "rlnMicrographName": np.array([e[0] for e in entries], dtype=object),
        "rlnMicrographCoordinates": np.array([e[1] for e in entries], dtype=object),
    }
    return format_star({"coordinate_files": table}, loops=["coordinate_files"], version=star_version(version))


def format_output_nodes(o: str, pickname: str, version: str | None) -> str:
    """``RELION_OUTPUT_NODES.star`` for the running version (``None``: the form 3.1 and 5.x both accept)."""
    if version == "3.1":
        table = {"rlnPipeLineNodeName": [coords_suffix_node(o, pickname)], "rlnPipeLineNodeType": [COORDS_TYPE_31]}
    elif version in COORDS_LABEL:
        table = {"rlnPipeLineNodeName": [coordinate_list_node(o, pickname)],
                 "rlnPipeLineNodeTypeLabel": [COORDS_LABEL[version]]}
    elif version is None:
        table = {"rlnPipeLineNodeName": [coords_suffix_node(o, pickname)], "rlnPipeLineNodeType": [COORDS_TYPE_31],
                 "rlnPipeLineNodeTypeLabel": [COORDS_LABEL["5"]]}
    else:
        raise ValueError(f"unknown RELION version {version!r} (expected one of {', '.join(VERSIONS)} or None)")
    table = {k: np.array(v, dtype=object) for k, v in table.items()}
    return format_star({"output_nodes": table}, loops=["output_nodes"], version=star_version(version))


# -- writing --------------------------------------------------------------------------------------------------------

def write_coordinates(path: str, xy: np.ndarray, fom: np.ndarray, version: str | None = None) -> Path:
    """Write one coordinate STAR atomically (parent directories are created)."""
    return atomic_write_text(Path(path), format_coordinates(xy, fom, version))


def write_nodes(o: str, pickname: str, in_mics: str, entries: Iterable[tuple[str, str]],
                version: str | None) -> list[Path]:
    """Write both node files, then ``RELION_OUTPUT_NODES.star`` last (each atomically). ``entries``: (micrograph
    name, coordinate file) of every micrograph that has a coordinate file."""
    entries = list(entries)
    written = [
        atomic_write_text(Path(coordinate_list_node(o, pickname)), format_coordinate_list(entries, version)),
        atomic_write_text(Path(coords_suffix_node(o, pickname)), in_mics + "\n"),
        atomic_write_text(Path(job_prefix(o) + OUTPUT_NODES), format_output_nodes(o, pickname, version)),
    ]
    return written


def remove_output_nodes(o: str) -> None:
    """Drop a ``RELION_OUTPUT_NODES.star`` left by an earlier run: it is rewritten only when this run succeeds."""
    try:
        os.unlink(job_prefix(o) + OUTPUT_NODES)
    except FileNotFoundError:
        pass
