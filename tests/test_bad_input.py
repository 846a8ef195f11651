"""Every bad input a new user tried (issue 15), one row each, per entry point where it applies: the exit code, one
line naming the file or option (no traceback), the inputs unchanged, no partial output. Then the cases that need a
sequence of runs: a pixel-size change under a trained model, a locked output folder, a run killed mid-write."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import test_cli as tc
from test_cli import NAMES, common, project, snapshot, temp_files, trained  # noqa: F401 (fixtures)

from crisp_ext.cli import main
from crisp_ext.io.coords import read_coordinates, write_coordinates
from crisp_ext.io.star import write_star

pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` made read-only, for root too (the immutable attribute), undone afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a folder read-only for root here (no chattr +i on this file system)")
        try:
            yield path
        finally:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


def picks_folder(project, dest: Path, change=None) -> Path:
    """A copy of the curated picks, optionally with ``change(folder)`` applied."""
    import shutil

    shutil.copytree(project.picks, dest)
    if change:
        change(dest)
    return dest


def _binned(folder: Path) -> None:  # every pick as if measured on a 2x larger micrograph
    for f in folder.glob("*.star"):
        write_coordinates(f, read_coordinates(f).xy * 2.0 + 300.0)


def _one_outside(folder: Path) -> None:
    f = sorted(folder.glob("*.star"))[0]
    xy = read_coordinates(f).xy
    write_coordinates(f, np.vstack([xy, [[5000.0, 10.0]]]))


def _garbage(folder: Path) -> None:
    (folder / f"{NAMES[3]}_manualpick.star").write_bytes(b"\xff\xfe\x00garbage\x81")


def _no_y(folder: Path) -> None:
    write_star(folder / f"{NAMES[3]}_manualpick.star", {"coords": {"rlnCoordinateX": [10.0, 20.0]}},
               loops=["coords"])


# name: (argv after the common options, expected exit, fragments of the one stderr line, picks folder change)
def train(project, out, picks, *extra):
    return ["train", "--mics", project.mics, "--picks", picks, "--diameter", "28px", "--out", out,
            *common(project), *extra]


CASES = {
    "every training pick outside its micrograph": (_binned, [], 2, ["outside their micrograph", "binning"]),
    "a garbage non-UTF-8 file among the picks": (_garbage, [], 2, [f"{NAMES[3]}_manualpick.star", "not a text"]),
    "a coordinate STAR without rlnCoordinateY": (_no_y, [], 2, [f"{NAMES[3]}_manualpick.star",
                                                               "_rlnCoordinateY"]),
    "--diameter 1px": (None, ["--diameter", "1px"], 2, ["1 px", "too small"]),
    "--diameter 0.001A": (None, ["--diameter", "0.001A"], 2, ["too small"]),
    "--diameter 200px (picks ~40 px apart)": (None, ["--diameter", "200px"], 2, ["nearest neighbour",
                                                                                "diameter given is too large"]),
    "--threads 0": (None, ["--threads", "0"], 2, ["--threads 0", ">= 1"]),
    "--threads -1": (None, ["--threads", "-1"], 2, ["--threads -1", ">= 1"]),
    "--set predict.tile=0": (None, ["--set", "predict.tile=0"], 2, ["predict.tile", ">= 32"]),
    "--set predict.tta=3": (None, ["--set", "predict.tta=3"], 2, ["predict.tta", "1, 2, 4, 8"]),
    "--set centres.finder=bogus": (None, ["--set", "centres.finder=bogus"], 2, ["centres.finder", "nms"]),
    "--set nothing.here=1": (None, ["--set", "nothing.here=1"], 2, ["nothing.here", "unknown"]),
    "--set without =": (None, ["--set", "train.epochs"], 2, ["train.epochs", "KEY=VALUE"]),
    "validation F1 0 (threshold 1)": (None, ["--set", "centres.threshold=1.0"], 2, ["validation F1 is 0"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crisp_ext_train_refuses(project, tmp_path, case):
    change, extra, code, fragments = CASES[case]
    picks = picks_folder(project, tmp_path / "picks", change)
    inputs = snapshot(project.mics, picks, project.config)
    out = tmp_path / "out"
    argv = train(project, out, picks, *extra)  # a repeated option: the last one counts
    rc, stdout, stderr = run_cli(argv)
    lines = stderr.strip().splitlines()
    assert rc == code, stderr
    assert len(lines) == 1 and "Traceback" not in stdout + stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(project.mics, picks, project.config) == inputs
    if out.exists():  # nothing a later command could take for a result
        assert not (out / "model" / "model.json").exists() and not (out / "model" / "weights.pt").exists()
        assert temp_files(out) == []


def test_a_blank_micrograph_is_refused_by_name(project, trained, tmp_path):
    """A constant micrograph (a motion correction that wrote zeros) is no image to pick or to learn from."""
    import shutil

    from crisp_ext.io.mrc import read_micrograph, write_mrc

    mics = tmp_path / "mics"
    shutil.copytree(project.mics, mics)
    blank = mics / f"{NAMES[2]}.mrc"
    image, ps = read_micrograph(blank)
    write_mrc(blank, np.zeros_like(image), pixel_size=ps)
    inputs = snapshot(mics, trained.model)
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(["pick", "--mics", mics, "--model", trained.model, "--out", out, *common(project)])
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in stdout + stderr, stderr
    assert str(blank) in lines[0] and "blank" in lines[0], lines[0]
    assert not (out / "particles.star").exists() and snapshot(mics, trained.model) == inputs


def test_the_training_output_folder_given_as_the_model_says_which_folder_to_give(project, trained, tmp_path):
    rc, stdout, stderr = run_cli(["pick", "--mics", project.mics, "--model", trained.out, "--out", tmp_path / "out",
                                  *common(project)])
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in stdout + stderr, stderr
    assert f"give {trained.model}" in lines[0], lines[0]


@pytest.mark.parametrize("values", [("--threshold", "2"), ("--threshold", "nan"), ("--threshold", "-1"),
                                    ("--extract", "-5"), ("--extract", "33"), ("--extract", "100000")])
def test_crisp_ext_pick_refuses_options_before_picking(project, trained, tmp_path, values):
    out = tmp_path / "out"
    inputs = snapshot(project.mics, trained.model)
    rc, stdout, stderr = run_cli(["pick", "--mics", project.mics, "--model", trained.model, "--out", out,
                                  *common(project), *values])
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"{values[0]} {values[1]}" in lines[0]
    assert not out.exists() or not list((out / "coordinates").glob("*.star"))
    assert not (out / "particles.star").exists() and not (out / "summary.json").exists()
    assert snapshot(project.mics, trained.model) == inputs


def test_some_training_picks_outside_are_left_out_with_a_warning(project, tmp_path):
    picks = picks_folder(project, tmp_path / "picks", _one_outside)
    rc, stdout, stderr = run_cli(train(project, tmp_path / "out", picks))
    assert rc == 0, stderr
    assert "1 of " in stdout and "lie outside their micrograph" in stdout and "left out" in stdout


def _listed_twice(folder: Path) -> None:  # a particle STAR concatenated with itself (or symmetry-expanded)
    for f in folder.glob("*.star"):
        xy = read_coordinates(f).xy
        write_coordinates(f, np.vstack([xy, xy + 0.5]))


def test_training_picks_listed_twice_are_used_once_with_a_warning(project, tmp_path):
    picks = picks_folder(project, tmp_path / "picks", _listed_twice)
    rc, stdout, stderr = run_cli(train(project, tmp_path / "out", picks))
    assert rc == 0, stderr
    assert "repeat another pick" in stdout and "used once" in stdout
    info = json.loads((tmp_path / "out" / "model" / "model.json").read_text())
    n_val = sum(len(read_coordinates(project.picks / f"{m}_manualpick.star"))
                for m in info["validation"]["micrographs"])
    assert info["validation"]["picking"]["n_true"] == n_val  # each particle once, not twice
    assert 0 <= info["validation"]["chance_f1"] < info["validation"]["picking"]["f1"]  # sparse: chance is low


def test_config_files_with_syntax_errors_name_the_file(project, tmp_path):
    for name, text in (("bad.toml", "[train\nepochs = 2\n"), ("bad.json", '{"train": {"epochs": 2,}}'),
                       ("bad.yaml", "train: [1, 2\n")):
        config = tmp_path / name
        config.write_text(text)
        argv = train(project, tmp_path / "out", project.picks)
        argv[argv.index("--config") + 1] = config
        rc, stdout, stderr = run_cli(argv)
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and str(config) in lines[0] and "Traceback" not in stderr, stderr
        assert not (tmp_path / "out").exists()


def test_out_under_a_file_or_read_only(project, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker / "out", blocker):
        rc, _, stderr = run_cli(train(project, out, project.picks))
        assert rc == 2 and len(stderr.strip().splitlines()) == 1 and "--out" in stderr and "is a file" in stderr
    with read_only(tmp_path / "locked") as ro:
        for command in ("train", "pick"):
            argv = train(project, ro / "out" if command == "train" else ro, project.picks)
            argv[0] = command
            rc, _, stderr = run_cli(argv)
            assert rc == 2 and len(stderr.strip().splitlines()) == 1 and "--out" in stderr, stderr
            assert "cannot write" in stderr or "read-only" in stderr
    assert blocker.read_text() == "not a folder"


def test_argparse_errors_are_one_line_too(project, tmp_path):
    rc, _, stderr = run_cli(["pick", "--mics", project.mics, "--out", tmp_path / "o", "--diameter", "27"])
    assert rc == 2 and len(stderr.strip().splitlines()) == 1 and "--diameter" in stderr


def test_a_pixel_only_model_rescales_to_another_pixel_size(project, trained, tmp_path):
    """The model was trained with --diameter 28px on 4 Å/px micrographs: it records 112 Å, and on micrographs of
    2 Å/px it looks for 56 px particles (before: 28 px, twice too many picks)."""
    from crisp_ext.config import PickerConfig
    from crisp_ext.model_dir import read_model_info
    from crisp_ext.pipeline import _picking_config, micrograph_diameter
    from crisp_ext.types import Micrograph

    info = read_model_info(trained.model)
    assert info["diameter_A"] == pytest.approx(28.0 * tc.PIXEL_SIZE)
    from crisp_ext.config import load_config

    cfg = _picking_config(load_config(trained.model / "config.toml"), PickerConfig(), info)
    mic = Micrograph(id="x", path=project.mics / "mic001.mrc", pixel_size=2.0)
    assert micrograph_diameter(mic, cfg) == pytest.approx(56.0)
    # given explicitly in pixels, the diameter is the user's
    given = PickerConfig().updated({"particle.diameter_px": 30.0})
    assert micrograph_diameter(mic, _picking_config(load_config(trained.model / "config.toml"), given, info)) == 30.0


def test_a_second_run_on_the_same_out_is_refused_or_waits(project, trained, tmp_path):
    from crisp_ext.io.outdir import output_lock

    out = tmp_path / "out"
    out.mkdir()
    argv = ["pick", "--mics", project.mics, "--model", trained.model, "--out", out, *common(project)]
    with output_lock(out):
        rc, _, stderr = run_cli(argv)
    assert rc == 2 and "in use by another crisp-ext run" in stderr and "--wait" in stderr
    assert not (out / "coordinates").exists()

    held = threading.Event()

    def hold():
        with output_lock(out):
            held.set()
            time.sleep(1.5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    t0 = time.perf_counter()
    rc, _, stderr = run_cli([*argv, "--wait"])
    holder.join()
    assert rc == 0 and time.perf_counter() - t0 >= 1.0, stderr
    assert len(list((out / "coordinates").glob("*.star"))) == len(NAMES)


KILLER = textwrap.dedent("""
    import contextlib, sys, time
    import crisp_ext.io.coords as coords
    from crisp_ext.io.atomic import atomic_path

    def slow_write(path, text):  # the temporary file exists, then the writer stalls: SIGKILL lands mid-write
        with atomic_path(path) as tmp:
            tmp.write_text(text[: len(text) // 2])
            if "mic003" in str(path):
                time.sleep(120)
            tmp.write_text(text)
        return path

    coords.atomic_write_text = slow_write
    from crisp_ext.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_run_killed_mid_write_leaves_nothing_that_breaks_the_next_command(project, trained, tmp_path):
    out = tmp_path / "out"
    argv = ["pick", "--mics", project.mics, "--model", trained.model, "--out", out, *common(project)]
    proc = subprocess.Popen([sys.executable, "-c", KILLER, *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "coordinates").glob(".mic003*.tmp*")):
        time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its reader process, as a scheduler kills a job
    proc.wait(30)
    assert list((out / "coordinates").glob(".mic003*.tmp*"))  # what SIGKILL leaves
    # evaluate and train --picks on that folder never see the temporary file
    rc, _, stderr = run_cli(["evaluate", "--mics", project.mics, "--picks", out / "coordinates", "--truth",
                             project.truth_dir, "--diameter", "28px"])
    assert rc == 0, stderr
    rc, stdout, stderr = run_cli(argv)  # the same command again: cleans up, picks what is missing
    assert rc == 0, stderr
    assert "removed 1 temporary file" in stdout and temp_files(out) == []
    assert sorted(p.name for p in (out / "coordinates").iterdir()) == [f"{n}_crisp.star" for n in NAMES]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["particles"] == sum(len(read_coordinates(p)) for p in (out / "coordinates").iterdir())
    rc, _, stderr = run_cli(["evaluate", "--mics", project.mics, "--picks", out / "coordinates", "--truth",
                             project.truth_dir, "--diameter", "28px"])
    assert rc == 0, stderr


# -- crisp-relion ------------------------------------------------------------------------------------------------------

@pytest.fixture
def relion_project(tmp_path, monkeypatch):
    import relion_synth as rs

    p = rs.simulate(tmp_path / "relion", n_mics=3, shape=(256, 256))
    rs.write_micrographs_star(p, "CtfFind/job003/micrographs_ctf.star")
    rs.write_particles_star(p, "Select/job010/particles.star", on=p.names[:2])
    monkeypatch.chdir(p.root)
    return p


def _relion(project, o, *extra):
    import relion_synth as rs
    from relion_external.cli import main as relion_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = relion_main(["--o", o, "--in_mics", project.mics_star, "--in_parts", project.parts_star,
                          "--diameter", "84", "--set", rs.TINY_SETTINGS, "--j", "1", *extra])
    return rc, err.getvalue()


def _shift_particles(project, factor: float, offset: float) -> None:
    import starfile

    path = project.root / project.parts_star
    blocks = starfile.read(path, always_dict=True)
    for axis in ("X", "Y"):
        blocks["particles"][f"rlnCoordinate{axis}"] = blocks["particles"][f"rlnCoordinate{axis}"] * factor + offset
    write_star(path, blocks, loops=list(blocks))


@pytest.mark.parametrize("case", ["every pick outside", "--set predict.tta=3", "--set centres.finder=bogus",
                                  "--diameter 0.001", "--diameter 600", "--threshold 2", "--j 0"])
def test_crisp_relion_refuses(relion_project, case):
    o = "External/job020/"
    extra: list[str] = []
    if case == "every pick outside":
        _shift_particles(relion_project, 2.0, 300.0)
    elif case.startswith("--set"):
        extra = ["--set", case.split()[1]]
    else:
        extra = case.split()
    before = snapshot(relion_project.root / "MotionCorr", relion_project.root / relion_project.parts_star)
    rc, err = _relion(relion_project, o, *extra)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    job = relion_project.root / o
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and not (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (job / "RELION_OUTPUT_NODES.star").exists() and not (job / "model" / "model.json").exists()
    assert snapshot(relion_project.root / "MotionCorr", relion_project.root / relion_project.parts_star) == before
    expected = {"every pick outside": "outside their micrograph", "--set predict.tta=3": "predict.tta",
                "--set centres.finder=bogus": "centres.finder", "--diameter 0.001": "too small",
                "--diameter 600": "diameter given is too large", "--threshold 2": "threshold", "--j 0": "--j"}[case]
    assert expected in lines[0], lines[0]


def test_crisp_relion_missing_file_in_a_coordinates_list(relion_project):
    from crisp_ext.io.coords import write_coordinates as write

    names = relion_project.names[:2]
    files = []
    for i, name in enumerate(names):
        f = f"ManualPick/job005/{Path(name).stem}_manualpick.star"
        if i == 0:  # the second one is listed but missing
            write(relion_project.root / f, relion_project.truth[name])
        files.append(f)
    write_star(relion_project.root / "ManualPick/job005/manualpick.star",
               {"coordinate_files": {"rlnMicrographName": names, "rlnMicrographCoordinates": files}},
               loops=["coordinate_files"])
    from relion_external.cli import main as relion_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = relion_main(["--o", "External/job021/", "--in_mics", relion_project.mics_star, "--in_coords",
                          "ManualPick/job005/manualpick.star", "--diameter", "84", "--j", "1"])
    text = err.getvalue()
    assert rc == 2 and files[1] in text and "missing" in text and len(text.strip().splitlines()) == 1, text


def test_crisp_relion_ctrl_c_is_one_line_and_an_aborted_marker(relion_project, monkeypatch):
    import crisp_ext.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "prepare_picker", interrupted)
    rc, err = _relion(relion_project, "External/job022/")
    job = relion_project.root / "External/job022/"
    assert rc == 130 and err.strip().splitlines() == [
        "crisp-relion: interrupted (Ctrl-C); Continue the job to pick what is left"]
    assert (job / "RELION_JOB_EXIT_ABORTED").exists() and not (job / "RELION_JOB_EXIT_FAILURE").exists()


# -- crisp-cryosparc offline ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["every pick outside", "--set predict.tta=3", "--out under a file",
                                  "--diameter 800A"])
