"""Object questions of one frame (the ``object`` task: VLM3-object, SpatialRGPT-style questions
about image regions), from the frame's 2D detections and its reference depth.

Each detection's box (original image, corner coordinates) becomes a region of the prepared image
(:func:`vlm3_ros.object_query.box_region`), whose object extent is measured in the prepared depth
(:func:`vlm3_ros.objects.region_extent`); the true answer of every question comes from
:func:`vlm3_ros.objects.true_answer` and is written by
:func:`vlm3_ros.protocol.format_object_answer`. These are the functions the oracle backend and the
object node use, so the data says what the oracle answers.

Per frame: the size questions (those about one region, e.g. width and height) of each of up to
``objects_per_image`` detections (highest score first), plus ``object_relations`` questions about
two regions drawn (seeded) among every ordered pair of objects and every relation question.
Detections whose region covers less than a pixel, or too few depth pixels for an extent, are left
out (counted).

The sample's targets hold, per question, its id, its regions' text coordinates and the true value
(metres, bool or the chosen region's index), and per object its region, box, label, score and
extent (``lower`` / ``upper`` corners in the prepared camera frame), from which the oracle answers
during evaluation (:func:`object_ground_truth`).
"""

from __future__ import annotations

from itertools import permutations
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vlm3_ros import object_query, objects, protocol
from vlm3_ros.camera import PreparedImage
from vlm3_ros.detections import Detection
from vlm3_ros.engine.base import GroundTruth
from vlm3_ros.protocol import TaskSpec

__all__ = ["check_object_options", "check_object_spec", "object_ground_truth", "object_question_ids",
           "object_targets"]


def object_question_ids(spec: TaskSpec, wanted: Sequence[str] = ()) -> Tuple[str, ...]:
    """The object question ids to ask: ``wanted`` (ids or short names) or, when empty, every
    object question of ``spec``."""
    if wanted:
        return tuple(dict.fromkeys(protocol.object_question_id(q) for q in wanted))
    return tuple(q for q in spec.questions if q in protocol.OBJECT_QUESTIONS)


def check_object_spec(spec: TaskSpec, wanted: Sequence[str] = ()) -> Optional[str]:
    """Why ``spec`` cannot label the object questions ``wanted`` (default: all of its own), or None."""
    if spec.num_images != 1:
        return f"the object spec must take 1 image, it takes {spec.num_images}"
    if not spec.coord_scale:
        return "the object spec needs a coord_scale for region coordinates"
    if "region" not in spec.questions:
        return "the object spec has no 'region' template (how a box is referenced)"
    try:
        ids = object_question_ids(spec, wanted)
    except protocol.ProtocolError as exc:
        return str(exc)
    if not ids:
        return "the object spec asks no object question"
    missing = []
    for qid in ids:
        forms = [f"{qid}.yes", f"{qid}.no"] if protocol.OBJECT_QUESTIONS[qid].kind == "predicate" else [qid]
        if qid not in spec.questions:
            missing.append(qid)
        missing += [f for f in forms if f not in spec.answers]
    if missing:
        return f"the object spec lacks questions / answers for {missing}"
    return None


def check_object_options(objects_per_image: Any, object_relations: Any, object_questions: Any) -> Tuple[str, ...]:
    """Validate the object options; returns the question ids (ValueError naming the bad one)."""
    for name, value, low in (("objects_per_image", objects_per_image, 1), ("object_relations", object_relations, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    try:
        return tuple(dict.fromkeys(protocol.object_question_id(q) for q in object_questions))
    except protocol.ProtocolError as exc:
        raise ValueError(f"object_questions: {exc}") from None


def object_targets(prepared: PreparedImage, depth_prepared: np.ndarray, detections: Sequence[Detection],
                   spec: TaskSpec, rng: np.random.Generator, *, objects_per_image: int = 6,
                   object_relations: int = 8, question_ids: Sequence[str] = (),
                   ) -> Tuple[List[str], List[str], Dict[str, Any], Dict[str, int]]:
    """Object questions, answers and targets for one prepared image and its detections.

    ``depth_prepared``: z (metres, NaN invalid) in the prepared geometry. Returns (questions,
    answers, targets, counts) with counts ``objects_outside`` (region smaller than a pixel),
    ``objects_without_depth`` (too few depth pixels), ``objects_duplicate`` (same region as a
    kept one) and ``objects_over_limit``; no questions when no object is usable.
    """
    ids = object_question_ids(spec, question_ids)
    scale = float(spec.coord_scale or 1000)
    counts = {"objects_outside": 0, "objects_without_depth": 0, "objects_duplicate": 0, "objects_over_limit": 0}
    kept: List[Dict[str, Any]] = []
    extents: List[objects.ObjectExtent] = []
    texts: List[str] = []
    order = sorted(range(len(detections)), key=lambda k: -detections[k].score)
    for k in order:
        det = detections[k]
        found = object_query.box_region(prepared, det.box, spec)
        if found is None:
            counts["objects_outside"] += 1
            continue
        text, coords = found
        if any(o["region"] == list(coords) for o in kept):
            counts["objects_duplicate"] += 1
            continue
        extent = objects.region_extent(depth_prepared, prepared.intrinsics.K, coords, scale)
        if extent is None:
            counts["objects_without_depth"] += 1
            continue
        if len(kept) >= objects_per_image:
            counts["objects_over_limit"] += 1
            continue
        kept.append({"region": list(coords), "box": [float(v) for v in det.box], "label": det.label,
                     "score": float(det.score), "id": det.id, "lower": extent.lower.tolist(),
                     "upper": extent.upper.tolist(), "points": int(extent.points)})
        extents.append(extent)
        texts.append(text)
    if not kept:
        return [], [], {}, counts
    single = [q for q in ids if protocol.OBJECT_QUESTIONS[q].regions == 1]
    pair = [q for q in ids if protocol.OBJECT_QUESTIONS[q].regions == 2]
    asked: List[Tuple[str, Tuple[int, ...]]] = [(q, (i,)) for i in range(len(kept)) for q in single]
    candidates = [(q, ab) for ab in permutations(range(len(kept)), 2) for q in pair]
    if candidates and object_relations:
        pick = rng.choice(len(candidates), size=min(object_relations, len(candidates)), replace=False)
        asked += [candidates[int(i)] for i in pick]
    questions, answers, values = [], [], []
    for qid, idx in asked:
        regions = [texts[i] for i in idx]
        value = objects.true_answer(qid, *[extents[i] for i in idx])
        questions.append(protocol.object_question(qid, regions, spec))
        answers.append(protocol.format_object_answer(qid, value, regions, spec))
        values.append(value if isinstance(value, bool) else (int(value) if isinstance(value, (int, np.integer))
                                                               else float(value)))
    targets = {"question_ids": [q for q, _ in asked], "objects_asked": [list(idx) for _, idx in asked],
               "regions": [[kept[i]["region"] for i in idx] for _, idx in asked], "values": values,
               "objects": kept}
    return questions, answers, targets, counts


def object_ground_truth(targets: Dict[str, Any]) -> GroundTruth:
    """What the oracle answers a sample's object questions from: its objects' extents by region."""
    found = {}
    for obj in targets.get("objects") or []:
        found[tuple(float(v) for v in obj["region"])] = objects.ObjectExtent(
            lower=np.asarray(obj["lower"], dtype=float), upper=np.asarray(obj["upper"], dtype=float),
            points=int(obj["points"]))
    return GroundTruth(objects=found)
