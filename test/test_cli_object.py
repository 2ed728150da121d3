"""``vlm3-ros query --task object``: boxes in, 3D centres, sizes and pair answers in metres out."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest

from object_helpers import assert_matches_ground_truth, expected_object, segmented_boxes
from vlm3_ros.cli.main import main


def test_query_objects_with_the_oracle_matches_the_sensor(sevenscenes, tmp_path, capsys):
    depth = sevenscenes.load_depth(150)
    K = sevenscenes.intrinsics()
    np.save(tmp_path / "depth.npy", depth)
    boxes = [b for b in segmented_boxes(depth) if expected_object(depth, K, b)["stable"]][:3]
    assert len(boxes) == 3
    out = tmp_path / "objects.json"
    args = ["query", str(sevenscenes.path(150, "color.png")), "--task", "object", "--oracle",
            "--depth", str(tmp_path / "depth.npy"), "--intrinsics", "585", "585", "320", "240",
            "--ask", "width,distance", "--ask", "left", "--ask", "front_choice"]
    for box in boxes:
        args += ["--box", *(str(v) for v in box)]
    assert main(args + ["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "object" and report["summary"] == {"objects": 3, "measured": 3, "parse_failures": 0,
                                                                 "requests": 1}
    for row, box in zip(report["rows"], boxes):
        size = [row["width_m"], row["height_m"], row["depth_m"]]
        assert_matches_ground_truth(np.array(row["centre"]), np.array(size), expected_object(depth, K, box))
        assert set(row["answers"]) == {"width_data", "height_data"} and row["reason"] is None
    pairs = list(combinations(range(3), 2))
    assert [(r["a"], r["b"], r["question"]) for r in report["relations"]] == [
        (a, b, q) for a, b in pairs for q in ("direct_distance", "left_predicate", "front_choice")]
    for r in report["relations"]:
        a, b = (np.array(report["rows"][k]["centre"]) for k in (r["a"], r["b"]))
        if r["question"] == "left_predicate":
            assert isinstance(r["value"], bool)
            if abs(a[0] - b[0]) > 0.05:
                assert r["value"] == bool(a[0] < b[0])
        elif r["question"] == "front_choice":
            assert r["value"] in (r["a"], r["b"])
        else:  # between the extents' centres, which are near the reported centres
            assert r["value"] == pytest.approx(np.linalg.norm(a - b), abs=0.15)
    assert "width_m" in capsys.readouterr().out

    # The table (no JSON) names the measured values; width alone asks no pair question.
    assert main([a for a in args if a not in ("width,distance", "left", "front_choice", "--ask")] + ["--ask", "width"]) == 0
    printed = capsys.readouterr().out
    assert "depth_answers" in printed and "requests=1" in printed and "direct_distance" not in printed


def test_query_objects_rejects_bad_arguments(tmp_path, capsys):
    import cv2

    image = tmp_path / "im.png"
    cv2.imwrite(str(image), np.zeros((40, 60, 3), np.uint8))
    np.save(tmp_path / "d.npy", np.full((40, 60), 2.0, np.float32))
    base = ["query", str(image), "--task", "object", "--oracle", "--depth", str(tmp_path / "d.npy"), "--focal", "50"]
    assert main(base) == 2
    assert "needs at least one --box" in capsys.readouterr().err
    assert main(base + ["--box", "1", "1", "20", "20", "--ask", "colour"]) == 2
    assert "unknown object question 'colour'" in capsys.readouterr().err
    assert main(base + ["--box", "20", "1", "10", "20"]) == 2
    assert "x2 > x1" in capsys.readouterr().err
    assert main(base[:5] + ["--focal", "50", "--box", "1", "1", "20", "20"]) == 2  # oracle without --depth
    assert "--depth" in capsys.readouterr().err
