"""Inference off the executor thread: one pending item, newest wins.

A :class:`LatestWorker` owns one thread. :meth:`submit` (called from subscription callbacks)
stores the item in a single slot; an item still waiting there is replaced and counted as dropped.
The thread takes the slot's item, runs ``process(item)`` and records the latency, so callbacks,
parameter services and diagnostics timers never wait for the model.

An optional ``setup`` callable (e.g. loading a checkpoint) runs on the thread before the first
item; :attr:`state` tells diagnostics where the worker is ("loading", "ready", "busy", "failed",
"stopped"). Plain Python (no rclpy).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

__all__ = ["LatestWorker"]

_EMPTY = object()


class LatestWorker:
    """Runs ``process`` on the newest submitted item, one at a time, on its own thread.

    ``on_error(item, exc)`` is called (on the worker thread) when ``process`` raises; the worker
    then goes on with the next item. ``setup`` failing puts the worker in state "failed"
    (``error`` holds the message); items are then refused, and not counted as dropped: the worker
    is not busy, it cannot serve at all (the state says so).
    """

    def __init__(self, process: Callable[[Any], Any], *, name: str = "worker",
                 on_error: Optional[Callable[[Any, BaseException], None]] = None,
                 setup: Optional[Callable[[], Any]] = None) -> None:
        self._process = process
        self._on_error = on_error
        self._setup = setup
        self._cond = threading.Condition()
        self._slot: Any = _EMPTY
        self._stop = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.state = "created"
        self.error: Optional[str] = None
        self.submitted = 0
        self.dropped = 0
        self.processed = 0
        self.failed = 0
        self.last_latency: Optional[float] = None

    # -- control ---------------------------------------------------------------------------------

    def start(self) -> "LatestWorker":
        self.state = "loading" if self._setup else "ready"
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the thread to finish (after its current item); True if it ended within ``timeout``."""
        with self._cond:
            self._stop = True
            if self._slot is not _EMPTY:
                self._slot = _EMPTY
                self.dropped += 1
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        ended = not self._thread.is_alive()
        self.state = "stopped"
        return ended

    def submit(self, item: Any) -> bool:
        """Offer an item; returns True if it replaced (dropped) one still waiting."""
        with self._cond:
            if self.state == "failed":
                return False
            self.submitted += 1
            if self._stop:
                self.dropped += 1
                return True
            replaced = self._slot is not _EMPTY
            if replaced:
                self.dropped += 1
            self._slot = item
            self._cond.notify()
            return replaced

    @property
    def busy(self) -> bool:
        """True while an item is being processed."""
        return self._busy

    @property
    def pending(self) -> bool:
        """True while an item waits in the slot."""
        return self._slot is not _EMPTY

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending or running (for shutdown and tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._busy and self._slot is _EMPTY and self.state != "loading":
                return True
            time.sleep(0.005)
        return False

    # -- thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        if self._setup is not None:
            try:
                self._setup()
            except BaseException as exc:  # noqa: BLE001 - reported through state and error
                self.error = f"{type(exc).__name__}: {exc}"
                with self._cond:
                    self.state = "failed"
                    self._slot = _EMPTY  # never served: not a drop of a busy worker
                return
            self.state = "ready"
        while True:
            with self._cond:
                while self._slot is _EMPTY and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                item, self._slot = self._slot, _EMPTY
                self._busy = True
            self.state = "busy"
            t0 = time.perf_counter()
            try:
                self._process(item)
                self.processed += 1
            except BaseException as exc:  # noqa: BLE001 - a bad frame must not end the thread
                self.failed += 1
                if self._on_error is not None:
                    try:
                        self._on_error(item, exc)
                    except Exception:  # noqa: BLE001
                        pass
            finally:
                self.last_latency = time.perf_counter() - t0
                with self._cond:
                    self._busy = False
                if self.state == "busy":
                    self.state = "ready"
