"""The ``vlm3-ros`` command line: query (oracle and model), make-model and bench."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlm3_ros import geometry as g
from vlm3_ros.cli.main import main


def test_help_lists_the_engine_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("query", "bench", "make-model"):
        assert command in out


def test_query_depth_with_the_oracle_matches_the_sensor(sevenscenes, tmp_path, capsys):
    color = sevenscenes.path(150, "color.png")
    depth_png = sevenscenes.path(150, "depth.png")
    out = tmp_path / "q.json"
    pixels = [[100, 120], [320, 240], [500, 400]]
    args = [str(color), "--oracle", "--depth", str(depth_png), "--intrinsics", "585", "585", "320", "240", "--json", str(out)]
    for x, y in pixels:
        args += ["--pixel", str(x), str(y)]
    assert main(["query", *args]) == 0
    report = json.loads(out.read_text())
    depth = sevenscenes.load_depth(150)
    K = sevenscenes.intrinsics()
    for row, (x, y) in zip(report["rows"], pixels):
        expected = g.backproject(np.array([[row["u"], row["v"]]]), [depth[y, x]], K)[0]
        assert abs(row["u"] - x) < 0.2 and abs(row["v"] - y) < 0.2
        assert np.linalg.norm(np.array(row["point"]) - expected) < 0.01
        assert row["distance_m"] == pytest.approx(np.linalg.norm(row["point"]), abs=1e-5)
    assert report["summary"]["valid"] == 3
    assert "distance_m" in capsys.readouterr().out


def test_query_pose_with_the_oracle(sevenscenes, tmp_path):
    T = g.relative_pose(sevenscenes.load_pose(150), sevenscenes.load_pose(180))
    pose_file = tmp_path / "T.txt"
    np.savetxt(pose_file, T)
    out = tmp_path / "pose.json"
    code = main(["query", str(sevenscenes.path(150, "color.png")), str(sevenscenes.path(180, "color.png")), "--task", "pose",
                 "--oracle", "--relative-pose", str(pose_file), "--focal", "585", "--json", str(out)])
    assert code == 0
    summary = json.loads(out.read_text())["summary"]
    np.testing.assert_allclose(np.array(summary["matrix"])[:3, 3], T[:3, 3], atol=0.006)
    assert g.rotation_angle(np.array(summary["matrix"])[:3, :3].T @ T[:3, :3]) < 0.15


def test_query_with_a_model_reports_unparseable_answers(tiny_checkpoint, tmp_path):
    import cv2

    image = tmp_path / "im.png"
    cv2.imwrite(str(image), np.full((120, 160, 3), 90, np.uint8))
    out = tmp_path / "m.json"
    assert main(["query", str(image), "--model", str(tiny_checkpoint), "--device", "cpu", "--focal", "150",
                 "--grid", "4", "--max-new-tokens", "6", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["backend"]["backend"] == "transformers" and report["summary"]["points"] >= 3
    assert report["summary"]["parse_failures"] == report["summary"]["points"] - report["summary"]["valid"]
    assert all(r["answer"] is not None for r in report["rows"])


def test_query_rejects_bad_arguments(tmp_path, capsys):
    import cv2

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    assert main(["query", str(image), str(image), "--oracle", "--focal", "500"]) == 2
    assert "takes 1 image" in capsys.readouterr().err
    assert main(["query", str(image), "--model", str(tmp_path / "nothing"), "--focal", "500"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["query", str(image), "--oracle", "--focal", "500"]) == 2
    assert "--oracle needs --depth" in capsys.readouterr().err


def test_make_model_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "m"
    assert main(["make-model", str(out), "--preset", "test"]) == 0
    from vlm3_ros.engine.checkpoint import load_checkpoint

    assert load_checkpoint(out, device="cpu").model_type == "qwen3_vl"
    assert main(["make-model", str(out)]) == 2  # exists
    assert main(["make-model", str(tmp_path / "x"), "--preset", "huge"]) == 2


def test_bench_reports_identical_answers(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_checkpoint), "--device", "cpu", "--points", "1", "3",
                 "--max-new-tokens", "6", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["points"] for r in results] == [1, 3]
    for r in results:
        assert r["identical_answers"] is True
        assert r["ratio"] == pytest.approx(r["engine_points_per_s"] / r["reference_points_per_s"], rel=1e-9)
        assert set(r) >= {"points", "reference_points_per_s", "engine_points_per_s", "ratio", "identical_answers"}


def test_bench_dense_on_real_frames(sevenscenes, tmp_path, capsys):
    """vlm3-ros bench-dense in oracle mode on two real frames: both modes, the completion ahead of
    linear interpolation of the same answers, a JSON report and a plot."""
    out, plot = tmp_path / "dense.json", tmp_path / "dense.png"
    assert main(["bench-dense", str(sevenscenes.root), "--points", "128", "--frame-step", "25", "--json", str(out),
                 "--plot", str(plot), "--plot-points", "128"]) == 0
    report = json.loads(out.read_text())
    assert report["info"]["frames"] == 2 and report["info"]["answers"] == "oracle"
    rows = report["results"]
    assert [(r["points"], r["mode"]) for r in rows] == [(128, "grid"), (128, "adaptive")]
    assert rows[1]["rounds"] == [83, 45] and rows[1]["questions_per_frame"] == 128
    for row in rows:
        assert row["dense"]["delta1"] > row["linear"]["delta1"] and row["dense"]["abs_rel"] < row["linear"]["abs_rel"]
        assert row["sparse"]["delta1"] == 1.0 and row["dense"]["coverage"] == 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 128 | adaptive 83+45 |" in capsys.readouterr().out
    assert main(["bench-dense", str(tmp_path / "missing")]) == 2
    assert main(["bench-dense", str(sevenscenes.root), "--share", "1.0"]) == 2
@pytest.fixture
def small_frame(tmp_path):
    import cv2

    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), np.full((120, 160, 3), 90, np.uint8))
    depth = np.full((120, 160), 2.0, np.float32)
    depth[:, :40] = np.nan  # no reference there
    np.save(tmp_path / "depth.npy", depth)
    return image, tmp_path / "depth.npy"


@pytest.mark.parametrize("bad,message", [
    (["--focal", "0"], "--focal (pixels) must be a positive finite number, got 0"),
    (["--focal", "-5"], "--focal (pixels) must be a positive finite number, got -5"),
    (["--focal", "nan"], "--focal (pixels) must be a positive finite number, got nan"),
    (["--focal", "inf"], "--focal (pixels) must be a positive finite number, got inf"),
    (["--intrinsics", "0", "0", "0", "0"], "--intrinsics FX must be a positive finite number, got 0"),
    (["--focal", "150", "--grid", "-4"], "--grid must be at least 1 pixel, got -4"),
    (["--focal", "150", "--grid", "0"], "--grid must be at least 1 pixel, got 0"),
    (["--focal", "150", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--camera-info", "missing.yaml"], "cannot read --camera-info missing.yaml: No such file or directory"),
    (["--camera-info", "{bad_yaml}"], "is not a usable calibration"),
    (["--camera-info", "{other_size}"], "is for 640x480 images, the image is 160x120"),
    (["--focal", "150", "--json", "{unwritable}"], "cannot write --json"),
    (["--focal", "150", "--json", "{directory}"], "is a directory"),
])
def test_query_reports_bad_arguments_in_one_line(small_frame, tmp_path, capsys, monkeypatch, bad, message):
    image, depth = small_frame
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("camera_matrix: [1, 2\n")
    (tmp_path / "other.yaml").write_text("image_width: 640\nimage_height: 480\ncamera_matrix:\n  data: [500, 0, 320, 0, "
                                         "500, 240, 0, 0, 1]\n")
    (tmp_path / "a_file").write_text("")
    names = {"{bad_yaml}": "bad.yaml", "{other_size}": "other.yaml", "{unwritable}": "a_file/out.json",
             "{directory}": str(tmp_path)}
    args = [names.get(a, a) for a in bad]
    assert main(["query", str(image), "--oracle", "--depth", str(depth), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlm3-ros query: error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_query_reports_a_bad_protocol_file(tiny_checkpoint, small_frame, tmp_path, capsys):
    import shutil

    image, _ = small_frame
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    (model / "vlm3_protocol.json").write_text('{"format": "vlm3-protocol", "version": 1, "tasks": {"depth": {}}}')
    assert main(["query", str(image), "--model", str(model), "--device", "cpu", "--focal", "150"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlm3-ros query: error: ") and "vlm3_protocol.json is not a usable protocol file" in err
    assert len(err.strip().splitlines()) == 1


def test_query_table_shows_the_pixel_asked_the_pixel_used_and_why_a_point_failed(small_frame, capsys):
    image, depth = small_frame
    assert main(["query", str(image), "--oracle", "--depth", str(depth), "--focal", "150",
                 "--pixel", "100", "60", "--pixel", "10", "60", "--pixel", "500", "60"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["asked", "used", "answer"] and header[-1] == "reason"
    ok, hole, outside = lines[1:4]
    assert ok.startswith("(100.000, 60.000)") and "2.0" in ok
    assert hole.startswith("(10.000, 60.000)") and hole.rstrip().endswith("no reference value at this pixel")
    assert outside.startswith("(500.000, 60.000)  -") and outside.rstrip().endswith("outside the prepared image")
    assert "valid=1" in lines[-1] and "no_reference=1" in lines[-1] and "parse_failures=0" in lines[-1]


def _options(parser, path=()):
    """(command path, action) of every option of ``parser`` and its subcommands."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, path + (name,))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield path, action, parser


