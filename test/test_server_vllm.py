"""The server backend against a real vLLM server (``vlm3-ros serve``) on the default model.

Skipped where the vLLM environment does not exist (``make vllm-env``; CI creates it). The server
is started once for the session (float32, 127.0.0.1, a free port) and the last test stops and
restarts it under running nodes. Every check compares with the in-process engine on the same
checkpoint: a server answers exactly what the engine answers, text for text.

The default model's task specs are read from its protocol file, never written here, so the tests
follow the checkpoint when its tasks or prompts change.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("httpx")

from ros_perception_helpers import perception_nodes  # noqa: E402,F401  (a fixture)
from server_helpers import scene_frames, vllm_python_or_skip  # noqa: E402
from vlm3_ros import protocol  # noqa: E402
from vlm3_ros.engine import Request  # noqa: E402
from vlm3_ros.engine.server_backend import ServerBackend, ServerError  # noqa: E402
from vlm3_ros.pipeline import DepthEstimator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _needs_vllm():
    vllm_python_or_skip()


def _grid(width: int, height: int, side: int = 8) -> np.ndarray:
    """side x side distinct pixels over the image (64 by default)."""
    xs, ys = np.linspace(0.04 * width, 0.96 * width, side), np.linspace(0.04 * height, 0.96 * height, side)
    return np.stack(np.meshgrid(np.round(xs), np.round(ys)), axis=-1).reshape(-1, 2)


def _depth_request(engine, rgb, intrinsics, max_new_tokens: int = 48) -> Request:
    estimator = DepthEstimator(engine)
    prepared = estimator.prepare(rgb, intrinsics)
    questions = estimator.questions(prepared, _grid(rgb.shape[1], rgb.shape[0]))[0]
    return Request(images=[prepared.image], questions=questions, spec=estimator.spec, max_new_tokens=max_new_tokens)


def test_server_answers_a_64_question_frame_exactly_as_the_engine(vllm_server, default_engine, default_checkpoint):
    server = ServerBackend(vllm_server.url)
    # The task specs come from the served checkpoint's own protocol file.
    assert server.specs == default_engine.specs == protocol.load_protocol(default_checkpoint)
    assert server.specs_source.endswith(protocol.PROTOCOL_FILENAME)
    rgb, intrinsics, _ = scene_frames(1)[0]
    request = _depth_request(default_engine, rgb, intrinsics)
    assert len(request.questions) == len(set(request.questions)) == 64
    engine = default_engine.answer(request)
    served = server.answer(request)
    assert served.answers == engine.answers
    assert served.finish_reasons == engine.finish_reasons
    assert served.generated_tokens == engine.generated_tokens
    # Not vacuous: the answers are complete and parse.
    values = [protocol.parse_depth_answer(a) for a in served.answers]
    assert all(v > 0 for v in values)
    health = server.health()
    assert health["backend_connection"] == "connected" and health["backend_failures"] == 0


def test_frames_sent_together_by_two_robots_get_their_own_images_answers(vllm_server, default_engine):
    """The same 64 questions about different images, all in flight together (twice, so the second
    round meets a warm prefix cache): no answer may come from another image's cached prefix."""
    frames = scene_frames(6)
    requests = [_depth_request(default_engine, rgb, intrinsics) for rgb, intrinsics, _ in frames]
    assert all(r.questions == requests[0].questions for r in requests)  # only the image differs
    expected = [default_engine.answer(r).answers for r in requests]
    # Keep frames whose answers differ from every other kept frame's on many questions, so that a
    # cross-image answer would show.
    kept: list = []
    for k, answers in enumerate(expected):
        if all(np.mean([a != b for a, b in zip(answers, expected[j])]) >= 0.25 for j in kept):
            kept.append(k)
    assert len(kept) >= 3, "the default model answers these scenes too alike to detect mixed-up images"
    robots = [ServerBackend(vllm_server.url), ServerBackend(vllm_server.url)]
    jobs = [(robots[n % 2], k) for n, k in enumerate(kept * 2)]
    results: dict = {}
    errors: list = []

    def ask(index: int, backend: ServerBackend, k: int) -> None:
        try:
            results[index] = backend.answer(requests[k]).answers
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i, backend, k)) for i, (backend, k) in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    for index, (_, k) in enumerate(jobs):
        assert results[index] == expected[k], f"frame {k} (request {index}) got other answers"


def test_real_server_faults_have_their_kinds(vllm_server, default_engine, default_checkpoint):
    rgb, intrinsics, _ = scene_frames(1)[0]
    request = _depth_request(default_engine, rgb, intrinsics)
    # A model the server does not serve: HTTP 404 from vLLM, not retried.
    wrong = ServerBackend(vllm_server.url, model="no-such-model", protocol_source=default_checkpoint)
    with pytest.raises(ServerError) as info:
        wrong.answer(request)
    assert info.value.kind == "backend_rejected" and info.value.status == 404
    # A request timeout far below what 64 answers take on this machine.
    served_name = ServerBackend(vllm_server.url)._served_model()
    hurried = ServerBackend(vllm_server.url, model=served_name, protocol_source=default_checkpoint, timeout=0.02,
                            retries=0)
    with pytest.raises(ServerError) as info:
        hurried.answer(request)
    assert info.value.kind == "backend_timeout"
    assert hurried.health()["backend_connection"] == "backend_timeout"


