"""The ROS glue's building blocks without DDS: stamp pairing, the newest-wins worker, parameter
validation, QoS mapping and message conversions (rclpy message classes, no executor)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")

from builtin_interfaces.msg import Time  # noqa: E402
from rclpy.qos import ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage  # noqa: E402

from vlm3_ros import geometry as g  # noqa: E402
from vlm3_ros import msg_codec  # noqa: E402
from vlm3_ros.camera import Intrinsics  # noqa: E402
from vlm3_ros.odometry import xyz_rotation_to_pose  # noqa: E402
from vlm3_ros.ros import conversions as cv  # noqa: E402
from vlm3_ros.ros.params import DEPTH_NODE_PARAMS, ODOMETRY_NODE_PARAMS, Param, check_value  # noqa: E402
from vlm3_ros.ros.qos import HAS_BEST_AVAILABLE, reliability_policy, stream_qos  # noqa: E402
from vlm3_ros.ros.sync import StampSync  # noqa: E402
from vlm3_ros.ros.worker import LatestWorker  # noqa: E402

S = 1_000_000_000


# ------------------------------------------------------------------------------------------------
# Stamp pairing
# ------------------------------------------------------------------------------------------------


def test_exact_pairing_in_any_arrival_order():
    sync = StampSync(["image", "camera_info"])
    assert sync.add("camera_info", 2 * S, "info2") is None
    assert sync.add("image", 1 * S, "image1") is None
    assert sync.add("image", 2 * S, "image2") == {"image": "image2", "camera_info": "info2"}
    # image1 can never pair now (a newer set exists): dropped and counted.
    assert sync.counters.unpaired == {"image": 1, "camera_info": 0}
    # Older than the set already served: late, dropped at once (never a restart).
    assert sync.offer("camera_info", 1 * S, "info1").status == "late"
    assert sync.add("camera_info", 3 * S, "info3") is None
    assert sync.add("image", 3 * S, "image3") == {"image": "image3", "camera_info": "info3"}
    assert sync.counters.paired == 2 and sync.counters.late == {"image": 0, "camera_info": 1}
    assert sync.counters.unpaired == {"image": 1, "camera_info": 0} and sync.counters.time_jumps == 0
    assert sync.pending() == {"image": 0, "camera_info": 0}


def test_tolerance_picks_the_closest_and_expiry_counts_leftovers():
    sync = StampSync(["image", "camera_info", "reference_depth"], tolerance_ns=10_000_000, expiry_ns=S)
    sync.add("camera_info", 5 * S - 8_000_000, "info-8ms")
    sync.add("camera_info", 5 * S + 3_000_000, "info+3ms")
    sync.add("reference_depth", 5 * S, "depth")
    paired = sync.add("image", 5 * S, "image")
    assert paired == {"image": "image", "camera_info": "info+3ms", "reference_depth": "depth"}
    assert sync.counters.unpaired["camera_info"] == 1  # the older candidate went stale
    # A camera_info stamped 20 ms off never pairs, even within 10 ms: it waits until the streams it
    # lacks have moved on by more than the expiry.
    sync.add("camera_info", 6 * S + 20_000_000, "off info")
    sync.add("image", 6 * S, "image6")
    assert sync.add("reference_depth", 6 * S, "depth6") is None
    sync.add("image", 7 * S, "image7")  # 1 s later: not beyond the expiry yet
    assert sync.counters.unpaired == {"image": 0, "camera_info": 1, "reference_depth": 0}
    sync.add("image", 8 * S, "image8")  # 2 s later: "off info" and image7's lack of partners expired nothing
    # off info: image moved 2 s past it with no partner -> expired; image6 / depth6: camera_info never went
    # past 6.02 s, so they still wait for their camera_info (a lagging stream is waited for).
    assert sync.counters.unpaired == {"image": 0, "camera_info": 2, "reference_depth": 0}
    assert sync.pending() == {"image": 3, "camera_info": 0, "reference_depth": 1}
    assert sync.add("camera_info", 6 * S, "info6") == {"image": "image6", "camera_info": "info6",
                                                       "reference_depth": "depth6"}
    # camera_info and reference_depth at 9 s: image7 and image8 now lack partners that passed them.
    sync.add("reference_depth", 9 * S + 500_000_000, "depth9.5")
    sync.add("camera_info", 9 * S + 500_000_000, "info9.5")
    assert sync.pending()["image"] == 0 and sync.counters.unpaired["image"] == 2
    sync.configure(tolerance_ns=0)
    with pytest.raises(ValueError):
        sync.configure(expiry_ns=0)
    with pytest.raises(KeyError):
        sync.add("imu", 0, None)


def test_queue_size_bounds_each_stream_keeping_it_spread_over_time():
    sync = StampSync(["image", "camera_info"], queue_size=4, expiry_ns=100 * S)
    for i in range(13):
        sync.add("image", i * S, i)
    # The message closest to its older neighbour goes first: the queue keeps spanning the wait.
    assert sync.counters.unpaired["image"] == 9
    assert [m for _, _, m in sync._queues["image"]] == [0, 4, 8, 12]
    assert sync.add("camera_info", 8 * S, "info") == {"image": 8, "camera_info": "info"}
    assert sync.counters.unpaired["image"] == 11  # images 0 and 4 are older than the set served


def test_a_lagging_stream_is_waited_for_and_never_taken_for_a_time_jump():
    """camera_info 2.5 s behind the images (a busy machine, a delaying relay): every frame pairs."""
    sync = StampSync(["image", "camera_info"], expiry_ns=S, queue_size=40)
    paired = []
    for k in range(60):  # 10 Hz images; the info of frame k arrives with image k + 25
        sync.add("image", k * S // 10, f"image{k}")
        if k >= 25:
            got = sync.add("camera_info", (k - 25) * S // 10, f"info{k - 25}")
            paired.append(got["image"] if got else None)
    assert paired == [f"image{k}" for k in range(35)]
    assert sync.counters.time_jumps == 0 and sync.counters.late["camera_info"] == 0
    assert sync.counters.unpaired == {"image": 0, "camera_info": 0}
    # With the default queue the images waiting are thinned, not cut at the newest: frames still pair.
    small = StampSync(["image", "camera_info"], expiry_ns=S, queue_size=20)
    served = 0
    for k in range(60):
        small.add("image", k * S // 10, k)
        if k >= 25:
            served += small.add("camera_info", (k - 25) * S // 10, k - 25) is not None
    assert served >= 15 and small.counters.time_jumps == 0 and small.counters.late["camera_info"] == 0


def test_one_message_far_behind_is_late_and_the_next_frame_is_served():
    sync = StampSync(["image", "camera_info"], expiry_ns=S)
    for k in range(1, 6):
        assert sync.add("camera_info", k * S, k) is None and sync.add("image", k * S, k) is not None
    # A CameraInfo stamped 1.5 s in the past: held (it could be the start of a restart) ...
    assert sync.offer("camera_info", 3 * S + S // 2, "stale").status == "held"
    # ... and counted late when the stream goes on normally; the next frame is served, no restart.
    assert sync.add("camera_info", 6 * S, 6) is None
    assert sync.add("image", 6 * S, 6) == {"image": 6, "camera_info": 6}
    assert sync.counters.late == {"image": 0, "camera_info": 1} and sync.counters.time_jumps == 0
    assert sync.epoch == 0


def test_reordered_messages_are_late_not_jumps():
    sync = StampSync(["image", "camera_info"], expiry_ns=S)
    for k in range(10):
        sync.add("image", k * S // 10, k)
    order = [1, 3, 5, 0, 7, 2, 9, 4, 6, 8]  # delivered with 2-3 s of jitter: reordered within 0.9 s
    served = [k for k in order if sync.add("camera_info", k * S // 10, k) is not None]
    assert served == [1, 3, 5, 7, 9]
    assert sync.counters.late["camera_info"] == 5 and sync.counters.time_jumps == 0


def test_a_bag_played_again_is_one_time_jump():
    sync = StampSync(["image", "camera_info", "reference_depth"], expiry_ns=S)
    for k in range(30):
        for stream in ("reference_depth", "camera_info", "image"):
            sync.add(stream, 10 * S + k * S // 10, k)
    assert sync.counters.paired == 30 and sync.epoch == 0
    # The bag restarts at 10 s. Streams go back one after the other; a reference depth from before the
    # restart is still delivered after the first new images.
    offers = [sync.offer("image", 10 * S, "new0"), sync.offer("camera_info", 10 * S, "new0"),
              sync.offer("image", 10 * S + S // 10, "new1"), sync.offer("reference_depth", 13 * S, "old"),
              sync.offer("reference_depth", 10 * S, "new0")]
    assert [o.status for o in offers] == ["held", "held", "waiting", "stale", "paired"]
    assert offers[2].jumped and offers[4].epoch == 1
    assert offers[4].messages == {"image": "new0", "camera_info": "new0", "reference_depth": "new0"}
    # All streams at once (in-order delivery): the second message of the first stream completes frame 0.
    again = StampSync(["image", "camera_info"], expiry_ns=S)
    for k in (50, 51):
        again.add("camera_info", k * S, k)
        again.add("image", k * S, k)
    assert again.offer("camera_info", 1 * S, 1).status == "held" and again.offer("image", 1 * S, 1).status == "held"
    first = again.offer("camera_info", 2 * S, 2)
    assert first.jumped and first.messages == {"image": 1, "camera_info": 1} and first.epoch == 1
    for stream in ("reference_depth", "camera_info"):
        sync.add(stream, 10 * S + S // 10, "new1")
    assert sync.counters.paired == 32 and sync.counters.time_jumps == 1 and sync.epoch == 1
    assert sum(sync.counters.late.values()) == 0 and sync.counters.unpaired["reference_depth"] == 1


# ------------------------------------------------------------------------------------------------
# Worker
# ------------------------------------------------------------------------------------------------


def test_worker_keeps_only_the_newest_pending_item_and_survives_errors():
    gate = threading.Event()
    done = []

    def process(item):
        if item == "boom":
            raise RuntimeError("model exploded")
        gate.wait(5)
        done.append(item)

    errors = []
    worker = LatestWorker(process, on_error=lambda item, exc: errors.append((item, str(exc)))).start()
    worker.submit(1)
    deadline = time.monotonic() + 5
    while not worker.busy and time.monotonic() < deadline:
        time.sleep(0.001)
    assert worker.busy and worker.state == "busy"
    assert worker.submit(2) is False
    assert worker.submit(3) is True  # replaced 2
    assert worker.submit(4) is True  # replaced 3
    gate.set()
    assert worker.wait_idle(5)
    assert done == [1, 4] and worker.dropped == 2 and worker.processed == 2
    worker.submit("boom")
    assert worker.wait_idle(5)
    worker.submit(5)
    assert worker.wait_idle(5)
    assert errors == [("boom", "model exploded")] and worker.failed == 1 and done[-1] == 5
    assert worker.last_latency is not None and worker.last_latency >= 0
    assert worker.stop(2) and worker.state == "stopped"


def test_worker_setup_failure_is_reported_and_items_dropped():
    worker = LatestWorker(lambda item: None, setup=lambda: (_ for _ in ()).throw(OSError("no checkpoint at /x")))
    worker.start()
    deadline = time.monotonic() + 5
    while worker.state == "loading" and time.monotonic() < deadline:
        time.sleep(0.005)
    assert worker.state == "failed" and "no checkpoint at /x" in worker.error
    # Refused, not counted as dropped: the worker is not busy, it cannot serve at all.
    assert worker.submit("frame") is False and worker.dropped == 0 and worker.processed == 0
    worker.stop(1)


def test_throttle_is_per_kind_and_rates_follow_the_window():
    from vlm3_ros.ros.diagnostics import RateMeter, Throttle

    throttle = Throttle(period=0.2)
    assert throttle.ready("bad_image") and not throttle.ready("bad_image")
    assert throttle.ready("image_size")  # another kind is not throttled by the first
    time.sleep(0.25)
    assert throttle.ready("bad_image")
    meter = RateMeter(window=2.0)
    t0 = meter._start
    for k in range(20):  # 10 Hz for 2 s
        meter.tick(t0 + 5.0 + k * 0.1)
    assert meter.rate(t0 + 6.95) == pytest.approx(10.0, rel=0.05)
    assert meter.rate(t0 + 20.0) == 0.0  # old events leave the window


# ------------------------------------------------------------------------------------------------
# Parameters and QoS
# ------------------------------------------------------------------------------------------------


def test_parameter_checks_name_the_problem():
    by_name = {p.name: p for p in ODOMETRY_NODE_PARAMS}
    assert check_value(by_name["keyframe_interval"], 0) == "keyframe_interval = 0 is outside [1, 1000]"
    assert "write 1.0" in check_value(by_name["ransac_px"], 3)
    assert "not one of" in check_value(by_name["mode"], "lidar")
    assert "valid TF frame" in check_value(by_name["odom_frame"], "/odom")
    assert "must not be empty" in check_value(by_name["base_frame"], "")
    assert "3 or 4 values" in check_value(by_name["extrinsic_rotation"], [0.0, 1.0])
    assert "unit norm" in check_value(by_name["extrinsic_rotation"], [0.0, 0.0, 0.0, 2.0])
    assert check_value(by_name["extrinsic_rotation"], [0.0, 0.0, 0.0, 1.0]) is None
    assert "finite" in check_value(by_name["fusion_gate"], float("nan"))
    for param in DEPTH_NODE_PARAMS + ODOMETRY_NODE_PARAMS:
        assert check_value(param, param.default) is None, param.name
        d = param.descriptor()
        assert d.description and d.read_only == param.read_only
        if param.range is not None and param.kind == "int":
            assert (d.integer_range[0].from_value, d.integer_range[0].to_value) == param.range
    with pytest.raises(TypeError):
        Param("x", None, "no type").kind


def test_qos_mapping():
    expected = ReliabilityPolicy.BEST_AVAILABLE if HAS_BEST_AVAILABLE else ReliabilityPolicy.BEST_EFFORT
    assert reliability_policy("best_available") == expected
    assert stream_qos("reliable", 3).reliability == ReliabilityPolicy.RELIABLE and stream_qos("reliable", 3).depth == 3
    assert stream_qos("best_effort", 1).reliability == ReliabilityPolicy.BEST_EFFORT
    with pytest.raises(ValueError):
        reliability_policy("sometimes")
    with pytest.raises(ValueError):
        stream_qos("reliable", 0)


# ------------------------------------------------------------------------------------------------
# Conversions
# ------------------------------------------------------------------------------------------------


def _stamp():
    return Time(sec=1234, nanosec=567_000_000)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
def test_image_decoding_without_cv_bridge_matches_msg_codec(encoding):
    rng = np.random.default_rng(1)
    dtype, channels = msg_codec.ENCODINGS[encoding]
    shape = (6, 9) + ((channels,) if channels > 1 else ())
    array = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    msg = cv.image_msg(array, encoding, cv.header(_stamp(), "cam"))
    rgb = cv.image_rgb(msg, use_cv_bridge=False)
    assert rgb.shape == (6, 9, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, msg_codec.image_to_rgb(msg))
    if encoding == "bgr8":
        np.testing.assert_array_equal(rgb, array[..., ::-1])
    # The default path (cv_bridge when importable) gives the same pixels.
    np.testing.assert_array_equal(cv.image_rgb(msg), rgb)


def test_bad_images_and_camera_infos_are_rejected_with_a_kind():
    msg = cv.image_msg(np.zeros((4, 4, 3), np.uint8), "rgb8", cv.header(_stamp(), "cam"))
    msg.encoding = "yuv422"
    with pytest.raises(cv.FrameRejected, match="unsupported image encoding 'yuv422'") as err:
        cv.image_rgb(msg)
    assert err.value.kind == "bad_image"
    msg.encoding = "rgb8"
    msg.data = msg.data[:20]
    with pytest.raises(cv.FrameRejected, match="image data has 20 bytes"):
        cv.image_rgb(msg)
    compressed = CompressedImage(format="jpeg", data=b"not a jpeg")
    with pytest.raises(cv.FrameRejected, match="could not be decoded"):
        cv.image_rgb(compressed)
    info = cv.camera_info_msg(msg_codec.camera_info_fields(Intrinsics.from_focal(64, 48, 50.0)), cv.header(_stamp(), "c"))
    assert cv.intrinsics_for(info, 64, 48).fx == 50.0
    with pytest.raises(cv.FrameRejected, match="camera_info is for 64x48 but the image is 32x24") as err:
        cv.intrinsics_for(info, 32, 24)
    assert err.value.kind == "camera_info_size"
    info.k = [0.0] * 9
    with pytest.raises(cv.FrameRejected, match="camera_info: K is not of pinhole form") as err:
        cv.intrinsics_for(info, 64, 48)
    assert err.value.kind == "bad_camera_info"
    info.k = [float("nan")] * 9
    with pytest.raises(cv.FrameRejected, match="non-finite"):
        cv.intrinsics_for(info, 64, 48)
    with pytest.raises(cv.FrameRejected, match="exceeds max_image_side 100") as err:
        cv.check_image_size(101, 10, min_side=1, max_side=100)
    assert err.value.kind == "image_size"
    with pytest.raises(cv.FrameRejected, match="below min_image_side 16"):
        cv.check_image_size(1, 1, min_side=16, max_side=100)


def test_compressed_image_round_trip():
    import cv2

    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (255, 0, 0)
    ok, png = cv2.imencode(".png", rgb[..., ::-1])
    assert ok
    out = cv.image_rgb(CompressedImage(format="png", data=png.tobytes()))
    np.testing.assert_array_equal(out, rgb)


def test_cloud_depth_and_header_conversions():
    hdr = cv.header(_stamp(), "camera_optical_frame")
    points = np.array([[0.1, -0.2, 1.5], [0.3, 0.4, 2.5]], np.float32)
    cloud = cv.cloud_msg({"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "u": [1.0, 2.0], "v": [3.0, 4.0]},
                         hdr, rgb=np.array([[255, 0, 0], [0, 0, 255]], np.uint8))
    assert (cloud.header.stamp.sec, cloud.header.stamp.nanosec, cloud.header.frame_id) == \
        (1234, 567_000_000, "camera_optical_frame")
    table = msg_codec.read_cloud(cloud)
    np.testing.assert_array_equal(np.column_stack([table["x"], table["y"], table["z"]]), points)
    assert [f.name for f in cloud.fields] == ["x", "y", "z", "u", "v", "rgb"] and cloud.width == 2
    assert table["rgb"].view(np.uint32).tolist() == [0xFF0000, 0x0000FF]
    depth = np.full((3, 4), np.nan, np.float32)
    depth[1, 2] = 2.5
    msg = cv.image_msg(depth, "32FC1", hdr)
    np.testing.assert_array_equal(msg_codec.decode_image(msg), depth)
    assert cv.stamp_ns(msg.header) == 1234_567_000_000


def test_pose_transform_and_odometry_messages():
    T = xyz_rotation_to_pose([1.0, -2.0, 0.5], [0.3, -0.2, 1.1])
    tf = cv.transform_msg(T, _stamp(), "odom", "base_link")
    assert (tf.header.frame_id, tf.child_frame_id) == ("odom", "base_link")
    np.testing.assert_allclose(cv.pose_matrix(tf.transform), T, atol=1e-12)
    C = np.arange(36, dtype=float).reshape(6, 6)
    odom = cv.odometry_msg(T, C, [1, 2, 3, 4, 5, 6], 2 * C, _stamp(), "odom", "base_link")
    np.testing.assert_allclose(cv.pose_matrix(odom.pose.pose), T, atol=1e-12)
    assert list(odom.pose.covariance) == C.reshape(-1).tolist()
    assert (odom.twist.twist.linear.y, odom.twist.twist.angular.z) == (2.0, 6.0)
    bad = cv.transform_msg(T, _stamp(), "a", "b").transform
    bad.rotation.w = 5.0
    with pytest.raises(cv.FrameRejected, match="unit quaternion"):
        cv.pose_matrix(bad)
    np.testing.assert_allclose(g.invert_pose(cv.pose_matrix(tf.transform)) @ T, np.eye(4), atol=1e-12)
    info = cv.camera_info_msg(msg_codec.camera_info_fields(Intrinsics.from_focal(64, 48, 50.0)), cv.header(_stamp(), "c"))
    assert isinstance(info, CameraInfo) and info.k[0] == 50.0 and info.p[0] == 50.0
