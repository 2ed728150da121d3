"""2D detections without ROS: the :class:`Detection` record the object node and the training
converter share, read from a ``vision_msgs/Detection2DArray`` (an rclpy message or one
deserialised by ``rosbags``, which have the same fields), and written to rosbag2 bags.

A ``BoundingBox2D`` is read as centre +- size / 2 in pixel coordinates whose image spans
``[0, width] x [0, height]`` (corner coordinates, as detectors such as YOLO report boxes); a
rotated box (``theta`` != 0) is replaced by its axis-aligned bounds.

``vision_msgs`` is not among ``rosbags``' standard types: :func:`register_vision_types` adds its
definitions (the upstream ``.msg`` files this project builds ``vision_msgs`` from, or those of a
ROS installation) to a typestore, so bags holding detections can be read and written here.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "DETECTION_ARRAY_TYPE",
    "Detection",
    "detection_array_msg",
    "detections_from_msg",
    "register_vision_types",
    "vision_msg_dir",
]

DETECTION_ARRAY_TYPE = "vision_msgs/msg/Detection2DArray"
#: The vision_msgs messages a Detection2DArray needs (with their own dependencies).
_VISION_MESSAGES = ("Point2D", "Pose2D", "BoundingBox2D", "ObjectHypothesis", "ObjectHypothesisWithPose",
                    "Detection2D", "Detection2DArray")


@dataclass
class Detection:
    """One 2D detection: its box (corner coordinates), id and class hypotheses (class_id, score)."""

    box: np.ndarray
    id: str = ""
    hypotheses: List[Tuple[str, float]] = field(default_factory=list)

    @property
    def score(self) -> float:
        return max((s for _, s in self.hypotheses), default=1.0)

    @property
    def label(self) -> str:
        return max(self.hypotheses, key=lambda h: h[1])[0] if self.hypotheses else (self.id or "object")


def detections_from_msg(msg: Any) -> Tuple[List[Detection], List[str]]:
    """The detections of a Detection2DArray, and a reason for each one left out (bad box)."""
    out: List[Detection] = []
    bad: List[str] = []
    for k, det in enumerate(msg.detections):
        b = det.bbox
        cx, cy, theta = b.center.position.x, b.center.position.y, b.center.theta
        sx, sy = b.size_x, b.size_y
        if not all(math.isfinite(v) for v in (cx, cy, theta, sx, sy)) or sx <= 0 or sy <= 0:
            bad.append(f"detection {k} ({det.id or 'no id'}) has an empty or non-finite box")
            continue
        c, s = abs(math.cos(theta)), abs(math.sin(theta))
        hw, hh = (sx * c + sy * s) / 2, (sx * s + sy * c) / 2
        box = np.array([cx - hw, cy - hh, cx + hw, cy + hh])
        if not (box[2] > box[0] and box[3] > box[1]):  # a size lost in the centre's precision
            bad.append(f"detection {k} ({det.id or 'no id'}) has an empty box")
            continue
        hyps = [(str(r.hypothesis.class_id), float(r.hypothesis.score)) for r in det.results]
        out.append(Detection(box, str(det.id), hyps))
    return out, bad


def vision_msg_dir() -> Optional[Path]:
    """A directory holding the vision_msgs ``.msg`` definitions: this project's copy of the upstream
    files (a source checkout), else ``share/vision_msgs/msg`` of this environment or of an
    ament prefix (``AMENT_PREFIX_PATH``); None when there is none."""
    here = Path(__file__).resolve().parents[1] / "scripts" / "ros_interfaces" / "vision_msgs" / "msg"
    prefixes = [sys.prefix, *(p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p)]
    for candidate in [here, *(Path(p) / "share" / "vision_msgs" / "msg" for p in prefixes)]:
        if all((candidate / f"{name}.msg").is_file() for name in _VISION_MESSAGES):
            return candidate
    return None


def register_vision_types(store: Any) -> Any:
    """Add the vision_msgs detection types to a ``rosbags`` typestore (once); returns the store.

    Raises RuntimeError when no vision_msgs definitions are found (:func:`vision_msg_dir`)."""
    if DETECTION_ARRAY_TYPE in store.fielddefs:
        return store
    from rosbags.typesys import get_types_from_msg

    directory = vision_msg_dir()
    if directory is None:
        raise RuntimeError("the vision_msgs message definitions were not found (neither in this source tree's "
                           "scripts/ros_interfaces nor under share/vision_msgs of this environment or AMENT_PREFIX_PATH)")
    types: dict = {}
    for name in _VISION_MESSAGES:
        types.update(get_types_from_msg((directory / f"{name}.msg").read_text(), f"vision_msgs/msg/{name}"))
    store.register(types)
    return store


def detection_array_msg(store: Any, stamp_ns: int, frame_id: str, detections: Sequence[Detection]) -> Any:
    """A ``rosbags`` Detection2DArray message (axis-aligned boxes) for ``store`` (with the vision
    types registered), stamped ``stamp_ns``."""
    register_vision_types(store)
    T = store.types
    stamp = T["builtin_interfaces/msg/Time"](sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))
    header = T["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)
    out = []
    for det in detections:
        x1, y1, x2, y2 = (float(v) for v in det.box)
        centre = T["vision_msgs/msg/Pose2D"](position=T["vision_msgs/msg/Point2D"](x=(x1 + x2) / 2, y=(y1 + y2) / 2),
                                             theta=0.0)
        bbox = T["vision_msgs/msg/BoundingBox2D"](center=centre, size_x=x2 - x1, size_y=y2 - y1)
        results = []
        for class_id, score in det.hypotheses:
            pose = T["geometry_msgs/msg/PoseWithCovariance"](
                pose=T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=0.0, y=0.0, z=0.0),
                                                 orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0)),
                covariance=np.zeros(36, dtype=np.float64))
            results.append(T["vision_msgs/msg/ObjectHypothesisWithPose"](
                hypothesis=T["vision_msgs/msg/ObjectHypothesis"](class_id=str(class_id), score=float(score)), pose=pose))
        out.append(T["vision_msgs/msg/Detection2D"](header=header, results=results, bbox=bbox, id=str(det.id)))
    return T[DETECTION_ARRAY_TYPE](header=header, detections=out)
