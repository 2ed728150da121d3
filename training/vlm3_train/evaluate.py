"""Evaluating a checkpoint (or the ground-truth oracle) on VLM3 datasets or rosbag2 recordings.

Every sample of a dataset (``DATASET.md``) is asked as one request through a backend of
:mod:`vlm3_ros.engine` (for a checkpoint: the transformers backend's shared-prefix path, all of a
sample's questions decoded together over one image prefix), the answers are parsed with the
task's parser, and the metrics of :mod:`vlm3_ros.metrics` are computed with the conventions of
``DESIGN.md``:

* depth: delta1 (an unparseable answer counts as wrong) and AbsRel (over parsed answers);
* correspondence: EPE in the task's normalised units and in prepared-image pixels;
* pose: rotation and (folded) translation-direction errors, AUC@30 (and @5, @15); an unparseable
  pair counts as a failure;
* object: SpatialRGPT-style success rate (within 25 %) and absolute relative error of the
  quantitative answers per question type, accuracy of the qualitative ones
  (:mod:`vlm3_train.object_eval`); an unparseable answer fails;
* trajectory: consecutive pose pairs of a recording (pairs ``(i, i + gap)`` chained
  ``i -> i + gap -> i + 2 gap ...``) are composed into a trajectory and compared with the chained
  ground truth: ATE after SE(3) alignment (:func:`vlm3_ros.metrics.ate`), ATE from the common
  start without alignment, and RPE.

Each task's report holds its baselines, what a predictor that ignores the images scores on the same
samples: correspondence against the identity (pixel 2 = pixel 1), pose and trajectory against zero
motion (and, given a training set's mean direction, a constant direction), depth against constants
from a training set (:func:`training_constants`). :func:`baseline_comparison` lines them up.

Bags are first converted with :func:`vlm3_train.convert.convert_bags` using the backend's own
task specs (so the images are prepared as the model expects), with consecutive pose pairs.

The oracle answers from each sample's own targets (a sparse depth map holding exactly the labelled
pixels, a sparse flow field, the relative pose), so an oracle evaluation checks the whole
question -> answer text -> parse -> metric path: it must score (near) perfectly.

Outputs: ``report.json`` and PNG plots (error histograms, trajectory top views) in a directory.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlm3_ros import metrics, protocol
from vlm3_ros.engine.base import Backend, GroundTruth, Request
from vlm3_ros.paths import write_atomic, write_json_atomic
from vlm3_ros.protocol import AnswerParseError, ProtocolError, TaskSpec

from .dataset import spec_differences
from .object_eval import ObjectAnswers, object_report

__all__ = [
    "EvalError",
    "TaskResults",
    "baseline_comparison",
    "evaluate_bags",
    "evaluate_datasets",
    "ground_truth_of",
    "chain_trajectories",
    "training_constants",
    "write_plots",
]

REPORT_NAME = "report.json"
MAX_EXAMPLES = 10
DEFAULT_MAX_NEW_TOKENS = {"depth": 64, "correspondence": 48, "pose": 64}


class EvalError(ValueError):
    """Invalid evaluation input (no data, task specs that do not match the model, bad options)."""


# ------------------------------------------------------------------------------------------------
# Collected results
# ------------------------------------------------------------------------------------------------


@dataclass
class TaskResults:
    """Predictions and ground truth collected over the samples, per task."""

    depth_pred: list[float | None] = field(default_factory=list)
    depth_gt: list[float] = field(default_factory=list)
    corr_pred: list[tuple[float, float] | None] = field(default_factory=list)
    corr_gt: list[tuple[float, float]] = field(default_factory=list)
    corr_pred_px: list[tuple[float, float] | None] = field(default_factory=list)
    corr_gt_px: list[tuple[float, float]] = field(default_factory=list)
    corr_px1: list[tuple[float, float]] = field(default_factory=list)  # the question's pixel in image 1
    pose_pred: list[np.ndarray | None] = field(default_factory=list)  # 4x4; NaN translation when no distance
    pose_dir: list[np.ndarray | None] = field(default_factory=list)  # unit translation direction
    pose_gt: list[np.ndarray] = field(default_factory=list)
    pose_keys: list[tuple[str, int, int]] = field(default_factory=list)  # (source, frame1, frame2)
    objects: ObjectAnswers = field(default_factory=ObjectAnswers)
    unparseable: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    answered: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))
    samples: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    generated_tokens: int = 0
    seconds: float = 0.0

    def _bad(self, task: str, question: str, answer: str, error: str) -> None:
        self.unparseable[task] += 1
        if len(self.examples[task]) < MAX_EXAMPLES:
            self.examples[task].append({"question": question[:200], "answer": answer[:300], "error": error[:300]})


def _json_loads(text: Any, what: str) -> dict[str, Any]:
    if isinstance(text, dict):
        return text
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise EvalError(f"sample {what} is not valid JSON: {exc}") from None


def ground_truth_of(task: str, targets: Mapping[str, Any], meta: Mapping[str, Any],
                    images: Sequence[np.ndarray]) -> GroundTruth:
    """Reference geometry for the oracle, from a sample's targets (only the labelled pixels are known)."""
    h, w = images[0].shape[:2]
    K = np.asarray(meta["K"][0], dtype=float) if meta.get("K") else None
    if task == "depth":
        if K is None:
            raise EvalError("depth samples need meta.K for the oracle")
        depth = np.full((h, w), np.nan, dtype=np.float64)
        pixels = np.asarray(targets["pixels"], dtype=float).reshape(-1, 2)
        values = np.asarray(targets["values"], dtype=float)
        if targets.get("kind", "ray") == "ray":
            rays = np.linalg.solve(K, np.stack([pixels[:, 0], pixels[:, 1], np.ones(len(pixels))]))
            values = values / np.linalg.norm(rays, axis=0)
        cols, rows = np.round(pixels[:, 0]).astype(int), np.round(pixels[:, 1]).astype(int)
        ok = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        depth[rows[ok], cols[ok]] = values[ok]
        return GroundTruth(depth=depth, K=K)
    if task == "correspondence":
        flow = np.full((h, w, 2), np.nan, dtype=np.float64)
        p1 = np.asarray(targets["pixels1"], dtype=float).reshape(-1, 2)
        p2 = np.asarray(targets["pixels2"], dtype=float).reshape(-1, 2)
        cols, rows = np.round(p1[:, 0]).astype(int), np.round(p1[:, 1]).astype(int)
        ok = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        flow[rows[ok], cols[ok]] = p2[ok]
        h2, w2 = images[1].shape[:2]
        return GroundTruth(flow=flow, K=K, size2=(w2, h2))
    if task == "pose":
        return GroundTruth(pose=np.asarray(targets["T"], dtype=float))
    if task == "object":
        from .convert.object_targets import object_ground_truth

        return object_ground_truth(dict(targets))
    raise EvalError(f"no evaluation for task {task!r}")


