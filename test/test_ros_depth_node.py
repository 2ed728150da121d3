"""The depth node over real DDS (rclpy, loopback): geometry and headers of its outputs, oracle
mode against 7-Scenes ground truth, the tiny model, bad input, parameters and load."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")

from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import GetParameters, SetParameters  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

from ros_perception_helpers import (  # noqa: E402,F401  (perception_nodes is a fixture)
    CAMERA_FRAME,
    Collector,
    FaultyBackend,
    FramePublisher,
    GatedBackend,
    diagnostic_values,
    perception_nodes,
    plane_depth,
    stamp,
    textured,
)
from vlm3_ros import geometry as g  # noqa: E402
from vlm3_ros import msg_codec  # noqa: E402
from vlm3_ros.camera import Intrinsics  # noqa: E402
from vlm3_ros.pipeline import query_grid  # noqa: E402
from vlm3_ros.ros import backends  # noqa: E402
from vlm3_ros.ros.conversions import image_msg  # noqa: E402
from vlm3_ros.ros.depth_node import DepthNode  # noqa: E402


def _params(**values):
    return [Parameter(k, value=v) for k, v in values.items()]


def _setup(ros, start, engine=None, **params):
    params.setdefault("backend", "oracle")
    node = start(DepthNode(context=ros.context, backend=engine, parameter_overrides=_params(**params)))
    client = ros.node("camera")
    cam = FramePublisher(client)
    outputs = {
        "points": Collector(client, PointCloud2, "points"),
        "depth": Collector(client, Image, "depth/sparse"),
        "info": Collector(client, CameraInfo, "depth/camera_info"),
        "diagnostics": Collector(client, DiagnosticArray, "/diagnostics"),
    }
    if params.get("compressed_input"):
        assert ros.spin_until(lambda: cam.info.get_subscription_count() > 0, 15)
    else:
        assert cam.wait_matched(ros, reference=False)
    if params["backend"] == "oracle":
        assert ros.spin_until(lambda: cam.depth.get_subscription_count() > 0, 15)
    assert ros.spin_until(lambda: node.worker.state == "ready", 30), node.worker.error
    return node, client, cam, outputs


def test_cloud_and_sparse_depth_geometry(ros, perception_nodes):
    node, _, cam, out = _setup(ros, perception_nodes, query_count=40, query_margin=0.1)
    # fx != fy: the depth task first resamples to an ideal pinhole; outputs are in the original camera.
    intr = Intrinsics.from_K([[300.0, 0, 161.3], [0, 310.0, 118.7], [0, 0, 1]], 320, 240)
    depth = plane_depth(intr.K, 320, 240)
    msgs = FramePublisher.messages(12.25, textured(320, 240), intr, depth=depth, image_frame_id="ignored_frame")
    cam.publish(msgs)
    assert ros.spin_until(lambda: len(out["points"]) and len(out["depth"]) and len(out["info"]), 15)
    cloud, sparse, info = out["points"].messages[0], out["depth"].messages[0], out["info"].messages[0]
    for msg in (cloud, sparse, info):  # the image's stamp, the CameraInfo's frame
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (12, 250_000_000)
        assert msg.header.frame_id == CAMERA_FRAME
    assert [(f.name, f.datatype) for f in cloud.fields] == [(n, 7) for n in "xyzuv"]
    table = msg_codec.read_cloud(cloud)
    points = np.column_stack([table["x"], table["y"], table["z"]]).astype(float)
    uv = np.column_stack([table["u"], table["v"]]).astype(float)
    grid = query_grid(320, 240, 40, 0.1)
    assert len(points) == len(grid) and cloud.is_dense
    # u, v are the asked pixels (moved by the protocol's rounding only) ...
    assert np.abs(uv - grid).max() < 0.5
    # ... each point projects onto its u, v ...
    proj, z = g.project(points, intr.K)
    assert np.abs(proj - uv).max() < 0.5 and np.all(z > 0)
    # ... and its distance from the origin is the answered ray distance (2 decimals) of the plane.
    gt = g.z_to_ray(g.sample_nearest(depth, uv), uv, intr.K)
    assert np.abs(np.linalg.norm(points, axis=1) - gt).max() < 0.006
    # depth/sparse: 32FC1 in the original geometry, z at the answered pixels, NaN elsewhere.
    assert (sparse.encoding, sparse.width, sparse.height) == ("32FC1", 320, 240)
    image = msg_codec.decode_image(sparse)
    assert np.isfinite(image).sum() == len(points)
    cols, rows = np.round(uv[:, 0]).astype(int), np.round(uv[:, 1]).astype(int)
    np.testing.assert_allclose(image[rows, cols], points[:, 2], rtol=1e-6)
    assert list(info.k) == list(msgs["camera_info"].k) and (info.width, info.height) == (320, 240)


def test_oracle_cloud_matches_7scenes_ground_truth(ros, perception_nodes, sevenscenes):
    node, _, cam, out = _setup(ros, perception_nodes, query_count=64, publish_rgb=True)
    intr = Intrinsics.from_K(sevenscenes.intrinsics(), 640, 480)
    frame = sevenscenes.frame_ids[0]
    rgb, depth, _ = sevenscenes.load_frame(frame)
    cam.publish(FramePublisher.messages(3.0, rgb, intr, depth=depth))
    assert ros.spin_until(lambda: len(out["points"]), 20)
    table = msg_codec.read_cloud(out["points"].messages[0])
    points = np.column_stack([table["x"], table["y"], table["z"]]).astype(float)
    uv = np.column_stack([table["u"], table["v"]]).astype(float)
    assert len(points) >= 50  # a few pixels have no Kinect depth
    direct = g.backproject(uv, g.sample_nearest(depth, uv), intr.K)
    errors = np.linalg.norm(points - direct, axis=1)
    assert np.median(errors) < 0.01 and np.percentile(errors, 90) < 0.03
    colours = table["rgb"].view(np.uint32)
    expected = g.sample_nearest(rgb, uv).astype(np.uint32)
    np.testing.assert_array_equal(colours, (expected[:, 0] << 16) | (expected[:, 1] << 8) | expected[:, 2])


def test_tiny_model_publishes_headers_and_counts_unparseable_answers(ros, perception_nodes, tiny_backend,
                                                                     tiny_checkpoint):
    params = dict(backend="transformers", model=str(tiny_checkpoint), device="cpu", dtype="float32",
                  query_count=8, max_new_tokens=4)
    backends.register(backends.settings_from_params({**{"adapter": "", "max_batch": 64, "offline": True}, **params}),
                      tiny_backend)
    node, _, cam, out = _setup(ros, perception_nodes, **params)
    intr = Intrinsics.from_focal(96, 64, 1000.0)  # already at the depth task's focal length: small and fast
    cam.publish(FramePublisher.messages(7.5, textured(96, 64), intr))
    assert ros.spin_until(lambda: len(out["points"]) and len(out["depth"]), 60)
    cloud, sparse = out["points"].messages[0], out["depth"].messages[0]
    assert (cloud.header.stamp.sec, cloud.header.stamp.nanosec, cloud.header.frame_id) == (7, 500_000_000, CAMERA_FRAME)
    # Random weights answer nonsense: nothing parses, an empty cloud and an all-NaN depth image are published.
    assert cloud.width == 0 and [f.name for f in cloud.fields] == list("xyzuv")
    assert np.isnan(msg_codec.decode_image(sparse)).all() and (sparse.width, sparse.height) == (96, 64)
    stats = node.stats.snapshot()
    assert stats["parse_failures"] == len(query_grid(96, 64, 8)) and stats["rejected"] == {"no_valid_answers": 1}
    assert ros.spin_until(lambda: (diagnostic_values(out["diagnostics"], node.get_fully_qualified_name()) or {})
                          .get("parse_failures") == str(stats["parse_failures"]), 5)
    assert "transformers:" in diagnostic_values(out["diagnostics"], node.get_fully_qualified_name())["backend"]
    # An image shape the model cannot take (256:1) is an image fault found before the model, not a backend error.
    wide = Intrinsics.from_focal(4096, 16, 1000.0)
    cam.publish(FramePublisher.messages(8.0, textured(4096, 16), wide))
    assert ros.spin_until(lambda: node.stats.snapshot()["rejected"].get("image_size") == 1, 60)
    stats = node.stats.snapshot()
    assert "aspect ratio of 256:1" in stats["last_problem"] and "backend_error" not in stats["rejected"]


def test_compressed_input(ros, perception_nodes):
    import cv2
    from sensor_msgs.msg import CompressedImage

    node, client, cam, out = _setup(ros, perception_nodes, query_count=12, compressed_input=True)
    pub = client.create_publisher(CompressedImage, "image/compressed", cam.image.qos_profile)
    assert ros.spin_until(lambda: pub.get_subscription_count() > 0, 10)
    intr = Intrinsics.from_focal(160, 120, 150.0)
    msgs = FramePublisher.messages(4.0, textured(160, 120), intr, depth=np.full((120, 160), 1.5))
    ok, png = cv2.imencode(".png", textured(160, 120)[..., ::-1])
    compressed = CompressedImage(header=msgs["image"].header, format="png", data=png.tobytes())
    cam.depth.publish(msgs["reference_depth"])
    cam.info.publish(msgs["camera_info"])
    pub.publish(compressed)
    assert ros.spin_until(lambda: len(out["points"]), 15)
    table = msg_codec.read_cloud(out["points"].messages[0])
    assert len(table) == len(query_grid(160, 120, 12)) and np.allclose(table["z"], 1.5, atol=0.006)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` but whose pixel data is damaged (undecodable)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not deflate data") + chunk(b"IEND", b"")


def test_compressed_image_size_is_checked_from_the_header_before_decoding(ros, perception_nodes):
    from sensor_msgs.msg import CompressedImage

    node, client, cam, out = _setup(ros, perception_nodes, query_count=12, compressed_input=True,
                                    max_image_side=4096)
    pub = client.create_publisher(CompressedImage, "image/compressed", cam.image.qos_profile)
    assert ros.spin_until(lambda: pub.get_subscription_count() > 0, 10)
    intr = Intrinsics.from_focal(5000, 5000, 4000.0)
    msgs = FramePublisher.messages(4.0, np.zeros((1, 1, 3), np.uint8), Intrinsics.from_focal(1, 1, 1.0))
    msgs["camera_info"].width = msgs["camera_info"].height = 5000
    msgs["camera_info"].k = list(intr.K.reshape(-1))
    cam.depth.publish(FramePublisher.messages(4.0, textured(16, 16), Intrinsics.from_focal(16, 16, 10.0),
                                              depth=np.full((16, 16), 1.0))["reference_depth"])
    cam.info.publish(msgs["camera_info"])
    # A 5000 x 5000 PNG (its pixels would take 75 MB decoded): refused from its header, never decoded.
    pub.publish(CompressedImage(header=msgs["image"].header, format="png", data=_png_header(5000, 5000)))
    assert ros.spin_until(lambda: node.stats.snapshot()["rejected"], 15)
    stats = node.stats.snapshot()
    assert stats["rejected"] == {"image_size": 1}, stats
    assert "5000x5000 exceeds max_image_side 4096" in stats["last_problem"]


def test_oracle_holes_and_absurd_reference_depths_are_not_model_failures(ros, perception_nodes):
    """Pixels without a reference value (holes, values beyond max_depth) are counted as no_reference;
    diagnostics stay OK (they are not parse failures), the cloud holds the other pixels."""
    node, client, cam, out = _setup(ros, perception_nodes, query_count=16, max_depth=50.0, diagnostics_period=0.1)
    intr = Intrinsics.from_focal(160, 120, 150.0)
    depth = np.full((120, 160), 2.0, np.float32)
    depth[:, :50] = np.nan  # a hole
    depth[:, 110:] = 1e30  # an absurd reference value
    msgs = FramePublisher.messages(6.0, textured(160, 120), intr)
    msgs["reference_depth"] = image_msg(depth, "32FC1", msgs["image"].header)
    cam.publish(msgs)
    assert ros.spin_until(lambda: len(out["points"]), 15)
    uv = query_grid(160, 120, 16)
    inside = (uv[:, 0] >= 50) & (uv[:, 0] < 110)
    table = msg_codec.read_cloud(out["points"].messages[0])
    assert len(table) == inside.sum() and np.allclose(table["z"], 2.0, atol=0.006)
    stats = node.stats.snapshot()
    assert stats["parse_failures"] == 0 and stats["no_reference"] == (~inside).sum() and not stats["rejected"]
    name = node.get_fully_qualified_name()
    assert ros.spin_until(lambda: (diagnostic_values(out["diagnostics"], name) or {}).get("no_reference")
                          == str((~inside).sum()), 5)
    assert diagnostic_values(out["diagnostics"], name)["_level"] == 0


def test_bad_input_is_counted_and_the_next_good_frame_served(ros, perception_nodes):
    faulty = FaultyBackend()
    node, client, cam, out = _setup(ros, perception_nodes, engine=faulty, query_count=16, publish_empty=False,
                                    max_image_side=4096)
    intr = Intrinsics.from_focal(160, 120, 150.0)
    rgb, depth = textured(160, 120), np.full((120, 160), 2.0)
    t = [10.0]

    def good():
        t[0] += 1
        cam.publish(FramePublisher.messages(t[0], rgb, intr, depth=depth))
        expected = t[0]
        assert ros.spin_until(lambda: out["points"].with_stamp(expected), 15), f"good frame {expected} not served"

    def bad(kind, mutate=None, fault=None, **message_args):
        t[0] += 1
        msgs = FramePublisher.messages(t[0], message_args.pop("rgb", rgb), message_args.pop("intr", intr),
                                       depth=message_args.pop("depth", depth))
        if mutate:
            mutate(msgs)
        faulty.fault = fault
        before = node.stats.snapshot()["rejected"].get(kind, 0)
        cam.publish(msgs)
        assert ros.spin_until(lambda: node.stats.snapshot()["rejected"].get(kind, 0) == before + 1, 15), kind
        faulty.fault = None

    def unknown_encoding(m):
        m["image"].encoding = "yuv422"

    def short_data(m):
        m["image"].data = m["image"].data[: m["image"].step * 10]

    def zero_k(m):
        m["camera_info"].k = [0.0] * 9

    def nan_k(m):
        m["camera_info"].k = [float("nan"), 0.0, 80.0, 0.0, float("nan"), 60.0, 0.0, 0.0, 1.0]

    def info_size(m):
        m["camera_info"].width, m["camera_info"].height = 320, 240

    def huge(m):  # 20000 x 1 pixels, rejected from the header before any decoding
        img = m["image"]
        img.width, img.height, img.step = 20000, 1, 60000
        m["camera_info"].width, m["camera_info"].height = 20000, 1

    good()
    bad("bad_image", unknown_encoding)
    good()
    bad("bad_image", short_data)
    good()
    bad("bad_camera_info", zero_k)
    good()
    bad("bad_camera_info", nan_k)
    good()
    bad("camera_info_size", info_size)
    good()
    bad("image_size", rgb=np.zeros((1, 1, 3), np.uint8), intr=Intrinsics.from_focal(1, 1, 1.0),
        depth=np.full((1, 1), 2.0))
    good()
    bad("image_size", huge)
    good()
    bad("backend_error", fault="raise")
    good()
    bad("no_valid_answers", fault="garbage")
    good()
    # A CameraInfo stamped differently from its image never pairs: both expire and are counted.
    t[0] += 1
    msgs = FramePublisher.messages(t[0], rgb, intr, depth=depth)
    msgs["camera_info"].header.stamp = stamp(t[0] + 0.5)
    cam.publish(msgs)
    t[0] += 2
    good()
    stats = node.stats.snapshot()
    assert stats["rejected"] == {"bad_image": 2, "bad_camera_info": 2, "camera_info_size": 1, "image_size": 2,
                                 "backend_error": 1, "no_valid_answers": 1}
    assert stats["parse_failures"] == len(query_grid(160, 120, 16))  # every answer of the garbage frame
    assert node.sync.counters.unpaired["camera_info"] >= 1 and node.sync.counters.unpaired["image"] >= 1
    assert len(out["points"]) == 11 and node.worker.failed == 0
    name = node.get_fully_qualified_name()
    assert ros.spin_until(lambda: (diagnostic_values(out["diagnostics"], name) or {}).get("rejected.bad_image") == "2", 5)
    values = diagnostic_values(out["diagnostics"], name)
    assert values["rejected.backend_error"] == "1" and values["rejected.image_size"] == "2"
    assert values["unpaired.camera_info"] == str(node.sync.counters.unpaired["camera_info"])


def _set(ros, client, service, name, value):
    request = SetParameters.Request(parameters=[ParameterMsg(name=name, value=value)])
    future = service.call_async(request)
    assert ros.spin_until(future.done, 5)
    return future.result().results[0]


def _get(ros, service, name):
    future = service.call_async(GetParameters.Request(names=[name]))
    assert ros.spin_until(future.done, 5)
    return future.result().values[0]


def test_parameter_rejection_keeps_the_old_value(ros, perception_nodes):
    node, client, cam, out = _setup(ros, perception_nodes, query_count=16)
    set_srv = client.create_client(SetParameters, "/depth_node/set_parameters")
    get_srv = client.create_client(GetParameters, "/depth_node/get_parameters")
    assert set_srv.wait_for_service(timeout_sec=10) and get_srv.wait_for_service(timeout_sec=10)
    integer = ParameterType.PARAMETER_INTEGER
    result = _set(ros, client, set_srv, "query_count", ParameterValue(type=integer, integer_value=0))
    assert not result.successful and "out of range" in result.reason
    result = _set(ros, client, set_srv, "query_method", ParameterValue(type=ParameterType.PARAMETER_STRING,
                                                                       string_value="sift"))
    assert not result.successful and "'sift' is not one of grid, features" in result.reason
    result = _set(ros, client, set_srv, "backend", ParameterValue(type=ParameterType.PARAMETER_STRING,
                                                                  string_value="transformers"))
    assert not result.successful and "read-only" in result.reason
    result = _set(ros, client, set_srv, "sync_tolerance", ParameterValue(type=integer, integer_value=1))
    assert not result.successful
    assert _get(ros, get_srv, "query_count").integer_value == 16
    assert _get(ros, get_srv, "query_method").string_value == "grid"
    # Every refusal is counted, those rclpy makes from the descriptor (range, read-only, type) included.
    assert node.params.rejected == 4
    # min_image_side above max_image_side would refuse every image.
    assert _set(ros, client, set_srv, "max_image_side", ParameterValue(type=integer, integer_value=1000)).successful
    result = _set(ros, client, set_srv, "min_image_side", ParameterValue(type=integer, integer_value=2000))
    assert not result.successful and "larger than max_image_side 1000" in result.reason
    assert node.params.rejected == 5 and node.params["min_image_side"] == 16
    # A good value is accepted and used from the next frame on.
    result = _set(ros, client, set_srv, "query_count", ParameterValue(type=integer, integer_value=9))
    assert result.successful and _get(ros, get_srv, "query_count").integer_value == 9
    intr = Intrinsics.from_focal(160, 120, 150.0)
    cam.publish(FramePublisher.messages(1.0, textured(160, 120), intr, depth=np.full((120, 160), 3.0)))
    assert ros.spin_until(lambda: len(out["points"]), 15)
    assert out["points"].messages[0].width == len(query_grid(160, 120, 9)) == 9


def test_busy_backend_drops_frames_newest_wins_and_stays_responsive(ros, perception_nodes):
    gated = GatedBackend()
    node, client, cam, out = _setup(ros, perception_nodes, engine=gated, query_count=8, diagnostics_period=0.2)
    get_srv = client.create_client(GetParameters, "/depth_node/get_parameters")
    assert get_srv.wait_for_service(timeout_sec=10)
    intr = Intrinsics.from_focal(160, 120, 150.0)
    rgb, depth = textured(160, 120), np.full((120, 160), 2.5)
    cam.publish(FramePublisher.messages(1.0, rgb, intr, depth=depth))
    assert ros.spin_until(lambda: gated.calls == 1, 10)  # frame 1 is inside the model
    for n, t in enumerate((2.0, 3.0, 4.0)):
        cam.publish(FramePublisher.messages(t, rgb, intr, depth=depth))
        assert ros.spin_until(lambda: node.sync.counters.paired == n + 2, 10)
    assert node.worker.dropped == 2 and node.worker.busy
    # Parameters and diagnostics answer while the model is busy.
    assert _get(ros, get_srv, "query_count").integer_value == 8
    name = node.get_fully_qualified_name()
    assert ros.spin_until(lambda: (diagnostic_values(out["diagnostics"], name) or {}).get("dropped_busy") == "2", 5)
    values = diagnostic_values(out["diagnostics"], name)
    assert values["backend_state"] == "busy" and values["_level"] == 1  # WARN: frames dropped
    gated.gate.set()
    assert ros.spin_until(lambda: len(out["points"]) == 2, 10)
    ros.spin_until(lambda: False, 0.3)
    assert out["points"].stamps() == [1.0, 4.0]  # the newest pending frame won
    assert ros.spin_until(lambda: float((diagnostic_values(out["diagnostics"], name) or {})
                                        .get("latency_max_ms", "nan")) > 0, 5)


# ------------------------------------------------------------------------------------------------
# Dense outputs
# ------------------------------------------------------------------------------------------------


def _dense_setup(ros, perception_nodes, **params):
    node, client, cam, out = _setup(ros, perception_nodes, **params)
    out["dense"] = Collector(client, Image, "depth/dense")
    out["dense_info"] = Collector(client, CameraInfo, "depth/dense/camera_info")
    out["dense_points"] = Collector(client, PointCloud2, "points_dense")
    for pub in (node.dense_pub, node.dense_info_pub, node.dense_points_pub, node.points_pub):
        assert ros.spin_until(lambda: pub.get_subscription_count() > 0, 10), pub.topic_name
    return node, client, cam, out


def test_dense_depth_over_dds_matches_7scenes_ground_truth(ros, perception_nodes, sevenscenes):
    """The node's depth/dense in oracle mode, 256 questions (a third of them in the adaptive second
    round), against the full Kinect depth of real 7-Scenes frames: delta1 >= 0.975 and AbsRel <= 0.025,
    better than linear interpolation of the very answers the node published on `points`."""
    from vlm3_ros.completion import interpolate_linear

    node, client, cam, out = _dense_setup(ros, perception_nodes, query_count=256, query_margin=0.02,
                                          **{"dense.enabled": True, "dense.cloud": True, "dense.min_confidence": 0.0})
    intr = Intrinsics.from_K(sevenscenes.intrinsics(), 640, 480)
    frames = sevenscenes.frame_ids[::12]
    dense_sums, linear_sums = np.zeros(3), np.zeros(3)
    for k, frame in enumerate(frames):
        rgb, depth = sevenscenes.load_registered_rgb(frame), sevenscenes.load_depth(frame)
        t = 20.0 + k
        cam.publish(FramePublisher.messages(t, rgb, intr, depth=depth))
        assert ros.spin_until(lambda: out["dense"].with_stamp(t) and out["points"].with_stamp(t)
                              and out["dense_points"].with_stamp(t) and out["dense_info"].with_stamp(t), 60), frame
        dense_msg = out["dense"].with_stamp(t)[0]
        assert (dense_msg.encoding, dense_msg.width, dense_msg.height) == ("32FC1", 640, 480)
        assert dense_msg.header.frame_id == CAMERA_FRAME and out["dense_info"].with_stamp(t)[0].header.frame_id == CAMERA_FRAME
        dense = msg_codec.decode_image(dense_msg)
        assert np.isfinite(dense).all()  # confidence threshold 0: every pixel has a value
        table = msg_codec.read_cloud(out["points"].with_stamp(t)[0])
        assert len(table) > 0.85 * 256  # both rounds' answers (a few pixels have no Kinect depth)
        linear = interpolate_linear(np.column_stack([table["u"], table["v"]]), table["z"], 640, 480)
        valid = np.isfinite(depth)
        for sums, pred in ((dense_sums, dense), (linear_sums, linear)):
            p, g_ = pred[valid].astype(float), depth[valid].astype(float)
            sums += [np.sum(np.maximum(p / g_, g_ / p) < 1.25), np.sum(np.abs(p - g_) / g_), valid.sum()]
        # points_dense: every 4th pixel of depth/dense, back-projected.
        cloud = msg_codec.read_cloud(out["dense_points"].with_stamp(t)[0])
        assert [f.name for f in out["dense_points"].with_stamp(t)[0].fields] == ["x", "y", "z"]
        assert len(cloud) == (640 // 4) * (480 // 4)
        xyz = np.column_stack([cloud["x"], cloud["y"], cloud["z"]]).astype(float)
        uv, z = g.project(xyz, intr.K)
        np.testing.assert_allclose(uv, np.round(uv), atol=1e-3)
        np.testing.assert_allclose(z, dense[np.round(uv[:, 1]).astype(int), np.round(uv[:, 0]).astype(int)], rtol=1e-5)
    d1, absrel = dense_sums[0] / dense_sums[2], dense_sums[1] / dense_sums[2]
    l1, lrel = linear_sums[0] / linear_sums[2], linear_sums[1] / linear_sums[2]
    assert d1 >= 0.975 and absrel <= 0.025, (d1, absrel)
    assert d1 > l1 and absrel < lrel, ((d1, absrel), (l1, lrel))


def test_dense_outputs_are_off_by_default_and_follow_their_parameters(ros, perception_nodes):
    node, client, cam, out = _dense_setup(ros, perception_nodes, query_count=40, query_margin=0.02)
    set_srv = client.create_client(SetParameters, "/depth_node/set_parameters")
    assert set_srv.wait_for_service(timeout_sec=10)
    intr = Intrinsics.from_K([[300.0, 0, 161.3], [0, 310.0, 118.7], [0, 0, 1]], 320, 240)
    depth = plane_depth(intr.K, 320, 240)
    box = (slice(90, 170), slice(120, 230))
    depth[box] *= 0.6  # a box in front of the plane: a depth step
    cam.publish(FramePublisher.messages(1.0, textured(320, 240), intr, depth=depth))
    assert ros.spin_until(lambda: len(out["points"]), 15)
    ros.spin_until(lambda: False, 0.3)
    assert len(out["dense"]) == 0 and len(out["dense_points"]) == 0  # off by default: no completion, no round 2
    assert out["points"].messages[0].width == len(query_grid(320, 240, 40, 0.02))
    boolean = ParameterType.PARAMETER_BOOL
    assert _set(ros, client, set_srv, "dense.enabled", ParameterValue(type=boolean, bool_value=True)).successful
    result = _set(ros, client, set_srv, "dense.adaptive_share", ParameterValue(type=ParameterType.PARAMETER_DOUBLE,
                                                                                double_value=0.95))
    assert not result.successful and "out of range" in result.reason
    cam.publish(FramePublisher.messages(2.0, textured(320, 240), intr, depth=depth))
    assert ros.spin_until(lambda: out["dense"].with_stamp(2.0) and out["points"].with_stamp(2.0), 15)
    ros.spin_until(lambda: False, 0.3)
    assert len(out["dense_points"]) == 0
    # Both rounds: 40 questions in all, about 26 on the grid and the rest where the grid's completion is
    # least certain.
    assert out["points"].with_stamp(2.0)[0].width == 40
    dense = msg_codec.decode_image(out["dense"].with_stamp(2.0)[0])
    assert not np.isinf(dense).any()  # unknown is NaN, never +-Inf
    kept = np.isfinite(dense)
    assert 0.5 < kept.mean() < 0.95  # NaN where the confidence is below 0.5: around the box's outline
    assert kept[box][10:-10, 10:-10].mean() > 0.5 and kept[box][0, :].mean() < 0.5
    # (A corner of the box inside a triangle whose corners all lie on the wall cannot be seen.)
    assert np.mean(np.abs(dense[kept] / depth[kept] - 1) < 0.02) > 0.99
    assert list(out["dense_info"].with_stamp(2.0)[0].k) == list(intr.K.ravel())
    assert _set(ros, client, set_srv, "dense.cloud", ParameterValue(type=boolean, bool_value=True)).successful
    assert _set(ros, client, set_srv, "dense.cloud_step", ParameterValue(type=ParameterType.PARAMETER_INTEGER,
                                                                         integer_value=8)).successful
    cam.publish(FramePublisher.messages(3.0, textured(320, 240), intr, depth=depth))
    assert ros.spin_until(lambda: out["dense_points"].with_stamp(3.0) and out["dense"].with_stamp(3.0), 15)
    cloud = out["dense_points"].with_stamp(3.0)[0]
    assert cloud.header.frame_id == CAMERA_FRAME and cloud.is_dense
    table = msg_codec.read_cloud(cloud)
    xyz = np.column_stack([table["x"], table["y"], table["z"]]).astype(float)
    uv, z = g.project(xyz, intr.K)
    cols, rows = np.round(uv[:, 0]).astype(int), np.round(uv[:, 1]).astype(int)
    assert 0 < len(xyz) <= (320 // 8) * (240 // 8) and np.all(cols % 8 == 0) and np.all(rows % 8 == 0)
    assert np.mean(np.abs(z / depth[rows, cols] - 1) < 0.02) > 0.99  # on the plane or on the box
    assert len(xyz) == np.isfinite(msg_codec.decode_image(out["dense"].with_stamp(3.0)[0])[::8, ::8]).sum()
    name = node.get_fully_qualified_name()
    grid = len(query_grid(320, 240, 26, 0.02))  # about 26 on the grid; the second round makes up the 40
    assert ros.spin_until(lambda: (diagnostic_values(out["diagnostics"], name) or {}).get("dense_questions")
                          == f"{grid}+{40 - grid}", 5)
    kept = float(diagnostic_values(out["diagnostics"], name)["dense_kept"])
    assert kept == pytest.approx(np.isfinite(msg_codec.decode_image(out["dense"].with_stamp(3.0)[0])).mean(), abs=1e-3)
