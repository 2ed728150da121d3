"""The environment built by scripts/setup_env.py: tf2_msgs, rclpy over DDS, the installed package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, List

import pytest

from ros_helpers import ros_subprocess_env

REPO = Path(__file__).resolve().parents[1]

rclpy = pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")
tf2_msgs_msg = pytest.importorskip("tf2_msgs.msg", reason="tf2_msgs is not importable")
from geometry_msgs.msg import TransformStamped  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402

TFMessage = tf2_msgs_msg.TFMessage

# Type description hash of tf2_msgs/msg/TFMessage in ROS 2 Jazzy, Kilted and Lyrical (as shown by
# `ros2 topic info -v /tf`).  Equal hashes mean the locally generated type matches upstream.
UPSTREAM_TFMESSAGE_HASH = "RIHS01_e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087"


def make_transform(parent: str, child: str, sec: int, nanosec: int, translation: List[float],
                   rotation_xyzw: List[float]) -> TransformStamped:
    t = TransformStamped()
    t.header.frame_id = parent
    t.header.stamp.sec = sec
    t.header.stamp.nanosec = nanosec
    t.child_frame_id = child
    t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = translation
    (t.transform.rotation.x, t.transform.rotation.y, t.transform.rotation.z,
     t.transform.rotation.w) = rotation_xyzw
    return t


def two_transforms(index: int = 0) -> TFMessage:
    """A TFMessage whose numbers depend on ``index`` (so a stale message cannot pass)."""
    return TFMessage(transforms=[
        make_transform("map", "odom", 1700000000 + index, 123456789, [1.25 + index, -2.5, 0.125],
                       [0.0, 0.0, 0.38268343236508978, 0.92387953251128674]),
        make_transform("odom", "camera_optical", 1700000000 + index, 987654321, [0.1, 0.2, 1.5e-3 * index],
                       [0.5, -0.5, 0.5, -0.5]),
    ])


def flatten(msg: Any) -> List[Any]:
    """Every field of a TFMessage-like object (rclpy or rosbags) as a flat list."""
    values: List[Any] = []
    for t in msg.transforms:
        tr, rot = t.transform.translation, t.transform.rotation
        values += [t.header.frame_id, t.header.stamp.sec, t.header.stamp.nanosec, t.child_frame_id,
                   tr.x, tr.y, tr.z, rot.x, rot.y, rot.z, rot.w]
    return values


def test_tfmessage_round_trips_through_rclpy_serialization() -> None:
    msg = two_transforms(3)
    raw = serialize_message(msg)
    back = deserialize_message(raw, TFMessage)
    assert len(back.transforms) == 2
    assert flatten(back) == flatten(msg)
    assert back == msg
    assert flatten(back)[:4] == ["map", 1700000003, 123456789, "odom"]
    assert back.transforms[1].transform.translation.z == 1.5e-3 * 3


def test_tfmessage_bytes_match_an_independent_cdr_implementation() -> None:
    """rosbags ships its own tf2_msgs definition and CDR codec: each side decodes the other's bytes.

    The byte strings are not compared directly: Fast CDR leaves alignment padding unset, so the
    padding bytes of rclpy's output are arbitrary while rosbags writes zeros.
    """
    typesys = pytest.importorskip("rosbags.typesys")
    store = typesys.get_typestore(typesys.Stores.LATEST)
    msg = two_transforms(7)
    raw = bytes(serialize_message(msg))
    decoded = store.deserialize_cdr(raw, "tf2_msgs/msg/TFMessage")
    assert flatten(decoded) == flatten(msg)
    reencoded = bytes(store.serialize_cdr(decoded, "tf2_msgs/msg/TFMessage"))
    assert len(reencoded) == len(raw)
    assert flatten(deserialize_message(reencoded, TFMessage)) == flatten(msg)


def test_tfmessage_type_hash_matches_upstream() -> None:
    """The generated type description hash equals the one of the real tf2_msgs package."""
    prefix = Path(tf2_msgs_msg.__file__).resolve().parents[5]
    description = prefix / "share" / "tf2_msgs" / "msg" / "TFMessage.json"
    if not description.is_file():
        pytest.skip(f"no type description at {description} (ROS 2 distributions before Iron)")
    hashes = {entry["type_name"]: entry["hash_string"]
              for entry in json.loads(description.read_text())["type_hashes"]}
    assert hashes["tf2_msgs/msg/TFMessage"] == UPSTREAM_TFMESSAGE_HASH


def test_vlm3_ros_is_importable_from_the_venv(tmp_path: Path) -> None:
    """The venv's interpreter imports the repository's package (editable install), from anywhere."""
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv in the repository (environment not made by scripts/setup_env.py)")
    code = "import vlm3_ros, importlib.metadata as m; print(vlm3_ros.__file__); print(m.version('vlm3_ros'))"
    env = dict(os.environ)
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    module_file, version = done.stdout.split()[-2:]
    assert Path(module_file).resolve() == (REPO / "vlm3_ros" / "__init__.py").resolve()
    import vlm3_ros

    assert version == vlm3_ros.__version__


def test_tfmessage_pub_sub_between_two_nodes(ros: Any) -> None:
    """Two nodes of one context exchange a TFMessage over DDS on the loopback interface."""
    assert os.environ["ROS_DOMAIN_ID"] == str(ros.domain_id)
    assert ros.context.get_domain_id() == ros.domain_id
    talker = ros.node("vlm3_env_talker")
    listener = ros.node("vlm3_env_listener")
    received: List[TFMessage] = []
    listener.create_subscription(TFMessage, "vlm3_env_tf", received.append, 10)
    publisher = talker.create_publisher(TFMessage, "vlm3_env_tf", 10)

    assert ros.spin_until(lambda: publisher.get_subscription_count() >= 1, timeout=10.0)
    sent = two_transforms(11)

    def publish_and_check() -> bool:
        if not received:
            publisher.publish(sent)
        return bool(received)

    assert ros.spin_until(publish_and_check, timeout=10.0), "no TFMessage arrived within 10 s"
    assert flatten(received[0]) == flatten(sent)


PUBLISHER_PROGRAM = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {test_dir!r})
    import rclpy
    from test_environment import two_transforms
    from tf2_msgs.msg import TFMessage
    rclpy.init()
    node = rclpy.create_node("vlm3_env_remote_talker")
    publisher = node.create_publisher(TFMessage, "vlm3_env_remote_tf", 10)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if publisher.get_subscription_count() > 0:
            publisher.publish(two_transforms(5))
        time.sleep(0.05)
""")


