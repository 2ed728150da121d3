"""Message payload encoding/decoding on plain objects, real rclpy messages and rosbags messages."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from vlm3_ros import msg_codec as mc
from vlm3_ros.camera import Intrinsics


def _msg(**fields):
    return SimpleNamespace(**fields)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "16UC1", "32FC1"])
def test_encode_decode_round_trip(encoding):
    dtype, channels = mc.ENCODINGS[encoding]
    rng = np.random.default_rng(0)
    shape = (5, 7) + ((channels,) if channels > 1 else ())
    array = (rng.random(shape) * 200).astype(dtype)
    msg = _msg(**mc.encode_image(array, encoding))
    np.testing.assert_array_equal(mc.decode_image(msg), array)


def test_colour_conversions_to_rgb():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    bgr = rgb[..., ::-1]
    assert np.array_equal(mc.image_to_rgb(_msg(**mc.encode_image(bgr, "bgr8"))), rgb)
    bgra = np.concatenate([bgr, np.full((2, 3, 1), 9, np.uint8)], axis=2)
    assert np.array_equal(mc.image_to_rgb(_msg(**mc.encode_image(bgra, "bgra8"))), rgb)
    mono16 = np.array([[0, 65535]], np.uint16)
    assert mc.image_to_rgb(_msg(**mc.encode_image(mono16, "mono16"))).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_row_padding_and_big_endian():
    array = np.array([[1, 2, 3], [4, 5, 6]], np.uint16)
    padded = np.zeros((2, 4), np.uint16)
    padded[:, :3] = array
    msg = _msg(height=2, width=3, encoding="16UC1", step=8, data=padded.tobytes(), is_bigendian=0)
    np.testing.assert_array_equal(mc.decode_image(msg), array)
    big = _msg(height=2, width=3, encoding="16UC1", step=6, data=array.astype(">u2").tobytes(), is_bigendian=1)
    np.testing.assert_array_equal(mc.decode_image(big), array)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(encoding="yuv422", height=2, width=2, step=4, data=b"\0" * 8), "unsupported image encoding"),
        (dict(encoding="rgb8", height=2, width=2, step=6, data=b"\0" * 11), "needs 12"),
        (dict(encoding="rgb8", height=2, width=2, step=5, data=b"\0" * 12), "step 5 is smaller"),
        (dict(encoding="mono8", height=0, width=2, step=2, data=b""), "outside"),
        (dict(encoding="mono8", height=1, width=20000, step=20000, data=b"\0" * 20000), "outside"),
    ],
)
def test_bad_images_are_rejected_with_the_reason(fields, match):
    with pytest.raises(mc.MessageError, match=match):
        mc.decode_image(_msg(is_bigendian=0, **fields))


def test_depth_units():
    mm = np.array([[0, 1500], [65535, 1]], np.uint16)
    np.testing.assert_allclose(mc.depth_to_metres(_msg(**mc.encode_image(mm, "16UC1"))), [[np.nan, 1.5], [65.535, 0.001]])
    m = np.array([[np.nan, -1.0, 2.25]], np.float32)
    np.testing.assert_allclose(mc.depth_to_metres(_msg(**mc.encode_image(m, "32FC1"))), [[np.nan, np.nan, 2.25]])
    with pytest.raises(mc.MessageError, match="16UC1"):
        mc.depth_to_metres(_msg(**mc.encode_image(np.zeros((1, 1, 3), np.uint8), "rgb8")))


def test_compressed_images():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (255, 0, 0)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    assert np.array_equal(mc.compressed_to_array(_msg(format="png", data=png.tobytes())), rgb)
    with pytest.raises(mc.MessageError, match="could not be decoded"):
        mc.compressed_to_array(_msg(format="jpeg", data=b"not an image"))


def test_cloud_round_trip_with_colour():
    n = 100
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    uv = rng.uniform(0, 640, size=(n, 2)).astype(np.float32)
    colours = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
    fields = mc.cloud_fields({"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "u": uv[:, 0], "v": uv[:, 1]}, rgb=colours)
    assert fields["point_step"] == 24 and fields["width"] == n and fields["is_dense"]
    assert [f["name"] for f in fields["fields"]] == ["x", "y", "z", "u", "v", "rgb"]
    msg = _msg(fields=[_msg(**f) for f in fields["fields"]], **{k: v for k, v in fields.items() if k != "fields"})
    table = mc.read_cloud(msg)
    np.testing.assert_array_equal(np.stack([table["x"], table["y"], table["z"]], 1), xyz)
    np.testing.assert_array_equal(table["u"], uv[:, 0])
    packed = table["rgb"].view(np.uint32)
    np.testing.assert_array_equal((packed >> 16) & 255, colours[:, 0])
    np.testing.assert_array_equal(packed & 255, colours[:, 2])
    with pytest.raises(mc.MessageError, match="no field 'w'"):
        mc.read_cloud(msg, ["w"])


def test_camera_info_fields_round_trip():
    cam = Intrinsics.from_K(np.array([[500.0, 0, 320], [0, 505.0, 240], [0, 0, 1]]), 640, 480,
                            D=(0.1, -0.05, 0.001, 0.002, 0.0), distortion_model="plumb_bob")
    back = Intrinsics.from_camera_info(_msg(**mc.camera_info_fields(cam)))
    assert back == cam


def test_real_rclpy_messages():
    sensor_msgs = pytest.importorskip("sensor_msgs.msg")
    rgb = np.random.default_rng(2).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    msg = sensor_msgs.Image(**mc.encode_image(rgb, "rgb8"))
    assert np.array_equal(mc.image_to_rgb(msg), rgb)
    fields = mc.cloud_fields({"x": np.ones(3, np.float32), "y": np.zeros(3, np.float32), "z": np.arange(3, dtype=np.float32)})
    cloud = sensor_msgs.PointCloud2(
        height=fields["height"], width=fields["width"], is_bigendian=False, point_step=fields["point_step"],
        row_step=fields["row_step"], data=fields["data"], is_dense=fields["is_dense"],
        fields=[sensor_msgs.PointField(**f) for f in fields["fields"]],
    )
    np.testing.assert_array_equal(mc.read_cloud(cloud)["z"], [0, 1, 2])


def test_rosbags_messages():
    typestore = pytest.importorskip("rosbags.typesys").get_typestore(pytest.importorskip("rosbags.typesys").Stores.ROS2_HUMBLE)
    Image = typestore.types["sensor_msgs/msg/Image"]
    Header = typestore.types["std_msgs/msg/Header"]
    Time = typestore.types["builtin_interfaces/msg/Time"]
    depth = np.array([[1.0, 2.0]], np.float32)
    fields = mc.encode_image(depth, "32FC1")
    fields["data"] = np.frombuffer(fields["data"], np.uint8)
    msg = Image(header=Header(stamp=Time(sec=1, nanosec=2), frame_id="cam"), **fields)
    raw = typestore.serialize_cdr(msg, "sensor_msgs/msg/Image")
    back = typestore.deserialize_cdr(raw, "sensor_msgs/msg/Image")
    np.testing.assert_array_equal(mc.depth_to_metres(back), depth)
