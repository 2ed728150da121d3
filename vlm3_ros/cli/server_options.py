"""Command-line options of the server backend, shared by ``vlm3-ros query | bench`` and ``vlm3-train eval``.

The command adds ``--server URL`` where it chooses its backend (often in a mutually exclusive
group with ``--model``); :func:`add_server_options` adds the rest and :func:`server_backend`
creates the backend from the parsed arguments.
"""

from __future__ import annotations

import argparse
from typing import Any

SERVER_URL_HELP = "OpenAI-compatible server (vLLM, SGLang) serving the model, e.g. http://127.0.0.1:8000/v1"


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The server backend's options other than the URL."""
    group = parser.add_argument_group("server backend (with --server)")
    group.add_argument("--server-model", default="", help="served model name (default: the server's only model)")
    group.add_argument("--api-key-env", default="", metavar="VAR",
                       help="environment variable holding the server's API key (never pass the key itself; "
                            "default: none, no key sent)")
    group.add_argument("--protocol", default=None, metavar="PATH",
                       help="checkpoint directory or vlm3_protocol.json with the task specs (default: the served "
                            "model's directory when it is on this machine, else the built-in specs)")
    group.add_argument("--server-timeout", type=float, default=60.0, help="seconds per request (default 60)")
    group.add_argument("--concurrency", type=int, default=64, help="requests in flight at most (default 64)")
    group.add_argument("--retries", type=int, default=2, help="retries after a transient fault (default 2)")


def server_backend(args: argparse.Namespace, *, concurrency: int | None = None) -> Any:
    """The server backend of ``args`` (``concurrency`` overrides ``--concurrency``)."""
    from ..engine import load_backend

    return load_backend("server", url=args.server, model=args.server_model, api_key_env=args.api_key_env,
                        protocol_source=args.protocol, timeout=args.server_timeout,
                        concurrency=concurrency or args.concurrency, retries=args.retries)
