"""`vlm3-ros perception`, the launch file and the parameter file, and the end to end path:
`vlm3-ros bag from-rgbd` on 7-Scenes frames, `vlm3-ros play` into `vlm3-ros perception` (oracle
and tiny-model modes), each in its own process over real DDS."""

from __future__ import annotations

import ast
import heapq
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy", reason="rclpy is not importable in this interpreter")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from sensor_msgs.msg import Image, PointCloud2  # noqa: E402

from ros_helpers import ros_subprocess_env  # noqa: E402
from ros_perception_helpers import (  # noqa: E402
    Collector,
    FramePublisher,
    diagnostic_values,
    plane_depth,
    reliable,
    textured,
)
from vlm3_ros import geometry as g  # noqa: E402
from vlm3_ros import msg_codec  # noqa: E402
from vlm3_ros.camera import Intrinsics  # noqa: E402
from vlm3_ros.cli import perception  # noqa: E402
from vlm3_ros.pipeline import query_grid  # noqa: E402
from vlm3_ros.ros import conversions as cv  # noqa: E402
from vlm3_ros.ros.params import TABLES  # noqa: E402
from vlm3_ros.ros.tf import HAS_TF2_MSGS, HAS_TF2_ROS, TF_QOS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "perception.launch.py"
PARAMS = REPO / "config" / "perception.yaml"
TF_AVAILABLE = HAS_TF2_MSGS or HAS_TF2_ROS


# ------------------------------------------------------------------------------------------------
# Launch file and parameter file (no launch import: it is not installable here)
# ------------------------------------------------------------------------------------------------


def _module_constants(path: Path) -> dict:
    tree = ast.parse(path.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out, tree


def _calls(tree: ast.AST, name: str) -> list:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == name]


def test_launch_file_agrees_with_the_perception_command():
    """The launch file and `vlm3-ros perception` name the same nodes, parameter file, topics and options.

    (What the launch file does when run is tested under `ros2 launch` in test_ros_launch.py.)
    """
    constants, tree = _module_constants(LAUNCH)
    assert constants["PACKAGE"] == "vlm3_ros"
    # Same nodes: executables are setup.py console scripts whose modules hold the classes the command runs.
    setup_constants, setup_tree = _module_constants(REPO / "setup.py")
    scripts = {}
    for call in _calls(setup_tree, "setup"):
        for kw in call.keywords:
            if kw.arg == "entry_points":
                for entry in ast.literal_eval(kw.value)["console_scripts"]:
                    name, target = (s.strip() for s in entry.split("="))
                    scripts[name] = target
    assert [name for _, name in constants["NODES"]] == list(perception.NODES)
    for executable, name in constants["NODES"]:
        cli_executable, class_path = perception.NODES[name]
        assert executable == cli_executable
        module, cls = class_path.split(":")
        assert scripts[executable] == f"{module}:main"
        assert hasattr(__import__(module, fromlist=[cls]), cls)
    # Same parameter file, installed by setup.py into the package share.
    assert constants["PARAMS_FILE"] == perception.PARAMS_FILE == "config/perception.yaml"
    assert 'glob("config/*.yaml")' in (REPO / "setup.py").read_text() and PARAMS.is_file()
    # Same remappable topics with the same defaults, relative so that they move with the namespace.
    assert constants["TOPICS"] == {name: default for name, (_, default) in perception.TOPICS.items()}
    assert all(topic == name for name, (topic, _) in perception.TOPICS.items())
    assert not any(default.startswith("/") for default in constants["TOPICS"].values())
    # The launch arguments a user needs, each with a command option.
    declared = {"params_file"} | set(constants["TOPICS"]) | set(constants["ARGUMENTS"])
    assert {"params_file", "model", "image", "camera_info", "namespace", "use_sim_time", "managed",
            "autostart", "rviz"} <= declared
    parser = __import__("argparse").ArgumentParser()
    perception.add_arguments(parser)
    options = {a.dest for a in parser._actions}
    assert declared - {"params_file", "rviz"} <= options and "params_file" in options


