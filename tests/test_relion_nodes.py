"""RELION-specific formats of crisp-relion against the documented 3.1 / 4.0 / 5.0 conventions (no training)."""

from __future__ import annotations

import numpy as np
import pytest
import starfile

from relion_external import nodes
from relion_external.cli import build_parser, options_from, parse_device, parse_diameter, suggested_box
from crisp_ext.config import parse_overrides as parse_set
from relion_external.job import (
    MARKER_ABORTED, MARKER_FAILURE, MARKER_SUCCESS, JobDir, detect_version, parse_job_star, parse_version,
    version_from_job_star, version_from_pipeline,
)
from crisp_ext.errors import InputError

# -- file naming (RELION's post() + withoutExtension, string operations) ------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("MotionCorr/job002/Movies/mic1.mrc", "Movies/mic1.mrc"),
    ("Raw/mic001.mrc", "Raw/mic001.mrc"),
    ("mic001.mrc", "mic001.mrc"),
    ("CtfFind/job003/mic.mrc", "mic.mrc"),
    ("MotionCorr/job1234/a/b/m.mrc", "a/b/m.mrc"),  # more digits are fine
    ("MotionCorr/jobA12/m.mrc", "MotionCorr/jobA12/m.mrc"),  # not a job directory
    ("MotionCorr/job12/m.mrc", "MotionCorr/job12/m.mrc"),  # fewer than 3 digits
    ("Raw/job001/Import/job002/m.mrc", "Import/job002/m.mrc"),  # the first job directory only
    ("job001/m.mrc", "m.mrc"),  # the start of the string counts last (RELION's index wrap-around)
    ("/data/job001/m.mrc", "m.mrc"),
    ("/job001/m.mrc", "/job001/m.mrc"),  # a leading slash is never a candidate
])
def test_post(name, expected):
    assert nodes.post(name) == expected


def test_without_extension_cuts_at_the_last_dot_of_the_string():
    assert nodes.without_extension("Movies/mic1.mrc") == "Movies/mic1"
    assert nodes.without_extension("a.b/mic") == "a"  # as RELION does: the whole string, not the file name
    assert nodes.without_extension("mic") == "mic"


def test_coordinate_file_names():
    assert nodes.coordinate_file("External/job003/", "MotionCorr/job002/Movies/mic1.mrc", "autopick") == \
        "External/job003/Movies/mic1_autopick.star"
    assert nodes.coordinate_file("External/job003", "Raw/mic001.mrc", "crisp") == "External/job003/Raw/mic001_crisp.star"
    # An absolute micrograph name is appended as a string (a path join would drop the job directory).
    assert nodes.coordinate_file("External/job003/", "/data/raw/m.mrc", "autopick") == \
        "External/job003//data/raw/m_autopick.star"
    assert nodes.sibling_file("External/job003/", "MotionCorr/job002/Movies/mic1.mrc", "_probability.mrc") == \
        "External/job003/Movies/mic1_probability.mrc"
    with pytest.raises(InputError, match="climbs out"):
        nodes.coordinate_file("External/job003/", "../elsewhere/m.mrc", "autopick")


# -- coordinate STAR -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version, header", [("3.1", "# version 30001"), ("4", "# version 30001"),
                                             ("5", "# version 50001"), (None, "# version 30001")])
def test_coordinate_star_layout(version, header):
    xy = np.array([[482.461538, 339.692308], [12.0, 7.5]])
    text = nodes.format_coordinates(xy, np.array([0.983398, -5.0]), version)
    lines = text.splitlines()
    assert lines[0] == header
    assert lines[2] == "data_"
    assert lines[4] == "loop_"
    assert lines[5:10] == ["_rlnCoordinateX #1", "_rlnCoordinateY #2", "_rlnAutopickFigureOfMerit #3",
                           "_rlnClassNumber #4", "_rlnAnglePsi #5"]
    rows = [line.split() for line in lines[10:] if line.strip()]
    assert rows == [["482.461538", "339.692308", "0.983398", "0", "0.000000"],
                    ["12.000000", "7.500000", "-5.000000", "0", "0.000000"]]


def test_empty_coordinate_star_is_header_only(tmp_path):
    path = nodes.write_coordinates(str(tmp_path / "sub" / "m_autopick.star"), np.zeros((0, 2)), np.zeros(0))
    text = path.read_text()
    assert "_rlnCoordinateX #1" in text and "_rlnAnglePsi #5" in text
    assert text.rstrip().splitlines()[-1] == "_rlnAnglePsi #5"


# -- node files ------------------------------------------------------------------------------------------------------


def test_coordinate_list_copies_names_verbatim(tmp_path):
    entries = [("MotionCorr/job002/Movies/mic 1.mrc", "External/job003/Movies/mic 1_autopick.star"),
               ("Raw/mic002.mrc", "External/job003/Raw/mic002_autopick.star")]
    for version in ("4", "5"):
        text = nodes.format_coordinate_list(entries, version)
        assert "data_coordinate_files" in text
        assert "_rlnMicrographName #1" in text and "_rlnMicrographCoordinates #2" in text
        (tmp_path / "l.star").write_text(text)
        table = starfile.read(tmp_path / "l.star")
        assert list(table["rlnMicrographName"]) == [e[0] for e in entries]
        assert list(table["rlnMicrographCoordinates"]) == [e[1] for e in entries]
    assert nodes.format_coordinate_list(entries, "5").startswith("# version 50001")