def test_query_and_eval_commands_answer_through_the_server_as_in_process(vllm_server, default_checkpoint, tmp_path):
    import cv2

    from vlm3_ros.cli.main import main as vlm3_ros
    from vlm3_train.cli import main as vlm3_train
    from vlm3_train.convert import ConvertOptions, convert_frames
    from vlm3_train.synthetic import generate_sequence

    rgb, intrinsics, _ = scene_frames(1)[0]
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), rgb[:, :, ::-1])
    camera = ["--intrinsics", *(str(v) for v in (intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy))]
    common = ["query", str(image), *camera, "--grid", "16"]
    assert vlm3_ros([*common, "--server", vllm_server.url, "--json", str(tmp_path / "server.json")]) == 0
    assert vlm3_ros([*common, "--model", str(default_checkpoint), "--device", "cpu", "--dtype", "float32",
                     "--json", str(tmp_path / "engine.json")]) == 0
    served, engine = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("server", "engine"))
    assert served["rows"] == engine["rows"] and served["summary"] == engine["summary"]
    assert served["backend"]["backend"] == "server" and served["summary"]["valid"] > 0

    specs = protocol.load_protocol(default_checkpoint)
    tasks = tuple(t for t in specs if t in ("depth", "correspondence", "pose"))
    data = convert_frames({"held-out": generate_sequence(seed=7300, frames=4, supersample=1).rgbd_frames()},
                          tmp_path / "data", ConvertOptions(tasks=tasks, specs=specs, points_per_image=8, split="none"),
                          overwrite=True, progress=False).path
    common = ["eval", str(data), "--quiet", "--no-plots"]
    assert vlm3_train([*common, "--server", vllm_server.url, "--output", str(tmp_path / "eval-server")]) == 0
    assert vlm3_train([*common, "--checkpoint", str(default_checkpoint), "--device", "cpu", "--dtype", "float32",
                       "--output", str(tmp_path / "eval-engine")]) == 0
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("eval-server", "eval-engine")]
    for task in tasks:
        if task in reports[1]:
            assert reports[0][task] == reports[1][task], task
    assert reports[0]["samples"] == reports[1]["samples"] and sum(reports[0]["samples"].values()) > 0


# ------------------------------------------------------------------------------------------------
# Nodes
# ------------------------------------------------------------------------------------------------


def test_two_depth_nodes_in_two_namespaces_share_one_server(ros, perception_nodes, vllm_server, default_engine):
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import PointCloud2

    from ros_perception_helpers import Collector, FramePublisher
    from vlm3_ros import msg_codec
    from vlm3_ros.odometry import select_query_pixels
    from vlm3_ros.ros import backends
    from vlm3_ros.ros.depth_node import DepthNode

    backends.clear_cache()
    params = [Parameter("backend", value="server"), Parameter("server.url", value=vllm_server.url),
              Parameter("query_count", value=32)]
    nodes = [perception_nodes(DepthNode(context=ros.context, namespace=ns, parameter_overrides=params))
             for ns in ("robot1", "robot2")]
    assert ros.spin_until(lambda: all(n.worker.state == "ready" for n in nodes), 60)
    assert nodes[0].backend is nodes[1].backend  # one client, its requests side by side
    client = ros.node("cameras")
    cams = [FramePublisher(client, {"image": f"/{ns}/image", "camera_info": f"/{ns}/camera_info"})
            for ns in ("robot1", "robot2")]
    clouds = [Collector(client, PointCloud2, f"/{ns}/points") for ns in ("robot1", "robot2")]
    assert all(cam.wait_matched(ros) for cam in cams)
    frames = scene_frames(2, seed=7400)
    for k, ((rgb, intrinsics, _), cam) in enumerate(zip(frames, cams)):
        cam.publish(FramePublisher.messages(30.0 + k, rgb, intrinsics))
    assert ros.spin_until(lambda: all(len(c) for c in clouds), 120)
    for (rgb, intrinsics, _), cloud in zip(frames, clouds):
        expected = DepthEstimator(default_engine).estimate(rgb, intrinsics, select_query_pixels(rgb, 32, 0.05, "grid"))
        table = msg_codec.read_cloud(cloud.messages[0])
        got = np.column_stack([table["x"], table["y"], table["z"]])
        np.testing.assert_allclose(got, expected.points[expected.valid].astype(np.float32), rtol=1e-6)
        assert len(got) > 16
    assert nodes[0].diagnostic_values()["backend_connection"] == "connected"
    backends.clear_cache()


