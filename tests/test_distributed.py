"""Picking on Dask: a LocalCluster gives exactly the single-process picks, a worker killed mid-run loses no
micrograph and doubles none, and a real single-node SLURM cluster (Debian's slurm-wlm + munge, started here as root)
runs the workers as batch jobs, surviving a cancelled job; training on a worker gives this process's model, also when
that worker is killed mid-run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import NAMES, common, project, trained  # noqa: F401 (fixtures)
from test_cli import cli as run_cli

from crisp_ext.errors import InputError
from crisp_ext.io.coords import read_coordinates

pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def coordinates(folder: Path) -> dict:
    return {p.name: read_coordinates(p).xy.tolist() for p in sorted(folder.glob("*.star"))}


@pytest.fixture(scope="module")
def single(project, trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    rc, _, stderr = run_cli(["pick", "--mics", project.mics, "--model", trained.model, "--out", out,
                             *common(project)])
    assert rc == 0, stderr
    return out


def test_placement_parsing():
    from crisp_ext.distributed import parse_placement

    assert parse_placement(None) is None
    assert parse_placement("local:3").workers == 3
    p = parse_placement("slurm:2", options=["queue=short", "walltime=00:10:00"])
    assert p.kind == "slurm" and p.options == {"queue": "short", "walltime": "00:10:00"}
    assert parse_placement(None, "tcp://127.0.0.1:8786").address == "tcp://127.0.0.1:8786"
    for bad in ("local", "local:0", "cloud:4", "slurm:x"):
        with pytest.raises(InputError, match="--workers"):
            parse_placement(bad)
    with pytest.raises(InputError, match="not both"):
        parse_placement("local:2", "tcp://x:1")


def test_chunks_shrink_towards_the_end():
    from crisp_ext.distributed import chunk_sizes

    for n, workers in ((96, 2), (10_000, 16), (7, 3), (1, 4)):
        sizes = chunk_sizes(n, workers)
        assert sum(sizes) == n and max(sizes) <= 8 and min(sizes) >= 1
        assert sizes == sorted(sizes, reverse=True)
        # the last chunk each worker takes is small: the workers finish within about one micrograph of each other
        assert max(sizes[-workers:]) <= 2
    assert chunk_sizes(0, 2) == []


def test_the_clusters_crisp_ext_starts_run_their_workers_without_the_dashboard_profiler(tmp_path):
    import dask
    import distributed  # noqa: F401 - its defaults join Dask's configuration on import

    from crisp_ext.allocator import glibc_environment
    from crisp_ext.distributed import DASK_SETTINGS, Placement, dask_env_exports, open_client, worker_settings

    settings = worker_settings(2)
    # a batch job's script says its torch threads (export OMP_NUM_THREADS=...); Dask's nanny would set 1 after it
    assert worker_settings(3)["distributed.nanny.pre-spawn-environ"]["OMP_NUM_THREADS"] == 3
    keys = list(settings)
    before = {k: dask.config.get(k) for k in keys}
    assert before != settings  # Dask's own defaults profile and poll more often, and set glibc's trim threshold low
    assert set(DASK_SETTINGS) < set(settings)
    environment = dict(os.environ)
    for _ in range(2):  # and again: the first cluster leaves nothing behind that the second would take as the user's
        with open_client(Placement("local", 1), threads=2) as client:
            seen = client.run(lambda: {k: __import__("dask").config.get(k) for k in keys})
            environ = client.run(lambda: {k: __import__("os").environ.get(k)
                                          for k in [*glibc_environment(), "OMP_NUM_THREADS", "MKL_NUM_THREADS"]})
        assert list(seen.values()) == [settings]
        # the worker process had glibc's heap settings and its thread count in its environment from its start
        assert list(environ.values()) == [{**{k: str(v) for k, v in glibc_environment().items()},
                                           "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}]
        assert {k: dask.config.get(k) for k in keys} == before  # this process's settings are given back
        assert dict(os.environ) == environment  # and its environment (Dask's nanny writes into it)
    # a batch job's worker gets them from its job script, before it starts
    probe = tmp_path / "probe.py"
    probe.write_text("import dask, distributed, json\n"
                     f"print(json.dumps({{k: dask.config.get(k) for k in {keys!r}}}))\n")
    script = tmp_path / "job.sh"
    script.write_text("\n".join([*dask_env_exports(settings), f'"{sys.executable}" "{probe}"']) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out) == settings


def test_two_local_workers_give_the_single_process_picks(project, trained, single, tmp_path):
    out = tmp_path / "dask"
    rc, stdout, stderr = run_cli(["pick", "--mics", project.mics, "--model", trained.model, "--out", out,
                                  *common(project), "--workers", "local:2"])
    assert rc == 0, stderr
    assert "2 local Dask worker process(es), 1 torch thread(s) each" in stdout and "(worker " in stdout
    assert coordinates(out / "coordinates") == coordinates(single / "coordinates")
    assert (out / "particles.star").read_text() == (single / "particles.star").read_text()


def test_a_worker_with_several_task_slots_runs_one_network_at_a_time(project, trained, single, tmp_path,
                                                                       monkeypatch):
    """An existing scheduler whose worker takes two chunks at once (threads_per_worker=2; a jobqueue worker's
    nthreads is its cores): the chunks' networks take turns, and the picks are the single process's."""
    from distributed import LocalCluster

    import crisp_ext.predict as predict

    running, most = [0], [0]
    lock = threading.Lock()
    original = predict.predict_map

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.05)  # a window in which a second network would overlap
            return original(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(predict, "predict_map", counted)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        out = tmp_path / "slots"
        rc, stdout, stderr = run_cli(["pick", "--mics", project.mics, "--model", trained.model, "--out", out,
                                      *common(project), "--scheduler", cluster.scheduler_address])
    assert rc == 0, stderr
    assert "chunk(s) of up to" in stdout
    assert most[0] == 1
    assert coordinates(out / "coordinates") == coordinates(single / "coordinates")


def _worker_pids() -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process().children(recursive=True)
            if "multiprocessing" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]


def test_a_worker_killed_mid_run_loses_nothing_and_doubles_nothing(project, trained, single, tmp_path):
    from crisp_ext.config import load_config
    from crisp_ext.distributed import parse_placement
    from crisp_ext.io.inputs import find_micrographs
    from crisp_ext.pipeline import prepare_picker, pick

    mics = find_micrographs(project.mics)
    cfg = load_config(project.config).updated({"train.threads": 1, "train.epochs": 2})  # as common(project)
    picker = prepare_picker(mics, cfg, work_dir=tmp_path, model_dir=trained.model)
    seen: list[str] = []
    killed: list[int] = []

    def on_picked(mic, picks):
        seen.append(mic.id)
        if not killed:  # the first result is in: kill a worker while the others still have chunks to do
            pids = _worker_pids()
            assert pids
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    result = pick(picker, mics, work_dir=tmp_path, on_picked=on_picked, placement=parse_placement("local:2"))
    assert killed and sorted(seen) == sorted(m.id for m in mics)  # every micrograph exactly once
    assert sorted(result.counts) == sorted(seen)
    single_counts = {p.name.removesuffix("_crisp.star"): len(read_coordinates(p))
                     for p in (single / "coordinates").glob("*.star")}
    assert {m.name: result.counts[m.id] for m in mics} == single_counts
    assert not [f for f in tmp_path.rglob("*") if ".tmp" in f.name]


def test_a_lost_scheduler_is_one_line(project, trained, tmp_path):
    rc, _, stderr = run_cli(["pick", "--mics", project.mics, "--model", trained.model, "--out", tmp_path / "o",
                             *common(project), "--scheduler", "tcp://127.0.0.1:9"])
    lines = stderr.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("crisp-ext: failed:") and "scheduler" in lines[0]


# -- a real SLURM cluster ------------------------------------------------------------------------------------------

SLURM_CONF = """\
ClusterName=crisptest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=localhost CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _have_slurm() -> bool:
    return (os.geteuid() == 0 and all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch", "scancel"))
            and Path("/etc/munge/munge.key").is_file())


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """slurmctld + slurmd (+ munged when none runs) on this machine, stopped by their own PIDs afterwards."""
    if not _have_slurm():
        pytest.skip("needs root and Debian's slurm-wlm and munge (.ci/run installs them)")
    state = tmp_path_factory.mktemp("slurm")
    for sub in ("ctld", "d", "munge"):
        (state / sub).mkdir()
    conf = state / "slurm.conf"
    mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20 * 0.8)
    conf.write_text(SLURM_CONF.format(state=state, cpus=os.cpu_count(), mem=mem))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = []
    socket = state / "munge" / "munge.socket"
    munged = subprocess.Popen(["munged", "--foreground", "--force", f"--socket={socket}",
                               f"--pid-file={state / 'munge' / 'munged.pid'}", f"--log-file={state / 'munge.log'}",
                               f"--seed-file={state / 'munge' / 'seed'}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    procs.append(munged)
    for _ in range(100):
        if socket.exists():
            break
        time.sleep(0.05)
    # slurm's auth/munge plugin finds this munged through the socket named in slurm.conf
    conf.write_text(conf.read_text() + f"AuthInfo=socket={socket}\n")
    for daemon in (["slurmctld", "-D", "-f", str(conf)], ["slurmd", "-D", "-f", str(conf)]):
        procs.append(subprocess.Popen(daemon, env=env, stdout=open(state / f"{daemon[0]}.log", "w"),
                                      stderr=subprocess.STDOUT))
    deadline = time.time() + 60
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc"):
            break
        time.sleep(0.5)
    else:
        for p in procs:
            p.kill()
        pytest.fail("SLURM did not come up: " + (state / "slurmctld.log").read_text()[-2000:])
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        deadline = time.time() + 30  # let the cancelled jobs' step daemons end before slurmd goes
        while time.time() < deadline:
            out = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(0.5)
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _jobs(env) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %t"], env=env, capture_output=True, text=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.split()[1] in ("R", "CF")]


@pytest.mark.slow
def test_slurm_workers_give_the_single_process_picks_and_survive_a_cancelled_job(project, trained, single, slurm,
                                                                                 tmp_path):
    out = tmp_path / "slurm"
    argv = ["pick", "--mics", project.mics, "--model", trained.model, "--out", out, *common(project),
            "--workers", "slurm:2", "--cluster-option", "walltime=00:10:00", "--cluster-option",
            f"log_directory={tmp_path / 'logs'}", "--cluster-option", "memory=2GiB",
            "--cluster-option", "cores=1"]
    cancelled: list[str] = []

    def cancel_one():  # as soon as two worker jobs run, cancel one of them (SLURM kills its worker)
        deadline = time.time() + 180
        while time.time() < deadline and not cancelled:
            jobs = _jobs(slurm)
            if len(jobs) >= 2 or (jobs and list((out / "coordinates").glob("*.star"))):
                subprocess.run(["scancel", jobs[-1]], env=slurm, capture_output=True)
                cancelled.append(jobs[-1])
            time.sleep(0.2)

    killer = threading.Thread(target=cancel_one)
    killer.start()
    rc, stdout, stderr = run_cli(argv)
    killer.join()
    assert rc == 0, stderr + stdout
    assert cancelled, "no SLURM job ran"
    assert "submitted 2 slurm job(s)" in stdout
    assert coordinates(out / "coordinates") == coordinates(single / "coordinates")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["micrographs_picked"] == len(NAMES) and sorted(summary["counts"]) == NAMES


# -- the same option in the other entry points ----------------------------------------------------------------------

def test_crisp_relion_workers_row_gives_the_single_process_picks(trained, tmp_path, monkeypatch):
    import relion_synth as rs

    from relion_external.cli import main as relion_main

    p = rs.simulate(tmp_path / "relion", n_mics=4, shape=(256, 256))
    rs.write_micrographs_star(p, "CtfFind/job003/micrographs_ctf.star")
    monkeypatch.chdir(p.root)
    picked = {}
    for o, extra in (("External/job030/", []), ("External/job031/", ["--workers", "local:2"])):
        with contextlib.redirect_stdout(io.StringIO()) as log:
            rc = relion_main(["--o", o, "--in_mics", p.mics_star, "--model", str(trained.model), "--j", "1", *extra])
        assert rc == 0 and (p.root / o / "RELION_JOB_EXIT_SUCCESS").exists(), log.getvalue()
        picked[o] = {f.name: read_coordinates(f).xy.tolist() for f in sorted((p.root / o).rglob("*_autopick.star"))
                     if not f.name.startswith("coords_suffix")}
    assert "(worker " in log.getvalue()
    assert picked["External/job030/"] == picked["External/job031/"] and len(picked["External/job030/"]) == 4


def test_crisp_cryosparc_offline_workers_give_the_single_process_picks(tmp_path, capsys):
    from cryosparc.dataset import Dataset
    from cryosparc_scene import TINY, seed_scene
    from fakes.cryosparc_server import FakeCryoSPARC

    from cryosparc_job.cli import main as cs_main

    fake = FakeCryoSPARC(tmp_path / "CS-proj")
    seed_scene(fake)
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    base = ["offline", "--project-dir", str(fake.project_dir), "--exposures", "J1", "--particles", "J2",
            "--diameter", "112A", "--quiet", "--threads", "1", *sets]
    assert cs_main([*base, "--out", str(tmp_path / "one")]) == 0
    model = tmp_path / "one" / "work" / "model"
    assert cs_main([*base, "--out", str(tmp_path / "two"), "--model", str(model), "--workers", "local:2"]) == 0
    assert cs_main([*base, "--out", str(tmp_path / "ref"), "--model", str(model)]) == 0
    a, b = (Dataset.load(tmp_path / d / "crisp_particles.cs") for d in ("ref", "two"))
    for f in ("location/micrograph_uid", "location/center_x_frac", "location/center_y_frac", "pick_stats/ncc_score"):
        assert np.array_equal(np.asarray(a[f]), np.asarray(b[f])), f


QUEUE_TEMPLATE = """#!/bin/bash
#SBATCH --partition=XXXqueueXXX
#SBATCH --ntasks=XXXmpinodesXXX
#SBATCH --cpus-per-task=XXXthreadsXXX
#SBATCH --output=XXXoutfileXXX
#SBATCH --error=XXXerrfileXXX
XXXcommandXXX
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("relion_pipeliner") is None, reason="RELION (relion_pipeliner) absent")
def test_relion_submits_crisp_relion_to_slurm_and_extract_takes_its_output(slurm, tmp_path):
    """RELION's own "Submit to queue": relion_pipeliner fills the README's template, sbatch runs crisp-relion on the
    SLURM node, and RELION's Extract reads the coordinates it wrote."""
    import sys

    import relion_synth as rs
    from test_relion_pipeliner import _add, _job_log, _pipeliner, _status

    root = tmp_path / "project"
    project = rs.simulate(root, n_mics=3, shape=(256, 256), mic_dir="Raw", seed=5)
    rs.write_particles_star(project, "Select/job010/particles.star", on=project.names[:2])
    (root / "default_pipeline.star").write_text("# version 30001\n\ndata_pipeline_general\n\n"
                                                "_rlnPipeLineJobCounter 1\n")
    template = tmp_path / "slurm_template.sh"
    template.write_text(QUEUE_TEMPLATE)
    exe = shutil.which("crisp-relion") or str(Path(sys.executable).parent / "crisp-relion")
    _add(root, "Import", do_raw="Yes", fn_in_raw="Raw/*.mrc", is_multiframe="No", angpix=str(rs.PIXEL_SIZE), kV="300",
         Cs="2.7", Q0="0.1", optics_group_name="opticsGroup1")
    _add(root, "External", fn_exe=exe, in_mic="Import/job001/micrographs.star", in_part="Select/job010/particles.star",
         param1_label="diameter", param1_value=str(rs.DIAMETER_A), param2_label="set", param2_value=rs.TINY_SETTINGS,
         nr_threads="1", do_queue="Yes", queuename="debug", qsub="sbatch", qsubscript=str(template),
         min_dedicated="1")
    _add(root, "Extract", star_mics="Import/job001/micrographs.star",
         coords_suffix="External/job002/coords_suffix_autopick.star", extract_size="40", do_invert="Yes",
         do_norm="Yes", bg_diameter="30", nr_mpi="1")
    out = _pipeliner(root, "--RunJobs", "Import/job001/ External/job002/ Extract/job003/ ", "--sec_wait_after", "1",
                     timeout=300)
    status = _status(root)
    job = root / "External/job002"
    assert (job / "run_submit.script").is_file() and "crisp-relion" in (job / "run_submit.script").read_text()
    assert status.get("External/job002/") == 2, _job_log(root, "External/job002/") + out[-2000:]
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert status.get("Extract/job003/") == 2, _job_log(root, "Extract/job003/") + out[-2000:]
    written = sum(len(read_coordinates(f)) for f in job.rglob("*_autopick.star")
                  if not f.name.startswith("coords_suffix"))
    import starfile

    extracted = starfile.read(root / "Extract/job003/particles.star", always_dict=True)["particles"]
    assert written > 0 and len(extracted) == written


def test_training_on_a_local_worker_gives_this_process_model(project, trained, tmp_path):
    """``crisp-ext train --workers local:1``: the training runs as one Dask task, its progress comes back here, and
    the model is the one training in this process gives (same seed, one thread)."""
    from test_cli import train_args

    out = tmp_path / "remote"
    rc, stdout, stderr = run_cli([*train_args(project, out), "--workers", "local:1"])
    assert rc == 0, stderr
    assert "training on a Dask worker (1 torch thread(s))" in stdout and "[train " in stdout
    assert "model written to" in stdout and "on worker " in stdout
    mine, theirs = (json.loads((d / "model.json").read_text()) for d in (out / "model", trained.model))
    assert mine["validation"]["picking"] == theirs["validation"]["picking"]
    assert mine["threshold"] == theirs["threshold"] and mine["selection"]["finder"] == theirs["selection"]["finder"]
    rc, _, stderr = run_cli([*train_args(project, tmp_path / "two"), "--workers", "local:2"])
    assert rc == 2 and "training runs once, on one worker; give local:1" in stderr


def test_a_training_worker_killed_mid_run_resumes_on_its_replacement(project, trained, tmp_path):
    """The training worker is killed once its first checkpoint is written: Dask runs the task again on the replacement
    worker, which resumes from that checkpoint and ends with the model an uninterrupted training gives."""
    from test_cli import train_args

    out = tmp_path / "remote"
    checkpoint = out / "model" / "training" / "checkpoint.pt"
    killed: list[int] = []
    stop = threading.Event()

    def kill_at_first_checkpoint():
        while not stop.is_set() and not killed:
            if checkpoint.is_file() and _worker_pids():
                pid = _worker_pids()[-1]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_at_first_checkpoint, daemon=True)
    watcher.start()
    try:
        rc, stdout, stderr = run_cli([*train_args(project, out), "--workers", "local:1"])
    finally:
        stop.set()
        watcher.join()
    assert rc == 0, stderr
    assert killed and "resuming after" in stdout
    mine, theirs = (json.loads((d / "model.json").read_text()) for d in (out / "model", trained.model))
    assert mine["validation"]["picking"] == theirs["validation"]["picking"]
    assert mine["threshold"] == theirs["threshold"]
    assert not [f for f in out.rglob("*") if ".tmp" in f.name]
