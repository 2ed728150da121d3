"""2D detections of a bag (``vision_msgs/Detection2DArray``) paired with its frames by header stamp,
for the object task."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from vlm3_ros import bags
from vlm3_ros.detections import Detection, detections_from_msg, register_vision_types

__all__ = ["BagDetections"]


class BagDetections:
    """The detection arrays of one topic, looked up by stamp (nearest within ``tolerance_ns``).

    A message that cannot be decoded, and each bad box in one, is counted through ``skip`` (not
    fatal)."""

    def __init__(self, bag: Path, topic: str, tolerance_ns: int, skip: Any) -> None:
        self.bag, self.topic, self.tolerance_ns, self.skip = bag, topic, int(tolerance_ns), skip
        register_vision_types(bags.typestore())
        stamps: List[int] = []
        arrays: List[List[Detection]] = []
        for raw in bags.read_raw(bag, [topic]):
            try:
                msg = bags.typestore().deserialize_cdr(raw.data, raw.msgtype)
                found, bad = detections_from_msg(msg)
            except Exception as exc:  # a damaged message is counted, not fatal
                skip("corrupt_detections", f"{bag}: {topic} at log time {raw.log_time_ns}: {exc}")
                continue
            for reason in bad:
                skip("bad_detections", f"{bag}: {topic} at log time {raw.log_time_ns}: {reason}")
            stamp = msg.header.stamp
            stamps.append(int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec))
            arrays.append(found)
        order = np.argsort(np.asarray(stamps, dtype=np.int64), kind="stable")
        self.stamps = np.asarray(stamps, dtype=np.int64)[order]
        self.arrays = [arrays[i] for i in order]
        self.used = np.zeros(len(self.stamps), dtype=bool)

    def at(self, stamp_ns: int) -> Optional[List[Detection]]:
        """The detections stamped nearest to ``stamp_ns`` within the tolerance, or None."""
        best = bags.nearest_stamp(self.stamps, stamp_ns, self.tolerance_ns)
        if best is None:
            return None
        self.used[best] = True
        return self.arrays[best]

    def summary(self) -> Dict[str, Any]:
        return {"topic": self.topic, "messages": int(len(self.stamps)), "unpaired": int((~self.used).sum())}
