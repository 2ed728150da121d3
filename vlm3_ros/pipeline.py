"""Per-frame pipelines: pixels of a camera image -> protocol questions -> answers -> metric geometry.

Each pipeline prepares the image(s) as its task spec says, turns the requested original-image
pixels into the task's text coordinates, asks the backend all questions of the frame in one
request, parses the answers and maps them back into the original camera's geometry:

* :class:`DepthEstimator`: sparse metric depth -> 3D points in the camera's optical frame, and
  dense depth (:meth:`DepthEstimator.estimate_dense`): the answers completed into a depth map
  guided by the image (:mod:`vlm3_ros.completion`), optionally after a second round of questions
  about the same frame where the first round's completion is least certain;
* :class:`CorrespondenceMatcher`: pixels of image 1 -> matching pixels of image 2;
* :class:`PoseEstimator`: the relative pose of camera 2 with respect to camera 1.

The preparation keeps the camera centre and orientation (undistortion uses no rotation), so a 3D
point computed in the prepared pinhole camera is the same point in the original camera's frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import protocol
from .camera import Intrinsics, PreparedImage, prepare_depth, prepare_image
from .completion import AdaptiveConfig, CompletionConfig, DenseDepth, complete_depth, select_adaptive_pixels
from .engine.base import Backend, GroundTruth, Request, Response
from .engine.oracle import is_unknown_answer
from .protocol import AnswerParseError, RelativePose, TaskSpec

__all__ = [
    "BEYOND_MAX_DEPTH",
    "CorrespondenceMatcher",
    "CorrespondenceResult",
    "DenseResult",
    "DepthEstimator",
    "DepthResult",
    "NO_REFERENCE",
    "OUTSIDE",
    "PoseEstimator",
    "PoseResult",
    "dense_rounds",
    "is_parse_failure",
    "query_grid",
]

#: Why a requested pixel has no value, besides an unparseable answer (``errors`` of the results):
OUTSIDE = "outside the prepared image"  # not asked: the pixel does not exist in the prepared image
NO_REFERENCE = "no reference value at this pixel"  # the oracle's "unknown" (no ground truth there)
BEYOND_MAX_DEPTH = "beyond max_depth"  # answered, but farther than the caller's plausibility limit


def is_parse_failure(error: str | None) -> bool:
    """True for an answer that could not be parsed (a model failure), not for the other reasons above."""
    return error is not None and not error.startswith((OUTSIDE, NO_REFERENCE, BEYOND_MAX_DEPTH))


class _Reasons:
    """Counts over a result's ``errors`` (one reason, or None, per requested pixel)."""

    errors: list[str | None]

    @property
    def parse_failures(self) -> int:
        """Answers that could not be parsed (model failures)."""
        return sum(is_parse_failure(e) for e in self.errors)

    @property
    def no_reference(self) -> int:
        """Answers saying there is no reference value at their pixel (the oracle's "unknown")."""
        return sum(e is not None and e.startswith(NO_REFERENCE) for e in self.errors)


def query_grid(width: int, height: int, count: int, margin: float = 0.05) -> np.ndarray:
    """About ``count`` pixels on a regular grid over the image, ``margin`` (fraction) from the border.

    The grid's aspect follows the image's; pixels are at integer positions (pixel centres).
    """
    if count < 1:
        raise ValueError(f"query count must be >= 1, got {count}")
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    x0, x1 = margin * (width - 1), (1 - margin) * (width - 1)
    y0, y1 = margin * (height - 1), (1 - margin) * (height - 1)
    cols = max(1, int(round(np.sqrt(count * (x1 - x0 + 1) / (y1 - y0 + 1)))))
    rows = max(1, int(round(count / cols)))
    xs = np.linspace(x0, x1, cols) if cols > 1 else np.array([(x0 + x1) / 2])
    ys = np.linspace(y0, y1, rows) if rows > 1 else np.array([(y0 + y1) / 2])
    grid = np.stack(np.meshgrid(np.round(xs), np.round(ys)), axis=-1).reshape(-1, 2)
    return grid.astype(np.float64)


def dense_rounds(total: int, share: float) -> tuple[int, int]:
    """Pixels asked in the first (grid) and the second (adaptive) round when ``total`` questions are
    asked about a frame and a ``share`` of them come second."""
    if total < 1:
        raise ValueError(f"total questions must be >= 1, got {total}")
    if not 0 <= share < 1:
        raise ValueError(f"second-round share must be in [0, 1), got {share}")
    second = min(int(round(total * share)), total - 1)
    return total - second, second


