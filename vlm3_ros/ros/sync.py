"""Pairing messages of several streams by stamp (image + camera_info [+ reference depth/pose]).

Plain Python (no rclpy), so it is tested on its own. Stamps are integer nanoseconds of the
messages' headers; every rule below is in message time, so it behaves the same with bags,
simulated time and live cameras, however late a message is delivered.

* Exact pairing by default (``tolerance_ns = 0``); with a tolerance, each stream contributes its
  message closest in stamp to the newest arrival, if within the tolerance.
* When a set is complete it is returned and removed; older messages of the same streams can no
  longer be used (a newer set exists) and are dropped as ``unpaired``.
* **Late**: a message older than the last set handed on (or as old as that set's message of its
  stream) can never be served: it is dropped and counted as ``late``. A stream delivered late
  (a lagging camera_info, a delaying relay) is therefore never mistaken for a restart.
* **Expiry**: a waiting message is dropped as ``unpaired`` once a stream that still lacks its
  partner has moved on by more than ``expiry_ns`` past it (that stream will not send it any
  more). A stream lagging behind the others does not expire their messages: they wait for it.
* **Queues** hold ``queue_size`` messages per stream; beyond that the message closest in stamp to
  its older neighbour is dropped (``unpaired``), so a queue waiting for a lagging stream keeps
  messages spread over the lag rather than only the newest few.
* **Time jump**: a stream's *own* stamps going back by more than ``expiry_ns`` for two messages in
  a row (a bag played again, a clock reset) start a new timeline: waiting messages are dropped
  (``unpaired``), :attr:`epoch` increases and ``time_jumps`` is counted once, however many streams
  follow. A single message far behind is late, not a jump. The other streams' messages from
  before the jump are dropped (``unpaired``) until they go back too.

Every drop is counted per stream, so diagnostics can show e.g. a CameraInfo stamped with
``now()`` that never pairs (``unpaired``) or a lagging stream (``late``).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

__all__ = ["Offer", "StampSync", "SyncCounters"]


@dataclass
class SyncCounters:
    """Per stream: messages received, dropped unpaired and dropped late; sets completed; time jumps."""

    received: Dict[str, int] = field(default_factory=dict)
    unpaired: Dict[str, int] = field(default_factory=dict)
    late: Dict[str, int] = field(default_factory=dict)
    paired: int = 0
    time_jumps: int = 0


class Offer(NamedTuple):
    """What became of an offered message.

    ``status``: ``"paired"`` (it completed ``messages``), ``"waiting"``, ``"late"`` (dropped),
    ``"held"`` (far behind its stream: late unless the next one confirms a time jump),
    ``"stale"`` (from before a time jump, dropped). ``jumped`` is True for the message that
    started a new timeline; ``epoch`` is the timeline the set belongs to; ``behind_ns`` how far a
    late or held message is behind.
    """

    status: str
    messages: Optional[Dict[str, Any]] = None
    epoch: int = 0
    jumped: bool = False
    behind_ns: int = 0


_Entry = Tuple[int, int, Any]  # stamp, arrival order, message


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
        self._queues: Dict[str, List[_Entry]] = {s: [] for s in self.streams}
        self._order = 0
        self.epoch = 0
        self._newest: Dict[str, Optional[int]] = {s: None for s in self.streams}
        self._served: Dict[str, Optional[int]] = {s: None for s in self.streams}
        self._served_min: Optional[int] = None
        self._held: Dict[str, Optional[_Entry]] = {s: None for s in self.streams}
        self._before_jump: Set[str] = set()
        self.counters = SyncCounters({s: 0 for s in self.streams}, {s: 0 for s in self.streams},
                                     {s: 0 for s in self.streams})
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
        """Drop every waiting message and forget the timeline (not counted: used on a reset)."""
        with self._lock:
            for q in self._queues.values():
                q.clear()
            for s in self.streams:
                self._newest[s] = self._served[s] = self._held[s] = None
            self._served_min = None
            self._before_jump.clear()

    def add(self, stream: str, stamp_ns: int, msg: Any) -> Optional[Dict[str, Any]]:
        """Add a message; return ``{stream: message}`` when it completes a set, else None."""
        return self.offer(stream, stamp_ns, msg).messages

    def offer(self, stream: str, stamp_ns: int, msg: Any) -> Offer:
        """Add a message; the :class:`Offer` says whether it completed a set, waits or was dropped."""
        if stream not in self._queues:
            raise KeyError(f"unknown stream {stream!r}; streams are {self.streams}")
        t = int(stamp_ns)
        with self._lock:
            self.counters.received[stream] += 1
            self._order += 1
            entry = (t, self._order, msg)
            newest = self._newest[stream]
            jumped = False
            if newest is not None and t < newest - self.expiry_ns:
                # This stream's own stamps went back.
                if stream in self._before_jump:  # it follows a time jump already counted
                    self._before_jump.discard(stream)
                    self._drop(stream, len(self._queues[stream]), "unpaired")
                    self._newest[stream] = None
                else:
                    held = self._held[stream]
                    if held is None or t <= held[0]:
                        if held is not None:
                            self.counters.late[stream] += 1
                        self._held[stream] = entry
                        return Offer("held", epoch=self.epoch, behind_ns=newest - t)
                    self._jump(stream, held)  # a second message behind, newer than the first: a new timeline
                    jumped = True
            elif stream in self._before_jump:
                if self._is_before_jump(t):
                    self.counters.unpaired[stream] += 1
                    return Offer("stale", epoch=self.epoch)
                self._before_jump.discard(stream)  # it is on the new timeline already
            if self._held[stream] is not None:  # the held message was a late one after all
                self._held[stream] = None
                self.counters.late[stream] += 1
            served = self._served[stream]
            if not jumped and ((served is not None and t <= served)
                               or (self._served_min is not None and t < self._served_min)):
                self.counters.late[stream] += 1
                reference = max(x for x in (served, self._served_min) if x is not None)
                return Offer("late", epoch=self.epoch, behind_ns=reference - t)
            self._insert(stream, entry)
            if self._newest[stream] is None or t > self._newest[stream]:
                self._newest[stream] = t
            self._expire()
            chosen = self._match(t)
            if chosen is None and jumped:  # the new timeline's first frame may be complete already
                chosen = self._match(self._queues[stream][0][0])
            if chosen is None:
                return Offer("waiting", epoch=self.epoch, jumped=jumped)
            result = {}
            stamps = []
            for s, index in chosen.items():
                q = self._queues[s]
                result[s] = q[index][2]
                stamps.append(q[index][0])
                self._served[s] = q[index][0]
                self._drop(s, index, "unpaired")  # older messages of this stream are stale now
                del q[0]
            self._served_min = min(stamps)
            self.counters.paired += 1
            return Offer("paired", result, epoch=self.epoch, jumped=jumped)

    # -- internals (lock held) -------------------------------------------------------------------

    def _drop(self, stream: str, count: int, counter: str) -> None:
        if count > 0:
            getattr(self.counters, counter)[stream] += count
            del self._queues[stream][:count]

    def _insert(self, stream: str, entry: _Entry) -> None:
        queue = self._queues[stream]
        bisect.insort(queue, entry, key=lambda item: (item[0], item[1]))
        while len(queue) > self.queue_size:
            # Drop the message closest to its older neighbour (the oldest when only two are left), so
            # the queue stays spread over time; the newest always stays.
            if len(queue) <= 2:
                index = 0
            else:
                index = min(range(1, len(queue) - 1), key=lambda i: (queue[i][0] - queue[i - 1][0], i))
            del queue[index]
            self.counters.unpaired[stream] += 1

    def _jump(self, stream: str, held: _Entry) -> None:
        """``stream`` restarted at ``held``: a new timeline (the caller inserts the current message)."""
        self.counters.time_jumps += 1
        self.epoch += 1
        self._served_min = None
        self._held[stream] = None
        self._newest[stream] = held[0]
        self._before_jump = set()
        for s in self.streams:
            self._drop(s, len(self._queues[s]), "unpaired")
            self._served[s] = None
            other = self._held[s]
            self._held[s] = None
            if s == stream:
                continue
            if other is not None and abs(other[0] - held[0]) <= self.expiry_ns:
                # it went back with this stream: the first message of its new timeline
                self._queues[s].append(other)
                self._newest[s] = other[0]
                continue
            if other is not None:
                self.counters.late[s] += 1
            if self._newest[s] is not None and self._newest[s] > held[0] + self.expiry_ns:
                # ahead of the new timeline: its messages are from before the jump until it goes back too
                self._before_jump.add(s)
        self._queues[stream].append(held)

    def _is_before_jump(self, t: int) -> bool:
        frontier = [n for s, n in self._newest.items() if n is not None and s not in self._before_jump]
        return bool(frontier) and t > max(frontier) + self.expiry_ns

    def _has_partner(self, stream: str, t: int) -> bool:
        queue = self._queues[stream]
        i = bisect.bisect_left(queue, t - self.tolerance_ns, key=lambda item: item[0])
        return i < len(queue) and queue[i][0] <= t + self.tolerance_ns

    def _expire(self) -> None:
        for s, q in self._queues.items():
            others = [(o, n) for o, n in self._newest.items()
                      if o != s and n is not None and o not in self._before_jump]
            keep = []
            for entry in q:
                t = entry[0]
                expired = any(n > t + self.tolerance_ns + self.expiry_ns and not self._has_partner(o, t)
                              for o, n in others)
                if expired:
                    self.counters.unpaired[s] += 1
                else:
                    keep.append(entry)
            if len(keep) != len(q):
                q[:] = keep

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
