"""crisp-relion end to end in-process on a tiny synthetic project (RELION 4 and 5 outputs, continue mode, model
reuse, probability maps, abort between micrographs). The real-RELION test is in test_relion_pipeliner.py."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from relion_external.cli import main

import relion_synth as rs

O = "External/job004/"
JOB_STAR = """# version {header}

data_job

_rlnJobTypeLabel             relion.external
_rlnJobIsContinue                       {cont}
_rlnJobIsTomo                           0

"""


pytestmark = pytest.mark.usefixtures("keep_torch_threads")  # crisp-relion sets threads (--j)


def _job_star(root: Path, o: str, version: str, cont: int) -> None:
    (root / o).mkdir(parents=True, exist_ok=True)
    (root / o / "job.star").write_text(JOB_STAR.format(header=50001 if version == "5" else 30001, cont=cont))


def _args(project, o=O, *extra):
    return ["--o", o, "--in_mics", project.mics_star, "--in_parts", project.parts_star, "--diameter", "84",
            "--set", rs.TINY_SETTINGS, "--save_maps", "--j", "1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run (RELION 4 job.star): the project and the job's stdout."""
    root = tmp_path_factory.mktemp("relion_job")
    p = rs.simulate(root, n_mics=5, shape=(384, 384))
    rs.write_micrographs_star(p, "CtfFind/job003/micrographs_ctf.star")
    rs.write_particles_star(p, "Select/job010/particles.star", on=p.names[:3])
    _job_star(root, O, "4", 0)
    import torch

    threads = torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        rc = main(_args(p))
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    assert rc == 0
    return p


@pytest.fixture()
def project(trained, tmp_path, monkeypatch):
    """A private copy of the trained project, cwd = its root."""
    root = tmp_path / "project"
    shutil.copytree(trained.root, root)
    monkeypatch.chdir(root)
    return rs.Project(root=root, names=trained.names, truth=trained.truth, defocus=trained.defocus,
                      mics_star=trained.mics_star, parts_star=trained.parts_star, curated=trained.curated)


def _coords(path) -> np.ndarray:
    table = starfile.read(path, always_dict=True)
    block = next(iter(table.values()), None)
    if block is None or len(block) == 0:
        return np.zeros((0, 5))
    return block[["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit", "rlnClassNumber",
                  "rlnAnglePsi"]].to_numpy(float)


def test_outputs_relion4(trained):
    root = trained.root
    job = root / O
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (job / "RELION_JOB_EXIT_FAILURE").exists()
    nodes_table = starfile.read(job / "RELION_OUTPUT_NODES.star")
    assert list(nodes_table["rlnPipeLineNodeName"]) == [O + "autopick.star"]
    assert list(nodes_table["rlnPipeLineNodeTypeLabel"]) == ["MicrographsCoords.star.relion.autopick"]
    assert (job / "coords_suffix_autopick.star").read_text() == trained.mics_star + "\n"
    listing = starfile.read(job / "autopick.star", always_dict=True)["coordinate_files"]
    assert list(listing["rlnMicrographName"]) == trained.names  # verbatim, in --in_mics order
    expected = [O + "Movies/" + Path(n).stem + "_autopick.star" for n in trained.names]
    assert list(listing["rlnMicrographCoordinates"]) == expected
    found, total = 0, 0
    for name, f in zip(trained.names, expected):
        c = _coords(root / f)
        assert (c[:, 0] >= 0).all() and (c[:, 0] < 384).all() and (c[:, 1] >= 0).all() and (c[:, 1] < 384).all()
        assert (c[:, 2] >= -5).all() and (c[:, 2] <= 10).all() and (c[:, 3] == 0).all() and (c[:, 4] == 0).all()
        d = rs.match(c[:, :2], trained.truth[name], radius=0.5 * 28)
        found += len(d)
        total += len(trained.truth[name])
        prob = root / O / "Movies" / (Path(name).stem + "_probability.mrc")
        with mrcfile.open(prob) as m:
            assert m.data.ndim == 2 and 0 <= float(m.data.min()) and float(m.data.max()) <= 1
    assert found / total >= 0.9, f"recall {found}/{total}"
    assert (job / "model" / "model.json").is_file()
    assert list((job / "plots").glob("picks_*.png"))
    summary = json.loads((job / "summary.json").read_text())
    assert summary["relion_version"] == "4" and summary["micrographs_with_coordinates"] == 5
    assert summary["particles"] == sum(len(_coords(root / f)) for f in expected)


