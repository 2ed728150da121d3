"""SpatialRGPT-style metrics of object answers (:data:`vlm3_ros.protocol.OBJECT_QUESTIONS`).

* quantitative questions (``kind == "quantity"``: width, height, distances): the **success rate**,
  the share of answers within ``tolerance`` (25 %) of the truth, ``|pred - gt| <= 0.25 gt``, and
  the **absolute relative error** ``mean |pred - gt| / gt`` over the parsed answers;
* qualitative questions (predicates and choices): the **accuracy**, the share answered right.

Both per question type (id) and pooled over all questions of the kind. An unparseable answer
(``None``) counts as a failure in the success rate and the accuracy and is left out of the
relative error (as SpatialRGPT-Bench, where an answer without a usable number fails). A
quantity whose truth is 0 has no relative error; it succeeds only when answered 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from .protocol import OBJECT_QUESTIONS, ProtocolError

__all__ = ["SUCCESS_TOLERANCE", "object_metrics"]

#: relative tolerance of a successful quantitative answer (SpatialRGPT-Bench: within 25 %)
SUCCESS_TOLERANCE = 0.25


def _quantity(pred: Sequence[float | None], gt: Sequence[float], tolerance: float) -> dict[str, Any]:
    gt_ = np.asarray(gt, dtype=float)
    p = np.array([np.nan if v is None else float(v) for v in pred], dtype=float)
    parsed = np.isfinite(p)
    positive = gt_ > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(p - gt_) / gt_
    success = parsed & np.where(positive, rel <= tolerance + 1e-12, p == gt_)
    used = parsed & positive
    return {"success_rate": float(success.mean()) if len(gt_) else None,
            "abs_rel": float(rel[used].mean()) if used.any() else None,
            "num": int(len(gt_)), "num_parsed": int(parsed.sum())}


def _quality(pred: Sequence[Any], gt: Sequence[Any]) -> dict[str, Any]:
    right = [p is not None and p == g for p, g in zip(pred, gt)]
    return {"accuracy": float(np.mean(right)) if right else None, "num": len(right),
            "num_parsed": int(sum(p is not None for p in pred))}


def object_metrics(question_ids: Sequence[str], predictions: Sequence[Any], truths: Sequence[Any],
                   tolerance: float = SUCCESS_TOLERANCE) -> dict[str, Any]:
    """Metrics of object answers: ``predictions[i]`` (metres, bool or region index; None when
    unparseable) against ``truths[i]`` for question ``question_ids[i]``.

    Returns ``{"quantitative": {"success_rate", "abs_rel", "num", "num_parsed", "per_type": {id:
    ...}}, "qualitative": {"accuracy", "num", "num_parsed", "per_type": {id: ...}}}``; a kind
    without questions has ``num`` 0 and None metrics.
    """
    if not len(question_ids) == len(predictions) == len(truths):
        raise ValueError(f"question_ids, predictions and truths differ in length: "
                         f"{len(question_ids)}, {len(predictions)}, {len(truths)}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
    groups: dict[str, dict[str, tuple[list, list]]] = {"quantity": defaultdict(lambda: ([], [])),
                                                       "quality": defaultdict(lambda: ([], []))}
    for qid, pred, gt in zip(question_ids, predictions, truths):
        if qid not in OBJECT_QUESTIONS:
            raise ProtocolError(f"unknown object question {qid!r}")
        kind = "quantity" if OBJECT_QUESTIONS[qid].kind == "quantity" else "quality"
        groups[kind][qid][0].append(pred)
        groups[kind][qid][1].append(gt)

    def pooled(kind: str) -> tuple[list, list]:
        preds = [p for qid in sorted(groups[kind]) for p in groups[kind][qid][0]]
        gts = [g for qid in sorted(groups[kind]) for g in groups[kind][qid][1]]
        return preds, gts

    quantitative = _quantity(*pooled("quantity"), tolerance)
    quantitative["per_type"] = {qid: _quantity(p, g, tolerance) for qid, (p, g) in sorted(groups["quantity"].items())}
    qualitative = _quality(*pooled("quality"))
    qualitative["per_type"] = {qid: _quality(p, g) for qid, (p, g) in sorted(groups["quality"].items())}
    return {"quantitative": {"tolerance": tolerance, **quantitative}, "qualitative": qualitative}
