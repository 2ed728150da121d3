"""Shared helpers and pytest fixtures for tests that talk ROS 2 (rclpy over real DDS).

Fixtures (registered for every test through ``test/conftest.py``):

``ros_domain_id``
    A ROS domain id unique to this test (derived from the pid and a per-process counter), with
    ``ROS_DOMAIN_ID`` and ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` set in ``os.environ`` for
    the duration of the test, so that concurrent test runs on one machine do not see each other
    and nothing leaves the loopback interface.

``ros``
    A :class:`RosTestContext`: its own initialised ``rclpy`` context on that domain, an executor,
    ``ros.node(name)`` to create nodes that are destroyed at teardown, and
    ``ros.spin_until(predicate, timeout)``.  The context is shut down after the test.  Tests are
    skipped (with the reason) when rclpy cannot be imported.

Plain helpers: :func:`spin_until` (any executor), :func:`ros_subprocess_env` (environment for a
child process that must join the test's domain) and :func:`wait_for_subscribers`.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

#: Domain ids handed out here stay in 1..100: ids above 101 collide with Linux ephemeral ports.
DOMAIN_ID_RANGE = 100

_counter = itertools.count()


def next_domain_id() -> int:
    """A domain id that differs between processes (pid) and between calls in one process."""
    return 1 + (os.getpid() * 7 + next(_counter)) % DOMAIN_ID_RANGE


def ros_subprocess_env(domain_id: int, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for a child process joining ``domain_id`` on the loopback interface only."""
    env = dict(os.environ if base is None else base)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    # The ROS 2 wheels re-execute each interpreter once to set its library path and mark that in
    # this variable; without the inherited marker the child sets up its own library path.
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    return env


def spin_until(executor: Any, predicate: Callable[[], bool], timeout: float,
               step: float = 0.02) -> bool:
    """Spin ``executor`` until ``predicate()`` is true or ``timeout`` seconds pass.

    Returns the final value of the predicate, so ``assert spin_until(...)`` reads naturally.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bool(predicate())
        executor.spin_once(timeout_sec=min(step, remaining))
    return True


def wait_for_subscribers(executor: Any, publisher: Any, count: int = 1, timeout: float = 10.0) -> bool:
    """Spin until ``publisher`` has matched at least ``count`` subscriptions (DDS discovery)."""
    return spin_until(executor, lambda: publisher.get_subscription_count() >= count, timeout)


class RosTestContext:
    """An initialised rclpy context with an executor and nodes owned by one test."""

    def __init__(self, domain_id: int) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        self.domain_id = domain_id
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.executor = SingleThreadedExecutor(context=self.context)
        self._nodes: List[Any] = []

    def node(self, name: str, **kwargs: Any) -> Any:
        """Create a node in this context, add it to the executor; destroyed at teardown."""
        from rclpy.node import Node

        created = Node(name, context=self.context, **kwargs)
        self._nodes.append(created)
        self.executor.add_node(created)
        return created

    def spin_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Spin this context's executor until ``predicate()`` holds or ``timeout`` passes."""
        return spin_until(self.executor, predicate, timeout)

    def close(self) -> None:
        """Destroy the nodes, the executor and shut the context down."""
        for created in reversed(self._nodes):
            self.executor.remove_node(created)
            created.destroy_node()
        self._nodes.clear()
        self.executor.shutdown()
        self.context.try_shutdown()


@pytest.fixture
def ros_domain_id(monkeypatch: pytest.MonkeyPatch) -> int:
    """A test-unique ROS domain id, exported (with loopback-only discovery) in os.environ."""
    domain_id = next_domain_id()
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain_id))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    return domain_id


@pytest.fixture
def ros(ros_domain_id: int) -> Iterator[RosTestContext]:
    """A fresh rclpy context (see :class:`RosTestContext`), shut down after the test."""
    pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")
    test_context = RosTestContext(ros_domain_id)
    try:
        yield test_context
    finally:
        test_context.close()
