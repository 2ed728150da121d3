"""Dense depth measured against a reference depth image, one frame at a time.

For a frame with a full reference depth (an RGB-D camera, a 7-Scenes frame) this asks the depth
questions of :meth:`vlm3_ros.pipeline.DepthEstimator.estimate_dense` (a grid, then optionally an
adaptive second round) and scores, over the reference's valid pixels:

* ``dense``: the image-guided completion (:func:`vlm3_ros.completion.complete_depth`);
* ``linear``: plain linear interpolation of the very same answers
  (:func:`vlm3_ros.completion.interpolate_linear`), the baseline;
* ``confident``: the completion where its confidence reaches ``min_confidence`` (the pixels a
  ``depth/dense`` image keeps; the rest is NaN there), with its ``coverage``;
* ``sparse``: the answers themselves at their pixels (what the model gives without completion).

delta1 counts a pixel without a value as wrong (as an unparseable answer); AbsRel is over the
pixels with a value. :class:`DenseTally` adds frames up (pixel-weighted) for reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import geometry
from .camera import Intrinsics
from .completion import AdaptiveConfig, CompletionConfig, interpolate_linear
from .pipeline import DenseResult, DepthEstimator, dense_rounds, query_grid

__all__ = ["DenseFrame", "DenseTally", "evaluate_dense_frame"]

KINDS = ("dense", "linear", "confident", "sparse")


@dataclass
class DenseFrame:
    """Scores of one frame: per kind, (sum of per-pixel ratios < 1.25, sum of |pred - gt| / gt,
    pixels with a value, pixels scored)."""

    sums: dict[str, tuple[float, float, int, int]]
    questions: int
    seconds: float
    result: DenseResult
    linear: np.ndarray

    def metrics(self, kind: str) -> dict[str, float]:
        good, rel, valued, total = self.sums[kind]
        return {"delta1": good / max(total, 1), "abs_rel": rel / valued if valued else float("nan"),
                "coverage": valued / max(total, 1)}


def _sums(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, int, int]:
    ok = np.isfinite(pred) & (pred > 0)
    ratio = np.maximum(pred[ok] / gt[ok], gt[ok] / pred[ok])
    return float(np.sum(ratio < 1.25)), float(np.sum(np.abs(pred[ok] - gt[ok]) / gt[ok])), int(ok.sum()), int(gt.size)


def evaluate_dense_frame(
    estimator: DepthEstimator,
    image: Any,
    intrinsics: Intrinsics,
    reference: np.ndarray,
    total: int,
    *,
    share: float = 0.35,
    margin: float = 0.02,
    min_confidence: float = 0.5,
    oracle: bool = False,
    completion: CompletionConfig | None = None,
    adaptive: AdaptiveConfig | None = None,
) -> DenseFrame:
    """Ask ``total`` questions about ``image`` (a grid inside ``margin``, then ``share`` of them
    adaptively) and score the completion, linear interpolation and the answers against
    ``reference`` (metres along z, NaN or 0 where unknown; the image's size). With ``oracle`` the
    reference is handed to the backend as the ground truth it answers from."""
    reference = np.asarray(reference, dtype=np.float64)
    height, width = reference.shape
    first, second = dense_rounds(total, share)
    uv = query_grid(width, height, first, margin)
    adaptive = adaptive or AdaptiveConfig(margin=margin)
    t0 = time.perf_counter()
    result = estimator.estimate_dense(image, intrinsics, uv, second_round=max(0, total - len(uv)) if second else 0,
                                      reference_depth=reference if oracle else None, completion=completion,
                                      adaptive=adaptive)
    seconds = time.perf_counter() - t0
    sparse = result.sparse
    linear = interpolate_linear(sparse.uv[sparse.valid], sparse.z[sparse.valid], width, height)
    valid = np.isfinite(reference) & (reference > 0)
    gt = reference[valid]
    sums = {
        "dense": _sums(result.dense.depth[valid].astype(np.float64), gt),
        "linear": _sums(linear[valid].astype(np.float64), gt),
        "confident": _sums(result.dense.masked(min_confidence)[valid].astype(np.float64), gt),
    }
    # The answers against the reference at the pixels they refer to (an answer without a reference
    # value there is not scored; an unparseable one counts as wrong).
    at = geometry.sample_nearest(reference, np.nan_to_num(sparse.uv, nan=-1.0))
    scored = np.isfinite(at) & (at > 0)
    sums["sparse"] = _sums(np.where(sparse.valid, sparse.z, np.nan)[scored], at[scored])
    return DenseFrame(sums=sums, questions=len(sparse.uv), seconds=seconds, result=result, linear=linear)


@dataclass
class DenseTally:
    """Frames added up: pixel-weighted delta1, AbsRel and coverage per kind."""

    sums: dict[str, list[float]] = field(default_factory=lambda: {k: [0.0, 0.0, 0, 0] for k in KINDS})
    frames: int = 0
    questions: int = 0
    seconds: float = 0.0

    def add(self, frame: DenseFrame) -> None:
        for kind in KINDS:
            for i, value in enumerate(frame.sums[kind]):
                self.sums[kind][i] += value
        self.frames += 1
        self.questions += frame.questions
        self.seconds += frame.seconds

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"frames": self.frames, "questions_per_frame": self.questions / max(self.frames, 1),
                               "seconds_per_frame": self.seconds / max(self.frames, 1)}
        for kind in KINDS:
            good, rel, valued, total = self.sums[kind]
            out[kind] = {"delta1": good / total if total else None,
                         "abs_rel": rel / valued if valued else None,
                         "coverage": valued / total if total else None}
        return out

