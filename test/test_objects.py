"""Object-level 3D in the core: object geometry, the oracle's object answers, ObjectQuery (one
request per frame) on known synthetic geometry and on real 7-Scenes frames, and the metrics."""

from __future__ import annotations

from typing import List

import numpy as np
import pytest

from object_helpers import Counting, assert_matches_ground_truth, expected_object, rectangle_box, \
    rectangles_depth, segmented_boxes
from vlm3_ros import metrics, objects
from vlm3_ros import protocol as p
from vlm3_ros.camera import Intrinsics, prepare_depth, prepare_image
from vlm3_ros.engine import EngineError, GroundTruth, OracleBackend, Request
from vlm3_ros.object_query import ObjectQuery, box_region

K = np.array([[500.0, 0.0, 319.5], [0.0, 500.0, 239.5], [0.0, 0.0, 1.0]])
W, H = 640, 480
# Two flat rectangles facing the camera in front of a wall at 4 m: a wide near one on the left,
# a tall far one on the right.
NEAR: tuple = (-0.8, -0.1, -0.2, 0.2, 2.0)
FAR: tuple = (0.3, -0.5, 0.6, 0.4, 3.0)
RGB = np.full((H, W, 3), 128, np.uint8)
# Their extents' centres (-0.5, 0.05, 2) and (0.45, -0.05, 3), and the distance between them.
CENTRE_DISTANCE = float(np.linalg.norm([0.95, 0.1, 1.0]))
PAIR_QUESTIONS = [q for q, spec in p.OBJECT_QUESTIONS.items() if spec.regions == 2]


def _scene():
    return rectangles_depth(K, W, H, [NEAR, FAR])


class Nonsense(OracleBackend):
    """The oracle, except that object answers are text without a usable value."""

    name = "nonsense"

    def _object(self, request, gt, qid, regions, spec):
        return "I cannot tell from this picture."


# ------------------------------------------------------------------------------------------------
# Geometry and the oracle's answers
# ------------------------------------------------------------------------------------------------


def test_object_extent_of_known_rectangles():
    depth = _scene()
    for rect in (NEAR, FAR):
        box = rectangle_box(K, rect)
        margin = np.array([-15, -15, 15, 15])  # wall pixels around the rectangle are in the box too
        extent = objects.object_extent(objects.region_points(depth, K, box + margin))
        x0, y0, x1, y1, z = rect
        # the 1st-99th percentile range of a uniform spread is 98 % of it (plus a pixel of sampling)
        pixel = z / K[0, 0]
        assert extent.width == pytest.approx(0.98 * (x1 - x0), abs=2 * pixel)
        assert extent.height == pytest.approx(0.98 * (y1 - y0), abs=2 * pixel)
        assert extent.depth == pytest.approx(0.0, abs=1e-9) and extent.lower[2] == pytest.approx(z)
        np.testing.assert_allclose(extent.centre, [(x0 + x1) / 2, (y0 + y1) / 2, z], atol=2 * pixel)
    near, far = (objects.object_extent(objects.region_points(depth, K, rectangle_box(K, r))) for r in (NEAR, FAR))
    assert objects.true_answer("left_predicate", near, far) is True
    assert objects.true_answer("right_predicate", near, far) is False
    assert objects.true_answer("behind_predicate", far, near) is True
    assert objects.true_answer("front_predicate", far, near) is False
    assert objects.true_answer("tall_predicate", far, near) is True
    assert objects.true_answer("wide_predicate", near, far) is True
    assert objects.true_answer("above_choice", near, far) == 1  # the tall one reaches higher (y -0.5 centre -0.05)
    assert objects.true_answer("front_choice", far, near) == 1
    expected = np.linalg.norm(near.centre - far.centre)
    assert objects.true_answer("direct_distance", near, far) == pytest.approx(expected)
    assert objects.true_answer("horizontal_distance", near, far) == pytest.approx(abs(near.centre[0] - far.centre[0]))
    assert objects.true_answer("vertical_distance", near, far) == pytest.approx(abs(near.centre[1] - far.centre[1]))
    # Too few valid points: no extent.
    assert objects.object_extent(objects.region_points(np.full((H, W), np.nan), K, (0, 0, 50, 50))) is None
    with pytest.raises(ValueError, match="x2 > x1"):
        objects.check_box((10, 10, 5, 20))


