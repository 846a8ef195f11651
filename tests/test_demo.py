"""``crisp-ext demo --quick``: the whole user path (simulate, train, pick, evaluate) in seconds."""

import json

import numpy as np
import pytest

from crisp_ext.cli import main
from crisp_ext.io.coords import read_coordinates


@pytest.mark.slow
def test_quick_demo_picks_the_held_out_micrographs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "demo result on 2 micrographs nobody picked" in printed
    total = json.loads((out / "evaluation.json").read_text())["total"]
    # Deterministic for a seed; the quick demo's particles are easy, so a working picker finds nearly all of them.
    assert total["f1"] >= 0.9 and total["n_true"] > 100
    assert (out / "demo_picks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("mic005", "mic006"):
        xy = read_coordinates(out / "picks" / "coordinates" / f"{name}_crisp.star").xy
        assert len(xy) and np.all((xy >= 0) & (xy < 512))
