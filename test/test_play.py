"""`vlm3-ros play`: a bag published by a separate process over real DDS and received here with rclpy."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ros_helpers import ros_subprocess_env, wait_for_subscribers
from vlm3_ros import bags, msg_codec
from vlm3_ros.camera import Intrinsics
from vlm3_ros.cli.main import main as cli_main

pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")

REPO = Path(__file__).resolve().parents[1]
INTR = Intrinsics(640, 480, 525.0, 526.0, 319.5, 239.5)
N = 10
START_NS = 1_000_000_000
PERIOD_NS = 100_000_000
STAMPS = [START_NS + k * PERIOD_NS + k for k in range(N)]  # odd nanoseconds: exactness is checked
NOTE_TYPE = "vlm3_test_msgs/msg/Note"


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A 640x480 RGB-D bag of N frames (0.9 s) with /tf and a topic of a type rclpy does not have."""
    from rosbags.typesys import get_types_from_msg, get_typestore, Stores

    store = get_typestore(Stores.ROS2_JAZZY)
    store.register(get_types_from_msg("string text", NOTE_TYPE))
    rng = np.random.default_rng(7)
    frames = []
    path = tmp_path_factory.mktemp("play") / "bag"
    with bags.RgbdBagWriter(path, store=store) as writer:
        for k, stamp in enumerate(STAMPS):
            rgb = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
            depth = rng.uniform(0.3, 8.0, (480, 640)).astype(np.float32)
            T = np.eye(4)
            T[:3, :3] = Rotation.random(random_state=k).as_matrix()
            T[:3, 3] = rng.normal(size=3)
            writer.write_frame(stamp, rgb=rgb, intrinsics=INTR, depth_m=depth, T_w_c=T)
            writer.write("/note", NOTE_TYPE, stamp, store.types[NOTE_TYPE](text=f"frame {k}"))
            frames.append((rgb, depth, T))
    return path, frames


def play(bag, domain_id, *extra):
    env = ros_subprocess_env(domain_id)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "vlm3_ros.cli.main", "play", str(bag), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stamp_of(msg):
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def reliable(depth=100):
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)


def test_play_publishes_the_bag_in_order_with_clock(ros, recording):
    from geometry_msgs.msg import PoseStamped
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CameraInfo, Image

    path, frames = recording
    node = ros.node("listener")
    received = {name: [] for name in ("image", "camera_info", "depth", "pose")}
    types = dict(image=Image, camera_info=CameraInfo, depth=Image, pose=PoseStamped)
    for role, msgs in received.items():
        node.create_subscription(types[role], bags.TOPICS[role], msgs.append, reliable())
    clock = []
    node.create_subscription(Clock, "/clock", lambda m: clock.append(
        (time.monotonic(), m.clock.sec * 1_000_000_000 + m.clock.nanosec)), reliable(1000))

    proc = play(path, ros.domain_id, "--rate", "2", "--wait-for-subscribers", "4")
    try:
        done = ros.spin_until(lambda: proc.poll() is not None and all(len(v) == N for v in received.values()), 40)
        ros.spin_until(lambda: False, 0.2)  # late /clock messages
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert done, {k: [(stamp_of(m) - START_NS) // PERIOD_NS for m in v] for k, v in received.items()}
    assert f"played {N * (5 if has_tf2() else 4)} messages" in out

    # unknown types are skipped with a warning naming them; tf2_msgs may be absent in a plain rclpy install
    assert NOTE_TYPE in err and "/note" in err
    assert ("tf2_msgs/msg/TFMessage" in err) == (not has_tf2())

    for role, msgs in received.items():
        assert [stamp_of(m) for m in msgs] == STAMPS, role
    for k, (rgb, depth, T) in enumerate(frames):
        assert np.array_equal(msg_codec.image_to_rgb(received["image"][k]), rgb)
        got = msg_codec.depth_to_metres(received["depth"][k])
        assert np.abs(got - depth).max() <= 0.0005 + 1e-6
        np.testing.assert_allclose(Intrinsics.from_camera_info(received["camera_info"][k]).K, INTR.K)
        np.testing.assert_allclose(bags.pose_from_msg(received["pose"][k]), T, atol=1e-9)

    # /clock: never backwards, from the first to the last stamp, advancing at about twice wall speed
    values = np.array([c for _, c in clock], dtype=np.int64)
    assert (np.diff(values) >= 0).all()
    assert values[0] == START_NS and values[-1] == STAMPS[-1]
    moving = np.array([(t, c) for t, c in clock if START_NS < c < STAMPS[-1]], dtype=np.float64)
    assert len(moving) >= 10
    slope = np.polyfit(moving[:, 0], moving[:, 1] / 1e9, 1)[0]
    assert 1.5 < slope < 2.5, slope


def has_tf2():
    return importlib.util.find_spec("tf2_msgs") is not None


def test_play_loop_pause_resume_and_ctrl_c(ros, recording):
    from sensor_msgs.msg import Image
    from std_msgs.msg import Bool

    path, _ = recording
    node = ros.node("listener")
    stamps = []
    node.create_subscription(Image, bags.TOPICS["image"], lambda m: stamps.append(stamp_of(m)), reliable())
    pause = node.create_publisher(Bool, "/vlm3_bag_player/pause", reliable(10))
    proc = play(path, ros.domain_id, "--loop", "--start-paused", "--rate", "4", "--topics", bags.TOPICS["image"],
                "--wait-for-subscribers", "1")
    try:
        assert wait_for_subscribers(ros.executor, pause, 1, timeout=20), proc.stderr
        ros.spin_until(lambda: False, 1.0)
        assert stamps == []  # paused before the first message
        pause.publish(Bool(data=False))
        assert ros.spin_until(lambda: len(stamps) >= N + 3, 20), stamps
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "stopped after" in out
    # a second pass started from the beginning: the stamps wrap around once
    assert stamps[:N] == STAMPS
    assert stamps[N:N + 3] == STAMPS[:3]


def test_play_errors(tmp_path, capsys):
    assert cli_main(["play", str(tmp_path / "missing")]) == 1
    assert "no bag" in capsys.readouterr().err
    path = tmp_path / "bag"
    with bags.RgbdBagWriter(path) as writer:
        writer.write_frame(1, rgb=np.zeros((2, 2, 3), np.uint8))
    assert cli_main(["play", str(path), "--topics", "/nope"]) == 1
    assert "/nope" in capsys.readouterr().err
    assert cli_main(["play", str(path), "--rate", "0"]) == 1
    assert "--rate" in capsys.readouterr().err
