"""Inference engines answering VLM3 questions: one small backend interface, several backends.

* :class:`~vlm3_ros.engine.transformers_backend.TransformersBackend`: a Qwen3-VL / Qwen2.5-VL
  checkpoint in process, all of a frame's questions decoded together over one shared image prefix.
* :class:`~vlm3_ros.engine.oracle.OracleBackend`: answers from ground truth (validation, tests,
  live accuracy against a depth sensor).

Importing this package does not import torch or transformers; the transformers backend loads
them when it is created.
"""

from __future__ import annotations

from typing import Any

from .base import Backend, EngineError, GroundTruth, Request, Response
from .oracle import OracleBackend

__all__ = ["BACKENDS", "Backend", "EngineError", "GroundTruth", "OracleBackend", "Request", "Response", "load_backend"]

BACKENDS = ("transformers", "oracle")


def load_backend(kind: str = "transformers", **options: Any) -> Backend:
    """Create a backend by name: ``transformers`` (``checkpoint=...`` and loading options) or ``oracle``."""
    if kind == "transformers":
        from .transformers_backend import TransformersBackend

        if "checkpoint" not in options:
            raise EngineError("the transformers backend needs a checkpoint (a directory or a hub id)")
        return TransformersBackend(options.pop("checkpoint"), **options)
    if kind == "oracle":
        return OracleBackend(options.get("specs"))
    raise EngineError(f"unknown backend {kind!r}; choose one of {BACKENDS}")
