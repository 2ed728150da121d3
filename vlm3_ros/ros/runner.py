"""Running nodes in one process: rclpy set up from command-line arguments, one executor, clean
shutdown on SIGINT / SIGTERM.

The executor is single-threaded: the nodes' callbacks only pair messages, answer parameter
requests and publish diagnostics (inference runs on each node's worker thread). A
MultiThreadedExecutor costs about 2.5 times more CPU per message in its own bookkeeping and
holds the interpreter lock most of the time under a 30 Hz camera, slowing the worker threads
(measured in BENCHMARKS.md); ``threads`` > 1 still selects one.

Used by the ``depth_node`` and ``odometry_node`` console scripts (one node each) and by
``vlm3-ros perception`` (both nodes, sharing one loaded checkpoint).

Exit status: 0 after a clean stop, 2 for invalid parameters, 1 when a node could not start (its
model did not load, or a lifecycle transition ``autostart`` asked for failed), so a launch file or
a service manager sees the failure.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable, List, Optional, Sequence

__all__ = ["run_nodes"]


def run_nodes(factories: Sequence[Callable[..., Any]], *, args: Optional[List[str]] = None,
              duration: Optional[float] = None, threads: int = 1, autostart: bool = False) -> int:
    """Create a node per factory (called with ``context=``), spin them until shutdown.

    ``args`` are the process arguments (``--ros-args ...`` is honoured: parameters files,
    remappings, ``-p`` values, namespaces). ``duration`` stops after that many seconds (smoke runs).
    ``autostart``: configure and activate nodes that were created managed (waiting unconfigured),
    as the launch file's ``autostart`` does. Returns the exit status.
    """
    from .dds import use_large_shared_memory

    use_large_shared_memory()  # camera-sized messages through shared memory without losses (see dds.py)
    from .node_base import NodeStartError

    import rclpy
    from rclpy.context import Context
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    # Signals are handled here (not by rclpy): the executor is spun in short slices so a SIGINT or
    # SIGTERM stops it promptly whatever the clock (with use_sim_time and no /clock, timers never fire).
    context = Context()
    rclpy.init(args=args, context=context, signal_handler_options=SignalHandlerOptions.NO)
    nodes: List[Any] = []
    executor = (MultiThreadedExecutor(num_threads=threads, context=context) if threads > 1
                else SingleThreadedExecutor(context=context))
    stop = threading.Event()

    def _request_stop(*_: Any) -> None:
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _request_stop)
    status = 0
    try:
        for factory in factories:
            node = factory(context=context)
            nodes.append(node)
            executor.add_node(node)
        if autostart:
            for node in nodes:
                if node.lifecycle_state == "unconfigured":
                    node.bring_up()
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while not stop.is_set() and context.ok():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                executor.spin_once(timeout_sec=0.1)
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
    except ValueError as exc:  # invalid parameters at start
        print(f"error: {exc}", flush=True)
        status = 2
    except NodeStartError as exc:
        print(f"error: {exc}", flush=True)
        status = 1
    finally:
        for node in reversed(nodes):
            try:
                executor.remove_node(node)
                node.destroy_node()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        executor.shutdown(timeout_sec=2.0)
        context.try_shutdown()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status

