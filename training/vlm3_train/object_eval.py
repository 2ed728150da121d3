"""Evaluation of the object task (part of :mod:`vlm3_train.evaluate`): each answer is read with
:func:`vlm3_ros.protocol.parse_object_answer` against the question's regions and scored with
:func:`vlm3_ros.metrics.object_metrics` (SpatialRGPT-Bench conventions: quantitative success rate
within 25 % and absolute relative error per question type, qualitative accuracy; an unparseable
answer fails)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from vlm3_ros import metrics, protocol
from vlm3_ros.protocol import AnswerParseError, ProtocolError, TaskSpec

__all__ = ["ObjectAnswers", "object_report"]


@dataclass
class ObjectAnswers:
    """The object answers collected over the samples."""

    question_ids: list[str] = field(default_factory=list)
    predictions: list[Any] = field(default_factory=list)
    truths: list[Any] = field(default_factory=list)

    def record(self, spec: TaskSpec, questions: Sequence[str], answers: Sequence[str], targets: Mapping[str, Any],
               bad: Callable[[str, str, str, str], None]) -> None:
        """Read one sample's answers; ``bad(task, question, answer, error)`` for each unreadable one."""
        ids = list(targets.get("question_ids") or [])
        regions = list(targets.get("regions") or [])
        if len(ids) != len(answers) or len(regions) != len(answers):
            parsed = [protocol.parse_object_question(q, spec) for q in questions]
            ids, regions = [p[0] for p in parsed], [p[1] for p in parsed]
        for question, answer, qid, region, truth in zip(questions, answers, ids, regions, targets["values"]):
            try:
                value = protocol.parse_object_answer(qid, answer, [tuple(r) for r in region], spec)
            except (AnswerParseError, ProtocolError) as exc:
                value = None
                bad("object", question, answer, str(exc))
            self.question_ids.append(qid)
            self.predictions.append(value)
            self.truths.append(truth)

    def __len__(self) -> int:
        return len(self.truths)


def _clean(stats: Mapping[str, float]) -> dict[str, Any]:
    return {k: (int(v) if k in ("count", "unparseable") else (float(v) if math.isfinite(v) else None))
            for k, v in stats.items()}


def object_report(answers: ObjectAnswers, samples: int) -> dict[str, Any]:
    """The report's ``object`` section: ``quantitative`` and ``qualitative`` (pooled), ``per_type``
    (per question id), with counts; quantities whose truth is 0 are not scored."""
    found = metrics.object_metrics(zip(answers.question_ids, answers.predictions, answers.truths))
    pooled = ("quantitative", "qualitative")
    return {
        "quantitative": _clean(found["quantitative"]) if "quantitative" in found else None,
        "qualitative": _clean(found["qualitative"]) if "qualitative" in found else None,
        "per_type": {qid: _clean(v) for qid, v in found.items() if qid not in pooled},
        "tolerance": 0.25,
        "num_questions": len(answers),
        "num_unparseable": sum(p is None for p in answers.predictions),
        "samples": samples,
    }
