import numpy as np
import pytest

from crisp_ext.errors import InputError
from crisp_ext.io.coords import read_coordinates, write_coordinates
from crisp_ext.io.star import format_star, read_relion_micrographs, read_relion_particles, write_star

RNG = np.random.default_rng(3)
XY = np.column_stack([RNG.uniform(0, 900, 25), RNG.uniform(0, 700, 25)])
SCORE = RNG.uniform(-5, 10, 25)


def test_star_round_trip(tmp_path):
    p = write_coordinates(tmp_path / "mic_autopick.star", XY, SCORE)
    t = read_coordinates(p)
    assert np.allclose(t.xy, XY, atol=1e-5) and np.allclose(t.score, SCORE, atol=1e-5)
    text = p.read_text()
    assert text.startswith("# version 30001") and "_rlnAutopickFigureOfMerit #3" in text
    assert "_rlnClassNumber #4" in text and "_rlnAnglePsi #5" in text


def test_star_without_score_and_empty(tmp_path):
    t = read_coordinates(write_coordinates(tmp_path / "a.star", XY))
    assert t.score is None and np.allclose(t.xy, XY, atol=1e-5)
    e = read_coordinates(write_coordinates(tmp_path / "e.star", np.zeros((0, 2)), np.zeros(0)))
    assert len(e) == 0


def test_box_round_trip_is_centre_based(tmp_path):
    p = write_coordinates(tmp_path / "a.box", XY, SCORE, box_size=64)
    first = p.read_text().splitlines()[0].split()
    assert float(first[0]) == pytest.approx(XY[0, 0] - 32, abs=0.01)  # corner = centre - box/2
    t = read_coordinates(p)
    assert np.allclose(t.xy, XY, atol=0.01) and np.allclose(t.score, SCORE, atol=1e-5)
    assert np.all(t.diameter == 64)


def test_csv_round_trip_cryoppp_header(tmp_path):
    p = write_coordinates(tmp_path / "a.csv", XY, diameter=108)
    assert p.read_text().splitlines()[0] == "X-Coordinate,Y-Coordinate,Diameter"
    t = read_coordinates(p)
    assert np.allclose(t.xy, XY, atol=0.01) and np.all(t.diameter == 108) and t.score is None


def test_flip_y(tmp_path):
    p = write_coordinates(tmp_path / "a.csv", XY)
    t = read_coordinates(p, flip_y_height=700)
    assert np.allclose(t.xy[:, 1], 700 - XY[:, 1], atol=0.01)
    assert np.allclose(t.xy[:, 0], XY[:, 0], atol=0.01)


def test_bad_coordinate_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_coordinates(tmp_path / "missing.star")
    bad = tmp_path / "bad.box"
    bad.write_text("1 2 three 4\n")
    with pytest.raises(InputError, match="bad.box:1"):
        read_coordinates(bad)
    other = tmp_path / "o.xyz"
    other.write_text("1 2\n")
    with pytest.raises(InputError, match="unknown coordinate format"):
        read_coordinates(other)
    nostar = tmp_path / "n.star"
    nostar.write_text("data_\nloop_\n_rlnMicrographName #1\na.mrc\n")
    with pytest.raises(InputError, match="rlnCoordinateX"):
        read_coordinates(nostar)


def test_relion_tables(tmp_path):
    mics = tmp_path / "micrographs_ctf.star"
    write_star(mics, {
        "optics": {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnMicrographPixelSize": [2.0],
                   "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]},
        "micrographs": {"rlnMicrographName": ["Raw/mic 1.mrc", "Raw/mic2.mrc"], "rlnOpticsGroup": [1, 1],
                        "rlnDefocusU": [20000.0, 21000.0], "rlnDefocusV": [19000.0, 20500.0]},
    }, loops=["optics", "micrographs"])
    ms = read_relion_micrographs(mics, root=tmp_path)
    assert [m.id for m in ms] == ["Raw/mic 1.mrc", "Raw/mic2.mrc"]  # names verbatim, even with a space
    assert ms[0].pixel_size == 2.0 and ms[0].path == tmp_path / "Raw/mic 1.mrc"
    assert ms[1].ctf.defocus_u_A == 21000.0 and ms[1].ctf.voltage_kV == 300.0

    parts = tmp_path / "particles.star"
    write_star(parts, {
        "optics": {"rlnOpticsGroup": [1], "rlnImagePixelSize": [4.0], "rlnImageSize": [64]},
        "particles": {"rlnCoordinateX": [100.0, 200.0], "rlnCoordinateY": [50.0, 60.0],
                      "rlnOriginXAngst": [4.0, -2.0], "rlnOriginYAngst": [0.0, 6.0],
                      "rlnAngleRot": [10.0, 20.0], "rlnAngleTilt": [30.0, 40.0], "rlnAnglePsi": [50.0, 60.0],
                      "rlnMicrographName": ["Raw/mic 1.mrc", "Raw/mic2.mrc"], "rlnOpticsGroup": [1, 1]},
    }, loops=["optics", "particles"])
    p = read_relion_particles(parts, micrograph_pixel_size={m.id: m.pixel_size for m in ms})
    # centre = coordinate - origin / micrograph pixel size (2 Å/px, not the particles' 4 Å/px)
    assert np.allclose(p.x, [98.0, 201.0]) and np.allclose(p.y, [50.0, 57.0])
    assert p.has_poses and np.allclose(p.angles[1], [20, 40, 60])
    with pytest.raises(InputError, match="pixel size"):
        read_relion_particles(parts)


def test_format_star_general_block_and_quoting():
    text = format_star({"job": {"rlnJobTypeLabel": "relion.external", "rlnJobIsContinue": 0}})
    assert "data_job" in text and "loop_" not in text
    assert any(line.split() == ["_rlnJobTypeLabel", "relion.external"] for line in text.splitlines())
    assert '"a b"' in format_star({"t": {"rlnMicrographName": ["a b"]}})
