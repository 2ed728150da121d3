"""The default model: built by the package's own pipeline, it must learn (beat its baselines), and is cached.

The full recipe trains for a few minutes (``make demo`` / ``vlm3-train default-model``); these tests
run the same code path on a smaller recipe (a smaller image, fewer scenes and steps).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

pytest.importorskip("torch")
pytest.importorskip("datasets")

from vlm3_train.default_model import (  # noqa: E402
    DEFAULT_RECIPE,
    REPORT_NAME,
    DefaultModelError,
    default_model_path,
    default_model_specs,
    ensure_default_model,
)

#: The default recipe scaled down to about a minute on two CPU cores: the smaller ``test`` model, a
#: smaller image (focal 128 px, about 20 image tokens), fewer and shorter scenes, fewer steps of one
#: question per sample at a higher learning rate.
SMALL_RECIPE = replace(DEFAULT_RECIPE, preset="test", focal=128.0, train_scenes=12, frames=5, val_scenes=3, val_frames=4,
                       points=20, steps=450, batch_size=16, questions_per_sample=1, learning_rate=3e-3, warmup=10)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    t0 = time.perf_counter()
    path = ensure_default_model(cache, recipe=SMALL_RECIPE, progress=False)
    return cache, path, time.perf_counter() - t0


def test_default_model_beats_untrained_and_constant_baselines(built):
    _, path, _ = built
    report = json.loads((path / REPORT_NAME).read_text())
    delta1 = report["heldout_delta1"]
    assert delta1["untrained"] < 0.05  # a random model's answers do not even parse
    assert delta1["trained"] > delta1["constant_median"] + 0.05, delta1
    assert delta1["trained"] > delta1["untrained"] + 0.2, delta1
    assert report["heldout_abs_rel"]["trained"] < report["heldout_abs_rel"]["constant_median"]
    assert report["heldout_points"] == 3 * 4 * 20
    assert report["unparseable"] < 0.05 * report["heldout_points"]


def test_default_model_is_a_loadable_checkpoint_with_its_own_specs(built):
    import numpy as np

    from vlm3_ros import protocol
    from vlm3_ros.engine import load_backend
    from vlm3_ros.pipeline import DepthEstimator

    from vlm3_train.default_model import robot_sequence

    _, path, _ = built
    specs = protocol.load_protocol(path)
    assert specs == default_model_specs(SMALL_RECIPE)
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    backend = load_backend("transformers", checkpoint=str(path), device="cpu", dtype="float32")
    from vlm3_train.synthetic import default_intrinsics

    # A level camera 0.6 m above the floor: the floor near the bottom of the image is closer than
    # what is seen at the horizon (the image centre row). The model has learnt that.
    near, far = [], []
    for k in range(3):
        frame = robot_sequence(4242, k, 1, SMALL_RECIPE.camera_height).frame(0)
        uv = np.array([[x, y] for y in (95.0, 180.0) for x in (40.0, 128.0, 216.0)])
        result = DepthEstimator(backend).estimate(frame.rgb, default_intrinsics(), uv)
        assert result.valid.sum() >= 5  # the pipeline reads its answers
        assert np.all((result.z[result.valid] > 0.1) & (result.z[result.valid] < 20.0))
        far.extend(result.z[:3][result.valid[:3]])
        near.extend(result.z[3:][result.valid[3:]])
    assert np.mean(near) < 0.7 * np.mean(far)


def test_second_call_returns_the_cached_model_at_once(built):
    cache, path, first_seconds = built
    t0 = time.perf_counter()
    again = ensure_default_model(cache, recipe=SMALL_RECIPE, progress=False)
    assert again == path and time.perf_counter() - t0 < 0.5 < first_seconds
    assert path == default_model_path(cache, SMALL_RECIPE)
    # Another recipe (or version) is another cache entry; nothing half-built is left behind.
    assert default_model_path(cache, replace(SMALL_RECIPE, steps=321)) != path
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [path.name]


def test_a_model_that_does_not_learn_is_refused_and_not_cached(tmp_path):
    recipe = replace(SMALL_RECIPE, train_scenes=1, frames=2, val_scenes=1, val_frames=2, steps=1, points=4)
    with pytest.raises(DefaultModelError, match="did not learn"):
        ensure_default_model(tmp_path, recipe=recipe, progress=False)
    assert not default_model_path(tmp_path, recipe).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
