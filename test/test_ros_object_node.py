"""The object node over real DDS (rclpy, loopback): 7-Scenes frames with boxes around depth-segmented
regions come back as Detection3DArray matching the back-projected ground truth (oracle mode);
markers; detection handling (bad, rotated, too many, low score, outside); bad input; parameters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")
pytest.importorskip("vision_msgs.msg", reason="vision_msgs is not importable")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from vision_msgs.msg import Detection2D, Detection2DArray, Detection3DArray, ObjectHypothesisWithPose  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from object_helpers import (  # noqa: E402
    Counting,
    assert_matches_ground_truth,
    expected_object,
    rectangle_box,
    rectangles_depth,
    segmented_boxes,
)
from ros_perception_helpers import (  # noqa: E402,F401  (perception_nodes is a fixture)
    CAMERA_FRAME,
    Collector,
    FramePublisher,
    diagnostic_values,
    perception_nodes,
    reliable,
    stamp,
    textured,
)
from vlm3_ros.camera import Intrinsics  # noqa: E402
from vlm3_ros.ros import backends  # noqa: E402
from vlm3_ros.ros.detections import detections_from_msg  # noqa: E402
from vlm3_ros.ros.object_node import ObjectNode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = np.array([[500.0, 0.0, 319.5], [0.0, 500.0, 239.5], [0.0, 0.0, 1.0]])
NEAR = (-0.8, -0.1, -0.2, 0.2, 2.0)
FAR = (0.3, -0.5, 0.6, 0.4, 3.0)


def detections_msg(t: float, boxes: Sequence[Sequence[float]], labels: Sequence[str] = (), scores: Sequence[float] = (),
                   theta: float = 0.0) -> Detection2DArray:
    from vlm3_ros.ros import conversions as cv

    msg = Detection2DArray(header=cv.header(stamp(t), CAMERA_FRAME))
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        det = Detection2D(header=msg.header, id=f"det{k}")
        det.bbox.center.position.x, det.bbox.center.position.y = (x1 + x2) / 2.0, (y1 + y2) / 2.0
        det.bbox.center.theta = theta
        det.bbox.size_x, det.bbox.size_y = float(x2 - x1), float(y2 - y1)
        if labels:
            hyp = ObjectHypothesisWithPose()
            hyp.hypothesis.class_id = labels[k]
            hyp.hypothesis.score = scores[k] if scores else 0.9
            det.results.append(hyp)
        msg.detections.append(det)
    return msg


def _setup(ros, start, **params):
    params.setdefault("backend", "oracle")
    node = start(ObjectNode(context=ros.context, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()]))
    client = ros.node("camera")
    cam = FramePublisher(client)
    detections = client.create_publisher(Detection2DArray, "detections", reliable(10))
    out = {
        "objects": Collector(client, Detection3DArray, "objects"),
        "markers": Collector(client, MarkerArray, "objects/markers"),
        "diagnostics": Collector(client, DiagnosticArray, "/diagnostics"),
    }
    assert cam.wait_matched(ros)
    assert ros.spin_until(lambda: detections.get_subscription_count() > 0, 15)
    if params["backend"] == "oracle":
        assert ros.spin_until(lambda: cam.depth.get_subscription_count() > 0, 15)
    assert ros.spin_until(lambda: node.marker_pub.get_subscription_count() > 0, 15)
    assert ros.spin_until(lambda: node.worker.state == "ready", 30), node.worker.error
    return node, cam, detections, out


def _send(cam, detections, t, rgb, intr, depth, boxes, **kwargs):
    detections.publish(detections_msg(t, boxes, **kwargs))
    cam.publish(FramePublisher.messages(t, rgb, intr, depth=depth))


def test_7scenes_objects_match_the_back_projected_ground_truth(ros, perception_nodes, sevenscenes):
    node, cam, detections, out = _setup(ros, perception_nodes)
    K7 = sevenscenes.intrinsics()
    intr = Intrinsics.from_K(K7, 640, 480)
    frames = sevenscenes.frame_ids[::16][:3]
    sent = {}
    for n, fid in enumerate(frames):
        rgb, depth, _ = sevenscenes.load_frame(fid)
        boxes = segmented_boxes(depth)
        labels = [f"region{k}" for k in range(len(boxes))]
        scores = [round(0.95 - 0.1 * k, 2) for k in range(len(boxes))]
        t = 10.0 + n
        sent[t] = (depth, boxes, labels, scores)
        _send(cam, detections, t, rgb, intr, depth, boxes, labels=labels, scores=scores)
        assert ros.spin_until(lambda: len(out["objects"].with_stamp(t)) == 1, 30)
    checked = 0
    for t, (depth, boxes, labels, scores) in sent.items():
        stable = [expected_object(depth, K7, b)["stable"] for b in boxes]
        (msg,) = out["objects"].with_stamp(t)
        assert msg.header.frame_id == CAMERA_FRAME
        assert len(msg.detections) == len(boxes) >= 2
        order = np.argsort([-s for s in scores], kind="stable")  # measured highest score first
        for det3, k in zip(msg.detections, order):
            centre = [det3.bbox.center.position.x, det3.bbox.center.position.y, det3.bbox.center.position.z]
            size = [det3.bbox.size.x, det3.bbox.size.y, det3.bbox.size.z]
            if stable[k]:  # within the answers' rounding (see test_objects)
                assert_matches_ground_truth(centre, size, expected_object(depth, K7, boxes[k]))
                checked += 1
            assert det3.bbox.center.orientation.w == 1.0 and det3.id == f"det{k}"
            assert det3.header.frame_id == CAMERA_FRAME and det3.header.stamp == msg.header.stamp
            (hyp,) = det3.results
            assert (hyp.hypothesis.class_id, hyp.hypothesis.score) == (labels[k], pytest.approx(scores[k]))
            assert [hyp.pose.pose.position.x, hyp.pose.pose.position.y, hyp.pose.pose.position.z] == centre
    assert checked >= 6
    # Markers: a DELETEALL, then a box and a label per object, in the camera frame, stamped like the image.
    def markers_of(t):
        st = stamp(t)
        return [m for m in out["markers"].messages
                if (m.markers[0].header.stamp.sec, m.markers[0].header.stamp.nanosec) == (st.sec, st.nanosec)]

    assert ros.spin_until(lambda: len(markers_of(t)) == 1, 10)
    (markers,) = markers_of(t)
    _, boxes, labels, _ = sent[t]
    assert markers.markers[0].action == Marker.DELETEALL
    cubes = [m for m in markers.markers if m.type == Marker.CUBE]
    texts = [m for m in markers.markers if m.type == Marker.TEXT_VIEW_FACING]
    assert len(cubes) == len(texts) == len(boxes)
    assert all(m.header.frame_id == CAMERA_FRAME for m in markers.markers)
    (last,) = out["objects"].with_stamp(t)
    assert [c.pose.position.z for c in cubes] == [d.bbox.center.position.z for d in last.detections]
    assert texts[0].text.startswith(labels[0] + " 0.95 ") and texts[0].text.endswith(" m")
    published = sum(len(m.detections) for m in out["objects"].messages)
    assert ros.spin_until(lambda: (diagnostic_values(out["diagnostics"], node.get_fully_qualified_name()) or {})
                          .get("objects_published") == str(published), 10)


def test_detection_handling_and_bad_input(ros, perception_nodes):
    node, cam, detections, out = _setup(ros, perception_nodes, max_objects=2, min_score=0.5)
    intr = Intrinsics.from_K(K, 640, 480)
    rgb = np.full((480, 640, 3), 100, np.uint8)
    depth = rectangles_depth(K, 640, 480, [NEAR, FAR])
    near, far = rectangle_box(K, NEAR), rectangle_box(K, FAR)

    # 1. Four detections: one scores below min_score, one has no size, one is beyond max_objects
    #    (lowest score), two are measured.
    boxes = [near, far, near, (10, 10, 10, 50)]
    _send(cam, detections, 1.0, rgb, intr, depth, boxes, labels=["a", "b", "c", "d"], scores=[0.9, 0.8, 0.6, 0.95])
    assert ros.spin_until(lambda: len(out["objects"].with_stamp(1.0)), 20)  # (a newer frame would replace it)
    detections.publish(detections_msg(1.5, [near], labels=["low"], scores=[0.2]))
    cam.publish(FramePublisher.messages(1.5, rgb, intr, depth=depth))
    assert ros.spin_until(lambda: len(out["objects"].with_stamp(1.5)), 20)
    (msg,) = out["objects"].with_stamp(1.0)
    assert [d.results[0].hypothesis.class_id for d in msg.detections] == ["a", "b"]
    np.testing.assert_allclose([msg.detections[1].bbox.center.position.z], [3.0], atol=0.006)
    assert out["objects"].with_stamp(1.5)[0].detections == []  # only a low score: an empty array
    stats = node.stats.snapshot()
    assert stats["rejected"]["bad_detection"] == 1 and stats["rejected"]["too_many_detections"] == 1
    assert node.detections_dropped == 1

    # 2. A rotated box is measured through its axis-aligned bounds; a box outside the image is not
    #    measured (counted, the frame still published).
    x1, y1, x2, y2 = far
    _send(cam, detections, 2.0, rgb, intr, depth, [(700, 10, 800, 60), (x1, y1, x2, y2)], labels=["out", "rot"],
          theta=math.pi / 2)
    assert ros.spin_until(lambda: len(out["objects"].with_stamp(2.0)), 20)
    (msg,) = out["objects"].with_stamp(2.0)
    assert len(msg.detections) == 1 and msg.detections[0].results[0].hypothesis.class_id == "rot"
    assert node.objects_unmeasured >= 1 and node.stats.snapshot()["rejected"]["object_unmeasured"] >= 1

    # 3. A reference depth of the wrong size rejects the frame; the next frame is served.
    detections.publish(detections_msg(3.0, [near], labels=["a"]))
    cam.publish(FramePublisher.messages(3.0, rgb, intr, depth=depth[:240, :320]))
    assert ros.spin_until(lambda: node.stats.snapshot()["rejected"].get("reference_depth_size") == 1, 20)
    _send(cam, detections, 4.0, rgb, intr, depth, [near], labels=["a"])
    assert ros.spin_until(lambda: len(out["objects"].with_stamp(4.0)), 20)
    assert out["objects"].with_stamp(3.0) == []

    # 4. Detections stamped differently from the image never pair: nothing is published for them.
    detections.publish(detections_msg(5.25, [near], labels=["a"]))
    cam.publish(FramePublisher.messages(5.0, rgb, intr, depth=depth))
    assert ros.spin_until(lambda: node.sync.counters.received.get("detections", 0) >= 6, 10)
    _send(cam, detections, 6.0, rgb, intr, depth, [near], labels=["a"])
    assert ros.spin_until(lambda: len(out["objects"].with_stamp(6.0)), 20)
    assert out["objects"].with_stamp(5.0) == [] and out["objects"].with_stamp(5.25) == []
    assert node.worker.submitted == 6  # frames 1, 1.5, 2, 3, 4, 6: the unpaired 5 never reached the worker


def test_tiny_model_serving_both_tasks_in_one_request(ros, perception_nodes, tiny_backend, tiny_checkpoint):
    """The transformers path through the node: a checkpoint serving depth and object is loaded once
    and asked once per frame; its random weights answer nonsense, which is counted, and an empty
    Detection3DArray is published."""
    params = dict(backend="transformers", model=str(tiny_checkpoint), device="cpu", dtype="float32",
                  max_new_tokens=6, depth_grid=2)
    settings = backends.settings_from_params({"adapter": "", "max_batch": 64, "offline": True, **params})
    counting = Counting(tiny_backend)
    backends.register(settings, counting)
    try:
        node, cam, detections, out = _setup(ros, perception_nodes, **params)
        intr = Intrinsics.from_focal(96, 64, 1000.0)
        detections.publish(detections_msg(7.5, [(10.0, 10.0, 40.0, 50.0), (50.0, 5.0, 90.0, 60.0)], labels=["a", "b"]))
        cam.publish(FramePublisher.messages(7.5, textured(96, 64), intr))
        assert ros.spin_until(lambda: len(out["objects"].with_stamp(7.5)), 60)
    finally:
        backends.clear_cache()
    assert out["objects"].with_stamp(7.5)[0].detections == []
    assert len(counting.requests) == 1 and len(counting.requests[0].questions) == 2 * 4 + 2 * 2
    stats = node.stats.snapshot()
    assert stats["parse_failures"] >= 2 * 2 and stats["rejected"]["object_unmeasured"] == 2
    assert node.backend_description() == f"object={tiny_checkpoint}, depth={tiny_checkpoint}"


def test_rotated_and_bad_boxes_are_read_as_documented():
    msg = detections_msg(0.0, [(100, 50, 140, 70), (0, 0, 0, 10), (10, 10, 20, 20), (1e6, 5, 1e6 + 1, 6)],
                         labels=["a", "b", "c", "d"], theta=math.pi / 2)
    msg.detections[2].bbox.size_x = float("nan")
    msg.detections[3].bbox.size_x = msg.detections[3].bbox.size_y = 1e-300  # positive, but lost in the centre
    dets, bad = detections_from_msg(msg)
    assert len(dets) == 1 and len(bad) == 3 and "det1" in bad[0] and "det2" in bad[1] and "det3" in bad[2]
    np.testing.assert_allclose(dets[0].box, [110, 40, 130, 80])  # 40 x 20 turned by 90 degrees
    assert (dets[0].label, dets[0].score, dets[0].id) == ("a", pytest.approx(0.9), "det0")


def test_parameter_file_gives_the_object_node_its_own_max_new_tokens(ros):
    """The node's section of config/perception.yaml overrides the shared wildcard section."""
    from vlm3_ros.ros.depth_node import DepthNode

    path = REPO / "config" / "perception.yaml"
    nodes = [cls(context=ros.context, namespace="robot2", cli_args=["--ros-args", "--params-file", str(path),
                                                                   "-p", "backend:=oracle"])
             for cls in (ObjectNode, DepthNode)]
    try:
        assert nodes[0].params["max_new_tokens"] == 96 and nodes[1].params["max_new_tokens"] == 48
        assert nodes[0].params["depth_grid"] == 3 and nodes[0].params["backend"] == "oracle"
    finally:
        for node in nodes:
            node.destroy_node()


