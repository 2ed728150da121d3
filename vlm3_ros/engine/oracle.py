"""The ground-truth backend: answers protocol questions from reference geometry.

It reads each question exactly as a model would receive it (the text), looks the answer up in the
request's :class:`~vlm3_ros.engine.base.GroundTruth` (a depth map, a relative pose, a flow field)
and writes it in the protocol's answer text. The rest of the system cannot tell it from a model,
so the whole question -> answer text -> parse -> 3D path can be validated against real ground
truth, and a model can be compared live against a depth sensor.
"""

from __future__ import annotations

import re
import time
from typing import Any, Mapping

import numpy as np

from .. import objects, protocol
from ..protocol import ProtocolError, TaskSpec
from .base import Backend, EngineError, GroundTruth, Request, Response

__all__ = ["OracleBackend", "UNKNOWN_ANSWER", "is_unknown_answer"]

UNKNOWN_ANSWER = "<think> There is no reference value at this pixel. </think><answer> unknown </answer>"
_UNKNOWN = re.compile(r"<answer>\s*unknown\s*</answer>\s*$")


def is_unknown_answer(text: str | None) -> bool:
    """True for an answer saying there is no reference value (the oracle's :data:`UNKNOWN_ANSWER`).

    Such answers are not parse failures: the question has no ground truth (a hole in the depth
    image, a pixel leaving the second view).
    """
    return text is not None and _UNKNOWN.search(text) is not None


