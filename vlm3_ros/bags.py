"""rosbag2 recordings of RGB-D streams: writing, reading and frame pairing, without ROS.

Built on the ``rosbags`` library (pure Python, sqlite3 and mcap storage), so bags can be made and
read on machines without a ROS install; ``rclpy`` reads the same bags (``vlm3-ros play``).

* :class:`RgbdBagWriter` writes camera frames (``rgb8`` Image, CameraInfo, depth Image, the
  ground-truth PoseStamped and a ``/tf`` transform, all with the frame's stamp) or any message,
  atomically: the bag appears at its path only when the writer closes without error.
* :func:`read_messages` yields every message of chosen topics, deserialised with the message
  definitions stored in the bag; :func:`read_raw` yields the CDR bytes.
* :func:`iter_rgbd_frames` pairs image, camera info, depth and pose by header stamp and yields
  numpy frames; unpaired and corrupt messages are counted in its ``summary`` instead of raising.
* :func:`bag_info` summarises a bag; :func:`pose_from_msg` turns a pose-like message into 4x4.

Stamps are integer nanoseconds. The bag's log time of every message written here is its header
stamp, so playback timing follows the frames' own timing.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

from . import msg_codec
from .camera import Intrinsics
from .geometry import GeometryError, make_pose, orthonormalize

__all__ = [
    "BagError",
    "BagMessage",
    "CAMERA_FRAME",
    "RawMessage",
    "RgbdBagWriter",
    "RgbdFrame",
    "RgbdFrameIterator",
    "RgbdSummary",
    "STORAGES",
    "TF_TOPIC",
    "TOPICS",
    "WORLD_FRAME",
    "nearest_stamp",
    "bag_info",
    "iter_rgbd_frames",
    "pose_from_msg",
    "read_messages",
    "read_raw",
    "typestore",
]

PathLike = Union[str, Path]

#: Default topics of an RGB-D recording (used by ``vlm3-ros bag``, ``vlm3-ros play``, the nodes'
#: configuration and the training package).
TOPICS: Dict[str, str] = dict(
    image="/camera/image_raw",
    camera_info="/camera/camera_info",
    depth="/camera/depth/image_raw",
    pose="/ground_truth/pose",
)
#: Topic of the world -> camera transforms written beside the poses.
TF_TOPIC = "/tf"
#: Frame of the images (REP-103 optical frame: x right, y down, z forward).
CAMERA_FRAME = "camera_optical_frame"
#: Fixed frame of the ground-truth poses.
WORLD_FRAME = "map"
#: Storage plugins that can be written.
STORAGES = ("sqlite3", "mcap")
#: rosbag2 metadata version written (8 is read by Humble and later; 9 only by Jazzy and later).
BAG_VERSION = 8
#: Depth encodings the writer produces.
DEPTH_ENCODINGS = ("16UC1", "32FC1")

ROLES = ("image", "camera_info", "depth", "pose")
_MAX_PROBLEMS = 20
_TYPES = dict(
    image="sensor_msgs/msg/Image",
    camera_info="sensor_msgs/msg/CameraInfo",
    depth="sensor_msgs/msg/Image",
    pose="geometry_msgs/msg/PoseStamped",
    tf="tf2_msgs/msg/TFMessage",
)


class BagError(ValueError):
    """A bag cannot be written or read as asked (names the path, topic or value at fault)."""


_TYPESTORE = None


def typestore() -> Any:
    """The ``rosbags`` typestore used to write messages (ROS 2 Jazzy definitions; the standard
    messages used here are identical in Humble, Jazzy and Kilted)."""
    global _TYPESTORE
    if _TYPESTORE is None:
        from rosbags.typesys import Stores, get_typestore

        _TYPESTORE = get_typestore(Stores.ROS2_JAZZY)
    return _TYPESTORE


def _storage_plugin(storage: str) -> Any:
    from rosbags.rosbag2 import StoragePlugin

    if storage not in STORAGES:
        raise BagError(f"unknown bag storage {storage!r}; expected one of {', '.join(STORAGES)}")
    return StoragePlugin.SQLITE3 if storage == "sqlite3" else StoragePlugin.MCAP


def _merge_topics(topics: Optional[Mapping[str, Optional[str]]]) -> Dict[str, Optional[str]]:
    merged: Dict[str, Optional[str]] = dict(TOPICS)
    for role, topic in (topics or {}).items():
        if role not in ROLES:
            raise BagError(f"unknown topic role {role!r}; expected some of {', '.join(ROLES)}")
        if topic is not None and (not isinstance(topic, str) or not topic.startswith("/")):
            raise BagError(f"topic for {role} must be an absolute name such as '/camera/x', got {topic!r}")
        merged[role] = topic
    return merged


def _split_stamp(stamp_ns: Any) -> Tuple[int, int]:
    if isinstance(stamp_ns, (bool, np.bool_)) or not isinstance(stamp_ns, (int, np.integer)):
        raise BagError(f"stamp_ns must be an integer number of nanoseconds, got {stamp_ns!r}")
    stamp_ns = int(stamp_ns)
    sec, nanosec = divmod(stamp_ns, 1_000_000_000)
    if not 0 <= sec < 2**31:
        raise BagError(f"stamp_ns {stamp_ns} is outside the ROS time range [0, 2^31 s)")
    return sec, nanosec


def _rotation_to_quat(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) with w >= 0 of the nearest rotation to ``R``."""
    from scipy.spatial.transform import Rotation

    quat = Rotation.from_matrix(orthonormalize(R)).as_quat()
    return -quat if quat[3] < 0 else quat


