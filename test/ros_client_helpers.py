"""Looking at running nodes from another node, over DDS: the graph, parameter services, lifecycle.

What ``ros2 node list``, ``ros2 param get`` and ``ros2 lifecycle`` show, done with rclpy so a test
waits for discovery (``ros2 node list`` misses nodes still being discovered) and reads typed values.
Each helper takes the test's :class:`~ros_helpers.RosTestContext` and one of its nodes.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

SERVICE_TIMEOUT = 30.0


def node_names(node: Any) -> List[str]:
    """Fully qualified names of the nodes in the graph."""
    return [f"{ns.rstrip('/')}/{name}" for name, ns in node.get_node_names_and_namespaces()]


def wait_for_nodes(ros: Any, node: Any, names: Iterable[str], timeout: float = 60.0, process: Any = None) -> bool:
    """Spin until every fully qualified name is in the graph (False when ``process`` ended first)."""
    wanted = set(names)

    def ready() -> bool:
        return (process is not None and process.poll() is not None) or wanted <= set(node_names(node))

    return ros.spin_until(ready, timeout) and wanted <= set(node_names(node))


def call(ros: Any, node: Any, srv_type: Any, name: str, request: Any, timeout: float = SERVICE_TIMEOUT) -> Any:
    """Call a service and return its response (AssertionError when unavailable or unanswered)."""
    client = node.create_client(srv_type, name)
    try:
        assert ros.spin_until(client.service_is_ready, timeout), f"service {name} is not available"
        future = client.call_async(request)
        assert ros.spin_until(future.done, timeout), f"service {name} did not answer"
        return future.result()
    finally:
        node.destroy_client(client)


def get_parameters(ros: Any, node: Any, target: str, names: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Parameter values of the node ``target`` (all of them by default), as Python values."""
    from rcl_interfaces.srv import GetParameters, ListParameters
    from rclpy.parameter import parameter_value_to_python

    if names is None:
        listed = call(ros, node, ListParameters, f"{target}/list_parameters", ListParameters.Request())
        names = listed.result.names
    names = list(names)
    response = call(ros, node, GetParameters, f"{target}/get_parameters", GetParameters.Request(names=names))
    return {name: parameter_value_to_python(value) for name, value in zip(names, response.values)}


def lifecycle_state(ros: Any, node: Any, target: str) -> str:
    """The label of a lifecycle node's current state (unconfigured, inactive, active, finalized)."""
    from lifecycle_msgs.srv import GetState

    return call(ros, node, GetState, f"{target}/get_state", GetState.Request()).current_state.label


def change_state(ros: Any, node: Any, target: str, transition: str) -> bool:
    """Ask a lifecycle node for a transition (configure, activate, deactivate, cleanup, shutdown)."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    ids = {"configure": Transition.TRANSITION_CONFIGURE, "activate": Transition.TRANSITION_ACTIVATE,
           "deactivate": Transition.TRANSITION_DEACTIVATE, "cleanup": Transition.TRANSITION_CLEANUP,
           "shutdown": Transition.TRANSITION_UNCONFIGURED_SHUTDOWN}
    request = ChangeState.Request()
    request.transition.id = ids[transition]
    if transition == "shutdown":  # the shutdown transition's id depends on the state it leaves
        state = lifecycle_state(ros, node, target)
        request.transition.id = {"inactive": Transition.TRANSITION_INACTIVE_SHUTDOWN,
                                 "active": Transition.TRANSITION_ACTIVE_SHUTDOWN}.get(state, request.transition.id)
    return bool(call(ros, node, ChangeState, f"{target}/change_state", request).success)
