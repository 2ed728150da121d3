"""``vlm3-ros bench --server URL``: the server backend measured in the same run as the engine.

Two measurements, both beside the in-process engine on the same machine in the same run:

* per point count N (:func:`server_row`): the frame's N questions sent to the server all at once
  (what the server backend does) and one after another (a naive client), points/s, and whether
  the concurrent answers equal the engine's, text for text;
* a fleet (:func:`fleet`): R depth nodes in their own namespaces (``/robot1`` ... ``/robotR``)
  in one process, each fed its next frame as soon as its previous cloud arrived, for a fixed
  time: one robot and R robots on the server (one client, requests side by side), one robot and
  R robots on one in-process engine (calls serialised), in clouds/s and points/s. Every frame
  sent is a new image (a counter written into its first pixels), so no frame is ever found in the
  server's prefix cache. The configurations take turns for several rounds, so that a change in
  the machine's load touches all of them; the median round is reported.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, Dict, List

import numpy as np


def server_row(server: Any, sequential: Any, request: Any, engine_answers: List[str], sequential_request: Any) -> Dict[str, Any]:
    """Concurrent and sequential points/s of ``server`` on ``request`` (sequential on another frame,
    so that neither run finds the other's image in the prefix cache)."""
    n = len(request.questions)
    t0 = time.perf_counter()
    response = server.answer(request)
    concurrent_s = time.perf_counter() - t0
    row: Dict[str, Any] = {"server_points_per_s": n / concurrent_s, "server_latency_s": concurrent_s,
                           "server_identical_to_engine": response.answers == engine_answers}
    if sequential_request is not None:
        t0 = time.perf_counter()
        sequential.answer(sequential_request)
        row["server_sequential_points_per_s"] = n / (time.perf_counter() - t0)
    return row


def print_server_row(row: Dict[str, Any]) -> None:
    if "server_points_per_s" not in row:
        return
    sequential = row.get("server_sequential_points_per_s")
    print(f"        server: {row['server_points_per_s']:8.2f} pts/s all questions at once "
          f"(latency {row['server_latency_s']:.2f}s, {row['server_points_per_s'] / row['engine_points_per_s']:.2f}x the "
          f"engine), " + (f"{sequential:.2f} pts/s one at a time, " if sequential else "")
          + f"identical to the engine={row['server_identical_to_engine']}", flush=True)


def _domain_id() -> int:
    return int(os.environ.get("ROS_DOMAIN_ID") or 1 + os.getpid() % 100)


def fleet(url: str, engine: Any, frames: List[np.ndarray], camera: Any, *, robots: int, points: int,
          seconds: float, max_new_tokens: int, rounds: int = 3) -> List[Dict[str, Any]]:
    """Clouds/s and points/s of depth nodes fed as fast as they answer (see the module docstring)."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    configurations = [("server", 1), ("server", robots), ("engine", 1), ("engine", robots)]
    runs: Dict[tuple, List[Dict[str, Any]]] = {c: [] for c in configurations}
    for _ in range(rounds):
        for backend, count in configurations:
            runs[(backend, count)].append(_run_fleet(url, engine if backend == "engine" else None, frames, camera,
                                                     count, points, seconds, max_new_tokens))
    results = []
    for (backend, count), rows in runs.items():
        row = dict(sorted(rows, key=lambda r: r["points_per_s"])[len(rows) // 2])
        row["configuration"] = f"{'server' if backend == 'server' else 'in-process engine'}, {count} robot(s)"
        row["rounds_points_per_s"] = [r["points_per_s"] for r in rows]
        results.append(row)
        print(f"fleet: {row['configuration']:32s} {row['clouds_per_s']:6.2f} clouds/s, {row['points_per_s']:8.1f} "
              f"points/s (per robot: {', '.join(f'{c:.2f}' for c in row['clouds_per_s_per_robot'])} clouds/s; "
              f"frame latency {row['latency_s']:.2f}s; rounds: "
              f"{', '.join(f'{v:.0f}' for v in row['rounds_points_per_s'])} points/s)", flush=True)
    return results


def _run_fleet(url: str, engine: Any, frames: List[np.ndarray], camera: Any, robots: int, points: int,
               seconds: float, max_new_tokens: int) -> Dict[str, Any]:
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.time import Time
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2

    from .. import msg_codec
    from ..ros import backends
    from ..ros import conversions as cv
    from ..ros.depth_node import DepthNode
    from ..ros.qos import stream_qos

    context = Context()
    rclpy.init(context=context, domain_id=_domain_id())
    executor = MultiThreadedExecutor(context=context)
    backends.clear_cache()
    params = [Parameter("query_count", value=points), Parameter("max_new_tokens", value=max_new_tokens)]
    if engine is None:
        params += [Parameter("backend", value="server"), Parameter("server.url", value=url)]
    else:  # one model for every robot: calls serialised, as vlm3-ros perception shares a checkpoint
        params += [Parameter("model", value=str(engine.checkpoint.path))]
        engine = backends.SharedBackend(engine)
    names = [f"robot{k + 1}" for k in range(robots)]
    nodes = [DepthNode(context=context, namespace=name, backend=engine, parameter_overrides=params) for name in names]
    client = rclpy.create_node("fleet_cameras", context=context)
    qos = stream_qos("reliable", 5)
    info_fields = msg_codec.camera_info_fields(camera)
    state = {name: {"sent": 0, "clouds": 0, "points": 0, "latency": [], "pending": None} for name in names}
    publishers = {}

    def send(name: str) -> None:
        s = state[name]
        k = s["sent"]
        header = cv.header(Time(nanoseconds=(1000 + k) * 10**9).to_msg(), "camera_optical_frame")
        publishers[name][1].publish(cv.camera_info_msg(info_fields, header))
        image = frames[(k + names.index(name)) % len(frames)].copy()
        image[0, :8, 0] = np.frombuffer(np.int64(next(counter)).tobytes(), np.uint8)  # a new image every time
        publishers[name][0].publish(cv.image_msg(image, "rgb8", header))
        s["sent"] += 1
        s["pending"] = time.perf_counter()

    def received(name: str, msg: Any) -> None:
        s = state[name]
        if s["pending"] is not None and measuring["on"]:
            s["clouds"] += 1
            s["points"] += int(msg.width)
            s["latency"].append(time.perf_counter() - s["pending"])
        send(name)

    measuring = {"on": False}
    counter = itertools.count(int(time.time() * 1000))
    for name in names:
        publishers[name] = (client.create_publisher(Image, f"/{name}/image", qos),
                            client.create_publisher(CameraInfo, f"/{name}/camera_info", qos))
        client.create_subscription(PointCloud2, f"/{name}/points", lambda m, n=name: received(n, m), qos)
    for node in nodes + [client]:
        executor.add_node(node)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(
                n.worker.state == "ready" and publishers[n.get_namespace().strip("/")][0].get_subscription_count()
                for n in nodes):
            executor.spin_once(timeout_sec=0.05)
        for name in names:  # warm up: one frame each, not counted
            send(name)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(s["sent"] < 2 for s in state.values()):
            executor.spin_once(timeout_sec=0.05)
        measuring["on"] = True
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            executor.spin_once(timeout_sec=0.05)
            for name, s in state.items():  # a frame that brought no cloud (rejected): send the next
                if s["pending"] is not None and time.perf_counter() - s["pending"] > 60:
                    send(name)
        elapsed = time.monotonic() - t0
        measuring["on"] = False
    finally:
        for node in nodes + [client]:
            executor.remove_node(node)
            node.destroy_node()
        executor.shutdown()
        context.try_shutdown()
        backends.clear_cache()
    per_robot = [state[n]["clouds"] / elapsed for n in names]
    latencies = [v for n in names for v in state[n]["latency"]]
    return {"robots": robots, "seconds": elapsed, "clouds_per_s": sum(per_robot), "clouds_per_s_per_robot": per_robot,
            "points_per_s": sum(state[n]["points"] for n in names) / elapsed,
            "latency_s": float(np.mean(latencies)) if latencies else float("nan")}
