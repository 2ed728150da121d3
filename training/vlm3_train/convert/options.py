"""What a conversion produces and how it reads its inputs: :class:`ConvertOptions`, validated up
front so that a bad option fails before any bag is read, and the task specs it labels with."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from vlm3_ros import protocol
from vlm3_ros.protocol import TaskSpec

from .object_targets import check_object_options, check_object_spec

__all__ = ["ConvertError", "ConvertOptions", "DEFAULT_TASKS", "DETECTIONS_TOPIC", "TASK_NAMES", "check_spec", "load_specs"]

#: Tasks produced unless asked otherwise.
DEFAULT_TASKS = ("depth", "correspondence", "pose")
#: Every task a conversion can produce (``object`` needs 2D detections: a Detection2DArray topic
#: of the bag or detections given with in-memory frames).
TASK_NAMES = DEFAULT_TASKS + ("object",)
#: Default topic of the 2D detections (vision_msgs/Detection2DArray) for the object task.
DETECTIONS_TOPIC = "/detections"


class ConvertError(ValueError):
    """A conversion request or input cannot be turned into a dataset (names the option or bag)."""


@dataclass
class ConvertOptions:
    """What :func:`vlm3_train.convert.convert_bags` produces and how it reads the bags.

    Attributes:
        tasks: task names to produce (``depth``, ``correspondence``, ``pose``, ``object``; default
            the first three).
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
            :data:`vlm3_ros.bags.TOPICS`; ``detections`` for the object task, default
            :data:`DETECTIONS_TOPIC`).
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
        objects_per_image: object task: at most this many detections per frame (highest score first).
        object_relations: object task: questions about two regions per frame (drawn among the pairs).
        object_questions: object task: question ids or short names to ask (default: all of the spec's).
    """

    tasks: Tuple[str, ...] = DEFAULT_TASKS
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
    objects_per_image: int = 6
    object_relations: int = 8
    object_questions: Tuple[str, ...] = ()

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
        try:
            self.object_questions = check_object_options(self.objects_per_image, self.object_relations,
                                                         tuple(self.object_questions))
        except ValueError as exc:
            raise ConvertError(str(exc)) from None
        specs = dict(self.specs) if self.specs else {}
        for task in self.tasks:
            spec = specs.get(task) or protocol.TASKS[task]
            check_spec(task, spec, self.object_questions)
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


def check_spec(task: str, spec: TaskSpec, wanted: Sequence[str] = ()) -> None:
    """Raise :class:`ConvertError` unless ``spec`` can label ``task`` (for the object task: the
    questions ``wanted``, default all of the spec's)."""
    if not isinstance(spec, TaskSpec):
        raise ConvertError(f"spec for task {task!r} must be a TaskSpec, got {type(spec).__name__}")
    if task == "object":
        problem = check_object_spec(spec, wanted)
        if problem:
            raise ConvertError(problem)
        return
    needs_images = {"depth": 1, "correspondence": 2, "pose": 2}[task]
    if spec.num_images != needs_images:
        raise ConvertError(f"spec for task {task!r} must take {needs_images} image(s), it takes {spec.num_images}")
    if task in ("depth", "correspondence") and not spec.coord_scale:
        raise ConvertError(f"spec for task {task!r} needs a coord_scale for pixel coordinates")
    if task == "depth" and spec.option("depth_kind", "ray") not in ("ray", "z"):
        raise ConvertError(f"depth spec option depth_kind must be 'ray' or 'z', got {spec.option('depth_kind')!r}")
    unanswered = [q for q in spec.questions if q not in spec.answers]
    if unanswered:
        raise ConvertError(f"spec for task {task!r} has questions without an answer template: {unanswered}")
    if task == "pose":
        # What a relative pose is read from (protocol.parse_pose_answers); the rest is optional.
        missing = [q for q in ("euler", "translation_direction") if q not in spec.questions]
        unknown = [q for q in spec.questions if q not in protocol.POSE_QUESTION_IDS]
        if missing or unknown:
            raise ConvertError(f"pose spec must ask euler and translation_direction and only pose questions "
                               f"{list(protocol.POSE_QUESTION_IDS)}; missing {missing}, unknown {unknown}")


def load_specs(spec_file: Optional[str | os.PathLike[str]], tasks: Sequence[str] = TASK_NAMES,
               base: str = "vlm3") -> Dict[str, TaskSpec]:
    """Task specs for ``tasks``: from a protocol JSON file (or a directory holding
    ``vlm3_protocol.json``) where given, else the built-in ones of ``base`` (``vlm3``: the
    released checkpoints' protocol, :data:`vlm3_ros.protocol.TASKS`; ``compact``:
    :data:`vlm3_ros.protocol.COMPACT_TASKS`). Tasks the file does not define use the built-in specs."""
    builtin = {"vlm3": protocol.TASKS, "compact": protocol.COMPACT_TASKS}.get(base)
    if builtin is None:
        raise ConvertError(f"unknown protocol {base!r}; expected vlm3 or compact")
    specs = {task: builtin[task] for task in tasks if task in builtin}
    if spec_file is None:
        return specs
    path = Path(spec_file)
    if not path.exists():
        raise ConvertError(f"spec file {path} does not exist")
    try:
        loaded = protocol.load_protocol(path)
    except protocol.ProtocolError as exc:
        raise ConvertError(f"spec file {path}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise ConvertError(f"spec file {path} is not a valid protocol file: {exc}") from exc
    if loaded is None:
        raise ConvertError(f"{path} holds no {protocol.PROTOCOL_FILENAME}")
    for task in tasks:
        if task in loaded:
            specs[task] = loaded[task]
    return specs
