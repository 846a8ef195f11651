"""crisp-relion driven by real RELION (Debian's 3.1.3): Import -> External (motion/CTF stand-in) -> External
(crisp-relion) -> Extract, run by ``relion_pipeliner`` on a tiny synthetic project. Skipped without RELION."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

import relion_synth as rs

pytestmark = [pytest.mark.relion, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("relion_pipeliner") is None, reason="RELION (relion_pipeliner) absent")]

BOX = 48
# A stand-in for MotionCorr + CtfFind: links the imported micrographs into its job directory (so their names carry
# a job directory, as after MotionCorr) and writes micrographs_ctf.star with the simulator's defocus values.
STAND_IN = '''#!{python}
import argparse, json, os, sys
from pathlib import Path
import numpy as np
from crisp_ext.io.star import read_star, write_star
p = argparse.ArgumentParser()
p.add_argument("--o"); p.add_argument("--in_mics"); p.add_argument("--defocus")
a, _ = p.parse_known_args()
o = Path(a.o)
try:
    blocks = read_star(a.in_mics)
    defocus = json.loads(Path(a.defocus).read_text())
    names = []
    for name in blocks["micrographs"]["rlnMicrographName"]:
        link = o / "Movies" / Path(name).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(os.path.relpath(name, link.parent), link)
        names.append(str(link))
    d = np.array([defocus[Path(n).name] for n in names])
    optics = {{c: blocks["optics"][c].to_numpy() for c in blocks["optics"].columns}}
    optics.setdefault("rlnMicrographPixelSize", optics.get("rlnMicrographOriginalPixelSize"))
    mics = {{"rlnMicrographName": np.array(names, dtype=object), "rlnOpticsGroup": np.ones(len(names), dtype=int),
            "rlnDefocusU": d, "rlnDefocusV": d, "rlnDefocusAngle": np.zeros(len(d)),
            "rlnCtfFigureOfMerit": np.full(len(d), 0.2), "rlnCtfMaxResolution": np.full(len(d), 6.0)}}
    write_star(o / "micrographs_ctf.star", {{"optics": optics, "micrographs": mics}}, loops=["optics", "micrographs"])
    (o / "RELION_OUTPUT_NODES.star").write_text("data_output_nodes\\nloop_\\n_rlnPipeLineNodeName #1\\n"
                                                "_rlnPipeLineNodeType #2\\n" + str(o / "micrographs_ctf.star") + " 1\\n")
    (o / "RELION_JOB_EXIT_SUCCESS").touch()
except Exception as exc:
    print(exc, file=sys.stderr)
    (o / "RELION_JOB_EXIT_FAILURE").touch()
'''


def _pipeliner(root: Path, *args: str, timeout: float = 60) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(["relion_pipeliner", *args], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the pipeliner and the jobs it started
        out, _ = proc.communicate()
        pytest.fail(f"relion_pipeliner {' '.join(args)} did not finish in {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def _add(root: Path, job_type: str, **options: str) -> str:
    text = ";".join(f"{k} == {v}" for k, v in options.items())
    return _pipeliner(root, "--addJob", job_type, "--addJobOptions", text)


def _status(root: Path) -> dict[str, int]:
    table = starfile.read(root / "default_pipeline.star", always_dict=True)["pipeline_processes"]
    return dict(zip(table["rlnPipeLineProcessName"], table["rlnPipeLineProcessStatus"].astype(int)))


def _job_log(root: Path, job: str) -> str:
    return "\n".join(f"--- {job}{f}:\n" + (root / job / f).read_text(errors="replace")[-3000:]
                     for f in ("run.out", "run.err") if (root / job / f).exists())


@pytest.fixture(scope="module")
def relion_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("relion_project")
    tools = tmp_path_factory.mktemp("tools")
    project = rs.simulate(root, n_mics=5, shape=(384, 384), mic_dir="Raw", seed=3)
    (tools / "defocus.json").write_text(json.dumps({Path(n).name: project.defocus[n] for n in project.names}))
    script = tools / "stand_in_ctf.py"
    script.write_text(STAND_IN.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    # Curated particles as Select would give them: names as in External/job002/micrographs_ctf.star.
    renamed = {f"External/job002/Movies/{Path(n).name}": n for n in project.names}
    project.truth = {new: project.truth[old] for new, old in renamed.items()}
    project.defocus = {new: project.defocus[old] for new, old in renamed.items()}
    project.names = list(renamed)
    rs.write_particles_star(project, "Select/job010/particles.star", on=project.names[:3])
    (root / "default_pipeline.star").write_text("# version 30001\n\ndata_pipeline_general\n\n"
                                                "_rlnPipeLineJobCounter 1\n")
    exe = shutil.which("crisp-relion") or str(Path(sys.executable).parent / "crisp-relion")
    _add(root, "Import", do_raw="Yes", fn_in_raw="Raw/*.mrc", is_multiframe="No", angpix=str(rs.PIXEL_SIZE), kV="300",
         Cs="2.7", Q0="0.1", optics_group_name="opticsGroup1")
    _add(root, "External", fn_exe=str(script), in_mic="Import/job001/micrographs.star", param1_label="defocus",
         param1_value=str(tools / "defocus.json"), nr_threads="1")
    _add(root, "External", fn_exe=exe, in_mic="External/job002/micrographs_ctf.star",
         in_part="Select/job010/particles.star", param1_label="diameter", param1_value=str(rs.DIAMETER_A),
         param2_label="set", param2_value=rs.TINY_SETTINGS, nr_threads="1")
    _add(root, "Extract", star_mics="External/job002/micrographs_ctf.star",
         coords_suffix="External/job003/coords_suffix_autopick.star", extract_size=str(BOX), do_invert="Yes",
         do_norm="Yes", bg_diameter="36", nr_mpi="1")
    # The trailing space works around 3.1's --RunJobs list bug (the last job would be dropped).
    out = _pipeliner(root, "--RunJobs", "Import/job001/ External/job002/ External/job003/ Extract/job004/ ",
                     "--sec_wait_after", "1", timeout=300)
    return root, project, out


def test_crisp_relion_job_succeeds_in_relion(relion_run):
    root, project, out = relion_run
    status = _status(root)
    assert status.get("External/job003/") == 2, _job_log(root, "External/job003/") + out[-2000:]
    assert status.get("Extract/job004/") == 2, _job_log(root, "Extract/job004/") + out[-2000:]
    job = root / "External/job003"
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert (root / ".Nodes/2/External/job003/coords_suffix_autopick.star").exists()
    note = (job / "note.txt").read_text()
    assert "--in_parts Select/job010/particles.star" in note and "--diameter" in note
    summary = json.loads((job / "summary.json").read_text())
    assert summary["relion_version"] == "3.1" and summary["version_source"] == "job.star"
    assert "_rlnPipeLineNodeType #2" in (job / "RELION_OUTPUT_NODES.star").read_text()
    assert "suits Extract" in (job / "run.out").read_text()


def test_extract_reads_every_pick(relion_run):
    root, project, _ = relion_run
    picks = {n: starfile.read(root / "External/job003/Movies" / (Path(n).stem + "_autopick.star"), always_dict=True)
             for n in project.names}
    n_picks = sum(len(next(iter(b.values()))) if b else 0 for b in picks.values())
    parts = starfile.read(root / "Extract/job004/particles.star", always_dict=True)["particles"]
    assert len(parts) == n_picks > 0
    m = re.search(r"Written out STAR file with (\d+) particles", (root / "Extract/job004/run.out").read_text())
    assert m and int(m.group(1)) == n_picks
    assert set(parts["rlnMicrographName"]) <= set(project.names)
    assert all(str(i).split("@")[1].startswith("Extract/job004/Movies/") for i in parts["rlnImageName"])


def test_extracted_boxes_are_centred_on_the_particles(relion_run):
    root, project, _ = relion_run
    parts = starfile.read(root / "Extract/job004/particles.star", always_dict=True)["particles"]
    found, total, dist = 0, 0, []
    for name in project.names:
        sel = parts[parts["rlnMicrographName"] == name]
        d = rs.match(sel[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float), project.truth[name],
                     radius=0.5 * rs.DIAMETER_A / rs.PIXEL_SIZE)
        found += len(d)
        total += len(project.truth[name])
        dist += list(d)
    assert found / total >= 0.9 and found / len(parts) >= 0.9, f"{found} matched, {total} true, {len(parts)} picked"
    # A perfect picker is ~2 px from the simulator's centres (asymmetric particles: the density centroid moves).
    assert np.median(dist) <= 4.0, np.median(dist)
    # The boxes RELION cut (inverted: particles bright) average to a blob centred in the box.
    stacks = {}
    for image_name in parts["rlnImageName"]:
        index, path = str(image_name).split("@")
        if path not in stacks:
            with mrcfile.open(root / path) as mrc:
                stacks[path] = np.array(mrc.data, dtype=np.float32).reshape(-1, BOX, BOX)
    mean = np.mean([stacks[p][int(i) - 1] for i, p in (str(s).split("@") for s in parts["rlnImageName"])], axis=0)
    yy, xx = np.mgrid[:BOX, :BOX]
    r = np.hypot(yy - BOX / 2, xx - BOX / 2)
    ring = r > 20
    contrast = mean[r < 6].mean() - mean[ring].mean()
    assert contrast > 4 * mean[ring].std(), (contrast, mean[ring].std())  # a blob, not averaged noise
    w = np.clip(mean - mean[ring].mean(), 0, None)
    cy, cx = (w * yy).sum() / w.sum(), (w * xx).sum() / w.sum()
    assert abs(cx - BOX / 2) < 2.5 and abs(cy - BOX / 2) < 2.5, (cx, cy)
