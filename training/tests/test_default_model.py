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
    format_comparison,
)

#: The default recipe scaled down to about a minute on two CPU cores: the smaller ``test`` model,
#: smaller images (depth focal 128 px, about 20 image tokens; smaller pairs), fewer and shorter scenes,
#: fewer steps at a higher learning rate.
SMALL_RECIPE = replace(DEFAULT_RECIPE, preset="test", depth_focal=128.0, correspondence_max_edge=128.0, pose_focal=96.0,
                       train_scenes=12, frames=5, val_scenes=3, val_frames=4, depth_points=20, correspondence_points=4,
                       correspondence_gaps=(1,), pose_gaps=(1,), steps=450, batch_size=16, learning_rate=3e-3, warmup=10)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    t0 = time.perf_counter()
    path = ensure_default_model(cache, recipe=SMALL_RECIPE, progress=False)
    return cache, path, time.perf_counter() - t0


def test_default_model_beats_the_constant_and_reports_every_task_beside_its_baseline(built):
    _, path, _ = built
    report = json.loads((path / REPORT_NAME).read_text())
    depth = report["heldout"]["depth"]
    assert depth["delta1"] > depth["baselines"]["constant_delta1"]["delta1"] + 0.05, depth
    assert depth["abs_rel"] < depth["baselines"]["constant_abs_rel"]["abs_rel"], depth
    assert depth["num_points"] == 3 * 4 * 20 and depth["num_unparseable"] < 0.05 * depth["num_points"]
    rows = {(r["task"], r["metric"], r["baseline"]): r for r in report["heldout"]["against_baselines"]}
    assert set(rows) >= {("depth", "delta1", "constant_delta1"), ("correspondence", "epe_px", "identity"),
                         ("pose", "auc30", "zero_motion"), ("pose", "rotation_error_deg.median", "zero_motion"),
                         ("trajectory", "ate_from_start_m", "zero_motion")}
    for row in rows.values():  # each verdict is what the numbers say
        if row["model"] is not None:
            assert row["beats"] == (row["model"] < row["baseline_value"] if row["lower_is_better"]
                                    else row["model"] > row["baseline_value"])
    # The baselines are the honest ones: identity EPE is the true flow, zero motion's AUC is 0.
    assert report["heldout"]["correspondence"]["baselines"]["identity"]["epe_px"] > 0.5
    assert report["heldout"]["pose"]["baselines"]["zero_motion"]["auc30"] == 0.0
    assert report["tasks"] == ["correspondence", "depth", "pose"]
    assert (path / "heldout_report" / "report.json").is_file()
    assert set(report["cpu_seconds"]) == set(report["seconds"]) >= {"data", "training", "evaluation", "total"}


def test_comparison_says_plainly_what_does_not_beat_its_baseline():
    rows = [{"task": "depth", "metric": "delta1", "model": 0.6, "baseline": "constant_delta1", "baseline_value": 0.3,
             "lower_is_better": False, "beats": True},
            {"task": "pose", "metric": "auc30", "model": 50.0, "baseline": "constant_direction", "baseline_value": 79.0,
             "lower_is_better": False, "beats": False}]
    text = format_comparison(rows, "title")
    assert "beats it" in text.splitlines()[1] and "DOES NOT BEAT IT" in text.splitlines()[2]
    assert text.splitlines()[-1] == "  the model does not beat its baseline on: pose auc30 (against constant_direction)"


def test_default_model_is_a_loadable_checkpoint_with_its_own_specs(built):
    import numpy as np

    from vlm3_ros import protocol
    from vlm3_ros.engine import load_backend
    from vlm3_ros.pipeline import DepthEstimator

    from vlm3_train.synthetic import DEFAULT_FOCAL, generate_robot_sequence

    _, path, _ = built
    specs = protocol.load_protocol(path)
    assert specs == default_model_specs(SMALL_RECIPE)
    assert specs["depth"].question(nx=12, ny=34) == "depth 12 34"  # the compact protocol
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    backend = load_backend("transformers", checkpoint=str(path), device="cpu", dtype="float32")

    # A level camera 0.6 m above the floor: the floor near the bottom of the image is closer than
    # what is seen at the horizon (the image centre row). The model has learnt that.
    near, far = [], []
    for k in range(3):
        sequence = generate_robot_sequence(4242, 1, scene_index=k, camera_height=0.6, focal=DEFAULT_FOCAL, pitch=0.0)
        uv = np.array([[x, y] for y in (95.0, 180.0) for x in (40.0, 128.0, 216.0)])
        result = DepthEstimator(backend).estimate(sequence.frame(0).rgb, sequence.intrinsics, uv)
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
    recipe = replace(SMALL_RECIPE, train_scenes=1, frames=2, val_scenes=1, val_frames=2, steps=1, depth_points=4)
    with pytest.raises(DefaultModelError, match="did not learn"):
        ensure_default_model(tmp_path, recipe=recipe, progress=False)
    assert not default_model_path(tmp_path, recipe).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