def test_invalid_parameters_are_rejected(ros):
    with pytest.raises(ValueError, match="depth_grid"):
        ObjectNode(context=ros.context, parameter_overrides=[Parameter("depth_grid", value=0),
                                                             Parameter("backend", value="oracle")])
    node = ObjectNode(context=ros.context, parameter_overrides=[Parameter("backend", value="oracle")])
    try:
        result = node.set_parameters([Parameter("depth_inner", value=1.5)])[0]
        assert not result.successful and "depth_inner" in result.reason
        assert node.set_parameters([Parameter("depth_inner", value=0.25)])[0].successful
        assert node.params["depth_inner"] == 0.25
    finally:
        node.destroy_node()


def test_perception_command_runs_the_object_node_on_a_detections_topic(ros, ros_domain_id):
    """``vlm3-ros perception --detections TOPIC`` adds the object node (in its own process here)."""
    from test_ros_perception import _cli, _stop

    proc = _cli(ros_domain_id, "perception", "--backend", "oracle", "--nodes", "depth_node",
                "--detections", "/robot_detections", "--image", "/cam/image", "--camera-info", "/cam/info",
                "--reference-depth", "/cam/depth")
    try:
        client = ros.node("camera")
        cam = FramePublisher(client, {"image": "/cam/image", "camera_info": "/cam/info", "reference_depth": "/cam/depth"})
        detections = client.create_publisher(Detection2DArray, "/robot_detections", reliable(10))
        objects = Collector(client, Detection3DArray, "/objects")
        assert ros.spin_until(lambda: detections.get_subscription_count() == 1
                              and cam.image.get_subscription_count() == 2, 30), proc.poll()
        intr = Intrinsics.from_K(K, 640, 480)
        _send(cam, detections, 30.0, np.full((480, 640, 3), 90, np.uint8), intr,
              rectangles_depth(K, 640, 480, [NEAR]), [rectangle_box(K, NEAR)], labels=["box"])
        assert ros.spin_until(lambda: len(objects), 30), proc.poll()
    finally:
        code, output = _stop(proc)
    (det,) = objects.messages[0].detections
    assert det.results[0].hypothesis.class_id == "box"
    np.testing.assert_allclose([det.bbox.center.position.x, det.bbox.center.position.z], [-0.5, 2.0], atol=0.006)
    assert code == 0, output[-2000:]


def test_a_checkpoint_without_the_object_questions_fails_at_start(ros):
    """A protocol file whose object spec has no width / height question: the node fails to
    configure, naming the missing questions, instead of rejecting one frame after another."""
    from dataclasses import replace

    from vlm3_ros import protocol
    from vlm3_ros.engine import OracleBackend
    from vlm3_ros.ros.node_base import NodeStartError

    bare = replace(protocol.OBJECT, questions={"region": protocol.OBJECT.questions["region"]}, answers={})
    with pytest.raises(NodeStartError, match=r"could not configure: .*no question.*width_data"):
        ObjectNode(context=ros.context, backend=OracleBackend({**protocol.TASKS, "object": bare}),
                   parameter_overrides=[Parameter("backend", value="oracle")])
