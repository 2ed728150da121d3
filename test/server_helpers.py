"""Fixtures for the server backend's tests against a real vLLM server.

``vllm_server``
    ``vlm3-ros serve`` serving the default model (float32, so that its answers equal the
    in-process engine's) on 127.0.0.1 at a free port, started once per test session (about 70 s
    on 2 idle cores). The tests that stop and restart it use :meth:`ServedModel.stop` and
    :meth:`ServedModel.start`. Skipped, with the reason, where the vLLM environment does not exist
    (``make vllm-env`` creates it; CI does).

``default_checkpoint`` / ``default_engine``
    The default model (built on first use and cached, see ``vlm3_train.default_model``) and an
    in-process :class:`~vlm3_ros.engine.transformers_backend.TransformersBackend` on it (CPU,
    float32): the reference the server's answers are compared with.

``scene_frames(count)``
    Distinct synthetic frames (RGB, intrinsics, z-depth) of held-out scenes, the kind of image the
    default model was trained on, so its answers differ from frame to frame.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
import pytest

READY_LINE = " serves "


class ServedModel:
    """A ``vlm3-ros serve`` process for one checkpoint on a fixed port (restartable)."""

    def __init__(self, checkpoint: Path, port: int, log: Path, dtype: str = "float32") -> None:
        self.checkpoint = Path(checkpoint)
        self.port = port
        self.log = log
        self.dtype = dtype
        self.process: Optional[subprocess.Popen] = None
        self.url = f"http://127.0.0.1:{port}/v1"
        self.starts = 0

    def start(self, timeout: float = 900.0) -> float:
        """Start the server and wait until ``vlm3-ros serve`` says it serves; seconds taken."""
        t0 = time.monotonic()
        offset = self.log.stat().st_size if self.log.exists() else 0
        handle = open(self.log, "ab")  # noqa: SIM115 - the child holds it
        env = dict(os.environ)
        env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vlm3_ros.cli.main", "serve", str(self.checkpoint), "--host", "127.0.0.1",
             "--port", str(self.port), "--dtype", self.dtype],
            stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        handle.close()
        self.starts += 1
        while time.monotonic() - t0 < timeout:
            text = self.log.read_bytes()[offset:].decode("utf-8", "replace")
            if any(line.startswith("vlm3-ros serve: http") and READY_LINE in line for line in text.splitlines()):
                return time.monotonic() - t0
            if self.process.poll() is not None:
                raise RuntimeError(f"vlm3-ros serve exited with {self.process.returncode}:\n{text[-3000:]}")
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vlm3-ros serve did not become ready within {timeout} s; log {self.log}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 120.0) -> Optional[int]:
        """SIGTERM to ``vlm3-ros serve`` (which stops the server); its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def vllm_python_or_skip() -> Path:
    from vlm3_ros.engine.serving import find_vllm_python

    python = find_vllm_python()
    if python is None:
        pytest.skip("no vLLM environment (.venv-vllm/ or $VLM3_VLLM_PYTHON): `make vllm-env` creates it (CI does)")
    return python


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    pytest.importorskip("vlm3_train")
    from vlm3_train.default_model import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def default_engine(default_checkpoint):
    from vlm3_ros.engine.transformers_backend import TransformersBackend

    return TransformersBackend(default_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def vllm_server(default_checkpoint, tmp_path_factory):
    vllm_python_or_skip()
    from vlm3_ros.engine.serving import free_port

    server = ServedModel(default_checkpoint, free_port(), tmp_path_factory.mktemp("vllm") / "serve.log")
    server.start()
    yield server
    server.stop()


def scene_frames(count: int, seed: int = 7100) -> List[Tuple[np.ndarray, Any, np.ndarray]]:
    """``count`` frames of distinct held-out synthetic scenes: (rgb, intrinsics, z-depth)."""
    from vlm3_train.synthetic import generate_sequence

    frames = []
    for k in range(count):
        sequence = generate_sequence(seed=seed, frames=1, scene_index=k, supersample=1)
        frame = sequence.frame(0)
        frames.append((frame.rgb, sequence.intrinsics, frame.depth))
    return frames
