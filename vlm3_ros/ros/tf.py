"""TF output and the base_link -> camera extrinsic.

With ``tf2_ros`` importable (a ROS 2 installation), transforms go through its broadcasters and the
extrinsic is looked up in the TF tree. Without it (PyPI installs), ``tf2_msgs/TFMessage`` is
published on ``/tf`` and ``/tf_static`` directly with the QoS tf2 uses (reliable; /tf_static
transient-local), and the extrinsic comes from the node's parameters. Without ``tf2_msgs``
either, TF output is unavailable and :attr:`TfBroadcaster.available` says why.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from .conversions import pose_matrix
from .qos import latched_qos

__all__ = ["ExtrinsicSource", "TfBroadcaster", "HAS_TF2_ROS", "HAS_TF2_MSGS"]

try:  # a ROS 2 installation
    import tf2_ros  # type: ignore[import-not-found]

    HAS_TF2_ROS = True
except Exception:  # noqa: BLE001 - not on PyPI
    tf2_ros = None
    HAS_TF2_ROS = False

try:
    from tf2_msgs.msg import TFMessage  # type: ignore[import-not-found]

    HAS_TF2_MSGS = True
except Exception:  # noqa: BLE001
    TFMessage = None
    HAS_TF2_MSGS = False

#: QoS of /tf as tf2_ros.TransformBroadcaster sets it.
TF_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.VOLATILE)


class TfBroadcaster:
    """Sends dynamic and static transforms (tf2_ros, else TFMessage publishers)."""

    def __init__(self, node: Any, *, prefer_tf2_ros: bool = True) -> None:
        self.node = node
        self.backend = "none"
        self.reason: Optional[str] = None
        self._static: Dict[Tuple[str, str], Any] = {}
        if prefer_tf2_ros and HAS_TF2_ROS:
            self._dynamic = tf2_ros.TransformBroadcaster(node)
            self._static_broadcaster = tf2_ros.StaticTransformBroadcaster(node)
            self.backend = "tf2_ros"
        elif HAS_TF2_MSGS:
            self._tf_pub = node.create_publisher(TFMessage, "/tf", TF_QOS)
            self._tf_static_pub = node.create_publisher(TFMessage, "/tf_static", latched_qos(1))
            self.backend = "tf2_msgs"
        else:
            self.reason = "neither tf2_ros nor tf2_msgs is importable; TF is not published"

    @property
    def available(self) -> bool:
        return self.backend != "none"

    def send(self, transforms: List[Any]) -> bool:
        """Publish dynamic transforms; False when TF output is unavailable."""
        if self.backend == "tf2_ros":
            self._dynamic.sendTransform(transforms)
        elif self.backend == "tf2_msgs":
            self._tf_pub.publish(TFMessage(transforms=list(transforms)))
        else:
            return False
        return True

    def send_static(self, transforms: List[Any]) -> bool:
        """Publish static transforms (all static transforms sent so far go out together, latched)."""
        for t in transforms:
            self._static[(t.header.frame_id, t.child_frame_id)] = t
        if self.backend == "tf2_ros":
            self._static_broadcaster.sendTransform(list(self._static.values()))
        elif self.backend == "tf2_msgs":
            self._tf_static_pub.publish(TFMessage(transforms=list(self._static.values())))
        else:
            return False
        return True

    def destroy(self) -> None:
        if self.backend == "tf2_msgs":
            self.node.destroy_publisher(self._tf_pub)
            self.node.destroy_publisher(self._tf_static_pub)


class ExtrinsicSource:
    """The static base_frame <- camera optical frame transform.

    From TF (``tf2_ros`` buffer and listener) when ``from_tf`` and tf2_ros is importable and the
    tree holds it; otherwise the configured transform. :attr:`source` says which was used last.
    """

    def __init__(self, node: Any, configured: np.ndarray, *, from_tf: bool) -> None:
        self.configured = np.asarray(configured, float)
        self.source = "parameter"
        self._buffer = None
        if from_tf and HAS_TF2_ROS:
            self._buffer = tf2_ros.Buffer()
            self._listener = tf2_ros.TransformListener(self._buffer, node, spin_thread=False)

    @property
    def uses_tf(self) -> bool:
        return self._buffer is not None

    def lookup(self, base_frame: str, camera_frame: str) -> np.ndarray:
        """base_frame <- camera_frame (latest), TF first when enabled, else the configured value."""
        if self._buffer is not None:
            try:
                from rclpy.time import Time

                stamped = self._buffer.lookup_transform(base_frame, camera_frame, Time())
                self.source = "tf"
                return pose_matrix(stamped.transform)
            except Exception:  # noqa: BLE001 - not (yet) in the tree: use the configured value
                pass
        self.source = "parameter"
        return self.configured
