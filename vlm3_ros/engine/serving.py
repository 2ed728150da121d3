"""Starting an OpenAI-compatible vLLM server for a VLM3 checkpoint (``vlm3-ros serve``, tests, bench).

vLLM pins its own torch and transformers, so it lives in its own environment (``make vllm-env``
creates ``.venv-vllm/``); :func:`find_vllm_python` finds that interpreter. The pieces:

* :func:`prepare_checkpoint`: what vLLM's processor loading needs and a checkpoint of this project
  lacks (a video processor configuration, the real processor class name). The checkpoint is never
  changed: a *server view* beside it in the cache links every file and adds or replaces those few.
* :func:`vllm_command`: the server command line, with the settings a CPU build needs (block size
  32, so the prefix cache works for short prompts; eager mode, for a start-up about 70 s shorter).
* :class:`ServerProcess`: start the server, wait until it answers, stop it (SIGTERM to its process
  group, SIGKILL after a grace period).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

from .. import protocol
from ..paths import cache_dir, write_json_atomic
from .base import EngineError

__all__ = ["ServerProcess", "find_vllm_python", "free_port", "prepare_checkpoint", "vllm_command", "vllm_device"]

#: The vLLM environment made by ``make vllm-env`` (scripts/setup_env.py --with-vllm) in a checkout.
VLLM_ENV_DIR = ".venv-vllm"
VLLM_PYTHON_ENV = "VLM3_VLLM_PYTHON"

#: model_type -> video processor class transformers wants beside the image processor.
_VIDEO_PROCESSORS = {"qwen3_vl": "Qwen3VLVideoProcessor", "qwen3_vl_moe": "Qwen3VLVideoProcessor",
                     "qwen2_5_vl": "Qwen2VLVideoProcessor", "qwen2_vl": "Qwen2VLVideoProcessor"}
_IMAGE_KEYS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "do_rescale",
               "rescale_factor", "do_normalize", "do_convert_rgb")


def find_vllm_python() -> Path | None:
    """The vLLM environment's interpreter: ``$VLM3_VLLM_PYTHON``, else ``.venv-vllm`` of this checkout."""
    configured = os.environ.get(VLLM_PYTHON_ENV)
    if configured:
        return Path(configured)
    candidate = Path(__file__).resolve().parents[2] / VLLM_ENV_DIR / "bin" / "python"
    return candidate if candidate.exists() else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Checkpoint preparation
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path} is not a JSON object")
    return data


def _image_processor_config(path: Path) -> dict[str, Any]:
    if (path / "preprocessor_config.json").is_file():
        return _read_json(path / "preprocessor_config.json")
    if (path / "processor_config.json").is_file():
        config = _read_json(path / "processor_config.json").get("image_processor")
        if isinstance(config, dict):
            return config
    raise EngineError(f"checkpoint {path} has no image processor configuration")