def _ask(backend: Backend, images, questions, spec: TaskSpec, max_new_tokens: int, gt: GroundTruth | None) -> Response:
    return backend.answer(
        Request(images=images, questions=questions, spec=spec, max_new_tokens=max_new_tokens, ground_truth=gt)
    )


def _rgb(prepared: PreparedImage | Any) -> np.ndarray:
    image = prepared.image if isinstance(prepared, PreparedImage) else prepared
    if not isinstance(image, np.ndarray):  # a torch tensor prepared on the GPU
        image = image.detach().cpu().numpy()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image, dtype=np.uint8)


def _parse_all(parse: Callable[[str], Any], answers: list[str]) -> tuple[list[Any], list[str | None]]:
    values: list[Any] = []
    errors: list[str | None] = []
    for text in answers:
        if is_unknown_answer(text):
            values.append(None)
            errors.append(NO_REFERENCE)
            continue
        try:
            values.append(parse(text))
            errors.append(None)
        except AnswerParseError as exc:
            values.append(None)
            errors.append(str(exc))
    return values, errors


def _text_coordinates(prepared: PreparedImage, uv: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Original pixels -> (inside mask, integer text coordinates, the prepared pixels those refer to)."""
    size = np.array([prepared.width, prepared.height], dtype=float)
    uvp = prepared.mapping.to_prepared(uv)
    inside = np.all(np.isfinite(uvp), axis=1) & np.all((uvp >= -0.5) & (uvp <= size - 0.5), axis=1)
    nxy = np.zeros_like(uvp)
    nxy[inside] = np.round(uvp[inside] / size * scale)  # round half to even, as protocol.normalize_point
    referenced = nxy / scale * size
    return inside, nxy.astype(np.int64), referenced


# ------------------------------------------------------------------------------------------------
# Depth
# ------------------------------------------------------------------------------------------------


@dataclass
class DepthResult(_Reasons):
    """Sparse metric depth of one frame.

    ``uv`` holds the original-image pixel each answer refers to (the requested pixel moved by at
    most half a text-coordinate unit by the protocol's rounding); ``distance`` is the answered value
    (ray length or z as the spec says), ``z`` metres along the optical axis, ``points`` the 3D
    points in the camera's optical frame. Rows that were not asked (outside the image), whose
    answer could not be parsed, says there is no reference value (oracle) or lies beyond the
    estimator's ``max_depth`` are NaN and not ``valid``; ``errors`` says which.
    """

    uv_query: np.ndarray
    uv: np.ndarray
    distance: np.ndarray
    z: np.ndarray
    points: np.ndarray
    valid: np.ndarray
    answers: list[str | None]
    errors: list[str | None]
    prepared: PreparedImage
    response: Response | None = None

    def depth_image(self, width: int, height: int) -> np.ndarray:
        """A float32 depth image (metres along z, NaN elsewhere) in the original geometry (REP-118)."""
        image = np.full((height, width), np.nan, dtype=np.float32)
        cols = np.round(self.uv[self.valid, 0]).astype(int)
        rows = np.round(self.uv[self.valid, 1]).astype(int)
        ok = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
        image[rows[ok], cols[ok]] = self.z[self.valid][ok]
        return image

    def merged(self, other: "DepthResult") -> "DepthResult":
        """The answers of both results (same prepared image), this one's first."""
        if other.prepared is not self.prepared:
            raise ValueError("only results about the same prepared image can be merged")
        return DepthResult(
            uv_query=np.concatenate([self.uv_query, other.uv_query]),
            uv=np.concatenate([self.uv, other.uv]),
            distance=np.concatenate([self.distance, other.distance]),
            z=np.concatenate([self.z, other.z]),
            points=np.concatenate([self.points, other.points]),
            valid=np.concatenate([self.valid, other.valid]),
            answers=self.answers + other.answers,
            errors=self.errors + other.errors,
            prepared=self.prepared,
            response=self.response,
        )


@dataclass
class DenseResult:
    """Dense depth of one frame: every answer (``sparse``, both rounds), their completion
    (``dense``, in the original image's pixel grid) and how many pixels each round asked about."""

    sparse: DepthResult
    dense: DenseDepth
    first_round: int
    second_round: int
    responses: list[Response] = field(default_factory=list)

    def points(self, step: int = 1, min_confidence: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """The dense depth as 3D points in the camera's optical frame: every ``step``-th pixel in
        each direction whose confidence is at least ``min_confidence``. Returns (points (N, 3),
        their original-image pixels (N, 2)); pixels are back-projected exactly through the camera
        model (lens distortion included)."""
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        height, width = self.dense.depth.shape
        rows, cols = np.mgrid[0:height:step, 0:width:step]
        rows, cols = rows.ravel(), cols.ravel()
        z = self.dense.depth[rows, cols].astype(np.float64)
        keep = np.isfinite(z) & (z > 0) & (self.dense.confidence[rows, cols] >= min_confidence)
        uv = np.column_stack([cols[keep], rows[keep]]).astype(np.float64)
        prepared = self.sparse.prepared
        rays = np.linalg.solve(prepared.intrinsics.K, np.column_stack([prepared.mapping.to_prepared(uv),
                                                                       np.ones(len(uv))]).T).T
        return rays / rays[:, 2:3] * z[keep, None], uv


class DepthEstimator:
    """Sparse metric depth from a backend serving the ``depth`` task.

    ``max_depth`` (metres along z): answers farther away are not used (``errors``: beyond max_depth).
    """

    def __init__(self, backend: Backend, *, spec: TaskSpec | None = None, max_new_tokens: int = 64,
                 max_depth: float | None = None) -> None:
        self.backend = backend
        self.spec = spec or backend.spec("depth")
        self.max_new_tokens = max_new_tokens
        self.max_depth = max_depth
        if self.spec.coord_scale is None:
            raise ValueError(f"task {self.spec.name!r} has no coordinate scale; it cannot reference pixels")

    @property
    def depth_kind(self) -> str:
        return str(self.spec.option("depth_kind", "ray"))

    def prepare(self, image: Any, intrinsics: Intrinsics) -> PreparedImage:
        return prepare_image(image, intrinsics, self.spec.preprocess)

    def questions(self, prepared: PreparedImage, uv: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The questions for original pixels ``uv``: (questions of the pixels inside the prepared
        image, the inside mask, the prepared pixel each text coordinate refers to)."""
        inside, nxy, referenced = _text_coordinates(prepared, np.asarray(uv, dtype=np.float64).reshape(-1, 2),
                                                    self.spec.coord_scale)
        questions = [self.spec.question(nx=int(nxy[i, 0]), ny=int(nxy[i, 1])) for i in np.flatnonzero(inside)]
        return questions, inside, referenced

    def estimate(
        self,
        image: Any,
        intrinsics: Intrinsics,
        uv: np.ndarray,
        *,
        reference_depth: np.ndarray | None = None,
        prepared: PreparedImage | None = None,
    ) -> DepthResult:
        """Depth at original-image pixels ``uv`` (N, 2).

        ``reference_depth`` (metres along z, aligned with ``image``) is handed to the backend as
        ground truth (the oracle backend answers from it; model backends ignore it).
        """
        uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
        prepared = prepared or self.prepare(image, intrinsics)
        questions, inside, referenced = self.questions(prepared, uv)
        index = np.flatnonzero(inside)
        gt = None
        if reference_depth is not None:
            gt = GroundTruth(depth=prepare_depth(reference_depth, prepared), K=prepared.intrinsics.K)
        response = _ask(self.backend, [_rgb(prepared)], questions, self.spec, self.max_new_tokens, gt) if len(index) else None
        return self.read_answers(prepared, uv, inside, referenced, response.answers if response else [], response)

    def read_answers(self, prepared: PreparedImage, uv: np.ndarray, inside: np.ndarray, referenced: np.ndarray,
                     texts: list[str], response: Response | None = None) -> DepthResult:
        """The result for answers ``texts`` to :meth:`questions` ``(prepared, uv)`` (one per inside pixel)."""
        index = np.flatnonzero(inside)
        if len(texts) != len(index):
            raise ValueError(f"{len(index)} depth questions were asked, {len(texts)} answers given")
        values, parse_errors = _parse_all(protocol.parse_depth_answer, list(texts))
        n = len(uv)
        distance = np.full(n, np.nan)
        answers: list[str | None] = [None] * n
        errors: list[str | None] = [OUTSIDE] * n
        for k, i in enumerate(index):
            answers[i] = texts[k]
            errors[i] = parse_errors[k]
            if values[k] is not None:
                distance[i] = values[k]
        rays = np.linalg.solve(prepared.intrinsics.K, np.column_stack([referenced, np.ones(n)]).T).T
        if self.depth_kind == "ray":
            rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        points = rays * distance[:, None]
        if self.max_depth is not None:
            for i in np.flatnonzero(np.isfinite(distance) & ~(points[:, 2] <= self.max_depth)):
                errors[i] = f"{BEYOND_MAX_DEPTH} ({points[i, 2]:.3g} m > {self.max_depth:g} m)"
                distance[i] = np.nan
                points[i] = np.nan
        valid = np.isfinite(distance)
        uv_ref = np.full_like(uv, np.nan)
        uv_ref[inside] = prepared.mapping.to_original(referenced[inside])
        return DepthResult(
            uv_query=uv,
            uv=uv_ref,
            distance=distance,
            z=points[:, 2].copy(),
            points=points,
            valid=valid,
            answers=answers,
            errors=errors,
            prepared=prepared,
            response=response,
        )


    def estimate_dense(
        self,
        image: Any,
        intrinsics: Intrinsics,
        uv: np.ndarray,
        *,
        second_round: int = 0,
        reference_depth: np.ndarray | None = None,
        completion: CompletionConfig | None = None,
        adaptive: AdaptiveConfig | None = None,
    ) -> DenseResult:
        """Dense depth of a frame: depth at original pixels ``uv`` (the first round), completed
        into a depth map guided by ``image``; with ``second_round`` > 0, that many more pixels are
        then chosen where the completion is least certain
        (:func:`~vlm3_ros.completion.select_adaptive_pixels`), asked about the same prepared image
        (the engine reuses the image prefix of the first round) and everything is completed again.
        """
        prepared = self.prepare(image, intrinsics)
        guide = _rgb(image)
        first = self.estimate(image, intrinsics, uv, reference_depth=reference_depth, prepared=prepared)
        responses = [first.response] if first.response is not None else []
        dense = complete_depth(guide, first.uv[first.valid], first.z[first.valid], completion)
        result, asked_second = first, 0
        if second_round > 0:
            asked = first.uv_query[np.all(np.isfinite(first.uv_query), axis=1)]
            uv2 = select_adaptive_pixels(dense, asked, second_round, adaptive, image=guide)
            if len(uv2):
                second = self.estimate(image, intrinsics, uv2, reference_depth=reference_depth, prepared=prepared)
                if second.response is not None:
                    responses.append(second.response)
                result, asked_second = first.merged(second), len(uv2)
                dense = complete_depth(guide, result.uv[result.valid], result.z[result.valid], completion)
        return DenseResult(sparse=result, dense=dense, first_round=len(first.uv_query), second_round=asked_second,
                           responses=responses)


# ------------------------------------------------------------------------------------------------
# Correspondence
# ------------------------------------------------------------------------------------------------


@dataclass
class CorrespondenceResult(_Reasons):
    """Matches of original image-1 pixels ``uv1`` in original image 2 (``uv2``; NaN where none).

    ``uv1_used`` is the original image-1 pixel each question referred to (``uv1`` moved by the text
    coordinates' rounding; NaN where not asked).
    """

    uv1: np.ndarray
    uv2: np.ndarray
    valid: np.ndarray
    answers: list[str | None]
    errors: list[str | None]
    prepared: tuple[PreparedImage, PreparedImage]
    response: Response | None = None
    uv1_used: np.ndarray | None = None


class CorrespondenceMatcher:
    """Pixel correspondences from a backend serving the ``correspondence`` task."""

    def __init__(self, backend: Backend, *, spec: TaskSpec | None = None, max_new_tokens: int = 32, think: bool = False) -> None:
        self.backend = backend
        self.spec = spec or backend.spec("correspondence")
        self.max_new_tokens = max_new_tokens
        self.think = think

    def match(
        self,
        image1: Any,
        intrinsics1: Intrinsics,
        image2: Any,
        intrinsics2: Intrinsics,
        uv1: np.ndarray,
        *,
        reference_depth1: np.ndarray | None = None,
        reference_pose: np.ndarray | None = None,
    ) -> CorrespondenceResult:
        """Matches in image 2 for original image-1 pixels ``uv1``.

        ``reference_depth1`` (z, aligned with image 1) and ``reference_pose`` (4x4, camera 1 <-
        camera 2) are ground truth for the oracle backend.
        """
        uv1 = np.asarray(uv1, dtype=np.float64).reshape(-1, 2)
        p1 = prepare_image(image1, intrinsics1, self.spec.preprocess)
        p2 = prepare_image(image2, intrinsics2, self.spec.preprocess)
        scale = self.spec.coord_scale
        inside, nxy, referenced = _text_coordinates(p1, uv1, scale)
        index = np.flatnonzero(inside)
        suffix = self.spec.option("think_suffix", "") if self.think else ""
        questions = [self.spec.question(nx=int(nxy[i, 0]), ny=int(nxy[i, 1])) + suffix for i in index]
        gt = None
        if reference_depth1 is not None and reference_pose is not None:
            gt = GroundTruth(
                depth=prepare_depth(reference_depth1, p1),
                K=p1.intrinsics.K,
                K2=p2.intrinsics.K,
                pose=np.asarray(reference_pose, float),
                size2=(p2.width, p2.height),
            )
        response = _ask(self.backend, [_rgb(p1), _rgb(p2)], questions, self.spec, self.max_new_tokens, gt) if len(index) else None
        values, parse_errors = _parse_all(protocol.parse_correspondence_answer, response.answers if response else [])
        n = len(uv1)
        uv2 = np.full((n, 2), np.nan)
        answers: list[str | None] = [None] * n
        errors: list[str | None] = [OUTSIDE] * n
        size2 = np.array([p2.width, p2.height], dtype=float)
        for k, i in enumerate(index):
            answers[i] = response.answers[k]
            errors[i] = parse_errors[k]
            if values[k] is not None:
                uv2[i] = p2.mapping.to_original(np.asarray(values[k], float) / scale * size2)
        uv1_used = np.full_like(uv1, np.nan)
        uv1_used[inside] = p1.mapping.to_original(referenced[inside])
        return CorrespondenceResult(uv1, uv2, np.all(np.isfinite(uv2), axis=1), answers, errors, (p1, p2), response,
                                    uv1_used)


# ------------------------------------------------------------------------------------------------
# Pose
# ------------------------------------------------------------------------------------------------


@dataclass
class PoseResult:
    """The relative pose camera 1 <- camera 2 answered for a frame pair (``pose`` None when unparseable)."""

    pose: RelativePose | None
    answers: dict[str, str]
    error: str | None
    response: Response | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def matrix(self) -> np.ndarray | None:
        return None if self.pose is None else self.pose.matrix


class PoseEstimator:
    """Relative camera pose from a backend serving the ``pose`` task (all four questions)."""

    def __init__(self, backend: Backend, *, spec: TaskSpec | None = None, max_new_tokens: int = 48,
                 question_ids: tuple[str, ...] | None = None) -> None:
        self.backend = backend
        self.spec = spec or backend.spec("pose")
        self.max_new_tokens = max_new_tokens
        self.question_ids = tuple(question_ids or self.spec.questions)

    def estimate(
        self,
        image1: Any,
        intrinsics1: Intrinsics,
        image2: Any,
        intrinsics2: Intrinsics,
        *,
        reference_pose: np.ndarray | None = None,
    ) -> PoseResult:
        p1 = prepare_image(image1, intrinsics1, self.spec.preprocess)
        p2 = prepare_image(image2, intrinsics2, self.spec.preprocess)
        questions = [self.spec.question(qid) for qid in self.question_ids]
        gt = None if reference_pose is None else GroundTruth(pose=np.asarray(reference_pose, float))
        response = _ask(self.backend, [_rgb(p1), _rgb(p2)], questions, self.spec, self.max_new_tokens, gt)
        answers = dict(zip(self.question_ids, response.answers))
        try:
            pose = protocol.parse_pose_answers(answers)
            error = None
        except protocol.ProtocolError as exc:
            unknown = any(is_unknown_answer(text) for text in answers.values())
            pose, error = None, NO_REFERENCE if unknown else str(exc)
        return PoseResult(pose=pose, answers=answers, error=error, response=response)
