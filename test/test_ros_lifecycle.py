"""Managed (lifecycle) nodes over real DDS, driven through the lifecycle_msgs services as a manager
(Nav2's lifecycle_manager, ``ros2 lifecycle set``) drives them: configure loads the model and checks
the parameters, activate opens the inputs, deactivate stops the outputs and keeps the model,
cleanup frees it; and unmanaged nodes that cannot start say why."""

from __future__ import annotations

import gc
import weakref

import pytest

pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")

from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402

from ros_client_helpers import change_state, lifecycle_state  # noqa: E402
from ros_perception_helpers import Collector, FramePublisher, perception_nodes, textured  # noqa: E402,F401
from vlm3_ros.camera import Intrinsics  # noqa: E402
from vlm3_ros.ros import backends  # noqa: E402
from vlm3_ros.ros.depth_node import DepthNode  # noqa: E402
from vlm3_ros.ros.node_base import NodeStartError  # noqa: E402

INTRINSICS = Intrinsics.from_focal(96, 64, 1000.0)  # at the depth task's focal length: small and fast


def _overrides(**values):
    return [Parameter(k, value=v) for k, v in values.items()]


def _tiny_params(checkpoint, **extra):
    return dict(backend="transformers", model=str(checkpoint), device="cpu", dtype="float32", query_count=4,
                max_new_tokens=2, **extra)


def test_managed_depth_node_configure_activate_deactivate_cleanup(ros, perception_nodes, tiny_checkpoint):
    backends.clear_cache()
    params = _tiny_params(tiny_checkpoint, managed=True)
    node = perception_nodes(DepthNode(context=ros.context, parameter_overrides=_overrides(**params)))
    name = node.get_fully_qualified_name()
    manager = ros.node("manager")
    camera = FramePublisher(manager)
    points = Collector(manager, PointCloud2, "points")
    key = backends.settings_from_params(node.params.snapshot()).key()

    def frame(t):
        camera.publish(FramePublisher.messages(t, textured(96, 64), INTRINSICS))

    assert lifecycle_state(ros, manager, name) == "unconfigured"
    assert key not in backends._CACHE and node.worker.state == "created"  # nothing loaded yet
    ros.spin_until(lambda: False, 0.5)
    assert camera.image.get_subscription_count() == 0  # and no inputs

    assert change_state(ros, manager, name, "configure")
    assert lifecycle_state(ros, manager, name) == "inactive"
    model = weakref.ref(backends._CACHE[key].inner.model)
    assert node.worker.state == "ready" and camera.image.get_subscription_count() == 0

    assert change_state(ros, manager, name, "activate")
    assert camera.wait_matched(ros)
    frame(1.0)
    assert ros.spin_until(lambda: points.with_stamp(1.0), 30)  # random weights: an empty cloud, but published

    assert change_state(ros, manager, name, "deactivate")
    assert lifecycle_state(ros, manager, name) == "inactive"
    assert ros.spin_until(lambda: camera.image.get_subscription_count() == 0, 10)
    frame(2.0)
    ros.spin_until(lambda: False, 1.0)
    assert not points.with_stamp(2.0) and node.worker.submitted == 1
    assert model() is not None and key in backends._CACHE  # inactive keeps the model loaded

    assert change_state(ros, manager, name, "cleanup")
    assert lifecycle_state(ros, manager, name) == "unconfigured"
    gc.collect()
    assert key not in backends._CACHE and model() is None  # the model was freed
    assert node.worker.state == "stopped"

    # Configured again, it loads the model again and serves frames.
    assert change_state(ros, manager, name, "configure") and change_state(ros, manager, name, "activate")
    assert camera.wait_matched(ros)
    frame(3.0)
    assert ros.spin_until(lambda: points.with_stamp(3.0), 30)
    assert change_state(ros, manager, name, "shutdown")
    assert lifecycle_state(ros, manager, name) == "finalized"
    gc.collect()
    assert key not in backends._CACHE


def test_managed_node_configure_fails_with_the_reason_and_can_be_retried(ros, perception_nodes, tmp_path):
    missing = tmp_path / "no-checkpoint"
    node = perception_nodes(DepthNode(context=ros.context, parameter_overrides=_overrides(
        managed=True, backend="transformers", model=str(missing), device="cpu")))
    manager = ros.node("manager")
    name = node.get_fully_qualified_name()
    assert not change_state(ros, manager, name, "configure")
    assert lifecycle_state(ros, manager, name) == "unconfigured"
    assert "the backend did not load" in node.start_error and str(missing) in node.start_error
    assert node.worker.state == "failed"  # diagnostics report the error
    assert not change_state(ros, manager, name, "configure")  # retried: fails again, the same way
    assert str(missing) in node.start_error


def test_unmanaged_node_that_cannot_start_raises_the_reason(ros, tmp_path):
    with pytest.raises(NodeStartError, match="needs the model parameter"):
        DepthNode(context=ros.context, parameter_overrides=_overrides(backend="transformers", model=""))
    missing = tmp_path / "nothing"
    with pytest.raises(NodeStartError, match=f"could not configure: the backend did not load: .*{missing}"):
        DepthNode(context=ros.context, parameter_overrides=_overrides(backend="transformers", model=str(missing),
                                                                       device="cpu"))


def test_unmanaged_node_is_active_after_construction(ros, perception_nodes):
    node = perception_nodes(DepthNode(context=ros.context, parameter_overrides=_overrides(backend="oracle")))
    manager = ros.node("manager")
    assert node.lifecycle_state == "active" and node.worker.state == "ready"
    assert lifecycle_state(ros, manager, node.get_fully_qualified_name()) == "active"  # a manager can still drive it
