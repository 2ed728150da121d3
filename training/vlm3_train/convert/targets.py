"""Questions, training answers and numeric targets of each task, computed in the *prepared*
image(s) of the task's spec.

* depth: K pixels sampled uniformly (seeded) among pixels with valid depth inside a border margin
  and a depth range; the label is the ray distance from the camera centre (or z, per the spec's
  ``depth_kind`` option) at the position the question's text coordinates refer to.
* correspondence: a pixel of image 1 is lifted with its depth, moved by the relative pose and
  projected into image 2; it is kept where image 2's depth there agrees (occlusion check).
* pose: the spec's pose questions for the relative pose camera 1 <- camera 2.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import numpy as np

from vlm3_ros import geometry, protocol
from vlm3_ros.camera import Intrinsics, PreparedImage, normalized_rays, project_points
from vlm3_ros.protocol import TaskSpec

__all__ = ["correspondence_targets", "covisibility", "depth_targets", "pose_targets"]


# --------------------------------------------------------------------------------------------
# Visibility between two views
# --------------------------------------------------------------------------------------------


def _reproject(uv1: np.ndarray, z1: np.ndarray, intr1: Intrinsics, T_c2_c1: np.ndarray,
               intr2: Intrinsics) -> Tuple[np.ndarray, np.ndarray]:
    """Pixels of camera 1 with depth z -> pixels of camera 2 and their z there."""
    points = normalized_rays(uv1, intr1) * z1[:, None]
    return project_points(geometry.transform_points(T_c2_c1, points), intr2)


def _visible(uv2: np.ndarray, z2: np.ndarray, depth2: np.ndarray, tolerance: float,
             require_depth: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(inside image 2, passes the occlusion check against image 2's depth).

    With ``require_depth`` the depth there must be known and agree within ``tolerance``
    (relative); otherwise a point passes unless the depth there is known and nearer by more than
    the tolerance (something occludes it)."""
    h, w = depth2.shape
    cols, rows, inside = geometry.nearest_pixel(uv2, w, h)
    inside &= z2 > 0
    d2 = np.full(len(uv2), np.nan)
    d2[inside] = depth2[rows[inside], cols[inside]]
    known = np.isfinite(d2) & (d2 > 0)
    with np.errstate(invalid="ignore"):
        if require_depth:
            ok = inside & known & (np.abs(d2 - z2) <= tolerance * z2)
        else:
            ok = inside & (~known | (d2 >= z2 * (1.0 - tolerance)))
    return inside, ok


def covisibility(depth1: np.ndarray, intr1: Intrinsics, depth2: np.ndarray, intr2: Intrinsics,
                 T_c1_c2: np.ndarray, tolerance: float = 0.05, stride: int = 2) -> float:
    """Fraction of frame-1 pixels with depth (every ``stride``-th row/column) that project inside
    frame 2 and are not occluded there (frame 2's depth, where known, is not nearer by more
    than ``tolerance`` relative). 0 when frame 1 has no depth."""
    sub = depth1[::stride, ::stride]
    rows, cols = np.nonzero(np.isfinite(sub) & (sub > 0))
    if rows.size == 0:
        return 0.0
    uv1 = np.stack([cols * stride, rows * stride], axis=1).astype(np.float64)
    uv2, z2 = _reproject(uv1, sub[rows, cols].astype(np.float64), intr1, geometry.invert_pose(T_c1_c2), intr2)
    _, ok = _visible(uv2, z2, depth2, tolerance, require_depth=False)
    return float(ok.mean())


# --------------------------------------------------------------------------------------------
# Pixels a question may reference
# --------------------------------------------------------------------------------------------


def _margin_mask(width: int, height: int, margin: float) -> Tuple[slice, slice]:
    mx, my = int(math.ceil(margin * width)), int(math.ceil(margin * height))
    return slice(my, max(height - my, my)), slice(mx, max(width - mx, mx))


