"""rclpy messages <-> numpy arrays and core types.

Payloads go through :mod:`vlm3_ros.msg_codec` (vectorised, validated, no ROS import): this module
only wraps its field dicts into rclpy message classes and back. Colour images are decoded with
cv_bridge where it is importable; everything cv_bridge does not take (mono16, malformed
messages...) goes through msg_codec, whose errors name the problem. Without cv_bridge (PyPI
installs) msg_codec does it all.

Frame checks a node applies before inference raise :class:`FrameRejected` with a ``kind``
(the diagnostics counter) and a message naming the offending value.
"""

from __future__ import annotations

import array
import functools
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, PoseWithCovariance, Quaternion, Transform, TransformStamped, Twist, \
    TwistWithCovariance, Vector3
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from .. import msg_codec
from ..camera import CameraError, Intrinsics
from ..odometry import pose_to_xyz_quaternion

__all__ = [
    "FrameRejected",
    "HAS_CV_BRIDGE",
    "MAX_ASPECT_RATIO",
    "camera_info_msg",
    "check_image_size",
    "cloud_msg",
    "depth_metres",
    "header",
    "image_msg",
    "image_rgb",
    "image_size",
    "intrinsics_for",
    "odometry_msg",
    "pose_matrix",
    "stamp_ns",
    "stamp_seconds",
    "transform_msg",
]


