"""The objects of synthetic scenes as a 2D detector would report them, with their exact 3D geometry.

Every object of a :class:`vlm3_ros.synthetic.Scene` that is not part of the room (its boxes, and
whatever other solids the generator places) is seen in a frame where the rays through the pixel
centres hit it first; its **detection** is the bounding box of those pixels (corner coordinates:
pixel ``(u, v)`` spans ``[u, u + 1) x [v, v + 1)``), class the object's kind (its ``type``:
``box`` ...), score 1 and id its name. Objects with fewer than ``min_pixels`` visible pixels
are not detected.

:func:`object_in_camera` gives an object's exact extent along the camera axes (from its corners),
the geometry the object questions' answers are checked against. :class:`ObjectFrames` yields
frames with their detections for :func:`vlm3_train.convert.convert_frames` (the object task), and
:func:`write_detections` adds them to a bag as ``vision_msgs/Detection2DArray``
(:func:`vlm3_train.synthetic.write_bag` with ``detections=True``).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from vlm3_ros.detections import DETECTION_ARRAY_TYPE, Detection, detection_array_msg

from .convert.options import DETECTIONS_TOPIC
from .synthetic import Rect, RgbdFrames, Scene, SyntheticSequence, _pixel_grid, camera_rays, cast_rays

__all__ = ["DETECTIONS_TOPIC", "MIN_PIXELS", "ObjectFrames", "frame_detections", "object_in_camera",
           "scene_objects", "write_detections"]

#: fewest visible pixels of a detected object
MIN_PIXELS = 30


def scene_objects(scene: Scene) -> List[Tuple[int, Any]]:
    """``(surface index, object)`` of the scene's objects: every surface but the room's rectangles."""
    return [(k, s) for k, s in enumerate(scene.surfaces) if not isinstance(s, Rect)]


def frame_detections(sequence: SyntheticSequence, i: int, *, min_pixels: int = MIN_PIXELS) -> List[Detection]:
    """The detections of frame ``i`` (see the module docstring), in scene order."""
    cam = sequence.intrinsics
    T = np.asarray(sequence.poses[i], dtype=np.float64)
    dirs = camera_rays(cam, _pixel_grid(cam.width, cam.height)[0]) @ T[:3, :3].T
    index = cast_rays(sequence.scene, T[:3, 3], dirs).index.reshape(cam.height, cam.width)
    out = []
    for k, obj in scene_objects(sequence.scene):
        rows, cols = np.nonzero(index == k)
        if rows.size < min_pixels:
            continue
        box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64)
        out.append(Detection(box, str(obj.name), [(str(obj.to_dict()["type"]), 1.0)]))
    return out


def object_in_camera(obj: Any, T_w_c: Any) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(lower, upper)`` corners of an object's extent along the camera's axes (optical frame,
    metres), from its corners; None for an object without corners."""
    if not hasattr(obj, "corners"):
        return None
    T = np.asarray(T_w_c, dtype=np.float64)
    local = (obj.corners() - T[:3, 3]) @ T[:3, :3]
    return local.min(axis=0), local.max(axis=0)


class ObjectFrames(RgbdFrames):
    """A sequence's frames as ``(stamp_ns, rgb, intrinsics, depth, T_w_c, detections)`` (the
    :class:`vlm3_train.synthetic.RgbdFrames` record and the frame's detections), rendered on
    access: the input of :func:`vlm3_train.convert.convert_frames` for the object task."""

    def __init__(self, sequence: SyntheticSequence, min_pixels: int = MIN_PIXELS) -> None:
        super().__init__(sequence)
        self.min_pixels = int(min_pixels)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        frame = super().__getitem__(i)
        return (*frame, frame_detections(self.sequence, i % len(self), min_pixels=self.min_pixels))


def write_detections(writer: Any, sequence: SyntheticSequence, i: int, topic: str = DETECTIONS_TOPIC) -> int:
    """Write frame ``i``'s detections to a :class:`vlm3_ros.bags.RgbdBagWriter` as a
    Detection2DArray stamped like the frame, in the writer's camera frame; returns how many."""
    found = frame_detections(sequence, i)
    stamp = int(sequence.stamps_ns[i])
    writer.write(topic, DETECTION_ARRAY_TYPE, stamp, detection_array_msg(writer.store, stamp, writer.camera_frame, found))
    return len(found)
