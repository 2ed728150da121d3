"""``vlm3-ros demo``: the main job, end to end on a fresh machine.

1. the default model: trained by the training package on synthetic scenes on first use and cached;
   its held-out figures are printed beside their baselines;
2. a synthetic rosbag2 of a held-out scene seen by a ground robot's camera (camera image, camera
   info, depth, ground-truth pose);
3. the real ROS 2 nodes (``vlm3-ros perception``, a separate process) fed by ``vlm3-ros play``, both
   answering from the model (odometry in the mode the model's tasks allow), or from the bag's ground
   truth with ``--oracle``; the robot's ``base_link`` sits on the floor, the camera above it;
4. outputs: a bag of the node outputs (with ``/tf``), a PLY of the accumulated cloud in the odom
   frame, the trajectory plot against ground truth, the depth figure (answered against true depth,
   and one frame's points coloured by their error), a metrics JSON, and a short summary.

A second run reuses the model and the input bag and runs the nodes again.
"""

from __future__ import annotations

import argparse
import io
import json
import os
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
    "/tf": ("tf2_msgs.msg", "TFMessage"),
    "/tf_static": ("tf2_msgs.msg", "TFMessage"),
    "/diagnostics": ("diagnostic_msgs.msg", "DiagnosticArray"),
}
NODES = ("depth_node", "odometry_node")
SCENE_SEED = 4242  # a scene the default model never saw (its training and validation seeds differ)
#: The demo robot's camera: this high above base_link (on the floor), level, looking along x.
CAMERA_HEIGHT = 0.6
#: Odometry mode by the tasks a model serves (the first one it can run).
ODOMETRY_MODES = (("both", {"pose", "correspondence", "depth"}), ("pose", {"pose"}),
                  ("correspondence", {"correspondence", "depth"}))


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


def _input_bag(path: Path, frames: int, regenerate: bool) -> tuple[Path, bool]:
    from vlm3_train.synthetic import DEFAULT_FOCAL, generate_robot_sequence, write_bag

    if path.is_dir() and not regenerate:
        return path, True
    sequence = generate_robot_sequence(SCENE_SEED, frames, camera_height=CAMERA_HEIGHT, focal=DEFAULT_FOCAL, pitch=0.0,
                                       supersample=2)
    write_bag(sequence, path, overwrite=True)
    return path, False


def _base_to_camera() -> np.ndarray:
    """``T_base_camera``: the optical frame of a level camera CAMERA_HEIGHT above base_link, looking along x."""
    from ..odometry import xyz_rotation_to_pose
    from ..ros.params import OPTICAL_RPY

    return xyz_rotation_to_pose([0.0, 0.0, CAMERA_HEIGHT], OPTICAL_RPY)


def _child_env(domain_id: int) -> dict[str, str]:
    from ..ros.dds import child_environment

    return child_environment(domain_id)


