"""The server backend's client against a stand-in OpenAI-compatible server (always runs).

A real vLLM server cannot be made to answer HTTP 500, malformed JSON or to stall on demand, so
these tests talk to a small real HTTP server on 127.0.0.1 (started here, in a thread) that speaks
the chat completions format and misbehaves as told. It records every request, so the tests also
check what the client sends: one request per question, greedy, the task's stop strings and token
limit, the prepared image as a lossless PNG, the API key only in the Authorization header. The
same client against a real vLLM server is tested in test_server_vllm.py.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List

import cv2
import numpy as np
import pytest

pytest.importorskip("httpx")

from ros_perception_helpers import perception_nodes  # noqa: E402,F401  (a fixture)
from vlm3_ros import protocol  # noqa: E402
from vlm3_ros.engine import EngineError, Request, load_backend  # noqa: E402
from vlm3_ros.engine.server_backend import ServerBackend, ServerError, png_data_url  # noqa: E402
from vlm3_ros.engine.serving import free_port  # noqa: E402
from vlm3_ros.pipeline import DepthEstimator  # noqa: E402
from vlm3_ros.camera import Intrinsics  # noqa: E402


class StandIn:
    """A threaded HTTP server answering /v1/models and /v1/chat/completions.

    ``mode``: ``ok`` (answers ``<answer> D </answer>`` with D from the question's coordinates,
    the stop string left out of the text as vLLM does, and named in ``stop_reason``), ``status:N``,
    ``malformed``, ``sleep:S`` (answers after S seconds), ``unauthorized:KEY`` (401 unless the
    bearer token is KEY). ``fail_first``: that many chat requests get HTTP 503 first.
    ``reject``: a question holding this text gets HTTP 400 at once, whatever the mode.
    """

    def __init__(self, models: List[Dict[str, Any]] | None = None) -> None:
        self.models = models if models is not None else [{"id": "served-model", "root": "/nonexistent"}]
        self.mode = "ok"
        self.fail_first = 0
        self.reject: str | None = None
        self.requests: List[Dict[str, Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": outer.models}).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                    failing = outer.fail_first > 0
                    outer.fail_first -= int(failing)
                mode = outer.mode
                text = body["messages"][0]["content"][-1]["text"]
                if failing:
                    self._send(503, b'{"error": {"message": "warming up"}}')
                elif outer.reject is not None and outer.reject in text:
                    self._send(400, b'{"error": {"message": "told to reject this question"}}')
                elif mode.startswith("status:"):
                    self._send(int(mode.split(":")[1]), b'{"error": {"message": "told to fail"}}')
                elif mode == "malformed":
                    self._send(200, b'{"choices": [')
                elif mode.startswith("unauthorized:") and self.headers.get("Authorization") != "Bearer " + mode.split(":", 1)[1]:
                    self._send(401, b'{"error": {"message": "invalid API key"}}')
                else:
                    if mode.startswith("sleep:"):
                        with outer.lock:
                            outer.in_flight += 1
                            outer.most_in_flight = max(outer.most_in_flight, outer.in_flight)
                        time.sleep(float(mode.split(":")[1]))
                        with outer.lock:
                            outer.in_flight -= 1
                    question = body["messages"][0]["content"][-1]["text"]
                    numbers = [int(v) for v in "".join(c if c.isdigit() else " " for c in question).split()[:2]]
                    text = f"<answer> {1 + sum(numbers) / 100:.2f} "
                    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop", "stop_reason": "</answer>"}],
                             "usage": {"prompt_tokens": 80, "completion_tokens": 6}}
                    self._send(200, json.dumps(reply).encode())

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def standin():
    server = StandIn()
    yield server
    server.close()


def _frame(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


def _request(n: int = 4, spec: protocol.TaskSpec = protocol.DEPTH, max_new_tokens: int = 20) -> Request:
    questions = [spec.question(nx=100 * k, ny=50 * k) for k in range(n)]
    return Request(images=[_frame()], questions=questions, spec=spec, max_new_tokens=max_new_tokens)


def test_each_question_is_one_greedy_request_with_the_prepared_image_and_the_task_stop_strings(standin):
    backend = ServerBackend(standin.url, concurrency=4)
    request = _request(6, max_new_tokens=17)
    response = backend.answer(request)
    assert len(standin.requests) == 6
    bodies = [r["body"] for r in standin.requests]
    assert {b["model"] for b in bodies} == {"served-model"}  # the server's only model
    assert all(b["temperature"] == 0 and b["max_tokens"] == 17 and b["stop"] == ["</answer>"] for b in bodies)
    assert sorted(b["messages"][0]["content"][1]["text"] for b in bodies) == sorted(request.questions)
    # The image arrives as PNG, pixel for pixel (a server only applies its processor's resize).
    url = bodies[0]["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded[:, :, ::-1], request.images[0])
    # Answers in question order, the stop string put back (it closes the answer tag), parsed as usual.
    assert response.answers[2] == "<answer> 4.00 </answer>" and response.finish_reasons == ["stop"] * 6
    assert [protocol.parse_depth_answer(a) for a in response.answers] == [1 + 1.5 * k for k in range(6)]
    assert response.prompt_tokens == [80] * 6 and response.generated_tokens == [6] * 6
    assert backend.health()["backend_connection"] == "connected" and backend.health()["backend_requests"] == 7


def test_task_specs_come_from_the_served_checkpoint_or_an_explicit_protocol(tmp_path, standin):
    spec = protocol.DEPTH.with_options(depth_kind="z")
    custom = protocol.TaskSpec.from_dict({**spec.to_dict(), "questions": {"depth": "Depth at ({nx}, {ny})?"},
                                          "coord_scale": 100})
    protocol.save_protocol(tmp_path / "ckpt", [custom])
    standin.models = [{"id": "robots", "root": str(tmp_path / "ckpt")}]
    served = ServerBackend(standin.url)
    assert served.specs["depth"] == custom and served.specs_source.endswith("vlm3_protocol.json")
    assert served.model == "robots"
    # The released checkpoints' built-in specs where the served model is not a local directory.
    standin.models = [{"id": "facebook/VLM3-depth", "root": "facebook/VLM3-depth"}]
    assert ServerBackend(standin.url).specs == protocol.TASKS
    # An explicit protocol source wins and is read without contacting the server.
    explicit = ServerBackend("http://127.0.0.1:9", protocol_source=tmp_path / "ckpt" / "vlm3_protocol.json")
    assert explicit.spec("depth") == custom
    with pytest.raises(EngineError, match="has no vlm3_protocol.json"):
        ServerBackend(standin.url, protocol_source=tmp_path)
    # A depth estimator on the backend asks the custom question in the custom coordinates.
    DepthEstimator(served).estimate(_frame(), Intrinsics.from_focal(64, 48, 50.0), np.array([[32.0, 24.0]]))
    assert standin.requests[-1]["body"]["messages"][0]["content"][1]["text"].startswith("Depth at (")
    # Several served models: the client must be told which.
    standin.models = [{"id": "a"}, {"id": "b"}]
    with pytest.raises(ServerError, match="serves 2 models") as info:
        ServerBackend(standin.url).specs
    assert info.value.kind == "backend_rejected"
    assert ServerBackend(standin.url, model="b", protocol_source=tmp_path / "ckpt").answer(
        Request(images=[_frame()], questions=["Depth at (1, 2)?"], spec=custom)).answers == ["<answer> 1.03 </answer>"]


@pytest.mark.parametrize("mode, kind, attempts", [
    ("status:500", "backend_server_error", 3),  # retried twice
    ("status:503", "backend_server_error", 3),
    ("status:429", "backend_rejected", 3),  # too many requests: retried
    ("status:400", "backend_rejected", 1),  # a bad request is not retried
    ("status:404", "backend_rejected", 1),
    ("malformed", "backend_bad_response", 1),
    ("sleep:2.0", "backend_timeout", 3),
])
def test_faults_are_reported_under_their_kinds(standin, mode, kind, attempts):
    standin.mode = mode
    backend = ServerBackend(standin.url, model="served-model", protocol_source=None, timeout=0.5, retries=2,
                            backoff=0.01)
    backend._specs = dict(protocol.TASKS)  # the task specs are not what is tested here
    with pytest.raises(ServerError) as info:
        backend.answer(_request(1))
    assert info.value.kind == kind, info.value
    assert len(standin.requests) == attempts
    health = backend.health()
    assert health["backend_connection"] == kind and health["backend_failures"] == 1
    assert kind in health["backend_connection"] and health["backend_last_error"]


def test_an_unreachable_server_is_retried_with_backoff_and_reported():
    backend = ServerBackend(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.2)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as info:
        backend.spec("depth")
    elapsed = time.monotonic() - t0
    assert info.value.kind == "backend_unreachable" and info.value.transient
    assert 0.6 <= elapsed < 5.0  # 0.2 + 0.4 s of backoff between three attempts
    assert backend.health()["backend_connection"] == "backend_unreachable"


def test_transient_faults_recover_and_count_a_reconnection(standin):
    backend = ServerBackend(standin.url, retries=2, backoff=0.01)
    standin.fail_first = 2  # a server still warming up: two 503s, then answers
    assert len(backend.answer(_request(1)).answers) == 1
    assert backend.health()["backend_reconnects"] == 0  # retried within one request: never reported down
    backend.retries = 0
    standin.mode = "status:502"
    with pytest.raises(ServerError):
        backend.answer(_request(2))
    standin.mode = "ok"
    assert backend.answer(_request(2)).answers[1] == "<answer> 2.50 </answer>"
    health = backend.health()
    assert health["backend_connection"] == "connected" and health["backend_reconnects"] == 1


def test_answers_arriving_after_their_frame_failed_leave_the_fault_standing(standin):
    """One question of a frame is rejected at once while the others are still being answered: the
    frame fails, and the answers that arrive afterwards neither report the connection good again
    nor count a reconnection; the next frame answered does."""
    standin.mode = "sleep:0.6"
    request = _request(4)
    standin.reject = request.questions[2]
    backend = ServerBackend(standin.url, model="served-model", retries=0, timeout=10)
    backend._specs = dict(protocol.TASKS)  # the task specs are not what is tested here
    with pytest.raises(ServerError) as info:
        backend.answer(request)
    assert info.value.kind == "backend_rejected" and info.value.status == 400
    assert backend.health()["backend_requests"] == 1  # the other three were still being answered
    deadline = time.monotonic() + 10
    while backend.health()["backend_requests"] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    health = backend.health()
    assert health["backend_requests"] == 4 and health["backend_failures"] == 1
    assert health["backend_connection"] == "backend_rejected" and health["backend_reconnects"] == 0
    standin.reject, standin.mode = None, "ok"
    assert len(backend.answer(request).answers) == 4
    health = backend.health()
    assert health["backend_connection"] == "connected" and health["backend_reconnects"] == 1


def test_api_key_comes_from_the_named_variable_and_is_never_shown(standin, monkeypatch):
    secret = "sk-test-8d1f0c"
    monkeypatch.setenv("VLM3_TEST_KEY", secret)
    standin.mode = f"unauthorized:{secret}"
    backend = load_backend("server", url=standin.url, api_key_env="VLM3_TEST_KEY")
    assert backend.answer(_request(2)).answers[0] == "<answer> 1.00 </answer>"
    assert {r["auth"] for r in standin.requests} == {f"Bearer {secret}"}
    monkeypatch.setenv("VLM3_TEST_KEY", "wrong-key-0001")
    wrong = ServerBackend(standin.url, api_key_env="VLM3_TEST_KEY", retries=0)
    with pytest.raises(ServerError) as info:
        wrong.answer(_request(1))
    assert info.value.kind == "backend_rejected" and info.value.status == 401
    shown = json.dumps([backend.describe(), backend.health(), wrong.describe(), wrong.health(), str(info.value)])
    assert secret not in shown and "wrong-key-0001" not in shown and "VLM3_TEST_KEY" in shown
    monkeypatch.delenv("VLM3_TEST_KEY")
    with pytest.raises(EngineError, match="VLM3_TEST_KEY is not set"):
        ServerBackend(standin.url, api_key_env="VLM3_TEST_KEY")


def test_a_frame_is_sent_concurrently_up_to_the_concurrency_limit(standin):
    standin.mode = "sleep:1.0"  # each answer takes a second: requests sent together overlap on the server
    backend = ServerBackend(standin.url, concurrency=16, timeout=30)
    assert len(backend.answer(_request(16)).answers) == 16
    assert 8 <= standin.most_in_flight <= 16
    standin.most_in_flight = 0
    limited = ServerBackend(standin.url, concurrency=2, timeout=30)
    limited.answer(_request(6))
    assert standin.most_in_flight == 2


def test_png_data_url_round_trips_exact_pixels():
    image = _frame(3)
    url = png_data_url(image)
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded[:, :, ::-1], image)
    with pytest.raises(EngineError, match="RGB uint8"):
        png_data_url(image.astype(np.float32))


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(EngineError, match="http:// or https://"):
        ServerBackend("127.0.0.1:8000")
    with pytest.raises(EngineError, match="concurrency"):
        ServerBackend("http://127.0.0.1:8000", concurrency=0)
    with pytest.raises(EngineError, match="needs the server's URL"):
        load_backend("server")
    assert ServerBackend("http://host:8000").url == ServerBackend("http://host:8000/v1/").url == "http://host:8000/v1"


# ------------------------------------------------------------------------------------------------
# Serving a checkpoint (no vLLM needed: what is prepared and the command line)
# ------------------------------------------------------------------------------------------------


def test_server_view_adds_what_vllm_wants_and_leaves_the_checkpoint_alone(tiny_checkpoint, tmp_path):
    from vlm3_ros.engine.serving import prepare_checkpoint

    before = {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir() if p.is_file()}
    view = prepare_checkpoint(tiny_checkpoint, tmp_path / "served")
    assert view != tiny_checkpoint and view.parent == tmp_path / "served"
    assert {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir() if p.is_file()} == before
    image = json.loads((tiny_checkpoint / "processor_config.json").read_text())["image_processor"]
    video = json.loads((view / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert all(video[k] == image[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"))
    tokenizer = json.loads((view / "tokenizer_config.json").read_text())
    assert tokenizer["processor_class"] == "Qwen3VLProcessor"
    assert {k: v for k, v in tokenizer.items() if k != "processor_class"} == {
        k: v for k, v in json.loads(before["tokenizer_config.json"]).items() if k != "processor_class"}
    # Everything else is the checkpoint's own file (linked, not copied), the protocol file included.
    for name in before:
        if name != "tokenizer_config.json":
            assert (view / name).resolve() == (tiny_checkpoint / name).resolve(), name
    assert prepare_checkpoint(tiny_checkpoint, tmp_path / "served") == view  # made once
    assert prepare_checkpoint(view, tmp_path / "again") == view.resolve()  # nothing missing: served as it is


def test_vllm_command_line(tmp_path):
    from vlm3_ros.engine.serving import vllm_command

    protocol.save_protocol(tmp_path, [protocol.DEPTH, protocol.POSE])
    cpu = vllm_command("/venv/bin/python", tmp_path, port=8123, served_name="/ckpt", dtype="float32", device="cpu")
    assert cpu[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    text = " ".join(cpu)
    assert f"--model {tmp_path} --host 127.0.0.1 --port 8123 --served-model-name /ckpt --dtype float32" in text
    assert json.loads(cpu[cpu.index("--limit-mm-per-prompt") + 1]) == {"image": 2, "video": 0}  # pose: 2 images
    assert "--block-size 32" in text and "--enforce-eager" in text
    gpu = vllm_command("python", tmp_path, device="cuda", extra=["--dtype", "bfloat16", "--max-model-len", "4096"])
    assert "--block-size" not in gpu and "--enforce-eager" not in gpu
    assert gpu.count("--dtype") == 1 and gpu[-4:] == ["--dtype", "bfloat16", "--max-model-len", "4096"]


def test_serve_command_takes_its_options_and_passes_the_rest_to_vllm():
    from vlm3_ros.cli import serve
    from vlm3_ros.cli.main import COMMANDS, build_parser

    parser = build_parser("vlm3-ros", "", "vlm3_ros.cli", COMMANDS)
    for argv, port, dtype, extra in [
        (["serve", "M", "--port", "1", "--", "--max-model-len", "4096"], 1, "auto", ["--max-model-len", "4096"]),
        (["serve", "--port", "3", "M", "--dtype", "float32"], 3, "float32", []),
        (["serve", "M", "--", "--enforce-eager"], 8000, "auto", ["--enforce-eager"]),
        (["serve", "M", "--max-num-seqs", "8", "--host", "0.0.0.0"], 8000, "auto", ["--max-num-seqs", "8"]),
    ]:
        args, rest = serve._split_server_args(parser.parse_args(argv))
        assert (args.model, args.port, args.dtype, rest) == ("M", port, dtype, extra), argv


# ------------------------------------------------------------------------------------------------
# A depth node on the server backend (stand-in server)
# ------------------------------------------------------------------------------------------------


def test_depth_node_counts_server_faults_says_so_on_diagnostics_and_recovers(ros, perception_nodes, standin):
    pytest.importorskip("rclpy")
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import PointCloud2

    from ros_perception_helpers import Collector, FramePublisher, diagnostic_values
    from vlm3_ros.ros import backends
    from vlm3_ros.ros.depth_node import DepthNode

    backends.clear_cache()
    params = [Parameter("backend", value="server"), Parameter("server.url", value=standin.url),
              Parameter("server.retries", value=0), Parameter("query_count", value=9),
              Parameter("diagnostics_period", value=0.2)]
    node = perception_nodes(DepthNode(context=ros.context, parameter_overrides=params))
    client = ros.node("camera")
    cam = FramePublisher(client)
    clouds = Collector(client, PointCloud2, "points")
    diagnostics = Collector(client, DiagnosticArray, "/diagnostics")
    assert cam.wait_matched(ros) and ros.spin_until(lambda: node.worker.state == "ready", 30)
    intrinsics = Intrinsics.from_focal(64, 48, 50.0)

    def frame(t):
        cam.publish(FramePublisher.messages(t, _frame(int(t)), intrinsics))

    def diag():
        return diagnostic_values(diagnostics, node.get_fully_qualified_name()) or {}

    frame(1.0)
    assert ros.spin_until(lambda: len(clouds) == 1, 30)
    # Diagnostics are periodic: wait for a report made after the frame.
    assert ros.spin_until(lambda: diag().get("backend_connection") == "connected", 10), diag()
    assert clouds.messages[0].width == 9
    standin.mode = "status:500"
    frame(2.0)
    assert ros.spin_until(lambda: diag().get("rejected.backend_server_error") == "1", 30), diag()
    values = diag()
    assert values["backend_connection"] == "backend_server_error" and values["_level"] == 1
    assert "backend_server_error" in values["_message"] and "HTTP 500" in values["backend_last_error"]
    assert values["backend_state"] == "ready" and len(clouds) == 1
    standin.mode = "ok"
    frame(3.0)
    assert ros.spin_until(lambda: len(clouds) == 2 and diag().get("backend_connection") == "connected"
                          and diag().get("_level") == 0, 30), diag()
    assert diag()["backend_reconnects"] == "1"
    backends.clear_cache()
