"""The crisp-cryosparc console script: exit codes, one-line errors, and one run as a subprocess over loopback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryosparc.dataset import Dataset
from cryosparc_scene import DIAMETER_A, TINY, seed_scene, tiny_model_dir  # noqa: F401 (fixture)
from fakes.cryosparc_server import (  # noqa: F401 (fixtures)
    cryosparc_fake,
    cryosparc_inprocess,
    cryosparc_loopback,
    unused_url,
)

from cryosparc_job.cli import main

SCRIPT = Path(sys.executable).with_name("crisp-cryosparc")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Runs without --work-dir write to ./crisp-cryosparc: keep them in the test's directory."""
    monkeypatch.chdir(tmp_path)


def live_args(fake, *extra, password=None):
    return ["live", "--url", fake.base_url, "--email", fake.email, "--password", password or fake.password,
            "--project", "P1", "--workspace", "W1", "--exposures", "J1", "--particles", "J2:particles_selected",
            "--diameter", f"{DIAMETER_A:g}A", "--quiet", *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("crisp-cryosparc: error: ")
    return err[0]


@pytest.mark.parametrize("change, message", [
    ({"--project": "P9"}, "project P9 not found"),
    ({"--particles": "J77"}, "job J77 not found"),
    ({"--particles": "J1:exposures"}, "has no location slot"),
    ({"--password": "wrong"}, "refused the login"),
    ({"--url": None}, "cannot reach CryoSPARC"),
])
def test_bad_input_exits_2_with_one_line(cryosparc_inprocess, capsys, change, message):
    fake = cryosparc_inprocess
    seed_scene(fake)
    args = live_args(fake)
    for key, value in change.items():
        args[args.index(key) + 1] = value if value is not None else unused_url()
    assert main(args) == 2
    assert message in error_line(capsys)
    assert fake.jobs == ["J1", "J2"]


def test_version_mismatch_exits_2_with_the_pip_command(cryosparc_inprocess, capsys):
    cryosparc_inprocess.version = "v4.7.1"
    assert main(live_args(cryosparc_inprocess)) == 2
    assert "pip install --force cryosparc-tools~=4.7.0" in error_line(capsys)


def test_failed_job_exits_1_with_one_line(cryosparc_inprocess, capsys, tiny_model_dir, tmp_path):
    fake = cryosparc_inprocess
    seed_scene(fake)
    fake.fail_next("jobs.save_output", 500, "disk full")
    assert main(live_args(fake, "--model", str(tiny_model_dir))) == 1
    assert "job J3 failed: disk full (HTTP 500)" in error_line(capsys)
    assert fake.job("J3").status == "failed"
    assert (tmp_path / "crisp-cryosparc" / "P1" / "J3").is_dir()  # the default work directory


def test_offline_command(tmp_path, capsys, tiny_model_dir, cryosparc_fake):
    seed_scene(cryosparc_fake)
    out = tmp_path / "picks"
    args = ["offline", "--project-dir", str(cryosparc_fake.project_dir), "--exposures", "J1", "--particles", "J2",
            "--model", str(tiny_model_dir), "--out", str(out), "--name", "crisp", "--quiet"]
    assert main(args) == 0
    assert "crisp.csg" in capsys.readouterr().out and (out / "crisp.cs").is_file()
    assert main(args[:-5] + ["--out", str(cryosparc_fake.project_dir / "J2"), "--quiet"]) == 2
    assert "separate directory" in error_line(capsys)


def test_help_and_missing_arguments(capsys):
    assert main([]) == 0
    with pytest.raises(SystemExit) as done:
        main(["live", "--project", "P1"])
    assert done.value.code == 2


def test_console_script_runs_a_live_job_over_loopback(cryosparc_loopback, tmp_path, tiny_model_dir):
    fake = cryosparc_loopback
    seed_scene(fake, n=2, curated=(0,))
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "OMP_NUM_THREADS": "1",
           "CRYOSPARC_MASTER_HOSTNAME": "worker", "CRYOSPARC_BASE_PORT": "39000"}  # as inside a CryoSPARC worker
    args = live_args(fake, "--model", str(tiny_model_dir), "--work-dir", str(tmp_path / "work"), "--set",
                     "predict.bf16=false", "--threads", "1")
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("J3: saved ")
    assert fake.job("J3").status == "completed"
    saved = Dataset.load(fake.project_dir / "J3" / "particles.cs")
    assert len(saved) == fake.job("J3").spec.outputs.root["particles"].num_items > 0

    bad = subprocess.run([str(SCRIPT), *live_args(fake, password="wrong")], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "refused the login" in bad.stderr