def test_command_arguments_match_the_launch_file():
    parser = __import__("argparse").ArgumentParser()
    perception.add_arguments(parser)
    args = parser.parse_args(["--params-file", "p.yaml", "--model", "/m", "--image", "/cam/rgb", "--namespace", "r1",
                              "--use-sim-time", "--ros-args", "-p", "query_count:=9"])
    ros_args = perception.ros_arguments(args)
    assert ros_args[:4] == ["vlm3-ros", "--ros-args", "--params-file", "p.yaml"]
    pairs = list(zip(ros_args[4::2], ros_args[5::2]))
    assert ("-p", "model:=/m") in pairs and ("-p", "use_sim_time:=true") in pairs
    assert ("-r", "image:=/cam/rgb") in pairs and ("-r", "camera_info:=camera/camera_info") in pairs
    assert ("-p", "managed:=false") in pairs
    assert ("-r", "__ns:=/r1") in pairs and ros_args[-2:] == ["-p", "query_count:=9"]


def test_parameter_file_documents_every_parameter(ros):
    data = yaml.safe_load(PARAMS.read_text())
    assert set(data) == {"/**", "/**/depth_node", "/**/odometry_node", "/**/object_node"}
    shared = data["/**"]["ros__parameters"]
    lines = PARAMS.read_text().splitlines()
    # The object node asks about boxes, not query pixels: the shared query_* settings are not its.
    not_declared = {"object_node": {"query_count", "query_margin", "query_method"}}
    for node_name, table in TABLES.items():
        values = {k: v for k, v in shared.items() if k not in not_declared.get(node_name, ())}
        values.update(data[f"/**/{node_name}"]["ros__parameters"])
        assert set(values) == {p.name for p in table}, node_name
        for param in table:
            value = values[param.name]
            assert value == param.default and type(value) is type(param.default), param.name
            if isinstance(value, list):
                assert all(type(v) is float for v in value), param.name
            index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{param.name}:"))
            assert lines[index - 1].strip().startswith("#"), f"{param.name} has no comment"
            if param.read_only:
                assert "[read-only]" in "\n".join(lines[max(0, index - 3):index]), param.name
    docs = (REPO / "docs" / "ROS.md").read_text()
    assert all(f"`{p.name}`" in docs for table in TABLES.values() for p in table)
    # rclpy reads the file (wildcards match a namespaced node); a changed value reaches both nodes.
    from vlm3_ros.ros.depth_node import DepthNode
    from vlm3_ros.ros.odometry_node import OdometryNode

    edited = PARAMS.read_text().replace("query_count: 64", "query_count: 17").replace("mode: both", "mode: pose")
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"perception-{os.getpid()}.yaml"
    path.write_text(edited)
    try:
        for cls in (DepthNode, OdometryNode):
            node = cls(context=ros.context, namespace="robot1",
                       cli_args=["--ros-args", "--params-file", str(path), "-p", "backend:=oracle"])
            try:
                assert node.params["query_count"] == 17 and node.params["backend"] == "oracle"
                if cls is OdometryNode:
                    assert node.params["mode"] == "pose"
            finally:
                node.destroy_node()
    finally:
        path.unlink()


# ------------------------------------------------------------------------------------------------
# Separate processes
# ------------------------------------------------------------------------------------------------


def _env(domain_id):
    env = ros_subprocess_env(domain_id)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _cli(domain_id, *args):
    return subprocess.Popen([sys.executable, "-m", "vlm3_ros.cli.main", *args], env=_env(domain_id), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc, timeout=15.0):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"process did not stop on SIGINT:\n{out[-3000:]}")
    return proc.returncode, out


