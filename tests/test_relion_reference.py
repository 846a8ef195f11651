"""crisp-relion with --in_mask / --in_3dref: labels by reprojection when the particles carry angles (Refine3D
run_data.star), disks otherwise, and the model directory says which."""

import json
from pathlib import Path

import numpy as np
import pytest

from crisp_ext.io.mrc import write_mrc
from crisp_ext.io.star import read_relion_particles
from crisp_ext.simulate import Phantom, phantom_volume
from relion_external.cli import _reference, build_parser, main, options_from

import relion_synth as rsyn

O = "External/job021/"


pytestmark = pytest.mark.usefixtures("keep_torch_threads")  # crisp-relion sets threads (--j)


def _project(root: Path):
    p = rsyn.simulate(root, n_mics=2, shape=(256, 256), seed=3)
    rsyn.write_micrographs_star(p, "CtfFind/job003/micrographs_ctf.star")
    rsyn.write_particles_star(p, "Refine3D/job020/run_data.star", on=p.names)
    volume = phantom_volume(Phantom.globular(), rsyn.DIAMETER_A, 2.0)
    write_mrc(root / "MaskCreate/job022/mask.mrc", (volume > 0.1 * volume.max()).astype(np.float32), pixel_size=2.0)
    write_mrc(root / "Refine3D/job020/run_class001.mrc", volume, pixel_size=2.0)
    return p


def test_in_mask_with_refined_particles_trains_on_reprojected_labels(tmp_path, monkeypatch, capsys):
    p = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc = main(["--o", O, "--in_mics", p.mics_star, "--in_parts", p.parts_star, "--in_mask",
               "MaskCreate/job022/mask.mrc", "--diameter", "84", "--set", rsyn.TINY_SETTINGS, "--epochs", "1",
               "--j", "1"])
    assert rc == 0 and (tmp_path / O / "RELION_JOB_EXIT_SUCCESS").is_file()
    out = capsys.readouterr().out
    assert "labels: reprojection of the 3D mask MaskCreate/job022/mask.mrc" in out
    info = json.loads((tmp_path / O / "model" / "model.json").read_text())
    assert info["labels"] == info["label_kind"] == "reprojection"
    assert info["labels_detail"]["reference"] == "MaskCreate/job022/mask.mrc"
    assert info["labels_detail"]["reference_pixel_size"] == pytest.approx(2.0)
    assert (tmp_path / O / "plots" / "label_footprints.png").is_file()


def _opts(*extra):
    args, unknown = build_parser().parse_known_args(["--o", O, "--in_mics", "m.star", *extra])
    return options_from(args, unknown)


def test_reference_choice_and_fallback(tmp_path, monkeypatch):
    p = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    parts = read_relion_particles(p.parts_star, micrograph_pixel_size=rsyn.PIXEL_SIZE)
    assert parts.has_poses
    lines = []
    ref = _reference(_opts("--in_3dref", "Refine3D/job020/run_class001.mrc"), parts, lines.append)
    assert ref is not None and not ref.is_mask and ref.pixel_size == 2.0 and not lines
    ref = _reference(_opts("--in_3dref", "Refine3D/job020/run_class001.mrc", "--in_mask",
                           "MaskCreate/job022/mask.mrc"), parts, lines.append)
    assert ref.is_mask and ref.source == "MaskCreate/job022/mask.mrc" and "--in_3dref" in lines[-1]
    # coordinates (no angles): the mask is not used, and the log says why
    assert _reference(_opts("--in_mask", "MaskCreate/job022/mask.mrc"), parts.with_(angles=None),
                      lines.append) is None
    assert "need particles with angles" in lines[-1]
    assert _reference(_opts(), parts, lines.append) is None
    from crisp_ext.errors import InputError

    with pytest.raises(InputError, match="not found"):
        _reference(_opts("--in_mask", "nowhere.mrc"), parts, lines.append)