def _point_text(cols: np.ndarray, rows: np.ndarray, width: int, height: int,
                scale: int) -> Tuple[np.ndarray, np.ndarray]:
    """Text coordinates of the chosen pixels (:func:`vlm3_ros.protocol.normalize_point`) and the
    prepared positions they refer to (:func:`vlm3_ros.protocol.denormalize_point`)."""
    text = np.array([protocol.normalize_point(float(c), float(r), width, height, scale) for c, r in zip(cols, rows)],
                    dtype=np.int64).reshape(-1, 2)
    ref = np.array([protocol.denormalize_point(nx, ny, width, height, scale) for nx, ny in text],
                   dtype=np.float64).reshape(-1, 2)
    return text, ref


def _axis_refs(size: int, scale: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per pixel index along one axis: the position its text coordinate refers to, and whether
    that position's nearest pixel is the pixel itself (text coordinates coarser than pixels map
    several pixels to one position; only the pixel nearest to it is used)."""
    index = np.arange(size, dtype=np.float64)
    ref = np.round(index / size * scale) / scale * size
    return ref, np.floor(ref + 0.5) == index


def _candidate_mask(depth: np.ndarray, scale: int, margin: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels with valid depth, inside the margin, whose text coordinates refer back to
    themselves: ``(mask (H, W), referenced x per column, referenced y per row)``."""
    H, W = depth.shape
    ref_x, same_x = _axis_refs(W, scale)
    ref_y, same_y = _axis_refs(H, scale)
    rs, cs = _margin_mask(W, H, margin)
    inner_x = np.zeros(W, dtype=bool)
    inner_x[cs] = True
    inner_y = np.zeros(H, dtype=bool)
    inner_y[rs] = True
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(depth) & (depth > 0)
    mask &= (same_y & inner_y)[:, None] & (same_x & inner_x)[None, :]
    return mask, ref_x, ref_y