def test_node_entry_point_reports_bad_parameters():
    code = ("import sys; from vlm3_ros.ros.depth_node import main; "
            "sys.exit(main(['depth_node', '--ros-args', '-p', 'backend:=oracle', '-p', 'query_count:=0']))")
    result = subprocess.run([sys.executable, "-c", code], env=_env(99), cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "query_count" in result.stdout and "out of range" in result.stdout


def _outputs(node, namespace=""):
    prefix = f"/{namespace}" if namespace else ""
    out = {
        "points": Collector(node, PointCloud2, f"{prefix}/points"),
        "depth": Collector(node, Image, f"{prefix}/depth/sparse"),
        "odom": Collector(node, Odometry, f"{prefix}/odom"),
        "diagnostics": Collector(node, DiagnosticArray, "/diagnostics"),
    }
    if TF_AVAILABLE:
        from tf2_msgs.msg import TFMessage

        out["tf"] = Collector(node, TFMessage, "/tf", TF_QOS)
    return out


def test_perception_command_runs_both_nodes_in_a_separate_process(ros, ros_domain_id):
    proc = _cli(ros_domain_id, "perception", "--params-file", str(PARAMS), "--backend", "oracle",
                "--namespace", "robot", "--ros-args", "-p", "query_count:=16", "-p", "mode:=correspondence")
    try:
        client = ros.node("camera")
        # The default topics are relative: they move into the namespace with the nodes.
        pub = FramePublisher(client, {name: f"/robot/{default}" for name, (_, default) in perception.TOPICS.items()})
        out = _outputs(client, "robot")
        assert ros.spin_until(lambda: pub.image.get_subscription_count() == 2 and pub.pose.get_subscription_count() == 1
                              and pub.depth.get_subscription_count() == 2, 30), proc.poll()
        intr = Intrinsics.from_focal(320, 240, 280.0)
        depth = plane_depth(intr.K, 320, 240)
        motion = [g.make_pose(np.eye(3), [0.02 * n, 0.0, 0.0]) for n in range(3)]
        for n, T in enumerate(motion):
            pub.publish(FramePublisher.messages(20.0 + n, textured(320, 240, seed=n), intr, depth=depth, pose=T))
            assert ros.spin_until(lambda: len(out["odom"]) == n + 1 and len(out["points"]) == n + 1, 20), \
                proc.poll()
        assert out["points"].stamps() == [20.0, 21.0, 22.0] and out["odom"].stamps() == [20.0, 21.0, 22.0]
        assert out["points"].messages[0].width == len(query_grid(320, 240, 16))
        assert out["points"].messages[0].header.frame_id == "camera_optical_frame"
        # The optical-frame motion along x is base_link's -y (default optical extrinsic).
        last = cv.pose_matrix(out["odom"].messages[-1].pose.pose)
        np.testing.assert_allclose(last[:3, 3], [0.0, -0.04, 0.0], atol=0.004)
        assert ros.spin_until(lambda: all((diagnostic_values(out["diagnostics"], f"/robot/{n}") or {})
                                          .get("frames_published") == "3" for n in ("depth_node", "odometry_node")), 10)
    finally:
        code, text = _stop(proc)
    assert code == 0, text[-3000:]


def test_perception_command_managed_and_autostart(ros, ros_domain_id):
    from ros_client_helpers import change_state, lifecycle_state, wait_for_nodes

    waiting = _cli(ros_domain_id, "perception", "--params-file", str(PARAMS), "--backend", "oracle", "--managed",
                   "--namespace", "m1")
    started = _cli(ros_domain_id, "perception", "--params-file", str(PARAMS), "--backend", "oracle", "--managed",
                   "--autostart", "--namespace", "m2")
    try:
        observer = ros.node("observer")
        names = {ns: [f"/{ns}/{node}" for node in perception.DEFAULT_NODES] for ns in ("m1", "m2")}
        assert wait_for_nodes(ros, observer, names["m1"] + names["m2"], 60), (waiting.poll(), started.poll())
        assert [lifecycle_state(ros, observer, n) for n in names["m1"]] == ["unconfigured"] * 2
        assert [lifecycle_state(ros, observer, n) for n in names["m2"]] == ["active"] * 2
        for transition in ("configure", "activate"):
            assert all(change_state(ros, observer, n, transition) for n in names["m1"])
        assert [lifecycle_state(ros, observer, n) for n in names["m1"]] == ["active"] * 2
    finally:
        results = [_stop(waiting), _stop(started)]
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]


