"""The odometry node over real DDS: TF and Odometry at image stamps matching the 7-Scenes
ground-truth trajectory in oracle mode, the static extrinsic, markers, parameter validation,
lost frames and time jumps."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from ros_perception_helpers import (  # noqa: E402,F401  (perception_nodes is a fixture)
    CAMERA_FRAME,
    Collector,
    FaultyBackend,
    FramePublisher,
    diagnostic_values,
    perception_nodes,
    textured,
)
from vlm3_ros import geometry as g  # noqa: E402
from vlm3_ros.camera import Intrinsics  # noqa: E402
from vlm3_ros.engine import OracleBackend  # noqa: E402
from vlm3_ros.protocol import TASKS  # noqa: E402
from vlm3_ros.ros.conversions import FrameRejected  # noqa: E402
from vlm3_ros.odometry import xyz_rotation_to_pose  # noqa: E402
from vlm3_ros.ros import conversions as cv  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from vlm3_ros.ros.node_base import NodeStartError  # noqa: E402
from vlm3_ros.ros.odometry_node import OdometryNode  # noqa: E402
from vlm3_ros.ros.params import OPTICAL_RPY  # noqa: E402
from vlm3_ros.ros.qos import latched_qos  # noqa: E402
from vlm3_ros.ros.tf import HAS_TF2_MSGS, HAS_TF2_ROS  # noqa: E402

TF_AVAILABLE = HAS_TF2_MSGS or HAS_TF2_ROS


def _start(ros, start, engine=None, **params):
    params.setdefault("backend", "oracle")
    overrides = [Parameter(k, value=v) for k, v in params.items()]
    backends = {task: engine for task in ("pose", "correspondence", "depth")} if engine is not None else None
    node = start(OdometryNode(context=ros.context, backends=backends, parameter_overrides=overrides))
    client = ros.node("camera")
    cam = FramePublisher(client)
    out = {"odom": Collector(client, Odometry, "odom"), "markers": Collector(client, MarkerArray, "correspondences")}
    if TF_AVAILABLE:
        from tf2_msgs.msg import TFMessage

        from vlm3_ros.ros.tf import TF_QOS

        out["tf"] = Collector(client, TFMessage, "/tf", TF_QOS)
        out["tf_static"] = Collector(client, TFMessage, "/tf_static", latched_qos(1))
    assert cam.wait_matched(ros, reference=params["backend"] == "oracle")
    assert ros.spin_until(lambda: node.worker.state == "ready", 30), node.worker.error
    return node, client, cam, out


def _frames(sevenscenes, count):
    intr = Intrinsics.from_K(sevenscenes.intrinsics(), 640, 480)
    for n, i in enumerate(sevenscenes.frame_ids[:count]):
        rgb, depth, T_wc = sevenscenes.load_frame(i)
        yield 50.0 + n / 10, FramePublisher.messages(50.0 + n / 10, rgb, intr, depth=depth, pose=T_wc), T_wc


def test_oracle_tf_and_odometry_follow_the_7scenes_trajectory(ros, perception_nodes, sevenscenes):
    xyz = [0.2, 0.0, 0.5]
    node, client, cam, out = _start(ros, perception_nodes, mode="correspondence", query_count=48,
                                    extrinsic_xyz=xyz, publish_extrinsic=True, **{"noise.initial_variance": 4e-6})
    T_bc = xyz_rotation_to_pose(xyz, OPTICAL_RPY)
    T0, stamps, truth = None, [], []
    for n, (t, msgs, T_wc) in enumerate(_frames(sevenscenes, 6)):
        T0 = T_wc if T0 is None else T0
        cam.publish(msgs)
        stamps.append(t)
        truth.append(T_bc @ g.relative_pose(T0, T_wc) @ g.invert_pose(T_bc))
        assert ros.spin_until(lambda: len(out["odom"]) == n + 1, 20), f"no odometry for frame {n}"
    assert out["odom"].stamps() == pytest.approx(stamps, abs=1e-9)  # the image stamps, one per frame
    for msg, gt in zip(out["odom"].messages, truth):
        assert (msg.header.frame_id, msg.child_frame_id) == ("odom", "base_link")
        T = cv.pose_matrix(msg.pose.pose)
        assert np.linalg.norm(T[:3, 3] - gt[:3, 3]) < 0.01
        assert g.rotation_angle(T[:3, :3].T @ gt[:3, :3]) < 0.3
        C = np.array(msg.pose.covariance).reshape(6, 6)
        assert np.allclose(C, C.T) and np.all(np.linalg.eigvalsh(C) >= -1e-12)
    # The first pose has the configured prior (not zero), then uncertainty accumulates.
    np.testing.assert_allclose(np.array(out["odom"].messages[0].pose.covariance).reshape(6, 6), 4e-6 * np.eye(6),
                               atol=1e-15)
    covs = [np.trace(np.array(m.pose.covariance).reshape(6, 6)) for m in out["odom"].messages]
    assert all(b > a for a, b in zip(covs, covs[1:]))
    # The twist is the base_link velocity in base_link (the child frame): compare with the ground truth
    # motion over the last frame, expressed in the current base_link.
    last = out["odom"].messages[-1]
    motion = g.invert_pose(truth[-2]) @ truth[-1]
    v = np.array([last.twist.twist.linear.x, last.twist.twist.linear.y, last.twist.twist.linear.z])
    assert np.linalg.norm(v - motion[:3, :3].T @ motion[:3, 3] / 0.1) < 0.05
    if TF_AVAILABLE:
        assert ros.spin_until(lambda: len(out["tf"]) >= 6, 5)
        transforms = [t for m in out["tf"].messages for t in m.transforms]
        assert [t.header.stamp.sec + t.header.stamp.nanosec * 1e-9 for t in transforms] == pytest.approx(stamps)
        assert all((t.header.frame_id, t.child_frame_id) == ("odom", "base_link") for t in transforms)
        for tf, gt in zip(transforms, truth):
            np.testing.assert_allclose(cv.pose_matrix(tf.transform)[:3, 3], gt[:3, 3], atol=0.01)
        assert ros.spin_until(lambda: len(out["tf_static"]) >= 1, 5)
        static = out["tf_static"].messages[-1].transforms
        assert [(t.header.frame_id, t.child_frame_id) for t in static] == [("base_link", CAMERA_FRAME)]
        np.testing.assert_allclose(cv.pose_matrix(static[0].transform), T_bc, atol=1e-9)
    else:
        assert node.tf.backend == "none"


def test_markers_show_the_matches(ros, perception_nodes, sevenscenes):
    node, client, cam, out = _start(ros, perception_nodes, mode="both", query_count=32, keyframe_interval=2,
                                    publish_debug_image=True)
    debug = Collector(client, Image, "correspondences/image")
    for n, (t, msgs, _) in enumerate(_frames(sevenscenes, 3)):
        cam.publish(msgs)
        assert ros.spin_until(lambda: len(out["odom"]) == n + 1, 20)
    assert ros.spin_until(lambda: len(out["markers"]) == 2, 5)
    marker = out["markers"].messages[-1].markers[0]
    assert marker.header.frame_id == CAMERA_FRAME and marker.header.stamp == out["odom"].messages[-1].header.stamp
    update = node.last_update
    assert len(marker.points) == np.isfinite(update.matches.points1).all(axis=1).sum() >= 20
    inliers = [c.g > 0.5 for c in marker.colors]
    assert sum(inliers) == update.matches.inliers.sum() == update.estimate.inliers
    # The points are the keyframe's, seen from the current camera: they project onto the matches.
    points = np.array([[p.x, p.y, p.z] for p in marker.points])
    K = Intrinsics.from_K(sevenscenes.intrinsics(), 640, 480).K
    uv, _ = g.project(points, K)
    ok = np.isfinite(update.matches.points1).all(axis=1)
    close = np.linalg.norm(uv - update.matches.uv2[ok], axis=1) < 3.0
    assert close[np.array(inliers)].all()
    # The debug image: keyframe | frame, 1280x480, with green lines drawn.
    assert ros.spin_until(lambda: len(debug) == 2, 5)
    picture = cv.image_rgb(debug.messages[-1])
    assert picture.shape == (480, 1280, 3) and debug.messages[-1].header.stamp == marker.header.stamp
    greenish = (picture[..., 1] > 200) & (picture[..., 0] < 80) & (picture[..., 2] < 80)
    assert greenish.sum() > 500


def test_parameters_are_validated_and_mode_change_restarts(ros, perception_nodes, sevenscenes):
    node, client, cam, out = _start(ros, perception_nodes, mode="correspondence", query_count=32)

    def rejected(name, value):
        result = node.set_parameters([Parameter(name, value=value)])[0]
        return not result.successful and result.reason

    assert "not one of pose, correspondence, both" in rejected("mode", "lidar")
    assert "3 or 4 values" in rejected("extrinsic_rotation", [0.0, 0.0, 0.0, 0.0, 1.0])
    assert "must differ" in rejected("odom_frame", "base_link")
    assert "valid TF frame" in rejected("base_frame", "/base_link")
    assert "below min_inliers" in rejected("query_count", 6)
    assert "read-only" in rejected("backend", "transformers")
    assert node.params["mode"] == "correspondence" and node.params["odom_frame"] == "odom"
    assert node.params.rejected == 6  # read-only is refused by rclpy itself, and counted too
    frames = list(_frames(sevenscenes, 3))
    for n, (_, msgs, _) in enumerate(frames[:2]):
        cam.publish(msgs)
        assert ros.spin_until(lambda: len(out["odom"]) == n + 1, 20)
    assert node.set_parameters([Parameter("mode", value="pose"), Parameter("odom_frame", value="odom_vlm")])[0].successful
    cam.publish(frames[2][1])
    assert ros.spin_until(lambda: len(out["odom"]) == 3, 20)
    last = out["odom"].messages[-1]
    assert last.header.frame_id == "odom_vlm"
    np.testing.assert_allclose(cv.pose_matrix(last.pose.pose), np.eye(4), atol=1e-12)  # a new trajectory
    assert node.last_update.status == "initialised"


def test_lost_frames_hold_the_pose_and_time_jumps_restart(ros, perception_nodes):
    faulty = FaultyBackend()
    node, client, cam, out = _start(ros, perception_nodes, engine=faulty, mode="pose", keyframe_interval=5)
    intr = Intrinsics.from_focal(160, 120, 150.0)
    rgb = textured(160, 120)
    depth = np.full((120, 160), 2.0)
    poses = [xyz_rotation_to_pose([0.05 * n, 0.0, 0.0], [0.0, 0.0, 0.0]) for n in range(5)]

    def send(t, pose, expected):
        cam.publish(FramePublisher.messages(t, rgb, intr, depth=depth, pose=pose))
        assert ros.spin_until(lambda: len(out["odom"]) == expected, 15)
        return out["odom"].messages[-1]

    send(1.0, poses[0], 1)
    moved = send(1.1, poses[1], 2)
    assert np.linalg.norm(cv.pose_matrix(moved.pose.pose)[:3, 3]) == pytest.approx(0.05, abs=0.006)
    faulty.fault = "garbage"
    held = send(1.2, poses[2], 3)  # unparseable pose answers: the pose is held, covariance grows
    np.testing.assert_allclose(cv.pose_matrix(held.pose.pose), cv.pose_matrix(moved.pose.pose), atol=1e-12)
    assert np.trace(np.array(held.pose.covariance).reshape(6, 6)) > np.trace(np.array(moved.pose.covariance)
                                                                            .reshape(6, 6)) + 0.05
    assert node.stats.snapshot()["rejected"]["pose_lost"] == 1 and node.stats.snapshot()["parse_failures"] == 1
    node.set_parameters([Parameter("publish_on_failure", value=False)])
    cam.publish(FramePublisher.messages(1.3, rgb, intr, depth=depth, pose=poses[3]))
    assert ros.spin_until(lambda: node.stats.snapshot()["rejected"]["pose_lost"] == 2, 15)
    ros.spin_until(lambda: False, 0.2)
    assert len(out["odom"]) == 3  # nothing published for it
    faulty.fault = None
    # Measured against the keyframe again: the motion of the lost frames is not lost.
    back = send(1.4, poses[4], 4)
    assert np.linalg.norm(cv.pose_matrix(back.pose.pose)[:3, 3]) == pytest.approx(0.2, abs=0.006)
    # The bag starts again: every stream's stamps go back, the trajectory restarts at the origin with the
    # new timeline's first frame (a stream is only taken as restarted from its second message back).
    cam.publish(FramePublisher.messages(0.2, rgb, intr, depth=depth, pose=poses[2]))
    cam.publish(FramePublisher.messages(0.3, rgb, intr, depth=depth, pose=poses[3]))
    assert ros.spin_until(lambda: out["odom"].with_stamp(0.3), 15)
    assert node.time_jumps == 1 and sum(node.sync.counters.late.values()) == 0
    assert node.sync.counters.paired == 7  # frame 0.2 paired too (newest wins may skip it in the worker)
    first = (out["odom"].with_stamp(0.2) or out["odom"].with_stamp(0.3))[0]
    np.testing.assert_allclose(cv.pose_matrix(first.pose.pose), np.eye(4), atol=1e-12)
    cam.publish(FramePublisher.messages(0.4, rgb, intr, depth=depth, pose=poses[4]))
    assert ros.spin_until(lambda: out["odom"].with_stamp(0.4), 15)
    start = 2 if out["odom"].with_stamp(0.2) else 3
    moved = cv.pose_matrix(out["odom"].messages[-1].pose.pose)[:3, 3]
    assert np.linalg.norm(moved) == pytest.approx(0.05 * (4 - start), abs=0.006)



def test_reset_service_restarts_the_trajectory_at_identity(ros, perception_nodes):
    from std_srvs.srv import Trigger

    from ros_client_helpers import call

    node, client, cam, out = _start(ros, perception_nodes, mode="pose")
    intr = Intrinsics.from_focal(160, 120, 150.0)
    depth = np.full((120, 160), 2.0)

    def send(t, x):
        cam.publish(FramePublisher.messages(t, textured(160, 120, seed=int(10 * t)), intr, depth=depth,
                                            pose=xyz_rotation_to_pose([x, 0.0, 0.0], [0.0, 0.0, 0.0])))
        assert ros.spin_until(lambda: out["odom"].with_stamp(t), 15)
        return cv.pose_matrix(out["odom"].with_stamp(t)[0].pose.pose)[:3, 3]

    send(1.0, 0.0)
    # Optical x is base_link's -y with the default extrinsic.
    np.testing.assert_allclose(send(1.1, 0.05), [0.0, -0.05, 0.0], atol=0.006)
    response = call(ros, client, Trigger, f"{node.get_fully_qualified_name()}/reset", Trigger.Request())
    assert response.success and "identity" in response.message
    np.testing.assert_allclose(send(1.2, 0.10), [0.0, 0.0, 0.0], atol=1e-12)  # restarted here
    np.testing.assert_allclose(send(1.3, 0.13), [0.0, -0.03, 0.0], atol=0.006)  # measured from the restart
    assert node.last_update.status != "lost"


def _along_x(step, count):
    """Intrinsics, image, depth and ``count`` poses moving ``step`` metres along the optical x axis."""
    poses = [xyz_rotation_to_pose([step * n, 0.0, 0.0], [0.0, 0.0, 0.0]) for n in range(count)]
    return Intrinsics.from_focal(160, 120, 150.0), textured(160, 120), np.full((120, 160), 2.0), poses


def _served(ros, cam, out, t, intr, rgb, depth, pose):
    """Publish a frame and wait for its odometry."""
    cam.publish(FramePublisher.messages(t, rgb, intr, depth=depth, pose=pose))
    assert ros.spin_until(lambda: out["odom"].with_stamp(t), 15), f"no odometry for {t}"


def test_a_late_message_is_dropped_and_the_trajectory_goes_on(ros, perception_nodes):
    """One CameraInfo stamped 1.5 s in the past: counted late; the next frame is served and the pose
    goes on (it used to be taken for a bag restart, losing that frame and resetting the pose)."""
    node, client, cam, out = _start(ros, perception_nodes, mode="pose", diagnostics_period=0.1)
    diagnostics = Collector(client, DiagnosticArray, "/diagnostics")
    intr, rgb, depth, poses = _along_x(0.045, 4)
    for n in range(3):
        _served(ros, cam, out, 5.0 + 0.1 * n, intr, rgb, depth, poses[n])
    late = FramePublisher.messages(5.2 - 1.5, rgb, intr)["camera_info"]
    cam.info.publish(late)
    _served(ros, cam, out, 5.3, intr, rgb, depth, poses[3])  # the frame after the late message is not lost
    position = cv.pose_matrix(out["odom"].messages[-1].pose.pose)[:3, 3]
    assert np.linalg.norm(position) == pytest.approx(0.135, abs=0.006)  # not restarted at the origin
    assert node.time_jumps == 0 and node.sync.counters.late == {s: int(s == "camera_info") for s in node.streams}
    name = node.get_fully_qualified_name()
    assert ros.spin_until(lambda: (diagnostic_values(diagnostics, name) or {}).get("late.camera_info") == "1", 5)
    assert diagnostic_values(diagnostics, name)["time_jumps"] == "0"


def test_a_frame_older_than_the_keyframe_is_skipped_not_a_restart(ros, perception_nodes):
    node, client, cam, out = _start(ros, perception_nodes, mode="pose")
    intr, rgb, depth, poses = _along_x(0.05, 3)
    for n in range(2):
        _served(ros, cam, out, 2.0 + 0.1 * n, intr, rgb, depth, poses[n])
    assert node.worker.wait_idle(10)
    # A frame older than the keyframe reaching the odometry (the stream sync lets none through; the
    # odometry still refuses one): skipped and counted as late, the trajectory is kept.
    stale = FramePublisher.messages(1.95, rgb, intr, depth=depth, pose=poses[0])
    with pytest.raises(FrameRejected, match="not after the keyframe"):
        node.process(stale)
    _served(ros, cam, out, 2.2, intr, rgb, depth, poses[2])
    assert np.linalg.norm(cv.pose_matrix(out["odom"].messages[-1].pose.pose)[:3, 3]) == pytest.approx(0.1, abs=0.006)
    assert node.last_update.status == "tracking"


def test_a_model_without_the_tasks_of_its_mode_says_so_at_start(ros, perception_nodes, capfd):
    """The default model serves depth only: the odometry node's configure fails with an ERROR naming
    what the checkpoint serves; an unmanaged node raises it, a managed one stays unconfigured and
    counts no frame as dropped (it is not busy, its inputs are closed)."""
    depth_only = OracleBackend({"depth": TASKS["depth"]})
    backends = {t: depth_only for t in ("pose", "correspondence", "depth")}
    overrides = [Parameter("backend", value="oracle"), Parameter("mode", value="both")]
    with pytest.raises(NodeStartError, match="not served: pose .*serves depth"):
        OdometryNode(context=ros.context, parameter_overrides=overrides, backends=backends)
    node = perception_nodes(OdometryNode(context=ros.context, backends=backends,
                                         parameter_overrides=overrides + [Parameter("managed", value=True)]))
    assert node.trigger_configure() != TransitionCallbackReturn.SUCCESS
    assert node.lifecycle_state == "unconfigured" and "not served: pose" in node.start_error
    client = ros.node("camera")
    cam = FramePublisher(client)
    intr = Intrinsics.from_focal(160, 120, 150.0)
    for n in range(3):
        cam.publish(FramePublisher.messages(3.0 + 0.1 * n, textured(160, 120), intr, depth=np.full((120, 160), 2.0),
                                            pose=np.eye(4)))
    ros.spin_until(lambda: False, 0.5)
    assert node.worker.dropped == 0 and node.sync.counters.paired == 0
    err = capfd.readouterr().err
    assert "[ERROR]" in err and "odometry_node" in err and "not served: pose" in err and "serves depth" in err
