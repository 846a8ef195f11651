"""crisp-relion inputs (micrographs, curated particles, coordinate nodes) and the paths that end a job before any
training: failures and a pending abort. Every such job must end with its RELION marker and no output node."""

from __future__ import annotations

import numpy as np
import pytest

from crisp_ext.errors import InputError
from crisp_ext.io.coords import write_coordinates
from crisp_ext.io.star import write_star
from relion_external.cli import main
from relion_external.inputs import check_micrographs, read_coords, read_micrographs, read_particles

import relion_synth as rs

O = "External/job004/"


pytestmark = pytest.mark.usefixtures("keep_torch_threads")  # crisp-relion sets threads (--j)


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """Three small micrographs, a micrographs STAR and a curated particles STAR, cwd = project directory."""
    monkeypatch.chdir(tmp_path)
    p = rs.simulate(tmp_path, n_mics=3, shape=(192, 192))
    rs.write_micrographs_star(p, "CtfFind/job003/micrographs_ctf.star")
    rs.write_particles_star(p, "Select/job010/particles.star", on=p.names[:2])
    return p


def test_micrographs_and_particles(project):
    mics = check_micrographs(read_micrographs(project.mics_star), project.mics_star)
    assert [m.id for m in mics] == project.names
    assert all(m.pixel_size == rs.PIXEL_SIZE and m.shape == (192, 192) for m in mics)
    parts = read_particles(project.parts_star, mics, project.mics_star)
    for name in project.names[:2]:
        got = parts.for_micrograph(name).xy
        # centre = coordinate − origin Å / *micrograph* pixel size (the particles' image pixel size is 2× larger)
        np.testing.assert_allclose(got, project.curated[name], atol=0.006)
    assert set(parts.micrograph_ids()) == set(project.names[:2])


def test_particles_on_other_micrographs_are_left_out(project):
    mics = read_micrographs(project.mics_star)
    logged = []
    kept = read_particles(project.parts_star, [m for m in mics if m.id != project.names[0]], project.mics_star,
                          logged.append)
    assert set(kept.micrograph_ids()) == {project.names[1]}
    assert logged and "not in --in_mics" in logged[0]
    with pytest.raises(InputError, match="none of its micrographs"):
        read_particles(project.parts_star, [m for m in mics if m.id == project.names[2]], project.mics_star)


def test_particle_names_match_after_normalisation(project):
    mics = read_micrographs(project.mics_star)
    renamed = [m.with_(id="./" + m.id) for m in mics]
    parts = read_particles(project.parts_star, renamed, project.mics_star)
    assert set(parts.micrograph_ids()) == {"./" + n for n in project.names[:2]}


def test_coordinates_node_31_and_list(project):
    mics = read_micrographs(project.mics_star)
    # 3.1: coords_suffix file; coordinates at <dir>/post(name).withoutExtension()_manualpick.star
    (project.root / "ManualPick/job005").mkdir(parents=True)
    (project.root / "ManualPick/job005/coords_suffix_manualpick.star").write_text(project.mics_star + "\n")
    write_coordinates("ManualPick/job005/Movies/mic001_manualpick.star", project.truth[project.names[0]])
    write_coordinates("ManualPick/job005/Movies/mic003_manualpick.star", project.truth[project.names[2]][:5])
    parts = read_coords("ManualPick/job005/coords_suffix_manualpick.star", mics, project.mics_star)
    assert parts.micrograph_ids() == [project.names[0], project.names[2]]
    np.testing.assert_allclose(parts.for_micrograph(project.names[0]).xy, project.truth[project.names[0]],
                               atol=1e-5)
    assert len(parts.for_micrograph(project.names[2])) == 5
    # 4/5: coordinate_files list
    write_star("ManualPick/job005/manualpick.star", {"coordinate_files": {
        "rlnMicrographName": np.array([project.names[1], "Elsewhere/mic9.mrc"], dtype=object),
        "rlnMicrographCoordinates": np.array(["ManualPick/job005/Movies/mic001_manualpick.star", "x.star"],
                                             dtype=object)}}, loops=["coordinate_files"])
    logged = []
    parts = read_coords("ManualPick/job005/manualpick.star", mics, project.mics_star, logged.append)
    assert parts.micrograph_ids() == [project.names[1]] and len(parts) == len(project.truth[project.names[0]])
    assert logged and "Elsewhere/mic9.mrc" in logged[0]
    with pytest.raises(InputError, match="neither a coords_suffix file nor a coordinate_files list"):
        read_coords(project.mics_star, mics, project.mics_star)