def test_every_option_has_help_and_shows_its_default_and_no_markup(capsys):
    from vlm3_ros.cli.main import COMMANDS, DESCRIPTION, build_parser

    parser = build_parser("vlm3-ros", DESCRIPTION, "vlm3_ros.cli", COMMANDS)
    missing, no_default = [], []
    for path, action, sub in _options(parser):
        name = " ".join(path) + " " + action.option_strings[-1]
        if not action.help:
            missing.append(name)
            continue
        text = sub.formatter_class(sub.prog)._get_help_string(action) % {"default": action.default}
        if action.default not in (None, False, [], ()) and "default" not in text.lower():
            no_default.append(name)
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help hides the default: {no_default}"
    for command in (["play"], ["bag", "from-rgbd"], ["bag", "info"], ["bench-node"], ["query"], ["demo"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        out = capsys.readouterr().out
        assert "``" not in out and ":class:" not in out and ":func:" not in out, command
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--frames FRAMES frames of the synthetic bag (default: 20)" in out
    assert "--timeout TIMEOUT seconds allowed for the node run (default: 900.0)" in out


def test_loading_a_model_prints_no_progress_bar_and_no_deprecation_warning(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    import cv2

    image = tmp_path / "im.png"
    cv2.imwrite(str(image), np.full((64, 96, 3), 90, np.uint8))
    result = subprocess.run([sys.executable, "-m", "vlm3_ros.cli.main", "query", str(image), "--model",
                             str(tiny_checkpoint), "--device", "cpu", "--focal", "1000", "--grid", "1",
                             "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Loading weights" not in result.stderr and "deprecated" not in result.stderr, result.stderr