def test_crisp_cryosparc_offline_refuses(tmp_path, capsys, case):
    from cryosparc_scene import TINY, seed_scene, simulated
    from fakes.cryosparc_server import FakeCryoSPARC

    from cryosparc_job.cli import main as cs_main

    fake = FakeCryoSPARC(tmp_path / "CS-proj")
    if case == "every pick outside":
        sims = simulated(3)
        exposures = fake.seed_exposures(images=[s.image for s in sims], psize_A=4.0)
        fake.seed_particles(exposures, {0: sims[0].centres * 2.0 + 300.0, 1: sims[1].centres * 2.0 + 300.0})
    else:
        seed_scene(fake)
    out = tmp_path / "picks"
    if case == "--out under a file":
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "picks"
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    if case.startswith("--set"):
        sets += ["--set", case.split()[1]]
    before = {p: p.read_bytes() for p in fake.project_dir.rglob("*") if p.is_file()}
    diameter = case.split()[1] if case.startswith("--diameter") else "112A"
    rc = cs_main(["offline", "--project-dir", str(fake.project_dir), "--exposures", "J1", "--particles", "J2",
                  "--diameter", diameter, "--out", str(out), "--quiet", *sets])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert {"every pick outside": "outside their micrograph", "--set predict.tta=3": "predict.tta",
            "--out under a file": "is a file", "--diameter 800A": "diameter given is too large"}[case] in err[0]
    assert {p: p.read_bytes() for p in fake.project_dir.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.rglob("*.csg"))
