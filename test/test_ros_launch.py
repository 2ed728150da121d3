"""The package as ROS users run it: built with colcon, started by `ros2 launch` and `ros2 run`.

The workspaces come from test/colcon_helpers.py (colcon and an underlay of the vendored upstream
launch / ros2cli sources, built by scripts/setup_env.py). Every check is made from this process
with rclpy over DDS: nodes by the graph, parameters through their parameter services, lifecycle
states through lifecycle_msgs services, outputs by subscribing; never by reading the logs.
Tests skip, with the reason, where ../shared/vendor is absent.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402

from colcon_helpers import REPO, stop, wait_exit  # noqa: E402
from ros_client_helpers import change_state, get_parameters, lifecycle_state, wait_for_nodes  # noqa: E402
from ros_perception_helpers import CAMERA_FRAME, Collector, FramePublisher, diagnostic_values, plane_depth, \
    textured  # noqa: E402
from vlm3_ros import geometry as g  # noqa: E402
from vlm3_ros import msg_codec  # noqa: E402
from vlm3_ros.camera import Intrinsics  # noqa: E402
from vlm3_ros.pipeline import query_grid  # noqa: E402
from vlm3_ros.ros import conversions as cv  # noqa: E402
from vlm3_ros.ros.tf import HAS_TF2_MSGS, TF_QOS  # noqa: E402

LAUNCH = ("ros2", "launch", "vlm3_ros", "perception.launch.py")
NODES = ("depth_node", "odometry_node")
INPUTS = {"image": "camera/image_raw", "camera_info": "camera/camera_info",
          "reference_depth": "camera/depth/image_raw", "reference_pose": "ground_truth/pose"}
INSTALLED = {"package.xml": "package.xml", "launch/perception.launch.py": "launch/perception.launch.py",
             "config/perception.yaml": "config/perception.yaml", "rviz/perception.rviz": "rviz/perception.rviz"}
INTRINSICS = Intrinsics.from_focal(160, 120, 140.0)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _plain(value):
    return list(value) if hasattr(value, "__len__") and not isinstance(value, str) else value


def _expected_parameters(params_file: Path, node: str) -> dict:
    data = yaml.safe_load(params_file.read_text())
    return {**data["/**"]["ros__parameters"], **data[f"/**/{node}"]["ros__parameters"]}


class Camera:
    """Publishes oracle frames (image, camera info, reference depth and pose) into launched nodes and
    collects what comes back."""

    def __init__(self, ros, node, namespace: str = "", image: str = "") -> None:
        prefix = f"/{namespace}" if namespace else ""
        topics = {name: f"{prefix}/{topic}" for name, topic in INPUTS.items()}
        if image:
            topics["image"] = image
        self.ros = ros
        self.pub = FramePublisher(node, topics)
        self.points = Collector(node, PointCloud2, f"{prefix}/points")
        self.odom = Collector(node, Odometry, f"{prefix}/odom")
        self.diagnostics = Collector(node, DiagnosticArray, "/diagnostics")
        self.tf = None
        if HAS_TF2_MSGS:
            from tf2_msgs.msg import TFMessage

            self.tf = Collector(node, TFMessage, "/tf", TF_QOS)
        self.depth = plane_depth(INTRINSICS.K, INTRINSICS.width, INTRINSICS.height)

    def connected(self, process, timeout: float = 60.0) -> bool:
        """Both nodes subscribe image and depth, the odometry node the pose (and outputs are discovered)."""
        pub = self.pub
        return self.ros.spin_until(lambda: process.poll() is not None or (
            pub.image.get_subscription_count() == 2 and pub.depth.get_subscription_count() == 2
            and pub.pose.get_subscription_count() == 1 and pub.info.get_subscription_count() == 2), timeout) \
            and process.poll() is None

    def frame(self, t: float, x: float = 0.0) -> None:
        """Publish the frame at time ``t`` with the camera moved by ``x`` metres along its x axis."""
        pose = g.make_pose(np.eye(3), [x, 0.0, 0.0])
        self.pub.publish(FramePublisher.messages(t, textured(INTRINSICS.width, INTRINSICS.height, seed=int(t)),
                                                 INTRINSICS, depth=self.depth, pose=pose))

    def served(self, t: float, timeout: float = 30.0) -> bool:
        return self.ros.spin_until(lambda: self.points.with_stamp(t) and self.odom.with_stamp(t), timeout)

    def check_cloud(self, t: float, query_count: int) -> None:
        """The cloud of frame ``t``: one point per query pixel, on the reference plane."""
        (cloud,) = self.points.with_stamp(t)
        assert cloud.header.frame_id == CAMERA_FRAME
        table = msg_codec.read_cloud(cloud)
        assert len(table) == len(query_grid(INTRINSICS.width, INTRINSICS.height, query_count))
        uv = np.column_stack([table["u"], table["v"]]).astype(float)
        np.testing.assert_allclose(table["z"], g.sample_nearest(self.depth, uv), atol=0.012)


# ------------------------------------------------------------------------------------------------
# install layout, ros2 pkg, ros2 run
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "symlink"])
def test_colcon_install_layout(kind, request):
    ws = request.getfixturevalue("colcon_install" if kind == "plain" else "colcon_symlink_install")
    prefix = ws.install / "vlm3_ros"
    for exe in ("depth_node", "odometry_node", "vlm3-ros"):
        path = prefix / "lib" / "vlm3_ros" / exe
        assert path.is_file() and os.access(path, os.X_OK), path
    share = prefix / "share" / "vlm3_ros"
    for installed, source in INSTALLED.items():
        path = share / installed
        assert path.read_bytes() == (REPO / source).read_bytes(), installed
        # --symlink-install links the sources (an edit shows without rebuilding); a plain install copies.
        assert path.is_symlink() == ws.symlink and (path.resolve() == (REPO / source).resolve()) == ws.symlink
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "vlm3_ros").is_file()
    listed = ws.run("ros2", "pkg", "executables", "vlm3_ros")
    assert listed.returncode == 0, listed.stdout
    assert set(listed.stdout.split("\n")) - {""} == {"vlm3_ros depth_node", "vlm3_ros odometry_node",
                                                      "vlm3_ros object_node", "vlm3_ros vlm3-ros"}
    found = ws.run("ros2", "pkg", "prefix", "--share", "vlm3_ros")
    assert found.stdout.strip() == str(share)
    where = ws.run("python", "-c", "import vlm3_ros; print(vlm3_ros.__file__)")
    module = Path(where.stdout.strip().splitlines()[-1])
    if ws.symlink:
        assert module.resolve() == (REPO / "vlm3_ros" / "__init__.py").resolve()
    else:  # the installed copy, not this checkout's editable install in the venv
        assert prefix in module.parents


def test_ros2_run_the_command_and_a_node_with_a_params_file(colcon_install, ros, ros_domain_id, tmp_path):
    ws = colcon_install
    shown = ws.run("ros2", "run", "vlm3_ros", "vlm3-ros", "--help")
    assert shown.returncode == 0, shown.stdout
    assert all(command in shown.stdout for command in ("perception", "query", "bag", "play", "demo"))
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "config" / "perception.yaml").read_text()
                      .replace("query_count: 64", "query_count: 23").replace("depth_kind: spec", "depth_kind: z")
                      .replace("backend: transformers", "backend: oracle"))
    process = ws.start("ros2", "run", "vlm3_ros", "depth_node", "--ros-args", "--params-file", params,
                       "-r", "__ns:=/runner", domain_id=ros_domain_id)
    try:
        observer = ros.node("observer")
        assert wait_for_nodes(ros, observer, ["/runner/depth_node"], 60, process), process.poll()
        values = get_parameters(ros, observer, "/runner/depth_node", ["query_count", "depth_kind", "backend"])
        assert values == {"query_count": 23, "depth_kind": "z", "backend": "oracle"}
    finally:
        code, out = stop(process)
    assert code == 0, out[-3000:]


# ------------------------------------------------------------------------------------------------
# ros2 launch
# ------------------------------------------------------------------------------------------------


def test_launch_defaults_installed_parameters_and_an_oracle_frame(colcon_install, ros, ros_domain_id):
    ws = colcon_install
    process = ws.start(*LAUNCH, "backend:=oracle", domain_id=ros_domain_id)
    try:
        observer = ros.node("observer")
        assert wait_for_nodes(ros, observer, ["/depth_node", "/odometry_node"], 60, process), process.poll()
        installed = ws.install / "vlm3_ros" / "share" / "vlm3_ros" / "config" / "perception.yaml"
        for node in NODES:
            expected = {**_expected_parameters(installed, node), "backend": "oracle", "use_sim_time": False}
            got = get_parameters(ros, observer, f"/{node}", list(expected))
            assert {k: _plain(v) for k, v in got.items()} == expected, node
        camera = Camera(ros, observer)
        assert camera.connected(process), process.poll()
        for n in range(2):
            camera.frame(30.0 + n, x=0.05 * n)
            assert camera.served(30.0 + n), (n, process.poll())
        camera.check_cloud(31.0, 64)
        # The optical-frame motion along x is base_link's -y (the default optical extrinsic).
        (odom,) = camera.odom.with_stamp(31.0)
        np.testing.assert_allclose(cv.pose_matrix(odom.pose.pose)[:3, 3], [0.0, -0.05, 0.0], atol=0.005)
        if camera.tf is not None:
            assert ros.spin_until(lambda: any(
                t.child_frame_id == "base_link" and t.header.frame_id == "odom" and t.header.stamp.sec == 31
                for m in camera.tf.messages for t in m.transforms), 10)
            (tf,) = [t for m in camera.tf.messages for t in m.transforms if t.header.stamp.sec == 31]
            assert abs(tf.transform.translation.y + 0.05) < 0.005
    finally:
        code, out = stop(process)
    assert code == 0, out[-3000:]


def test_launch_arguments_params_file_model_sim_time_topics_and_namespace(colcon_install, ros, ros_domain_id,
                                                                         tmp_path):
    ws = colcon_install
    params = tmp_path / "custom.yaml"
    params.write_text((REPO / "config" / "perception.yaml").read_text()
                      .replace("query_count: 64", "query_count: 17").replace("mode: both", "mode: correspondence"))
    process = ws.start(*LAUNCH, f"params_file:={params}", "backend:=oracle", "model:=/models/robot-depth",
                       "use_sim_time:=true", "namespace:=robot1", "image:=/cam/rgb", domain_id=ros_domain_id)
    try:
        observer = ros.node("observer")
        assert wait_for_nodes(ros, observer, ["/robot1/depth_node", "/robot1/odometry_node"], 60, process)
        for node in NODES:
            got = get_parameters(ros, observer, f"/robot1/{node}",
                                 ["query_count", "model", "backend", "use_sim_time", "managed"])
            assert got == {"query_count": 17, "model": "/models/robot-depth", "backend": "oracle",
                           "use_sim_time": True, "managed": False}, node
        assert get_parameters(ros, observer, "/robot1/odometry_node", ["mode"]) == {"mode": "correspondence"}
        # image:= moved the image input; the other inputs and the outputs are under the namespace.
        camera = Camera(ros, observer, namespace="robot1", image="/cam/rgb")
        assert camera.connected(process), process.poll()
        assert observer.count_subscribers("/camera/image_raw") == 0 and observer.count_subscribers("/points") == 0
        # Publishers are discovered on their own schedule: wait for them (a missing one never appears).
        assert ros.spin_until(lambda: observer.count_publishers("/robot1/points") == 1
                              and observer.count_publishers("/robot1/odom") == 1, 20)
        camera.frame(5.0)
        assert camera.served(5.0)
        camera.check_cloud(5.0, 17)
    finally:
        code, out = stop(process)
    assert code == 0, out[-3000:]


@pytest.mark.parametrize("managed", [False, True])
def test_launch_ends_with_an_error_when_a_node_cannot_start(colcon_install, ros_domain_id, tmp_path, managed):
    missing = tmp_path / "no-checkpoint-here"
    process = colcon_install.start(*LAUNCH, f"model:={missing}", f"managed:={'true' if managed else 'false'}",
                                   domain_id=ros_domain_id)
    code, out = wait_exit(process, 120)
    assert code is not None, f"the launch did not end:\n{out[-3000:]}"
    assert code != 0, out[-3000:]
    assert "the backend did not load" in out and str(missing) in out, out[-3000:]
    if managed:
        assert "failed to configure" in out, out[-3000:]
    else:
        assert "exited with status 1" in out, out[-3000:]


def test_launch_managed_nodes_driven_through_lifecycle_services(colcon_install, ros, ros_domain_id):
    ws = colcon_install
    process = ws.start(*LAUNCH, "backend:=oracle", "managed:=true", "autostart:=false", "namespace:=m",
                       domain_id=ros_domain_id)
    try:
        observer = ros.node("observer")
        names = [f"/m/{node}" for node in NODES]
        assert wait_for_nodes(ros, observer, names, 60, process), process.poll()
        assert [lifecycle_state(ros, observer, n) for n in names] == ["unconfigured"] * 2
        camera = Camera(ros, observer, namespace="m")
        assert camera.pub.image.get_subscription_count() == 0  # no inputs before activation
        for transition, state in (("configure", "inactive"), ("activate", "active")):
            assert all(change_state(ros, observer, n, transition) for n in names), transition
            assert [lifecycle_state(ros, observer, n) for n in names] == [state] * 2
        assert camera.connected(process)
        camera.frame(1.0)
        assert camera.served(1.0)
        # Deactivated: inputs closed, nothing published, the model still loaded.
        assert all(change_state(ros, observer, n, "deactivate") for n in names)
        assert ros.spin_until(lambda: camera.pub.image.get_subscription_count() == 0, 10)
        camera.frame(2.0)
        ros.spin_until(lambda: False, 1.5)
        assert not camera.points.with_stamp(2.0) and not camera.odom.with_stamp(2.0)

        def diag(name):
            return diagnostic_values(camera.diagnostics, name) or {}

        assert ros.spin_until(lambda: all(diag(n).get("lifecycle_state") == "inactive"
                                          and diag(n).get("backend_state") == "ready" for n in names), 10)
        # Cleanup frees the model; shutdown finalizes.
        assert all(change_state(ros, observer, n, "cleanup") for n in names)
        assert ros.spin_until(lambda: all(diag(n).get("backend_state") == "stopped" for n in names), 10)
        assert all(change_state(ros, observer, n, "shutdown") for n in names)
        assert [lifecycle_state(ros, observer, n) for n in names] == ["finalized"] * 2
    finally:
        code, out = stop(process)
    assert code == 0, out[-3000:]


def test_launch_managed_autostart_activates_the_nodes(colcon_install, ros, ros_domain_id):
    process = colcon_install.start(*LAUNCH, "backend:=oracle", "managed:=true", domain_id=ros_domain_id)
    try:
        observer = ros.node("observer")
        assert wait_for_nodes(ros, observer, ["/depth_node", "/odometry_node"], 60, process), process.poll()
        assert ros.spin_until(lambda: all(lifecycle_state(ros, observer, f"/{n}") == "active" for n in NODES), 60)
        camera = Camera(ros, observer)
        assert camera.connected(process)
        camera.frame(3.0)
        assert camera.served(3.0)
        camera.check_cloud(3.0, 64)
    finally:
        code, out = stop(process)
    assert code == 0, out[-3000:]


# The launch description evaluated for some arguments, in the workspace's environment (rviz2 is not
# installed here, so RViz is checked as the action the launch file would start).
EVALUATE = textwrap.dedent("""
    import json, sys
    import yaml
    from ament_index_python.packages import get_package_share_directory
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.launch_description_sources import get_launch_description_from_python_launch_file
    from launch.utilities import perform_substitutions
    from launch_ros.actions import LifecycleNode, Node

    share = get_package_share_directory("vlm3_ros")
    description = get_launch_description_from_python_launch_file(share + "/launch/perception.launch.py")
    context = LaunchContext()
    context.launch_configurations.update(json.loads(sys.argv[1]))
    actions = []
    for entity in description.entities:
        if isinstance(entity, DeclareLaunchArgument):
            entity.visit(context)
        elif isinstance(entity, OpaqueFunction):
            actions += entity.visit(context) or []
    nodes = [a for a in actions if isinstance(a, Node)]
    out = {"share": share, "lifecycle": [isinstance(n, LifecycleNode) for n in nodes],
           "packages": [n.node_package for n in nodes], "rviz": None,
           "executables": [n.node_executable for n in nodes if n.node_package == "vlm3_ros"],
           # launch_ros exposes remappings publicly only once a node runs
           "remappings": [[[perform_substitutions(context, s) for s in pair] for pair in n._Node__remappings or []]
                          for n in nodes if n.node_package == "vlm3_ros"]}
    for node in nodes:
        if node.node_package == "rviz2":
            arguments = [perform_substitutions(context, part) for part in node.cmd[1:3]]
            config = yaml.safe_load(open(arguments[1]))
            topics = []
            def walk(displays):
                for display in displays:
                    walk(display.get("Displays", []))
                    if isinstance(display.get("Topic"), dict):
                        topics.append(display["Topic"]["Value"])
            walk(config["Visualization Manager"]["Displays"])
            out["rviz"] = {"arguments": arguments, "executable": node.node_executable, "topics": topics}
    print("@@" + json.dumps(out))