def _record(results: TaskResults, task: str, spec: TaskSpec, questions: Sequence[str], answers: Sequence[str],
            targets: Mapping[str, Any], meta: Mapping[str, Any], images: Sequence[np.ndarray]) -> None:
    results.samples[task] += 1
    results.answered[task] += len(answers)
    if task == "depth":
        for question, answer, gt in zip(questions, answers, targets["values"]):
            try:
                value: float | None = protocol.parse_depth_answer(answer, spec)
            except AnswerParseError as exc:
                value = None
                results._bad(task, question, answer, str(exc))
            results.depth_pred.append(value)
            results.depth_gt.append(float(gt))
    elif task == "correspondence":
        h2, w2 = images[1].shape[:2]
        scale = float(spec.coord_scale or 1000)
        for question, answer, gt, gt_px in zip(questions, answers, targets["points"], targets["pixels2"]):
            try:
                x, y = protocol.parse_correspondence_answer(answer, spec)
                pred: tuple[float, float] | None = (x, y)
                pred_px: tuple[float, float] | None = (x / scale * w2, y / scale * h2)
            except AnswerParseError as exc:
                pred = pred_px = None
                results._bad(task, question, answer, str(exc))
            results.corr_pred.append(pred)
            results.corr_pred_px.append(pred_px)
            results.corr_gt.append((float(gt[0]), float(gt[1])))
            results.corr_gt_px.append((float(gt_px[0]), float(gt_px[1])))
        for px1 in targets.get("pixels1") or [(math.nan, math.nan)] * len(answers):
            results.corr_px1.append((float(px1[0]), float(px1[1])))
    elif task == "pose":
        ids = list(targets.get("question_ids") or [])
        if len(ids) != len(answers):
            ids = [spec.parse_question(q)[0] for q in questions]
        try:
            rel = protocol.parse_pose_answers(dict(zip(ids, answers)), spec)
            T = np.eye(4)
            T[:3, :3] = rel.R
            T[:3, 3] = rel.direction * rel.distance if rel.distance is not None else np.nan
            results.pose_pred.append(T)
            results.pose_dir.append(np.asarray(rel.direction, dtype=float))
        except (AnswerParseError, ProtocolError) as exc:
            results.pose_pred.append(None)
            results.pose_dir.append(None)
            results._bad(task, " | ".join(q[:40] for q in questions), " | ".join(answers), str(exc))
        results.pose_gt.append(np.asarray(targets["T"], dtype=float))
        frames = meta.get("frames") or [None, None]
        stamps = meta.get("stamps_ns") or [None, None]
        key1 = frames[0] if frames[0] is not None else stamps[0]
        key2 = frames[1] if len(frames) > 1 and frames[1] is not None else stamps[1]
        results.pose_keys.append((str(meta.get("source", "")), int(key1) if key1 is not None else -1,
                                  int(key2) if key2 is not None else -1))
    elif task == "object":
        results.objects.record(spec, questions, answers, targets, results._bad)
    else:
        raise EvalError(f"no evaluation for task {task!r}")


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _depth_report(r: TaskResults, constants: Mapping[str, Any]) -> dict[str, Any]:
    m = metrics.depth_metrics(r.depth_pred, r.depth_gt)
    report = {
        "delta1": m["delta1"],
        "abs_rel": _finite_or_none(m["abs_rel"]),
        "num_points": m["num_points"],
        "num_parsed": m["num_valid"],
        "num_unparseable": r.unparseable.get("depth", 0),
        "num_invalid": m["num_invalid"],
        "samples": r.samples.get("depth", 0),
    }
    baselines = {}
    gt = np.asarray(r.depth_gt)
    for metric in ("delta1", "abs_rel"):
        value = constants.get(f"depth_{metric}")
        if value is not None:
            baselines[f"constant_{metric}"] = {"value_m": float(value),
                                               metric: metrics.depth_metrics(np.full(gt.shape, float(value)), gt)[metric]}
    if baselines:
        report["baselines"] = baselines
    return report


