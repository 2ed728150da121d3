"""rviz/perception.rviz (RViz cannot run here): the file parses, its displays show topics the nodes
really publish, with the display type matching each topic's message type and a reliability the
nodes' outputs match, in the frames the nodes use."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")

from rclpy.parameter import Parameter  # noqa: E402

from ros_perception_helpers import perception_nodes  # noqa: E402,F401
from vlm3_ros.ros.depth_node import DepthNode  # noqa: E402
from vlm3_ros.ros.odometry_node import OdometryNode  # noqa: E402

RVIZ = Path(__file__).resolve().parents[1] / "rviz" / "perception.rviz"
#: RViz display class -> the message type it shows
DISPLAY_TYPES = {
    "rviz_default_plugins/PointCloud2": "sensor_msgs/msg/PointCloud2",
    "rviz_default_plugins/Image": "sensor_msgs/msg/Image",
    "rviz_default_plugins/Odometry": "nav_msgs/msg/Odometry",
    "rviz_default_plugins/MarkerArray": "visualization_msgs/msg/MarkerArray",
}


def _displays(config):
    out = []
    for display in config["Visualization Manager"]["Displays"]:
        out.append(display)
        out.extend(display.get("Displays", []))
    return out


def test_rviz_config_shows_what_the_nodes_publish(ros, perception_nodes):
    config = yaml.safe_load(RVIZ.read_text())
    displays = _displays(config)
    depth = perception_nodes(DepthNode(context=ros.context, parameter_overrides=[Parameter("backend", value="oracle")]))
    odometry = perception_nodes(OdometryNode(context=ros.context,
                                             parameter_overrides=[Parameter("backend", value="oracle")]))
    observer = ros.node("observer")
    published = {}
    for node in (depth, odometry):
        for topic, types in observer.get_publisher_names_and_types_by_node(node.get_name(), node.get_namespace()):
            published[topic] = types
    shown = {}
    for display in displays:
        if display["Class"] in DISPLAY_TYPES:
            topic = display["Topic"]
            assert topic["Value"] in published, f"{display['Name']}: nothing publishes {topic['Value']}"
            assert DISPLAY_TYPES[display["Class"]] in published[topic["Value"]], display["Name"]
            # RViz subscribes with this reliability: the nodes' outputs (output_reliability) must match it.
            assert topic["Reliability Policy"].lower() == depth.params["output_reliability"]
            shown[topic["Value"]] = display["Class"]
    assert shown == {"/points": "rviz_default_plugins/PointCloud2", "/depth/sparse": "rviz_default_plugins/Image",
                     "/odom": "rviz_default_plugins/Odometry",
                     "/correspondences": "rviz_default_plugins/MarkerArray"}
    classes = [d["Class"] for d in displays if d.get("Enabled", True)]
    assert "rviz_default_plugins/TF" in classes
    # The fixed frame is the odometry frame (REP-105), where the cloud, TF and odometry all meet.
    assert config["Visualization Manager"]["Global Options"]["Fixed Frame"] == odometry.params["odom_frame"]
    assert all(d.get("Enabled", True) for d in displays)
