"""rosbag2 RGB-D recordings -> VLM3 training samples (the dataset format of the training package).

Input: bags (sqlite3 or mcap, read with :mod:`vlm3_ros.bags`) holding ``sensor_msgs/Image`` +
``CameraInfo``, ground-truth depth from a depth image topic (``16UC1`` millimetres or ``32FC1``
metres) **or** from a LiDAR ``PointCloud2`` projected into the camera through a TF extrinsic
(``/tf_static`` or a given transform; z-buffered: the nearest point per pixel), and camera poses
from a ``PoseStamped`` / ``Odometry`` / ``TransformStamped`` topic or from TF. Messages are paired
by header stamp within a tolerance.

Output: a directory written atomically (built in a temporary sibling, renamed on success; a
failure or Ctrl-C leaves nothing at the target):

* ``data/``: a Hugging Face ``datasets`` directory, one row per sample with the columns ``task``,
  ``images`` (PNG, already prepared per the task spec), ``questions``, ``answers``, ``targets``
  (JSON numeric ground truth) and ``meta`` (JSON: source bag, stamps, prepared K and sizes, split);
* ``vlm3_protocol.json``: the task specs used;
* ``summary.json``: what was read, written and skipped, with reasons, and the arguments.

Tasks (labels are computed in the *prepared* image of each task, from the depth resampled with
:func:`vlm3_ros.camera.prepare_depth`):

* ``depth``: K pixels per image, sampled uniformly (seeded) among pixels with valid depth inside a
  border margin and a depth range; the label is the ray distance from the camera centre (or z, per
  the spec's ``depth_kind`` option) at the pixel the question's text coordinates refer to.
* ``correspondence``: frame pairs at the configured gaps; a pixel of image 1 is lifted with its
  depth, moved by the relative pose and projected into image 2; it is kept where frame 2's depth
  there agrees (occlusion check with a relative tolerance). K points per pair.
* ``pose``: the four pose questions for pairs whose covisibility (the fraction of frame-1 pixels
  with depth that project inside frame 2 and are not occluded there) reaches a threshold.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from vlm3_ros import geometry, protocol
from vlm3_ros.camera import Intrinsics, PreparedImage, prepare_depth, prepare_image
from vlm3_ros.protocol import TaskSpec

__all__ = [
    "ConvertError",
    "ConvertOptions",
    "ConvertResult",
    "DATASET_COLUMNS",
    "TASK_NAMES",
    "TfBuffer",
    "convert_bags",
    "convert_frames",
    "iter_samples",
    "correspondence_targets",
    "covisibility",
    "dataset_features",
    "depth_targets",
    "load_specs",
    "normalized_rays",
    "project_cloud",
    "project_points",
]

TASK_NAMES = ("depth", "correspondence", "pose")
DATASET_COLUMNS = ("task", "images", "questions", "answers", "targets", "meta")
DATASET_FORMAT = "vlm3-dataset"
DATASET_VERSION = 1
TF_TOPICS = ("/tf", "/tf_static")
_MAX_REASONS = 50


class ConvertError(ValueError):
    """A conversion request or input cannot be turned into a dataset (names the option or bag)."""


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclass
class ConvertOptions:
    """What :func:`convert_bags` produces and how it reads the bags.

    Attributes:
        tasks: task names to produce (``depth``, ``correspondence``, ``pose``).
        specs: task name -> spec (default: the built-in protocol specs).
        points_per_image: K depth questions per image.
        points_per_pair: K correspondence questions per frame pair.
        correspondence_gaps: frame index gaps of correspondence pairs.
        pose_gaps: frame index gaps of pose pairs.
        frame_stride: use every n-th paired frame.
        margin: border margin (fraction of the prepared image's width / height) kept free of
            labelled pixels (and of correspondence targets).
        min_depth, max_depth: labels outside this range (metres) are not used.
        occlusion_tolerance: relative depth tolerance of the occlusion check.
        min_covisibility: pose pairs need at least this covisibility.
        max_pairs_per_frame: cap on correspondence/pose pairs starting at one frame per task
            (0: no cap).
        topics: role -> topic (``image``, ``camera_info``, ``depth``, ``pose``; default
            :data:`vlm3_ros.bags.TOPICS`).
        cloud_topic: a PointCloud2 topic to take depth from instead of a depth image.
        lidar_extrinsic: 4x4 ``T_camera_lidar`` (lidar points -> camera optical frame); default:
            looked up in TF between the camera frame and the cloud's frame.
        pose_source: ``auto`` (pose topic if in the bag, else TF), ``topic``, ``tf`` or ``none``.
        camera_frame: the camera's optical frame in TF (default: the CameraInfo ``frame_id``).
        world_frame: the fixed frame of TF poses (default: the root of the camera's TF tree).
        pose_child_frame: the frame a pose topic describes when it is not the camera (an
            ``Odometry`` ``child_frame_id`` is used by default); composed with TF to the camera.
        tolerance_ns: stamp pairing tolerance (image <-> camera info / depth / pose / cloud / TF).
        split: ``none``, ``frame`` (the last ``val_fraction`` of each bag's frames) or ``bag``
            (the last ``val_fraction`` of the bags, at least one).
        val_fraction: fraction for the validation split.
        seed: sampling seed (results do not depend on processing order).
    """

    tasks: Tuple[str, ...] = TASK_NAMES
    specs: Optional[Dict[str, TaskSpec]] = None
    points_per_image: int = 10
    points_per_pair: int = 10
    correspondence_gaps: Tuple[int, ...] = (2, 5)
    pose_gaps: Tuple[int, ...] = (3, 8)
    frame_stride: int = 1
    margin: float = 0.03
    min_depth: float = 0.1
    max_depth: float = 80.0
    occlusion_tolerance: float = 0.05
    min_covisibility: float = 0.25
    max_pairs_per_frame: int = 0
    topics: Optional[Dict[str, Optional[str]]] = None
    cloud_topic: Optional[str] = None
    lidar_extrinsic: Optional[np.ndarray] = None
    pose_source: str = "auto"
    camera_frame: Optional[str] = None
    world_frame: Optional[str] = None
    pose_child_frame: Optional[str] = None
    tolerance_ns: int = 10_000_000
    split: str = "none"
    val_fraction: float = 0.1
    seed: int = 0

    def validate(self) -> "ConvertOptions":
        """Check every option; raise :class:`ConvertError` naming the first bad one."""
        self.tasks = tuple(self.tasks)
        if not self.tasks:
            raise ConvertError("no tasks requested; choose some of " + ", ".join(TASK_NAMES))
        for task in self.tasks:
            if task not in TASK_NAMES:
                raise ConvertError(f"unknown task {task!r}; expected some of {', '.join(TASK_NAMES)}")
        for name in ("points_per_image", "points_per_pair", "frame_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConvertError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_pairs_per_frame, bool) or not isinstance(self.max_pairs_per_frame, (int, np.integer)) \
                or self.max_pairs_per_frame < 0:
            raise ConvertError(f"max_pairs_per_frame must be a non-negative integer, got {self.max_pairs_per_frame!r}")
        for name in ("correspondence_gaps", "pose_gaps"):
            gaps = tuple(getattr(self, name))
            if not gaps or any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 for g in gaps):
                raise ConvertError(f"{name} must be positive integers, got {gaps!r}")
            setattr(self, name, tuple(sorted(set(int(g) for g in gaps))))
        if not (0.0 <= self.margin < 0.5):
            raise ConvertError(f"margin must be a fraction in [0, 0.5), got {self.margin!r}")
        if not (math.isfinite(self.min_depth) and math.isfinite(self.max_depth) and 0 <= self.min_depth < self.max_depth):
            raise ConvertError(f"depth range must satisfy 0 <= min < max, got [{self.min_depth}, {self.max_depth}]")
        if not (0.0 < self.occlusion_tolerance < 1.0):
            raise ConvertError(f"occlusion_tolerance must be in (0, 1), got {self.occlusion_tolerance!r}")
        if not (0.0 <= self.min_covisibility <= 1.0):
            raise ConvertError(f"min_covisibility must be in [0, 1], got {self.min_covisibility!r}")
        if self.pose_source not in ("auto", "topic", "tf", "none"):
            raise ConvertError(f"pose_source must be auto, topic, tf or none, got {self.pose_source!r}")
        if isinstance(self.tolerance_ns, bool) or not isinstance(self.tolerance_ns, (int, np.integer)) or self.tolerance_ns < 0:
            raise ConvertError(f"tolerance_ns must be a non-negative integer, got {self.tolerance_ns!r}")
        if self.split not in ("none", "frame", "bag"):
            raise ConvertError(f"split must be none, frame or bag, got {self.split!r}")
        if self.split != "none" and not (0.0 < self.val_fraction < 1.0):
            raise ConvertError(f"val_fraction must be in (0, 1) for a {self.split} split, got {self.val_fraction!r}")
        if self.lidar_extrinsic is not None:
            T = np.asarray(self.lidar_extrinsic, dtype=np.float64)
            if T.shape != (4, 4) or not np.all(np.isfinite(T)) or not np.allclose(T[3], (0, 0, 0, 1)) \
                    or not np.allclose(T[:3, :3].T @ T[:3, :3], np.eye(3), atol=1e-6):
                raise ConvertError("lidar_extrinsic must be a finite 4x4 rigid transform T_camera_lidar")
            self.lidar_extrinsic = T
        specs = dict(self.specs) if self.specs else {}
        for task in self.tasks:
            spec = specs.get(task) or protocol.TASKS[task]
            _check_spec(task, spec)
            specs[task] = spec
        self.specs = specs
        return self

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly copy (specs by name; the specs themselves go to the protocol file)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "specs":
                value = sorted(value) if value else None
            elif isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _check_spec(task: str, spec: TaskSpec) -> None:
    if not isinstance(spec, TaskSpec):
        raise ConvertError(f"spec for task {task!r} must be a TaskSpec, got {type(spec).__name__}")
    needs_images = {"depth": 1, "correspondence": 2, "pose": 2}[task]
    if spec.num_images != needs_images:
        raise ConvertError(f"spec for task {task!r} must take {needs_images} image(s), it takes {spec.num_images}")
    if task in ("depth", "correspondence") and not spec.coord_scale:
        raise ConvertError(f"spec for task {task!r} needs a coord_scale for pixel coordinates")
    if task == "depth" and spec.option("depth_kind", "ray") not in ("ray", "z"):
        raise ConvertError(f"depth spec option depth_kind must be 'ray' or 'z', got {spec.option('depth_kind')!r}")
    if task == "pose":
        missing = [q for q in protocol.POSE_QUESTION_IDS if q not in spec.questions or q not in spec.answers]
        if missing:
            raise ConvertError(f"pose spec lacks questions/answers for {missing}")


def load_specs(spec_file: Optional[str | os.PathLike[str]], tasks: Sequence[str] = TASK_NAMES) -> Dict[str, TaskSpec]:
    """Task specs for ``tasks``: from a protocol JSON file (or a directory holding
    ``vlm3_protocol.json``) where given, else the built-in ones. Tasks the file does not define
    use the built-in specs."""
    specs = {task: protocol.TASKS[task] for task in tasks if task in protocol.TASKS}
    if spec_file is None:
        return specs
    path = Path(spec_file)
    try:
        if path.is_dir():
            loaded = protocol.load_protocol(path)
            if loaded is None:
                raise ConvertError(f"{path} holds no {protocol.PROTOCOL_FILENAME}")
        elif path.is_file():
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(path, Path(tmp) / protocol.PROTOCOL_FILENAME)
                loaded = protocol.load_protocol(tmp)
        else:
            raise ConvertError(f"spec file {path} does not exist")
    except protocol.ProtocolError as exc:
        raise ConvertError(f"spec file {path}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConvertError):
            raise
        raise ConvertError(f"spec file {path} is not a valid protocol file: {exc}") from exc
    for task in tasks:
        if loaded and task in loaded:
            specs[task] = loaded[task]
    return specs


# --------------------------------------------------------------------------------------------
# Camera geometry with optional lens distortion
# --------------------------------------------------------------------------------------------


def normalized_rays(uv: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
    """Rays ``(N, 3)`` with unit z through pixels ``uv`` ``(N, 2)`` of a camera (distortion undone)."""
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    if not intrinsics.has_distortion:
        xy = (uv - (intrinsics.cx, intrinsics.cy)) / (intrinsics.fx, intrinsics.fy)
    elif len(uv) == 0:
        xy = np.empty((0, 2))
    else:
        pts = uv.reshape(-1, 1, 2)
        D = np.asarray(intrinsics.D)
        # Iterate to convergence (OpenCV's default of a few iterations misses by ~0.02 px at the
        # corners of strongly distorted images).
        criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12)
        if intrinsics.distortion_model == "equidistant":
            xy = cv2.fisheye.undistortPoints(pts, intrinsics.K, D, criteria=criteria).reshape(-1, 2)
        else:
            xy = cv2.undistortPoints(pts, intrinsics.K, D, criteria=criteria).reshape(-1, 2)
    return np.concatenate([xy, np.ones((len(xy), 1))], axis=1)


def project_points(points: np.ndarray, intrinsics: Intrinsics) -> Tuple[np.ndarray, np.ndarray]:
    """Camera-frame points ``(N, 3)`` -> pixels ``(N, 2)`` (through the lens model) and z ``(N,)``.

    Points with ``z <= 0`` get NaN pixels."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    z = points[:, 2].copy()
    front = z > 1e-9
    uv = np.full((len(points), 2), np.nan)
    if front.any():
        xy = points[front, :2] / z[front, None]
        if not intrinsics.has_distortion:
            uv[front] = xy * (intrinsics.fx, intrinsics.fy) + (intrinsics.cx, intrinsics.cy)
        else:
            obj = np.concatenate([xy, np.ones((len(xy), 1))], axis=1).reshape(-1, 1, 3)
            zero = np.zeros((3, 1))
            D = np.asarray(intrinsics.D)
            if intrinsics.distortion_model == "equidistant":
                pix, _ = cv2.fisheye.projectPoints(obj, zero, zero, intrinsics.K, D)
            else:
                pix, _ = cv2.projectPoints(obj, zero, zero, intrinsics.K, D)
            uv[front] = pix.reshape(-1, 2)
    return uv, z


def project_cloud(points: np.ndarray, T_camera_cloud: np.ndarray, intrinsics: Intrinsics,
                  min_depth: float = 1e-3) -> np.ndarray:
    """A sparse depth image (z metres, NaN where no point) from a point cloud.

    Points are moved into the camera frame, projected through the lens model and z-buffered: a
    pixel keeps the nearest point that projects onto it.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    cam = pts @ T_camera_cloud[:3, :3].T + T_camera_cloud[:3, 3]
    cam = cam[cam[:, 2] > min_depth]
    uv, z = project_points(cam, intrinsics)
    cols, rows, inside = geometry.nearest_pixel(uv, intrinsics.width, intrinsics.height)
    depth = np.full((intrinsics.height, intrinsics.width), np.nan, dtype=np.float32)
    if not inside.any():
        return depth
    lin = rows[inside] * intrinsics.width + cols[inside]
    zz = z[inside]
    order = np.argsort(zz, kind="stable")
    lin, zz = lin[order], zz[order]
    unique, first = np.unique(lin, return_index=True)  # first occurrence = nearest point
    depth.ravel()[unique] = zz[first]
    return depth


def _relative(T_w_a: np.ndarray, T_w_b: np.ndarray) -> np.ndarray:
    """``T_a_b = inv(T_w_a) @ T_w_b`` (rigid inverse)."""
    R, t = T_w_a[:3, :3], T_w_a[:3, 3]
    inv = np.eye(4)
    inv[:3, :3] = R.T
    inv[:3, 3] = -R.T @ t
    return inv @ T_w_b


def _reproject(uv1: np.ndarray, z1: np.ndarray, intr1: Intrinsics, T_c2_c1: np.ndarray,
               intr2: Intrinsics) -> Tuple[np.ndarray, np.ndarray]:
    """Pixels of camera 1 with depth z -> pixels of camera 2 and their z there."""
    points = normalized_rays(uv1, intr1) * z1[:, None]
    moved = points @ T_c2_c1[:3, :3].T + T_c2_c1[:3, 3]
    return project_points(moved, intr2)


def _visible(uv2: np.ndarray, z2: np.ndarray, depth2: np.ndarray, tolerance: float,
             require_depth: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(inside image 2, passes the occlusion check against image 2's depth).

    With ``require_depth`` the depth there must be known and agree within ``tolerance``
    (relative); otherwise a point passes unless the depth there is known and nearer by more than
    the tolerance (something occludes it)."""
    h, w = depth2.shape
    cols, rows, inside = geometry.nearest_pixel(uv2, w, h)
    inside &= z2 > 0
    d2 = np.full(len(uv2), np.nan)
    d2[inside] = depth2[rows[inside], cols[inside]]
    known = np.isfinite(d2) & (d2 > 0)
    with np.errstate(invalid="ignore"):
        if require_depth:
            ok = inside & known & (np.abs(d2 - z2) <= tolerance * z2)
        else:
            ok = inside & (~known | (d2 >= z2 * (1.0 - tolerance)))
    return inside, ok


def covisibility(depth1: np.ndarray, intr1: Intrinsics, depth2: np.ndarray, intr2: Intrinsics,
                 T_c1_c2: np.ndarray, tolerance: float = 0.05, stride: int = 2) -> float:
    """Fraction of frame-1 pixels with depth (every ``stride``-th row/column) that project inside
    frame 2 and are not occluded there (frame 2's depth, where known, is not nearer by more
    than ``tolerance`` relative). 0 when frame 1 has no depth."""
    sub = depth1[::stride, ::stride]
    rows, cols = np.nonzero(np.isfinite(sub) & (sub > 0))
    if rows.size == 0:
        return 0.0
    uv1 = np.stack([cols * stride, rows * stride], axis=1).astype(np.float64)
    uv2, z2 = _reproject(uv1, sub[rows, cols].astype(np.float64), intr1, _inverse(T_c1_c2), intr2)
    _, ok = _visible(uv2, z2, depth2, tolerance, require_depth=False)
    return float(ok.mean())


def _inverse(T: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = T[:3, :3].T
    out[:3, 3] = -T[:3, :3].T @ T[:3, 3]
    return out


# --------------------------------------------------------------------------------------------
# TF
# --------------------------------------------------------------------------------------------


class TfBuffer:
    """Transforms of a recording (``tf2_msgs/TFMessage`` on ``/tf`` and ``/tf_static``) for lookups
    at any stamp: static edges are fixed, dynamic ones interpolated (linear translation, slerp
    rotation) between the nearest recorded stamps, or taken from the nearest stamp within
    ``tolerance_ns`` outside the recorded span.
    """

    def __init__(self, tolerance_ns: int = 0) -> None:
        self.tolerance_ns = int(tolerance_ns)
        self._static: Dict[str, Tuple[str, np.ndarray]] = {}
        self._dynamic: Dict[str, Tuple[str, List[int], List[np.ndarray]]] = {}
        self._arrays: Dict[str, Tuple[np.ndarray, np.ndarray, Any]] = {}
        self.conflicts = 0

    def add(self, parent: str, child: str, stamp_ns: int, T_parent_child: np.ndarray, static: bool = False) -> None:
        """Record one transform (parent <- child)."""
        parent, child = parent.lstrip("/"), child.lstrip("/")
        if not parent or not child or parent == child:
            raise ConvertError(f"transform between {parent!r} and {child!r} is not an edge of a TF tree")
        if static:
            self._static[child] = (parent, np.asarray(T_parent_child, dtype=np.float64))
            return
        entry = self._dynamic.setdefault(child, (parent, [], []))
        if entry[0] != parent:
            self.conflicts += 1  # a frame with two parents: keep the first
            return
        entry[1].append(int(stamp_ns))
        entry[2].append(np.asarray(T_parent_child, dtype=np.float64))
        self._arrays.pop(child, None)

    @property
    def frames(self) -> List[str]:
        names = set(self._static) | set(self._dynamic)
        names |= {p for p, _ in self._static.values()} | {e[0] for e in self._dynamic.values()}
        return sorted(names)

    def parent(self, frame: str) -> Optional[str]:
        frame = frame.lstrip("/")
        if frame in self._static:
            return self._static[frame][0]
        if frame in self._dynamic:
            return self._dynamic[frame][0]
        return None

    def root(self, frame: str) -> str:
        """The root of ``frame``'s tree."""
        seen = {frame.lstrip("/")}
        current = frame.lstrip("/")
        while True:
            parent = self.parent(current)
            if parent is None:
                return current
            if parent in seen:
                raise ConvertError(f"TF has a cycle through {parent!r}")
            seen.add(parent)
            current = parent

    def _edge(self, child: str, stamp_ns: int) -> Optional[np.ndarray]:
        if child in self._static:
            return self._static[child][1]
        if child not in self._arrays:
            from scipy.spatial.transform import Rotation

            _, stamps, mats = self._dynamic[child]
            order = np.argsort(np.asarray(stamps, dtype=np.int64), kind="stable")
            stamps_sorted = np.asarray(stamps, dtype=np.int64)[order]
            stack = np.stack(mats)[order]
            self._arrays[child] = (stamps_sorted, stack, Rotation.from_matrix(stack[:, :3, :3]))
        stamps, stack, rotations = self._arrays[child]
        k = int(np.searchsorted(stamps, stamp_ns))
        if k < len(stamps) and stamps[k] == stamp_ns:
            return stack[k]
        if k == 0 or k == len(stamps):
            nearest = 0 if k == 0 else len(stamps) - 1
            return stack[nearest] if abs(int(stamps[nearest]) - stamp_ns) <= self.tolerance_ns else None
        t0, t1 = int(stamps[k - 1]), int(stamps[k])
        a = (stamp_ns - t0) / (t1 - t0)
        from scipy.spatial.transform import Slerp

        rot = Slerp([0.0, 1.0], rotations[[k - 1, k]])([a]).as_matrix()[0]
        out = np.eye(4)
        out[:3, :3] = rot
        out[:3, 3] = (1 - a) * stack[k - 1, :3, 3] + a * stack[k, :3, 3]
        return out

    def _to_root(self, frame: str, stamp_ns: int) -> Tuple[str, Optional[np.ndarray]]:
        T = np.eye(4)
        current = frame.lstrip("/")
        for _ in range(256):
            parent = self.parent(current)
            if parent is None:
                return current, T
            edge = self._edge(current, stamp_ns)
            if edge is None:
                return current, None
            T = edge @ T
            current = parent
        raise ConvertError(f"TF chain from {frame!r} is too deep (a cycle?)")

    def lookup(self, target: str, source: str, stamp_ns: int) -> Optional[np.ndarray]:
        """``T_target_source`` at ``stamp_ns`` (points in ``source`` -> ``target``), or None when
        the frames are not connected or a dynamic edge has no data near the stamp."""
        root_t, T_root_target = self._to_root(target, stamp_ns)
        root_s, T_root_source = self._to_root(source, stamp_ns)
        if T_root_target is None or T_root_source is None or root_t != root_s:
            return None
        return _inverse(T_root_target) @ T_root_source

    def __len__(self) -> int:
        return len(self._static) + sum(len(e[1]) for e in self._dynamic.values())


def _read_tf(bag: Path, tolerance_ns: int) -> TfBuffer:
    from vlm3_ros import bags

    buffer = TfBuffer(tolerance_ns)
    info = bags.bag_info(bag)
    topics = [t for t in TF_TOPICS if t in info["topics"]]
    if not topics:
        return buffer
    for message in bags.read_messages(bag, topics):
        for transform in getattr(message.msg, "transforms", []):
            stamp = int(transform.header.stamp.sec) * 1_000_000_000 + int(transform.header.stamp.nanosec)
            buffer.add(str(transform.header.frame_id), str(transform.child_frame_id), stamp,
                       bags.pose_from_msg(transform), static=message.topic == "/tf_static")
    return buffer


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


def _margin_mask(width: int, height: int, margin: float) -> Tuple[slice, slice]:
    mx, my = int(math.ceil(margin * width)), int(math.ceil(margin * height))
    return slice(my, max(height - my, my)), slice(mx, max(width - mx, mx))


def _point_text(cols: np.ndarray, rows: np.ndarray, width: int, height: int,
                scale: int) -> Tuple[np.ndarray, np.ndarray]:
    """Text coordinates of the chosen pixels (:func:`vlm3_ros.protocol.normalize_point`) and the
    prepared positions they refer to (:func:`vlm3_ros.protocol.denormalize_point`)."""
    text = np.array([protocol.normalize_point(float(c), float(r), width, height, scale) for c, r in zip(cols, rows)],
                    dtype=np.int64).reshape(-1, 2)
    ref = np.array([protocol.denormalize_point(nx, ny, width, height, scale) for nx, ny in text],
                   dtype=np.float64).reshape(-1, 2)
    return text, ref


def _axis_refs(size: int, scale: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per pixel index along one axis: the position its text coordinate refers to, and whether
    that position's nearest pixel is the pixel itself (text coordinates coarser than pixels map
    several pixels to one position; only the pixel nearest to it is used)."""
    index = np.arange(size, dtype=np.float64)
    ref = np.round(index / size * scale) / scale * size
    return ref, np.floor(ref + 0.5) == index


def _candidate_mask(depth: np.ndarray, scale: int, margin: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels with valid depth, inside the margin, whose text coordinates refer back to
    themselves: ``(mask (H, W), referenced x per column, referenced y per row)``."""
    H, W = depth.shape
    ref_x, same_x = _axis_refs(W, scale)
    ref_y, same_y = _axis_refs(H, scale)
    rs, cs = _margin_mask(W, H, margin)
    inner_x = np.zeros(W, dtype=bool)
    inner_x[cs] = True
    inner_y = np.zeros(H, dtype=bool)
    inner_y[rs] = True
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(depth) & (depth > 0)
    mask &= (same_y & inner_y)[:, None] & (same_x & inner_x)[None, :]
    return mask, ref_x, ref_y


def _ray_norms(intr: Intrinsics, ref_x: np.ndarray, ref_y: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``|K^-1 [x, y, 1]|`` (through the lens model) at the referenced positions of some pixels."""
    if not intr.has_distortion:
        nx = (ref_x - intr.cx) / intr.fx
        ny = (ref_y - intr.cy) / intr.fy
        return np.sqrt(nx[cols] ** 2 + ny[rows] ** 2 + 1.0)
    uv = np.stack([ref_x[cols], ref_y[rows]], axis=1)
    return np.linalg.norm(normalized_rays(uv, intr), axis=1)


def depth_targets(prepared: PreparedImage, depth_prepared: np.ndarray, spec: TaskSpec, k: int,
                  rng: np.random.Generator, *, margin: float = 0.03, min_depth: float = 0.1,
                  max_depth: float = 80.0) -> Tuple[List[str], List[str], Dict[str, Any], Dict[str, int]]:
    """K depth questions, answers and targets for one prepared image.

    ``depth_prepared``: z (metres, NaN invalid) in the prepared geometry. Labels are the ray
    distance (or z for ``depth_kind="z"``) at the position the question's text coordinates refer
    to; pixels whose label is outside ``[min_depth, max_depth]`` are not used. Pixels are sampled
    uniformly (without replacement) among those that qualify. Returns (questions, answers,
    targets, counts) with counts ``valid_pixels`` and ``out_of_range_pixels``; no questions when
    no pixel qualifies.
    """
    intr = prepared.intrinsics
    W, H = intr.width, intr.height
    scale = int(spec.coord_scale)
    kind = spec.option("depth_kind", "ray")
    mask, ref_x, ref_y = _candidate_mask(depth_prepared, scale, margin)
    rows, cols = np.nonzero(mask)
    z = depth_prepared[rows, cols].astype(np.float64)
    values = z * _ray_norms(intr, ref_x, ref_y, rows, cols) if kind == "ray" else z
    in_range = (values >= min_depth) & (values <= max_depth)
    counts = {"valid_pixels": int(in_range.sum()), "out_of_range_pixels": int((~in_range).sum())}
    idx = np.flatnonzero(in_range)
    if idx.size == 0:
        return [], [], {}, counts
    pick = rng.choice(idx, size=min(k, idx.size), replace=False)
    text, ref = _point_text(cols[pick], rows[pick], W, H, scale)
    questions = [protocol.depth_question(int(nx), int(ny), spec) for nx, ny in text]
    answers = [protocol.format_depth_answer(float(v), spec) for v in values[pick]]
    targets = {"values": [round(float(v), 6) for v in values[pick]], "kind": kind,
               "pixels": [[round(float(x), 4), round(float(y), 4)] for x, y in ref],
               "norm": [[int(a), int(b)] for a, b in text]}
    return questions, answers, targets, counts


def correspondence_targets(prep1: PreparedImage, depth1: np.ndarray, prep2: PreparedImage, depth2: np.ndarray,
                           T_c2_c1: np.ndarray, spec: TaskSpec, k: int, rng: np.random.Generator, *,
                           margin: float = 0.03, tolerance: float = 0.05,
                           think: bool = False) -> Tuple[List[str], List[str], Dict[str, Any]]:
    """K correspondence questions, answers and targets for a prepared image pair.

    ``depth1``/``depth2``: z in each prepared geometry. A pixel of image 1 (valid depth, inside
    the margin) is lifted, moved by ``T_c2_c1`` and projected into image 2; it qualifies when it
    lands inside image 2 (and its margin) where image 2's depth agrees within ``tolerance``
    (relative). Pixels are sampled uniformly among those that qualify.
    """
    i1, i2 = prep1.intrinsics, prep2.intrinsics
    scale = int(spec.coord_scale)
    mask, ref_x, ref_y = _candidate_mask(depth1, scale, margin)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return [], [], {}
    ref = np.stack([ref_x[cols], ref_y[rows]], axis=1)
    # Check a random subset first, then the rest if needed: either way the pixels kept are a
    # uniform sample of those that qualify.
    order = rng.permutation(rows.size)
    chosen: List[int] = []
    uv2_all = np.full((rows.size, 2), np.nan)
    for chunk in (order[: 40 * k], order[40 * k:]):
        if chunk.size == 0 or len(chosen) >= k:
            continue
        z1 = depth1[rows[chunk], cols[chunk]].astype(np.float64)
        uv2, z2 = _reproject(ref[chunk], z1, i1, T_c2_c1, i2)
        _, ok = _visible(uv2, z2, depth2, tolerance, require_depth=True)
        mx, my = margin * i2.width, margin * i2.height
        ok &= (uv2[:, 0] >= mx - 0.5) & (uv2[:, 0] <= i2.width - 0.5 - mx)
        ok &= (uv2[:, 1] >= my - 0.5) & (uv2[:, 1] <= i2.height - 0.5 - my)
        uv2_all[chunk] = uv2
        chosen.extend(chunk[ok][: k - len(chosen)].tolist())
    if not chosen:
        return [], [], {}
    pick = np.asarray(chosen)
    uv2 = uv2_all[pick]
    text, _ = _point_text(cols[pick], rows[pick], i1.width, i1.height, scale)
    norm2 = (uv2 + 0.0) / (i2.width, i2.height) * scale
    questions = [protocol.correspondence_question(int(nx), int(ny), think=think, spec=spec) for nx, ny in text]
    answers = [protocol.format_correspondence_answer(float(x), float(y), spec) for x, y in norm2]
    targets = {"points": [[round(float(x), 3), round(float(y), 3)] for x, y in norm2],
               "pixels2": [[round(float(x), 3), round(float(y), 3)] for x, y in uv2],
               "pixels1": [[round(float(x), 3), round(float(y), 3)] for x, y in ref[pick]],
               "norm1": [[int(a), int(b)] for a, b in text]}
    return questions, answers, targets


def pose_targets(T_c1_c2: np.ndarray, spec: TaskSpec) -> Tuple[List[str], List[str], Dict[str, Any]]:
    """The pose questions and answers of ``spec`` for the relative pose camera 1 <- camera 2."""
    answers = protocol.format_pose_answers(T_c1_c2[:3, :3], T_c1_c2[:3, 3], spec)
    questions = protocol.pose_questions(spec)
    ids = [qid for qid in questions if qid in answers]
    return ([questions[q] for q in ids], [answers[q] for q in ids],
            {"T": [[float(v) for v in row] for row in T_c1_c2], "question_ids": ids})


# --------------------------------------------------------------------------------------------
# Frames of one bag
# --------------------------------------------------------------------------------------------


@dataclass
class _Frame:
    index: int
    stamp_ns: int
    rgb: np.ndarray
    intrinsics: Intrinsics
    depth: Optional[np.ndarray]
    T_w_c: Optional[np.ndarray]
    split: str
    prepared: Dict[Any, Tuple[PreparedImage, Optional[np.ndarray], bytes]] = field(default_factory=dict)

    def prepare(self, spec: TaskSpec) -> Tuple[PreparedImage, Optional[np.ndarray], bytes]:
        """Prepared image, prepared depth (z) and PNG bytes for a spec's preprocessing (cached)."""
        key = (spec.preprocess.mode, spec.preprocess.value, spec.preprocess.undistort)
        if key not in self.prepared:
            prep = prepare_image(self.rgb, self.intrinsics, spec.preprocess)
            depth = prepare_depth(self.depth, prep) if self.depth is not None else None
            self.prepared[key] = (prep, depth, _png_bytes(prep.image))
        return self.prepared[key]


def _png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV fails only on absurd input
        raise ConvertError(f"PNG encoding failed for an image of shape {rgb.shape}")
    return buf.tobytes()


class _Stats:
    """Counters and the first few reasons for skipping things."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.samples: Counter = Counter()
        self.samples_by_split: Dict[str, Counter] = {"train": Counter(), "val": Counter()}
        self.questions: Counter = Counter()
        self.reasons: List[str] = []

    def skip(self, key: str, reason: Optional[str] = None, n: int = 1) -> None:
        self.counts[key] += n
        if reason and len(self.reasons) < _MAX_REASONS:
            self.reasons.append(reason)


def _first_message(bag: Path, topic: str) -> Any:
    """The first message of a topic that decodes, or None."""
    from vlm3_ros import bags

    try:
        for message in bags.read_messages(bag, [topic]):
            return message
    except bags.BagError:
        # A damaged message: look further through the raw messages.
        reader_store = bags.typestore()
        for raw in bags.read_raw(bag, [topic]):
            try:
                msg = reader_store.deserialize_cdr(raw.data, raw.msgtype)
            except Exception:
                continue
            stamp = getattr(getattr(msg, "header", None), "stamp", None)
            stamp_ns = raw.log_time_ns if stamp is None else int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
            return bags.BagMessage(raw.topic, raw.msgtype, stamp_ns, msg)
    return None


class _BagReader:
    """Frames of one bag with depth and camera poses from the configured sources."""

    def __init__(self, bag: Path, options: ConvertOptions, stats: _Stats, needs_pose: bool) -> None:
        from vlm3_ros import bags

        self.bag = bag
        self.options = options
        self.stats = stats
        self.info = bags.bag_info(bag)
        topics = dict(bags.TOPICS)
        topics.update(options.topics or {})
        present = self.info["topics"]
        for role in ("image", "camera_info"):
            if topics.get(role) not in present:
                raise ConvertError(f"bag {bag} has no {role} topic {topics.get(role)}; it has {', '.join(sorted(present))}")
        camera_msg = _first_message(bag, topics["camera_info"])
        frame_id = str(camera_msg.msg.header.frame_id) if camera_msg is not None else ""
        self.camera_frame = (options.camera_frame or frame_id).lstrip("/")
        self.tf: Optional[TfBuffer] = None

        # Depth source.
        self.cloud_topic = options.cloud_topic
        if self.cloud_topic is not None:
            if self.cloud_topic not in present:
                raise ConvertError(f"bag {bag} has no cloud topic {self.cloud_topic}")
            self.depth_source = "cloud"
            topics["depth"] = None
        elif topics.get("depth") in present:
            self.depth_source = "depth_image"
        else:
            self.depth_source = "none"
            topics["depth"] = None

        # Pose source.
        source = options.pose_source
        pose_topic = topics.get("pose")
        if source == "auto":
            source = "topic" if pose_topic in present else ("tf" if any(t in present for t in TF_TOPICS) else "none")
        if source == "topic" and pose_topic not in present:
            raise ConvertError(f"bag {bag} has no pose topic {pose_topic}")
        if source != "topic":
            topics["pose"] = None
        self.pose_source = source if needs_pose else "none"
        if self.pose_source == "none":
            topics["pose"] = None
        self.pose_offset: Optional[np.ndarray] = None  # T_body_camera for a pose topic of another frame
        if self.depth_source == "cloud" or self.pose_source == "tf" or \
                (self.pose_source == "topic" and options.pose_child_frame):
            self.tf = _read_tf(bag, options.tolerance_ns)
        if (self.depth_source == "cloud" or self.pose_source == "tf") and not self.camera_frame:
            raise ConvertError(f"bag {bag}: the camera frame is unknown (no readable camera info frame_id); "
                               "pass camera_frame (--camera-frame)")
        if self.pose_source == "topic":
            first = _first_message(bag, topics["pose"])
            if first is None:
                raise ConvertError(f"bag {bag}: no readable message on the pose topic {topics['pose']}")
            child = options.pose_child_frame or str(getattr(first.msg, "child_frame_id", "") or "") or self.camera_frame
            child = child.lstrip("/")
            if child != self.camera_frame:
                if self.tf is None:
                    self.tf = _read_tf(bag, options.tolerance_ns)
                offset = self.tf.lookup(child, self.camera_frame, int(first.stamp_ns))
                if offset is None:
                    raise ConvertError(f"bag {bag}: poses on {topics['pose']} describe frame {child!r}, and TF has no "
                                       f"transform from it to the camera frame {self.camera_frame!r}")
                self.pose_offset = offset
        if self.pose_source == "tf":
            assert self.tf is not None
            if self.camera_frame not in self.tf.frames:
                raise ConvertError(f"bag {bag}: camera frame {self.camera_frame!r} is not in TF "
                                   f"(frames: {', '.join(self.tf.frames) or 'none'}); pass camera_frame")
            self.world_frame = (options.world_frame or self.tf.root(self.camera_frame)).lstrip("/")
        self.topics = topics
        self.frames = bags.iter_rgbd_frames(bag, topics, tolerance_ns=options.tolerance_ns)
        self.clouds: Optional[Tuple[np.ndarray, List[Tuple[str, Any]]]] = None

    def _load_clouds(self) -> None:
        from vlm3_ros import bags, msg_codec

        stamps, entries = [], []
        try:
            messages = bags.read_messages(self.bag, [self.cloud_topic])
            for message in messages:
                try:
                    cloud = msg_codec.read_cloud(message.msg, ["x", "y", "z"])
                    xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=1).astype(np.float64)
                except Exception as exc:  # a damaged cloud is counted, not fatal
                    self.stats.skip("corrupt_clouds", f"{self.bag}: cloud at {message.stamp_ns}: {exc}")
                    continue
                stamps.append(int(message.stamp_ns))
                entries.append((str(message.msg.header.frame_id).lstrip("/"), xyz))
        except bags.BagError as exc:
            self.stats.skip("corrupt_clouds", f"{self.bag}: {exc}")
        order = np.argsort(np.asarray(stamps, dtype=np.int64), kind="stable")
        self.clouds = (np.asarray(stamps, dtype=np.int64)[order], [entries[i] for i in order])
        self._cloud_used = np.zeros(len(stamps), dtype=bool)

    def _cloud_depth(self, stamp_ns: int, intrinsics: Intrinsics) -> Optional[np.ndarray]:
        if self.clouds is None:
            self._load_clouds()
        stamps, entries = self.clouds  # type: ignore[misc]
        if len(stamps) == 0:
            return None
        k = int(np.clip(np.searchsorted(stamps, stamp_ns), 0, len(stamps) - 1))
        cands = [i for i in (k - 1, k) if 0 <= i < len(stamps)]
        best = min(cands, key=lambda i: abs(int(stamps[i]) - stamp_ns))
        if abs(int(stamps[best]) - stamp_ns) > self.options.tolerance_ns:
            return None
        frame_id, xyz = entries[best]
        T = self.options.lidar_extrinsic
        if T is None:
            T = self.tf.lookup(self.camera_frame, frame_id, int(stamps[best])) if self.tf is not None else None
            if T is None:
                self.stats.skip("clouds_without_extrinsic", f"{self.bag}: no TF from cloud frame {frame_id!r} to "
                                f"camera frame {self.camera_frame!r} at {stamps[best]}")
                return None
        self._cloud_used[best] = True
        return project_cloud(xyz, T, intrinsics)

    def __iter__(self) -> Iterator[Tuple[int, Any, Optional[np.ndarray], Optional[np.ndarray]]]:
        """(stamp, frame, depth z or None, T_w_c or None) for every paired frame."""
        for frame in self.frames:
            if self.depth_source == "cloud":
                depth = self._cloud_depth(frame.stamp_ns, frame.intrinsics)
            else:
                depth = frame.depth_m
            pose = None
            if self.pose_source == "topic":
                pose = frame.T_w_c
                if pose is not None and self.pose_offset is not None:
                    pose = pose @ self.pose_offset
            elif self.pose_source == "tf":
                assert self.tf is not None
                pose = self.tf.lookup(self.world_frame, self.camera_frame, frame.stamp_ns)
            yield frame.stamp_ns, frame, depth, pose

    def finish(self) -> Dict[str, Any]:
        summary = self.frames.summary
        out = {
            "path": str(self.bag),
            "storage": self.info.get("storage"),
            "topics": {k: v for k, v in self.topics.items() if v},
            "depth_source": self.depth_source,
            "pose_source": self.pose_source,
            "camera_frame": self.camera_frame,
            "messages": dict(summary.messages),
            "frames_paired": summary.frames,
            "unpaired": dict(summary.unpaired),
            "corrupt": dict(summary.corrupt),
            "dropped_frames": summary.dropped_frames,
            "problems": list(summary.problems),
        }
        if self.depth_source == "cloud" and self.clouds is not None:
            out["clouds"] = int(len(self.clouds[0]))
            out["unpaired_clouds"] = int((~self._cloud_used).sum())
        if self.pose_source == "tf":
            out["world_frame"] = self.world_frame
        return out


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


@dataclass
class ConvertResult:
    """Where the dataset went and its summary (also in ``summary.json``)."""

    path: Path
    summary: Dict[str, Any]


def dataset_features() -> Any:
    """The ``datasets.Features`` of the dataset's rows."""
    import datasets

    List_ = getattr(datasets, "List", None) or datasets.Sequence
    return datasets.Features({
        "task": datasets.Value("string"),
        "images": List_(datasets.Image()),
        "questions": List_(datasets.Value("string")),
        "answers": List_(datasets.Value("string")),
        "targets": datasets.Value("string"),
        "meta": datasets.Value("string"),
    })


def _frame_rng(seed: int, bag_index: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(bag_index), *[int(i) for i in ids]])


def _row(task: str, frames: Sequence[_Frame], preps: Sequence[Tuple[PreparedImage, Any, bytes]],
         questions: List[str], answers: List[str], targets: Dict[str, Any], source: str) -> Dict[str, Any]:
    meta = {
        "source": source,
        "stamps_ns": [f.stamp_ns for f in frames],
        "frames": [f.index for f in frames],
        "K": [p[0].intrinsics.K.tolist() for p in preps],
        "size": [[p[0].intrinsics.width, p[0].intrinsics.height] for p in preps],
        "split": frames[0].split,
    }
    return {
        "task": task,
        "images": [{"bytes": p[2], "path": None} for p in preps],
        "questions": questions,
        "answers": answers,
        "targets": json.dumps(targets),
        "meta": json.dumps(meta),
    }


def _bag_rows(bag_index: int, bag: Path, split_of_bag: Optional[str], options: ConvertOptions, stats: _Stats,
              bag_summaries: List[Dict[str, Any]], progress: bool) -> Iterator[Dict[str, Any]]:
    pair_tasks = [t for t in ("correspondence", "pose") if t in options.tasks]
    reader = _BagReader(bag, options, stats, needs_pose=bool(pair_tasks))
    if pair_tasks and reader.pose_source == "none":
        stats.skip("bags_without_poses", f"{bag}: no pose topic or TF; {', '.join(pair_tasks)} samples skipped")
    if reader.depth_source == "none":
        stats.skip("bags_without_depth", f"{bag}: no depth topic {reader.topics.get('depth') or ''} or cloud; "
                   "nothing to label")
    frames = ((stamp, f.rgb, f.intrinsics, depth, pose) for stamp, f, depth, pose in reader)
    yield from _frame_rows(frames, len(reader.frames), str(bag), bag.name, bag_index, split_of_bag, options, stats,
                           progress, poses_expected=reader.pose_source != "none")
    bag_summaries.append(reader.finish())


def _frame_rows(frames: Iterable[Tuple[int, np.ndarray, Intrinsics, Optional[np.ndarray], Optional[np.ndarray]]],
                total: Optional[int], source: str, label: str, source_index: int, split_of_source: Optional[str],
                options: ConvertOptions, stats: _Stats, progress: bool,
                poses_expected: bool = True) -> Iterator[Dict[str, Any]]:
    """Rows of every task from a stream of ``(stamp_ns, rgb, intrinsics, depth z or None, T_w_c or None)``."""
    specs = options.specs or {}
    tasks = options.tasks
    pair_tasks = [t for t in ("correspondence", "pose") if t in tasks]
    val_from = math.inf if split_of_source != "val" else 0
    if options.split == "frame":
        if total is None:
            raise ConvertError("a split by frame needs the number of frames of each source")
        val_from = int(round(total * (1.0 - options.val_fraction)))
    gaps = {"correspondence": options.correspondence_gaps, "pose": options.pose_gaps}
    max_gap = max([max(gaps[t]) for t in pair_tasks] or [0]) * options.frame_stride
    window: deque = deque()
    iterator: Iterable = frames
    if progress:
        from tqdm import tqdm

        iterator = tqdm(frames, total=total, desc=label, unit="frame", leave=False, file=sys.stderr)
    for ordinal, (stamp, rgb, intrinsics, depth, pose) in enumerate(iterator):
        stats.counts["frames_read"] += 1
        if ordinal % options.frame_stride:
            continue
        split = "val" if ordinal >= val_from else "train"
        if depth is None:
            stats.skip("frames_without_depth", f"{source}: frame {ordinal} at {stamp} has no depth")
            continue
        if pose is None and poses_expected:
            stats.skip("frames_without_pose", f"{source}: frame {ordinal} at {stamp} has no pose")
        if not (np.isfinite(depth) & (depth > 0)).any():
            stats.skip("frames_without_valid_depth", f"{source}: frame {ordinal} at {stamp}: no valid depth")
            continue
        frame = _Frame(ordinal, int(stamp), rgb, intrinsics, depth, pose, split)
        stats.counts["frames_used"] += 1

        if "depth" in tasks:
            spec = specs["depth"]
            prep = frame.prepare(spec)
            q, a, t, counts = depth_targets(prep[0], prep[1], spec, options.points_per_image,
                                            _frame_rng(options.seed, source_index, ordinal, 0), margin=options.margin,
                                            min_depth=options.min_depth, max_depth=options.max_depth)
            stats.counts["out_of_range_pixels"] += counts["out_of_range_pixels"]
            if q:
                yield _count(stats, "depth", split, _row("depth", [frame], [prep], q, a, t, source))
            else:
                stats.skip("frames_out_of_range", f"{source}: frame {ordinal} at {stamp}: no pixel with a label in "
                           f"the depth range [{options.min_depth}, {options.max_depth}] m inside the margin")

        # Pairs ending at this frame.
        if frame.T_w_c is not None:
            for task in pair_tasks:
                made = 0
                for gap in gaps[task]:
                    if options.max_pairs_per_frame and made >= options.max_pairs_per_frame:
                        break
                    first = next((f for f in window if f.index == ordinal - gap * options.frame_stride), None)
                    if first is None or first.T_w_c is None:
                        continue
                    if first.split != frame.split:
                        stats.skip("pairs_across_split")
                        continue
                    row = _pair_row(task, first, frame, specs[task], options, stats, source_index, source)
                    if row is not None:
                        made += 1
                        yield _count(stats, task, split, row)
        window.append(frame)
        while window and window[0].index < ordinal - max_gap:
            window.popleft()


def _pair_row(task: str, f1: _Frame, f2: _Frame, spec: TaskSpec, options: ConvertOptions, stats: _Stats,
              bag_index: int, source: str) -> Optional[Dict[str, Any]]:
    assert f1.T_w_c is not None and f2.T_w_c is not None and f1.depth is not None and f2.depth is not None
    T_c1_c2 = _relative(f1.T_w_c, f2.T_w_c)
    covis = covisibility(f1.depth, f1.intrinsics, f2.depth, f2.intrinsics, T_c1_c2, options.occlusion_tolerance)
    if task == "pose":
        if covis < options.min_covisibility:
            stats.skip("pairs_low_covisibility", f"{source}: frames {f1.index}-{f2.index}: covisibility "
                       f"{covis:.2f} < {options.min_covisibility}")
            return None
        try:
            q, a, t = pose_targets(T_c1_c2, spec)
        except protocol.ProtocolError as exc:
            stats.skip("pairs_without_motion", f"{source}: frames {f1.index}-{f2.index}: {exc}")
            return None
        t["covisibility"] = round(covis, 4)
        preps = [f1.prepare(spec), f2.prepare(spec)]
        return _row("pose", [f1, f2], preps, q, a, t, source)
    if covis <= 0.0:
        stats.skip("pairs_without_overlap", f"{source}: frames {f1.index}-{f2.index} do not overlap")
        return None
    p1, p2 = f1.prepare(spec), f2.prepare(spec)
    q, a, t = correspondence_targets(p1[0], p1[1], p2[0], p2[1], _inverse(T_c1_c2), spec, options.points_per_pair,
                                     _frame_rng(options.seed, bag_index, f1.index, f2.index, 1),
                                     margin=options.margin, tolerance=options.occlusion_tolerance)
    if not q:
        stats.skip("pairs_without_points", f"{source}: frames {f1.index}-{f2.index}: no visible correspondence")
        return None
    t["covisibility"] = round(covis, 4)
    return _row("correspondence", [f1, f2], [p1, p2], q, a, t, source)


def _count(stats: _Stats, task: str, split: str, row: Dict[str, Any]) -> Dict[str, Any]:
    stats.samples[task] += 1
    stats.samples_by_split[split][task] += 1
    stats.questions[task] += len(row["questions"])
    return row


def _bag_splits(bags: Sequence[Any], options: ConvertOptions) -> List[Optional[str]]:
    if options.split != "bag":
        return [None] * len(bags)
    if len(bags) < 2:
        raise ConvertError("a split by bag needs at least two bags (sources)")
    n_val = min(len(bags) - 1, max(1, int(round(len(bags) * options.val_fraction))))
    return ["train"] * (len(bags) - n_val) + ["val"] * n_val


def convert_bags(bags: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                 options: Optional[ConvertOptions] = None, *, overwrite: bool = False,
                 progress: bool = True, arguments: Optional[Mapping[str, Any]] = None) -> ConvertResult:
    """Convert bags into a dataset directory ``out`` (see the module docstring), atomically.

    Raises :class:`ConvertError` (or :class:`vlm3_ros.bags.BagError`) for unusable options or
    inputs, and when no sample at all could be made; nothing is left at ``out`` then.
    """
    options = (options or ConvertOptions()).validate()
    paths = [Path(b) for b in bags]
    if not paths:
        raise ConvertError("no bags given")
    for path in paths:
        if not path.exists():
            raise ConvertError(f"bag {path} does not exist")
    splits = _bag_splits(paths, options)

    def rows(stats: _Stats, summaries: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        for index, (path, split) in enumerate(zip(paths, splits)):
            yield from _bag_rows(index, path, split, options, stats, summaries, progress)

    return _write_dataset(out, options, rows, [str(p) for p in paths], overwrite=overwrite, arguments=arguments)


FrameLike = Any  # (stamp_ns, rgb, intrinsics, depth_m, T_w_c), e.g. vlm3_ros.bags.RgbdFrame


def iter_samples(frames: Iterable[FrameLike], options: Optional[ConvertOptions] = None, *,
                 source: str = "memory", total: Optional[int] = None, source_index: int = 0,
                 stats: Optional[Any] = None) -> Iterator[Dict[str, Any]]:
    """Dataset rows (the columns of :data:`DATASET_COLUMNS`; images as PNG ``{"bytes", "path"}``)
    made from in-memory frames, without a bag: each frame is ``(stamp_ns, rgb, intrinsics,
    depth_m, T_w_c)`` (a :class:`vlm3_ros.bags.RgbdFrame` or any 5-tuple in that order; depth z
    in metres with NaN invalid, or None; ``T_w_c`` camera-to-world or None).
    """
    options = (options or ConvertOptions()).validate()
    frames_iter = ((int(f[0]), f[1], f[2], f[3], f[4]) for f in frames)
    yield from _frame_rows(frames_iter, total, source, source, source_index, None, options,
                           stats if stats is not None else _Stats(), progress=False)


def convert_frames(sources: Mapping[str, Sequence[FrameLike]], out: str | os.PathLike[str],
                   options: Optional[ConvertOptions] = None, *, overwrite: bool = False, progress: bool = True,
                   arguments: Optional[Mapping[str, Any]] = None) -> ConvertResult:
    """Like :func:`convert_bags` for in-memory frame sequences (source name -> frames; see
    :func:`iter_samples`), e.g. :meth:`vlm3_train.synthetic.SyntheticSequence.rgbd_frames`."""
    options = (options or ConvertOptions()).validate()
    if not sources:
        raise ConvertError("no frame sequences given")
    names = list(sources)
    splits = _bag_splits(names, options)

    def rows(stats: _Stats, summaries: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        for index, (name, split) in enumerate(zip(names, splits)):
            frames = sources[name]
            total = len(frames) if hasattr(frames, "__len__") else None
            frames_iter = ((int(f[0]), f[1], f[2], f[3], f[4]) for f in frames)
            yield from _frame_rows(frames_iter, total, name, name, index, split, options, stats, progress)
            summaries.append({"path": name, "frames": total})

    return _write_dataset(out, options, rows, names, overwrite=overwrite, arguments=arguments)


def _write_dataset(out: str | os.PathLike[str], options: ConvertOptions,
                   rows: Any, sources: Sequence[str], *, overwrite: bool,
                   arguments: Optional[Mapping[str, Any]]) -> ConvertResult:
    """Stream ``rows(stats, summaries)`` into the dataset directory ``out``, atomically."""
    import datasets

    from . import __version__

    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ConvertError(f"{out} exists already; pass overwrite (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    stats = _Stats()
    summaries: List[Dict[str, Any]] = []
    start = time.perf_counter()
    try:
        # A fresh cache inside the temporary directory: rows are streamed to disk, never reused.
        bars_were_on = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            try:
                dataset = datasets.Dataset.from_generator(lambda: rows(stats, summaries), features=dataset_features(),
                                                          cache_dir=str(tmp / "cache"))
            except datasets.exceptions.DatasetGenerationError as exc:
                # datasets wraps errors raised inside the generator; re-raise ours as they are.
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, ValueError):
                    raise cause from None
                raise
            if len(dataset) == 0:
                raise ConvertError(f"no samples could be made from {', '.join(sources)}: "
                                   + "; ".join(stats.reasons[:5]))
            dataset.save_to_disk(str(tmp / "data"))
            del dataset
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        protocol.save_protocol(tmp, [options.specs[t] for t in options.tasks])  # type: ignore[index]
        summary = _summary(options, stats, summaries, arguments, __version__, time.perf_counter() - start)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _publishable(tmp)
        if out.exists() or out.is_symlink():
            old = tmp.with_name(tmp.name + ".old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(out, summary)


def _publishable(root: Path) -> None:
    """Give the temporary directory and its files the permissions of ordinary new files (the
    temporary-file helpers create them private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _summary(options: ConvertOptions, stats: _Stats, bag_summaries: List[Dict[str, Any]],
             arguments: Optional[Mapping[str, Any]], version: str, seconds: float) -> Dict[str, Any]:
    unpaired = sum(sum(b.get("unpaired", {}).values()) + b.get("unpaired_clouds", 0) for b in bag_summaries)
    corrupt = sum(sum(b.get("corrupt", {}).values()) for b in bag_summaries) + stats.counts.get("corrupt_clouds", 0)
    skipped = {k: v for k, v in sorted(stats.counts.items()) if k not in ("frames_read", "frames_used")}
    skipped["unpaired_messages"] = unpaired
    skipped["corrupt_messages"] = corrupt
    skipped["dropped_frames"] = sum(b.get("dropped_frames", 0) for b in bag_summaries)
    return {
        "format": DATASET_FORMAT,
        "format_version": DATASET_VERSION,
        "version": version,
        "bags": bag_summaries,
        "frames_read": stats.counts.get("frames_read", 0),
        "frames_used": stats.counts.get("frames_used", 0),
        "samples": {task: stats.samples.get(task, 0) for task in options.tasks},
        "questions": {task: stats.questions.get(task, 0) for task in options.tasks},
        "samples_by_split": {split: {task: c.get(task, 0) for task in options.tasks}
                             for split, c in stats.samples_by_split.items()},
        "skipped": skipped,
        "reasons": stats.reasons,
        "options": options.to_dict(),
        "arguments": dict(arguments) if arguments is not None else None,
        "seconds": round(seconds, 2),
    }
