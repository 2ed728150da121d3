"""Helpers for tests of the perception nodes over real DDS.

* :func:`start_node`: add a node created in the test's rclpy context to its executor; the
  ``perception_nodes`` fixture destroys them before the context shuts down.
* :class:`FramePublisher`: publishes camera frames (Image, CameraInfo, reference depth and pose)
  on the nodes' input topics, reliable (large images between processes need it, DESIGN.md).
* :class:`Collector`: keeps every message received on a topic.
* :func:`diagnostic_values`: the key/values of one node's latest /diagnostics status.
* :class:`GatedBackend` / :class:`FaultyBackend`: real :class:`~vlm3_ros.engine.Backend`
  implementations around the oracle that block until released, or raise / answer nonsense on
  request, to exercise load handling and fault handling deterministically.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pytest

from vlm3_ros import msg_codec
from vlm3_ros.camera import Intrinsics
from vlm3_ros.engine import EngineError, OracleBackend, Request, Response

CAMERA_FRAME = "camera_optical_frame"


def reliable(depth: int = 10):
    from vlm3_ros.ros.qos import stream_qos

    return stream_qos("reliable", depth)


def stamp(seconds: float):
    from builtin_interfaces.msg import Time

    sec = int(np.floor(seconds))
    return Time(sec=sec, nanosec=int(round((seconds - sec) * 1e9)))


@pytest.fixture
def perception_nodes(ros):
    """``start(node)`` adds a perception node to ``ros``'s executor; all are destroyed at teardown."""
    nodes: List[Any] = []

    def start(node: Any) -> Any:
        nodes.append(node)
        ros.executor.add_node(node)
        return node

    yield start
    for node in reversed(nodes):
        ros.executor.remove_node(node)
        node.destroy_node()


class FramePublisher:
    """Publishes camera frames on ``image``, ``camera_info``, ``reference_depth``, ``reference_pose``."""

    def __init__(self, node: Any, topics: Optional[Dict[str, str]] = None) -> None:
        """``topics`` maps image, camera_info, reference_depth, reference_pose to topic names
        (default: those names, relative)."""
        from geometry_msgs.msg import PoseStamped
        from sensor_msgs.msg import CameraInfo, Image

        names = {k: k for k in ("image", "camera_info", "reference_depth", "reference_pose")}
        names.update(topics or {})
        qos = reliable(10)
        self.image = node.create_publisher(Image, names["image"], qos)
        self.info = node.create_publisher(CameraInfo, names["camera_info"], qos)
        self.depth = node.create_publisher(Image, names["reference_depth"], qos)
        self.pose = node.create_publisher(PoseStamped, names["reference_pose"], qos)

    def wait_matched(self, ros: Any, reference: bool = False, timeout: float = 15.0) -> bool:
        pubs = [self.image, self.info] + ([self.depth, self.pose] if reference else [])
        return ros.spin_until(lambda: all(p.get_subscription_count() > 0 for p in pubs), timeout)

    @staticmethod
    def messages(t: float, rgb: np.ndarray, intrinsics: Intrinsics, *, depth: Optional[np.ndarray] = None,
                 pose: Optional[np.ndarray] = None, frame_id: str = CAMERA_FRAME,
                 image_frame_id: Optional[str] = None) -> Dict[str, Any]:
        from geometry_msgs.msg import PoseStamped

        from vlm3_ros.ros import conversions as cv

        st = stamp(t)
        out = {
            "image": cv.image_msg(rgb, "rgb8", cv.header(st, image_frame_id or frame_id)),
            "camera_info": cv.camera_info_msg(msg_codec.camera_info_fields(intrinsics), cv.header(st, frame_id)),
        }
        if depth is not None:
            mm = np.where(np.isfinite(depth), np.round(depth * 1000), 0).astype(np.uint16)
            out["reference_depth"] = cv.image_msg(mm, "16UC1", cv.header(st, frame_id))
        if pose is not None:
            tf = cv.transform_msg(pose, st, "map", frame_id).transform
            msg = PoseStamped(header=cv.header(st, "map"))
            msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (
                tf.translation.x, tf.translation.y, tf.translation.z)
            msg.pose.orientation = tf.rotation
            out["reference_pose"] = msg
        return out

    def publish(self, messages: Dict[str, Any]) -> None:
        """Publish a frame's messages (reference ones first, the image last)."""
        for key, pub in (("reference_pose", self.pose), ("reference_depth", self.depth),
                         ("camera_info", self.info), ("image", self.image)):
            if key in messages:
                pub.publish(messages[key])


class Collector:
    """Every message received on ``topic``."""

    def __init__(self, node: Any, msg_type: Any, topic: str, qos: Any = None) -> None:
        self.messages: List[Any] = []
        self._lock = threading.Lock()
        node.create_subscription(msg_type, topic, self._add, qos or reliable(50))

    def _add(self, msg: Any) -> None:
        with self._lock:
            self.messages.append(msg)

    def __len__(self) -> int:
        return len(self.messages)

    def stamps(self) -> List[float]:
        return [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for m in self.messages]

    def with_stamp(self, t: float) -> List[Any]:
        st = stamp(t)
        return [m for m in self.messages if (m.header.stamp.sec, m.header.stamp.nanosec) == (st.sec, st.nanosec)]


def diagnostic_values(collector: Collector, name: str) -> Optional[Dict[str, str]]:
    """Key/values (plus ``_level`` and ``_message``) of the latest status named ``name``."""
    for msg in reversed(collector.messages):
        for status in msg.status:
            if status.name == name:
                out = {kv.key: kv.value for kv in status.values}
                out["_level"] = int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else int(status.level)
                out["_message"] = status.message
                return out
    return None


def plane_depth(K: np.ndarray, width: int, height: int, normal=(0.1, -0.15, 1.0), offset: float = 2.0) -> np.ndarray:
    """z of the plane n . X = offset seen by a camera K."""
    uu, vv = np.meshgrid(np.arange(width), np.arange(height))
    rays = np.linalg.solve(K, np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)])).T
    return (offset / (rays @ np.asarray(normal, float))).reshape(height, width)


def textured(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(small, np.ones((8, 8, 1), np.uint8))[:height, :width])


class GatedBackend(OracleBackend):
    """The oracle, but every answer waits until :attr:`gate` is set (a slow model, made deterministic)."""

    name = "gated-oracle"

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.calls = 0

    def answer(self, request: Request) -> Response:
        self.calls += 1
        if not self.gate.wait(30):
            raise EngineError("gate never opened")
        return super().answer(request)


class FaultyBackend(OracleBackend):
    """The oracle, failing on request: ``fault`` None (answer), "raise" or "garbage"."""

    name = "faulty-oracle"

    def __init__(self) -> None:
        super().__init__()
        self.fault: Optional[str] = None

    def answer(self, request: Request) -> Response:
        if self.fault == "raise":
            raise EngineError("the model ran out of memory (injected)")
        response = super().answer(request)
        if self.fault == "garbage":
            response.answers = ["<think> hmm </think><answer> far-ish </answer>"] * len(response.answers)
        return response


def wait_for(ros: Any, predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    return ros.spin_until(predicate, timeout)