def test_box_pixels_and_samples_follow_the_corner_convention():
    rows, cols = objects.box_pixel_mask((0, 0, 640, 480), 640, 480)
    assert (rows, cols) == (slice(0, 480), slice(0, 640))
    rows, cols = objects.box_pixel_mask((10.4, 20.6, 12.5, 22.5), 640, 480)  # centres 10.5+: columns 10, 11
    assert (cols.start, cols.stop, rows.start, rows.stop) == (10, 12, 21, 22)
    samples = objects.box_samples((100, 200, 140, 260), 3, 0.5)
    np.testing.assert_allclose(samples[:3], [[109.5, 214.5], [119.5, 214.5], [129.5, 214.5]])
    np.testing.assert_allclose(samples[-1], [129.5, 244.5])
    np.testing.assert_allclose(objects.box_samples((0, 0, 10, 10), 1, 0.5), [[4.5, 4.5]])


def _request(questions: List[str], depth: np.ndarray) -> Request:
    prepared = prepare_image(RGB, Intrinsics.from_K(K, W, H), p.OBJECT.preprocess)
    gt = GroundTruth(depth=prepare_depth(depth, prepared), K=prepared.intrinsics.K)
    return Request(images=[prepared.image], questions=questions, spec=p.OBJECT, ground_truth=gt,
                   extra_specs=(p.DEPTH,)), prepared


def test_oracle_answers_object_questions_from_the_reference_depth():
    depth = _scene()
    prepared = prepare_image(RGB, Intrinsics.from_K(K, W, H), p.OBJECT.preprocess)
    refs = [p.bbox_reference(tuple(rectangle_box(K, r) * prepared.intrinsics.fx / K[0, 0]), prepared.width,
                             prepared.height) for r in (NEAR, FAR)]
    questions = [p.object_question("width_data", refs[:1]), p.object_question("height_data", refs[1:]),
                 p.object_question("left_predicate", refs), p.object_question("behind_predicate", refs),
                 p.object_question("tall_choice", refs), p.object_question("direct_distance", refs),
                 p.depth_question(1000, 1000)]
    request, _ = _request(questions, depth)
    answers = OracleBackend().answer(request).answers
    assert answers[0].startswith(f"The width of {refs[0]} is ") and answers[0].endswith(" meters.")
    assert p.parse_quantity(answers[0]) == pytest.approx(0.98 * 0.6, abs=0.01)
    assert p.parse_quantity(answers[1]) == pytest.approx(0.98 * 0.9, abs=0.01)
    assert answers[2] == f"Yes, {refs[0]} is to the left of {refs[1]}."
    assert answers[3] == f"No, {refs[0]} is in front of {refs[1]}."
    assert answers[4] == f"{refs[1]} is taller."
    assert p.parse_quantity(answers[5]) == pytest.approx(CENTRE_DISTANCE, abs=0.015)
    assert p.parse_depth_answer(answers[6]) == pytest.approx(4.0, abs=0.005)  # the image centre sees the wall
    # A region over missing depth is unknown (and so unparseable); a task the request does not hold is an error.
    request, _ = _request([p.object_question("width_data", ["bounding box region (0, 0, 10, 10)"])],
                          np.full((H, W), np.nan))
    with pytest.raises(p.AnswerParseError):
        p.parse_quantity(OracleBackend().answer(request).answers[0])
    with pytest.raises(EngineError, match="cannot read the question"):
        OracleBackend().answer(Request(images=[RGB], questions=[questions[0]], spec=p.DEPTH,
                                       ground_truth=GroundTruth(depth=depth, K=K)))


def test_request_tasks_must_share_the_image_preparation():
    with pytest.raises(EngineError, match="prepares its images differently"):
        Request(images=[RGB], questions=["q"], spec=p.OBJECT, extra_specs=(p.POSE,))
    request = Request(images=[RGB], questions=["q"], spec=p.OBJECT, extra_specs=(p.DEPTH,))
    assert request.stop_strings == ("</answer>",) and request.specs == (p.OBJECT, p.DEPTH)


