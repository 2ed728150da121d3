"""Running nodes in one process: rclpy set up from command-line arguments, a MultiThreadedExecutor,
clean shutdown on SIGINT / SIGTERM.

Used by the ``depth_node`` and ``odometry_node`` console scripts (one node each) and by
``vlm3-ros perception`` (both nodes, sharing one loaded checkpoint).
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, List, Optional, Sequence

__all__ = ["run_nodes"]


def run_nodes(factories: Sequence[Callable[..., Any]], *, args: Optional[List[str]] = None,
              duration: Optional[float] = None, threads: Optional[int] = None) -> int:
    """Create a node per factory (called with ``context=``), spin them until shutdown.

    ``args`` are the process arguments (``--ros-args ...`` is honoured: parameters files,
    remappings, ``-p`` values, namespaces). ``duration`` stops after that many seconds (smoke runs).
    Returns the exit status.
    """
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    context = Context()
    rclpy.init(args=args, context=context)
    nodes: List[Any] = []
    executor = MultiThreadedExecutor(num_threads=threads, context=context)
    stop = threading.Event()

    def _request_stop(*_: Any) -> None:
        stop.set()
        context.try_shutdown()

    previous = signal.signal(signal.SIGTERM, _request_stop) if threading.current_thread() is threading.main_thread() else None
    status = 0
    try:
        for factory in factories:
            node = factory(context=context)
            nodes.append(node)
            executor.add_node(node)
        if duration is not None:
            timer = threading.Timer(duration, _request_stop)
            timer.daemon = True
            timer.start()
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
    except ValueError as exc:  # invalid parameters at start
        print(f"error: {exc}", flush=True)
        status = 2
    finally:
        for node in reversed(nodes):
            try:
                executor.remove_node(node)
                node.destroy_node()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        executor.shutdown(timeout_sec=2.0)
        context.try_shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return status
