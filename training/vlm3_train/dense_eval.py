"""Dense depth of a checkpoint (or the oracle) on recorded RGB-D bags.

For each frame of a bag that has a full depth image (an RGB-D camera's aligned depth), the frame is
asked ``points`` depth questions as the depth node asks them (a grid, then a ``share`` of them in an
adaptive second round about the same image), the answers are completed into dense depth and
scored against the frame's depth image: the completion, linear interpolation of the same answers,
the completion's confident pixels and the answers themselves
(:mod:`vlm3_ros.dense_eval`). With the oracle the answers come from that depth image (their only
error is the protocol's rounding), so the scores measure the completion alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from vlm3_ros.bags import iter_rgbd_frames
from vlm3_ros.dense_eval import DenseTally, evaluate_dense_frame
from vlm3_ros.engine.base import Backend
from vlm3_ros.pipeline import DepthEstimator, dense_rounds

__all__ = ["DenseOptions", "evaluate_dense_bags"]


@dataclass(frozen=True)
class DenseOptions:
    """What :func:`evaluate_dense_bags` asks: ``points`` questions per frame, ``share`` of them in
    the second round, every ``frame_stride``-th frame (at most ``max_frames`` per bag, 0: all),
    ``min_confidence`` for the confident pixels, ``margin`` of the questions."""

    points: int = 256
    share: float = 0.35
    frame_stride: int = 1
    max_frames: int = 0
    min_confidence: float = 0.5
    margin: float = 0.02
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        dense_rounds(self.points, self.share)  # raises ValueError naming the problem
        if self.frame_stride < 1 or self.max_frames < 0:
            raise ValueError(f"frame_stride must be >= 1 and max_frames >= 0, got {self.frame_stride}, {self.max_frames}")
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")


def evaluate_dense_bags(backend: Backend, bags: Sequence[str | os.PathLike[str]], options: DenseOptions, *,
                        oracle: bool = False, topics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Dense depth scores over the bags' RGB-D frames (pixel-weighted over all frames)."""
    estimator = DepthEstimator(backend, max_new_tokens=options.max_new_tokens)
    tally = DenseTally()
    skipped = 0
    for bag in bags:
        used = 0
        for index, frame in enumerate(iter_rgbd_frames(bag, topics)):
            if index % options.frame_stride or (options.max_frames and used >= options.max_frames):
                continue
            if frame.depth_m is None:
                skipped += 1
                continue
            tally.add(evaluate_dense_frame(estimator, frame.rgb, frame.intrinsics, frame.depth_m, options.points,
                                           share=options.share, margin=options.margin,
                                           min_confidence=options.min_confidence, oracle=oracle))
            used += 1
    if tally.frames == 0:
        raise ValueError("no frame with a depth image to measure dense depth on (the bags need a depth topic)")
    first, second = dense_rounds(options.points, options.share)
    return {"points": options.points, "rounds": [first, second], "min_confidence": options.min_confidence,
            "frames_without_depth": skipped, **tally.report()}