def _ray_norms(intr: Intrinsics, ref_x: np.ndarray, ref_y: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``|K^-1 [x, y, 1]|`` (through the lens model) at the referenced positions of some pixels."""
    if not intr.has_distortion:
        nx = (ref_x - intr.cx) / intr.fx
        ny = (ref_y - intr.cy) / intr.fy
        return np.sqrt(nx[cols] ** 2 + ny[rows] ** 2 + 1.0)
    uv = np.stack([ref_x[cols], ref_y[rows]], axis=1)
    return np.linalg.norm(normalized_rays(uv, intr), axis=1)


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def depth_targets(prepared: PreparedImage, depth_prepared: np.ndarray, spec: TaskSpec, k: int,
                  rng: np.random.Generator, *, margin: float = 0.03, min_depth: float = 0.1,
                  max_depth: float = 80.0) -> Tuple[List[str], List[str], Dict[str, Any], Dict[str, int]]:
    """K depth questions, answers and targets for one prepared image.

    ``depth_prepared``: z (metres, NaN invalid) in the prepared geometry. Labels are the ray
    distance (or z for ``depth_kind="z"``) at the position the question's text coordinates refer
    to; pixels whose label is outside ``[min_depth, max_depth]`` are not used. Pixels are sampled
    uniformly (without replacement) among those that qualify. Returns (questions, answers,
    targets, counts) with counts ``valid_pixels`` and ``out_of_range_pixels``; no questions when
    no pixel qualifies.
    """
    intr = prepared.intrinsics
    W, H = intr.width, intr.height
    scale = int(spec.coord_scale)
    kind = spec.option("depth_kind", "ray")
    mask, ref_x, ref_y = _candidate_mask(depth_prepared, scale, margin)
    rows, cols = np.nonzero(mask)
    z = depth_prepared[rows, cols].astype(np.float64)
    values = z * _ray_norms(intr, ref_x, ref_y, rows, cols) if kind == "ray" else z
    with np.errstate(invalid="ignore"):
        in_range = (values >= min_depth) & (values <= max_depth)
    counts = {"valid_pixels": int(in_range.sum()), "out_of_range_pixels": int((~in_range).sum())}
    idx = np.flatnonzero(in_range)
    if idx.size == 0:
        return [], [], {}, counts
    pick = rng.choice(idx, size=min(k, idx.size), replace=False)
    text, ref = _point_text(cols[pick], rows[pick], W, H, scale)
    questions = [protocol.depth_question(int(nx), int(ny), spec) for nx, ny in text]
    answers = [protocol.format_depth_answer(float(v), spec) for v in values[pick]]
    targets = {"values": [round(float(v), 6) for v in values[pick]], "kind": kind,
               "pixels": [[round(float(x), 4), round(float(y), 4)] for x, y in ref],
               "norm": [[int(a), int(b)] for a, b in text]}
    return questions, answers, targets, counts


def correspondence_targets(prep1: PreparedImage, depth1: np.ndarray, prep2: PreparedImage, depth2: np.ndarray,
                           T_c2_c1: np.ndarray, spec: TaskSpec, k: int, rng: np.random.Generator, *,
                           margin: float = 0.03, tolerance: float = 0.05,
                           think: bool = False) -> Tuple[List[str], List[str], Dict[str, Any]]:
    """K correspondence questions, answers and targets for a prepared image pair.

    ``depth1``/``depth2``: z in each prepared geometry. A pixel of image 1 (valid depth, inside
    the margin) is lifted, moved by ``T_c2_c1`` and projected into image 2; it qualifies when it
    lands inside image 2 (and its margin) where image 2's depth agrees within ``tolerance``
    (relative). Pixels are sampled uniformly among those that qualify.
    """
    i1, i2 = prep1.intrinsics, prep2.intrinsics
    scale = int(spec.coord_scale)
    mask, ref_x, ref_y = _candidate_mask(depth1, scale, margin)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return [], [], {}
    ref = np.stack([ref_x[cols], ref_y[rows]], axis=1)
    # Check a random subset first, then the rest if needed: either way the pixels kept are a
    # uniform sample of those that qualify.
    order = rng.permutation(rows.size)
    chosen: List[int] = []
    uv2_all = np.full((rows.size, 2), np.nan)
    for chunk in (order[: 40 * k], order[40 * k:]):
        if chunk.size == 0 or len(chosen) >= k:
            continue
        z1 = depth1[rows[chunk], cols[chunk]].astype(np.float64)
        uv2, z2 = _reproject(ref[chunk], z1, i1, T_c2_c1, i2)
        _, ok = _visible(uv2, z2, depth2, tolerance, require_depth=True)
        mx, my = margin * i2.width, margin * i2.height
        with np.errstate(invalid="ignore"):
            ok &= (uv2[:, 0] >= mx - 0.5) & (uv2[:, 0] <= i2.width - 0.5 - mx)
            ok &= (uv2[:, 1] >= my - 0.5) & (uv2[:, 1] <= i2.height - 0.5 - my)
        uv2_all[chunk] = uv2
        chosen.extend(chunk[ok][: k - len(chosen)].tolist())
    if not chosen:
        return [], [], {}
    pick = np.asarray(chosen)
    uv2 = uv2_all[pick]
    text, _ = _point_text(cols[pick], rows[pick], i1.width, i1.height, scale)
    norm2 = (uv2 + 0.0) / (i2.width, i2.height) * scale
    questions = [protocol.correspondence_question(int(nx), int(ny), think=think, spec=spec) for nx, ny in text]
    answers = [protocol.format_correspondence_answer(float(x), float(y), spec) for x, y in norm2]
    targets = {"points": [[round(float(x), 3), round(float(y), 3)] for x, y in norm2],
               "pixels2": [[round(float(x), 3), round(float(y), 3)] for x, y in uv2],
               "pixels1": [[round(float(x), 3), round(float(y), 3)] for x, y in ref[pick]],
               "norm1": [[int(a), int(b)] for a, b in text]}
    return questions, answers, targets


def pose_targets(T_c1_c2: np.ndarray, spec: TaskSpec) -> Tuple[List[str], List[str], Dict[str, Any]]:
    """The pose questions and answers of ``spec`` for the relative pose camera 1 <- camera 2."""
    answers = protocol.format_pose_answers(T_c1_c2[:3, :3], T_c1_c2[:3, 3], spec)
    questions = protocol.pose_questions(spec)
    ids = [qid for qid in questions if qid in answers]
    return ([questions[q] for q in ids], [answers[q] for q in ids],
            {"T": [[float(v) for v in row] for row in T_c1_c2], "question_ids": ids})
