"""The transforms of a recording (``tf2_msgs/TFMessage`` on ``/tf`` and ``/tf_static``), for
lookups between any two frames at any stamp."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from vlm3_ros import bags, geometry

from .options import ConvertError

__all__ = ["TF_TOPICS", "TfBuffer", "read_tf"]

TF_TOPICS = ("/tf", "/tf_static")


class TfBuffer:
    """Transforms for lookups at any stamp: static edges are fixed, dynamic ones interpolated
    (linear translation, slerp rotation) between the nearest recorded stamps, or taken from the
    nearest stamp within ``tolerance_ns`` outside the recorded span.
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
        return geometry.make_pose(rot, (1 - a) * stack[k - 1, :3, 3] + a * stack[k, :3, 3])

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
        return geometry.relative_pose(T_root_target, T_root_source)

    def __len__(self) -> int:
        return len(self._static) + sum(len(e[1]) for e in self._dynamic.values())


def read_tf(bag: Path, tolerance_ns: int) -> TfBuffer:
    """Every transform on the bag's TF topics (an empty buffer when it has none)."""
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