def _nodes_table(text: str) -> list[list[str]]:
    lines = text.splitlines()
    assert "data_output_nodes" in lines and "loop_" in lines
    body = lines[lines.index("loop_") + 1:]
    labels = [line.split()[0] for line in body if line.startswith("_")]
    rows = [line.split() for line in body if line.strip() and not line.startswith("_")]
    return [labels] + rows


def test_output_nodes_per_version():
    o = "External/job003/"
    t31 = _nodes_table(nodes.format_output_nodes(o, "autopick", "3.1"))
    assert t31 == [["_rlnPipeLineNodeName", "_rlnPipeLineNodeType"],
                   ["External/job003/coords_suffix_autopick.star", "2"]]
    t4 = _nodes_table(nodes.format_output_nodes(o, "autopick", "4"))
    assert t4 == [["_rlnPipeLineNodeName", "_rlnPipeLineNodeTypeLabel"],
                  ["External/job003/autopick.star", "MicrographsCoords.star.relion.autopick"]]
    text5 = nodes.format_output_nodes(o, "autopick", "5")
    assert text5.startswith("# version 50001")
    assert _nodes_table(text5) == [["_rlnPipeLineNodeName", "_rlnPipeLineNodeTypeLabel"],
                                   ["External/job003/autopick.star", "MicrographCoordsGroup.star.relion.autopick"]]
    dual = _nodes_table(nodes.format_output_nodes(o, "crisp", None))
    assert dual == [["_rlnPipeLineNodeName", "_rlnPipeLineNodeType", "_rlnPipeLineNodeTypeLabel"],
                    ["External/job003/coords_suffix_crisp.star", "2", "MicrographCoordsGroup.star.relion.autopick"]]
    assert nodes.format_output_nodes(o, "autopick", "3.1").startswith("# version 30001")
    with pytest.raises(ValueError):
        nodes.format_output_nodes(o, "autopick", "6")


def test_write_nodes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = nodes.write_nodes("External/job003/", "autopick", "CtfFind/job002/micrographs_ctf.star",
                                [("Raw/m1.mrc", "External/job003/Raw/m1_autopick.star")], "3.1")
    assert [str(p) for p in written] == ["External/job003/autopick.star", "External/job003/coords_suffix_autopick.star",
                                         "External/job003/RELION_OUTPUT_NODES.star"]
    assert (tmp_path / "External/job003/coords_suffix_autopick.star").read_text() == \
        "CtfFind/job002/micrographs_ctf.star\n"
    assert not list((tmp_path / "External/job003").glob(".*tmp*"))  # no temporary files left
    nodes.remove_output_nodes("External/job003/")
    assert not (tmp_path / "External/job003/RELION_OUTPUT_NODES.star").exists()
    nodes.remove_output_nodes("External/job003/")  # absent: fine


# -- job.star, versions, markers -------------------------------------------------------------------------------------

JOB_STAR_31 = """
# version 30001

data_job

_rlnJobType                             99
_rlnJobIsContinue                       {cont}


# version 30001

data_joboptions_values

loop_
_rlnJobOptionVariable #1
_rlnJobOptionValue #2
    fn_exe   /opt/bin/crisp-relion
    in_mic   CtfFind/job002/micrographs_ctf.star
param1_label   diameter
param1_value        150
param2_label         ""
nr_threads            4
"""

JOB_STAR_4 = """
# version 30001

data_job

_rlnJobTypeLabel             relion.external
_rlnJobIsContinue                       0
_rlnJobIsTomo                           0
"""

JOB_STAR_5 = JOB_STAR_4.replace("# version 30001", "# version 50001").replace("_rlnJobIsContinue                       0",
                                                                             "_rlnJobIsContinue                       1")


def test_job_star_versions_and_continue():
    j = parse_job_star(JOB_STAR_31.format(cont=0))
    assert (j.header_version, j.job_type, j.is_continue) == (30001, "99", False)
    assert j.options["fn_exe"] == "/opt/bin/crisp-relion" and j.options["param1_value"] == "150"
    assert j.options["param2_label"] == ""
    assert version_from_job_star(j) == "3.1"
    assert parse_job_star(JOB_STAR_31.format(cont=1)).is_continue
    assert version_from_job_star(parse_job_star(JOB_STAR_4)) == "4"
    j5 = parse_job_star(JOB_STAR_5)
    assert version_from_job_star(j5) == "5" and j5.is_continue
    assert version_from_job_star(None) is None


PIPELINE_31 = """# version 30001

data_pipeline_general

_rlnPipeLineJobCounter                       4

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessType #3
_rlnPipeLineProcessStatus #4
Import/job001/       None            0            2
"""