def test_continue_picks_only_what_is_missing(project, capsys):
    job = project.root / O
    files = sorted((job / "Movies").glob("*_autopick.star"))
    gone = files[2]
    before = {f: f.stat().st_mtime_ns for f in files if f != gone}
    gone.unlink()
    weights = (job / "model" / "weights.pt").stat().st_mtime_ns
    (job / "RELION_OUTPUT_NODES.star").unlink()
    _job_star(project.root, O, "4", 1)
    time.sleep(0.01)
    assert main(_args(project)) == 0
    out = capsys.readouterr().out
    assert "reusing the model" in out and "4 micrograph(s) already have coordinates" in out
    assert gone.is_file() and (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert {f: f.stat().st_mtime_ns for f in before} == before
    assert (job / "model" / "weights.pt").stat().st_mtime_ns == weights
    assert len(starfile.read(job / "autopick.star")) == 5
    assert (job / "RELION_OUTPUT_NODES.star").is_file()


def test_model_reuse_in_a_new_job_relion5(project, capsys):
    o = "External/job005/"
    _job_star(project.root, o, "5", 0)
    args = ["--o", o, "--in_mics", project.mics_star, "--model", O + "model", "--pickname", "crisp", "--j", "1"]
    assert main(args) == 0
    job = project.root / o
    text = (job / "RELION_OUTPUT_NODES.star").read_text()
    assert text.startswith("# version 50001")
    table = starfile.read(job / "RELION_OUTPUT_NODES.star")
    assert list(table["rlnPipeLineNodeName"]) == [o + "crisp.star"]
    assert list(table["rlnPipeLineNodeTypeLabel"]) == ["MicrographCoordsGroup.star.relion.autopick"]
    assert not (job / "model").exists()  # nothing trained
    for name in project.names:
        stem = Path(name).stem
        new = _coords(job / "Movies" / f"{stem}_crisp.star")
        old = _coords(project.root / O / "Movies" / f"{stem}_autopick.star")
        assert new.shape == old.shape
        np.testing.assert_allclose(new[:, :3], old[:, :3], atol=0.05)


def test_abort_between_micrographs(project, capsys):
    o = "External/job006/"
    job = project.root / o
    _job_star(project.root, o, "4", 0)
    first = job / "Movies" / "mic001_autopick.star"

    def watch():
        deadline = time.time() + 120
        while not first.exists() and time.time() < deadline:
            time.sleep(0.002)
        (job / "RELION_JOB_ABORT_NOW").touch()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        rc = main(["--o", o, "--in_mics", project.mics_star, "--model", O + "model", "--j", "1"])
    finally:
        watcher.join()
    assert rc != 0
    assert (job / "RELION_JOB_EXIT_ABORTED").exists()
    assert not (job / "RELION_JOB_EXIT_SUCCESS").exists() and not (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (job / "RELION_OUTPUT_NODES.star").exists() and not (job / "autopick.star").exists()
    done = list((job / "Movies").glob("*_autopick.star"))
    assert 1 <= len(done) < 5
    assert not list((job / "Movies").glob(".*tmp*"))  # every file whole


def test_a_particle_larger_than_a_micrograph_fails_the_job_before_training(project, capsys):
    """RELION goes through pipeline.run, which checks every micrograph's header and the particle size first."""
    import crisp_ext.train as train_module

    o = "External/job007/"
    _job_star(project.root, o, "4", 0)
    calls = []
    mp = pytest.MonkeyPatch()
    mp.setattr(train_module, "train_model", lambda *a, **k: calls.append(1))
    t0 = time.perf_counter()
    try:
        # 384 px micrographs at the synthetic pixel size: a 5000 Å particle is far wider than any of them
        rc = main(["--o", o, "--in_mics", project.mics_star, "--in_parts", project.parts_star, "--diameter", "5000",
                   "--j", "1"])
    finally:
        mp.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not calls and time.perf_counter() - t0 < 30
    assert len(err) == 1 and "diameter" in err[0] and "mic001" in err[0], err
    job = project.root / o
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and not (job / "model").exists()
    assert not (job / "RELION_OUTPUT_NODES.star").exists()
