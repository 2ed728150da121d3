"""``vlm3-ros bench-node``: the perception nodes under a camera-rate stream, against the engine alone.

One run, on one machine, side by side, in alternating phases (``--cycles``):

* **engine**: the node's model answers the frame's depth questions in this process, with nothing
  else of the benchmark running (``--engine-frames`` frames per phase; the median over all engine
  phases is the engine frame time);
* **nodes**: ``vlm3-ros perception`` in its own process (the nodes as deployed, with the same
  parameters) is fed frames at ``--rate`` Hz by this process, which times every output: input
  rate, output rate, latency from publication to the output's arrival (p50, p95, max), frames
  not served (newest wins) and the nodes' own diagnostics (drops, late and unpaired messages,
  time jumps, rejected frames, the worker's time per frame).

The phases alternate (engine, nodes, engine, nodes, ..., engine) so that a machine whose load
changes during the run (other jobs) weighs on both sides alike.

Frames are synthetic (640 x 480, f = 585 px, textured, each one different) or come from a bag
(``--bag``: its image and camera info, restamped on the stream's own timeline and looped).

``--soak MINUTES`` runs the stream that long and samples the node process's resident memory
(every ``--rss-interval`` seconds): growth after the first minute, restarts (time jumps) and
rate and latency per minute are reported.

The goal printed at the end: output rate at least 70 % of what the engine allows (1 / engine frame
time, or the input rate when the camera is slower than that: a node cannot publish more frames
than it receives), latency p95 at most twice the engine frame time. ``--json`` writes everything measured.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

HELP = "Benchmark the nodes under a camera-rate stream (rate, latency, drops, soak) against the engine alone."

#: node name -> the output topic timed for it (relative to the namespace)
OUTPUTS = {"depth_node": ("points", "sensor_msgs.msg", "PointCloud2"),
           "odometry_node": ("odom", "nav_msgs.msg", "Odometry")}
GOAL_RATE = 0.7  # output rate >= 70 % of min(input rate, 1 / engine frame time)
GOAL_LATENCY = 2.0  # latency p95 <= 2 x engine frame time
FIRST_STAMP_S = 1000.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory or hub id (default: the default model, built on "
                                        "first use)")
    source.add_argument("--oracle", action="store_true",
                        help="answer from ground truth (a depth plane): measures the nodes' own cost")
    parser.add_argument("--rate", type=float, default=30.0, help="input frames per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of measured stream")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of stream before measuring")
    parser.add_argument("--cycles", type=int, default=3,
                        help="node phases, each between two engine phases (--duration is split between them)")
    parser.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                        help="soak: stream this many minutes (replaces --duration), sampling the node's memory")
    parser.add_argument("--rss-interval", type=float, default=10.0, metavar="S",
                        help="seconds between memory samples of the node process")
    parser.add_argument("--bag", type=Path, help="frames from this bag (image + camera info) instead of synthetic")
    parser.add_argument("--image-topic", help="image topic of --bag (default: the bag's only image topic)")
    parser.add_argument("--camera-info-topic", help="camera info topic of --bag (default: the bag's only one)")
    parser.add_argument("--frames", type=int, default=30, help="distinct frames in the stream (looped)")
    parser.add_argument("--points", type=int, default=64, help="depth questions per frame (query_count)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per answer at most")
    parser.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--nodes", default="depth_node",
                        help="comma-separated nodes to run: depth_node, odometry_node")
    parser.add_argument("--engine-frames", type=int, default=10, help="frames timed on the engine alone, each side")
    parser.add_argument("--domain-id", type=int, default=None,
                        help="ROS domain of the benchmark's processes (default: a private one from the process id)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=[],
                        help="extra ROS arguments for the nodes' process (must come last), e.g. -p input_depth:=1")


def _say(text: str) -> None:
    print(f"[bench-node] {text}", flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q)) if len(values) else float("nan")


# ------------------------------------------------------------------------------------------------
# Frames
# ------------------------------------------------------------------------------------------------


def synthetic_frames(count: int, width: int = 640, height: int = 480, focal: float = 585.0):
    """``count`` distinct textured frames (the bench frame shifted), their intrinsics and a depth plane."""
    from ..camera import Intrinsics
    from .bench import bench_frame

    base = bench_frame(width + 64, height + 64)
    intrinsics = Intrinsics.from_focal(width, height, focal)
    frames = [np.ascontiguousarray(base[k % 64: k % 64 + height, (3 * k) % 64: (3 * k) % 64 + width])
              for k in range(count)]
    uu, vv = np.meshgrid(np.arange(width), np.arange(height))
    depth = (2.0 + 0.5 * uu / width + 0.3 * vv / height).astype(np.float32)
    return frames, intrinsics, [depth] * count


def bag_frames(path: Path, count: int, image_topic: Optional[str], info_topic: Optional[str]):
    from ..bags import BagError, bag_info, iter_rgbd_frames

    topics = bag_info(path)["topics"]

    def pick(kind: str, given: Optional[str]) -> str:
        if given:
            return given
        found = [t for t, e in topics.items() if e["type"].endswith(kind)]
        if len(found) != 1:
            raise BagError(f"{path} has {len(found)} {kind} topics ({', '.join(found) or 'none'}); "
                           f"name one with --{'image' if kind.endswith('Image') else 'camera-info'}-topic")
        return found[0]

    image = pick("sensor_msgs/msg/Image", image_topic)
    if image_topic is None:  # the depth image is an Image too: prefer a colour topic
        colour = [t for t, e in topics.items() if e["type"].endswith("/Image") and "depth" not in t]
        image = colour[0] if len(colour) == 1 else image
    info = pick("sensor_msgs/msg/CameraInfo", info_topic)
    depth_topics = [t for t, e in topics.items() if e["type"].endswith("/Image") and "depth" in t]
    frames, depths, intrinsics = [], [], None
    for frame in iter_rgbd_frames(path, {"image": image, "camera_info": info,
                                         "depth": depth_topics[0] if depth_topics else None, "pose": None}):
        frames.append(frame.rgb)
        depths.append(frame.depth_m)
        intrinsics = intrinsics or frame.intrinsics
        if len(frames) >= count:
            break
    if not frames:
        raise BagError(f"no paired image + camera info frames in {path}")
    return frames, intrinsics, depths


# ------------------------------------------------------------------------------------------------
# The engine alone
# ------------------------------------------------------------------------------------------------


class EngineTimer:
    """The nodes' depth model (or the oracle) answering a frame's questions in this process."""

    def __init__(self, args: argparse.Namespace, model: Optional[str], intrinsics: Any) -> None:
        from ..engine import load_backend
        from ..pipeline import DepthEstimator
        from ..odometry import select_query_pixels

        if model is None:
            self.backend = load_backend("oracle")
        else:
            self.backend = load_backend("transformers", checkpoint=model, device=args.device, dtype=args.dtype)
        self.estimator = DepthEstimator(self.backend, max_new_tokens=args.max_new_tokens)
        self.intrinsics = intrinsics
        self.points = args.points
        self.select = select_query_pixels

    def time(self, frames: Sequence[np.ndarray], depths: Sequence[Optional[np.ndarray]], count: int) -> Dict[str, Any]:
        """Median seconds per frame: ``engine`` (the backend answering the frame's questions, as the
        depth node's backend_ms_mean counts it) and ``pipeline`` (preparation, questions, answers and
        geometry: all a node does per frame but decoding and publishing)."""
        engine, pipeline, tokens = [], [], []
        for k in range(count + 1):  # the first one warms up
            rgb, depth = frames[k % len(frames)], depths[k % len(depths)]
            uv = self.select(rgb, self.points)
            t0 = time.perf_counter()
            result = self.estimator.estimate(rgb, self.intrinsics, uv, reference_depth=depth)
            t1 = time.perf_counter()
            if k:
                pipeline.append(t1 - t0)
                engine.append(result.response.timings["total"])
                tokens.append(sum(result.response.generated_tokens) / max(len(result.response.answers), 1))
        return {"engine_s": float(np.median(engine)), "pipeline_s": float(np.median(pipeline)),
                "engine_all_s": engine, "tokens_per_answer": float(np.mean(tokens)),
                "questions": len(result.response.answers)}


# ------------------------------------------------------------------------------------------------
# The nodes' process and the stream
# ------------------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (NaN once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class Stream:
    """Publishes the frames at a rate and times the nodes' outputs (in the benchmark's process)."""

    def __init__(self, domain_id: int, nodes: Sequence[str], oracle: bool) -> None:
        import importlib

        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseStamped
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import CameraInfo, Image

        from ..ros.qos import stream_qos

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("vlm3_bench_node_stream", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        qos = stream_qos("reliable", 5)  # camera-sized images between processes need reliable (DESIGN.md)
        self.image_pub = self.node.create_publisher(Image, "/camera/image_raw", qos)
        self.info_pub = self.node.create_publisher(CameraInfo, "/camera/camera_info", stream_qos("reliable", 10))
        self.depth_pub = self.node.create_publisher(Image, "/camera/depth/image_raw", qos) if oracle else None
        self.pose_pub = (self.node.create_publisher(PoseStamped, "/ground_truth/pose", stream_qos("reliable", 10))
                         if oracle and "odometry_node" in nodes else None)
        self.published: Dict[int, float] = {}
        self.received: Dict[str, Dict[int, float]] = {n: {} for n in nodes}
        self.status: Dict[str, Dict[str, str]] = {}
        self.status_level: Dict[str, int] = {}
        self.status_time: Dict[str, float] = {}
        self.status_before: Dict[str, Dict[str, str]] = {}  # each node's report before its last one
        self.last_output: Dict[str, float] = {n: 0.0 for n in nodes}
        for name in nodes:
            topic, module, cls = OUTPUTS[name]
            msg_type = getattr(importlib.import_module(module), cls)
            self.node.create_subscription(msg_type, f"/{topic}", lambda m, n=name: self._output(n, m),
                                          stream_qos("reliable", 50))
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._diagnostics, 50)

    def _output(self, node: str, msg: Any) -> None:
        now = time.monotonic()
        stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
        self.received[node].setdefault(stamp, now)
        self.last_output[node] = now

    def _diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            name = status.name.split("/")[-1]
            if name in self.received:
                self.status_before[name] = self.status.get(name, {})
                self.status[name] = {kv.key: kv.value for kv in status.values}
                self.status_time[name] = time.monotonic()
                level = status.level
                self.status_level[name] = int.from_bytes(level, "little") if isinstance(level, bytes) else int(level)

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            self.executor.spin_once(timeout_sec=min(left, 0.02))

    def wait_idle(self, nodes: Sequence[str], timeout: float) -> bool:
        """Spin until every node's counters have settled after its last frames: an idle worker in a
        report received well after this call and after the node's last output, with the same
        published count as the report before it. A report is made on a timer, so one received just
        after an output can predate that output's publication; two agreeing reports cannot. The
        engine is then timed alone, and the counters read from these reports."""
        start = time.monotonic()

        def settled(node: str) -> bool:
            status, before = self.status.get(node, {}), self.status_before.get(node, {})
            return (self.status_time.get(node, 0.0) > max(start + 0.5, self.last_output[node] + 0.2)
                    and status.get("backend_state") == "ready"
                    and status.get("frames_published") == before.get("frames_published"))

        while time.monotonic() < start + timeout:
            self.spin(0.2)
            if all(settled(n) for n in nodes):
                return True
        return False

    def wait_ready(self, nodes: Sequence[str], node_proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pubs = [self.image_pub, self.info_pub] + ([self.depth_pub] if self.depth_pub else [])
        posed = [self.pose_pub] if self.pose_pub else []
        while time.monotonic() < deadline:
            self.spin(0.2)
            if node_proc.poll() is not None:
                raise RuntimeError(f"the nodes' process ended with status {node_proc.returncode}")
            states = {n: self.status.get(n, {}).get("backend_state") for n in nodes}
            if any(s == "failed" for s in states.values()):
                raise RuntimeError("a backend failed to load: " + "; ".join(
                    f"{n}: {self.status[n].get('last_problem', '')}" for n in nodes))
            if all(s in ("ready", "busy") for s in states.values()) and all(
                    p.get_subscription_count() >= len(nodes) for p in pubs) and all(
                    p.get_subscription_count() >= 1 for p in posed) and all(
                    self.node.count_publishers(f"/{OUTPUTS[n][0]}") for n in nodes):
                self.spin(0.5)  # let the nodes' side of the discovery complete too
                return
        raise RuntimeError(f"the nodes were not ready after {timeout:.0f} s: {self.status}")

    def run(self, messages: Sequence[Dict[str, Any]], rate: float, seconds: float, first: int,
            on_tick: Optional[Any] = None) -> Dict[str, Any]:
        """Publish for ``seconds`` at ``rate`` starting with stamp index ``first``; returns the indices."""
        from ..ros.conversions import stamp_ns

        period = 1.0 / rate
        start = time.monotonic()
        end = start + seconds
        next_t = start
        index = first
        late_publish = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_t:
                msgs = messages[index % len(messages)]
                stamp = FIRST_STAMP_S + index * period
                sec = int(stamp)
                for msg in msgs.values():
                    msg.header.stamp.sec, msg.header.stamp.nanosec = sec, int(round((stamp - sec) * 1e9))
                if self.pose_pub is not None:
                    self.pose_pub.publish(msgs["reference_pose"])
                if self.depth_pub is not None and "reference_depth" in msgs:
                    self.depth_pub.publish(msgs["reference_depth"])
                self.info_pub.publish(msgs["camera_info"])
                self.image_pub.publish(msgs["image"])
                self.published[stamp_ns(msgs["image"].header.stamp)] = time.monotonic()
                index += 1
                next_t += period
                if now - next_t > period:  # the publisher fell behind: do not burst to catch up
                    late_publish += 1
                    next_t = now + period
            if on_tick is not None:
                on_tick(now)
            self.executor.spin_once(timeout_sec=max(0.0, min(next_t - time.monotonic(), 0.1)))
        return {"first": first, "last": index, "start": start, "end": end, "publisher_lag_events": late_publish}

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


def stream_messages(frames: Sequence[np.ndarray], intrinsics: Any, depths: Sequence[Optional[np.ndarray]],
                    oracle: bool, frame_id: str = "camera_optical_frame") -> List[Dict[str, Any]]:
    """The messages of each frame; with ``oracle`` its reference depth and a reference pose too (the
    camera on a 2 cm circle over the frames, so the loop closes)."""
    from builtin_interfaces.msg import Time
    from geometry_msgs.msg import PoseStamped

    from .. import geometry, msg_codec
    from ..ros import conversions as cv

    out = []
    hdr = cv.header(Time(), frame_id)
    info_fields = msg_codec.camera_info_fields(intrinsics)
    for rgb, depth in zip(frames, depths):
        msgs = {"image": cv.image_msg(rgb, "rgb8", cv.header(Time(), frame_id)),
                "camera_info": cv.camera_info_msg(info_fields, cv.header(Time(), frame_id))}
        if oracle:
            if depth is None:
                raise ValueError("--oracle needs depth: the bag has no depth image topic")
            mm = np.where(np.isfinite(depth), np.round(depth * 1000), 0).astype(np.uint16)
            msgs["reference_depth"] = cv.image_msg(mm, "16UC1", cv.header(Time(), hdr.frame_id))
            angle = 2 * np.pi * len(out) / len(frames)
            transform = cv.transform_msg(geometry.make_pose(np.eye(3), [0.01 * np.cos(angle), 0.01 * np.sin(angle), 0]),
                                         Time(), "map", frame_id).transform
            pose = PoseStamped(header=cv.header(Time(), "map"))
            pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = (
                transform.translation.x, transform.translation.y, transform.translation.z)
            pose.pose.orientation = transform.rotation
            msgs["reference_pose"] = pose
        out.append(msgs)
    return out


def window_stats(stream: Stream, nodes: Sequence[str], windows: Sequence[tuple]) -> Dict[str, Any]:
    """Rates and latencies of the frames published in the ``(t0, t1)`` windows (monotonic seconds)."""
    sent = {s: t for s, t in stream.published.items() if any(t0 <= t < t1 for t0, t1 in windows)}
    span = max(sum(t1 - t0 for t0, t1 in windows), 1e-9)
    out: Dict[str, Any] = {"input_hz": len(sent) / span, "frames_in": len(sent)}
    t_first = min(sent.values(), default=0.0)
    for node in nodes:
        got = stream.received[node]
        latencies = [got[s] - sent[s] for s in sent if s in got]
        served = [s for s in sent if s in got]
        # Under a stream faster than the node, the worker is never idle: the time between two outputs
        # is the second frame's processing. Latency over that interval is how much longer than its
        # own processing a frame took (waiting, delivery): 1.0 is ideal, whatever the machine's load.
        ratios = []
        for t0, t1 in windows:
            outputs = sorted((got[s], got[s] - sent[s]) for s in served if t0 <= sent[s] < t1)
            ratios += [lat / (t - prev) for (prev, _), (t, lat) in zip(outputs, outputs[1:]) if t > prev]
        out[node] = {
            "frames": [(round(sent[s] - t_first, 3), round(got[s] - sent[s], 3)) for s in sorted(served)],
            "latency_over_interval_p50": percentile(ratios, 50),
            "latency_over_interval_p95": percentile(ratios, 95),
            "output_hz": len(served) / span,
            "frames_out": len(served),
            "not_served": len(sent) - len(served),
            "latency_p50_s": percentile(latencies, 50),
            "latency_p95_s": percentile(latencies, 95),
            "latency_max_s": max(latencies) if latencies else float("nan"),
        }
    return out


def params_file(path: Path, args: argparse.Namespace, model: Optional[str]) -> Path:
    import yaml

    values = {"backend": "oracle" if model is None else "transformers", "model": model or "",
              "device": args.device, "dtype": args.dtype, "query_count": args.points,
              "max_new_tokens": args.max_new_tokens}
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": values}}, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def _default_model() -> str:
    try:
        from vlm3_train.default_model import ensure_default_model
    except ImportError:
        raise SystemExit("error: no --model given and the training package (which builds the default model) is "
                         "not installed; pass --model CKPT or --oracle") from None
    return str(ensure_default_model())


def _check(args: argparse.Namespace) -> Optional[str]:
    if not (np.isfinite(args.rate) and args.rate > 0):
        return f"--rate must be a positive number of frames per second, got {args.rate}"
    for name in ("duration", "warmup", "rss_interval"):
        value = getattr(args, name)
        if not (np.isfinite(value) and value >= 0) or (name != "warmup" and value == 0):
            return f"--{name.replace('_', '-')} must be a positive number of seconds, got {value}"
    if args.soak is not None and not (np.isfinite(args.soak) and args.soak > 0):
        return f"--soak must be a positive number of minutes, got {args.soak}"
    for name in ("frames", "points", "max_new_tokens", "engine_frames", "cycles"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    unknown = [n for n in nodes if n not in OUTPUTS]
    if unknown or not nodes:
        return f"--nodes: unknown node(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(OUTPUTS)}"
    return None


def run(args: argparse.Namespace) -> int:
    error = _check(args)
    if error:
        print(f"vlm3-ros bench-node: error: {error}", file=sys.stderr)
        return 2
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    model = None if args.oracle else (args.model or _default_model())
    if args.bag:
        frames, intrinsics, depths = bag_frames(args.bag, args.frames, args.image_topic, args.camera_info_topic)
    else:
        frames, intrinsics, depths = synthetic_frames(args.frames)
    duration = args.soak * 60.0 if args.soak else args.duration
    cycles = 1 if args.soak else args.cycles
    _say(f"{'oracle' if model is None else model}: {len(frames)} frames {intrinsics.width}x{intrinsics.height}, "
         f"{args.points} points, {args.rate:g} Hz, nodes {', '.join(nodes)}, {duration:g} s measured in {cycles} "
         f"phase(s)")
    timer = EngineTimer(args, model, intrinsics)
    engine = [timer.time(frames, depths, args.engine_frames)]
    _say(f"engine alone: {engine[0]['engine_s']:.3f} s per frame ({engine[0]['questions']} questions, "
         f"{engine[0]['tokens_per_answer']:.1f} tokens per answer), whole pipeline {engine[0]['pipeline_s']:.3f} s")

    from ..ros.dds import child_environment, stop_child, use_large_shared_memory

    use_large_shared_memory()  # as the nodes and vlm3-ros play do (the nodes' process inherits it)
    domain_id = args.domain_id if args.domain_id is not None else 1 + (os.getpid() * 7 + 3) % 100
    workdir = Path(tempfile.mkdtemp(prefix="vlm3-bench-node-"))
    log_path = workdir / "nodes.log"
    ros_args = list(args.ros_args or [])
    if ros_args and ros_args[0] == "--ros-args":
        ros_args = ros_args[1:]
    command = [sys.executable, "-m", "vlm3_ros.cli.main", "perception", "--nodes", ",".join(nodes),
               "--params-file", str(params_file(workdir / "params.yaml", args, model)),
               "--ros-args", *ros_args]
    stream = Stream(domain_id, nodes, oracle=model is None)
    messages = stream_messages(frames, intrinsics, depths, oracle=model is None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=child_environment(domain_id), stdout=log, stderr=subprocess.STDOUT)
    samples: List[tuple] = []
    phases: List[Dict[str, Any]] = []
    try:
        stream.wait_ready(nodes, proc, timeout=300.0)
        index = stream.run(messages, args.rate, args.warmup, 0)["last"]
        t_start = time.monotonic()
        samples.append((0.0, rss_mb(proc.pid)))
        next_sample = [t_start + args.rss_interval]

        def tick(now: float) -> None:
            if now >= next_sample[0]:
                samples.append((now - t_start, rss_mb(proc.pid)))
                next_sample[0] = now + args.rss_interval

        for cycle in range(cycles):
            phase = stream.run(messages, args.rate, duration / cycles, index, on_tick=tick)
            phases.append(phase)
            index = phase["last"]
            samples.append((time.monotonic() - t_start, rss_mb(proc.pid)))
            stream.wait_idle(nodes, timeout=300.0)  # the last frames served before the engine is timed alone
            if proc.poll() is not None:
                raise RuntimeError(f"the nodes' process ended with status {proc.returncode}")
            engine.append(timer.time(frames, depths, args.engine_frames))
            _say(f"phase {cycle + 1}/{cycles} done; engine alone: {engine[-1]['engine_s']:.3f} s per frame")
        statuses = {n: dict(stream.status.get(n, {})) for n in nodes}
    except RuntimeError as exc:
        print(f"vlm3-ros bench-node: error: {exc}; log: {log_path}", file=sys.stderr)
        return 1
    finally:
        stream.close()
        stop_child(proc, 60)
    if proc.returncode != 0:
        print(f"vlm3-ros bench-node: error: the nodes' process ended with {proc.returncode}; log: {log_path}",
              file=sys.stderr)
        return 1

    windows = [(p["start"], p["end"]) for p in phases]
    whole = window_stats(stream, nodes, windows)
    per_phase = [window_stats(stream, nodes, [w]) for w in windows]
    minutes = []
    if args.soak:
        start, end = windows[0]
        for m in range(int(np.ceil((end - start) / 60.0))):
            t0 = start + 60.0 * m
            stats = window_stats(stream, nodes, [(t0, min(t0 + 60.0, end))])
            for node in nodes:
                stats[node].pop("frames")  # kept once, in the whole run's numbers
            minutes.append({"minute": m + 1, **stats})
    report = _report(args, nodes, model, engine, whole, per_phase, statuses, samples, minutes, phases)
    _print_report(report)
    if args.json:
        from ..paths import write_json_atomic

        write_json_atomic(args.json, report)
        _say(f"wrote {args.json}")
    _say(f"nodes' log: {log_path}")
    return 0


def _report(args, nodes, model, engine, whole, per_phase, statuses, samples, minutes, phases) -> Dict[str, Any]:
    import torch

    keys = ("frames_published", "dropped_busy", "late", "unpaired", "time_jumps", "frames_rejected",
            "parse_failures", "no_reference", "backend_state", "latency_mean_ms", "wait_ms_mean", "process_ms_mean",
            "backend_ms_mean")
    engine_all = [t for e in engine for t in e["engine_all_s"]]
    engine_s = float(np.median(engine_all))
    report: Dict[str, Any] = {
        "conditions": {
            "model": model or "oracle", "device": args.device, "dtype": args.dtype, "points": args.points,
            "max_new_tokens": args.max_new_tokens, "rate_hz": args.rate,
            "duration_s": sum(p["end"] - p["start"] for p in phases), "phases": len(phases), "frames": args.frames,
            "source": str(args.bag) if args.bag else "synthetic 640x480", "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()), "torch_threads": torch.get_num_threads(),
            "publisher_lag_events": sum(p["publisher_lag_events"] for p in phases),
        },
        "engine": {"frame_s": engine_s, "phases_s": [e["engine_s"] for e in engine],
                   "pipeline_s": float(np.median([e["pipeline_s"] for e in engine])),
                   "questions": engine[0]["questions"], "tokens_per_answer": engine[0]["tokens_per_answer"]},
        "input_hz": whole["input_hz"],
        "nodes": {},
        "phases": [],
    }
    # A node cannot publish more frames than it receives: the engine allows min(input, 1 / engine).
    achievable_hz = min(whole["input_hz"], 1.0 / engine_s)
    for node in nodes:
        w = whole[node]
        status = statuses.get(node, {})
        report["nodes"][node] = {
            **w,
            "rate_vs_engine": w["output_hz"] * engine_s,
            "achievable_hz": achievable_hz,
            "rate_vs_achievable": w["output_hz"] / achievable_hz,
            "p95_vs_engine": w["latency_p95_s"] / engine_s,
            "goal_rate": bool(w["output_hz"] >= GOAL_RATE * achievable_hz),
            "goal_latency": bool(w["latency_p95_s"] <= GOAL_LATENCY * engine_s),
            "diagnostics": {k: status[k] for k in keys if k in status},
        }
    for k, stats in enumerate(per_phase):
        adjacent = float(np.mean([engine[k]["engine_s"], engine[k + 1]["engine_s"]]))
        report["phases"].append({"engine_s": adjacent, "input_hz": stats["input_hz"],
                                 **{n: {"output_hz": stats[n]["output_hz"], "latency_p95_s": stats[n]["latency_p95_s"],
                                        "rate_vs_engine": stats[n]["output_hz"] * adjacent,
                                        "p95_vs_engine": stats[n]["latency_p95_s"] / adjacent} for n in nodes}})
    if samples:
        report["rss_mb"] = [(round(t, 1), round(v, 1)) for t, v in samples]
        after_first = [v for t, v in samples if t >= 60.0]
        if after_first:
            base = after_first[0]
            report["rss_growth_after_first_minute"] = (max(after_first) - base) / base
    if minutes:
        report["minutes"] = minutes
    return report


def _print_report(report: Dict[str, Any]) -> None:
    c, e = report["conditions"], report["engine"]
    print(f"conditions: {c['cpus']} CPUs, load average {', '.join(f'{v:.1f}' for v in c['load_average'])}, "
          f"torch threads {c['torch_threads']}, {c['source']}, {c['points']} points, {c['rate_hz']:g} Hz, "
          f"{c['duration_s']:.0f} s in {c['phases']} phase(s)")
    print(f"engine frame time: {e['frame_s']:.3f} s (median; per engine phase "
          f"{', '.join(f'{v:.3f}' for v in e['phases_s'])}); whole pipeline {e['pipeline_s']:.3f} s; "
          f"1 / engine = {1 / e['frame_s']:.2f} Hz")
    print(f"input: {report['input_hz']:.2f} Hz")
    for node, r in report["nodes"].items():
        d = r["diagnostics"]
        print(f"{node}: output {r['output_hz']:.2f} Hz = {100 * r['rate_vs_engine']:.0f} % of 1/engine, "
              f"{100 * r['rate_vs_achievable']:.0f} % of min(input, 1/engine) = {r['achievable_hz']:.2f} Hz (goal >= "
              f"{100 * GOAL_RATE:.0f} %: {'met' if r['goal_rate'] else 'NOT met'}); latency p50 "
              f"{r['latency_p50_s']:.3f} s, p95 {r['latency_p95_s']:.3f} s = {r['p95_vs_engine']:.2f}x engine (goal <= "
              f"{GOAL_LATENCY:g}x: {'met' if r['goal_latency'] else 'NOT met'}), max {r['latency_max_s']:.3f} s; "
              f"{r['frames_out']} frames served, {r['not_served']} not served; latency over the interval between "
              f"outputs p50 {r['latency_over_interval_p50']:.2f}, p95 {r['latency_over_interval_p95']:.2f}")
        print("    diagnostics: " + ", ".join(f"{k}={v}" for k, v in d.items()))
    for k, phase in enumerate(report["phases"]):
        print(f"  phase {k + 1}: engine {phase['engine_s']:.3f} s, " + ", ".join(
            f"{n} {phase[n]['output_hz']:.2f} Hz ({100 * phase[n]['rate_vs_engine']:.0f} %), p95 "
            f"{phase[n]['latency_p95_s']:.3f} s ({phase[n]['p95_vs_engine']:.2f}x)" for n in report["nodes"]))
    if "rss_mb" in report:
        print("node process RSS (s: MiB): " + " ".join(f"{t:g}:{v:.0f}" for t, v in report["rss_mb"]))
        if "rss_growth_after_first_minute" in report:
            print(f"RSS growth after the first minute: {100 * report['rss_growth_after_first_minute']:.1f} %")
    for m in report.get("minutes", []):
        parts = [f"minute {m['minute']}: in {m['input_hz']:.1f} Hz"]
        for node in report["nodes"]:
            r = m[node]
            parts.append(f"{node} out {r['output_hz']:.2f} Hz p95 {r['latency_p95_s']:.3f} s")
        print("  " + ", ".join(parts))
