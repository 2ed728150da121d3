"""Node health on /diagnostics: rates, latency, drops, rejected frames, parse failures, backend state.

:class:`NodeStats` collects the numbers (thread-safe; callbacks and the worker thread update it) and
:meth:`NodeStats.status` turns them into one ``diagnostic_msgs/DiagnosticStatus`` per node:

* level ERROR when the backend failed to load, WARN when frames were rejected, answers failed to
  parse, frames were dropped, messages arrived late or stamps jumped back since the previous
  report, or a server backend's last request failed (``backend_connection``:
  ``backend_unreachable``, ``backend_timeout``...), OK otherwise (answers the oracle has no
  reference for are counted, not warned about);
* key/values: backend and its state, input rate per stream, output rate, latency (mean, max over
  the window; and its parts: waiting for the worker, processing, of which the backend's answer),
  processed / dropped (busy) /
  unpaired / late counts, time jumps, rejected frames per kind, parse failures, answers without
  a reference value, the last problem.

:class:`Throttle` limits repeated warnings per kind of problem.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Deque, Dict, Iterable, Mapping, Optional

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

__all__ = ["NodeStats", "RateMeter", "Throttle"]


class RateMeter:
    """Events per second over a sliding window (wall clock); shorter at start-up."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._start = time.monotonic()
        self._times: Deque[float] = collections.deque()

    def tick(self, now: Optional[float] = None) -> None:
        self._times.append(time.monotonic() if now is None else now)

    def rate(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()
        span = min(self.window, max(now - self._start, 1e-3))
        return len(self._times) / span


class Throttle:
    """``ready(kind)`` is True at most once per ``period`` seconds for each kind."""

    def __init__(self, period: float = 5.0) -> None:
        self.period = period
        self._last: Dict[str, float] = {}
        self._lock = threading.Lock()

    def ready(self, kind: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.period:
                return False
            self._last[kind] = now
            return True


class NodeStats:
    """Counters and meters of one node."""

    def __init__(self, name: str, streams: Iterable[str], window: float = 5.0) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.inputs = {s: RateMeter(window) for s in streams}
        self.output = RateMeter(window)
        self.latencies: Deque[tuple] = collections.deque()
        self.window = window
        self.published = 0
        self.rejected: Dict[str, int] = collections.Counter()
        self.parse_failures = 0
        self.no_reference = 0
        self.backend_times: Deque[tuple] = collections.deque()
        self.last_problem: Optional[str] = None
        self._reported: Dict[str, int] = {}

    def received(self, stream: str) -> None:
        with self._lock:
            self.inputs[stream].tick()

    def served(self, latency: float, wait: float = 0.0, process: float = 0.0) -> None:
        """A frame was published, ``latency`` seconds after its messages were paired, of which it
        waited ``wait`` for the worker and took ``process`` to serve."""
        now = time.monotonic()
        with self._lock:
            self.output.tick(now)
            self.published += 1
            self.latencies.append((now, latency, wait, process))

    def reject(self, kind: str, message: str) -> None:
        with self._lock:
            self.rejected[kind] += 1
            self.last_problem = f"{kind}: {message}"

    def backend_time(self, seconds: float) -> None:
        """The backend took ``seconds`` to answer a frame's questions (inside the node's processing)."""
        with self._lock:
            self.backend_times.append((time.monotonic(), seconds))

    def unreferenced(self, count: int) -> None:
        """``count`` answers said there is no reference value at their pixel (the oracle's "unknown")."""
        if count > 0:
            with self._lock:
                self.no_reference += count

    def parse_failed(self, count: int, message: Optional[str] = None) -> None:
        if count <= 0:
            return
        with self._lock:
            self.parse_failures += count
            if message:
                self.last_problem = f"parse_failure: {message}"

    def snapshot(self) -> Dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            while self.latencies and self.latencies[0][0] < now - self.window:
                self.latencies.popleft()
            while self.backend_times and self.backend_times[0][0] < now - self.window:
                self.backend_times.popleft()
            lat = [v[1] for v in self.latencies]

            def mean(values: list) -> float:
                return sum(values) / len(values) if values else float("nan")

            return {
                "input_rates": {s: m.rate(now) for s, m in self.inputs.items()},
                "output_rate": self.output.rate(now),
                "latency_mean": mean(lat),
                "latency_max": max(lat) if lat else float("nan"),
                "wait_mean": mean([v[2] for v in self.latencies]),
                "process_mean": mean([v[3] for v in self.latencies]),
                "backend_mean": mean([v for _, v in self.backend_times]),
                "published": self.published,
                "rejected": dict(self.rejected),
                "parse_failures": self.parse_failures,
                "no_reference": self.no_reference,
                "last_problem": self.last_problem,
            }

    def status(self, *, hardware_id: str, backend: str, worker: Any, sync: Any,
               extra: Optional[Mapping[str, Any]] = None) -> DiagnosticStatus:
        """The node's DiagnosticStatus (see the module docstring)."""
        s = self.snapshot()
        counts = {
            "dropped_busy": worker.dropped,
            "unpaired": sum(sync.counters.unpaired.values()),
            "late": sum(sync.counters.late.values()),
            "time_jumps": sync.counters.time_jumps,
            "rejected": sum(s["rejected"].values()),
            "parse_failures": s["parse_failures"],
            "backend_failed": int(worker.state == "failed"),
        }
        changed = {k: v - self._reported.get(k, 0) for k, v in counts.items()}
        self._reported = counts
        warn_on = ("rejected", "parse_failures", "dropped_busy", "unpaired", "late", "time_jumps")
        if worker.state == "failed":
            level, message = DiagnosticStatus.ERROR, f"backend failed: {worker.error}"
        elif any(changed[k] > 0 for k in warn_on):
            problems = [k for k in warn_on if changed[k] > 0]
            level, message = DiagnosticStatus.WARN, f"{worker.state}; since last report: " + ", ".join(
                f"{changed[k]} {k}" for k in problems)
        else:
            level, message = DiagnosticStatus.OK, worker.state
        connection = str((extra or {}).get("backend_connection", "connected"))
        if level != DiagnosticStatus.ERROR and connection not in ("connected", "not contacted"):
            # A remote backend's last request failed (unreachable, timeout...): say so first.
            level = DiagnosticStatus.WARN
            message = f"backend {connection}; {message}"
        values = {
            "backend": backend,
            "backend_state": worker.state,
            "output_rate_hz": f"{s['output_rate']:.3f}",
            "latency_mean_ms": f"{1e3 * s['latency_mean']:.1f}",
            "latency_max_ms": f"{1e3 * s['latency_max']:.1f}",
            "wait_ms_mean": f"{1e3 * s['wait_mean']:.1f}",
            "process_ms_mean": f"{1e3 * s['process_mean']:.1f}",
            "backend_ms_mean": f"{1e3 * s['backend_mean']:.1f}",
            "frames_submitted": worker.submitted,
            "frames_processed": worker.processed,
            "frames_published": s["published"],
            "dropped_busy": worker.dropped,
            "parse_failures": s["parse_failures"],
            "no_reference": s["no_reference"],
            "frames_rejected": counts["rejected"],
            "sets_paired": sync.counters.paired,
            "unpaired": counts["unpaired"],
            "late": counts["late"],
            "time_jumps": counts["time_jumps"],
        }
        for stream, rate in s["input_rates"].items():
            values[f"input_rate_hz.{stream}"] = f"{rate:.3f}"
        for stream, n in sync.counters.received.items():
            values[f"received.{stream}"] = n
        for stream, n in sync.counters.unpaired.items():
            values[f"unpaired.{stream}"] = n
        for stream, n in sync.counters.late.items():
            values[f"late.{stream}"] = n
        for kind, n in sorted(s["rejected"].items()):
            values[f"rejected.{kind}"] = n
        values.update(extra or {})
        values["last_problem"] = s["last_problem"] or ""
        return DiagnosticStatus(level=level, name=self.name, message=message, hardware_id=hardware_id,
                                values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
