"""Dataset rows from a stream of frames: which frames and frame pairs make samples of each task,
their prepared images (PNG) and what was skipped and why."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from vlm3_ros import geometry, protocol
from vlm3_ros.camera import Intrinsics, PreparedImage, prepare_depth, prepare_image
from vlm3_ros.protocol import TaskSpec

from .options import ConvertError, ConvertOptions
from .object_targets import object_targets
from .targets import correspondence_targets, covisibility, depth_targets, pose_targets

__all__ = ["FrameTuple", "PAIR_TASKS", "Stats", "frame_rows", "png_bytes"]

_MAX_REASONS = 50

#: ``(stamp_ns, rgb, intrinsics, depth z or None, T_w_c or None[, detections or None])``: the
#: optional sixth item is the frame's 2D detections (:class:`vlm3_ros.detections.Detection`), for
#: the object task.
FrameTuple = Tuple[Any, ...]


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB image encoded as PNG."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV fails only on absurd input
        raise ConvertError(f"PNG encoding failed for an image of shape {rgb.shape}")
    return buf.tobytes()


@dataclass
class _Frame:
    index: int
    stamp_ns: int
    rgb: np.ndarray
    intrinsics: Intrinsics
    depth: Optional[np.ndarray]
    T_w_c: Optional[np.ndarray]
    split: str
    detections: Optional[List[Any]] = None
    prepared: Dict[Any, Tuple[PreparedImage, Optional[np.ndarray], bytes]] = field(default_factory=dict)

    def prepare(self, spec: TaskSpec) -> Tuple[PreparedImage, Optional[np.ndarray], bytes]:
        """Prepared image, prepared depth (z) and PNG bytes for a spec's preprocessing (cached)."""
        key = (spec.preprocess.mode, spec.preprocess.value, spec.preprocess.undistort)
        if key not in self.prepared:
            prep = prepare_image(self.rgb, self.intrinsics, spec.preprocess)
            depth = prepare_depth(self.depth, prep) if self.depth is not None else None
            self.prepared[key] = (prep, depth, png_bytes(prep.image))
        return self.prepared[key]


class Stats:
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

    def count(self, task: str, split: str, row: Dict[str, Any]) -> Dict[str, Any]:
        """Count a row made (returned as it is)."""
        self.samples[task] += 1
        self.samples_by_split[split][task] += 1
        self.questions[task] += len(row["questions"])
        return row


def _frame_rng(seed: int, source_index: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(source_index), *[int(i) for i in ids]])


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


def frame_rows(frames: Iterable[FrameTuple], total: Optional[int], source: str, label: str, source_index: int,
               split_of_source: Optional[str], options: ConvertOptions, stats: Stats, progress: bool,
               poses_expected: bool = True) -> Iterator[Dict[str, Any]]:
    """Rows of every task from a stream of :data:`FrameTuple` of one source (a bag or a sequence).

    ``split_of_source``: ``"val"`` puts every row of the source in the validation split (a split
    by bag); a split by frame needs ``total``.
    """
    specs = options.specs or {}
    tasks = options.tasks
    single_tasks = [t for t in _SINGLE_FRAME_ROWS if t in tasks]
    pair_tasks = [t for t in _PAIR_ROWS if t in tasks]
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
    for ordinal, item in enumerate(iterator):
        stamp, rgb, intrinsics, depth, pose = item[:5]
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
        frame = _Frame(ordinal, int(stamp), rgb, intrinsics, depth, pose, split, item[5] if len(item) > 5 else None)
        stats.counts["frames_used"] += 1

        for task in single_tasks:
            row = _SINGLE_FRAME_ROWS[task](frame, specs[task], options, stats, source_index, source)
            if row is not None:
                yield stats.count(task, split, row)

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
                        yield stats.count(task, split, row)
        window.append(frame)
        while window and window[0].index < ordinal - max_gap:
            window.popleft()


