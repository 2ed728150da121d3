"""Objects of one frame: N image boxes -> VLM3 questions -> metric 3D centres, sizes and relations.

:class:`ObjectQuery` asks, for each box (original-image pixels, corner coordinates; see
:mod:`vlm3_ros.objects`):

* depth questions (the depth task spec) at a small grid of pixels inside the box; the answers in
  the depth band around their median belong to the object;
* the object task's width and height questions about the box as a region;
* optionally, relation questions (distances, left of, behind, bigger...) about every pair of boxes.

and turns the answers into an :class:`ObjectEstimate` per box: the centre lies on the ray through
the box centre, midway between the nearest and the farthest in-band depth answer; the size is the
answered width and height and that depth range. All questions of the frame go to the backend in
one request (one shared image prefix) when one backend serves both tasks with the same image
preparation (VLM3's depth and object tasks both unify the focal length to 1000 px); the released
VLM3 checkpoints serve one task each, which makes two requests, one per checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Sequence

import numpy as np

from . import objects, protocol
from .camera import Intrinsics, PixelMap, PreparedImage, prepare_depth, prepare_image
from .engine.base import Backend, GroundTruth, Request, Response
from .pipeline import DepthEstimator, DepthResult, _rgb
from .protocol import AnswerParseError, ProtocolError, TaskSpec

__all__ = ["ObjectEstimate", "ObjectQuery", "ObjectResult", "Relation", "box_region", "prepared_box"]

SIZE_QUESTIONS = ("width_data", "height_data")


def box_region(prepared: PreparedImage, box: Sequence[float], spec: TaskSpec = protocol.OBJECT) -> tuple[str, tuple] | None:
    """The region reference of an original-image box in ``prepared`` (text, text coordinates);
    None when less than a pixel of the box is in the image."""
    pbox = prepared_box(prepared.mapping, box, prepared.width, prepared.height)
    if pbox is None:
        return None
    text = protocol.bbox_reference(tuple(pbox), prepared.width, prepared.height, spec)
    return text, protocol.parse_bbox_references(text)[0]


def prepared_box(mapping: PixelMap, box: Sequence[float], width: int, height: int, samples: int = 8) -> np.ndarray | None:
    """``box`` (original image, corner coordinates) in the prepared image, clipped to it; None when
    less than a pixel of it is left. Under undistortion the box's border is mapped and bounded."""
    x1, y1, x2, y2 = objects.check_box(box)
    t = np.linspace(0.0, 1.0, samples + 1)
    border = np.concatenate([
        np.column_stack([x1 + (x2 - x1) * t, np.full_like(t, y1)]),
        np.column_stack([x1 + (x2 - x1) * t, np.full_like(t, y2)]),
        np.column_stack([np.full_like(t, x1), y1 + (y2 - y1) * t]),
        np.column_stack([np.full_like(t, x2), y1 + (y2 - y1) * t]),
    ])
    mapped = mapping.to_prepared(border - 0.5) + 0.5  # corner <-> pixel-centre coordinates
    mapped = mapped[np.all(np.isfinite(mapped), axis=1)]
    if len(mapped) == 0:
        return None
    lo = np.clip(mapped.min(axis=0), 0, (width, height))
    hi = np.clip(mapped.max(axis=0), 0, (width, height))
    if np.any(hi - lo < 1.0):
        return None
    return np.array([lo[0], lo[1], hi[0], hi[1]])


@dataclass
class ObjectEstimate:
    """One box's object. ``centre`` and ``size`` (metres, camera optical frame; NaN when unknown)
    are valid when its depth and both size answers could be used; ``errors`` says why not."""

    box: np.ndarray  #: the box asked about (original image, corner coordinates)
    region: str | None  #: its region reference in the questions (None: outside the image)
    centre: np.ndarray
    size: np.ndarray
    depth_samples: int  #: depth answers in the object's band
    answers: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return bool(np.all(np.isfinite(self.centre)) and np.all(np.isfinite(self.size)))


@dataclass
class Relation:
    """An answered relation question about boxes ``a`` and ``b`` (indices): ``value`` is metres,
    bool or the chosen box's index (``a`` or ``b``); None when the answer was unusable."""

    a: int
    b: int
    question: str
    value: float | bool | int | None
    answer: str | None
    error: str | None = None


