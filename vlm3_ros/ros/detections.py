"""vision_msgs detections <-> the object core: 2D boxes in, Detection3DArray and RViz markers out.

Detections are read by :func:`vlm3_ros.detections.detections_from_msg` (re-exported here; the
training converter reads bags with it too).
"""

from __future__ import annotations

import colorsys
import zlib
from typing import Any, Sequence, Tuple

import numpy as np
from geometry_msgs.msg import Pose
from std_msgs.msg import ColorRGBA, Header
from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose
from visualization_msgs.msg import Marker, MarkerArray

from ..detections import Detection, detections_from_msg

__all__ = ["Detection", "detection3d_array", "detections_from_msg", "object_markers"]


def _pose(centre: Sequence[float]) -> Pose:
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in centre)
    pose.orientation.w = 1.0
    return pose


def detection3d_array(items: Sequence[Tuple[Detection, Any]], hdr: Header) -> Detection3DArray:
    """A Detection3DArray of (2D detection, :class:`~vlm3_ros.object_query.ObjectEstimate`) pairs:
    centre and size in the optical frame, the 2D detection's id and hypotheses (with the 3D pose)."""
    out = Detection3DArray(header=hdr)
    for det, est in items:
        d3 = Detection3D(header=hdr, id=det.id)
        d3.bbox.center = _pose(est.centre)
        d3.bbox.size.x, d3.bbox.size.y, d3.bbox.size.z = (float(v) for v in est.size)
        for class_id, score in det.hypotheses:
            hyp = ObjectHypothesisWithPose()
            hyp.hypothesis.class_id, hyp.hypothesis.score = class_id, score
            hyp.pose.pose = _pose(est.centre)
            d3.results.append(hyp)
        out.detections.append(d3)
    return out


def _colour(label: str, alpha: float) -> ColorRGBA:
    hue = (zlib.crc32(label.encode()) % 360) / 360.0  # stable per class
    r, g, b = colorsys.hsv_to_rgb(hue, 0.8, 0.95)
    return ColorRGBA(r=r, g=g, b=b, a=alpha)


def object_markers(items: Sequence[Tuple[Detection, Any]], hdr: Header) -> MarkerArray:
    """RViz markers: a DELETEALL (the previous frame's objects), then per object a translucent box
    and a label above it (class, score, distance along z)."""
    markers = [Marker(header=hdr, ns="objects", action=Marker.DELETEALL)]
    for k, (det, est) in enumerate(items):
        box = Marker(header=hdr, ns="objects", id=2 * k, type=Marker.CUBE, action=Marker.ADD)
        box.pose = _pose(est.centre)
        box.scale.x, box.scale.y, box.scale.z = (max(float(v), 0.01) for v in est.size)
        box.color = _colour(det.label, 0.35)
        text = Marker(header=hdr, ns="objects", id=2 * k + 1, type=Marker.TEXT_VIEW_FACING,
                      action=Marker.ADD)
        text.pose = _pose(est.centre - np.array([0.0, est.size[1] / 2 + 0.05, 0.0]))  # above it (y is down)
        text.scale.z = 0.08
        text.color = _colour(det.label, 1.0)
        score = f" {det.score:.2f}" if det.hypotheses else ""
        text.text = f"{det.label}{score} {float(est.centre[2]):.2f} m"
        markers += [box, text]
    return MarkerArray(markers=markers)