def _server_files(path: Path) -> dict[str, dict[str, Any]]:
    """File name -> content for what vLLM needs and ``path`` lacks (empty: serve it as it is)."""
    from .checkpoint import SUPPORTED_MODEL_TYPES, processor_class

    config = _read_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(f"checkpoint {path}: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    files: dict[str, dict[str, Any]] = {}
    if not (path / "video_preprocessor_config.json").is_file():
        image = _image_processor_config(path)
        video = {key: image[key] for key in _IMAGE_KEYS if key in image}
        video["video_processor_type"] = _VIDEO_PROCESSORS[model_type]
        files["video_preprocessor_config.json"] = video
    # The in-process loader saves an image-only processor class name; vLLM resolves the name.
    real = processor_class(model_type).__mro__[1].__name__
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        data = _read_json(tokenizer_config)
        if data.get("processor_class") not in (None, real):
            files["tokenizer_config.json"] = {**data, "processor_class": real}
    return files


def prepare_checkpoint(path: str | os.PathLike[str], view_root: str | os.PathLike[str] | None = None) -> Path:
    """A directory vLLM can serve for checkpoint ``path``: ``path`` itself when nothing is missing,
    else a server view (links to every file of ``path`` plus the added or replaced files) under
    ``view_root`` (default ``$VLM3_CACHE/served``). The view is rebuilt when the checkpoint changes."""
    path = Path(path).resolve()
    if not (path / "config.json").is_file():
        raise EngineError(f"checkpoint directory {path} has no config.json")
    files = _server_files(path)
    if not files:
        return path
    stamp = hashlib.sha256()
    for entry in sorted(path.iterdir()):
        info = entry.stat()
        stamp.update(f"{entry.name}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    stamp.update(json.dumps(files, sort_keys=True).encode())
    root = Path(view_root) if view_root is not None else cache_dir("served")
    view = root / f"{path.name}-{stamp.hexdigest()[:12]}"
    if (view / "config.json").exists():
        return view
    work = root / f".{view.name}.tmp{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        for entry in path.iterdir():
            if entry.name not in files:
                (work / entry.name).symlink_to(entry)
        for name, content in files.items():
            write_json_atomic(work / name, content, default=None)
        try:
            os.replace(work, view)
        except OSError:  # another process made the same view meanwhile
            if not (view / "config.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return view


def _images_per_prompt(path: Path) -> int:
    try:
        specs = protocol.load_protocol(path)
    except protocol.ProtocolError:
        specs = None
    return max(spec.num_images for spec in (specs or protocol.TASKS).values())


# --------------------------------------------------------------------------------------------
# Command and process
# --------------------------------------------------------------------------------------------


def vllm_device(python: str | os.PathLike[str]) -> str:
    """The device type the vLLM installation of ``python`` runs on (``cpu``, ``cuda``...)."""
    code = "from vllm.platforms import current_platform as p; print(p.device_type)"
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"{python} cannot run vLLM: {exc}") from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise EngineError(f"{python} cannot import vLLM: {' | '.join(tail)} (make vllm-env creates the environment)")
    return done.stdout.strip().splitlines()[-1]


def _has_option(args: Sequence[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def vllm_command(python: str | os.PathLike[str], model_dir: str | os.PathLike[str], *, host: str = "127.0.0.1",
                 port: int = 8000, served_name: str | None = None, dtype: str = "auto", device: str = "cuda",
                 extra: Sequence[str] = ()) -> list[str]:
    """The command line of vLLM's OpenAI server for ``model_dir`` (``extra`` appended, and winning)."""
    extra = list(extra)
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--host", host, "--port", str(int(port))]
    if served_name and not _has_option(extra, "--served-model-name"):
        command += ["--served-model-name", served_name]
    if dtype != "auto" and not _has_option(extra, "--dtype"):
        command += ["--dtype", dtype]
    if not _has_option(extra, "--limit-mm-per-prompt"):
        command += ["--limit-mm-per-prompt", json.dumps({"image": _images_per_prompt(Path(model_dir)), "video": 0})]
    if device == "cpu":
        # CPU attention needs block sizes that are multiples of 32; at the default 128 short VLM3
        # prompts never fill a block, so the prefix cache would never hit.
        if not _has_option(extra, "--block-size"):
            command += ["--block-size", "32"]
        if not _has_option(extra, "--enforce-eager"):
            command += ["--enforce-eager"]
    return command + extra


def server_environment(device: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the server process: on a CPU, 1 GiB of KV cache unless set."""
    env = dict(os.environ if base is None else base)
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    env.pop("PYTHONPATH", None)  # this environment's packages must not shadow the server's
    if device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


class ServerProcess:
    """A vLLM server started from :func:`vllm_command`; a context manager that stops it at exit.

    ``log``: a file path for the server's output (None: inherit this process's stdout/stderr).
    """

    def __init__(self, command: Sequence[str], *, url: str, env: Mapping[str, str] | None = None,
                 log: str | os.PathLike[str] | None = None) -> None:
        self.command = list(command)
        self.url = url.rstrip("/")
        self.env = dict(env) if env is not None else None
        self.log = Path(log) if log is not None else None
        self.process: subprocess.Popen | None = None
        self._log_handle: IO[bytes] | None = None

    def start(self) -> "ServerProcess":
        if self.process is not None and self.process.poll() is None:
            return self
        output: Any = None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
            output = self._log_handle
        self.process = subprocess.Popen(self.command, env=self.env, stdout=output, stderr=subprocess.STDOUT if output
                                        else None, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        """True when the server lists its models."""
        import httpx

        try:
            return httpx.get(self.url + "/v1/models", timeout=5.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until the server answers; raise EngineError if it exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise EngineError(f"the vLLM server exited with status {self.process.returncode if self.process else None}"
                                  f"{self._log_tail()}")
            if self.ready():
                return
            time.sleep(1.0)
        raise EngineError(f"the vLLM server did not answer at {self.url} within {timeout:g} s{self._log_tail()}")

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; its exit status."""
        process = self.process
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return None if process is None else process.poll()

    def _log_tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        tail = self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        return f"; last lines of {self.log}:\n" + "\n".join(tail)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_checkpoint(model_dir: str | os.PathLike[str], *, python: str | os.PathLike[str] | None = None,
                     host: str = "127.0.0.1", port: int | None = None, served_name: str | None = None,
                     dtype: str = "auto", extra: Sequence[str] = (), log: str | os.PathLike[str] | None = None,
                     env: Mapping[str, str] | None = None) -> ServerProcess:
    """A (not yet started) :class:`ServerProcess` serving checkpoint directory ``model_dir``.

    The served model name defaults to the checkpoint's own path, so a client on the same machine
    finds its protocol file through the server's model list.
    """
    python = python or find_vllm_python()
    if python is None:
        raise EngineError(f"no vLLM environment: run `make vllm-env` (creates {VLLM_ENV_DIR}/) or set {VLLM_PYTHON_ENV}")
    device = vllm_device(python)
    port = port or free_port(host)
    view = prepare_checkpoint(model_dir)
    command = vllm_command(python, view, host=host, port=port, served_name=served_name or str(Path(model_dir).resolve()),
                           dtype=dtype, device=device, extra=extra)
    connect = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    return ServerProcess(command, url=f"http://{connect}:{port}", env=server_environment(device, env), log=log)
