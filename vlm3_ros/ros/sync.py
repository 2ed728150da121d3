"""Pairing messages of several streams by stamp (image + camera_info [+ reference depth/pose]).

Plain Python (no rclpy), so it is tested on its own. Stamps are integer nanoseconds of the
messages' headers; expiry is measured in message time too, so it behaves the same with bags,
simulated time and live cameras.

* Exact pairing by default (``tolerance_ns = 0``); with a tolerance, each stream contributes its
  message closest in stamp to the newest arrival, if within the tolerance.
* When a set is complete it is returned and removed; older messages of the same streams can no
  longer be used (a newer set exists) and are dropped as unpaired.
* A message older than ``expiry_ns`` behind the newest stamp seen on any stream, or pushed out of
  a full queue, is dropped as unpaired.

Every drop is counted per stream (``unpaired``), so diagnostics can show e.g. a CameraInfo
stamped with ``now()`` that never pairs.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["StampSync", "SyncCounters"]


@dataclass
class SyncCounters:
    """Per stream: messages received and dropped unpaired; sets completed."""

    received: Dict[str, int] = field(default_factory=dict)
    unpaired: Dict[str, int] = field(default_factory=dict)
    paired: int = 0


class StampSync:
    """Collects messages of ``streams`` and returns them as a set when their stamps agree.

    Thread-safe. ``queue_size`` bounds each stream's queue.
    """

    def __init__(self, streams: Sequence[str], *, tolerance_ns: int = 0, expiry_ns: int = 1_000_000_000,
                 queue_size: int = 10) -> None:
        if not streams:
            raise ValueError("StampSync needs at least one stream")
        if len(set(streams)) != len(streams):
            raise ValueError(f"stream names must be unique, got {list(streams)}")
        self.streams = tuple(streams)
        self._lock = threading.Lock()
        self._queues: Dict[str, List[Tuple[int, int, Any]]] = {s: [] for s in self.streams}
        self._order = 0
        self._newest: Optional[int] = None
        self.counters = SyncCounters({s: 0 for s in self.streams}, {s: 0 for s in self.streams})
        self.configure(tolerance_ns=tolerance_ns, expiry_ns=expiry_ns, queue_size=queue_size)

    def configure(self, *, tolerance_ns: Optional[int] = None, expiry_ns: Optional[int] = None,
                  queue_size: Optional[int] = None) -> None:
        """Change the pairing settings (takes effect at the next message)."""
        with self._lock:
            if tolerance_ns is not None:
                if tolerance_ns < 0:
                    raise ValueError(f"tolerance must be >= 0 ns, got {tolerance_ns}")
                self.tolerance_ns = int(tolerance_ns)
            if expiry_ns is not None:
                if expiry_ns <= 0:
                    raise ValueError(f"expiry must be > 0 ns, got {expiry_ns}")
                self.expiry_ns = int(expiry_ns)
            if queue_size is not None:
                if queue_size < 1:
                    raise ValueError(f"queue size must be >= 1, got {queue_size}")
                self.queue_size = int(queue_size)

    def pending(self) -> Dict[str, int]:
        """Messages waiting per stream."""
        with self._lock:
            return {s: len(q) for s, q in self._queues.items()}

    def clear(self) -> None:
        """Drop every waiting message (not counted: used on a time jump or a reset)."""
        with self._lock:
            for q in self._queues.values():
                q.clear()
            self._newest = None

    def add(self, stream: str, stamp_ns: int, msg: Any) -> Optional[Dict[str, Any]]:
        """Add a message; return ``{stream: message}`` when it completes a set, else None."""
        if stream not in self._queues:
            raise KeyError(f"unknown stream {stream!r}; streams are {self.streams}")
        stamp_ns = int(stamp_ns)
        with self._lock:
            self.counters.received[stream] += 1
            queue = self._queues[stream]
            self._order += 1
            bisect.insort(queue, (stamp_ns, self._order, msg), key=lambda item: (item[0], item[1]))
            if self._newest is None or stamp_ns > self._newest:
                self._newest = stamp_ns
            self._expire()
            chosen = self._match(stamp_ns)
            if chosen is None:
                return None
            result = {}
            for s, index in chosen.items():
                q = self._queues[s]
                result[s] = q[index][2]
                self.counters.unpaired[s] += index  # older messages of this stream are stale now
                del q[: index + 1]
            self.counters.paired += 1
            return result

    # -- internals (lock held) -------------------------------------------------------------------

    def _expire(self) -> None:
        limit = self._newest - self.expiry_ns
        for s, q in self._queues.items():
            drop = 0
            while drop < len(q) and (q[drop][0] < limit or len(q) - drop > self.queue_size):
                drop += 1
            if drop:
                self.counters.unpaired[s] += drop
                del q[:drop]

    def _match(self, anchor: int) -> Optional[Dict[str, int]]:
        chosen: Dict[str, int] = {}
        for s, q in self._queues.items():
            best, best_err = None, None
            for i, (stamp, _, _) in enumerate(q):
                err = abs(stamp - anchor)
                if err <= self.tolerance_ns and (best_err is None or err < best_err):
                    best, best_err = i, err
            if best is None:
                return None
            chosen[s] = best
        return chosen