# ------------------------------------------------------------------------------------------------
# ObjectQuery
# ------------------------------------------------------------------------------------------------


def _check_rectangle(est, rect, tol_xy=0.012):
    x0, y0, x1, y1, z = rect
    assert est.valid, est.errors
    np.testing.assert_allclose(est.centre, [(x0 + x1) / 2, (y0 + y1) / 2, z], atol=0.006)
    np.testing.assert_allclose(est.size[:2], [0.98 * (x1 - x0), 0.98 * (y1 - y0)], atol=tol_xy)
    assert est.size[2] == pytest.approx(0.0, abs=0.011)  # flat: depth answers differ by their rounding only
    assert est.depth_samples == 9


def test_object_query_measures_known_rectangles_in_one_request():
    depth = _scene()
    backend = Counting(OracleBackend())
    query = ObjectQuery(backend, relations=["left", "behind", "distance", "tall_choice"])
    boxes = [rectangle_box(K, r) for r in (NEAR, FAR)]
    result = query.query(RGB, Intrinsics.from_K(K, W, H), boxes, reference_depth=depth)
    assert len(backend.requests) == 1 and query.shares_requests
    request = backend.requests[0]
    assert len(request.questions) == 2 * 9 + 2 * 2 + 4 and request.extra_specs == (p.DEPTH,)
    for est, rect in zip(result.objects, (NEAR, FAR)):
        _check_rectangle(est, rect)
    assert result.parse_failures == 0 and result.first_error is None
    values = {r.question: r.value for r in result.relations}
    assert values["left_predicate"] is True and values["behind_predicate"] is False
    assert values["tall_choice"] == 1 and all((r.a, r.b) == (0, 1) for r in result.relations)
    assert values["direct_distance"] == pytest.approx(CENTRE_DISTANCE, abs=0.015)


def test_object_query_with_two_backends_sends_two_requests():
    depth = _scene()
    objects_backend, depth_backend = Counting(OracleBackend(), "objects"), Counting(OracleBackend(), "depth")
    query = ObjectQuery(objects_backend, depth_backend=depth_backend)
    assert not query.shares_requests
    result = query.query(RGB, Intrinsics.from_K(K, W, H), [rectangle_box(K, NEAR)], reference_depth=depth)
    assert [len(b.requests) for b in (objects_backend, depth_backend)] == [1, 1]
    assert objects_backend.requests[0].spec.name == "object" and depth_backend.requests[0].spec.name == "depth"
    _check_rectangle(result.objects[0], NEAR)


def test_object_query_in_a_distorted_camera_with_fx_not_fy():
    """The same rectangles seen through plumb_bob distortion, fx != fy: boxes are mapped through the
    undistortion and the answers still give the rectangles' metric geometry."""
    K2 = np.array([[520.0, 0.0, 322.0], [0.0, 505.0, 236.0], [0.0, 0.0, 1.0]])
    cam = Intrinsics.from_K(K2, W, H, D=(-0.12, 0.03, 0.0008, -0.0005, 0.0), distortion_model="plumb_bob")
    ideal = Intrinsics.from_K(K2, W, H)
    # Render in the ideal pinhole, then distort the depth image into the camera's geometry.
    ideal_depth = rectangles_depth(K2, W, H, [NEAR, FAR])
    from vlm3_ros.camera import preparation_map

    mapping = preparation_map(cam, p.Preprocess("focal", 505.0, undistort=True))  # distorted -> ideal
    uu, vv = np.meshgrid(np.arange(W), np.arange(H))
    ideal_uv = mapping.to_prepared(np.stack([uu, vv], -1).reshape(-1, 2).astype(float))
    scale = 505.0 / np.array([520.0, 505.0])
    src = (ideal_uv - mapping.prepared.K[:2, 2]) / scale + K2[:2, 2]
    cols, rows = np.round(src[:, 0]).astype(int), np.round(src[:, 1]).astype(int)
    ok = (cols >= 0) & (cols < W) & (rows >= 0) & (rows < H)
    depth = np.full(H * W, np.nan)
    depth[ok] = ideal_depth[rows[ok], cols[ok]]
    depth = depth.reshape(H, W)
    # Boxes in the distorted image: the distorted positions of the rectangles' ideal boxes.
    boxes = []
    for rect in (NEAR, FAR):
        b = rectangle_box(K2, rect)
        corners = np.array([[b[0], b[1]], [b[2], b[3]]]) - 0.5
        corners = (corners - K2[:2, 2]) * scale + mapping.prepared.K[:2, 2]
        d = mapping.to_original(corners) + 0.5
        boxes.append(np.array([d[0, 0], d[0, 1], d[1, 0], d[1, 1]]))
    assert ideal is not None
    result = ObjectQuery(OracleBackend()).query(RGB, cam, boxes, reference_depth=depth)
    for est, rect in zip(result.objects, (NEAR, FAR)):
        _check_rectangle(est, rect, tol_xy=0.03)  # the distorted box is bounded, so a little wider


