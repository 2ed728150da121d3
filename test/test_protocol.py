"""The VLM3 text protocol: byte-exact questions, coordinate rounding, answer formats and parsers."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from vlm3_ros import protocol as p

# Literal texts of the released checkpoints' questions (two spaces where the originals have two).
DEPTH_Q_10_20 = (
    "Given this image, how far is the point at coordinates (10, 20) from the camera? The coordinates "
    "are in normalised [0, 2000] format relative to image width and height. Output the thinking process "
    "in <think> </think> and final answer (the meter number only, without the unit) in <answer> </answer> tags."
)
CORR_Q_440_60 = (
    "Given these two images, what pixel in the second image corresponds to pixel (440, 60) in the first "
    "image? Report the answer as (x, y)."
)
EULER_Q = (
    "Treating the first image as the reference viewpoint, describe the camera's reorientation needed to "
    "reach the second image's viewpoint as yaw, pitch and roll about the first camera's local axes, applied "
    "intrinsically in the order yaw -> pitch -> roll.  Conventions: yaw is rotation about the vertical (down) "
    "axis, positive = turn right; pitch is about the lateral (right) axis after yaw, positive = look up; roll "
    "is about the optical (forward) axis after yaw and pitch, positive = bank to the right (image content "
    "rotates clockwise from the operator's POV)."
)
DIRECTION_Q = (
    "Where did the camera move, expressed in the first camera's local frame (X right, Y down, Z forward)?  "
    "Give a qualitative direction and the precise unit direction vector (x, y, z)."
)


def test_questions_are_byte_exact():
    assert p.depth_question(10, 20) == DEPTH_Q_10_20
    assert p.correspondence_question(440, 60) == CORR_Q_440_60
    assert p.correspondence_question(440, 60, think=True) == CORR_Q_440_60 + (
        ' Please think step by step and follow the format: "<think> [think process] </think>\n\n[answer]".'
    )
    qs = p.pose_questions()
    assert list(qs) == ["rotation_angle", "euler", "translation_direction", "translation_distance"]
    assert qs["rotation_angle"] == (
        "Given these two images captured from different viewpoints, what is the relative rotation angle "
        "(in degrees) between the two camera poses?"
    )
    assert qs["euler"] == EULER_Q
    assert qs["translation_direction"] == DIRECTION_Q
    assert qs["translation_distance"] == "Estimate the magnitude of the camera translation between the two viewpoints."


def test_task_specs_hold_the_preprocessing_facts():
    assert (p.DEPTH.preprocess.mode, p.DEPTH.preprocess.value, p.DEPTH.coord_scale) == ("focal", 1000.0, 2000)
    assert (p.CORRESPONDENCE.preprocess.mode, p.CORRESPONDENCE.preprocess.value) == ("max_edge", 1024.0)
    assert p.CORRESPONDENCE.coord_scale == 1000 and p.CORRESPONDENCE.num_images == 2
    assert not p.CORRESPONDENCE.preprocess.undistort
    assert (p.POSE.preprocess.mode, p.POSE.preprocess.value, p.POSE.num_images) == ("focal", 750.0, 2)
    assert p.DEPTH.option("depth_kind") == "ray"
    assert p.DEPTH.stop_strings == ("</answer>",)


@pytest.mark.parametrize(
    "xy,size,scale,expected",
    [
        ((10, 488), (1215, 920), 2000, (16, 1061)),  # the public depth sample
        ((191, 119), (1215, 920), 2000, (314, 259)),
        ((450.56, 40.96), (1024, 683), 1000, (440, 60)),  # the public correspondence sample
        ((0, 0), (640, 480), 2000, (0, 0)),
        ((1, 1), (4000, 4000), 2000, (0, 0)),  # 0.5 rounds half to even
        ((3, 3), (4000, 4000), 2000, (2, 2)),  # 1.5 rounds half to even
    ],
)
def test_normalize_point_examples(xy, size, scale, expected):
    assert p.normalize_point(*xy, *size, scale) == expected


@given(
    x=st.floats(0, 4000),
    y=st.floats(0, 4000),
    w=st.integers(1, 4000),
    h=st.integers(1, 4000),
    scale=st.sampled_from([1000, 2000]),
)
def test_normalize_denormalize_within_half_a_unit(x, y, w, h, scale):
    nx, ny = p.normalize_point(x, y, w, h, scale)
    bx, by = p.denormalize_point(nx, ny, w, h, scale)
    assert abs(bx - x) <= 0.5 * w / scale + 1e-9
    assert abs(by - y) <= 0.5 * h / scale + 1e-9


def test_normalize_rejects_bad_input():
    with pytest.raises(p.ProtocolError, match="positive"):
        p.normalize_point(1, 1, 0, 10, 2000)
    with pytest.raises(p.ProtocolError, match="finite"):
        p.normalize_point(float("nan"), 1, 10, 10, 2000)


def test_depth_answer_format_matches_training_text():
    assert p.format_depth_answer(2.345) == (
        "<think> The point is around 2.35 meters away from the camera. </think><answer> 2.35 </answer>"
    )
    with pytest.raises(p.ProtocolError):
        p.format_depth_answer(0.0)
    with pytest.raises(p.ProtocolError):
        p.format_depth_answer(float("inf"))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<answer> 1.23 </answer>", 1.23),
        ("<think> The point is around 3.10 meters away from the camera. </think><answer> 3.1 </answer>", 3.1),
        ("<think>maybe 9 or 10</think>\n<answer>+4.5</answer>", 4.5),
        ("  7.25  ", 7.25),
        ("7.25 m", 7.25),
        ("<answer>12</answer><|im_end|>".replace("<|im_end|>", ""), 12.0),
        ("<answer> 1e1 </answer>", 10.0),
        ("<think> hmm </think> 0.8", 0.8),
        ("<answer> 2.0 </answer> <answer>2.0</answer>", 2.0),  # repeated, same value
    ],
)
def test_parse_depth_accepts_unambiguous_forms(text, expected):
    assert p.parse_depth_answer(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "no single number"),
        ("The point is around 1.2 meters away", "no single number"),
        ("<answer> 1.2 </answer><answer> 3.4 </answer>", "several different"),
        ("<answer> 1.2", "not closed"),
        ("<think> 1.2 meters", "no single number"),  # thinking never finished
        ("<answer> -1.0 </answer>", "not positive"),
        ("<answer> 0 </answer>", "not positive"),
        ("<answer> 1.2 degrees </answer>", "no single number"),
        ("<answer> nan </answer>", "no single number"),
    ],
)
def test_parse_depth_rejects_ambiguous_forms(text, reason):
    with pytest.raises(p.AnswerParseError, match=reason) as info:
        p.parse_depth_answer(text)
    assert info.value.task == "depth" and info.value.text == text
    assert "depth" in str(info.value)


@given(st.floats(0.01, 500.0))
def test_depth_format_parse_round_trip(d):
    assert p.parse_depth_answer(p.format_depth_answer(d)) == float(f"{d:.2f}")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("(338, 52)", (338.0, 52.0)),
        ("( 338.5 ,52 )", (338.5, 52.0)),
        ("<think> the left corner moved from (440, 60) </think>\n\n(338, 52)", (338.0, 52.0)),
        ("338, 52", (338.0, 52.0)),
        ("<answer>(+10, -3)</answer>", (10.0, -3.0)),
        ("The pixel is (5, 6).", (5.0, 6.0)),
    ],
)
def test_parse_correspondence(text, expected):
    assert p.parse_correspondence_answer(text) == expected


@pytest.mark.parametrize("text", ["", "(1, 2) or (3, 4)", "somewhere left", "(1, 2, 3)", "<think>(1, 2)"])
def test_parse_correspondence_rejects(text):
    with pytest.raises(p.AnswerParseError) as info:
        p.parse_correspondence_answer(text)
    assert info.value.task == "correspondence"


@given(st.integers(-100, 1100), st.integers(-100, 1100))
def test_correspondence_round_trip(x, y):
    assert p.parse_correspondence_answer(p.format_correspondence_answer(x, y)) == (x, y)


def test_pose_answers_reproduce_the_public_sample():
    """Ground truth of the released pose sample -> the exact answer texts stored with it."""
    R = Rotation.from_euler("YXZ", [89.60077227075526, 2.598684372865458, 6.072327841623985], degrees=True).as_matrix()
    # The sample states its rotation angle as 89.6547345694857 degrees: only the intrinsic
    # yaw -> pitch -> roll composition R = Ry Rx Rz gives that angle.
    assert math.degrees(Rotation.from_matrix(R).magnitude()) == pytest.approx(89.6547345694857, abs=1e-6)
    t = np.array([-0.69, 0.02, 0.72])
    t = t / np.linalg.norm(t) * 1.9806591332884265
    answers = p.format_pose_answers(R, t)
    assert answers == {
        "rotation_angle": "Rotation angle: 89.7 degrees",
        "euler": "Yaw=+89.6\u00b0, Pitch=+2.6\u00b0, Roll=+6.1\u00b0",
        "translation_direction": "The camera moves left, forward, unit vector (-0.69, +0.02, +0.72).",
        "translation_distance": "Translation distance: 1.98 meters",
    }


def _Ry(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _Rx(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _Rz(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def test_euler_signs_follow_the_question_text():
    # Turning right by 30 degrees: camera 2's forward axis points to +x in camera 1.
    turn_right = _Ry(math.radians(30))
    assert (turn_right @ [0, 0, 1])[0] > 0
    ans = p.format_pose_answers(turn_right, np.array([0.0, 0.0, 1.0]))
    assert ans["euler"] == "Yaw=+30.0\u00b0, Pitch=+0.0\u00b0, Roll=+0.0\u00b0"
    # Looking up by 10 degrees: forward axis moves to -y (up).
    look_up = _Rx(math.radians(10))
    assert (look_up @ [0, 0, 1])[1] < 0
    assert p.format_pose_answers(look_up, np.array([1.0, 0, 0]))["euler"] == "Yaw=+0.0\u00b0, Pitch=+10.0\u00b0, Roll=+0.0\u00b0"
    # The explicit product Ry Rx Rz is what the parser returns.
    R = _Ry(math.radians(20)) @ _Rx(math.radians(-15)) @ _Rz(math.radians(40))
    parsed = p.parse_pose_answers(
        {"euler": "Yaw=+20.0°, Pitch=-15.0°, Roll=+40.0°", "translation_direction": "unit vector (0, 0, 1)"}
    )
    np.testing.assert_allclose(parsed.R, R, atol=1e-12)


def test_translation_words_and_matrix():
    ans = p.format_pose_answers(np.eye(3), np.array([0.0, -2.0, 0.0]))
    assert ans["translation_direction"] == "The camera moves up, unit vector (+0.00, -1.00, +0.00)."
    assert ans["translation_distance"] == "Translation distance: 2.00 meters"
    pose = p.parse_pose_answers(ans)
    np.testing.assert_allclose(pose.matrix, [[1, 0, 0, 0], [0, 1, 0, -2], [0, 0, 1, 0], [0, 0, 0, 1]], atol=1e-12)
    no_distance = p.parse_pose_answers({k: v for k, v in ans.items() if k != "translation_distance"})
    assert no_distance.distance is None and no_distance.matrix is None
    np.testing.assert_allclose(no_distance.direction, [0, -1, 0])


def test_format_pose_rejects_bad_input():
    with pytest.raises(p.ProtocolError, match="zero translation"):
        p.format_pose_answers(np.eye(3), np.zeros(3))
    with pytest.raises(p.ProtocolError, match="rotation"):
        p.format_pose_answers(np.diag([1.0, 1.0, -1.0]), np.ones(3))


@settings(max_examples=200, deadline=None)
@given(
    yaw=st.floats(-179.0, 179.0),
    pitch=st.floats(-85.0, 85.0),
    roll=st.floats(-179.0, 179.0),
    direction=st.tuples(*[st.floats(-1, 1)] * 3).filter(lambda v: np.linalg.norm(v) > 0.1),
    distance=st.floats(0.01, 50.0),
)
def test_pose_round_trip(yaw, pitch, roll, direction, distance):
    R = Rotation.from_euler("YXZ", [yaw, pitch, roll], degrees=True).as_matrix()
    t = np.asarray(direction) / np.linalg.norm(direction) * distance
    pose = p.parse_pose_answers(p.format_pose_answers(R, t))
    # One decimal per Euler angle: each angle is off by at most 0.05 degree, and the geodesic error
    # of the composed rotation is at most the sum of the three (triangle inequality), 0.15 degree.
    err = math.degrees(Rotation.from_matrix(pose.R.T @ R).magnitude())
    assert err <= 0.15 + 1e-9
    assert np.degrees(np.arccos(np.clip(pose.direction @ (t / distance), -1, 1))) < 1.0
    assert pose.distance == pytest.approx(distance, abs=0.005 + 1e-9)
    assert pose.angle_deg == pytest.approx(math.degrees(Rotation.from_matrix(R).magnitude()), abs=0.05 + 1e-9)


@pytest.mark.parametrize(
    "answers,match",
    [
        ({"euler": "no idea", "translation_direction": "(0, 0, 1)"}, "Yaw"),
        ({"euler": "Yaw=1, Pitch=2, Roll=3", "translation_direction": "(0, 0, 0)"}, "zero direction"),
        ({"euler": "Yaw=1, Pitch=2, Roll=3", "translation_direction": "(1, 0, 0) then (0, 1, 0)"}, "several"),
        ({"euler": "Yaw=1, Pitch=2, Roll=3", "translation_direction": "(1, 0, 0)", "rotation_angle": "Rotation angle: 200 degrees"}, "outside"),
        ({"euler": "Yaw=1, Pitch=2, Roll=3", "translation_direction": "(1, 0, 0)", "translation_distance": "far"}, "number"),
    ],
)
def test_parse_pose_rejects(answers, match):
    with pytest.raises(p.AnswerParseError, match=match):
        p.parse_pose_answers(answers)


def test_parse_pose_requires_the_rotation_and_direction():
    with pytest.raises(p.ProtocolError, match="euler"):
        p.parse_pose_answers({"translation_direction": "(1, 0, 0)"})


def test_pose_parsers_accept_think_blocks_and_bare_values():
    pose = p.parse_pose_answers(
        {
            "euler": "<think>turned right</think> yaw = -5.5 deg, pitch = +1 deg, roll = 0",
            "translation_direction": "<think>(9, 9, 9)</think>The camera moves right, unit vector (+1.00, +0.00, +0.00).",
            "translation_distance": "0.35",
            "rotation_angle": "5.6 degrees",
        }
    )
    assert pose.distance == pytest.approx(0.35)
    assert pose.angle_deg == pytest.approx(5.6)
    np.testing.assert_allclose(pose.direction, [1, 0, 0])
    np.testing.assert_allclose(pose.R, Rotation.from_euler("YXZ", [-5.5, 1, 0], degrees=True).as_matrix())


def test_bbox_references():
    ref = p.bbox_reference((0, 33, 740, 850), 1134, 851)
    assert ref.startswith("bounding box region (0, 39, ") and ref.endswith(", 999)")
    text = "Can you confirm if bounding box region (0, 39, 652, 999) is smaller than bounding box region (6, 380, 228, 562)?"
    assert p.parse_bbox_references(text) == [(0, 39, 652, 999), (6, 380, 228, 562)]


def test_protocol_file_round_trip(tmp_path):
    custom = p.DEPTH.with_options(depth_kind="z")
    p.save_protocol(tmp_path, [custom, p.POSE])
    loaded = p.load_protocol(tmp_path)
    assert set(loaded) == {"depth", "pose"}
    assert loaded["depth"] == custom and loaded["depth"].option("depth_kind") == "z"
    assert loaded["pose"] == p.POSE
    assert loaded["depth"].question(nx=10, ny=20) == DEPTH_Q_10_20
    assert not list(tmp_path.glob(".protocol-*"))  # no temporary left behind
    assert (tmp_path / p.PROTOCOL_FILENAME).stat().st_mode & 0o777 == 0o644
    assert p.load_protocol(tmp_path / "missing") is None


@pytest.mark.parametrize(
    "payload,match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "other"}), "format"),
        (json.dumps({"format": "vlm3-protocol", "version": 99, "tasks": {}}), "newer"),
        (json.dumps({"format": "vlm3-protocol", "version": 1, "tasks": {}}), "no tasks"),
        (json.dumps({"format": "vlm3-protocol", "version": 1, "tasks": {"depth": {"preprocess": {"mode": "focal", "value": 1}}}}), "questions"),
        (json.dumps({"format": "vlm3-protocol", "version": 1, "tasks": {"d": {"questions": {"q": "x"}, "preprocess": {"mode": "crop", "value": 1}}}}), "mode"),
    ],
)
def test_protocol_file_errors(tmp_path, payload, match):
    (tmp_path / p.PROTOCOL_FILENAME).write_text(payload)
    with pytest.raises(p.ProtocolError, match=match):
        p.load_protocol(tmp_path)


def test_spec_question_errors():
    with pytest.raises(p.ProtocolError, match="no question"):
        p.DEPTH.question("nope", nx=1, ny=2)
    with pytest.raises(p.ProtocolError, match="needs field"):
        p.DEPTH.question(nx=1)


# ------------------------------------------------------------------------------------------------
# Compact specs (checkpoints trained by this project)
# ------------------------------------------------------------------------------------------------


def test_compact_specs_are_short_and_keep_the_vlm3_preprocessing():
    depth, corr, pose = (p.COMPACT_TASKS[t] for t in ("depth", "correspondence", "pose"))
    assert depth.question(nx=12, ny=1034) == "depth 12 1034" and depth.answer(distance=2.345) == "2.35"
    assert corr.question(nx=5, ny=999) == "match 5 999" and p.format_correspondence_answer(12.4, 55.6, corr) == "12,56"
    assert list(p.pose_questions(pose).values()) == ["rotation", "direction", "distance"]
    assert (depth.preprocess, depth.coord_scale, depth.option("depth_kind")) == (p.DEPTH.preprocess, 2000, "ray")
    assert (corr.preprocess, pose.preprocess) == (p.CORRESPONDENCE.preprocess, p.POSE.preprocess)
    assert not depth.stop_strings  # the end of the turn ends the answer
    small = p.compact_specs(depth_focal=256, correspondence_max_edge=224, pose_focal=160, coord_scale=100)
    assert small["depth"].preprocess == p.Preprocess("focal", 256.0, undistort=True)
    assert small["correspondence"].preprocess.value == 224.0 and small["pose"].preprocess.value == 160.0
    assert small["depth"].coord_scale == small["correspondence"].coord_scale == 100
    # The released checkpoints' specs are untouched.
    assert p.TASKS["depth"].question(nx=10, ny=20) == DEPTH_Q_10_20


@given(yaw=st.floats(-170, 170), pitch=st.floats(-80, 80), roll=st.floats(-170, 170),
       direction=st.tuples(*[st.floats(-1, 1)] * 3).filter(lambda v: np.linalg.norm(v) > 0.1),
       distance=st.floats(0.01, 50.0))
@settings(max_examples=60, deadline=None)
def test_compact_pose_round_trip(yaw, pitch, roll, direction, distance):
    spec = p.COMPACT_POSE
    R = Rotation.from_euler("YXZ", [yaw, pitch, roll], degrees=True).as_matrix()
    t = np.asarray(direction) / np.linalg.norm(direction) * distance
    answers = p.format_pose_answers(R, t, spec)
    assert all(set(a) <= set("+-.0123456789 ") for a in answers.values())  # numbers only
    pose = p.parse_pose_answers(answers, spec)
    assert math.degrees(Rotation.from_matrix(pose.R.T @ R).magnitude()) < 0.1
    assert np.degrees(np.arccos(np.clip(pose.direction @ (t / distance), -1, 1))) < 1.0
    assert pose.distance == pytest.approx(distance, abs=0.005 + 1e-9) and pose.angle_deg is None


def test_answers_are_read_with_the_spec_template_first():
    depth, corr = p.COMPACT_DEPTH, p.COMPACT_CORRESPONDENCE
    assert depth.parse_answer(" 3.25 ") == {"distance": 3.25}
    assert p.parse_depth_answer("3.25", depth) == 3.25
    assert p.parse_correspondence_answer("12,56", corr) == (12.0, 56.0)
    # Another form falls back to the lenient parsers; nothing is guessed.
    assert p.parse_depth_answer("<answer> 1.5 </answer>", depth) == 1.5
    assert p.parse_correspondence_answer("(3, 4)", corr) == (3.0, 4.0)
    for text in ("3.25 4.5", "far", ""):
        with pytest.raises(p.AnswerParseError):
            p.parse_depth_answer(text, depth)
    with pytest.raises(p.AnswerParseError, match="not in the answer format"):
        corr.parse_answer("12 56")
    with pytest.raises(p.AnswerParseError, match="not positive"):
        p.parse_depth_answer("0.00", depth)
    with pytest.raises(p.AnswerParseError, match="zero direction"):
        p.parse_pose_answers({"euler": "+1.0 +0.0 +0.0", "translation_direction": "+0.00 +0.00 +0.00"}, p.COMPACT_POSE)
    # A field repeated in a template must repeat its value (the VLM3 depth answer states it twice).
    vlm3 = p.format_depth_answer(2.5)
    assert p.DEPTH.parse_answer(vlm3) == {"distance": 2.5}
    with pytest.raises(p.AnswerParseError):
        p.DEPTH.parse_answer(vlm3.replace("<answer> 2.50", "<answer> 3.50"))
    assert p.parse_depth_answer(vlm3.replace("<answer> 2.50", "<answer> 3.50"), p.DEPTH) == 3.5  # the answer tag


def test_compact_specs_round_trip_through_the_protocol_file(tmp_path):
    specs = p.compact_specs(depth_focal=256, coord_scale=100)
    p.save_protocol(tmp_path, specs)
    assert p.load_protocol(tmp_path) == specs
    assert p.load_protocol(tmp_path / p.PROTOCOL_FILENAME) == specs  # the file itself reads too
