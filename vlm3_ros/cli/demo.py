"""``vlm3-ros demo``: the main job, end to end on a fresh machine.

1. the default model: trained by the training package on synthetic scenes on first use and cached;
2. a synthetic rosbag2 of a held-out scene (camera image, camera info, depth, ground-truth pose);
3. the real ROS 2 nodes (``vlm3-ros perception``, a separate process) fed by ``vlm3-ros play``;
4. outputs: a bag of the node outputs, a PLY of the accumulated cloud in the odom frame, the
   trajectory plot against ground truth, a metrics JSON, and a short summary with the paths.

A second run reuses the model and the input bag and runs the nodes again.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..paths import write_atomic, write_json_atomic

HELP = "The main job: default model, a synthetic bag, the ROS 2 nodes through vlm3-ros play, outputs and a summary."

#: node outputs recorded into the output bag: topic -> (module, class)
RECORDED = {
    "/points": ("sensor_msgs.msg", "PointCloud2"),
    "/depth/sparse": ("sensor_msgs.msg", "Image"),
    "/depth/camera_info": ("sensor_msgs.msg", "CameraInfo"),
    "/odom": ("nav_msgs.msg", "Odometry"),
    "/diagnostics": ("diagnostic_msgs.msg", "DiagnosticArray"),
}
NODES = ("depth_node", "odometry_node")
SCENE_SEED = 4242  # a scene the default model never saw (its training and validation seeds differ)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="output directory")
    parser.add_argument("--frames", type=int, default=20, help="frames of the synthetic bag")
    parser.add_argument("--points", type=int, default=64, help="depth questions per frame (query_count)")
    parser.add_argument("--frame-interval", type=float, default=2.0,
                        help="wall seconds between played frames (the nodes' time per frame on a CPU)")
    parser.add_argument("--new-bag", action="store_true", help="regenerate the input bag")
    parser.add_argument("--model", type=Path, help="a checkpoint to run instead of the default model")
    parser.add_argument("--oracle", action="store_true",
                        help="answer from the bag's ground truth instead of a model (validates the whole path)")
    parser.add_argument("--rebuild-model", action="store_true", help="retrain the default model")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for the node run")
    parser.add_argument("--domain-id", type=int, default=None,
                        help="ROS domain of the demo's processes (default: a private one from the process id)")


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _vlm3_train():
    try:
        import vlm3_train  # noqa: F401
    except ImportError:
        raise SystemExit("error: the demo needs the training package: pip install -e ./training "
                         "(python3 scripts/setup_env.py installs it)") from None


def _input_bag(path: Path, frames: int, camera_height: float | None, regenerate: bool) -> tuple[Path, bool]:
    from vlm3_train.default_model import robot_sequence
    from vlm3_train.synthetic import write_bag

    if path.is_dir() and not regenerate:
        return path, True
    sequence = robot_sequence(SCENE_SEED, 0, frames, camera_height)
    write_bag(sequence, path, overwrite=True)
    return path, False


def _child_env(domain_id: int) -> dict[str, str]:
    from ..ros.dds import child_environment

    return child_environment(domain_id)


def _params_file(path: Path, model: Path | None, points: int, depth_backend: str, odometry_backend: str) -> Path:
    import yaml

    params = {
        "/**": {"ros__parameters": {"model": str(model or ""), "device": "cpu", "dtype": "float32",
                                    "query_count": points, "max_new_tokens": 24}},
        "/**/depth_node": {"ros__parameters": {"backend": depth_backend, "publish_rgb": True}},
        "/**/odometry_node": {"ros__parameters": {"backend": odometry_backend, "mode": "correspondence",
                                                  "query_count": 32}},
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


class Recorder:
    """Subscribes to the node outputs and keeps every message's serialized bytes."""

    def __init__(self, domain_id: int) -> None:
        import importlib

        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("vlm3_demo_recorder", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.messages: dict[str, list[tuple[int, bytes]]] = {topic: [] for topic in RECORDED}
        self.types = {}
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        for topic, (module, name) in RECORDED.items():
            cls = getattr(importlib.import_module(module), name)
            self.types[topic] = cls
            self.node.create_subscription(cls, topic, lambda data, t=topic: self._keep(t, data), qos, raw=True)

    def _keep(self, topic: str, data: bytes) -> None:
        self.messages[topic].append((time.time_ns(), bytes(data)))

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.05, max(end - time.monotonic(), 0.0)))

    def decoded(self, topic: str) -> list[Any]:
        from rclpy.serialization import deserialize_message

        return [deserialize_message(data, self.types[topic]) for _, data in self.messages[topic]]

    def node_status(self, node: str) -> dict[str, str]:
        """Key/values of ``node``'s latest /diagnostics status (empty before the first)."""
        from rclpy.serialization import deserialize_message

        cls = self.types["/diagnostics"]
        for _, data in reversed(self.messages["/diagnostics"]):
            for status in deserialize_message(data, cls).status:
                if status.name.split("/")[-1] == node:
                    return {kv.key: kv.value for kv in status.values}
        return {}

    def wait_until_ready(self, nodes: tuple[str, ...], timeout: float) -> None:
        """Spin until every node's backend reports ready (a model may take a while to load)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.spin(0.25)
            states = {n: self.node_status(n).get("backend_state") for n in nodes}
            if any(s == "failed" for s in states.values()):
                raise SystemExit(f"error: a backend failed to load: {states}")
            if all(s in ("ready", "busy") for s in states.values()):
                return
        raise SystemExit(f"error: the nodes' backends were not ready after {timeout:.0f} s")

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


def _stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _run_nodes(args: argparse.Namespace, bag: Path, params: Path, backends: dict[str, str], frames: int) -> Recorder:
    from vlm3_train.synthetic import FRAME_PERIOD_NS

    domain_id = args.domain_id if args.domain_id is not None else 1 + os.getpid() % 100
    env = _child_env(domain_id)
    recorder = Recorder(domain_id)
    exe = [sys.executable, "-m", "vlm3_ros.cli.main"]
    log = open(args.output / "perception.log", "w")
    perception = subprocess.Popen([*exe, "perception", "--params-file", str(params), "--use-sim-time"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        topics = ["/camera/image_raw", "/camera/camera_info", "/camera/depth/image_raw", "/ground_truth/pose"]
        # Subscriptions on the played topics: each node's image and camera info, plus the reference
        # depth (both nodes) and pose (odometry) in oracle mode.
        subscriptions = 4 + (backends["depth_node"] == "oracle") + 2 * (backends["odometry_node"] == "oracle")
        recorder.wait_until_ready(NODES, min(args.timeout, 300.0))
        rate = FRAME_PERIOD_NS * 1e-9 / args.frame_interval
        _say(f"playing {frames} frames at rate {rate:.3f} ({args.frame_interval:g} s per frame) into the nodes")
        play = subprocess.Popen([*exe, "play", str(bag), "--rate", f"{rate:.6f}", "--topics", *topics,
                                 "--wait-for-subscribers", str(subscriptions), "--wait-timeout", "300", "--quiet"],
                                env=env)
        deadline = time.monotonic() + args.timeout
        while play.poll() is None:
            recorder.spin(0.2)
            if time.monotonic() > deadline or perception.poll() is not None:
                play.terminate()
                raise SystemExit(f"error: the node run did not finish; see {args.output / 'perception.log'}")
        if play.returncode != 0:
            raise SystemExit(f"error: vlm3-ros play exited with {play.returncode}")
        # Let the nodes finish the frames they hold (newest wins: some may have been replaced).
        quiet_since, seen = time.monotonic(), -1
        while time.monotonic() - quiet_since < 3 * args.frame_interval + 2 and time.monotonic() < deadline:
            recorder.spin(0.25)
            count = sum(len(v) for k, v in recorder.messages.items() if k != "/diagnostics")
            if count != seen:
                seen, quiet_since = count, time.monotonic()
    finally:
        if perception.poll() is None:
            perception.send_signal(signal.SIGINT)
            try:
                perception.wait(30)
            except subprocess.TimeoutExpired:
                perception.kill()
        log.close()
    return recorder


def _write_bag(recorder: Recorder, path: Path) -> Path:
    from ..bags import RgbdBagWriter

    with RgbdBagWriter(path, overwrite=True, tf=False) as writer:
        for topic, (module, name) in RECORDED.items():
            msgtype = f"{module.split('.')[0]}/msg/{name}"
            for received_ns, data in recorder.messages[topic]:
                writer.write(topic, msgtype, received_ns, data)
    return path


def _ply(points: np.ndarray, colours: np.ndarray) -> bytes:
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(points)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    ).encode()
    table = np.empty(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    for i, axis in enumerate("xyz"):
        table[axis] = points[:, i]
    for i, channel in enumerate("rgb"):
        table[channel] = colours[:, i]
    return header + table.tobytes()


def _plot(path: Path, estimated: np.ndarray, truth: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot(truth[:, 0], truth[:, 1], "k.-", label="ground truth")
    ax.plot(estimated[:, 0], estimated[:, 1], "r.-", label="odometry (odom -> base_link)")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True)
    ax.legend()
    ax.set_title(title)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, png.getvalue())


def _analyse(recorder: Recorder, bag: Path, points_per_frame: int, output: Path) -> dict[str, Any]:
    from .. import bags, geometry, metrics, msg_codec
    from ..odometry import xyz_rotation_to_pose
    from ..pipeline import query_grid
    from ..ros.params import OPTICAL_RPY

    frames = {f.stamp_ns: f for f in bags.iter_rgbd_frames(bag)}
    stamps = sorted(frames)
    T_bc = xyz_rotation_to_pose([0.0, 0.0, 0.0], OPTICAL_RPY)  # the nodes' default base_link -> camera
    odom = {_stamp_ns(m.header): bags.pose_from_msg(m) for m in recorder.decoded("/odom")}

    # Depth: every asked pixel counts; a question without a usable answer counts as wrong.
    clouds = recorder.decoded("/points")
    asked = len(query_grid(frames[stamps[0]].rgb.shape[1], frames[stamps[0]].rgb.shape[0], points_per_frame))
    pred_all, gt_all, world_points, world_colours = [], [], [], []
    for cloud in clouds:
        stamp = _stamp_ns(cloud.header)
        frame = frames.get(stamp)
        if frame is None:
            continue
        table = msg_codec.read_cloud(cloud)
        uv = np.stack([table["u"], table["v"]], axis=1).astype(float) if len(table) else np.zeros((0, 2))
        gt = geometry.sample_nearest(frame.depth_m, uv) if len(uv) else np.zeros(0)
        pred = np.asarray(table["z"], float) if len(table) else np.zeros(0)
        pred_all.append(np.concatenate([pred, np.full(asked - len(pred), np.nan)]))
        gt_all.append(np.concatenate([gt, np.full(asked - len(pred), np.nan)]))
        if stamp in odom and len(table):
            xyz = np.stack([table["x"], table["y"], table["z"]], axis=1).astype(float)
            world_points.append(geometry.transform_points(odom[stamp] @ T_bc, xyz))
            packed = np.asarray(table["rgb"]).view(np.uint32) if "rgb" in table.dtype.names else np.zeros(len(xyz), np.uint32)
            world_colours.append(np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], 1).astype(np.uint8))
    pred = np.concatenate(pred_all) if pred_all else np.zeros(0)
    gt = np.concatenate(gt_all) if gt_all else np.zeros(0)
    known = np.isfinite(gt)  # pixels where the synthetic scene has depth (the sky has none)
    depth = {
        "frames_with_cloud": len(clouds),
        "questions": int(known.sum()),
        "answered": int(np.isfinite(pred[known]).sum()),
        "delta1": metrics.delta1(pred[known], gt[known]) if known.any() else None,
        "abs_rel": metrics.abs_rel(pred[known], gt[known]) if known.any() else None,
    }

    # Trajectory: base_link in odom against the ground truth expressed the same way.
    matched = [s for s in stamps if s in odom]
    trajectory: dict[str, Any] = {"frames_with_odometry": len(matched)}
    plot_path = output / "trajectory.png"
    if len(matched) >= 2:
        T0 = frames[matched[0]].T_w_c
        truth = np.stack([T_bc @ geometry.relative_pose(T0, frames[s].T_w_c) @ geometry.invert_pose(T_bc) for s in matched])
        estimated = np.stack([odom[s] for s in matched])
        ate = metrics.ate(estimated, truth, align="none")
        trajectory.update(ate_rmse_m=ate["rmse"], rpe=metrics.rpe(estimated, truth),
                          path_length_m=float(np.linalg.norm(np.diff(truth[:, :3, 3], axis=0), axis=1).sum()))
        _plot(plot_path, estimated[:, :3, 3], truth[:, :3, 3], f"odometry vs ground truth, ATE {ate['rmse'] * 100:.1f} cm")
    ply_path = output / "cloud_odom.ply"
    cloud_points = np.concatenate(world_points) if world_points else np.zeros((0, 3))
    cloud_colours = np.concatenate(world_colours) if world_colours else np.zeros((0, 3), np.uint8)
    write_atomic(ply_path, _ply(cloud_points, cloud_colours))
    return {"depth": depth, "trajectory": trajectory, "cloud_points": int(len(cloud_points)),
            "files": {"ply": str(ply_path), "trajectory_plot": str(plot_path) if plot_path.exists() else None}}


def run(args: argparse.Namespace) -> int:
    _vlm3_train()
    from vlm3_train.default_model import DEFAULT_RECIPE, REPORT_NAME, default_model_path, ensure_default_model

    t0 = time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    from ..protocol import load_protocol

    model, model_report = None, {}
    if args.oracle:
        served: set[str] = set()
    else:
        if args.model:
            model = args.model
        else:
            cached = (default_model_path() / REPORT_NAME).is_file() and not args.rebuild_model
            _say("default model: " + ("cached" if cached else "building it (a few minutes on a CPU; cached afterwards)"))
            model = ensure_default_model(force=args.rebuild_model)
            model_report = json.loads((model / REPORT_NAME).read_text())
        served = set(load_protocol(model) or {"depth", "correspondence", "pose"})
    # The odometry node runs in correspondence mode; without a model for that task it uses the oracle.
    backends = {"depth_node": "oracle" if args.oracle else "transformers",
                "odometry_node": "transformers" if "correspondence" in served else "oracle"}
    bag, reused = _input_bag(args.output / "input_bag", args.frames, DEFAULT_RECIPE.camera_height, args.new_bag)
    _say(f"input bag: {bag} ({'reused' if reused else 'generated'}, held-out synthetic scene)")
    params = _params_file(args.output / "params.yaml", model, args.points, backends["depth_node"], backends["odometry_node"])
    recorder = _run_nodes(args, bag, params, backends, args.frames)
    try:
        output_bag = _write_bag(recorder, args.output / "node_outputs")
        analysis = _analyse(recorder, bag, args.points, args.output)
        frames = {node: {key: int(status.get(key, 0)) for key in ("frames_submitted", "frames_published", "dropped_busy")}
                  for node in NODES for status in [recorder.node_status(node)]}
    finally:
        recorder.close()
    report = {
        "model": {"path": str(model) if model else None, "tasks": sorted(served), "held_out": model_report},
        "backends": backends,
        "input_bag": str(bag),
        "node_outputs_bag": str(output_bag),
        "frames": {"played": args.frames, **frames},
        **analysis,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    metrics_path = args.output / "metrics.json"
    write_json_atomic(metrics_path, report, default=float)
    _summary(report, metrics_path)
    return 0 if analysis["depth"]["frames_with_cloud"] > 0 else 1


def _summary(report: dict[str, Any], metrics_path: Path) -> None:
    depth, traj = report["depth"], report["trajectory"]
    fmt = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)  # noqa: E731
    print()
    print("vlm3_ros demo")
    if report["model"]["path"]:
        print(f"  model            {report['model']['path']} (tasks: {', '.join(report['model']['tasks'])})")
    else:
        print("  model            none: every answer comes from the bag's ground truth (oracle)")
    served = report["frames"]["depth_node"]
    print(f"  frames           {report['frames']['played']} played; depth node published {served['frames_published']}, "
          f"replaced while busy {served['dropped_busy']}")
    print(f"  depth            {depth['frames_with_cloud']} clouds, {depth['answered']}/{depth['questions']} questions answered, "
          f"delta1 {fmt(depth['delta1'])}, AbsRel {fmt(depth['abs_rel'])}")
    if "ate_rmse_m" in traj:
        source = report["backends"]["odometry_node"]
        if source == "oracle" and report["model"]["path"]:
            source = "oracle: the model does not answer correspondences"
        print(f"  odometry         {traj['frames_with_odometry']} poses ({source}), "
              f"ATE {traj['ate_rmse_m'] * 100:.1f} cm over {traj['path_length_m']:.2f} m")
    print(f"  node outputs     {report['node_outputs_bag']}")
    print(f"  cloud (odom)     {report['files']['ply']} ({report['cloud_points']} points)")
    print(f"  trajectory plot  {report['files']['trajectory_plot']}")
    print(f"  metrics          {metrics_path}")
    print(f"  took             {report['seconds']} s")