def _quat_to_rotation(x: float, y: float, z: float, w: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    q = np.array([x, y, z, w], dtype=np.float64)
    norm = float(np.linalg.norm(q))
    if not np.all(np.isfinite(q)) or norm < 1e-9:
        raise BagError(f"orientation quaternion (x, y, z, w) = {q.tolist()} is not a rotation")
    return Rotation.from_quat(q / norm).as_matrix()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class RgbdBagWriter:
    """Write an RGB-D recording (or any messages) to a rosbag2 directory, atomically.

    The bag is built in a temporary directory beside ``path`` and renamed into place when the
    writer closes without error (leaving the ``with`` block normally, or :meth:`close`). An
    exception inside the ``with`` block, or :meth:`abort`, removes everything written, so a bag
    at ``path`` is always complete.

    Args:
        path: the bag directory to create.
        storage: ``"sqlite3"`` (``.db3``) or ``"mcap"``.
        topics: topic per role (``image``, ``camera_info``, ``depth``, ``pose``); missing roles use
            :data:`TOPICS`, ``None`` disables a role.
        camera_frame: ``frame_id`` of images, camera info and depth, and ``child_frame_id`` of
            the transforms.
        world_frame: ``frame_id`` of the poses and parent of the transforms.
        overwrite: replace an existing bag at ``path`` (only once the new one is complete).
        depth_encoding: ``"16UC1"`` (millimetres, 0 = invalid; depths beyond 65.535 m are stored
            as invalid) or ``"32FC1"`` (metres, NaN = invalid).
        tf: also write each pose as a ``tf2_msgs/TFMessage`` on ``tf_topic``.
        tf_topic: topic of those transforms.
        store: a ``rosbags`` typestore for :meth:`write` of types outside the standard set.

    Raises:
        BagError: ``path`` exists and ``overwrite`` is false, or an option is invalid.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        storage: str = "sqlite3",
        topics: Optional[Mapping[str, Optional[str]]] = None,
        camera_frame: str = CAMERA_FRAME,
        world_frame: str = WORLD_FRAME,
        overwrite: bool = False,
        depth_encoding: str = "16UC1",
        tf: bool = True,
        tf_topic: str = TF_TOPIC,
        store: Any = None,
    ) -> None:
        from rosbags.rosbag2 import Writer

        self.path = Path(path)
        self.storage = storage
        plugin = _storage_plugin(storage)
        self.topics = _merge_topics(topics)
        if depth_encoding not in DEPTH_ENCODINGS:
            raise BagError(f"depth_encoding must be one of {DEPTH_ENCODINGS}, got {depth_encoding!r}")
        for name, value in (("camera_frame", camera_frame), ("world_frame", world_frame)):
            if not isinstance(value, str) or not value:
                raise BagError(f"{name} must be a non-empty frame id, got {value!r}")
        if not self.path.name or self.path.name in (".", ".."):
            raise BagError(f"bag path {str(path)!r} does not name a directory to create")
        if (self.path.exists() or self.path.is_symlink()) and not overwrite:
            raise BagError(f"{self.path} exists already; pass overwrite=True (--overwrite) to replace it")
        self.camera_frame = camera_frame
        self.world_frame = world_frame
        self.overwrite = overwrite
        self.depth_encoding = depth_encoding
        self.tf_topic: Optional[str] = tf_topic if tf else None
        self.store = store if store is not None else typestore()
        self.frames_written = 0
        self.counts: Dict[str, int] = defaultdict(int)
        self.first_stamp: Optional[int] = None
        self.last_stamp: Optional[int] = None

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent))
        # Whatever happens to this object, its temporary directory does not outlive it.
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._tmpdir), True)
        self._writer = Writer(self._tmpdir / self.path.name, version=BAG_VERSION, storage_plugin=plugin)
        self._writer.set_custom_data("vlm3_ros.camera_frame", camera_frame)
        self._writer.set_custom_data("vlm3_ros.world_frame", world_frame)
        try:
            self._writer.open()
        except Exception:
            self._cleanup()
            raise
        self._connections: Dict[str, Tuple[str, Any]] = {}
        self._state = "open"

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self) -> "RgbdBagWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def closed(self) -> bool:
        return self._state != "open"

    def _check_open(self) -> None:
        if self._state != "open":
            raise BagError(f"bag writer for {self.path} is {self._state}")

    # -- generic ------------------------------------------------------------------------------

    def _connection(self, topic: str, msgtype: str) -> Any:
        known = self._connections.get(topic)
        if known is not None:
            if known[0] != msgtype:
                raise BagError(f"topic {topic} already carries {known[0]}, cannot also write {msgtype}")
            return known[1]
        if not isinstance(topic, str) or not topic.startswith("/"):
            raise BagError(f"topic must be an absolute name such as '/camera/x', got {topic!r}")
        if msgtype not in self.store.types:
            raise BagError(f"message type {msgtype!r} is not in the typestore; pass store= with it registered")
        conn = self._writer.add_connection(topic, msgtype, typestore=self.store)
        self._connections[topic] = (msgtype, conn)
        return conn

    def write(self, topic: str, msgtype: str, stamp_ns: int, msg: Any) -> None:
        """Write one message (a ``rosbags`` message object, or CDR bytes) logged at ``stamp_ns``."""
        self._check_open()
        _split_stamp(stamp_ns)
        conn = self._connection(topic, msgtype)
        if isinstance(msg, (bytes, bytearray, memoryview)):
            data = bytes(msg)
        else:
            try:
                data = self.store.serialize_cdr(msg, msgtype)
            except Exception as exc:  # rosbags raises several types for a mistyped field
                raise BagError(f"cannot serialise the message for {topic} as {msgtype}: {exc}") from exc
        self._writer.write(conn, int(stamp_ns), data)
        self.counts[topic] += 1
        stamp = int(stamp_ns)
        self.first_stamp = stamp if self.first_stamp is None else min(self.first_stamp, stamp)
        self.last_stamp = stamp if self.last_stamp is None else max(self.last_stamp, stamp)

    # -- RGB-D frames -------------------------------------------------------------------------

    def _header(self, stamp_ns: int, frame_id: str) -> Any:
        T = self.store.types
        sec, nanosec = _split_stamp(stamp_ns)
        stamp = T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)
        return T["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)

    def _image(self, stamp_ns: int, array: np.ndarray, encoding: str) -> Any:
        fields = msg_codec.encode_image(array, encoding)
        fields["data"] = np.frombuffer(fields["data"], dtype=np.uint8)
        return self.store.types["sensor_msgs/msg/Image"](header=self._header(stamp_ns, self.camera_frame), **fields)

    def _camera_info(self, stamp_ns: int, intrinsics: Intrinsics) -> Any:
        T = self.store.types
        fields = msg_codec.camera_info_fields(intrinsics)
        for key in ("d", "k", "r", "p"):
            fields[key] = np.asarray(fields[key], dtype=np.float64)
        roi = T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
        return T["sensor_msgs/msg/CameraInfo"](header=self._header(stamp_ns, self.camera_frame), binning_x=0,
                                               binning_y=0, roi=roi, **fields)

    def _depth_array(self, depth_m: Any, shape: Optional[Tuple[int, int]]) -> np.ndarray:
        depth = np.asarray(depth_m)
        if depth.ndim == 3 and depth.shape[2] == 1:
            depth = depth[..., 0]
        if depth.ndim != 2 or depth.dtype.kind != "f":
            raise BagError(f"depth_m must be a 2D float array in metres, got {depth.dtype} {depth.shape}")
        if shape is not None and depth.shape != shape:
            raise BagError(f"depth image {depth.shape[1]}x{depth.shape[0]} differs from the camera's "
                           f"{shape[1]}x{shape[0]}")
        valid = np.isfinite(depth) & (depth > 0)
        if self.depth_encoding == "32FC1":
            return np.where(valid, depth, np.nan).astype(np.float32)
        mm = np.zeros(depth.shape, dtype=np.float64)
        np.multiply(depth, 1000.0, out=mm, where=valid)
        mm = np.rint(mm)
        mm[~valid | (mm > 65535)] = 0
        return mm.astype(np.uint16)

    def _pose_parts(self, T_w_c: Any) -> Tuple[Any, Any, Any]:
        T = np.asarray(T_w_c, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)) or not np.allclose(T[3], (0, 0, 0, 1)):
            raise BagError(f"T_w_c must be a finite 4x4 rigid transform with bottom row [0, 0, 0, 1], got {T.tolist()}")
        try:
            make_pose(T[:3, :3], T[:3, 3])
        except GeometryError as exc:
            raise BagError(f"T_w_c is not a rigid transform: {exc}") from exc
        qx, qy, qz, qw = _rotation_to_quat(T[:3, :3])
        types = self.store.types
        quat = types["geometry_msgs/msg/Quaternion"](x=float(qx), y=float(qy), z=float(qz), w=float(qw))
        tx, ty, tz = (float(v) for v in T[:3, 3])
        return tx, ty, tz, quat

    def write_frame(
        self,
        stamp_ns: int,
        *,
        rgb: Optional[np.ndarray] = None,
        intrinsics: Optional[Intrinsics] = None,
        depth_m: Optional[np.ndarray] = None,
        T_w_c: Optional[np.ndarray] = None,
    ) -> None:
        """Write one RGB-D frame; every part given gets the same header stamp ``stamp_ns``.

        ``rgb``: ``(H, W, 3)`` uint8 RGB -> ``rgb8`` Image. ``intrinsics`` -> CameraInfo.
        ``depth_m``: ``(H, W)`` float metres along z (NaN / <= 0 invalid) -> depth Image in the
        writer's ``depth_encoding``. ``T_w_c``: 4x4 camera-to-world pose -> PoseStamped of the
        camera optical frame in the world frame, and a world -> camera transform on ``/tf``.
        All parts are validated before anything is written, so a bad frame writes nothing.
        """
        self._check_open()
        _split_stamp(stamp_ns)
        if rgb is None and intrinsics is None and depth_m is None and T_w_c is None:
            raise BagError("write_frame needs at least one of rgb, intrinsics, depth_m, T_w_c")
        for role, value in (("image", rgb), ("camera_info", intrinsics), ("depth", depth_m), ("pose", T_w_c)):
            if value is not None and self.topics[role] is None:
                raise BagError(f"the {role} topic is disabled in this writer, yet a {role} was given")
        shape: Optional[Tuple[int, int]] = None
        if intrinsics is not None:
            if not isinstance(intrinsics, Intrinsics):
                raise BagError(f"intrinsics must be a vlm3_ros.camera.Intrinsics, got {type(intrinsics).__name__}")
            shape = (intrinsics.height, intrinsics.width)
        messages: List[Tuple[str, str, Any]] = []
        if rgb is not None:
            rgb = np.asarray(rgb)
            if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                raise BagError(f"rgb must be an (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
            if shape is not None and rgb.shape[:2] != shape:
                raise BagError(f"rgb image {rgb.shape[1]}x{rgb.shape[0]} differs from the intrinsics' "
                               f"{shape[1]}x{shape[0]}")
            shape = shape or rgb.shape[:2]
            messages.append((self.topics["image"], _TYPES["image"], self._image(stamp_ns, rgb, "rgb8")))
        if intrinsics is not None:
            info = self._camera_info(stamp_ns, intrinsics)
            messages.append((self.topics["camera_info"], _TYPES["camera_info"], info))
        if depth_m is not None:
            depth = self._depth_array(depth_m, shape)
            messages.append((self.topics["depth"], _TYPES["depth"], self._image(stamp_ns, depth, self.depth_encoding)))
        if T_w_c is not None:
            types = self.store.types
            tx, ty, tz, quat = self._pose_parts(T_w_c)
            pose = types["geometry_msgs/msg/Pose"](position=types["geometry_msgs/msg/Point"](x=tx, y=ty, z=tz),
                                                   orientation=quat)
            stamped_pose = types["geometry_msgs/msg/PoseStamped"](header=self._header(stamp_ns, self.world_frame),
                                                                  pose=pose)
            messages.append((self.topics["pose"], _TYPES["pose"], stamped_pose))
            if self.tf_topic is not None:
                transform = types["geometry_msgs/msg/Transform"](
                    translation=types["geometry_msgs/msg/Vector3"](x=tx, y=ty, z=tz), rotation=quat)
                stamped = types["geometry_msgs/msg/TransformStamped"](
                    header=self._header(stamp_ns, self.world_frame), child_frame_id=self.camera_frame,
                    transform=transform)
                messages.append((self.tf_topic, _TYPES["tf"], types["tf2_msgs/msg/TFMessage"](transforms=[stamped])))
        for topic, msgtype, msg in messages:
            self.write(topic, msgtype, stamp_ns, msg)
        self.frames_written += 1

    # -- finishing ----------------------------------------------------------------------------

    def close(self) -> Path:
        """Finish the bag and move it to ``path`` (replacing an old one if ``overwrite``)."""
        if self._state == "closed":
            return self.path
        self._check_open()
        try:
            self._writer.close()
            built = self._tmpdir / self.path.name
            if self.path.exists() or self.path.is_symlink():
                if not self.overwrite:
                    raise BagError(f"{self.path} appeared while the bag was being written; not overwriting it")
                old = self._tmpdir / (self.path.name + ".old")
                self.path.rename(old)
            built.rename(self.path)
        except BaseException:
            self._state = "aborted"
            self._cleanup()
            raise
        self._state = "closed"
        self._cleanup()
        return self.path

    def abort(self) -> None:
        """Discard everything written; nothing appears at ``path``."""
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            self._writer.abort()
        finally:
            self._cleanup()


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class BagMessage(NamedTuple):
    """One deserialised message: ``stamp_ns`` is the header stamp when the message has a header,
    else the log time. ``msg`` is a ``rosbags`` message built from the bag's own definitions."""

    topic: str
    msgtype: str
    stamp_ns: int
    msg: Any


class RawMessage(NamedTuple):
    """One message as stored: CDR bytes and the log (receive) time."""

    topic: str
    msgtype: str
    log_time_ns: int
    data: bytes


def _open_reader(path: PathLike) -> Any:
    from rosbags.highlevel import AnyReader, AnyReaderError

    path = Path(path)
    if not path.exists():
        raise BagError(f"no bag at {path}")
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        raise BagError(f"{path} is not a rosbag2 directory (no metadata.yaml)")
    try:
        reader = AnyReader([path], default_typestore=typestore())
        reader.open()
    except (AnyReaderError, OSError, KeyError, ValueError) as exc:
        raise BagError(f"cannot open bag {path}: {exc}") from exc
    except Exception as exc:  # storage back ends raise their own errors for damaged files
        raise BagError(f"cannot open bag {path}: {type(exc).__name__}: {exc}") from exc
    return reader


def _select(reader: Any, path: PathLike, topics: Optional[Collection[str]]) -> List[Any]:
    if topics is None:
        return list(reader.connections)
    if isinstance(topics, str):
        topics = [topics]
    present = {c.topic for c in reader.connections}
    missing = [t for t in topics if t not in present]
    if missing:
        raise BagError(f"bag {path} has no topic {', '.join(missing)}; it has {', '.join(sorted(present)) or 'none'}")
    wanted = set(topics)
    return [c for c in reader.connections if c.topic in wanted]


def _stamp_of(msg: Any, log_time_ns: int) -> int:
    stamp = getattr(getattr(msg, "header", None), "stamp", None)
    if stamp is None:
        return int(log_time_ns)
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _records(path: PathLike, topics: Optional[Collection[str]]) -> Iterator[tuple]:
    """(reader, connection, log time, raw bytes) of ``topics`` in log-time order; closes the bag."""
    reader = _open_reader(path)
    try:
        connections = _select(reader, path, topics)
        if connections:
            yield from ((reader, conn, log_time, data) for conn, log_time, data in reader.messages(connections=connections))
    finally:
        reader.close()


def read_raw(path: PathLike, topics: Optional[Collection[str]] = None) -> Iterator[RawMessage]:
    """Messages of ``topics`` (default: all) as stored, in log-time order.

    Raises :class:`BagError` for a missing or unreadable bag or a topic not in it.
    """
    for _, conn, log_time, data in _records(path, topics):
        yield RawMessage(conn.topic, conn.msgtype, int(log_time), bytes(data))


def read_messages(path: PathLike, topics: Optional[Collection[str]] = None) -> Iterator[BagMessage]:
    """Deserialised messages of ``topics`` (default: all) in log-time order.

    Messages are decoded with the definitions stored in the bag (standard definitions when a bag
    carries none). Raises :class:`BagError` for a missing bag, an unknown topic, or a message
    that cannot be decoded (naming topic and log time).
    """
    for reader, conn, log_time, data in _records(path, topics):
        try:
            msg = reader.deserialize(data, conn.msgtype)
        except Exception as exc:
            raise BagError(f"cannot decode {conn.msgtype} on {conn.topic} at log time {log_time}: {exc}") from exc
        yield BagMessage(conn.topic, conn.msgtype, _stamp_of(msg, log_time), msg)


def bag_info(path: PathLike) -> Dict[str, Any]:
    """Summary of a bag: ``path``, ``storage``, ``message_count``, ``start_ns``, ``end_ns``
    (log times of the first and last message), ``duration_ns``, ``duration_s`` and ``topics``
    (topic -> ``{"type", "count"}``)."""
    reader = _open_reader(path)
    try:
        topics = {name: {"type": info.msgtype, "count": int(info.msgcount)}
                  for name, info in sorted(reader.topics.items())}
        count = int(reader.message_count)
        start = int(reader.start_time) if count else 0
        # rosbags reports the end as one nanosecond after the last message.
        end = int(reader.end_time) - 1 if count else 0
        storage = _storage_name(Path(path))
    finally:
        reader.close()
    return {
        "path": str(path),
        "storage": storage,
        "message_count": count,
        "start_ns": start,
        "end_ns": end,
        "duration_ns": end - start,
        "duration_s": (end - start) / 1e9,
        "topics": topics,
    }


def _storage_name(path: Path) -> str:
    files = [path] if path.is_file() else list(path.iterdir())
    suffixes = {f.suffix for f in files}
    if ".mcap" in suffixes:
        return "mcap"
    if ".db3" in suffixes:
        return "sqlite3"
    return "unknown"


def nearest_stamp(stamps: np.ndarray, stamp_ns: int, tolerance_ns: int) -> Optional[int]:
    """Index of the stamp in sorted ``stamps`` nearest to ``stamp_ns``, or None when none is within
    ``tolerance_ns``."""
    if len(stamps) == 0:
        return None
    k = int(np.searchsorted(stamps, stamp_ns))
    best = min((i for i in (k - 1, k) if 0 <= i < len(stamps)), key=lambda i: abs(int(stamps[i]) - stamp_ns))
    return best if abs(int(stamps[best]) - stamp_ns) <= tolerance_ns else None


def pose_from_msg(msg: Any) -> np.ndarray:
    """4x4 pose of a ``PoseStamped``, ``PoseWithCovarianceStamped``, ``Odometry``,
    ``TransformStamped`` (or bare ``Pose`` / ``Transform``) message of any implementation.

    The quaternion is normalised; a zero or non-finite one raises :class:`BagError`.
    """
    obj = msg
    if hasattr(obj, "transform"):
        obj = obj.transform
    for _ in range(3):  # PoseStamped.pose, Odometry.pose.pose
        if hasattr(obj, "pose"):
            obj = obj.pose
    if hasattr(obj, "position") and hasattr(obj, "orientation"):
        p, q = obj.position, obj.orientation
    elif hasattr(obj, "translation") and hasattr(obj, "rotation"):
        p, q = obj.translation, obj.rotation
    else:
        raise BagError(f"{type(msg).__name__} is not a pose-like message (no pose, pose.pose or transform)")
    T = np.eye(4)
    T[:3, :3] = _quat_to_rotation(float(q.x), float(q.y), float(q.z), float(q.w))
    T[:3, 3] = (float(p.x), float(p.y), float(p.z))
    if not np.all(np.isfinite(T)):
        raise BagError(f"pose position {T[:3, 3].tolist()} is not finite")
    return T


# ---------------------------------------------------------------------------------------------
# RGB-D frames
# ---------------------------------------------------------------------------------------------


class RgbdFrame(NamedTuple):
    """One paired frame: ``rgb`` (H, W, 3) uint8, ``intrinsics``, ``depth_m`` (H, W) float32
    metres along z with NaN invalid (None when the bag has no depth topic), ``T_w_c`` 4x4
    camera-to-world (None when the bag has no pose topic)."""

    stamp_ns: int
    rgb: np.ndarray
    intrinsics: Intrinsics
    depth_m: Optional[np.ndarray]
    T_w_c: Optional[np.ndarray]


@dataclass
class RgbdSummary:
    """What :func:`iter_rgbd_frames` read (complete once the iteration has finished).

    ``messages``: messages read per topic; ``frames``: frames yielded; ``unpaired``: messages
    per topic that found no partner; ``corrupt``: messages per topic that could not be decoded
    (bad encoding, short data, bad camera info or pose); ``dropped_frames``: frames not yielded
    because one of their messages was corrupt or the parts disagree in size; ``problems``: the
    first few of those issues in words.
    """

    topics: Dict[str, str] = field(default_factory=dict)
    messages: Dict[str, int] = field(default_factory=dict)
    frames: int = 0
    unpaired: Dict[str, int] = field(default_factory=dict)
    corrupt: Dict[str, int] = field(default_factory=dict)
    dropped_frames: int = 0
    problems: List[str] = field(default_factory=list)

    @property
    def total_unpaired(self) -> int:
        return sum(self.unpaired.values())

    @property
    def total_corrupt(self) -> int:
        return sum(self.corrupt.values())

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.frames} frames, {self.total_unpaired} unpaired and {self.total_corrupt} corrupt messages, "
                f"{self.dropped_frames} frames dropped")

    def _problem(self, text: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(text)


class RgbdFrameIterator:
    """Iterator of :class:`RgbdFrame` returned by :func:`iter_rgbd_frames`; its :attr:`summary`
    (:class:`RgbdSummary`) counts what was paired, unpaired and corrupt.

    Two passes over the bag: the first reads only header stamps (from the CDR bytes) and pairs
    them; the second decodes the paired messages and yields frames in stamp order, holding only
    the frames still waiting for a part.
    """

    def __init__(self, path: PathLike, topics: Optional[Mapping[str, Optional[str]]] = None, *,
                 tolerance_ns: int = 0) -> None:
        self.path = Path(path)
        if isinstance(tolerance_ns, bool) or not isinstance(tolerance_ns, (int, np.integer)) or tolerance_ns < 0:
            raise BagError(f"tolerance_ns must be a non-negative integer, got {tolerance_ns!r}")
        self.tolerance_ns = int(tolerance_ns)
        wanted = _merge_topics(topics)
        self.summary = RgbdSummary()
        reader = _open_reader(self.path)
        try:
            types = {c.topic: c.msgtype for c in reader.connections}
            self.roles: Dict[str, str] = {}
            for role in ROLES:
                topic = wanted[role]
                if topic is None:
                    if role in ("image", "camera_info"):
                        raise BagError(f"the {role} topic cannot be disabled for RGB-D frames")
                    continue
                if topic not in types:
                    if role in ("image", "camera_info"):
                        raise BagError(f"bag {self.path} has no {role} topic {topic}; it has "
                                       f"{', '.join(sorted(types)) or 'no topics'}")
                    continue
                self._check_type(reader, role, topic, types[topic])
                self.roles[role] = topic
            self.summary.topics = dict(self.roles)
            self._types = types
            self._pair(reader)
        finally:
            reader.close()
        self._gen = self._frames()

    @staticmethod
    def _check_type(reader: Any, role: str, topic: str, msgtype: str) -> None:
        allowed = {
            "image": ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage"),
            "camera_info": ("sensor_msgs/msg/CameraInfo",),
            "depth": ("sensor_msgs/msg/Image",),
        }.get(role)
        if allowed is not None and msgtype not in allowed:
            raise BagError(f"{role} topic {topic} carries {msgtype}; expected {' or '.join(allowed)}")
        fields = reader.typestore.fielddefs.get(msgtype, ([], []))[1]
        if not fields or fields[0][0] != "header" or fields[0][1][1] != "std_msgs/msg/Header":
            raise BagError(f"{role} topic {topic} carries {msgtype}, which has no std_msgs/Header to pair frames by")

    def _pair(self, reader: Any) -> None:
        roles = self.roles
        role_of = {topic: role for role, topic in roles.items()}
        connections = [c for c in reader.connections if c.topic in role_of]
        stamps: Dict[str, List[int]] = {role: [] for role in roles}
        s = self.summary
        for topic in roles.values():
            s.messages[topic] = 0
            s.unpaired[topic] = 0
            s.corrupt[topic] = 0
        for conn, log_time, data in reader.messages(connections=connections):
            role = role_of[conn.topic]
            stamp = msg_codec.cdr_header_stamp(bytes(data[:12]))
            s.messages[conn.topic] += 1
            if stamp is None:
                s.corrupt[conn.topic] += 1
                s._problem(f"{conn.topic} message at log time {log_time}: damaged CDR header")
                stamp = -1
            stamps[role].append(stamp)
        self._stamps = {role: np.asarray(v, dtype=np.int64) for role, v in stamps.items()}

        image = self._stamps["image"]
        candidates = np.flatnonzero(image >= 0)
        # image ordinal -> partner ordinal per role (-1: none)
        partners: Dict[str, np.ndarray] = {}
        ok = np.ones(candidates.size, dtype=bool)
        for role in roles:
            if role == "image":
                continue
            other = self._stamps[role]
            valid = np.flatnonzero(other >= 0)
            # first message of each stamp, sorted by stamp
            order = valid[np.argsort(other[valid], kind="stable")]
            sorted_stamps = other[order]
            keep = np.ones(order.size, dtype=bool)
            keep[1:] = sorted_stamps[1:] != sorted_stamps[:-1]
            order, sorted_stamps = order[keep], sorted_stamps[keep]
            match = np.full(candidates.size, -1, dtype=np.int64)
            if order.size:
                want = image[candidates]
                right = np.clip(np.searchsorted(sorted_stamps, want), 0, order.size - 1)
                left = np.clip(right - 1, 0, order.size - 1)
                pick = np.where(np.abs(sorted_stamps[left] - want) <= np.abs(sorted_stamps[right] - want), left, right)
                close = np.abs(sorted_stamps[pick] - want) <= self.tolerance_ns
                match[close] = order[pick[close]]
            partners[role] = match
            ok &= match >= 0
        frame_images = candidates[ok]
        s.unpaired[roles["image"]] += int(candidates.size - frame_images.size)
        # frames in stamp order
        order = np.argsort(image[frame_images], kind="stable")
        frame_images = frame_images[order]
        columns = {"image": frame_images.tolist()}
        for role, match in partners.items():
            columns[role] = match[ok][order].tolist()
        self._frames_parts: List[Dict[str, int]] = [
            {role: column[k] for role, column in columns.items()} for k in range(frame_images.size)
        ]
        used = {role: set(column) for role, column in columns.items()}
        for role, topic in roles.items():
            if role == "image":
                continue
            valid_count = int((self._stamps[role] >= 0).sum())
            s.unpaired[topic] += valid_count - len(used[role])

    def _decode(self, reader: Any, role: str, msgtype: str, data: bytes) -> Any:
        msg = reader.deserialize(data, msgtype)
        if role == "image":
            if msgtype.endswith("CompressedImage"):
                return msg_codec.compressed_to_array(msg)
            rgb = msg_codec.image_to_rgb(msg)
            return rgb if rgb.flags.writeable else rgb.copy()
        if role == "camera_info":
            intrinsics = Intrinsics.from_camera_info(msg)
            if intrinsics.D and not any(intrinsics.D):
                # plumb_bob with all-zero coefficients (how CameraInfo spells "no distortion")
                intrinsics = dataclasses.replace(intrinsics, distortion_model="none", D=())
            return intrinsics
        if role == "depth":
            return msg_codec.depth_to_metres(msg)
        return pose_from_msg(msg)

    def _frames(self) -> Iterator[RgbdFrame]:
        s = self.summary
        frames = self._frames_parts
        if not frames:
            return
        needed: Dict[Tuple[str, int], List[int]] = defaultdict(list)
        for index, parts in enumerate(frames):
            for role, ordinal in parts.items():
                needed[(role, ordinal)].append(index)
        missing = [len(parts) for parts in frames]
        failed = [False] * len(frames)
        values: Dict[Tuple[str, int], Any] = {}
        refs = {key: len(indices) for key, indices in needed.items()}
        next_frame = 0
        ordinals: Dict[str, int] = defaultdict(int)
        role_of = {topic: role for role, topic in self.roles.items()}
        reader = _open_reader(self.path)
        try:
            connections = [c for c in reader.connections if c.topic in role_of]
            for conn, log_time, data in reader.messages(connections=connections):
                role = role_of[conn.topic]
                key = (role, ordinals[role])
                ordinals[role] += 1
                if key not in needed:
                    continue
                try:
                    values[key] = self._decode(reader, role, conn.msgtype, data)
                    ok = True
                except Exception as exc:  # any decoding failure makes the message corrupt
                    ok = False
                    s.corrupt[conn.topic] += 1
                    s._problem(f"{conn.topic} message at log time {log_time}: {exc}")
                for index in needed[key]:
                    missing[index] -= 1
                    failed[index] = failed[index] or not ok
                while next_frame < len(frames) and missing[next_frame] == 0:
                    frame = self._assemble(frames[next_frame], values, failed[next_frame])
                    for part in frames[next_frame].items():
                        refs[part] -= 1
                        if refs[part] == 0:
                            values.pop(part, None)
                    next_frame += 1
                    if frame is not None:
                        s.frames += 1
                        yield frame
                    else:
                        s.dropped_frames += 1
                if next_frame == len(frames):
                    break
        finally:
            reader.close()

    def _assemble(self, parts: Dict[str, int], values: Dict[Tuple[str, int], Any], failed: bool) -> Optional[RgbdFrame]:
        stamp = int(self._stamps["image"][parts["image"]])
        if failed:
            return None
        rgb = values[("image", parts["image"])]
        intrinsics: Intrinsics = values[("camera_info", parts["camera_info"])]
        depth = values.get(("depth", parts["depth"])) if "depth" in parts else None
        pose = values.get(("pose", parts["pose"])) if "pose" in parts else None
        size = (intrinsics.height, intrinsics.width)
        if rgb.shape[:2] != size:
            self.summary._problem(f"frame at {stamp}: image {rgb.shape[1]}x{rgb.shape[0]} but camera info "
                                  f"{size[1]}x{size[0]}")
            return None
        if depth is not None and depth.shape != size:
            self.summary._problem(f"frame at {stamp}: depth {depth.shape[1]}x{depth.shape[0]} but camera info "
                                  f"{size[1]}x{size[0]}")
            return None
        return RgbdFrame(stamp, rgb, intrinsics, depth, None if pose is None else pose.copy())

    def __iter__(self) -> "RgbdFrameIterator":
        return self

    def __next__(self) -> RgbdFrame:
        return next(self._gen)

    def __len__(self) -> int:
        """Frames paired by stamp (an upper bound: frames with a corrupt part are dropped)."""
        return len(self._frames_parts)


def iter_rgbd_frames(path: PathLike, topics: Optional[Mapping[str, Optional[str]]] = None, *,
                     tolerance_ns: int = 0) -> RgbdFrameIterator:
    """RGB-D frames of a bag, paired by header stamp, in stamp order.

    ``topics``: topic per role (``image``, ``camera_info``, ``depth``, ``pose``; default
    :data:`TOPICS`; ``None`` disables depth or pose). Image and camera info topics must be in
    the bag; depth and pose are paired when their topics are in it, and then every yielded
    frame has them. Each image is paired with the message of each other topic whose stamp is
    nearest, if within ``tolerance_ns`` (0: exact). Images without all partners, partners
    without an image, and messages that cannot be decoded are counted in the returned
    iterator's ``summary`` (:class:`RgbdSummary`), not raised.

    Raises :class:`BagError` for a missing bag, a missing image / camera info topic, or a topic
    of the wrong type.
    """
    return RgbdFrameIterator(path, topics, tolerance_ns=tolerance_ns)