def _depth_row(frame: _Frame, spec: TaskSpec, options: ConvertOptions, stats: Stats, source_index: int,
               source: str) -> Optional[Dict[str, Any]]:
    prep = frame.prepare(spec)
    q, a, t, counts = depth_targets(prep[0], prep[1], spec, options.points_per_image,
                                    _frame_rng(options.seed, source_index, frame.index, 0), margin=options.margin,
                                    min_depth=options.min_depth, max_depth=options.max_depth)
    stats.counts["out_of_range_pixels"] += counts["out_of_range_pixels"]
    if not q:
        stats.skip("frames_out_of_range", f"{source}: frame {frame.index} at {frame.stamp_ns}: no pixel with a label "
                   f"in the depth range [{options.min_depth}, {options.max_depth}] m inside the margin")
        return None
    return _row("depth", [frame], [prep], q, a, t, source)


def _object_row(frame: _Frame, spec: TaskSpec, options: ConvertOptions, stats: Stats, source_index: int,
                source: str) -> Optional[Dict[str, Any]]:
    if frame.detections is None:
        stats.skip("frames_without_detections", f"{source}: frame {frame.index} at {frame.stamp_ns}: no detections")
        return None
    prep = frame.prepare(spec)
    q, a, t, counts = object_targets(prep[0], prep[1], frame.detections, spec,
                                     _frame_rng(options.seed, source_index, frame.index, 2),
                                     objects_per_image=options.objects_per_image,
                                     object_relations=options.object_relations, question_ids=options.object_questions)
    for key, n in counts.items():
        if n:
            stats.skip(key, n=n)
    if not q:
        stats.skip("frames_without_objects", f"{source}: frame {frame.index} at {frame.stamp_ns}: none of its "
                   f"{len(frame.detections)} detections has a region with depth")
        return None
    return _row("object", [frame], [prep], q, a, t, source)


def _pair_row(task: str, f1: _Frame, f2: _Frame, spec: TaskSpec, options: ConvertOptions, stats: Stats,
              source_index: int, source: str) -> Optional[Dict[str, Any]]:
    assert f1.T_w_c is not None and f2.T_w_c is not None and f1.depth is not None and f2.depth is not None
    T_c1_c2 = geometry.relative_pose(f1.T_w_c, f2.T_w_c)
    covis = covisibility(f1.depth, f1.intrinsics, f2.depth, f2.intrinsics, T_c1_c2, options.occlusion_tolerance)
    return _PAIR_ROWS[task](f1, f2, T_c1_c2, covis, spec, options, stats, source_index, source)


def _pose_row(f1: _Frame, f2: _Frame, T_c1_c2: np.ndarray, covis: float, spec: TaskSpec, options: ConvertOptions,
              stats: Stats, source_index: int, source: str) -> Optional[Dict[str, Any]]:
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
    return _row("pose", [f1, f2], [f1.prepare(spec), f2.prepare(spec)], q, a, t, source)


def _correspondence_row(f1: _Frame, f2: _Frame, T_c1_c2: np.ndarray, covis: float, spec: TaskSpec,
                        options: ConvertOptions, stats: Stats, source_index: int,
                        source: str) -> Optional[Dict[str, Any]]:
    if covis <= 0.0:
        stats.skip("pairs_without_overlap", f"{source}: frames {f1.index}-{f2.index} do not overlap")
        return None
    p1, p2 = f1.prepare(spec), f2.prepare(spec)
    q, a, t = correspondence_targets(p1[0], p1[1], p2[0], p2[1], geometry.invert_pose(T_c1_c2), spec,
                                     options.points_per_pair,
                                     _frame_rng(options.seed, source_index, f1.index, f2.index, 1),
                                     margin=options.margin, tolerance=options.occlusion_tolerance)
    if not q:
        stats.skip("pairs_without_points", f"{source}: frames {f1.index}-{f2.index}: no visible correspondence")
        return None
    t["covisibility"] = round(covis, 4)
    return _row("correspondence", [f1, f2], [p1, p2], q, a, t, source)


#: Row builders per task: one frame -> a row, or a frame pair (with its relative pose and
#: covisibility) -> a row; None when the frame or pair makes no sample (the reason is counted).
_SINGLE_FRAME_ROWS = {"depth": _depth_row, "object": _object_row}
_PAIR_ROWS = {"correspondence": _correspondence_row, "pose": _pose_row}
#: Tasks whose samples are frame pairs (they need camera poses).
PAIR_TASKS = tuple(_PAIR_ROWS)
