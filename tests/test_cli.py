"""The standalone command ``crisp-ext`` end to end, on a tiny synthetic project made here.

Four simulated micrographs (288 x 256 px, particles of 28 px, SNR 1), curated picks on three, the simulator's truth
on all, and a tiny network (timm's test ResNet, 3 levels, 2 epochs of 8 patches of 48 px): a training run takes a few
seconds on one CPU thread. Accuracy is not the point here (a 2-epoch model); structure and consistency are: the files
``train``, ``pick`` and ``evaluate`` promise, that they agree with each other, that runs resume, and that bad input
stops with one line, exit code 2, nothing half-written and the inputs untouched.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pytest
import starfile
import torch

import crisp_ext.io.coords as coords_module
import crisp_ext.train as train_module
from crisp_ext.cli import main
from crisp_ext.io.atomic import atomic_path
from crisp_ext.io.coords import read_coordinates, write_coordinates
from crisp_ext.io.mrc import write_mrc
from crisp_ext.io.star import write_star
from crisp_ext.metrics import picking_metrics
from crisp_ext.simulate import simulate_micrograph

SHAPE = (256, 288)  # (ny, nx)
DIAMETER_PX = 28.0
PIXEL_SIZE = 4.0
NAMES = [f"mic{i:03d}" for i in range(1, 5)]
CURATED = NAMES[:3]

TINY_TOML = """\
# a tiny picker: a few seconds of training on one CPU thread
[model]
arch = "unet"
encoder = "tu-test_resnet"
encoder_depth = 3
decoder_channels = [16, 8, 8]

[train]
patch_size = 48
batch_size = 4
patches_per_micrograph = 4
min_patches_per_epoch = 0
lr = 0.01
early_stop_patience = 0
device = "cpu"
bf16 = false