def test_boxes_outside_the_image_and_unusable_answers_are_reported():
    depth = _scene()
    query = ObjectQuery(OracleBackend(), relations=["left"])
    result = query.query(RGB, Intrinsics.from_K(K, W, H), [rectangle_box(K, NEAR), (700, 10, 800, 90)],
                         reference_depth=depth)
    assert result.objects[0].valid and not result.objects[1].valid
    assert result.objects[1].errors == ["the box covers less than a pixel of the image"] and result.objects[1].region is None
    assert result.relations == []  # no pair with a box outside
    with pytest.raises(ValueError, match="x2 > x1"):
        query.query(RGB, Intrinsics.from_K(K, W, H), [(10, 10, 5, 50)])
    nonsense = ObjectQuery(Nonsense(), relations=["left"]).query(
        RGB, Intrinsics.from_K(K, W, H), [rectangle_box(K, r) for r in (NEAR, FAR)], reference_depth=depth)
    assert not any(o.valid for o in nonsense.objects)
    assert nonsense.parse_failures == 2 * 2 + 1
    assert nonsense.first_error.startswith("unparseable width_data answer")
    assert nonsense.relations[0].value is None and "no yes / no" in nonsense.relations[0].error
    # Depth still measured: centre z known, width unknown.
    assert nonsense.objects[0].centre[2] == pytest.approx(2.0, abs=0.006) and np.isnan(nonsense.objects[0].size[0])


def test_a_model_serving_both_tasks_answers_them_in_one_request_like_separately(tiny_backend):
    """With a checkpoint serving depth and object (tiny random model): one request holds all the
    frame's questions, and its answers equal those of separate depth and object requests (one shared
    image prefix changes nothing; the depth task's stop string ends both kinds)."""
    from vlm3_ros.engine.transformers_backend import truncate_at_stop

    counting = Counting(tiny_backend)
    query = ObjectQuery(counting, max_new_tokens=12, depth_grid=2, relations=["left"])
    boxes = [(10, 20, 90, 100), (100, 30, 150, 70)]
    intr = Intrinsics.from_focal(160, 120, 150.0)
    image = np.random.default_rng(3).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    result = query.query(image, intr, boxes)
    assert len(counting.requests) == 1
    joint = counting.requests[0]
    n_depth = 2 * 4
    depth_only = tiny_backend.answer(Request(images=joint.images, questions=joint.questions[:n_depth],
                                             spec=p.DEPTH, max_new_tokens=12))
    object_only = tiny_backend.answer(Request(images=joint.images, questions=joint.questions[n_depth:],
                                              spec=p.OBJECT, max_new_tokens=12))
    joint_answers = counting.inner.answer(joint).answers
    assert joint_answers[:n_depth] == depth_only.answers
    assert joint_answers[n_depth:] == [truncate_at_stop(a, ("</answer>",)) for a in object_only.answers]
    assert [o.answers["width_data"] for o in result.objects] == [joint_answers[n_depth], joint_answers[n_depth + 2]]


# ------------------------------------------------------------------------------------------------
# Real frames
# ------------------------------------------------------------------------------------------------