class FrameRejected(ValueError):
    """A frame that cannot be served; ``kind`` names the diagnostics counter."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@functools.lru_cache(maxsize=1)
def _cv_bridge() -> Any:
    try:
        from cv_bridge import CvBridge  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - missing or broken (the PyPI package is a ROS 1 port)
        return None
    try:
        return CvBridge()
    except Exception:  # noqa: BLE001
        return None


HAS_CV_BRIDGE = _cv_bridge() is not None
_BRIDGE_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
#: Longest side / shortest side an image may have: the Qwen-VL image processors refuse anything
#: longer (``smart_resize``: "absolute aspect ratio must be smaller than 200").
MAX_ASPECT_RATIO = 200.0


# ------------------------------------------------------------------------------------------------
# Stamps and headers
# ------------------------------------------------------------------------------------------------


def stamp_ns(stamp: Any) -> int:
    """builtin_interfaces/Time (or a header) -> integer nanoseconds."""
    stamp = getattr(stamp, "stamp", stamp)
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def stamp_seconds(stamp: Any) -> float:
    return stamp_ns(stamp) * 1e-9


def header(stamp: Any, frame_id: str) -> Header:
    """A header carrying ``stamp`` (copied from the source message) and ``frame_id``."""
    return Header(stamp=Time(sec=int(stamp.sec), nanosec=int(stamp.nanosec)), frame_id=str(frame_id))


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def _bytes(data: bytes) -> array.array:
    out = array.array("B")
    out.frombytes(data)
    return out


def image_rgb(msg: Any, *, use_cv_bridge: Optional[bool] = None) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, mono16...) or CompressedImage -> RGB uint8.

    Raises :class:`FrameRejected` (kind ``bad_image``) naming the problem.
    """
    try:
        if hasattr(msg, "format") and not hasattr(msg, "encoding"):
            return msg_codec.compressed_to_array(msg)
        bridge = _cv_bridge() if use_cv_bridge in (None, True) else None
        if bridge is not None and str(msg.encoding) in _BRIDGE_ENCODINGS:
            try:
                rgb = np.asarray(bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
                if rgb.shape == (int(msg.height), int(msg.width), 3):
                    return np.ascontiguousarray(rgb, dtype=np.uint8)
            except Exception:  # noqa: BLE001 - msg_codec below names the problem
                pass
        return msg_codec.image_to_rgb(msg)
    except msg_codec.MessageError as exc:
        raise FrameRejected("bad_image", f"image: {exc}") from None


def image_size(msg: Any) -> tuple[int, int]:
    """``(width, height)`` of an Image or CompressedImage without decoding any pixel (kind ``bad_image``)."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        try:
            return msg_codec.compressed_size(msg)
        except msg_codec.MessageError as exc:
            raise FrameRejected("bad_image", f"image: {exc}") from None
    return int(msg.width), int(msg.height)


def depth_metres(msg: Any, max_depth: Optional[float] = None) -> np.ndarray:
    """Reference depth image (16UC1 mm or 32FC1 m) -> float32 metres along z, NaN unknown.

    Values beyond ``max_depth`` (metres) are unknown too: a reference is never trusted farther
    than the nodes use depths.
    """
    try:
        depth = msg_codec.depth_to_metres(msg)
    except msg_codec.MessageError as exc:
        raise FrameRejected("bad_reference_depth", f"reference depth: {exc}") from None
    if max_depth is not None:
        with np.errstate(invalid="ignore"):
            depth[depth > max_depth] = np.nan
    return depth


def image_msg(array_: np.ndarray, encoding: str, hdr: Header) -> Image:
    fields = msg_codec.encode_image(array_, encoding)
    return Image(header=hdr, height=fields["height"], width=fields["width"], encoding=fields["encoding"],
                 is_bigendian=int(fields["is_bigendian"]), step=fields["step"], data=_bytes(fields["data"]))


def check_image_size(width: int, height: int, *, min_side: int, max_side: int,
                     max_aspect: float = MAX_ASPECT_RATIO) -> None:
    """Reject images outside [min_side, max_side] pixels per side, or longer than ``max_aspect``
    times their width or height (kind ``image_size``)."""
    if width > max_side or height > max_side:
        raise FrameRejected("image_size", f"image {width}x{height} exceeds max_image_side {max_side}")
    if width < min_side or height < min_side:
        raise FrameRejected("image_size", f"image {width}x{height} is below min_image_side {min_side}")
    if max(width, height) > max_aspect * max(min(width, height), 1):
        raise FrameRejected("image_size", f"image {width}x{height} has an aspect ratio of "
                            f"{max(width, height) / max(min(width, height), 1):.0f}:1; the vision models take at "
                            f"most {max_aspect:.0f}:1")


def intrinsics_for(info: Any, width: int, height: int) -> Intrinsics:
    """Intrinsics from a CameraInfo that must describe a ``width`` x ``height`` image.

    Kinds: ``camera_info_size`` (CameraInfo for another size), ``bad_camera_info`` (zero, NaN or
    otherwise unusable calibration).
    """
    if (int(info.width), int(info.height)) != (int(width), int(height)):
        raise FrameRejected("camera_info_size",
                            f"camera_info is for {info.width}x{info.height} but the image is {width}x{height}")
    try:
        return Intrinsics.from_camera_info(info)
    except CameraError as exc:
        raise FrameRejected("bad_camera_info", f"camera_info: {exc}") from None


def camera_info_msg(fields: Mapping[str, Any], hdr: Header) -> CameraInfo:
    """CameraInfo from :func:`vlm3_ros.msg_codec.camera_info_fields` output."""
    return CameraInfo(header=hdr, height=fields["height"], width=fields["width"],
                      distortion_model=fields["distortion_model"], d=list(fields["d"]), k=list(fields["k"]),
                      r=list(fields["r"]), p=list(fields["p"]))


# ------------------------------------------------------------------------------------------------
# Clouds
# ------------------------------------------------------------------------------------------------


def cloud_msg(columns: Mapping[str, np.ndarray], hdr: Header, rgb: Optional[np.ndarray] = None) -> PointCloud2:
    """Unorganised PointCloud2 from float32 columns (built vectorised by msg_codec.cloud_fields)."""
    fields = msg_codec.cloud_fields({k: np.asarray(v, dtype=np.float32) for k, v in columns.items()}, rgb=rgb)
    return PointCloud2(
        header=hdr,
        height=fields["height"],
        width=fields["width"],
        fields=[PointField(name=f["name"], offset=f["offset"], datatype=f["datatype"], count=f["count"])
                for f in fields["fields"]],
        is_bigendian=bool(fields["is_bigendian"]),
        point_step=fields["point_step"],
        row_step=fields["row_step"],
        data=_bytes(fields["data"]),
        is_dense=bool(fields["is_dense"]),
    )


# ------------------------------------------------------------------------------------------------
# Poses, transforms, odometry
# ------------------------------------------------------------------------------------------------


def pose_matrix(pose: Any) -> np.ndarray:
    """geometry_msgs/Pose (or PoseStamped, or Transform) -> 4x4 matrix."""
    from scipy.spatial.transform import Rotation

    pose = getattr(pose, "pose", pose)
    if hasattr(pose, "position"):
        p, q = pose.position, pose.orientation
    else:
        p, q = pose.translation, pose.rotation
    quat = np.array([q.x, q.y, q.z, q.w], dtype=float)
    norm = float(np.linalg.norm(quat))
    if not np.isfinite(norm) or abs(norm - 1.0) > 1e-3:
        raise FrameRejected("bad_reference_pose", f"pose orientation is not a unit quaternion: {quat.tolist()}")
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat(quat / norm).as_matrix()
    T[:3, 3] = (p.x, p.y, p.z)
    if not np.all(np.isfinite(T)):
        raise FrameRejected("bad_reference_pose", f"pose position is not finite: {T[:3, 3].tolist()}")
    return T


def _transform(T: np.ndarray) -> Transform:
    t, q = pose_to_xyz_quaternion(T)
    return Transform(translation=Vector3(x=float(t[0]), y=float(t[1]), z=float(t[2])),
                     rotation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))


def transform_msg(T: np.ndarray, stamp: Any, parent: str, child: str) -> TransformStamped:
    """TransformStamped parent <- child (``T`` maps child coordinates into the parent frame)."""
    return TransformStamped(header=header(stamp, parent), child_frame_id=child, transform=_transform(T))


def odometry_msg(T: np.ndarray, covariance: np.ndarray, twist: Sequence[float], twist_covariance: np.ndarray,
                 stamp: Any, parent: str, child: str) -> Odometry:
    """nav_msgs/Odometry: pose of ``child`` in ``parent`` with covariance, twist in ``child``."""
    tr = _transform(T)
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = tr.translation.x, tr.translation.y, tr.translation.z
    pose.orientation = tr.rotation
    v = [float(x) for x in twist]
    twist_msg = Twist(linear=Vector3(x=v[0], y=v[1], z=v[2]), angular=Vector3(x=v[3], y=v[4], z=v[5]))
    return Odometry(
        header=header(stamp, parent),
        child_frame_id=child,
        pose=PoseWithCovariance(pose=pose, covariance=np.asarray(covariance, float).reshape(36).tolist()),
        twist=TwistWithCovariance(twist=twist_msg, covariance=np.asarray(twist_covariance, float).reshape(36).tolist()),
    )