@dataclass
class ObjectResult:
    """The objects and relations of one frame."""

    objects: list[ObjectEstimate]
    relations: list[Relation]
    prepared: PreparedImage
    depth: DepthResult | None
    responses: list[Response]

    @property
    def parse_failures(self) -> int:
        """Answers that were asked but could not be read."""
        depth = self.depth.parse_failures if self.depth is not None else 0
        size = sum(e.startswith("unparseable") for o in self.objects for e in o.errors)
        return depth + size + sum(r.error is not None and r.answer is not None for r in self.relations)

    @property
    def first_error(self) -> str | None:
        for o in self.objects:
            if o.errors:
                return o.errors[0]
        return next((r.error for r in self.relations if r.error), None)


class ObjectQuery:
    """3D objects from image boxes with backends serving the ``object`` and ``depth`` tasks.

    ``depth_backend`` defaults to ``backend``. ``depth_grid`` x ``depth_grid`` depth questions are
    asked over the central ``depth_inner`` fraction of each box. ``relations`` are question ids
    (or short names, :data:`vlm3_ros.protocol.OBJECT_QUESTION_ALIASES`) asked about every pair
    of boxes ``(i, j)``, ``i < j``, with box ``i`` as region a.
    """

    def __init__(self, backend: Backend, *, depth_backend: Backend | None = None, spec: TaskSpec | None = None,
                 depth_spec: TaskSpec | None = None, max_new_tokens: int = 96, depth_grid: int = 3,
                 depth_inner: float = 0.5, relations: Sequence[str] = ()) -> None:
        self.backend = backend
        self.depth_backend = depth_backend or backend
        self.spec = spec or backend.spec("object")
        self.depth = DepthEstimator(self.depth_backend, spec=depth_spec or self.depth_backend.spec("depth"),
                                    max_new_tokens=max_new_tokens)
        self.max_new_tokens = max_new_tokens
        objects.box_samples((0, 0, 1, 1), depth_grid, depth_inner)  # validates both
        self.depth_grid = depth_grid
        self.depth_inner = depth_inner
        self.relations = tuple(protocol.object_question_id(r) for r in relations)
        single = [q for q in self.relations if protocol.OBJECT_QUESTIONS[q].regions != 2]
        if single:
            raise ProtocolError(f"relations are questions about two regions; {single} are about one")
        if self.spec.coord_scale is None:
            raise ValueError(f"task {self.spec.name!r} has no coordinate scale; it cannot reference regions")
        missing = [q for q in SIZE_QUESTIONS + self.relations if q not in self.spec.questions]
        if missing:
            raise ProtocolError(f"the object task spec has no question(s) {missing}")

    @property
    def shares_requests(self) -> bool:
        """Whether depth and object questions go to the backend together (one request per frame)."""
        return (self.depth_backend is self.backend and self.depth.spec.preprocess == self.spec.preprocess
                and self.depth.spec.num_images == self.spec.num_images)

    def query(self, image: Any, intrinsics: Intrinsics, boxes: Sequence[Sequence[float]], *,
              reference_depth: np.ndarray | None = None) -> ObjectResult:
        """The objects in ``boxes`` (N, 4) of ``image``. ``reference_depth`` (metres along z, aligned
        with ``image``) is ground truth for the oracle backend (model backends ignore it).

        Raises ValueError for a malformed box (not four finite numbers with x2 > x1, y2 > y1).
        """
        boxes_ = [objects.check_box(b) for b in boxes]
        prepared = prepare_image(image, intrinsics, self.spec.preprocess)
        shared = self.shares_requests
        prepared_d = prepared if shared else self.depth.prepare(image, intrinsics)
        width, height = prepared.width, prepared.height
        scale = self.spec.coord_scale

        # Regions: each box in the prepared image, referenced by text coordinates.
        estimates, regions, region_boxes = [], [], []
        for box in boxes_:
            region, coords = box_region(prepared, box, self.spec) or (None, None)
            nan = np.full(3, np.nan)
            estimates.append(ObjectEstimate(box=box, region=region, centre=nan.copy(), size=nan.copy(), depth_samples=0,
                                            errors=[] if region else ["the box covers less than a pixel of the image"]))
            regions.append(coords)
            region_boxes.append(None if coords is None else np.asarray(coords) / scale * (width, height, width, height))

        # Depth questions at each box's sample grid; object questions per box and per pair.
        per_box = self.depth_grid ** 2
        uv = np.concatenate([objects.box_samples(b, self.depth_grid, self.depth_inner) for b in boxes_]) \
            if boxes_ else np.zeros((0, 2))
        depth_questions, inside, referenced = self.depth.questions(prepared_d, uv)
        asked: list[tuple[str, tuple[int, ...]]] = []
        for i, est in enumerate(estimates):
            if est.region is not None:
                asked += [(qid, (i,)) for qid in SIZE_QUESTIONS]
        for i, j in combinations(range(len(estimates)), 2):
            if estimates[i].region is not None and estimates[j].region is not None:
                asked += [(qid, (i, j)) for qid in self.relations]
        object_questions = [protocol.object_question(qid, [estimates[k].region for k in idx], self.spec)
                            for qid, idx in asked]

        # Ask: one request when the tasks share the backend and the image preparation.
        gt = gt_d = None
        if reference_depth is not None:
            gt = GroundTruth(depth=prepare_depth(reference_depth, prepared), K=prepared.intrinsics.K)
            gt_d = gt if shared else GroundTruth(depth=prepare_depth(reference_depth, prepared_d),
                                                 K=prepared_d.intrinsics.K)
        responses: list[Response] = []
        if shared and depth_questions and object_questions:
            response = self.backend.answer(Request(
                images=[_rgb(prepared)], questions=depth_questions + object_questions, spec=self.spec,
                max_new_tokens=self.max_new_tokens, ground_truth=gt, extra_specs=(self.depth.spec,)))
            responses.append(response)
            depth_texts = response.answers[:len(depth_questions)]
            object_texts = response.answers[len(depth_questions):]
        else:
            depth_texts, object_texts = [], []
            if depth_questions:
                responses.append(self.depth_backend.answer(Request(
                    images=[_rgb(prepared_d)], questions=depth_questions, spec=self.depth.spec,
                    max_new_tokens=self.max_new_tokens, ground_truth=gt_d)))
                depth_texts = responses[-1].answers
            if object_questions:
                responses.append(self.backend.answer(Request(
                    images=[_rgb(prepared)], questions=object_questions, spec=self.spec,
                    max_new_tokens=self.max_new_tokens, ground_truth=gt)))
                object_texts = responses[-1].answers
        depth = self.depth.read_answers(prepared_d, uv, inside, referenced, depth_texts) if len(uv) else None

        # Read the answers.
        relations: list[Relation] = []
        for (qid, idx), text in zip(asked, object_texts):
            try:
                value = protocol.parse_object_answer(qid, text, [regions[k] for k in idx], self.spec)
                error = None
            except AnswerParseError as exc:
                value, error = None, str(exc)
            if len(idx) == 1:
                est = estimates[idx[0]]
                est.answers[qid] = text
                axis = SIZE_QUESTIONS.index(qid)
                if error is None:
                    est.size[axis] = float(value)  # type: ignore[arg-type]
                else:
                    est.errors.append(f"unparseable {qid} answer: {error}")
            else:
                if value is not None and protocol.OBJECT_QUESTIONS[qid].kind == "choice":
                    value = idx[int(value)]
                relations.append(Relation(idx[0], idx[1], qid, value, text, error))
        K = prepared.intrinsics.K
        for i, est in enumerate(estimates):
            if est.region is None or depth is None:
                continue
            z = depth.z[i * per_box:(i + 1) * per_box]
            band = objects.depth_band(z)
            est.depth_samples = int(band.sum())
            if not band.any():
                est.errors.append("no usable depth answer inside the box")
                continue
            near, far = float(z[band].min()), float(z[band].max())
            x1, y1, x2, y2 = region_boxes[i]
            ray = np.linalg.solve(K, [(x1 + x2) / 2 - 0.5, (y1 + y2) / 2 - 0.5, 1.0])
            est.centre = ray / ray[2] * (near + far) / 2
            est.size[2] = far - near
        return ObjectResult(objects=estimates, relations=relations, prepared=prepared, depth=depth,
                            responses=responses)
