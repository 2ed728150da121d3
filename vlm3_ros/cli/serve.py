"""``vlm3-ros serve``: vLLM's OpenAI-compatible server for a VLM3 checkpoint, for ``backend: server``.

::

    vlm3-ros serve CHECKPOINT [--host 127.0.0.1] [--port 8000] [--dtype auto] [-- extra vLLM arguments]

The server runs in the vLLM environment (``make vllm-env``; ``--python`` or ``$VLM3_VLLM_PYTHON``
name another), from a server view of the checkpoint with the files vLLM wants (the checkpoint
itself is not changed), with a CPU build's settings where vLLM runs on a CPU. The command prints
the URL once the server answers and stops the server on SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

HELP = "Serve a checkpoint with vLLM's OpenAI-compatible server (for backend: server)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory or hub id (hub ids: the local Hugging Face cache, or --online)")
    _add_options(parser)
    parser.add_argument("server_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                        help="further vLLM server arguments, after --")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port of the server (default 8000)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (float32 on a CPU gives the "
                        "in-process engine's answers exactly)")
    parser.add_argument("--served-model-name", default=None,
                        help="model name clients send (default: the checkpoint's path, so that local clients find "
                             "its protocol file)")
    parser.add_argument("--python", type=Path, default=None, help="interpreter of the vLLM environment "
                        "(default: $VLM3_VLLM_PYTHON, else .venv-vllm of this checkout)")
    parser.add_argument("--online", action="store_true", help="allow downloading a hub id")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the server to answer")


def _split_server_args(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """This command's options given after MODEL (argparse leaves them in the remainder, and drops a
    ``--`` right after MODEL) and the server's own arguments."""
    rest = list(args.server_args or [])
    cut = rest.index("--") if "--" in rest else len(rest)
    parser = argparse.ArgumentParser(prog="vlm3-ros serve", add_help=False)
    _add_options(parser)
    args, unknown = parser.parse_known_args(rest[:cut], namespace=args)
    return args, unknown + rest[cut + 1:]


def run(args: argparse.Namespace) -> int:
    from ..engine import EngineError
    from ..engine.checkpoint import resolve_checkpoint
    from ..engine.serving import serve_checkpoint

    args, extra = _split_server_args(args)
    try:
        path = resolve_checkpoint(args.model, offline=not args.online)
        server = serve_checkpoint(path, python=args.python, host=args.host, port=args.port,
                                  served_name=args.served_model_name, dtype=args.dtype, extra=extra)
    except EngineError as exc:
        print(f"vlm3-ros serve: {exc}", file=sys.stderr)
        return 2
    stopping = []

    def stop(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        stopping.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    print("vlm3-ros serve: starting " + " ".join(server.command), flush=True)
    try:
        server.start()
        server.wait_ready(args.timeout)
        name = args.served_model_name or str(Path(path).resolve())
        print(f"vlm3-ros serve: {server.url}/v1 serves {name} (stop with Ctrl-C)", flush=True)
        while server.running:
            time.sleep(0.5)
        print(f"vlm3-ros serve: the server exited with status {server.process.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except EngineError as exc:
        print(f"vlm3-ros serve: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        status = server.stop()
        if stopping:
            print(f"vlm3-ros serve: stopped (server exit status {status})", flush=True)