# -- jobs that end early ---------------------------------------------------------------------------------------------


def _run(capsys, *argv):
    rc = main(["--o", O, *argv, "--j", "1", "--pipeline_control", O])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_failed(project, rc, err, *words):
    job = project.root / O
    assert rc != 0
    assert (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (job / "RELION_OUTPUT_NODES.star").exists()
    assert not list(job.glob("coords_suffix_*")) and not (job / "autopick.star").exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("crisp-relion: error: "), err
    for w in words:
        assert w in lines[0], lines[0]


def test_fails_on_missing_micrographs_star(project, capsys):
    rc, out, err = _run(capsys, "--in_mics", "CtfFind/job003/nothere.star", "--in_parts", project.parts_star,
                        "--diameter", "84")
    _assert_failed(project, rc, err, "--in_mics", "nothere.star", "not found")


def test_fails_on_a_file_that_is_not_a_micrographs_star(project, capsys):
    (project.root / "bad.star").write_text("data_\nloop_\n_rlnSomethingElse #1\n1\n2\n")
    rc, out, err = _run(capsys, "--in_mics", "bad.star", "--in_parts", project.parts_star, "--diameter", "84")
    _assert_failed(project, rc, err, "--in_mics", "bad.star", "rlnMicrographName")


def test_fails_when_no_particle_is_on_a_given_micrograph(project, capsys):
    rs.write_micrographs_star(project, "CtfFind/job003/only3.star", names=project.names[2:])
    rc, out, err = _run(capsys, "--in_mics", "CtfFind/job003/only3.star", "--in_parts", project.parts_star,
                        "--diameter", "84")
    _assert_failed(project, rc, err, "--in_parts", "none of its micrographs", "only3.star")


def test_fails_on_an_unreadable_micrograph(project, capsys):
    path = project.root / project.names[1]
    path.write_bytes(path.read_bytes()[:3000])  # truncated MRC
    rc, out, err = _run(capsys, "--in_mics", project.mics_star, "--in_parts", project.parts_star, "--diameter", "84")
    _assert_failed(project, rc, err, project.names[1], "truncated")


def test_fails_without_training_data_or_diameter(project, capsys):
    rc, out, err = _run(capsys, "--in_mics", project.mics_star, "--diameter", "84")
    _assert_failed(project, rc, err, "nothing to train on")
    rc, out, err = _run(capsys, "--in_mics", project.mics_star, "--in_parts", project.parts_star)
    _assert_failed(project, rc, err, "diameter")
    rc, out, err = _run(capsys, "--in_mics", project.mics_star, "--in_parts", project.parts_star, "--diameter", "84",
                        "--threshold", "7")
    _assert_failed(project, rc, err, "threshold")


def test_a_pending_abort_ends_the_job_as_aborted(project, capsys):
    job = project.root / O
    job.mkdir(parents=True)
    (job / "RELION_JOB_ABORT_NOW").touch()
    (job / "RELION_JOB_EXIT_FAILURE").touch()  # stale marker of an earlier run
    rc, out, err = _run(capsys, "--in_mics", project.mics_star, "--in_parts", project.parts_star, "--diameter", "84")
    assert rc != 0
    assert (job / "RELION_JOB_EXIT_ABORTED").exists()
    assert not (job / "RELION_JOB_EXIT_FAILURE").exists() and not (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (job / "RELION_OUTPUT_NODES.star").exists()
    assert "aborted" in out


def test_missing_o_is_a_usage_error(capsys):
    assert main(["--in_mics", "x.star"]) != 0
    assert "--o" in capsys.readouterr().err