""")


def _evaluate(ws, **arguments):
    done = ws.run("python", "-c", EVALUATE, json.dumps(arguments))
    assert done.returncode == 0, done.stdout[-3000:]
    return json.loads(done.stdout.split("@@")[-1])


def test_launch_rviz_managed_and_detections_arguments_select_the_actions(colcon_install):
    default = _evaluate(colcon_install)
    assert default["packages"] == ["vlm3_ros", "vlm3_ros"] and default["rviz"] is None
    assert default["executables"] == ["depth_node", "odometry_node"]
    # detections:=<topic> adds the object node, subscribed to that topic.
    objects = _evaluate(colcon_install, detections="/yolo/detections", managed="true")
    assert objects["executables"] == ["depth_node", "odometry_node", "object_node"]
    assert objects["lifecycle"] == [True, True, True]
    assert all(["detections", "/yolo/detections"] in pairs for pairs in objects["remappings"])
    assert default["lifecycle"] == [False, False]
    assert _evaluate(colcon_install, managed="true")["lifecycle"] == [True, True]
    shown = _evaluate(colcon_install, rviz="true")
    assert shown["packages"] == ["vlm3_ros", "vlm3_ros", "rviz2"] and shown["rviz"]["executable"] == "rviz2"
    installed = os.path.join(shown["share"], "rviz", "perception.rviz")
    assert shown["rviz"]["arguments"] == ["-d", installed]
    assert {"/points", "/depth/sparse", "/odom", "/correspondences"} <= set(shown["rviz"]["topics"])
    # In a namespace the displays follow the nodes' topics (TF stays global).
    moved = _evaluate(colcon_install, rviz="true", namespace="robot1")["rviz"]
    assert moved["arguments"][1] != installed
    assert sorted(moved["topics"]) == sorted(t if t in ("/tf", "/tf_static") else f"/robot1{t}"
                                             for t in shown["rviz"]["topics"])
