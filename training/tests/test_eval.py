"""Evaluation: oracle on real 7-Scenes frames in a bag, metric bookkeeping, trajectory chaining, model path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import pytest

pytest.importorskip("datasets")

from vlm3_ros import protocol  # noqa: E402
from vlm3_ros.engine import Backend, OracleBackend, Request, Response, load_backend  # noqa: E402
from vlm3_ros.protocol import TaskSpec  # noqa: E402

from train_helpers import small_dataset, small_specs  # noqa: E402
from vlm3_train.evaluate import (  # noqa: E402
    EvalError,
    chain_trajectories,
    evaluate_bags,
    evaluate_datasets,
    training_constants,
)


def _write_sevenscenes_bag(scenes, path: Path, frames: int, step: int = 1, registered: bool = False) -> Path:
    from vlm3_ros.bags import RgbdBagWriter
    from vlm3_ros.camera import Intrinsics

    K = scenes.intrinsics()
    with RgbdBagWriter(path, depth_encoding="16UC1") as writer:
        for k, frame_id in enumerate(scenes.frame_ids[::step][:frames]):
            rgb, depth, T_w_c = scenes.load_frame(frame_id)
            if registered:  # colour resampled onto depth, as an RGB-D camera's aligned streams
                rgb = scenes.load_registered_rgb(frame_id)
            writer.write_frame(1_000_000_000 + k * 33_333_333, rgb=rgb, depth_m=depth, T_w_c=T_w_c,
                               intrinsics=Intrinsics.from_K(K, rgb.shape[1], rgb.shape[0]))
    return path


def test_oracle_on_sevenscenes_bag_scores_perfectly(sevenscenes, tmp_path):
    bag = _write_sevenscenes_bag(sevenscenes, tmp_path / "redkitchen", frames=16)
    report = evaluate_bags(OracleBackend(), [bag], tmp_path / "report", oracle=True,
                           tasks=("depth", "pose", "correspondence"), points_per_image=8, pose_gap=1,
                           correspondence_gap=5, progress=False)
    assert report["samples"] == {"depth": 16, "pose": 15, "correspondence": 11}
    depth = report["depth"]
    assert depth["delta1"] == 1.0 and depth["num_points"] == 128 and depth["num_unparseable"] == 0
    assert depth["abs_rel"] < 0.005  # answers carry two decimals
    pose = report["pose"]
    assert pose["auc30"] >= 99.0 and pose["num_unparseable"] == 0
    assert pose["rotation_error_deg"]["median"] < 0.1
    corr = report["correspondence"]
    # Answers are integers in [0, 1000] of a 1024 x 768 image: at most ~0.7 px off.
    assert corr["num_points"] == 88 and corr["num_unparseable"] == 0
    assert corr["epe"] < 0.71 and corr["epe_px"] < 0.73 and corr["within_px"]["within_1"] == 1.0
    trajectory = report["trajectory"]
    assert trajectory["num_trajectories"] == 1
    only = trajectory["trajectories"][0]
    assert only["num_poses"] == 16 and only["gap"] == 1
    # 16 frames of a hand-held Kinect: ~5 mm steps answered to the centimetre; the chain stays within a few cm.
    assert 0.0 < trajectory["ate_rmse_m"] < 0.03
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["depth"]["delta1"] == 1.0
    for name in ("depth_errors.png", "pose_errors.png", "correspondence_errors.png", "trajectory_00.png"):
        png = (tmp_path / "report" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


class _Corrupting(Backend):
    """The oracle, with every ``every``-th answer replaced by text no parser accepts."""

    name = "corrupting"

    def __init__(self, every: int) -> None:
        self.oracle = OracleBackend(small_specs())
        self.every = every
        self.count = 0

    @property
    def specs(self) -> Mapping[str, TaskSpec]:
        return self.oracle.specs

    def answer(self, request: Request) -> Response:
        response = self.oracle.answer(request)
        answers = []
        for text in response.answers:
            self.count += 1
            answers.append("I cannot tell." if self.count % self.every == 0 else text)
        response.answers = answers
        return response


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return small_dataset(tmp_path_factory.mktemp("eval-data"))


def test_unparseable_answers_count_as_wrong(dataset, tmp_path):
    backend = _Corrupting(every=4)
    report = evaluate_datasets(backend, [dataset], tmp_path, oracle=True, split="all", tasks=("depth",),
                               plots=False, progress=False)
    depth = report["depth"]
    n = depth["num_points"]
    assert n == 12 * 4
    assert depth["num_unparseable"] == n // 4
    assert depth["delta1"] == pytest.approx(1 - 1 / 4)
    assert depth["abs_rel"] < 0.01  # over the parsed answers only
    examples = report["unparseable_examples"]["depth"]
    assert examples and examples[0]["answer"] == "I cannot tell."


def test_splits_and_pose_failures(dataset, tmp_path):
    report = evaluate_datasets(OracleBackend(small_specs()), [dataset], None, oracle=True, split="val", progress=False)
    assert report["samples"] == {"depth": 4, "pose": 2}
    assert report["pose"]["auc30"] == 100.0
    # Every 4th pose answer (one per pair: 4 questions) broken -> every pair fails -> AUC 0.
    broken = evaluate_datasets(_Corrupting(every=4), [dataset], None, oracle=True, split="all", tasks=("pose",),
                               progress=False)
    assert broken["pose"]["num_unparseable"] == broken["pose"]["num_pairs"] == 8
    assert broken["pose"]["auc30"] == 0.0


def test_baselines_are_what_image_blind_predictors_score(dataset):
    """The constants are fitted on a training set's targets; each baseline is recomputed here from the
    dataset's own ground truth, and the (perfect) oracle beats every one of them."""
    from vlm3_ros import metrics
    from vlm3_ros.geometry import rotation_angle

    from vlm3_train.evaluate import _open

    constants = training_constants(dataset)
    ds, _ = _open(Path(dataset))
    depths, poses = [], []
    for task, text in zip(ds.data.column("task").to_pylist(), ds.data.column("targets").to_pylist()):
        targets = json.loads(text)
        if task == "depth":
            depths.extend(targets["values"])
        else:
            poses.append(np.asarray(targets["T"], float))
    depths = np.asarray(depths)
    # The best constant of a percentile search: no constant on a fine grid does clearly better.
    best = max(metrics.delta1(np.full(depths.shape, c), depths) for c in np.linspace(depths.min(), depths.max(), 400))
    assert metrics.delta1(np.full(depths.shape, constants["depth_delta1"]), depths) >= best - 0.02
    mean = np.mean([T[:3, 3] / np.linalg.norm(T[:3, 3]) for T in poses], axis=0)
    np.testing.assert_allclose(constants["direction"], mean / np.linalg.norm(mean), atol=1e-9)

    report = evaluate_datasets(OracleBackend(small_specs()), [dataset], None, oracle=True, split="all", progress=False,
                               constants=constants)
    depth = report["depth"]["baselines"]
    assert depth["constant_delta1"]["delta1"] == pytest.approx(
        metrics.delta1(np.full(depths.shape, constants["depth_delta1"]), depths))
    assert depth["constant_abs_rel"]["abs_rel"] == pytest.approx(
        float(np.mean(np.abs(constants["depth_abs_rel"] - depths) / depths)))
    zero = report["pose"]["baselines"]["zero_motion"]
    # Standing still: the rotation error is the true rotation; the direction is undefined (90 degrees).
    assert zero["auc30"] == 0.0 and zero["translation_error_deg"]["median"] == 90.0
    assert zero["rotation_error_deg"]["median"] == pytest.approx(np.median([rotation_angle(T[:3, :3]) for T in poses]))
    assert report["pose"]["baselines"]["constant_direction"]["direction"] == constants["direction"]
    still = report["trajectory"]["baselines"]["zero_motion"]["ate_from_start_m"]
    assert still > 0.05 and report["trajectory"]["ate_from_start_m"] < 0.02
    rows = report["against_baselines"]
    assert {(r["task"], r["baseline"]) for r in rows} >= {("depth", "constant_delta1"), ("pose", "zero_motion"),
                                                         ("pose", "constant_direction"), ("trajectory", "zero_motion")}
    assert all(r["beats"] for r in rows), rows