[predict]
tile = 128
overlap = 16
bf16 = false
"""


# -- the project -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    truth = {}
    for i, name in enumerate(NAMES):
        sim = simulate_micrograph(SHAPE, n_particles=20, diameter_px=DIAMETER_PX, pixel_size=PIXEL_SIZE, snr=1.0,
                                  seed=i)
        write_mrc(root / "mics" / f"{name}.mrc", sim.image, pixel_size=PIXEL_SIZE)
        write_coordinates(root / "truth" / f"{name}.star", sim.centres)
        if name in CURATED:
            write_coordinates(root / "picks" / f"{name}_manualpick.star", sim.centres)
        truth[name] = sim.centres
    # a RELION micrographs STAR (names relative to the project directory, as RELION writes them)
    write_star(root / "micrographs.star",
               {"optics": {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnMicrographPixelSize": [PIXEL_SIZE], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]},
                "micrographs": {"rlnMicrographName": [f"mics/{n}.mrc" for n in NAMES],
                                "rlnOpticsGroup": [1] * len(NAMES)}},
               loops=["optics", "micrographs"])
    (root / "tiny.toml").write_text(TINY_TOML)
    inputs = [root / "mics", root / "picks", root / "truth", root / "micrographs.star", root / "tiny.toml"]
    return SimpleNamespace(root=root, mics=root / "mics", picks=root / "picks", truth_dir=root / "truth",
                           config=root / "tiny.toml", star=root / "micrographs.star", truth=truth,
                           inputs=inputs, snapshot=snapshot(*inputs))


def common(project) -> list[str]:
    """The options every train/pick run here shares: the tiny config file, overrides, one thread, plain log."""
    return ["--config", str(project.config), "--set", "train.epochs=2", "--set", "centres.finder=auto",
            "--threads", "1", "--quiet"]


def train_args(project, out: Path) -> list[str]:
    return ["train", "--mics", str(project.mics), "--picks", str(project.picks), "--diameter", f"{DIAMETER_PX:g}px",
            "--out", str(out), *common(project)]


def cli(argv) -> tuple[int, str, str]:
    """``main(argv)`` with its stdout and stderr captured (usable in module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def snapshot(*paths: Path) -> dict:
    """Bytes and modification time of every file under ``paths``."""
    files = []
    for p in paths:
        files += sorted(f for f in Path(p).rglob("*") if f.is_file()) if Path(p).is_dir() else [Path(p)]
    return {str(f): (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


def temp_files(out: Path) -> list[Path]:
    """Leftovers of atomic writes (``.<stem>.XXXX.tmp<suffix>``) or anything hidden (but the folder's lock file)."""
    return [f for f in out.rglob("*") if (f.name.startswith(".") or ".tmp" in f.name) and f.name != ".crisp-ext.lock"]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(project, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    rc, stdout, stderr = cli(train_args(project, out))
    assert rc == 0, stderr
    return SimpleNamespace(out=out, model=out / "model", stdout=stdout)


@pytest.fixture(scope="module")
def picked(project, trained):
    """``crisp-ext pick --model`` run from the project directory with relative paths, as in a RELION project."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project.root)
        rc, stdout, stderr = cli(["pick", "--mics", "mics", "--model", trained.model, "--out", "picked",
                                  "--extract", "32", *common(project)])
    assert rc == 0, stderr
    return SimpleNamespace(out=project.root / "picked", stdout=stdout)


# -- train, pick, evaluate ---------------------------------------------------------------------------------------------

def test_train_writes_a_whole_model_directory(trained):
    model = trained.model
    for name in ("weights.pt", "config.toml", "model.json"):
        assert (model / name).is_file(), name
    info = json.loads((model / "model.json").read_text())
    assert info["arch"] == "unet" and info["encoder"] == "tu-test_resnet"
    assert info["selection"]["finder"] in ("nms", "trackpy", "morphology")
    assert info["diameter_px"] == pytest.approx(DIAMETER_PX)
    history = json.loads((model / "training" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert is_png(model / "training" / "training_curve.png")
    assert (trained.out / "config.toml").is_file()
    assert f"model written to {model}" in trained.stdout
    assert "validation: precision" in trained.stdout and "AP" in trained.stdout and "(by chance" in trained.stdout
    # a picture of the picks against the user's on each validation micrograph, named in the model's record
    pictures = info["validation"]["pictures"]
    assert len(pictures) == len(info["validation"]["micrographs"]) >= 1
    assert sorted(Path(p).name for p in pictures) == sorted(f"validation_{m}.png"
                                                            for m in info["validation"]["micrographs"])
    assert all(is_png(Path(p)) and Path(p).parent == trained.out / "plots" for p in pictures)
    assert temp_files(trained.out) == []


def test_pick_writes_consistent_coordinates_particles_star_summary_and_plots(project, trained, picked):
    out = picked.out
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    assert sorted(counts) == NAMES
    assert summary["micrographs_picked"] == len(NAMES) and summary["micrographs_skipped"] == 0
    assert sum(counts.values()) == summary["particles"] == summary["particles_this_run"] > 0
    info = json.loads((trained.model / "model.json").read_text())
    assert summary["finder"] == info["selection"]["finder"]
    assert summary["threshold"] == pytest.approx(info["threshold"])
    assert Path(summary["model_dir"]) == trained.model
    assert summary["timings_s"]["pick"] >= 0 and summary["timings_s"]["total"] >= summary["timings_s"]["pick"]
    assert f"{summary['particles']} particles picked on {len(NAMES)} micrograph(s)" in picked.stdout
    # the run's log keeps the command, every progress line and the result
    log = (out / "crisp-ext.log").read_text()
    assert "crisp-ext pick --mics mics --model" in log
    assert all(f"] {name}: {counts[name]} picks" in log for name in NAMES)
    assert f"{summary['particles']} particles picked on {len(NAMES)} micrograph(s)" in log

    # one RELION coordinate STAR per micrograph: X, Y, figure of merit; rows = the summary's count
    per_mic = {}
    for name in NAMES:
        path = out / "coordinates" / f"{name}_crisp.star"
        table = read_coordinates(path)
        assert len(table) == counts[name]
        if counts[name]:
            df = starfile.read(path)
            assert {"rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"} <= set(df.columns)
            assert len(df) == counts[name]
            x, y = df["rlnCoordinateX"].to_numpy(), df["rlnCoordinateY"].to_numpy()
            fom = df["rlnAutopickFigureOfMerit"].to_numpy()
            assert np.all((x >= 0) & (x <= SHAPE[1] - 1) & (y >= 0) & (y <= SHAPE[0] - 1))
            assert np.all(np.isfinite(fom)) and np.all(fom >= 0)  # the threshold is at figure of merit 0
            assert np.all(np.diff(fom) <= 1e-6)  # best first
        per_mic[name] = table

    # the combined particles STAR: optics block + every pick, named by micrograph path (relative, as given)
    star = starfile.read(out / "particles.star", always_dict=True)
    assert set(star) == {"optics", "particles"}
    optics, parts = star["optics"], star["particles"]
    assert list(optics["rlnOpticsGroup"]) == [1]
    assert optics["rlnMicrographPixelSize"].iloc[0] == pytest.approx(PIXEL_SIZE)
    assert {"rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"} <= set(optics.columns)
    assert {"rlnCoordinateX", "rlnCoordinateY", "rlnMicrographName", "rlnAutopickFigureOfMerit",
            "rlnOpticsGroup"} <= set(parts.columns)
    assert len(parts) == summary["particles"]
    for name in NAMES:
        rows = parts[parts["rlnMicrographName"] == f"mics/{name}.mrc"]
        assert len(rows) == counts[name]
        np.testing.assert_allclose(rows[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), per_mic[name].xy,
                                   atol=1e-5)
        np.testing.assert_allclose(rows["rlnAutopickFigureOfMerit"].to_numpy(), per_mic[name].score, atol=1e-5)
    assert all((project.root / m).is_file() for m in parts["rlnMicrographName"])

    # pictures: overlays (the first three micrographs) and the score histogram
    for name in NAMES[:3]:
        assert is_png(out / "plots" / f"picks_{name}.png"), name
    assert is_png(out / "plots" / "score_histogram.png")
    assert temp_files(out) == []
    assert snapshot(*project.inputs) == project.snapshot  # train and pick only read their inputs


def test_extract_writes_stacks_that_the_particles_star_points_to(project, picked):
    out = picked.out
    counts = json.loads((out / "summary.json").read_text())["counts"]
    star = starfile.read(out / "particles_extracted.star", always_dict=True)
    optics, parts = star["optics"], star["particles"]
    assert int(optics["rlnImageSize"].iloc[0]) == 32 and int(optics["rlnImageDimensionality"].iloc[0]) == 2
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(PIXEL_SIZE)
    assert len(parts) == sum(counts.values())
    # image names and micrograph names share one base: the project directory the command ran in
    used: dict[str, list[int]] = {}
    for image, mic in zip(parts["rlnImageName"], parts["rlnMicrographName"]):
        index, stack = image.split("@", 1)
        assert not Path(stack).is_absolute() and (project.root / stack).is_file(), image
        assert (project.root / mic).is_file()
        assert Path(stack).stem == Path(mic).stem
        used.setdefault(stack, []).append(int(index))
    for stack, indices in used.items():
        with mrcfile.open(project.root / stack, permissive=False) as mrc:
            assert mrc.is_image_stack()
            n = mrc.data.shape[0]
            assert mrc.data.shape == (counts[Path(stack).stem], 32, 32)
            assert mrc.voxel_size.x == pytest.approx(PIXEL_SIZE)
            assert np.isfinite(mrc.data).all()
        assert sorted(indices) == list(range(1, n + 1))
    assert len(used) == sum(1 for c in counts.values() if c)


def test_evaluate_prints_and_writes_metrics_that_match_the_picks(project, picked, tmp_path, capsys):
    counts = json.loads((picked.out / "summary.json").read_text())["counts"]
    report = tmp_path / "metrics.json"
    rc = main(["evaluate", "--mics", str(project.mics), "--picks", str(picked.out / "coordinates"),
               "--truth", str(project.truth_dir), "--diameter", f"{DIAMETER_PX:g}px", "--json", str(report)])
    stdout = capsys.readouterr().out
    assert rc == 0
    header = stdout.splitlines()[0].split()
    assert header == ["micrograph", "n_pred", "n_true", "P", "R", "F1", "AP"]
    assert all(any(line.startswith(name) for line in stdout.splitlines()) for name in NAMES)
    assert "ALL (radius 0.5 D)" in stdout and "ALL (radius 0.25 D)" in stdout
    metrics = json.loads(report.read_text())
    for key in ("precision", "recall", "f1", "ap"):
        assert 0.0 <= metrics["total"][key] <= 1.0
    assert metrics["diameter_px"] == pytest.approx(DIAMETER_PX)
    rows = {r["micrograph"]: r for r in metrics["micrographs"]}
    assert sorted(rows) == NAMES
    for name in NAMES:
        assert rows[name]["n_pred"] == counts[name]
        assert rows[name]["n_true"] == len(project.truth[name])
    assert metrics["total"]["n_pred"] == sum(counts.values())
    assert metrics["total"]["n_true"] == sum(len(t) for t in project.truth.values())
    # the same numbers as computed directly, with the picks ranked by their figure of merit
    tables = [read_coordinates(picked.out / "coordinates" / f"{n}_crisp.star") for n in NAMES]
    direct = picking_metrics([t.xy for t in tables], [t.score for t in tables],
                             [project.truth[n] for n in NAMES], 0.5 * DIAMETER_PX)
    assert metrics["total"]["ap"] == pytest.approx(direct.ap)
    assert metrics["total"]["f1"] == pytest.approx(direct.f1)
    # and the same as from the combined particles STAR (whose micrograph names are relative to the project)
    report2 = tmp_path / "metrics_star.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project.root)
        assert main(["evaluate", "--mics", "mics", "--picks", "picked/particles.star", "--truth", "truth",
                     "--diameter", f"{DIAMETER_PX:g}px", "--json", str(report2)]) == 0
    assert json.loads(report2.read_text())["total"] == pytest.approx(metrics["total"])


def test_evaluate_pictures_show_matched_unmatched_and_missed_picks(tmp_path, capsys):
    """One PNG per micrograph: matched picks green, picks matched to nothing red, missed reference picks yellow;
    each colour drawn on the micrograph only when there is something of that kind (the legend always lists them)."""
    from PIL import Image

    image = simulate_micrograph((128, 128), n_particles=0, snr=1.0, seed=3).image
    for name in ("a", "b"):
        write_mrc(tmp_path / "mics" / f"{name}.mrc", image, pixel_size=1.0)
    truth = np.array([[30.0, 30.0], [90.0, 90.0]])
    write_coordinates(tmp_path / "truth" / "a.star", truth)
    write_coordinates(tmp_path / "truth" / "b.star", truth)
    # a: both found; b: one found, one missed, one pick on nothing
    write_coordinates(tmp_path / "picks" / "a_crisp.star", truth + 1.0, np.array([1.0, 1.0]))
    write_coordinates(tmp_path / "picks" / "b_crisp.star", np.array([[31.0, 31.0], [30.0, 100.0]]),
                      np.array([1.0, 1.0]))
    pictures = tmp_path / "pictures"
    assert main(["evaluate", "--mics", str(tmp_path / "mics"), "--picks", str(tmp_path / "picks"), "--truth",
                 str(tmp_path / "truth"), "--diameter", "20px", "--pictures", str(pictures), "--json",
                 str(tmp_path / "m.json")]) == 0
    assert "matches_<micrograph>.png" in capsys.readouterr().out
    rows = {r["micrograph"]: r for r in json.loads((tmp_path / "m.json").read_text())["micrographs"]}
    assert sorted(p.name for p in pictures.iterdir()) == ["matches_a.png", "matches_b.png"]

    def colours(name):
        rgb = np.asarray(Image.open(rows[name]["picture"]).convert("RGB")).astype(int)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        return {"red": ((r > 200) & (g < 60) & (b < 60)).sum(), "yellow": ((r > 200) & (g > 200) & (b < 60)).sum(),
                "green": ((g > 100) & (r < 80) & (b < 80)).sum()}

    a, b = colours("a"), colours("b")
    assert a["green"] > 50 and b["green"] > 20
    assert b["red"] > 20 and b["yellow"] > 5
    # a has no unmatched pick and misses nothing: those colours only in the legend's small markers
    assert a["red"] < 0.15 * b["red"] and a["yellow"] < 0.15 * b["yellow"]


def test_evaluate_pictures_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    rc = main(["evaluate", "--mics", str(tmp_path), "--picks", str(tmp_path), "--truth", str(tmp_path),
               "--diameter", "20px", "--pictures", str(tmp_path / "taken")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--pictures" in err and "taken" in err
    assert (tmp_path / "taken").read_text() == "x"


def test_evaluate_ranks_picks_by_their_figure_of_merit(tmp_path, capsys):
    """AP depends on the order of the picks: a confident false pick ranked first must cost precision."""
    image = simulate_micrograph((96, 96), n_particles=0, snr=1.0, seed=3).image
    write_mrc(tmp_path / "mics" / "a.mrc", image, pixel_size=1.0)
    write_coordinates(tmp_path / "truth" / "a.star", np.array([[30.0, 30.0], [60.0, 60.0]]))
    picks = np.array([[30.0, 30.0], [60.0, 60.0], [15.0, 75.0]])  # two right, one wrong
    results = {}
    for case, fom in (("good", [3.0, 2.0, 1.0]), ("bad", [2.0, 1.0, 3.0])):
        write_coordinates(tmp_path / case / "a_crisp.star", picks, np.array(fom))
        assert main(["evaluate", "--mics", str(tmp_path / "mics"), "--picks", str(tmp_path / case), "--truth",
                     str(tmp_path / "truth"), "--diameter", "10px", "--json", str(tmp_path / f"{case}.json")]) == 0
        results[case] = json.loads((tmp_path / f"{case}.json").read_text())["total"]
    capsys.readouterr()
    assert results["good"]["ap"] == pytest.approx(1.0)
    assert results["bad"]["ap"] < 0.9
    assert results["good"]["f1"] == results["bad"]["f1"] == pytest.approx(0.8)


# -- resuming ----------------------------------------------------------------------------------------------------------

def _states(paths) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in paths}


def test_pick_resumes_after_an_interruption_skips_done_micrographs_and_overwrite_redoes_them(
        project, trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project.root)  # the micrographs STAR names files relative to the project directory
    out = tmp_path / "picks"
    argv = ["pick", "--mics", "micrographs.star", "--model", str(trained.model), "--out", str(out),
            *common(project)]
    inputs = snapshot(project.mics, project.star, trained.model)

    # Ctrl-C while the third coordinate file is being written
    calls = {"n": 0}
    real_write = coords_module.atomic_write_text

    def interrupted_write(path, text):
        calls["n"] += 1
        if calls["n"] == 3:
            with atomic_path(path) as tmp:
                tmp.write_text(text[: len(text) // 2])
                raise KeyboardInterrupt
        return real_write(path, text)

    monkeypatch.setattr(coords_module, "atomic_write_text", interrupted_write)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["crisp-ext: interrupted; run the same command again to resume"]
    done = sorted(p.name for p in (out / "coordinates").iterdir())
    assert done == [f"{n}_crisp.star" for n in NAMES[:2]]
    assert temp_files(out) == []
    assert not (out / "particles.star").exists() and not (out / "summary.json").exists()
    monkeypatch.setattr(coords_module, "atomic_write_text", real_write)

    # the same command again: the two finished micrographs are skipped, untouched
    before = _states((out / "coordinates").iterdir())
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "2 micrograph(s) already done, skipped" in stdout and "(2 skipped as done)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["micrographs_skipped"] == 2 and summary["micrographs_picked"] == 2
    assert sorted(summary["counts_this_run"]) == NAMES[2:] and sorted(summary["counts"]) == NAMES  # the whole folder
    files = sorted((out / "coordinates").iterdir())
    assert [p.name for p in files] == [f"{n}_crisp.star" for n in NAMES]
    after = _states(files)
    assert all(after[name] == state for name, state in before.items())
    total = sum(len(read_coordinates(p)) for p in files)
    assert summary["particles"] == total == len(starfile.read(out / "particles.star")["particles"])

    # once more: everything is done, nothing is written but the combined STAR and the summary
    before = _states(files)
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "4 micrograph(s) already done, skipped" in stdout
    assert _states(files) == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["micrographs_skipped"] == 4 and summary["micrographs_picked"] == 0
    assert summary["particles_this_run"] == 0 and summary["particles"] == total

    # --overwrite picks every micrograph again (new files), with the same result
    contents = {p.name: p.read_bytes() for p in files}
    assert main([*argv, "--overwrite"]) == 0
    stdout = capsys.readouterr().out
    assert "already done" not in stdout and "(0 skipped as done)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["micrographs_picked"] == 4 and summary["micrographs_skipped"] == 0
    renewed = _states(files)
    assert all(renewed[name] != before[name] for name in before)
    assert {p.name: p.read_bytes() for p in files} == contents
    assert snapshot(project.mics, project.star, trained.model) == inputs


def test_interrupted_training_resumes_from_its_checkpoint(project, trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = train_args(project, out)
    real_epoch = train_module._run_epoch

    def ctrl_c_in_epoch_2(phase, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(phase, epoch, *args, **kwargs)

    monkeypatch.setattr(train_module, "_run_epoch", ctrl_c_in_epoch_2)
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == ["crisp-ext: interrupted; run the same command again to resume"]
    training = out / "model" / "training"
    assert (training / "checkpoint.pt").is_file()
    assert [r["epoch"] for r in json.loads((training / "history.json").read_text())] == [1]
    assert not (out / "model" / "model.json").exists() and not (out / "model" / "weights.pt").exists()
    assert temp_files(out) == []
    monkeypatch.setattr(train_module, "_run_epoch", real_epoch)

    assert main(argv) == 0  # the same command again
    stdout = capsys.readouterr().out
    assert "resuming after cnn epoch 1" in stdout
    assert [r["epoch"] for r in json.loads((training / "history.json").read_text())] == [1, 2]
    # seeded per epoch: the resumed run ends where the uninterrupted one did
    resumed = torch.load(out / "model" / "weights.pt", weights_only=True)
    whole = torch.load(trained.model / "weights.pt", weights_only=True)
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    info = json.loads((out / "model" / "model.json").read_text())
    whole_info = json.loads((trained.model / "model.json").read_text())
    for key in ("finder", "params", "threshold"):
        assert info["selection"][key] == whole_info["selection"][key]


# -- bad input ---------------------------------------------------------------------------------------------------------

def expect_input_error(capsys, argv, *fragments) -> str:
    """Exit code 2 and one line on stderr naming each of ``fragments``; no traceback anywhere."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("crisp-ext: error: ")
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


def nothing_half_written(out: Path, bad_name: str | None = None) -> None:
    """No temporary files, no combined outputs, no model, and whatever per-micrograph files there are whole."""
    if not out.exists():
        return
    assert temp_files(out) == []
    for name in ("particles.star", "particles_extracted.star", "summary.json", "model/model.json",
                 "model/weights.pt"):
        assert not (out / name).exists(), name
    for star in out.rglob("*.star"):
        read_coordinates(star)
        assert bad_name is None or not star.name.startswith(bad_name)


def copy_mics(project, dest: Path) -> Path:
    shutil.copytree(project.mics, dest)
    return dest


def test_missing_micrographs(project, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project.root)
    inputs = snapshot(project.mics, project.picks, project.star)
    out = tmp_path / "out"
    # a micrographs STAR listing a file that does not exist
    star = tmp_path / "micrographs.star"
    write_star(star, {"micrographs": {"rlnMicrographName": ["mics/mic001.mrc", "mics/mic404.mrc"]}},
               loops=["micrographs"])
    expect_input_error(capsys, ["train", "--mics", star, "--picks", project.picks, "--diameter", "28px",
                                "--out", out, *common(project)], star, "mics/mic404.mrc", "not found")
    assert not out.exists()
    # a glob that matches nothing, a directory that does not exist
    pattern = str(project.mics / "nothing*.mrc")
    expect_input_error(capsys, ["pick", "--mics", pattern, "--model", tmp_path, "--out", out, *common(project)],
                       pattern, "no .mrc micrographs")
    expect_input_error(capsys, ["pick", "--mics", tmp_path / "nowhere", "--picks", project.picks, "--diameter",
                                "28px", "--out", out, *common(project)], tmp_path / "nowhere", "not found")
    assert not out.exists()
    assert snapshot(project.mics, project.picks, project.star) == inputs


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_corrupt_micrograph(project, trained, tmp_path, capsys, damage):
    mics = copy_mics(project, tmp_path / "mics")
    bad = mics / "mic002.mrc"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(4096))
    inputs = snapshot(mics, project.picks, trained.model)
    expected = "MRC file is truncated" if damage == "truncated" else "not a valid MRC file"

    out = tmp_path / "train"
    expect_input_error(capsys, ["train", "--mics", mics, "--picks", project.picks, "--diameter", "28px",
                                "--out", out, *common(project)], bad, expected)
    nothing_half_written(out)

    out = tmp_path / "pick"
    expect_input_error(capsys, ["pick", "--mics", mics, "--model", trained.model, "--out", out,
                                *common(project)], bad, expected)
    nothing_half_written(out, bad_name="mic002")
    assert snapshot(mics, project.picks, trained.model) == inputs


def test_a_corrupt_micrograph_fails_before_training(project, tmp_path, capsys):
    mics = copy_mics(project, tmp_path / "mics")
    bad = mics / f"{[n for n in NAMES if n not in CURATED][0]}.mrc"  # one with no picks: read only for picking
    bad.write_bytes(bad.read_bytes()[:2000])
    out = tmp_path / "out"
    expect_input_error(capsys, ["pick", "--mics", mics, "--picks", project.picks, "--diameter", "28px",
                                "--out", out, *common(project)], bad, "MRC file is truncated")
    assert not (out / "model").exists()  # failed before training
    assert not [f for f in out.rglob("*") if f.is_file() and f.name not in ("config.toml", "crisp-ext.log", ".crisp-ext.lock")]
    log = (out / "crisp-ext.log").read_text()
    assert "crisp-ext pick --mics" in log and f"crisp-ext: error: {bad}: MRC file is truncated" in log


def test_picks_for_a_micrograph_not_in_the_set(project, tmp_path, capsys):
    out = tmp_path / "out"
    # a coordinate file among the picks that belongs to no micrograph
    picks = tmp_path / "picks"
    shutil.copytree(project.picks, picks)
    stray = picks / "mic999_manualpick.star"
    write_coordinates(stray, np.array([[50.0, 60.0]]))
    inputs = snapshot(project.mics, picks)
    expect_input_error(capsys, ["train", "--mics", project.mics, "--picks", picks, "--diameter", "28px",
                                "--out", out, *common(project)], stray, "matches no micrograph")
    # a particles STAR naming a micrograph that was not given
    star = tmp_path / "particles.star"
    write_star(star, {"particles": {"rlnCoordinateX": [50.0, 70.0], "rlnCoordinateY": [60.0, 80.0],
                                    "rlnMicrographName": ["mics/mic001.mrc", "other/mic777.mrc"]}},
               loops=["particles"])
    expect_input_error(capsys, ["pick", "--mics", project.mics, "--picks", star, "--diameter", "28px",
                                "--out", out, *common(project)], star, "other/mic777.mrc")
    assert not out.exists()
    assert snapshot(project.mics, picks) == inputs


def test_no_picks_at_all(project, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_input_error(capsys, ["train", "--mics", project.mics, "--picks", empty, "--diameter", "28px",
                                "--out", out, *common(project)], empty, "no coordinate files")
    blank = tmp_path / "blank"
    for name in CURATED:
        write_coordinates(blank / f"{name}.star", np.zeros((0, 2)))
    (blank / f"{NAMES[3]}.box").write_text("")
    inputs = snapshot(project.mics, blank)
    expect_input_error(capsys, ["train", "--mics", project.mics, "--picks", blank, "--diameter", "28px",
                                "--out", out, *common(project)], blank, "no picks")
    expect_input_error(capsys, ["evaluate", "--mics", project.mics, "--picks", project.truth_dir, "--truth", blank,
                                "--diameter", "28px"], blank, "no reference picks")
    assert not out.exists()
    assert snapshot(project.mics, blank) == inputs


def test_particle_larger_than_the_micrograph(project, trained, tmp_path, capsys):
    inputs = snapshot(project.mics, project.picks, trained.model)
    out = tmp_path / "train"
    expect_input_error(capsys, ["train", "--mics", project.mics, "--picks", project.picks, "--diameter", "300px",
                                "--out", out, *common(project)],
                       project.mics, "300 px", "not smaller than the micrograph")
    nothing_half_written(out)
    out = tmp_path / "pick"  # in Å: 1600 Å at 4 Å/px
    expect_input_error(capsys, ["pick", "--mics", project.mics, "--model", trained.model, "--diameter", "1600A",
                                "--out", out, *common(project)],
                       project.mics, "400 px", "not smaller than the micrograph")
    nothing_half_written(out)
    assert not (out / "coordinates").exists() or not list((out / "coordinates").iterdir())
    assert snapshot(project.mics, project.picks, trained.model) == inputs


def test_unreadable_option_files_are_one_line_errors_and_write_nothing(project, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["train", "--mics", project.mics, "--picks", project.picks, "--diameter", "28px", "--out", out]
    missing = tmp_path / "nope.toml"
    expect_input_error(capsys, [*base, "--config", missing], missing, "not found")
    names = tmp_path / "names.txt"
    expect_input_error(capsys, [*base, *common(project), "--train-mics", f"@{names}"], names, "cannot read")
    expect_input_error(capsys, [*base, *common(project), "--val-mics", "mic404"], "mic404",
                       "not among the micrographs")
    assert not out.exists()


# -- the small subcommands ---------------------------------------------------------------------------------------------

def test_config_template_reads_back_as_the_default(tmp_path, capsys):
    from crisp_ext.config import PickerConfig, load_config

    target = tmp_path / "picker.toml"
    assert main(["config", "--out", str(target)]) == 0
    assert load_config(target).to_dict() == PickerConfig().to_dict()
    assert main(["config"]) == 0
    assert capsys.readouterr().out.endswith(target.read_text())
    assert main([]) == 0  # no subcommand: the help
    assert "train" in capsys.readouterr().out
