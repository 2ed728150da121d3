"""Evaluation of the object task (part of :mod:`vlm3_train.evaluate`): each answer is read with
:func:`vlm3_ros.protocol.parse_object_answer` against the question's regions and scored with
:func:`vlm3_ros.object_metrics.object_metrics` (SpatialRGPT-style: quantitative success rate within
25 % and absolute relative error per question type, qualitative accuracy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from vlm3_ros import object_metrics, protocol
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


def object_report(answers: ObjectAnswers, samples: int, unparseable: int) -> dict[str, Any]:
    """The report's ``object`` section."""
    return {**object_metrics.object_metrics(answers.question_ids, answers.predictions, answers.truths),
            "num_questions": len(answers), "num_unparseable": unparseable, "samples": samples}