def test_chained_trajectory_and_broken_chains():
    from vlm3_ros.geometry import euler_to_matrix, make_pose

    steps = [make_pose(euler_to_matrix(2.0 * k, 0.5, 0.0), [0.1, 0.0, 0.05 * k]) for k in range(6)]
    keys = [("bag", k, k + 1) for k in range(6)]
    chains = chain_trajectories(keys, steps, steps)
    assert len(chains) == 1 and chains[0]["frames"] == list(range(7))
    expected = np.eye(4)
    for T in steps:
        expected = expected @ T
    np.testing.assert_allclose(chains[0]["gt"][-1], expected, atol=1e-12)
    broken = list(steps)
    broken[3] = None
    chains = chain_trajectories(keys, broken, steps)
    assert [c["frames"] for c in chains] == [[0, 1, 2, 3], [4, 5, 6]]
    # Pairs of another gap form their own chain; too short chains are dropped.
    chains = chain_trajectories(keys + [("bag", 0, 2)], steps + [steps[0]], steps + [steps[0]])
    assert sorted(c["gap"] for c in chains) == [1]


def test_model_path_and_spec_mismatch(dataset, tiny_checkpoint, tmp_path):
    backend = load_backend("transformers", checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", warmup=False)
    with pytest.raises(EvalError, match="other specs than the model's"):
        evaluate_datasets(backend, [dataset], tmp_path, progress=False)
    # A checkpoint that serves the dataset's specs (as the trained ones do) runs through the engine.
    from vlm3_ros.engine.checkpoint import load_checkpoint

    loaded = load_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")
    loaded.specs = protocol.load_protocol(dataset)
    from vlm3_ros.engine.transformers_backend import TransformersBackend

    model = TransformersBackend(loaded, warmup=False)
    report = evaluate_datasets(model, [dataset], tmp_path, split="val", max_new_tokens=6, progress=False)
    depth = report["depth"]
    # An untrained model answers nothing parseable in 6 tokens: every point counts as wrong.
    assert depth["num_points"] == 16 and depth["delta1"] == 0.0 and depth["num_unparseable"] == 16
    assert report["pose"]["auc30"] == 0.0
    assert report["generated_tokens"] == 6 * (16 + 2 * 4)
    assert (tmp_path / "report.json").is_file() and (tmp_path / "depth_errors.png").is_file()


def test_eval_command(dataset, tmp_path, capsys):
    from vlm3_train.cli import main

    assert main(["eval", str(dataset), "--oracle", "--output", str(tmp_path / "r"), "--split", "all", "--quiet",
                 "--no-plots"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["depth"]["delta1"] == 1.0 and printed["pose"]["auc30"] == 100.0
    assert main(["eval", "--oracle", "--output", str(tmp_path / "r")]) == 2


def test_eval_command_scores_dense_depth_on_a_bag(sevenscenes, tmp_path, capsys):
    """`vlm3-train eval --bag B --dense 256` in oracle mode on real RGB-D frames: the completion beats
    linear interpolation of the same answers, and the answers themselves are exact."""
    from vlm3_train.cli import main

    bag = _write_sevenscenes_bag(sevenscenes, tmp_path / "kitchen", frames=3, step=16, registered=True)
    assert main(["eval", "--bag", str(bag), "--oracle", "--tasks", "depth", "--output", str(tmp_path / "r"),
                 "--dense", "256", "--quiet", "--no-plots"]) == 0
    dense = json.loads(capsys.readouterr().out)["dense"]
    assert dense["frames"] == 3 and dense["rounds"] == [166, 90] and dense["questions_per_frame"] == 256
    assert dense["sparse"]["delta1"] == 1.0 and dense["sparse"]["abs_rel"] < 0.005
    assert dense["dense"]["coverage"] == 1.0 and dense["dense"]["delta1"] >= 0.97
    assert dense["dense"]["delta1"] > dense["linear"]["delta1"] and dense["dense"]["abs_rel"] < dense["linear"]["abs_rel"]
    assert dense["confident"]["coverage"] < 1.0
    assert dense["confident"]["delta1"] / dense["confident"]["coverage"] > dense["dense"]["delta1"]
    written = json.loads((tmp_path / "r" / "report.json").read_text())
    assert written["dense"] == dense
    assert main(["eval", "--bag", str(bag), "--oracle", "--output", str(tmp_path / "r2"), "--dense", "256",
                 "--dense-share", "1.5", "--quiet"]) == 2
    assert "share" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--oracle", "--output", str(tmp_path / "r3"), "--dense", "64"]) == 2