def test_objects_on_7scenes_frames_match_the_back_projected_ground_truth(sevenscenes):
    """Boxes around depth-segmented regions of real frames: centres and sizes from the oracle's
    answers equal the ground truth back-projected from the sensor depth (test/object_helpers.py,
    computed independently), within the answers' rounding. Boxes whose depth samples lie within
    1.2 cm of the object's depth band edge are left out (rounding may move a sample across)."""
    K7 = sevenscenes.intrinsics()
    query = ObjectQuery(OracleBackend(), relations=["left", "behind"])
    checked = skipped = 0
    for fid in sevenscenes.frame_ids[::5]:
        rgb, depth, _ = sevenscenes.load_frame(fid)
        boxes = segmented_boxes(depth)
        result = query.query(rgb, Intrinsics.from_K(K7, 640, 480), boxes, reference_depth=depth)
        for box, est in zip(boxes, result.objects):
            truth = expected_object(depth, K7, box)
            if not truth["stable"]:
                skipped += 1
                continue
            assert_matches_ground_truth(est.centre, est.size, truth)
            checked += 1
        for rel in result.relations:
            a, b = (objects.object_extent(objects.region_points(depth, K7, boxes[k])) for k in (rel.a, rel.b))
            if rel.question == "left_predicate" and abs(a.centre[0] - b.centre[0]) > 0.02:  # not a near tie
                assert rel.value == bool(a.centre[0] < b.centre[0])
            if rel.question == "behind_predicate" and abs(a.lower[2] - b.lower[2]) > 0.02:
                assert rel.value == bool(a.lower[2] > b.lower[2])
    assert checked >= 30 and skipped <= checked // 10


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def test_object_metrics_follow_the_spatialrgpt_conventions():
    assert metrics.quantity_success([1.0, 1.25, 1.26, None, 0.74], [1.0] * 5) == pytest.approx(2 / 5)
    assert metrics.quantity_success([1.29], [1.0], tolerance=0.3) == 1.0
    assert metrics.quantity_abs_rel([1.5, None, 0.5], [1.0, 1.0, 1.0]) == pytest.approx(0.5)
    assert np.isnan(metrics.quantity_abs_rel([None], [1.0]))
    assert metrics.qualitative_accuracy([True, False, None, 1], [True, True, False, 1]) == pytest.approx(0.5)
    with pytest.raises(metrics.MetricError, match="finite and positive"):
        metrics.quantity_success([1.0], [0.0])
    with pytest.raises(metrics.MetricError, match="unknown object question"):
        metrics.object_metrics([("colour", 1, 1)])
    report = metrics.object_metrics([
        ("width_data", 1.0, 1.1), ("width_data", None, 2.0), ("height_data", 3.0, 2.0),
        ("vertical_distance", 0.1, 0.0),  # a zero truth has no relative error: left out
        ("left_predicate", True, True), ("left_predicate", None, False), ("left_choice", 0, 1),
    ])
    assert report["width_data"] == {"count": 2, "unparseable": 1, "success_rate": 0.5, "abs_rel": pytest.approx(1 / 11)}
    assert report["quantitative"]["count"] == 3 and report["quantitative"]["success_rate"] == pytest.approx(1 / 3)
    assert report["left_predicate"]["accuracy"] == 0.5 and report["qualitative"]["accuracy"] == pytest.approx(1 / 3)
    assert "vertical_distance" not in report


def test_oracle_answers_score_perfectly_against_the_true_values():
    """The step from answers to metrics: parsed oracle answers against objects.true_answer."""
    depth = _scene()
    query = ObjectQuery(OracleBackend(), relations=PAIR_QUESTIONS)
    boxes = [rectangle_box(K, r) for r in (NEAR, FAR)]
    result = query.query(RGB, Intrinsics.from_K(K, W, H), boxes, reference_depth=depth)
    prepared = result.prepared
    reference = prepare_depth(depth, prepared)
    extents = [objects.region_extent(reference, prepared.intrinsics.K, box_region(prepared, box)[1]) for box in boxes]
    assert [box_region(prepared, box)[0] for box in boxes] == [o.region for o in result.objects]
    records = [(r.question, r.value, objects.true_answer(r.question, extents[r.a], extents[r.b]))
               for r in result.relations]
    assert len(records) == len(PAIR_QUESTIONS)
    report = metrics.object_metrics(records)
    assert report["qualitative"]["accuracy"] == 1.0 and report["quantitative"]["success_rate"] == 1.0
    assert report["quantitative"]["abs_rel"] < 0.01
