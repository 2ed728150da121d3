"""vision_msgs as the object node uses it: type hashes equal upstream's, CDR round trips, DDS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List

import pytest

pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")
vision_msgs_msg = pytest.importorskip("vision_msgs.msg", reason="vision_msgs is not importable")
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402

# RIHS01 type description hashes of ros-perception/vision_msgs 4.x (the version of ROS 2 Iron,
# Jazzy, Kilted). Source: the rosidl-generated type descriptions of an upstream vision_msgs build
# (rosidl_generator_type_description/vision_msgs/msg/*.json and the *__description.c files, whose
# referenced-type hashes of a Detection2DArray / Detection3DArray build list every type below);
# BoundingBox2D, ObjectHypothesis, Point2D and Pose2D agree with the hashes that an unrelated
# package built against vision_msgs (depthai_ros_msgs) records for them. A hash covers field
# names, types and nesting, not comments or defaults, so equal hashes mean wire- and
# introspection-compatible types: a node here talks to detectors using the real package.
UPSTREAM_HASHES = {
    "Point2D": "RIHS01_eab0e83f44ab4de92ceaf76dd7d0e7638f2bdd1d16ffbe16c7a136c48e407247",
    "Pose2D": "RIHS01_b0b5d1d7b4c20dd4fcde3ed1d4b289a919290572007d67a97043814db25d3648",
    "BoundingBox2D": "RIHS01_008eacbb0cf8f26e83795547bed013eec3675485ef386ec056d80eaaf1c1ce2f",
    "BoundingBox3D": "RIHS01_bbb73a65c163d7f9bb29009c7bde9f7faa576bd2d23299c4511d19230dab4698",
    "ObjectHypothesis": "RIHS01_51da43cec11c01957a64d1e05a24acd18aae7745ec30b74348ad5f6d634f7f90",
    "ObjectHypothesisWithPose": "RIHS01_41c12344c0396c48b81df12467c192d99b2a0eb1463c5c37194e4223251c80bc",
    "Detection2D": "RIHS01_0d12b69df5c593b3455b7346fac8205437a7d4bcb09b9e0e0b2dde787ded38ea",
    "Detection2DArray": "RIHS01_214274120007f4a683866481336b70310268cfa107aebe9d594a6acf75bda968",
    "Detection3D": "RIHS01_ddd703be132ab0b69d33121f1bb034132bfbb3b0ac5f9fb1516005ba1c8a265b",
    "Detection3DArray": "RIHS01_793f5eab9595ac1c0da07873cc859db42eae51f0ee76056db8562515d830e018",
}
# Hashes of the geometry_msgs / std_msgs types the detections hold, as the same upstream build
# records them: the PyPI wheels' types must be the ones vision_msgs was built against.
UPSTREAM_REFERENCED = {
    "std_msgs/msg/Header": "RIHS01_f49fb3ae2cf070f793645ff749683ac6b06203e41c891e17701b1cb597ce6a01",
    "geometry_msgs/msg/Pose": "RIHS01_d501954e9476cea2996984e812054b68026ae0bfae789d9a10b23daf35cc90fa",
    "geometry_msgs/msg/PoseWithCovariance": "RIHS01_9a7c0fd234b7f45c6098745ecccd773ca1085670e64107135397aee31c02e1bb",
    "geometry_msgs/msg/Vector3": "RIHS01_cc12fe83e4c02719f1ce8070bfd14aecd40f75a96696a67a2a1f37f7dbb0765d",
}


def _descriptions() -> Path:
    prefix = Path(vision_msgs_msg.__file__).resolve().parents[5]
    return prefix / "share" / "vision_msgs" / "msg"


def test_type_hashes_match_upstream() -> None:
    """Every generated detection type hashes like the real vision_msgs package (and so do its parts)."""
    directory = _descriptions()
    if not (directory / "Detection2DArray.json").is_file():
        pytest.skip(f"no type descriptions in {directory} (ROS 2 distributions before Iron)")
    referenced = {}
    for name, expected in UPSTREAM_HASHES.items():
        hashes = {e["type_name"]: e["hash_string"] for e in json.loads((directory / f"{name}.json").read_text())["type_hashes"]}
        assert hashes[f"vision_msgs/msg/{name}"] == expected, name
        referenced.update(hashes)
    for type_name, expected in UPSTREAM_REFERENCED.items():
        assert referenced[type_name] == expected, type_name


def _detections_2d(index: int) -> Any:
    from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose

    msg = Detection2DArray()
    msg.header.frame_id = "camera_optical"
    msg.header.stamp.sec = 1700000000 + index
    for k, (label, score) in enumerate((("cup", 0.875), ("chair", 0.5))):
        det = Detection2D(id=f"{label}-{index}")
        det.bbox.center.position.x = 100.5 + k + index
        det.bbox.center.position.y = 50.25 * (k + 1)
        det.bbox.center.theta = 0.125 * k
        det.bbox.size_x, det.bbox.size_y = 40.0 + k, 30.5
        hyp = ObjectHypothesisWithPose()
        hyp.hypothesis.class_id, hyp.hypothesis.score = label, score
        hyp.pose.pose.position.z = 2.5 + k
        hyp.pose.covariance[0] = 0.01 * (k + 1)
        det.results = [hyp]
        msg.detections.append(det)
    return msg


def _flatten(msg: Any) -> List[Any]:
    out: List[Any] = [msg.header.frame_id, msg.header.stamp.sec]
    for d in msg.detections:
        b = d.bbox
        out += [d.id, b.center.position.x, b.center.position.y, b.center.theta, b.size_x, b.size_y]
        for r in d.results:
            out += [r.hypothesis.class_id, r.hypothesis.score, r.pose.pose.position.z, r.pose.covariance[0]]
    return out


def test_detection_arrays_round_trip_through_cdr() -> None:
    msg = _detections_2d(3)
    back = deserialize_message(serialize_message(msg), type(msg))
    assert _flatten(back) == _flatten(msg)
    assert _flatten(back)[2:5] == ["cup-3", 103.5, 50.25]

    from vision_msgs.msg import Detection3D, Detection3DArray

    d3 = Detection3DArray(detections=[Detection3D(id="a")])
    d3.detections[0].bbox.center.position.x = -0.75
    d3.detections[0].bbox.size.z = 0.3
    d3.detections[0].bbox.center.orientation.w = 1.0
    out = deserialize_message(serialize_message(d3), Detection3DArray)
    box = out.detections[0].bbox
    assert (out.detections[0].id, box.center.position.x, box.size.z, box.center.orientation.w) == ("a", -0.75, 0.3, 1.0)


def test_detections_pass_between_two_nodes_over_dds(ros: Any) -> None:
    from vision_msgs.msg import Detection2DArray

    talker, listener = ros.node("vlm3_vision_talker"), ros.node("vlm3_vision_listener")
    received: List[Any] = []
    listener.create_subscription(Detection2DArray, "vlm3_detections", received.append, 10)
    publisher = talker.create_publisher(Detection2DArray, "vlm3_detections", 10)
    assert ros.spin_until(lambda: publisher.get_subscription_count() >= 1, timeout=10.0)
    sent = _detections_2d(9)

    def publish_and_check() -> bool:
        if not received:
            publisher.publish(sent)
        return bool(received)

    assert ros.spin_until(publish_and_check, timeout=10.0), "no Detection2DArray arrived within 10 s"
    assert _flatten(received[0]) == _flatten(sent)
