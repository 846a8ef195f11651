"""cryoSPARC datasets and project-directory files for tests: slot field tables, seeded
exposures/particles built with the real ``cryosparc.dataset.Dataset``, and ``job.json`` in the
v4 (flat ``output_results``) and v5 (``spec.outputs``) layouts.

Field names and dtypes follow the v4 server's ``min_fields`` (cryosparc-tools v4.7.1 test
fixtures) and real ``.cs`` files; see ``/work/shared/reference/cryosparc.md`` §7.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from cryosparc.dataset import Dataset

# Per slot dtype: (field, dtype) pairs in v4 ``min_fields`` notation ("2u4" = two uint32).
SLOT_FIELDS: dict[str, list[tuple[str, str]]] = {
    "location": [
        ("micrograph_uid", "u8"),
        ("exp_group_id", "u4"),
        ("micrograph_path", "O"),
        ("micrograph_shape", "2u4"),
        ("center_x_frac", "f4"),
        ("center_y_frac", "f4"),
    ],
    "pick_stats": [("ncc_score", "f4"), ("power", "f4"), ("template_idx", "u4"), ("angle_rad", "f4")],
    "micrograph_blob": [
        ("path", "O"),
        ("idx", "u4"),
        ("shape", "2u4"),
        ("psize_A", "f4"),
        ("format", "O"),
        ("is_background_subtracted", "u4"),
        ("vmin", "f4"),
        ("vmax", "f4"),
        ("import_sig", "u8"),
    ],
    "ctf": [
        ("type", "O"),
        ("exp_group_id", "u4"),
        ("accel_kv", "f4"),
        ("cs_mm", "f4"),
        ("amp_contrast", "f4"),
        ("df1_A", "f4"),
        ("df2_A", "f4"),
        ("df_angle_rad", "f4"),
        ("phase_shift_rad", "f4"),
        ("scale", "f4"),
        ("scale_const", "f4"),
        ("shift_A", "2f4"),
        ("tilt_A", "2f4"),
        ("trefoil_A", "2f4"),
        ("tetra_A", "4f4"),
        ("anisomag", "4f4"),
        ("bfactor", "f4"),
    ],
    "blob": [
        ("path", "O"),
        ("idx", "u4"),
        ("shape", "2u4"),
        ("psize_A", "f4"),
        ("sign", "f4"),
        ("import_sig", "u8"),
    ],
    "alignments3D": [
        ("split", "u4"),
        ("shift", "2f4"),
        ("pose", "3f4"),
        ("psize_A", "f4"),
        ("error", "f4"),
        ("error_min", "f4"),
        ("resid_pow", "f4"),
        ("slice_pow", "f4"),
        ("image_pow", "f4"),
        ("cross_cor", "f4"),
        ("alpha", "f4"),
        ("alpha_min", "f4"),
        ("weight", "f4"),
        ("pose_ess", "f4"),
        ("shift_ess", "f4"),
        ("class_posterior", "f4"),
        ("class", "u4"),
        ("class_ess", "f4"),
    ],
}

# Present in real particle ``location`` data beyond the v4 minimum (newer servers).
EXTRA_LOCATION_FIELDS = [("micrograph_psize_A", "f4"), ("min_dist_A", "f4")]

DEFAULT_CTF = {
    "accel_kv": 300.0,
    "cs_mm": 2.7,
    "amp_contrast": 0.1,
    "df1_A": 15000.0,
    "df2_A": 14500.0,
    "df_angle_rad": 0.3,
    "phase_shift_rad": 0.0,
}


def slot_fields(prefix: str, dtype: str, table: Mapping[str, Sequence[tuple[str, str]]] = SLOT_FIELDS):
    """``[(f"{prefix}/{field}", dtype), ...]`` for a slot of the given dtype; KeyError if unknown."""
    return [(f"{prefix}/{name}", dt) for name, dt in table[dtype]]


def v4_dtype(dtype: str, shape: tuple = ()) -> str:
    """numpy dtype + shape as a v4 ``min_fields`` string, e.g. ('<u4', (2,)) -> '2u4'."""
    base = np.dtype(dtype)
    code = "O" if base.kind == "O" else base.str.lstrip("<>|=")
    if not shape:
        return code
    dims = str(shape[0]) if len(shape) == 1 else "(" + ",".join(map(str, shape)) + ")"
    return dims + code


def same_dtype(announced: str, descr_entry: tuple) -> bool:
    """Whether a Dataset ``descr()`` entry has the dtype (and shape) announced for its field."""
    want = np.dtype(announced)
    have_shape = tuple(descr_entry[2]) if len(descr_entry) > 2 else ()
    return want.base == np.dtype(descr_entry[1]) and tuple(want.shape) == have_shape


def prefix_of(field: str) -> str:
    return field.split("/", 1)[0]


def exposures_dataset(
    paths: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    psize_A: float | Sequence[float],
    *,
    uids: Sequence[int] | None = None,
    exp_group_id: int | Sequence[int] = 1,
    ctf: Mapping[str, float | Sequence[float]] | None = None,
    with_ctf: bool = True,
    vmin_vmax: Sequence[tuple[float, float]] | None = None,
) -> Dataset:
    """Exposure rows (``micrograph_blob`` [+ ``ctf``]) as a Patch CTF job outputs them.

    ``shapes`` are (ny, nx); ``ctf`` values override DEFAULT_CTF, scalars or one per exposure.
    """
    n = len(paths)
    if len(shapes) != n:
        raise ValueError(f"{len(shapes)} shapes for {n} micrograph paths")
    fields = [("uid", "<u8")] + slot_fields("micrograph_blob", "micrograph_blob")
    if with_ctf:
        fields += slot_fields("ctf", "ctf")
    dset = Dataset.allocate(n, fields)
    if uids is not None:
        dset["uid"] = np.asarray(uids, dtype=np.uint64)
    dset["micrograph_blob/path"] = list(paths)
    dset["micrograph_blob/shape"] = np.asarray(shapes, dtype=np.uint32).reshape(n, 2)
    dset["micrograph_blob/psize_A"] = np.broadcast_to(np.asarray(psize_A, dtype=np.float32), (n,))
    dset["micrograph_blob/format"] = ["MRC/2"] * n
    dset["micrograph_blob/import_sig"] = np.arange(1, n + 1, dtype=np.uint64) * 7919
    if vmin_vmax is not None:
        dset["micrograph_blob/vmin"] = [v[0] for v in vmin_vmax]
        dset["micrograph_blob/vmax"] = [v[1] for v in vmin_vmax]
    if with_ctf:
        dset["ctf/type"] = ["spline"] * n
        dset["ctf/exp_group_id"] = np.broadcast_to(np.asarray(exp_group_id, dtype=np.uint32), (n,))
        values = {**DEFAULT_CTF, **(ctf or {})}
        for key, value in values.items():
            if f"ctf/{key}" not in dset:
                raise ValueError(f"unknown CTF field {key!r}; known: {sorted(DEFAULT_CTF)}")
            dset[f"ctf/{key}"] = np.broadcast_to(np.asarray(value, dtype=np.float32), (n,))
        dset["ctf/scale"] = 1.0
        dset["ctf/scale_const"] = 0
        dset["ctf/anisomag"] = np.tile(np.array([1, 0, 0, 1], dtype=np.float32), (n, 1))
    return dset


def particles_dataset(
    exposures: Dataset,
    coords: Sequence[np.ndarray],
    *,
    min_dist_A: float = 100.0,
    extra_location_fields: bool = True,
    poses: np.ndarray | None = None,
    shifts: np.ndarray | None = None,
) -> Dataset:
    """Particle rows with ``location`` (+ ``alignments3D`` when ``poses`` is given).

    ``coords[i]`` holds (x, y) pixel positions (x = column, y = row) on exposure row ``i``;
    they are stored as ``center_x_frac = x / nx``, ``center_y_frac = y / ny`` (no flip).
    """
    if len(coords) != len(exposures):
        raise ValueError(f"{len(coords)} coordinate arrays for {len(exposures)} exposures")
    arrays = [np.asarray(c, dtype=np.float64).reshape(-1, 2) for c in coords]
    counts = [len(a) for a in arrays]
    total = sum(counts)
    fields = [("uid", "<u8")] + slot_fields("location", "location")
    if extra_location_fields:
        fields += [(f"location/{name}", dt) for name, dt in EXTRA_LOCATION_FIELDS]
    if poses is not None:
        fields += slot_fields("alignments3D", "alignments3D")
    dset = Dataset.allocate(total, fields)
    if total == 0:
        return dset
    row = np.repeat(np.arange(len(exposures)), counts)
    xy = np.concatenate(arrays)
    shapes = np.asarray(exposures["micrograph_blob/shape"])[row]  # (ny, nx)
    dset["location/micrograph_uid"] = np.asarray(exposures["uid"])[row]
    if "ctf/exp_group_id" in exposures:
        dset["location/exp_group_id"] = np.asarray(exposures["ctf/exp_group_id"])[row]
    dset["location/micrograph_path"] = [exposures["micrograph_blob/path"][i] for i in row]
    dset["location/micrograph_shape"] = shapes
    dset["location/center_x_frac"] = (xy[:, 0] / shapes[:, 1]).astype(np.float32)
    dset["location/center_y_frac"] = (xy[:, 1] / shapes[:, 0]).astype(np.float32)
    if extra_location_fields:
        dset["location/micrograph_psize_A"] = np.asarray(exposures["micrograph_blob/psize_A"])[row]
        dset["location/min_dist_A"] = min_dist_A
    if poses is not None:
        poses = np.asarray(poses, dtype=np.float32).reshape(total, 3)
        dset["alignments3D/pose"] = poses
        dset["alignments3D/shift"] = (
            np.zeros((total, 2), np.float32) if shifts is None else np.asarray(shifts, np.float32).reshape(total, 2)
        )
        dset["alignments3D/psize_A"] = dset["location/micrograph_psize_A"] if extra_location_fields else 1.0
        dset["alignments3D/weight"] = 1.0
        dset["alignments3D/class_posterior"] = 1.0
        dset["alignments3D/split"] = np.arange(total, dtype=np.uint32) % 2
    return dset


# ---- job.json -------------------------------------------------------------------------------


def _min_fields(dtype: str) -> list[list[str]]:
    return [list(pair) for pair in SLOT_FIELDS.get(dtype, [])]


def v4_job_document(job) -> dict:
    """A cryoSPARC v4 ``job.json`` document (flat ``output_results``) for a v5 ``Job`` model."""
    spec = job.spec
    output_results, groups = [], []
    result_num = 0
    for gi, (name, out) in enumerate(spec.outputs.root.items(), start=1):
        contains = []
        for res in out.results:
            result_num += 1
            uid = f"{job.uid}-R{result_num}"
            entry = {
                "uid": uid,
                "type": f"{out.type}.{res.dtype}",
                "group_name": name,
                "name": res.name,
                "title": res.name,
                "description": "",
                "min_fields": _min_fields(res.dtype),
                "versions": list(res.versions),
                "metafiles": list(res.metafiles),
                "num_items": list(res.num_items),
                "passthrough": res.passthrough,
            }
            output_results.append(entry)
            contains.append({k: entry[k] for k in ("uid", "type", "name", "group_name", "passthrough")})
        groups.append(
            {
                "uid": f"{job.uid}-G{gi}",
                "type": out.type,
                "name": name,
                "title": out.title,
                "description": out.description,
                "contains": contains,
                "passthrough": out.passthrough or False,
                "num_items": out.num_items,
                "summary": dict(out.summary),
            }
        )
    input_groups = []
    for name, inp in spec.inputs.root.items():
        input_groups.append(
            {
                "type": inp.type,
                "name": name,
                "title": inp.title,
                "description": inp.description,
                "count_min": inp.count_min,
                "count_max": None if inp.count_max == "inf" else inp.count_max,
                "repeat_allowed": inp.repeat_allowed,
                "slots": [
                    {
                        "type": f"{inp.type}.{s.dtype}",
                        "name": s.name,
                        "title": s.name,
                        "description": "",
                        "optional": not s.required,
                    }
                    for s in inp.slots
                ],
                "connections": [
                    {
                        "job_uid": c.job_uid,
                        "group_name": c.output,
                        "slots": [
                            {
                                "slot_name": r.name,
                                "job_uid": r.job_uid,
                                "group_name": r.output,
                                "result_name": r.result,
                                "result_type": f"{inp.type}.{r.dtype}",
                                "version": r.version,
                            }
                            for r in c.results
                        ],
                    }
                    for c in inp.connections
                ],
            }
        )
    return {
        "_id": job.id,
        "uid": job.uid,
        "uid_num": job.uid_num,
        "project_uid": job.project_uid,
        "project_uid_num": job.project_uid_num,
        "type": spec.type,
        "job_type": spec.type,
        "title": job.title,
        "description": job.description,
        "status": job.status,
        "created_at": job.created_at.isoformat(),
        "created_by_user_id": job.created_by_user_id,
        "deleted": job.deleted,
        "parents": list(job.parents),
        "children": list(job.children),
        "workspace_uids": list(job.workspace_uids),
        "input_slot_groups": input_groups,
        "output_result_groups": groups,
        "output_results": output_results,
        "params_base": {},
        "params_spec": {},
        "errors_run": [e.model_dump(mode="json") for e in job.errors_run],
        "version": job.version,
    }


def v5_job_document(job) -> dict:
    """The v5 layout: the ``Job`` model itself (outputs under ``spec.outputs.<name>.results``)."""
    return job.model_dump(mode="json", by_alias=True)


def write_job_json(project_dir: Path, job, layout: str = "v4") -> Path:
    """Write ``<project_dir>/<job_dir>/job.json`` in the "v4" or "v5" layout; returns its path."""
    if layout not in ("v4", "v5"):
        raise ValueError(f"job.json layout must be 'v4' or 'v5', not {layout!r}")
    doc = v4_job_document(job) if layout == "v4" else v5_job_document(job)
    path = Path(project_dir) / PurePosixPath(job.job_dir) / "job.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path
