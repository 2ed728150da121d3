"""Inference engines answering VLM3 questions: one small backend interface, several backends.

* :class:`~vlm3_ros.engine.transformers_backend.TransformersBackend`: a Qwen3-VL / Qwen2.5-VL
  checkpoint in process, all of a frame's questions decoded together over one shared image prefix.
* :class:`~vlm3_ros.engine.oracle.OracleBackend`: answers from ground truth (validation, tests,
  live accuracy against a depth sensor).
* :class:`~vlm3_ros.engine.server_backend.ServerBackend`: a checkpoint served by vLLM or SGLang
  (OpenAI-compatible HTTP), for fleets and for robots that cannot hold the model.

Importing this package does not import torch, transformers or httpx; each backend loads what it
needs when it is created.
"""

from __future__ import annotations

from typing import Any

from .base import Backend, EngineError, GroundTruth, Request, Response
from .oracle import OracleBackend

__all__ = ["BACKENDS", "Backend", "EngineError", "GroundTruth", "OracleBackend", "Request", "Response", "load_backend"]

BACKENDS = ("transformers", "oracle", "server")


def load_backend(kind: str = "transformers", **options: Any) -> Backend:
    """Create a backend by name: ``transformers`` (``checkpoint=...`` and loading options), ``oracle``
    or ``server`` (``url=...`` and the options of :class:`~vlm3_ros.engine.server_backend.ServerBackend`)."""
    if kind == "transformers":
        from .transformers_backend import TransformersBackend

        if "checkpoint" not in options:
            raise EngineError("the transformers backend needs a checkpoint (a directory or a hub id)")
        return TransformersBackend(options.pop("checkpoint"), **options)
    if kind == "oracle":
        return OracleBackend(options.get("specs"))
    if kind == "server":
        from .server_backend import ServerBackend

        if not options.get("url"):
            raise EngineError("the server backend needs the server's URL (e.g. http://127.0.0.1:8000/v1)")
        return ServerBackend(options.pop("url"), **options)
    raise EngineError(f"unknown backend {kind!r}; choose one of {BACKENDS}")