def _corr_report(r: TaskResults) -> dict[str, Any]:
    norm = metrics.correspondence_metrics(r.corr_pred, np.asarray(r.corr_gt), thresholds=(5.0, 10.0, 20.0))
    px = metrics.correspondence_metrics(r.corr_pred_px, np.asarray(r.corr_gt_px), thresholds=(1.0, 3.0, 5.0))
    report = {
        "epe": _finite_or_none(norm["epe"]),
        "epe_px": _finite_or_none(px["epe"]),
        "within_norm": {k: v for k, v in norm.items() if k.startswith("within_")},
        "within_px": {k: v for k, v in px.items() if k.startswith("within_")},
        "num_points": norm["num_points"],
        "num_parsed": norm["num_valid"],
        "num_unparseable": r.unparseable.get("correspondence", 0),
        "samples": r.samples.get("correspondence", 0),
    }
    identity = np.asarray(r.corr_px1, dtype=float).reshape(-1, 2)
    if len(identity) == len(r.corr_gt_px) and np.isfinite(identity).all():
        report["baselines"] = {"identity": {"epe_px": metrics.epe(identity, np.asarray(r.corr_gt_px))}}
    return report


def _pose_arrays(r: TaskResults) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = len(r.pose_gt)
    R_pred = np.full((n, 3, 3), np.nan)
    t_pred = np.full((n, 3), np.nan)
    for i, (T, direction) in enumerate(zip(r.pose_pred, r.pose_dir)):
        if T is not None and direction is not None:
            R_pred[i] = T[:3, :3]
            t_pred[i] = direction
    gt = np.stack(r.pose_gt)
    return R_pred, t_pred, gt[:, :3, :3], gt[:, :3, 3]


def _pose_scores(rot: np.ndarray, trans: np.ndarray) -> dict[str, Any]:
    def stats(e: np.ndarray) -> dict[str, float | None]:
        ok = np.isfinite(e)
        return {"median": _finite_or_none(np.median(e[ok])) if ok.any() else None,
                "mean": _finite_or_none(np.mean(e[ok])) if ok.any() else None}

    return {"auc30": metrics.auc_percent(rot, 30, trans_err_deg=trans), "rotation_error_deg": stats(rot),
            "translation_error_deg": stats(trans)}


