"""SpatialRGPT-style object metrics (vlm3_ros.object_metrics) on hand-computed cases."""

from __future__ import annotations

import pytest

from vlm3_ros.object_metrics import object_metrics
from vlm3_ros.protocol import ProtocolError


def test_quantitative_success_within_25_percent_and_abs_rel_over_parsed_answers():
    ids = ["width_data"] * 4 + ["direct_distance"] * 2
    pred = [1.25, 0.74, None, 2.0, 3.0, 0.0]
    gt = [1.0, 1.0, 1.0, 2.0, 2.0, 0.0]
    m = object_metrics(ids, pred, gt)["quantitative"]
    # 1.25 is exactly 25 % off (success), 0.74 is 26 % off, None fails; 2.0 exact; 3.0 is 50 % off;
    # a zero truth answered 0 succeeds and has no relative error.
    assert m["per_type"]["width_data"] == {"success_rate": 0.5, "abs_rel": pytest.approx((0.25 + 0.26 + 0.0) / 3),
                                           "num": 4, "num_parsed": 3}
    assert m["per_type"]["direct_distance"] == {"success_rate": 0.5, "abs_rel": pytest.approx(0.5), "num": 2,
                                                "num_parsed": 2}
    assert m["success_rate"] == pytest.approx(3 / 6)
    assert m["abs_rel"] == pytest.approx((0.25 + 0.26 + 0.0 + 0.5) / 4)
    assert (m["num"], m["num_parsed"], m["tolerance"]) == (6, 5, 0.25)


def test_qualitative_accuracy_counts_unparseable_as_wrong():
    ids = ["left_predicate", "left_predicate", "left_predicate", "tall_choice", "tall_choice"]
    m = object_metrics(ids, [True, False, None, 1, 0], [True, True, False, 1, 1])
    q = m["qualitative"]
    assert q["per_type"]["left_predicate"] == {"accuracy": pytest.approx(1 / 3), "num": 3, "num_parsed": 2}
    assert q["per_type"]["tall_choice"] == {"accuracy": 0.5, "num": 2, "num_parsed": 2}
    assert q["accuracy"] == pytest.approx(2 / 5)
    assert m["quantitative"]["num"] == 0 and m["quantitative"]["success_rate"] is None


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="differ in length"):
        object_metrics(["width_data"], [1.0, 2.0], [1.0])
    with pytest.raises(ProtocolError, match="unknown object question"):
        object_metrics(["size"], [1.0], [1.0])
    with pytest.raises(ValueError, match="tolerance"):
        object_metrics([], [], [], tolerance=-1)