def _params_file(path: Path, model: Path | None, points: int, backend: str, mode: str) -> Path:
    import yaml

    params = {
        "/**": {"ros__parameters": {"model": str(model or ""), "device": "cpu", "dtype": "float32",
                                    "query_count": points, "max_new_tokens": 24, "backend": backend}},
        "/**/depth_node": {"ros__parameters": {"publish_rgb": True}},
        "/**/odometry_node": {"ros__parameters": {"mode": mode, "query_count": 32,
                                                  "extrinsic_xyz": [0.0, 0.0, CAMERA_HEIGHT],
                                                  "publish_extrinsic": True}},
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


class Recorder:
    """Subscribes to the node outputs and keeps every message's serialized bytes."""

    def __init__(self, domain_id: int) -> None:
        import importlib

        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("vlm3_demo_recorder", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.messages: dict[str, list[tuple[int, bytes]]] = {topic: [] for topic in RECORDED}
        self.types = {}
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        for topic, (module, name) in RECORDED.items():
            try:
                cls = getattr(importlib.import_module(module), name)
            except ImportError:  # tf2_msgs is generated by the setup; without it /tf is not recorded
                continue
            self.types[topic] = cls
            self.node.create_subscription(cls, topic, lambda data, t=topic: self._keep(t, data),
                                          latched if topic == "/tf_static" else qos, raw=True)

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


def _run_nodes(args: argparse.Namespace, bag: Path, params: Path, oracle: bool, frames: int) -> Recorder:
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
        subscriptions = 4 + 3 * oracle
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
        from ..ros.dds import stop_child

        stop_child(perception, 30)
        log.close()
    return recorder


def _write_bag(recorder: Recorder, path: Path) -> Path:
    from ..bags import RgbdBagWriter

    with RgbdBagWriter(path, overwrite=True, tf=False) as writer:
        for topic, (module, name) in RECORDED.items():
            if not recorder.messages[topic]:
                continue
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


def _figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return png.getvalue()


def _trajectory_plot(path: Path, estimated: np.ndarray, truth: np.ndarray, title: str) -> None:
    """Top view (x, y in odom) of the odometry and the ground truth, side by side and overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5), sharex=True, sharey=True)
    axes[0].plot(truth[:, 0], truth[:, 1], "k.-", label="ground truth")
    axes[0].set_title("ground truth")
    axes[1].plot(truth[:, 0], truth[:, 1], "k.-", alpha=0.35, label="ground truth")
    axes[1].plot(estimated[:, 0], estimated[:, 1], "r.-", label="odometry (odom -> base_link)")
    axes[1].set_title(title)
    for ax in axes:
        ax.plot(truth[0, 0], truth[0, 1], "go", label="start")
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        ax.set_aspect("equal", adjustable="box")  # shared limits cover both paths
        ax.grid(True)
        ax.legend(fontsize=8)
    write_atomic(path, _figure_png(fig))


def _depth_plot(path: Path, pred: np.ndarray, gt: np.ndarray, frame_rgb: np.ndarray | None, frame_uv: np.ndarray,
                frame_pred: np.ndarray, frame_gt: np.ndarray, title: str) -> None:
    """Answered against true depth (with the delta1 band), and one frame's points coloured by error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    ok = np.isfinite(pred) & np.isfinite(gt)
    hi = float(max(np.nanmax(gt[ok]) if ok.any() else 1.0, np.nanmax(pred[ok]) if ok.any() else 1.0)) * 1.05
    line = np.array([0.0, hi])
    axes[0].fill_between(line, line / 1.25, line * 1.25, color="tab:green", alpha=0.15,
                         label="delta1 band: within 1.25x of the truth")
    axes[0].plot(line, line, "k--", lw=1)
    axes[0].scatter(gt[ok], pred[ok], s=6, alpha=0.5, color="tab:blue", label=f"{int(ok.sum())} answered points")
    axes[0].set_xlim(0, hi)
    axes[0].set_ylim(0, hi)
    axes[0].set_xlabel("true depth z (m)")
    axes[0].set_ylabel("answered depth z (m)")
    axes[0].set_title(title)
    axes[0].legend(fontsize=8, loc="upper left")
    if frame_rgb is not None:
        axes[1].imshow(frame_rgb)
    okf = np.isfinite(frame_pred) & np.isfinite(frame_gt)
    if okf.any():
        error = np.log2(frame_pred[okf] / frame_gt[okf])
        dots = axes[1].scatter(frame_uv[okf, 0], frame_uv[okf, 1], c=np.clip(error, -1, 1), cmap="coolwarm",
                               vmin=-1, vmax=1, s=28, edgecolors="k", linewidths=0.4)
        fig.colorbar(dots, ax=axes[1], label="log2(answered / true): blue too near, red too far")
    no_gt = np.isfinite(frame_pred) & ~np.isfinite(frame_gt)
    if no_gt.any():
        axes[1].scatter(frame_uv[no_gt, 0], frame_uv[no_gt, 1], marker="x", color="k", s=20,
                        label="answered, no ground truth (sky)")
        axes[1].legend(fontsize=8, loc="lower right")
    axes[1].set_title("one frame: answered points coloured by their error")
    axes[1].axis("off")
    fig.tight_layout()
    write_atomic(path, _figure_png(fig))


def _analyse(recorder: Recorder, bag: Path, points_per_frame: int, output: Path, source: str) -> dict[str, Any]:
    from .. import bags, geometry, metrics, msg_codec
    from ..pipeline import query_grid

    frames = {f.stamp_ns: f for f in bags.iter_rgbd_frames(bag)}
    stamps = sorted(frames)
    width, height = frames[stamps[0]].rgb.shape[1], frames[stamps[0]].rgb.shape[0]
    T_bc = _base_to_camera()
    odom = {_stamp_ns(m.header): bags.pose_from_msg(m) for m in recorder.decoded("/odom")}

    # Depth: every asked pixel counts; a question without a usable answer counts as wrong. Pixels
    # whose ray leaves the room (the sky) have no ground truth and are counted apart.
    asked_uv = query_grid(width, height, points_per_frame)
    clouds = recorder.decoded("/points")
    pred_all, gt_all, world_points, world_colours = [], [], [], []
    counts = {"asked": 0, "answered": 0, "asked_with_truth": 0, "answered_with_truth": 0}
    per_frame = []
    for cloud in clouds:
        stamp = _stamp_ns(cloud.header)
        frame = frames.get(stamp)
        if frame is None:
            continue
        table = msg_codec.read_cloud(cloud)
        uv = np.stack([table["u"], table["v"]], axis=1).astype(float) if len(table) else np.zeros((0, 2))
        gt = geometry.sample_nearest(frame.depth_m, uv) if len(uv) else np.zeros(0)
        pred = np.asarray(table["z"], float) if len(table) else np.zeros(0)
        asked_gt = geometry.sample_nearest(frame.depth_m, asked_uv)
        counts["asked"] += len(asked_uv)
        counts["answered"] += len(pred)
        counts["asked_with_truth"] += int(np.isfinite(asked_gt).sum())
        counts["answered_with_truth"] += int(np.isfinite(gt).sum())
        unanswered = int(np.isfinite(asked_gt).sum()) - int(np.isfinite(gt).sum())
        pred_all.append(np.concatenate([pred[np.isfinite(gt)], np.full(max(unanswered, 0), np.nan)]))
        gt_all.append(np.concatenate([gt[np.isfinite(gt)], np.full(max(unanswered, 0), 1.0)]))
        per_frame.append((stamp, uv, pred, gt))
        if stamp in odom and len(table):
            xyz = np.stack([table["x"], table["y"], table["z"]], axis=1).astype(float)
            world_points.append(geometry.transform_points(odom[stamp] @ T_bc, xyz))
            packed = np.asarray(table["rgb"]).view(np.uint32) if "rgb" in table.dtype.names else np.zeros(len(xyz), np.uint32)
            world_colours.append(np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], 1).astype(np.uint8))
    pred = np.concatenate(pred_all) if pred_all else np.zeros(0)
    gt = np.concatenate(gt_all) if gt_all else np.zeros(0)
    depth = {
        "frames_with_cloud": len(clouds),
        "points_per_frame": len(asked_uv),
        **counts,
        "delta1": metrics.delta1(pred, gt) if len(gt) else None,
        "abs_rel": metrics.abs_rel(pred, gt) if len(gt) and np.isfinite(pred).any() else None,
    }
    depth_path = output / "depth.png"
    if per_frame:
        stamp, uv, fpred, fgt = per_frame[len(per_frame) // 2]
        answered_pred = np.concatenate([p for _, _, p, _ in per_frame])
        answered_gt = np.concatenate([g for _, _, _, g in per_frame])
        _depth_plot(depth_path, answered_pred, answered_gt, frames[stamp].rgb, uv, fpred, fgt,
                    f"depth from the {source}: delta1 {depth['delta1']:.2f}, AbsRel {depth['abs_rel'] or float('nan'):.2f}")

    # Trajectory: base_link in odom against the ground truth expressed the same way.
    matched = [s for s in stamps if s in odom]
    trajectory: dict[str, Any] = {"frames_with_odometry": len(matched)}
    plot_path = output / "trajectory.png"
    if len(matched) >= 2:
        T0 = frames[matched[0]].T_w_c
        truth = np.stack([T_bc @ geometry.relative_pose(T0, frames[s].T_w_c) @ geometry.invert_pose(T_bc) for s in matched])
        estimated = np.stack([odom[s] for s in matched])
        ate = metrics.ate(estimated, truth, align="none")
        still = metrics.ate(np.broadcast_to(np.eye(4), truth.shape), truth, align="none")
        trajectory.update(ate_rmse_m=ate["rmse"], zero_motion_ate_rmse_m=still["rmse"], rpe=metrics.rpe(estimated, truth),
                          path_length_m=float(np.linalg.norm(np.diff(truth[:, :3, 3], axis=0), axis=1).sum()))
        _trajectory_plot(plot_path, estimated[:, :3, 3], truth[:, :3, 3],
                         f"odometry from the {source}: ATE {ate['rmse'] * 100:.1f} cm "
                         f"(standing still: {still['rmse'] * 100:.1f} cm)")
    ply_path = output / "cloud_odom.ply"
    cloud_points = np.concatenate(world_points) if world_points else np.zeros((0, 3))
    cloud_colours = np.concatenate(world_colours) if world_colours else np.zeros((0, 3), np.uint8)
    write_atomic(ply_path, _ply(cloud_points, cloud_colours))
    return {"depth": depth, "trajectory": trajectory, "cloud_points": int(len(cloud_points)),
            "cloud_frames": len(world_points),
            "files": {"ply": str(ply_path), "trajectory_plot": str(plot_path) if plot_path.exists() else None,
                      "depth_plot": str(depth_path) if depth_path.exists() else None}}


def _odometry_mode(served: set[str]) -> str | None:
    return next((mode for mode, needs in ODOMETRY_MODES if needs <= served), None)


def run(args: argparse.Namespace) -> int:
    _vlm3_train()
    from vlm3_train.default_model import REPORT_NAME, default_model_path, ensure_default_model, format_comparison

    t0 = time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    from ..protocol import load_protocol

    model, model_report = None, {}
    if args.oracle:
        mode, source = "correspondence", "oracle"
    else:
        if args.model:
            model = args.model
        else:
            cached = (default_model_path() / REPORT_NAME).is_file() and not args.rebuild_model
            _say("default model: " + ("cached" if cached else "building it (a few minutes on a CPU; cached afterwards)"))
            model = ensure_default_model(force=args.rebuild_model)
            model_report = json.loads((model / REPORT_NAME).read_text())
            print(format_comparison(model_report["heldout"]["against_baselines"],
                                    "default model: held-out synthetic scenes, each metric beside its baseline"))
            real = model_report.get("real_7scenes", {})
            if "against_baselines" in real:
                print(format_comparison(real["against_baselines"], "default model: real 7-Scenes frames"))
        served = set(load_protocol(model) or {"depth", "correspondence", "pose"})
        # Correspondences that do not beat the identity on held-out scenes would only feed PnP noise.
        weak = {r["task"] for r in model_report.get("heldout", {}).get("against_baselines", [])
                if r["task"] == "correspondence" and not r["beats"]}
        mode = _odometry_mode(served - weak) or _odometry_mode(served)
        if weak and mode == "pose":
            _say("odometry in pose mode: the model's correspondences do not beat the identity on held-out scenes")
        if mode is None or "depth" not in served:
            raise SystemExit(f"error: the model serves {sorted(served)}; the demo needs depth and pose or "
                             "correspondence (or run it with --oracle)")
        source = "model"
    bag, reused = _input_bag(args.output / "input_bag", args.frames, args.new_bag)
    _say(f"input bag: {bag} ({'reused' if reused else 'generated'}, held-out synthetic scene)")
    backend = "oracle" if args.oracle else "transformers"
    params = _params_file(args.output / "params.yaml", model, args.points, backend, mode)
    recorder = _run_nodes(args, bag, params, args.oracle, args.frames)
    try:
        output_bag = _write_bag(recorder, args.output / "node_outputs")
        analysis = _analyse(recorder, bag, args.points, args.output, source)
        frames = {node: {key: int(status.get(key, 0)) for key in ("frames_submitted", "frames_published", "dropped_busy")}
                  for node in NODES for status in [recorder.node_status(node)]}
        recorded = {topic: len(messages) for topic, messages in recorder.messages.items()}
    finally:
        recorder.close()
    report = {
        "model": {"path": str(model) if model else None, "held_out": model_report},
        "source": source,
        "backend": backend,
        "odometry_mode": mode,
        "input_bag": str(bag),
        "node_outputs_bag": str(output_bag),
        "recorded_messages": recorded,
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
        print(f"  model            {report['model']['path']}: depth and odometry ({report['odometry_mode']} mode) "
              "answered by the model")
    else:
        print("  model            none: every answer comes from the bag's ground truth (oracle)")
    served = report["frames"]["depth_node"]
    print(f"  frames           {report['frames']['played']} played; depth node published {served['frames_published']}, "
          f"replaced while busy {served['dropped_busy']}")
    print(f"  depth            {depth['asked']} points asked ({depth['frames_with_cloud']} frames x "
          f"{depth['points_per_frame']}), {depth['answered']} answered (the cloud); "
          f"{depth['asked_with_truth']} asked points have ground truth (the others see the sky), "
          f"{depth['answered_with_truth']} of them answered")
    print(f"                   over the asked points with ground truth (unanswered = wrong): delta1 "
          f"{fmt(depth['delta1'])}, AbsRel {fmt(depth['abs_rel'])}")
    if "ate_rmse_m" in traj:
        print(f"  odometry         {traj['frames_with_odometry']} poses from the {report['source']}, "
              f"ATE {traj['ate_rmse_m'] * 100:.1f} cm over {traj['path_length_m']:.2f} m "
              f"(standing still would be {traj['zero_motion_ate_rmse_m'] * 100:.1f} cm)")
    recorded = ", ".join(f"{t} {n}" for t, n in report["recorded_messages"].items() if t != "/diagnostics")
    print(f"  node outputs     {report['node_outputs_bag']} ({recorded})")
    print(f"  cloud (odom)     {report['files']['ply']} ({report['cloud_points']} points: the clouds of the "
          f"{report['cloud_frames']} frames that have an odometry pose; base_link on the floor)")
    print(f"  trajectory plot  {report['files']['trajectory_plot']}")
    print(f"  depth figure     {report['files']['depth_plot']}")
    print(f"  metrics          {metrics_path}")
    print(f"  took             {report['seconds']} s")