def _pose_baselines(R_gt: np.ndarray, t_gt: np.ndarray, constants: Mapping[str, Any]) -> dict[str, Any]:
    """Zero motion (identity rotation, no translation: its direction error is the worst, 90
    degrees) and, given one, a constant direction (identity rotation)."""
    n = len(R_gt)
    eye = np.broadcast_to(np.eye(3), (n, 3, 3))
    rot, trans = metrics.relative_pose_errors(eye, np.zeros((n, 3)), R_gt, t_gt)
    out = {"zero_motion": _pose_scores(np.atleast_1d(rot), np.atleast_1d(trans))}
    direction = constants.get("direction")
    if direction is not None:
        rot, trans = metrics.relative_pose_errors(eye, np.broadcast_to(np.asarray(direction, float), (n, 3)), R_gt, t_gt)
        out["constant_direction"] = {"direction": [float(v) for v in direction],
                                     **_pose_scores(np.atleast_1d(rot), np.atleast_1d(trans))}
    return out


def _pose_report(r: TaskResults, constants: Mapping[str, Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    R_pred, t_pred, R_gt, t_gt = _pose_arrays(r)
    rot, trans = metrics.relative_pose_errors(R_pred, t_pred, R_gt, t_gt)
    rot, trans = np.atleast_1d(rot), np.atleast_1d(trans)
    pair = np.maximum(rot, trans)
    dist_err = []
    for T, G in zip(r.pose_pred, r.pose_gt):
        if T is not None and np.all(np.isfinite(T[:3, 3])):
            dist_err.append(abs(float(np.linalg.norm(T[:3, 3])) - float(np.linalg.norm(G[:3, 3]))))
    finite = np.isfinite(pair)
    report = {
        **_pose_scores(rot, trans),
        "auc15": metrics.auc_percent(rot, 15, trans_err_deg=trans),
        "auc5": metrics.auc_percent(rot, 5, trans_err_deg=trans),
        "distance_error_m": {"median": float(np.median(dist_err)) if dist_err else None,
                             "mean": float(np.mean(dist_err)) if dist_err else None},
        "num_pairs": int(len(pair)),
        "num_parsed": int(finite.sum()),
        "num_unparseable": r.unparseable.get("pose", 0),
        "baselines": _pose_baselines(R_gt, t_gt, constants),
    }
    return report, rot, trans


def chain_trajectories(keys: Sequence[tuple[str, int, int]], pred: Sequence[np.ndarray | None],
                       gt: Sequence[np.ndarray], min_length: int = 3) -> list[dict[str, Any]]:
    """Chain relative poses ``(source, i, j)`` with ``j - i = gap`` into trajectories.

    For every source and gap, the pairs ``i -> i + gap -> i + 2 gap ...`` that link up are
    composed (camera-to-first-camera poses ``T_0_k``). A pair whose prediction is missing or has
    no distance breaks the chain there. Chains with fewer than ``min_length`` poses are dropped.
    Returns one dict per chain: ``source``, ``gap``, ``frames``, ``pred`` (N, 4, 4), ``gt`` (N, 4, 4).
    """
    by_group: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)
    for index, (source, a, b) in enumerate(keys):
        if a < 0 or b <= a:
            continue
        by_group[(source, b - a)][a] = index
    chains = []
    for (source, gap), starts in sorted(by_group.items()):
        used: set[int] = set()
        for first in sorted(starts):
            if first in used:
                continue
            frames = [first]
            poses_p, poses_g = [np.eye(4)], [np.eye(4)]
            current = first
            while current in starts:
                idx = starts[current]
                used.add(current)
                T = pred[idx]
                if T is None or not np.all(np.isfinite(T)):
                    break
                poses_p.append(poses_p[-1] @ T)
                poses_g.append(poses_g[-1] @ gt[idx])
                current += gap
                frames.append(current)
            if len(frames) >= min_length:
                chains.append({"source": source, "gap": gap, "frames": frames,
                               "pred": np.stack(poses_p), "gt": np.stack(poses_g)})
    return chains


def _trajectory_report(chains: list[dict[str, Any]]) -> dict[str, Any]:
    """ATE (SE(3)-aligned, and from the common start without alignment), RPE, and the zero-motion
    trajectory's ATE from the common start (the camera never moves: the truth's distance from
    its first position)."""
    per_chain = []
    for c in chains:
        a = metrics.ate(c["pred"], c["gt"], align="se3")
        start = metrics.ate(c["pred"], c["gt"], align="none")
        still = metrics.ate(np.broadcast_to(np.eye(4), c["gt"].shape), c["gt"], align="none")
        r = metrics.rpe(c["pred"], c["gt"], delta=1)
        c["alignment"] = a["alignment"]
        per_chain.append({
            "source": c["source"], "gap": c["gap"], "first_frame": c["frames"][0], "num_poses": len(c["frames"]),
            "ate_rmse_m": a["rmse"], "ate_mean_m": a["mean"], "ate_from_start_m": start["rmse"],
            "zero_motion_ate_from_start_m": still["rmse"], "rpe_trans_rmse_m": r["trans_rmse"],
            "rpe_rot_rmse_deg": r["rot_rmse_deg"],
            "path_length_m": float(np.sum(np.linalg.norm(np.diff(c["gt"][:, :3, 3], axis=0), axis=1))),
        })
    if not per_chain:
        return {"num_trajectories": 0}
    weights = np.array([p["num_poses"] for p in per_chain], dtype=float)

    def rms(key: str) -> float:
        return float(np.sqrt(np.sum(weights * np.array([p[key] for p in per_chain]) ** 2) / weights.sum()))

    return {
        "num_trajectories": len(per_chain),
        "ate_rmse_m": rms("ate_rmse_m"),
        "ate_from_start_m": rms("ate_from_start_m"),
        "rpe_trans_rmse_m": rms("rpe_trans_rmse_m"),
        "rpe_rot_rmse_deg": rms("rpe_rot_rmse_deg"),
        "baselines": {"zero_motion": {"ate_from_start_m": rms("zero_motion_ate_from_start_m")}},
        "trajectories": per_chain,
    }


def training_constants(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a predictor that ignores the images would answer, fitted on a training dataset's targets:
    the constant depth with the best delta1 and the one with the best AbsRel (searched over the
    training values' percentiles), and the mean unit translation direction of its pose pairs."""
    ds, _ = _open(Path(path))
    depths, directions = [], []
    for task, text in zip(ds.data.column("task").to_pylist(), ds.data.column("targets").to_pylist()):
        targets = _json_loads(text, "targets")
        if task == "depth":
            depths.extend(float(v) for v in targets["values"])
        elif task == "pose":
            t = np.asarray(targets["T"], dtype=float)[:3, 3]
            if np.linalg.norm(t) > 0:
                directions.append(t / np.linalg.norm(t))
    out: dict[str, Any] = {}
    if depths:
        values = np.asarray(depths)
        candidates = np.unique(np.percentile(values, np.linspace(1, 99, 197)))
        best_delta1 = max(candidates, key=lambda c: metrics.delta1(np.full(values.shape, c), values))
        best_abs_rel = min(candidates, key=lambda c: float(np.mean(np.abs(c - values) / values)))
        out.update(depth_delta1=float(best_delta1), depth_abs_rel=float(best_abs_rel))
    if directions:
        mean = np.mean(directions, axis=0)
        if np.linalg.norm(mean) > 1e-9:
            out["direction"] = (mean / np.linalg.norm(mean)).tolist()
    return out


#: (report section, metric key path, baseline key path, lower is better) of :func:`baseline_comparison`.
_COMPARISONS = (
    ("depth", ("delta1",), ("baselines", "constant_delta1", "delta1"), False),
    ("depth", ("abs_rel",), ("baselines", "constant_abs_rel", "abs_rel"), True),
    ("correspondence", ("epe_px",), ("baselines", "identity", "epe_px"), True),
    ("pose", ("auc30",), ("baselines", "zero_motion", "auc30"), False),
    ("pose", ("auc30",), ("baselines", "constant_direction", "auc30"), False),
    ("pose", ("rotation_error_deg", "median"), ("baselines", "zero_motion", "rotation_error_deg", "median"), True),
    ("pose", ("translation_error_deg", "median"), ("baselines", "constant_direction", "translation_error_deg", "median"),
     True),
    ("trajectory", ("ate_from_start_m",), ("baselines", "zero_motion", "ate_from_start_m"), True),
)


def baseline_comparison(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each metric of a report next to its baseline: ``task``, ``metric``, ``model``, ``baseline``
    (the baseline's name), ``baseline_value``, ``lower_is_better`` and ``beats`` (strictly better;
    False when the model's value is missing)."""

    def get(node: Any, path: Sequence[str]) -> Any:
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        return node

    rows = []
    for section, metric_path, baseline_path, lower in _COMPARISONS:
        part = report.get(section)
        baseline = get(part, baseline_path)
        if part is None or baseline is None:
            continue
        model = get(part, metric_path)
        beats = model is not None and (model < baseline if lower else model > baseline)
        rows.append({"task": section, "metric": ".".join(metric_path), "model": model,
                     "baseline": baseline_path[1], "baseline_value": baseline, "lower_is_better": lower,
                     "beats": bool(beats)})
    return rows


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------


def write_plots(out: Path, results: TaskResults, rot: np.ndarray | None, trans: np.ndarray | None,
                chains: list[dict[str, Any]]) -> list[str]:
    """Error histograms and trajectory top views as PNG files in ``out``; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        write_atomic(out / name, png.getvalue())
        written.append(name)

    if results.depth_gt:
        pred = metrics.as_predictions(results.depth_pred)
        gt = np.asarray(results.depth_gt)
        ok = np.isfinite(pred) & (pred > 0)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        if ok.any():
            ratio = np.log2(pred[ok] / gt[ok])
            axes[0].hist(np.clip(ratio, -3, 3), bins=60, color="tab:blue")
            for x in (np.log2(1.25), -np.log2(1.25)):
                axes[0].axvline(x, color="k", ls="--", lw=1)
            axes[1].scatter(gt[ok], pred[ok], s=4, alpha=0.5)
            hi = float(max(gt.max(), pred[ok].max()))
            axes[1].plot([0, hi], [0, hi], "k--", lw=1)
        axes[0].set_xlabel("log2(pred / gt)  (dashed: delta1 bounds)")
        axes[0].set_ylabel("points")
        axes[0].set_title(f"depth: {int(ok.sum())} parsed, {int((~ok).sum())} unparseable")
        axes[1].set_xlabel("ground truth (m)")
        axes[1].set_ylabel("prediction (m)")
        save(fig, "depth_errors.png")
    if results.corr_gt:
        pred = np.array([p if p is not None else (np.nan, np.nan) for p in results.corr_pred_px], dtype=float)
        err = np.linalg.norm(pred - np.asarray(results.corr_gt_px), axis=1)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(err[np.isfinite(err)], bins=60, color="tab:green")
        ax.set_xlabel("end-point error (prepared-image pixels)")
        ax.set_ylabel("points")
        ax.set_title(f"correspondence: {int(np.isfinite(err).sum())} parsed")
        save(fig, "correspondence_errors.png")
    if rot is not None and trans is not None and rot.size:
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = np.linspace(0, 30, 61)
        ax.hist(np.clip(rot[np.isfinite(rot)], 0, 30), bins=bins, alpha=0.6, label="rotation")
        ax.hist(np.clip(trans[np.isfinite(trans)], 0, 30), bins=bins, alpha=0.6, label="translation direction")
        ax.set_xlabel("error (degrees, clipped at 30)")
        ax.set_ylabel("pairs")
        ax.legend()
        ax.set_title("relative pose errors")
        save(fig, "pose_errors.png")
    for k, c in enumerate(chains):
        A = c.get("alignment", np.eye(4))
        p = c["pred"][:, :3, 3] @ A[:3, :3].T + A[:3, 3]
        g = c["gt"][:, :3, 3]
        fig, ax = plt.subplots(figsize=(5, 5))
        # Top view in the first camera's frame: x (right) against z (forward).
        ax.plot(g[:, 0], g[:, 2], "k.-", lw=1, ms=3, label="ground truth")
        ax.plot(p[:, 0], p[:, 2], "r.-", lw=1, ms=3, label="chained prediction (aligned)")
        ax.set_xlabel("x (m, right)")
        ax.set_ylabel("z (m, forward)")
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend()
        ax.set_title(f"{Path(c['source']).name or 'trajectory'} gap {c['gap']} from frame {c['frames'][0]}")
        save(fig, f"trajectory_{k:02d}.png")
    return written


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def _open(path: Path):
    from .dataset import DatasetFormatError, open_dataset

    try:
        return open_dataset(path, required=("task", "images", "questions", "answers", "targets", "meta"))
    except DatasetFormatError as exc:
        raise EvalError(str(exc)) from None


def _check_spec(backend: Backend, oracle: bool, spec: TaskSpec) -> TaskSpec:
    if oracle:
        return spec
    try:
        served = backend.spec(spec.name)
    except Exception:
        raise EvalError(f"the model does not serve task {spec.name!r} (it serves {sorted(backend.specs)})") from None
    differ = spec_differences(spec, served)
    if differ:
        raise EvalError(
            f"task {spec.name!r}: the dataset was prepared with other specs than the model's ({', '.join(differ)} differ); "
            "convert the data with the model's protocol file (or evaluate its bags with --bag)"
        )
    return served


def _selected_rows(ds, split: str, tasks: Sequence[str] | None, max_samples: int | None, seed: int) -> list[int]:
    task_col = list(ds.data.column("task").to_pylist())
    meta_col = list(ds.data.column("meta").to_pylist()) if "meta" in ds.column_names else [None] * len(task_col)
    splits = [(_json_loads(m, "meta").get("split", "train") if m else "train") for m in meta_col]
    if split == "auto":
        split = "val" if "val" in splits else "all"
    rows = [i for i, (t, s) in enumerate(zip(task_col, splits)) if (split == "all" or s == split) and (not tasks or t in tasks)]
    if max_samples:
        by_task: dict[str, list[int]] = defaultdict(list)
        for i in rows:
            by_task[task_col[i]].append(i)
        rng = np.random.default_rng(seed)
        rows = sorted(i for t, idx in by_task.items()
                      for i in (idx if len(idx) <= max_samples else rng.choice(idx, max_samples, replace=False).tolist()))
    return rows


def evaluate_datasets(backend: Backend, paths: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str] | None, *,
                      oracle: bool = False, split: str = "auto", tasks: Sequence[str] | None = None,
                      max_samples: int | None = None, max_new_tokens: Mapping[str, int] | int | None = None,
                      plots: bool = True, progress: bool = True, seed: int = 0,
                      extra: Mapping[str, Any] | None = None,
                      constants: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``backend`` on dataset directories; write ``report.json`` (+ plots) into ``output``.

    Args:
        backend: a loaded backend (``load_backend("transformers", ...)`` or ``load_backend("oracle")``).
        oracle: answer from each sample's targets (ground truth given with every request).
        split: ``train``, ``val``, ``all`` or ``auto`` (``val`` where the dataset has such rows, else all).
        tasks: only these tasks (default: all in the data).
        max_samples: at most this many samples per task and dataset (seeded choice).
        max_new_tokens: per task (or one number); defaults to :data:`DEFAULT_MAX_NEW_TOKENS`.
        constants: a training set's constant predictors (:func:`training_constants`), reported
            as baselines beside the model.
    Returns:
        the report (also written as ``report.json``).
    """
    if not paths:
        raise EvalError("no datasets to evaluate")
    t0 = time.perf_counter()
    results = TaskResults()
    limits = dict(DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new_tokens, int):
        limits = {k: max_new_tokens for k in limits}
    elif max_new_tokens:
        limits.update(max_new_tokens)
    opened = []
    for path in paths:
        ds, specs = _open(Path(path))
        rows = _selected_rows(ds, split, tasks, max_samples, seed)
        opened.append((Path(path), ds, specs, rows))
    total = sum(len(rows) for *_, rows in opened)
    if total == 0:
        raise EvalError(f"no samples of split {split!r}" + (f" and task(s) {list(tasks)}" if tasks else "") + " to evaluate")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="evaluating", unit="sample")
    served: dict[tuple[int, str], TaskSpec] = {}
    for d, (path, ds, specs, rows) in enumerate(opened):
        for row in rows:
            record = ds[row]
            task = record["task"]
            if task not in specs:
                raise EvalError(f"{path} row {row}: task {task!r} has no spec in the dataset's protocol file")
            if (d, task) not in served:
                served[(d, task)] = _check_spec(backend, oracle, specs[task])
            spec = served[(d, task)]
            images = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in record["images"]]
            targets = _json_loads(record.get("targets"), "targets")
            meta = _json_loads(record.get("meta"), "meta")
            meta.setdefault("source", str(path))
            gt = ground_truth_of(task, targets, meta, images) if oracle else None
            response = backend.answer(Request(images=images, questions=list(record["questions"]), spec=spec,
                                              max_new_tokens=limits.get(task, 128), ground_truth=gt))
            results.generated_tokens += int(sum(response.generated_tokens))
            _record(results, task, specs[task], list(record["questions"]), response.answers, targets, meta, images)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    results.seconds = time.perf_counter() - t0

    report: dict[str, Any] = {
        "backend": backend.describe(),
        "datasets": [str(p) for p, *_ in opened],
        "split": split,
        "samples": dict(results.samples),
        "questions": dict(results.answered),
        "seconds": round(results.seconds, 3),
        "generated_tokens": results.generated_tokens,
    }
    rot = trans = None
    chains: list[dict[str, Any]] = []
    constants = dict(constants or {})
    if results.depth_gt:
        report["depth"] = _depth_report(results, constants)
    if results.corr_gt:
        report["correspondence"] = _corr_report(results)
    if results.pose_gt:
        report["pose"], rot, trans = _pose_report(results, constants)
        chains = chain_trajectories(results.pose_keys, results.pose_pred, results.pose_gt)
        report["trajectory"] = _trajectory_report(chains)
    if len(results.objects):
        report["object"] = object_report(results.objects, results.samples.get("object", 0))
    report["unparseable_examples"] = {k: v for k, v in results.examples.items() if v}
    report["against_baselines"] = baseline_comparison(report)
    if extra:
        report.update(extra)
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        if plots:
            report["plots"] = write_plots(out, results, rot, trans, chains)
        _write_report(out / REPORT_NAME, report)
    return report


def _write_report(path: Path, report: Mapping[str, Any]) -> None:
    def default(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        return str(value)

    write_json_atomic(path, report, default=default)


def evaluate_bags(backend: Backend, bags: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str] | None, *,
                  oracle: bool = False, tasks: Sequence[str] | None = None, points_per_image: int = 10,
                  pose_gap: int = 1, correspondence_gap: int = 5, frame_stride: int = 1,
                  convert_options: Mapping[str, Any] | None = None, keep_dataset: str | os.PathLike[str] | None = None,
                  dense: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Convert bags with the backend's task specs (consecutive pose pairs ``pose_gap`` apart) and
    evaluate on every sample (split ``all``); other arguments as :func:`evaluate_datasets`.

    ``keep_dataset``: also keep the converted dataset at this path. ``dense``: a
    :class:`vlm3_train.dense_eval.DenseOptions` to also score dense depth against each frame's
    depth image (report section ``dense``).
    """
    from .convert import DEFAULT_TASKS, ConvertOptions, convert_bags

    if not bags:
        raise EvalError("no bags to evaluate")
    wanted = [t for t in (tasks or DEFAULT_TASKS) if t in backend.specs]
    if not wanted:
        raise EvalError(f"the backend serves none of the tasks {list(tasks or DEFAULT_TASKS)} (it serves {sorted(backend.specs)})")
    options = ConvertOptions(tasks=tuple(wanted), specs={t: backend.spec(t) for t in wanted},
                             points_per_image=points_per_image, points_per_pair=points_per_image,
                             pose_gaps=(pose_gap,), correspondence_gaps=(correspondence_gap,),
                             frame_stride=frame_stride, split="none", **dict(convert_options or {}))
    progress = kwargs.get("progress", True)
    with tempfile.TemporaryDirectory(prefix="vlm3-eval-") as tmp:
        target = Path(keep_dataset) if keep_dataset else Path(tmp) / "dataset"
        converted = convert_bags(bags, target, options, overwrite=bool(keep_dataset), progress=progress)
        kwargs.setdefault("split", "all")
        extra: dict[str, Any] = {"bags": [str(b) for b in bags], "conversion": converted.summary.get("samples")}
        if dense is not None:
            from .dense_eval import evaluate_dense_bags

            extra["dense"] = evaluate_dense_bags(backend, bags, dense, oracle=oracle,
                                                 topics=dict(convert_options or {}).get("topics"))
        return evaluate_datasets(backend, [converted.path], output, oracle=oracle, extra=extra, **kwargs)
