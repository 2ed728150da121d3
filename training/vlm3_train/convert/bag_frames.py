"""Frames of one bag with their depth and camera pose, from whichever sources the bag holds:
depth from a depth image or from a LiDAR cloud projected into the camera, poses from a pose topic
(composed with TF when it describes another frame) or from TF."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from vlm3_ros import bags, msg_codec
from vlm3_ros.camera import Intrinsics, project_cloud

from .bag_detections import BagDetections
from .options import DETECTIONS_TOPIC, ConvertError, ConvertOptions
from .tf_buffer import TF_TOPICS, TfBuffer, read_tf

__all__ = ["BagFrames", "first_message"]


def first_message(bag: Path, topic: str) -> Any:
    """The first message of a topic that decodes, or None."""
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


class BagFrames:
    """Frames of one bag with depth and camera poses from the configured sources.

    ``skip(key, reason)`` is called for every damaged or unusable cloud (counted, not fatal).
    """

    def __init__(self, bag: Path, options: ConvertOptions, skip: Any, needs_pose: bool) -> None:
        self.bag = bag
        self.options = options
        self.skip = skip
        self.info = bags.bag_info(bag)
        topics = dict(bags.TOPICS)
        topics.update(options.topics or {})
        present = self.info["topics"]
        for role in ("image", "camera_info"):
            if topics.get(role) not in present:
                raise ConvertError(f"bag {bag} has no {role} topic {topics.get(role)}; it has {', '.join(sorted(present))}")
        camera_msg = first_message(bag, topics["camera_info"])
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
            self.tf = read_tf(bag, options.tolerance_ns)
        if (self.depth_source == "cloud" or self.pose_source == "tf") and not self.camera_frame:
            raise ConvertError(f"bag {bag}: the camera frame is unknown (no readable camera info frame_id); "
                               "pass camera_frame (--camera-frame)")
        if self.pose_source == "topic":
            first = first_message(bag, topics["pose"])
            if first is None:
                raise ConvertError(f"bag {bag}: no readable message on the pose topic {topics['pose']}")
            child = options.pose_child_frame or str(getattr(first.msg, "child_frame_id", "") or "") or self.camera_frame
            child = child.lstrip("/")
            if child != self.camera_frame:
                if self.tf is None:
                    self.tf = read_tf(bag, options.tolerance_ns)
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
        self.detections: Optional[BagDetections] = None
        if "object" in options.tasks:
            det_topic = (options.topics or {}).get("detections") or DETECTIONS_TOPIC
            if det_topic in present:
                self.detections = BagDetections(bag, det_topic, options.tolerance_ns, skip)
            else:
                skip("bags_without_detections", f"{bag}: no detections topic {det_topic}; object samples skipped")
        self.topics = topics
        self.frames = bags.iter_rgbd_frames(bag, {k: v for k, v in topics.items() if k in bags.ROLES},
                                            tolerance_ns=options.tolerance_ns)
        self.clouds: Optional[Tuple[np.ndarray, List[Tuple[str, Any]]]] = None

    def _load_clouds(self) -> None:
        stamps, entries = [], []
        try:
            messages = bags.read_messages(self.bag, [self.cloud_topic])
            for message in messages:
                try:
                    cloud = msg_codec.read_cloud(message.msg, ["x", "y", "z"])
                    xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=1).astype(np.float64)
                except Exception as exc:  # a damaged cloud is counted, not fatal
                    self.skip("corrupt_clouds", f"{self.bag}: cloud at {message.stamp_ns}: {exc}")
                    continue
                stamps.append(int(message.stamp_ns))
                entries.append((str(message.msg.header.frame_id).lstrip("/"), xyz))
        except bags.BagError as exc:
            self.skip("corrupt_clouds", f"{self.bag}: {exc}")
        order = np.argsort(np.asarray(stamps, dtype=np.int64), kind="stable")
        self.clouds = (np.asarray(stamps, dtype=np.int64)[order], [entries[i] for i in order])
        self._cloud_used = np.zeros(len(stamps), dtype=bool)

    def _cloud_depth(self, stamp_ns: int, intrinsics: Intrinsics) -> Optional[np.ndarray]:
        if self.clouds is None:
            self._load_clouds()
        stamps, entries = self.clouds  # type: ignore[misc]
        best = bags.nearest_stamp(stamps, stamp_ns, self.options.tolerance_ns)
        if best is None:
            return None
        frame_id, xyz = entries[best]
        T = self.options.lidar_extrinsic
        if T is None:
            T = self.tf.lookup(self.camera_frame, frame_id, int(stamps[best])) if self.tf is not None else None
            if T is None:
                self.skip("clouds_without_extrinsic", f"{self.bag}: no TF from cloud frame {frame_id!r} to "
                          f"camera frame {self.camera_frame!r} at {stamps[best]}")
                return None
        self._cloud_used[best] = True
        return project_cloud(xyz, T, intrinsics)

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[Tuple[int, np.ndarray, Intrinsics, Optional[np.ndarray], Optional[np.ndarray], Any]]:
        """``(stamp_ns, rgb, intrinsics, depth z or None, T_w_c or None, detections or None)`` for
        every paired frame (detections: a list of :class:`vlm3_ros.detections.Detection` for the
        object task, None where none are paired)."""
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
            detections = self.detections.at(frame.stamp_ns) if self.detections is not None else None
            yield frame.stamp_ns, frame.rgb, frame.intrinsics, depth, pose, detections

    def summary(self) -> Dict[str, Any]:
        """What was read from the bag, and what could not be paired or decoded."""
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
        if self.detections is not None:
            out["detections"] = self.detections.summary()
        return out