def test_tfmessage_arrives_from_another_process(ros: Any) -> None:
    """A TFMessage published by a child process (same domain, loopback only) is received intact."""
    program = PUBLISHER_PROGRAM.format(test_dir=str(Path(__file__).resolve().parent))
    child = subprocess.Popen([sys.executable, "-c", program], env=ros_subprocess_env(ros.domain_id),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        listener = ros.node("vlm3_env_remote_listener")
        received: List[TFMessage] = []
        listener.create_subscription(TFMessage, "vlm3_env_remote_tf", received.append, 10)
        ros.spin_until(lambda: bool(received) or child.poll() is not None, timeout=25.0)
    finally:
        child.kill()
        output, _ = child.communicate(timeout=10)
    assert received, f"no TFMessage arrived from the child process; its output:\n{output}"
    assert flatten(received[0]) == flatten(two_transforms(5))


def test_opencv_has_the_contrib_modules_and_one_cv2_wheel() -> None:
    """The completion needs cv2.ximgproc; a plain opencv wheel beside the contrib one would share
    (and on removal break) the cv2 package."""
    import importlib.metadata as metadata

    import cv2
    import numpy as np

    smoother = cv2.ximgproc.createFastGlobalSmootherFilter(np.zeros((8, 8, 3), np.uint8), 10.0, 5.0)
    assert smoother.filter(np.ones((8, 8), np.float32)).shape == (8, 8)
    assert metadata.version("opencv-contrib-python-headless")
    installed = []
    for name in ("opencv-python", "opencv-python-headless", "opencv-contrib-python"):
        try:
            metadata.version(name)
            installed.append(name)
        except metadata.PackageNotFoundError:
            pass
    assert installed == [], f"{installed} installed beside opencv-contrib-python-headless"
