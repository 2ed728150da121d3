"""Shared fixtures for tests that need a model checkpoint.

``tiny_checkpoint``
    A randomly initialised Qwen3-VL checkpoint of the ``test`` preset (about 0.25 M parameters,
    offline-trained tokenizer), built once per test session with
    :func:`vlm3_ros.engine.model_factory.build_checkpoint` and loaded back by the tests through
    the same loader users use. Random weights are the only option here: model hubs are not
    reachable from CI, so no released weights can be downloaded.

``tiny_backend``
    A :class:`~vlm3_ros.engine.transformers_backend.TransformersBackend` on that checkpoint (CPU,
    float32), shared by the session.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from vlm3_ros.engine.model_factory import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("models") / "tiny", preset="test", seed=0)


@pytest.fixture(scope="session")
def tiny_backend(tiny_checkpoint):
    from vlm3_ros.engine.transformers_backend import TransformersBackend

    return TransformersBackend(tiny_checkpoint, device="cpu", dtype="float32")