class OracleBackend(Backend):
    """Answers from ground truth. ``specs`` defaults to the built-in VLM3 task specs."""

    name = "oracle"

    def __init__(self, specs: Mapping[str, TaskSpec] | None = None) -> None:
        self._specs = dict(specs or protocol.TASKS)

    @property
    def specs(self) -> Mapping[str, TaskSpec]:
        return self._specs

    def answer(self, request: Request) -> Response:
        t0 = time.perf_counter()
        gt = request.ground_truth
        if gt is None:
            raise EngineError("the oracle backend needs ground truth with every request")
        handlers = {"depth": self._depth, "correspondence": self._correspondence, "pose": self._pose,
                    "object": self._object}
        for spec in request.specs:
            if spec.name not in handlers:
                raise EngineError(f"the oracle does not answer {spec.name!r} questions")
        answers = []
        for question in request.questions:
            spec, qid, fields = self._read(request, question)
            answers.append(handlers[spec.name](request, gt, qid, fields, spec))
        return Response(
            answers=answers,
            prompt_tokens=[0] * len(answers),
            generated_tokens=[0] * len(answers),
            finish_reasons=["stop"] * len(answers),
            timings={"total": time.perf_counter() - t0},
        )

    @staticmethod
    def _read(request: Request, question: str) -> tuple[TaskSpec, str, Any]:
        """The task spec, question id and fields of a question (any task of the request)."""
        errors = []
        for spec in request.specs:
            try:
                if spec.name == "object":
                    qid, regions = protocol.parse_object_question(question, spec)
                    return spec, qid, regions
                qid, fields = spec.parse_question(question)
                return spec, qid, fields
            except ProtocolError as exc:
                errors.append(str(exc))
        raise EngineError(f"oracle cannot read the question: {'; '.join(errors)}")

    # -- per task ------------------------------------------------------------------------------

    @staticmethod
    def _pixel(request: Request, fields, spec: TaskSpec) -> tuple[float, float, int, int]:
        height, width = np.asarray(request.images[0]).shape[:2]
        x, y = protocol.denormalize_point(fields["nx"], fields["ny"], width, height, spec.coord_scale)
        return x, y, width, height

    def _depth(self, request: Request, gt: GroundTruth, qid: str, fields, spec: TaskSpec) -> str:
        if gt.depth is None or gt.K is None:
            raise EngineError("depth questions need ground truth depth and K")
        x, y, width, height = self._pixel(request, fields, spec)
        depth = np.asarray(gt.depth)
        if depth.shape[:2] != (height, width):
            raise EngineError(f"ground truth depth is {depth.shape[1]}x{depth.shape[0]}, the image {width}x{height}")
        col, row = int(round(x)), int(round(y))
        if not (0 <= col < width and 0 <= row < height):
            return UNKNOWN_ANSWER
        z = depth[row, col]
        if not (np.isfinite(z) and z > 0):
            return UNKNOWN_ANSWER
        value = float(z)
        if spec.option("depth_kind", "ray") == "ray":
            value *= float(np.linalg.norm(np.linalg.solve(np.asarray(gt.K, float), [x, y, 1.0])))
        return spec.answer("depth", distance=value)

    def _correspondence(self, request: Request, gt: GroundTruth, qid: str, fields, spec: TaskSpec) -> str:
        x, y, width, height = self._pixel(request, fields, spec)
        h2, w2 = np.asarray(request.images[1]).shape[:2]
        col, row = int(round(x)), int(round(y))
        if not (0 <= col < width and 0 <= row < height):
            return UNKNOWN_ANSWER
        if gt.flow is not None:
            x2, y2 = (float(v) for v in np.asarray(gt.flow)[row, col])
        else:
            if gt.depth is None or gt.K is None or gt.pose is None:
                raise EngineError("correspondence questions need a flow field, or depth + K + pose")
            z = float(np.asarray(gt.depth)[row, col])
            if not (np.isfinite(z) and z > 0):
                return UNKNOWN_ANSWER
            K2 = np.asarray(gt.K2 if gt.K2 is not None else gt.K, float)
            X1 = z * np.linalg.solve(np.asarray(gt.K, float), [x, y, 1.0])
            T21 = np.linalg.inv(np.asarray(gt.pose, float))
            X2 = T21[:3, :3] @ X1 + T21[:3, 3]
            if X2[2] <= 1e-6:
                return UNKNOWN_ANSWER
            x2, y2 = (K2 @ (X2 / X2[2]))[:2]
        if not (np.isfinite(x2) and np.isfinite(y2)) or not (-0.5 <= x2 < w2 - 0.5 and -0.5 <= y2 < h2 - 0.5):
            return UNKNOWN_ANSWER
        return spec.answer("correspondence", x=int(round(x2 / w2 * spec.coord_scale)), y=int(round(y2 / h2 * spec.coord_scale)))

    def _pose(self, request: Request, gt: GroundTruth, qid: str, fields, spec: TaskSpec) -> str:
        if gt.pose is None:
            raise EngineError("pose questions need a ground truth relative pose")
        T = np.asarray(gt.pose, float)
        try:
            return protocol.format_pose_answers(T[:3, :3], T[:3, 3], spec)[qid]
        except ProtocolError:
            return UNKNOWN_ANSWER

    def _object(self, request: Request, gt: GroundTruth, qid: str, regions, spec: TaskSpec) -> str:
        """From the back-projected reference depth inside each region (:mod:`vlm3_ros.objects`), or
        from the regions' extents where the ground truth gives them."""
        if gt.objects is not None:
            return self._object_answer(qid, regions, [gt.objects.get(tuple(float(v) for v in r)) for r in regions], spec)
        if gt.depth is None or gt.K is None:
            raise EngineError("object questions need ground truth depth and K")
        depth = np.asarray(gt.depth)
        height, width = np.asarray(request.images[0]).shape[:2]
        if depth.shape[:2] != (height, width):
            raise EngineError(f"ground truth depth is {depth.shape[1]}x{depth.shape[0]}, the image {width}x{height}")
        extents = [objects.region_extent(depth, gt.K, region, float(spec.coord_scale or 1000)) for region in regions]
        return self._object_answer(qid, regions, extents, spec)

    @staticmethod
    def _object_answer(qid: str, regions, extents, spec: TaskSpec) -> str:
        if any(e is None for e in extents):
            return UNKNOWN_ANSWER
        value = objects.true_answer(qid, *extents)
        texts = [spec.question("region", x1=int(r[0]), y1=int(r[1]), x2=int(r[2]), y2=int(r[3])) for r in regions]
        try:
            return protocol.format_object_answer(qid, value, texts, spec)
        except ProtocolError:
            return UNKNOWN_ANSWER