def _perception(domain_id, url, namespace, extra=()):
    from ros_helpers import ros_subprocess_env

    env = ros_subprocess_env(domain_id)
    return subprocess.Popen(
        [sys.executable, "-m", "vlm3_ros.cli.main", "perception", "--params-file", str(REPO / "config" / "perception.yaml"),
         "--backend", "server", "--server-url", url, "--namespace", namespace, "--image", "/cam/image",
         "--camera-info", "/cam/camera_info", *extra],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop_process(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def test_perception_survives_the_server_stopping_and_reconnects_when_it_returns(ros, ros_domain_id, vllm_server):
    """``vlm3-ros perception --backend server`` as two robots: one running when the server stops
    (mid-run), one started while it is down; both count the lost frames as backend_unreachable,
    say so on /diagnostics, and serve again by themselves once the server is back."""
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import PointCloud2

    from ros_perception_helpers import Collector, FramePublisher, diagnostic_values

    specs = ServerBackend(vllm_server.url).specs
    # Odometry from the server where the served model answers what a mode needs (the default
    # model's tasks decide; the depth node is always run).
    mode = "pose" if "pose" in specs else "correspondence" if {"correspondence", "depth"} <= set(specs) else None
    nodes = "depth_node,odometry_node" if mode else "depth_node"
    extra = ["--nodes", nodes, "--ros-args", "-p", "query_count:=16", "-p", "server.retries:=0",
             "-p", "server.timeout:=30.0"] + (["-p", f"mode:={mode}"] if mode else [])
    client = ros.node("camera")
    cam = FramePublisher(client, {"image": "/cam/image", "camera_info": "/cam/camera_info"})
    out = {ns: {"points": Collector(client, PointCloud2, f"/{ns}/points"),
                "odom": Collector(client, Odometry, f"/{ns}/odom")} for ns in ("r1", "r2")}
    diagnostics = Collector(client, DiagnosticArray, "/diagnostics")
    frames = scene_frames(3, seed=7500)
    clock = {"t": 100.0, "next": 0.0}

    def pump(predicate, timeout):
        """Publish a frame a second (new stamps) while waiting for ``predicate``."""
        def step():
            if time.monotonic() >= clock["next"]:
                rgb, intrinsics, _ = frames[int(clock["t"]) % len(frames)]
                cam.publish(FramePublisher.messages(clock["t"], rgb, intrinsics))
                clock["t"] += 1.0
                clock["next"] = time.monotonic() + 1.0
            return predicate()
        return ros.spin_until(step, timeout)

    def diag(ns, node="depth_node"):
        return diagnostic_values(diagnostics, f"/{ns}/{node}") or {}

    procs = {"r1": _perception(ros_domain_id, vllm_server.url, "r1", extra)}
    try:
        assert pump(lambda: len(out["r1"]["points"]) >= 2, 120), _stop_process(procs["r1"])[1][-3000:]
        if mode:
            assert pump(lambda: len(out["r1"]["odom"]) >= 1, 60)
        # The server stops (SIGTERM to vlm3-ros serve: it stops vLLM and exits cleanly).
        assert vllm_server.stop() == 0
        with pytest.raises(ServerError):
            ServerBackend(vllm_server.url, retries=0).specs  # nothing listens any more
        procs["r2"] = _perception(ros_domain_id, vllm_server.url, "r2", extra)  # down at start
        for ns in ("r1", "r2"):
            assert pump(lambda: int(diag(ns).get("rejected.backend_unreachable", 0)) >= 2, 120), (ns, diag(ns))
            values = diag(ns)
            assert values["backend_connection"] == "backend_unreachable", values
            assert values["_level"] == 1 and "backend_unreachable" in values["_message"]  # WARN
            assert values["backend_state"] != "failed" and procs[ns].poll() is None
        published = {ns: len(out[ns]["points"]) for ns in ("r1", "r2")}
        # The server comes back: both robots serve again without being touched.
        vllm_server.start()
        for ns in ("r1", "r2"):
            assert pump(lambda: len(out[ns]["points"]) >= published[ns] + 2, 180), (ns, diag(ns))
            assert pump(lambda: diag(ns).get("backend_connection") == "connected", 30), diag(ns)
        assert int(diag("r1")["backend_reconnects"]) >= 1
        if mode:
            assert pump(lambda: len(out["r2"]["odom"]) >= 1, 60)
            assert int(diag("r1", "odometry_node").get("rejected.backend_unreachable", 0)) >= 1
        cloud = out["r2"]["points"].messages[-1]
        assert cloud.width > 0 and cloud.header.frame_id
    finally:
        results = {ns: _stop_process(proc) for ns, proc in procs.items()}
        if not vllm_server.running():
            vllm_server.start()
    for ns, (code, text) in results.items():
        assert code == 0, (ns, text[-3000:])