PIPELINE_4 = """# version 30001

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessTypeLabel #3
_rlnPipeLineProcessStatusLabel #4
Import/job001/       None relion.import Succeeded
"""


def test_version_from_default_pipeline():
    assert version_from_pipeline(PIPELINE_31) == "3.1"
    assert version_from_pipeline(PIPELINE_4) == "4"
    assert version_from_pipeline(PIPELINE_4.replace("# version 30001", "# version 50001")) == "5"
    # The bootstrap file a fresh project starts with.
    assert version_from_pipeline("# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n") == "3.1"


def test_detect_version_order(tmp_path):
    job = tmp_path / "External" / "job003"
    job.mkdir(parents=True)
    assert detect_version(job, tmp_path) == (None, "no job.star or default_pipeline.star")
    (tmp_path / "default_pipeline.star").write_text(PIPELINE_4)
    assert detect_version(job, tmp_path)[0] == "4"
    (job / "job.star").write_text(JOB_STAR_31.format(cont=0))
    assert detect_version(job, tmp_path) == ("3.1", "job.star")
    assert detect_version(job, tmp_path, override="5") == ("5", "relion_version parameter")


def test_parse_version():
    assert [parse_version(t) for t in ("3", "3.1", "3.1.3", "4.0", "v5", "5.0.1", "auto", "")] == \
        ["3.1", "3.1", "3.1", "4", "5", "5", None, None]
    with pytest.raises(ValueError):
        parse_version("2.1")


def test_job_dir_markers(tmp_path):
    job = JobDir(str(tmp_path / "External/job007"))
    assert job.o.endswith("/")
    job.create()
    assert job.marker() is None and not job.abort_requested()
    job.mark(MARKER_FAILURE)
    assert job.marker() == MARKER_FAILURE
    job.clear_exit_markers()
    assert job.marker() is None
    (job.path / "RELION_JOB_ABORT_NOW").touch()
    assert job.abort_requested()
    job.mark(MARKER_ABORTED)
    assert job.marker() == MARKER_ABORTED
    job.clear_exit_markers()
    job.mark(MARKER_SUCCESS)
    assert job.marker() == MARKER_SUCCESS
    with pytest.raises(ValueError):
        job.mark("RELION_JOB_EXIT_MAYBE")


# -- command line ------------------------------------------------------------------------------------------------------


def _opts(*argv):
    args, extra = build_parser().parse_known_args(list(argv))
    return options_from(args, extra), extra


def test_tolerant_command_line():
    opts, extra = _opts("--o", "External/job003/", "--in_mics", "C/job002/micrographs_ctf.star", "--diameter", "150",
                        "--save_maps", "--gpu", "--threshold", "0.4", "--j", "4", "--unknown_flag", "x", "--bare",
                        "--pipeline_control", "External/job003/", "--set", "train.epochs=3,", "train.patch_size=96")
    assert opts.o == "External/job003/" and opts.in_mics == "C/job002/micrographs_ctf.star"
    assert opts.save_maps and opts.threads == 4 and opts.pickname == "autopick"
    assert opts.overrides["particle.diameter_A"] == 150.0 and opts.overrides["particle.diameter_px"] is None
    assert opts.overrides["train.device"] == "cuda" and opts.overrides["centres.threshold"] == 0.4
    assert opts.overrides["train.epochs"] == 3 and opts.overrides["train.patch_size"] == 96
    assert opts.overrides["predict.save_maps"] is True and opts.overrides["train.threads"] == 4
    assert "--unknown_flag" in extra and "--bare" in extra
    # no abbreviations: --thresh is unknown, not --threshold
    opts, extra = _opts("--o", "E/job1/", "--thresh", "0.9")
    assert "centres.threshold" not in opts.overrides and "--thresh" in extra


@pytest.mark.parametrize("argv, message", [
    (("--diameter",), "diameter has no value"),
    (("--diameter", "big"), "diameter"),
    (("--threshold", "2"), "out of range"),
    (("--ntrain", "2.5"), "not an integer"),
    (("--save_maps", "maybe"), "yes or no"),
    (("--pickname", "a b"), "pickname"),
    (("--gpu", "first"), "gpu"),
    (("--relion_version", "2"), "relion_version"),
    (("--set", "train.epochs"), "KEY=VALUE"),
    (("--model",), "model has no value"),
])
def test_bad_parameters_are_input_errors(argv, message):
    with pytest.raises(InputError, match=message):
        _opts("--o", "External/job003/", *argv)


def test_small_parsers():
    assert parse_diameter("150") == (150.0, None)
    assert parse_diameter("150Å") == (150.0, None) and parse_diameter("27px") == (None, 27.0)
    assert parse_device("0,1", None) == "cuda:0" and parse_device("", None) == "cuda"
    assert parse_device(None, "cpu") == "cpu" and parse_device(None, None) is None
    assert parse_set(["a.b=1,c.d=x", "e.f=[1, 2]"]) == {"a.b": 1, "c.d": "x", "e.f": [1, 2]}
    assert suggested_box(27) == 42 and suggested_box(40) == 60