@pytest.fixture(scope="module")
def sevenscenes_bag(tmp_path_factory):
    from data_helpers import SEVENSCENES_DIR

    if not SEVENSCENES_DIR.is_dir():
        pytest.skip(f"real 7-Scenes frames not present at {SEVENSCENES_DIR}")
    out = tmp_path_factory.mktemp("e2e") / "redkitchen"
    result = subprocess.run([sys.executable, "-m", "vlm3_ros.cli.main", "bag", "from-rgbd", str(SEVENSCENES_DIR),
                             str(out), "--count", "10", "--rate", "10", "--quiet"], env=_env(99), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


INPUTS = ["/camera/image_raw", "/camera/camera_info", "/camera/depth/image_raw", "/ground_truth/pose"]


def _play_into_perception(ros, domain_id, bag, perception_args, wait_subscriptions, rate=1.0, ready=None):
    """Start perception, play the bag into it once its inputs and outputs are connected (and ``ready()``
    holds, if given); return the outputs."""
    client = ros.node("observer")
    out = _outputs(client)
    node = _cli(domain_id, "perception", "--params-file", str(PARAMS), "--use-sim-time", *perception_args)
    player = None
    try:
        # The outputs' publishers must be discovered before the first frame, or its outputs are lost.
        topics = ["/points", "/depth/sparse", "/odom"] + (["/tf"] if TF_AVAILABLE else [])
        connected = ros.spin_until(lambda: node.poll() is not None or (
            all(client.count_publishers(t) for t in topics) and (ready is None or ready())), 60)
        assert connected and node.poll() is None, _stop(node)[1][-3000:]
        ros.spin_until(lambda: False, 0.5)
        player = _cli(domain_id, "play", str(bag), "--rate", str(rate), "--topics", *INPUTS,
                      "--wait-for-subscribers", str(wait_subscriptions), "--wait-timeout", "60", "--quiet")
        deadline = time.monotonic() + 120
        while player.poll() is None and time.monotonic() < deadline:
            ros.spin_until(lambda: False, 0.1)
        assert player.returncode == 0, player.communicate()[0][-3000:]
        return out, node
    except BaseException:
        if player is not None and player.poll() is None:
            player.kill()
        if node.poll() is None:
            _stop(node)
        raise


def test_bag_played_into_perception_in_oracle_mode(ros, ros_domain_id, sevenscenes_bag):
    from vlm3_ros import bags

    truth = {m.stamp_ns: bags.pose_from_msg(m.msg) for m in bags.read_messages(sevenscenes_bag, ["/ground_truth/pose"])}
    # depth node: image, camera_info, reference_depth; odometry node: those and reference_pose.
    out, node = _play_into_perception(ros, ros_domain_id, sevenscenes_bag,
                                      ["--backend", "oracle", "--ros-args", "-p", "query_count:=32",
                                       "-p", "mode:=correspondence"], wait_subscriptions=7, rate=0.5)
    stamps = sorted(truth)
    expected = [s * 1e-9 for s in stamps]

    def accounted(name):  # every frame of the bag arrived, and was served or dropped as stale (newest wins)
        values = diagnostic_values(out["diagnostics"], f"/{name}") or {}
        return (values.get("received.image") == "10" and values.get("frames_submitted") == "10"
                and int(values["frames_published"]) + int(values["dropped_busy"]) == 10)

    published = {"points": "depth_node", "depth": "depth_node", "odom": "odometry_node"}

    def received_all():
        return all(diagnostic_values(out["diagnostics"], f"/{name}")["frames_published"] == str(len(out[key]))
                   for key, name in published.items())

    try:
        assert ros.spin_until(lambda: accounted("depth_node") and accounted("odometry_node"), 30), str([
            diagnostic_values(out["diagnostics"], f"/{n}") for n in ("depth_node", "odometry_node")])
        assert ros.spin_until(received_all, 5)
    finally:
        code, text = _stop(node)
    assert code == 0, text[-3000:]
    for key in ("points", "depth", "odom"):
        got = out[key].stamps()
        # How many frames are served depends on the machine's load (the rest are dropped, counted above);
        # the first and the last always are.
        assert len(got) >= 2 and got == sorted(got) and got[-1] == pytest.approx(expected[-1], abs=1e-9)
        assert all(min(abs(t - e) for e in expected) < 1e-9 for t in got), key  # the image stamps
    # The clouds are the Kinect's depth, the trajectory the ground truth (base_link = optical frame rotated).
    assert all(m.width >= 25 for m in out["points"].messages)
    from vlm3_ros.odometry import xyz_rotation_to_pose
    from vlm3_ros.ros.params import OPTICAL_RPY

    T_bc = xyz_rotation_to_pose([0, 0, 0], OPTICAL_RPY)
    gt = T_bc @ g.relative_pose(truth[stamps[0]], truth[stamps[-1]]) @ g.invert_pose(T_bc)
    last = cv.pose_matrix(out["odom"].messages[-1].pose.pose)
    assert np.linalg.norm(last[:3, 3] - gt[:3, 3]) < 0.015
    assert g.rotation_angle(last[:3, :3].T @ gt[:3, :3]) < 0.5
    if TF_AVAILABLE:
        ours = [t for m in out["tf"].messages for t in m.transforms if t.child_frame_id == "base_link"]
        assert [t.header.stamp.sec + t.header.stamp.nanosec * 1e-9 for t in ours] == \
            pytest.approx(out["odom"].stamps(), abs=1e-9)
    # use_sim_time: the nodes' clocks follow the bag's /clock.
    diag_stamps = [m.header.stamp.sec for m in out["diagnostics"].messages]
    assert diag_stamps and max(diag_stamps) < 1000


class DelayingRelay:
    """Republishes a topic, each message after its own delay (a slow, reordering link), in release order."""

    def __init__(self, node, msg_type, source, target, delays):
        self.delays, self.count = list(delays), 0
        self.pending = []  # heap of (release time, arrival number, message)
        self.released = []  # stamps (s) in the order they were published
        self.sub = node.create_subscription(msg_type, source, self._arrived, reliable(50))
        self.pub = node.create_publisher(msg_type, target, reliable(50))
        node.create_timer(0.005, self._release)

    def _arrived(self, msg):
        heapq.heappush(self.pending, (time.monotonic() + self.delays[self.count % len(self.delays)], self.count, msg))
        self.count += 1

    def _release(self):
        while self.pending and self.pending[0][0] <= time.monotonic():
            msg = heapq.heappop(self.pending)[2]
            self.pub.publish(msg)
            self.released.append(msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)

    def overtaken(self):
        """Messages released after a newer one (they arrive after that newer frame was served: late)."""
        return sum(any(later > t for later in self.released[:i]) for i, t in enumerate(self.released))


def test_a_stream_delayed_by_seconds_is_waited_for_not_a_restart(ros, ros_domain_id, sevenscenes_bag):
    """camera_info delayed by 2 to 3 s (reordered on the way) between the bag and the nodes: the frames
    wait for it, the trajectory is the ground truth as without delay, no restart, and the camera_infos
    overtaken by newer ones are counted as late."""
    from sensor_msgs.msg import CameraInfo

    from vlm3_ros import bags

    truth = {m.stamp_ns: bags.pose_from_msg(m.msg) for m in bags.read_messages(sevenscenes_bag, ["/ground_truth/pose"])}
    relay = DelayingRelay(ros.node("relay"), CameraInfo, "/camera/camera_info", "/camera/camera_info_delayed",
                          delays=[3.0, 2.0, 2.6, 2.2, 2.9, 2.1, 2.5, 2.3, 2.8, 2.0])
    # The relay takes the bag's camera_info (1 subscription); the nodes take the rest (5).
    out, node = _play_into_perception(ros, ros_domain_id, sevenscenes_bag,
                                      ["--backend", "oracle", "--camera-info", "/camera/camera_info_delayed",
                                       "--ros-args", "-p", "query_count:=32", "-p", "mode:=correspondence"],
                                      wait_subscriptions=6, rate=0.5,
                                      ready=lambda: relay.pub.get_subscription_count() == 2)
    frames = len(truth)

    def accounted(name):  # every camera_info reached the node: paired into a frame, or late
        values = diagnostic_values(out["diagnostics"], f"/{name}") or {}
        return (values.get("received.camera_info") == str(frames)
                and int(values["sets_paired"]) + int(values["late.camera_info"]) == frames
                and int(values["frames_published"]) + int(values["dropped_busy"]) == int(values["sets_paired"]))

    try:
        assert ros.spin_until(lambda: accounted("depth_node") and accounted("odometry_node"), 30), str([
            diagnostic_values(out["diagnostics"], f"/{n}") for n in ("depth_node", "odometry_node")])
    finally:
        code, text = _stop(node)
    assert code == 0, text[-3000:]
    assert len(relay.released) == frames and relay.overtaken() >= 1  # the delays did reorder the stream
    for name in ("depth_node", "odometry_node"):
        values = diagnostic_values(out["diagnostics"], f"/{name}")
        assert values["time_jumps"] == "0", values
        assert values["late.camera_info"] == str(relay.overtaken()) and values["late"] == str(relay.overtaken())
        assert values["unpaired.camera_info"] == "0"
    # The same trajectory as without delay: every published pose on the ground truth (no restart).
    from vlm3_ros.odometry import xyz_rotation_to_pose
    from vlm3_ros.ros.params import OPTICAL_RPY

    T_bc = xyz_rotation_to_pose([0, 0, 0], OPTICAL_RPY)
    first = min(truth)
    assert len(out["odom"]) >= 2
    for msg in out["odom"].messages:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        gt = T_bc @ g.relative_pose(truth[first], truth[stamp]) @ g.invert_pose(T_bc)
        assert np.linalg.norm(cv.pose_matrix(msg.pose.pose)[:3, 3] - gt[:3, 3]) < 0.015, stamp
    assert all(m.width >= 25 for m in out["points"].messages) and len(out["points"]) >= 2


def test_bag_played_into_perception_with_the_tiny_model(ros, ros_domain_id, sevenscenes_bag, tiny_checkpoint):
    args = ["--model", str(tiny_checkpoint), "--ros-args", "-p", "device:=cpu", "-p", "dtype:=float32",
            "-p", "query_count:=8", "-p", "max_new_tokens:=4", "-p", "mode:=pose"]
    # Depth and odometry nodes: image and camera_info each.
    out, node = _play_into_perception(ros, ros_domain_id, sevenscenes_bag, args, wait_subscriptions=4)
    try:
        ok = ros.spin_until(lambda: len(out["points"]) >= 1 and len(out["depth"]) >= 1 and len(out["odom"]) >= 1
                            and (not TF_AVAILABLE or any(t.child_frame_id == "base_link" for m in out["tf"].messages
                                                         for t in m.transforms)), 90)
    finally:
        code, text = _stop(node, timeout=30)
    assert ok, text[-3000:]
    assert code == 0, text[-3000:]
    # Random weights: no answer parses, so the cloud is empty and the pose stays at the origin;
    # the outputs still carry the frames' stamps (1.0 .. 1.9 s in the bag) and frames.
    cloud = out["points"].messages[-1]
    assert cloud.header.frame_id == "camera_optical_frame" and cloud.width == 0
    assert 1.0 <= cloud.header.stamp.sec + cloud.header.stamp.nanosec * 1e-9 <= 2.0
    assert np.isnan(msg_codec.decode_image(out["depth"].messages[-1])).all()
    odom = out["odom"].messages[-1]
    np.testing.assert_allclose(cv.pose_matrix(odom.pose.pose), np.eye(4), atol=1e-12)
    assert (odom.header.frame_id, odom.child_frame_id) == ("odom", "base_link")



def test_bench_node_measures_the_nodes_against_the_engine(ros_domain_id, tmp_path, capsys):
    """`vlm3-ros bench-node` (oracle: the nodes' own cost) feeds a stream into the nodes' process and
    reports consistent rates, latencies and drops; the speed itself is for BENCHMARKS.md, not checked."""
    import json

    from vlm3_ros.cli.main import main

    out = tmp_path / "bench.json"
    assert main(["bench-node", "--oracle", "--rate", "10", "--duration", "4", "--cycles", "2", "--warmup", "1",
                 "--engine-frames", "1", "--frames", "3", "--points", "16", "--rss-interval", "1",
                 "--domain-id", str(ros_domain_id), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "engine frame time" in printed and "depth_node: output" in printed
    assert report["conditions"]["rate_hz"] == 10 and report["conditions"]["phases"] == 2
    assert 7.0 <= report["input_hz"] <= 10.5
    node = report["nodes"]["depth_node"]
    # How many frames are served depends on the machine's load; every frame published is accounted for.
    assert node["frames_out"] >= 2 and node["frames_out"] + node["not_served"] == round(report["input_hz"] * 4)
    assert 0 < node["latency_p50_s"] <= node["latency_p95_s"] <= node["latency_max_s"] < 10
    assert node["rate_vs_engine"] == pytest.approx(node["output_hz"] * report["engine"]["frame_s"])
    # The oracle answers far faster than 10 Hz: the goal is measured against the input rate then.
    achievable = min(report["input_hz"], 1 / report["engine"]["frame_s"])
    assert node["achievable_hz"] == pytest.approx(achievable) and achievable == pytest.approx(report["input_hz"])
    assert node["goal_rate"] == (node["output_hz"] >= 0.7 * achievable)
    assert report["engine"]["frame_s"] > 0 and len(report["engine"]["phases_s"]) == 3
    assert int(node["diagnostics"]["frames_published"]) >= node["frames_out"]
    assert node["diagnostics"]["time_jumps"] == "0" and node["diagnostics"]["late"] == "0"
    assert len(report["rss_mb"]) >= 4 and all(v > 50 for _, v in report["rss_mb"])
    assert [p["depth_node"]["output_hz"] > 0 for p in report["phases"]] == [True, True]
