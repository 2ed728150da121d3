"""Evaluation metrics for depth, correspondence, relative pose and trajectories.

Conventions (see DESIGN.md, "Evaluation conventions"):

* **Depth** ``delta1``: fraction of points with ``max(pred/gt, gt/pred) < 1.25``. A prediction
  that is missing (``None``), NaN/inf or ``<= 0`` (e.g. an unparseable model answer) counts as
  wrong: it stays in the denominator. ``abs_rel`` = mean ``|pred - gt| / gt`` over the *valid*
  predictions only (invalid ones are excluded, and :func:`depth_metrics` reports how many were).
  Ground truth must be finite and positive everywhere; mask it before calling.
* **Correspondence** ``epe``: mean Euclidean distance between predicted and true points; rows with
  a non-finite prediction are excluded (counted by :func:`correspondence_metrics`).
* **Relative pose** (VGGT AUC@30): rotation error = geodesic angle of ``R_pred^T R_gt``;
  translation error = angle between the translation directions folded as ``min(e, 180 - e)``
  (so the sign of the direction is ignored); per-pair error = max of the two; AUC = mean of the
  normalised cumulative histogram over 1-degree bins from 0 to ``max_deg``.
* **Trajectories**: ATE after Umeyama alignment of the predicted positions onto the ground
  truth (SE(3) by default), RPE over frame pairs ``(i, i + delta)``.
* **Object-level 3D** (SpatialRGPT-Bench conventions): a quantitative answer (metres) succeeds
  when ``|pred - gt| <= 0.25 * gt`` ("within 25 %"; an unparseable answer fails), ``abs_rel`` over
  the parsed answers; qualitative accuracy = fraction of answers equal to the truth (unparseable
  ones are wrong). :func:`object_metrics` reports them per question id and overall.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

from .geometry import GeometryError, invert_pose, rotation_angle, umeyama

__all__ = [
    "MetricError",
    "as_predictions",
    "delta1",
    "abs_rel",
    "depth_metrics",
    "epe",
    "correspondence_metrics",
    "relative_pose_errors",
    "auc",
    "auc_percent",
    "pose_auc",
    "ate",
    "rpe",
    "quantity_success",
    "quantity_abs_rel",
    "qualitative_accuracy",
    "object_metrics",
]

#: Translation norms at or below this are treated as "no translation" by relative_pose_errors.
ZERO_TRANSLATION = 1e-9

ALIGN_MODES = ("se3", "sim3", "none")


class MetricError(ValueError):
    """Raised for invalid metric input (bad shapes, invalid ground truth, empty input)."""


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------


def as_predictions(pred: Any) -> np.ndarray:
    """1-D float64 array of predictions with ``None`` (a missing answer) mapped to NaN."""
    if isinstance(pred, np.ndarray) and pred.dtype != object:
        arr = pred.astype(np.float64)
    else:
        seq = list(pred) if not np.isscalar(pred) else [pred]
        for q in seq:
            if isinstance(q, (str, bytes)):
                raise MetricError(f"predictions must be numbers or None, not text: {q!r}")
        try:
            arr = np.array([np.nan if p is None else float(p) for p in seq], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise MetricError(f"predictions must be numbers or None, got {pred!r}") from exc
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


def _depth_inputs(pred: Any, gt: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = as_predictions(pred)
    g = np.asarray(gt, dtype=np.float64).reshape(-1)
    if p.shape != g.shape:
        raise MetricError(
            f"pred and gt must have the same number of points, got {p.size} and {g.size}"
        )
    if g.size == 0:
        raise MetricError("no points to evaluate (empty gt)")
    bad = ~(np.isfinite(g) & (g > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MetricError(
            f"ground-truth depth must be finite and > 0; {int(bad.sum())} invalid values "
            f"(first at index {i}: {g[i]})"
        )
    valid = np.isfinite(p) & (p > 0)
    return p, g, valid


def delta1(pred: Any, gt: Any, threshold: float = 1.25) -> float:
    """Fraction of points with ``max(pred/gt, gt/pred) < threshold``.

    Missing (``None``), NaN/inf and non-positive predictions count as wrong.

    Raises:
        MetricError: length mismatch, empty input, or ground truth not finite and positive.
    """
    if not threshold > 1:
        raise MetricError(f"threshold must be > 1, got {threshold}")
    p, g, valid = _depth_inputs(pred, gt)
    ratio = np.full(p.shape, np.inf)
    ratio[valid] = np.maximum(p[valid] / g[valid], g[valid] / p[valid])
    return float(np.mean(ratio < threshold))


def abs_rel(pred: Any, gt: Any) -> float:
    """Mean ``|pred - gt| / gt`` over the valid predictions.

    Invalid predictions (``None``, NaN/inf, ``<= 0``) are excluded; returns NaN when there are
    none (use :func:`depth_metrics` to get the counts alongside).
    """
    p, g, valid = _depth_inputs(pred, gt)
    if not valid.any():
        return float("nan")
    return float(np.mean(np.abs(p[valid] - g[valid]) / g[valid]))


def depth_metrics(pred: Any, gt: Any, threshold: float = 1.25) -> Dict[str, float]:
    """``delta1``, ``abs_rel`` and the ``num_points``, ``num_valid``, ``num_invalid`` counts."""
    p, _, valid = _depth_inputs(pred, gt)
    return {
        "delta1": delta1(pred, gt, threshold),
        "abs_rel": abs_rel(pred, gt),
        "num_points": int(p.size),
        "num_valid": int(valid.sum()),
        "num_invalid": int((~valid).sum()),
    }


# --------------------------------------------------------------------------------------------
# Correspondence
# --------------------------------------------------------------------------------------------


def _corr_inputs(pred: Any, gt: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(pred, np.ndarray):
        pred = [[np.nan, np.nan] if r is None else r for r in pred]
    try:
        p = np.array(pred, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricError(f"predicted points must be (N, 2) numbers or None rows: {exc}") from exc
    g = np.asarray(gt, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] != 2:
        raise MetricError(f"gt must have shape (N, 2), got {g.shape}")
    if p.shape != g.shape:
        raise MetricError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    if g.shape[0] == 0:
        raise MetricError("no correspondences to evaluate (empty gt)")
    if not np.all(np.isfinite(g)):
        raise MetricError("gt correspondences contain non-finite values")
    valid = np.all(np.isfinite(p), axis=1)
    return p, g, valid


def epe(pred: Any, gt: Any) -> float:
    """Mean Euclidean end-point error between ``(N, 2)`` predicted and true points.

    Rows whose prediction is missing or non-finite are excluded (NaN if none is valid).
    The result is in the input's units (normalised coordinates or pixels).
    """
    p, g, valid = _corr_inputs(pred, gt)
    if not valid.any():
        return float("nan")
    return float(np.mean(np.linalg.norm(p[valid] - g[valid], axis=1)))


def correspondence_metrics(
    pred: Any, gt: Any, thresholds: Tuple[float, ...] = (1.0, 3.0, 5.0)
) -> Dict[str, float]:
    """EPE, counts, and the fraction of *all* points within each threshold (invalid = wrong)."""
    p, g, valid = _corr_inputs(pred, gt)
    err = np.full(len(g), np.inf)
    err[valid] = np.linalg.norm(p[valid] - g[valid], axis=1)
    out: Dict[str, float] = {
        "epe": epe(pred, gt),
        "num_points": int(len(g)),
        "num_valid": int(valid.sum()),
        "num_invalid": int((~valid).sum()),
    }
    for th in thresholds:
        out[f"within_{th:g}"] = float(np.mean(err < th))
    return out


# --------------------------------------------------------------------------------------------
# Relative pose
# --------------------------------------------------------------------------------------------


def relative_pose_errors(
    R_pred: Any, t_pred: Any, R_gt: Any, t_gt: Any, zero_tol: float = ZERO_TRANSLATION
) -> Tuple[Any, Any]:
    """Rotation and folded translation-direction errors in degrees, VGGT style.

    * Rotation error: geodesic angle of ``R_pred^T R_gt`` in [0, 180].
    * Translation error: angle ``e`` between ``t_pred`` and ``t_gt``, folded to
      ``min(e, 180 - e)`` in [0, 90] (direction sign ambiguity is forgiven).
    * Zero-length translations (norm <= ``zero_tol``): if both are zero the error is 0; if only
      one is, the direction is undefined and the error is 90 (the worst folded value).
    * A prediction with non-finite entries (e.g. an unparseable answer) gets error ``inf`` for
      the affected term, so it counts as a failure in :func:`auc`.

    Accepts single pairs (``(3, 3)``, ``(3,)``), returning floats, or batches (``(N, 3, 3)``,
    ``(N, 3)``), returning ``(N,)`` arrays.
    """
    Rp = np.asarray(R_pred, dtype=np.float64)
    Rg = np.asarray(R_gt, dtype=np.float64)
    tp = np.asarray(t_pred, dtype=np.float64)
    tg = np.asarray(t_gt, dtype=np.float64)
    single = Rg.ndim == 2
    if single:
        Rp, Rg, tp, tg = Rp[None], Rg[None], tp[None], tg[None]
    if Rg.ndim != 3 or Rg.shape[1:] != (3, 3) or Rp.shape != Rg.shape:
        raise MetricError(
            "R_pred and R_gt must both have shape (N, 3, 3) or (3, 3), "
            f"got {np.shape(R_pred)} and {np.shape(R_gt)}"
        )
    if tg.shape != (len(Rg), 3) or tp.shape != tg.shape:
        raise MetricError(
            f"t_pred and t_gt must have shape ({len(Rg)}, 3) (or (3,)), "
            f"got {np.shape(t_pred)} and {np.shape(t_gt)}"
        )
    if not (np.all(np.isfinite(Rg)) and np.all(np.isfinite(tg))):
        raise MetricError("ground-truth rotations/translations contain non-finite values")

    n = len(Rg)
    rot = np.full(n, np.inf)
    r_ok = np.all(np.isfinite(Rp), axis=(1, 2))
    try:
        rotation_angle(Rg)
        if r_ok.any():
            rot[r_ok] = rotation_angle(np.swapaxes(Rp[r_ok], 1, 2) @ Rg[r_ok])
    except GeometryError as exc:
        raise MetricError(f"invalid rotation matrix: {exc}") from exc

    trans = np.full(n, np.inf)
    t_ok = np.all(np.isfinite(tp), axis=1)
    npred = np.linalg.norm(tp, axis=1)
    ngt = np.linalg.norm(tg, axis=1)
    zp = t_ok & (npred <= zero_tol)
    zg = ngt <= zero_tol
    trans[t_ok & zp & zg] = 0.0
    trans[t_ok & (zp ^ zg)] = 90.0
    both = t_ok & ~zp & ~zg
    if both.any():
        a = tp[both] / npred[both, None]
        b = tg[both] / ngt[both, None]
        e = np.degrees(np.arctan2(np.linalg.norm(np.cross(a, b), axis=1), np.sum(a * b, axis=1)))
        trans[both] = np.minimum(e, 180.0 - e)
    if single:
        return float(rot[0]), float(trans[0])
    return rot, trans


def auc(errors_deg: Any, max_deg: int = 30, *, trans_err_deg: Optional[Any] = None) -> float:
    """Area under the accuracy curve up to ``max_deg`` degrees, as a fraction in [0, 1].

    ``errors_deg`` holds one error per pair; if ``trans_err_deg`` is also given, ``errors_deg``
    is taken as the rotation errors and the per-pair error is ``max(rot, trans)``.

    Computed as VGGT does: a histogram of the per-pair errors over the 1-degree bins
    ``[0, 1), [1, 2), ..., [max_deg - 1, max_deg]`` (last bin closed), normalised by the number of
    pairs, cumulatively summed, then averaged over the ``max_deg`` bins. Equivalently the mean
    over ``k = 1..max_deg`` of the fraction of pairs with error below ``k`` (at most ``max_deg``
    for the last). Non-finite errors (failed pairs) count in the denominator only.
    """
    if isinstance(max_deg, bool) or not float(max_deg).is_integer() or int(max_deg) < 1:
        raise MetricError(f"max_deg must be a positive integer number of degrees, got {max_deg!r}")
    e = np.asarray(errors_deg, dtype=np.float64).reshape(-1)
    if trans_err_deg is not None:
        t = np.asarray(trans_err_deg, dtype=np.float64).reshape(-1)
        if t.shape != e.shape:
            raise MetricError(
                f"rotation and translation errors differ in length: {e.size} vs {t.size}"
            )
        e = np.where(np.isnan(e) | np.isnan(t), np.inf, np.maximum(e, t))
    if e.size == 0:
        raise MetricError("no errors to evaluate (empty input)")
    if np.any(e < 0):
        raise MetricError(f"errors must be non-negative degrees, got minimum {np.nanmin(e)}")
    e = np.where(np.isfinite(e), e, np.inf)
    hist, _ = np.histogram(e[np.isfinite(e)], bins=np.arange(int(max_deg) + 1))
    return float(np.mean(np.cumsum(hist / e.size)))


def auc_percent(
    errors_deg: Any, max_deg: int = 30, *, trans_err_deg: Optional[Any] = None
) -> float:
    """:func:`auc` expressed in percent (0 to 100), as papers report it."""
    return 100.0 * auc(errors_deg, max_deg, trans_err_deg=trans_err_deg)


def pose_auc(
    R_pred: Any, t_pred: Any, R_gt: Any, t_gt: Any, max_deg: int = 30
) -> Dict[str, Any]:
    """AUC@max_deg for batches of relative poses, with the per-pair errors used."""
    rot, trans = relative_pose_errors(R_pred, t_pred, R_gt, t_gt)
    rot, trans = np.atleast_1d(rot), np.atleast_1d(trans)
    return {
        "auc": auc(rot, max_deg, trans_err_deg=trans),
        "rot_err_deg": rot,
        "trans_err_deg": trans,
    }


# --------------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------------


def _traj(traj: Any, name: str) -> np.ndarray:
    a = np.asarray(traj, dtype=np.float64)
    if a.ndim == 3 and a.shape[1:] == (4, 4):
        pass
    elif not (a.ndim == 2 and a.shape[1] == 3):
        raise MetricError(f"{name} must be positions (N, 3) or poses (N, 4, 4), got {a.shape}")
    if a.shape[0] == 0:
        raise MetricError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise MetricError(f"{name} contains non-finite values")
    return a


def _stats(x: np.ndarray, prefix: str = "", suffix: str = "") -> Dict[str, float]:
    return {
        f"{prefix}rmse{suffix}": float(np.sqrt(np.mean(x**2))),
        f"{prefix}mean{suffix}": float(np.mean(x)),
        f"{prefix}median{suffix}": float(np.median(x)),
        f"{prefix}max{suffix}": float(np.max(x)),
    }


def ate(traj_pred: Any, traj_gt: Any, align: str = "se3") -> Dict[str, Any]:
    """Absolute trajectory error of positions after aligning the prediction onto the truth.

    Args:
        traj_pred, traj_gt: positions ``(N, 3)`` or camera-to-world poses ``(N, 4, 4)``
            (only their translations are used).
        align: ``"se3"`` (rotation + translation, Umeyama/Kabsch), ``"sim3"`` (also scale, for
            up-to-scale predictions) or ``"none"``.

    Returns:
        dict with ``rmse``, ``mean``, ``median``, ``max`` (input units), ``num_poses`` and
        ``alignment``: the 4x4 applied to the prediction (``s R`` in its upper-left block).
    """
    if align not in ALIGN_MODES:
        raise MetricError(f"align must be one of {ALIGN_MODES}, got {align!r}")
    p = _traj(traj_pred, "traj_pred")
    g = _traj(traj_gt, "traj_gt")
    if p.shape[0] != g.shape[0]:
        raise MetricError(f"trajectories differ in length: {p.shape[0]} vs {g.shape[0]}")
    pp = p[:, :3, 3] if p.ndim == 3 else p
    gp = g[:, :3, 3] if g.ndim == 3 else g
    A = np.eye(4)
    if align != "none":
        try:
            R, t, s = umeyama(pp, gp, with_scale=(align == "sim3"), allow_degenerate=True)
        except GeometryError as exc:
            raise MetricError(f"cannot align trajectories: {exc}") from exc
        A[:3, :3] = s * R
        A[:3, 3] = t
    aligned = pp @ A[:3, :3].T + A[:3, 3]
    err = np.linalg.norm(aligned - gp, axis=1)
    out: Dict[str, Any] = _stats(err)
    out["num_poses"] = int(len(err))
    out["alignment"] = A
    return out


def rpe(traj_pred: Any, traj_gt: Any, delta: int = 1) -> Dict[str, float]:
    """Relative pose error over frame pairs ``(i, i + delta)`` of camera-to-world poses.

    For each pair the error transform is ``E = inv(inv(G_i) G_j) @ inv(P_i) P_j``; its translation
    norm (input units) and rotation angle (degrees) are summarised. No alignment is needed since
    relative motions are invariant to a global rigid transform.

    Returns:
        dict with ``trans_rmse``, ``trans_mean``, ``trans_median``, ``trans_max``,
        ``rot_rmse_deg``, ``rot_mean_deg``, ``rot_median_deg``, ``rot_max_deg`` and ``num_pairs``.
    """
    p = _traj(traj_pred, "traj_pred")
    g = _traj(traj_gt, "traj_gt")
    if p.ndim != 3 or g.ndim != 3:
        raise MetricError("rpe needs full poses (N, 4, 4) for both trajectories")
    if len(p) != len(g):
        raise MetricError(f"trajectories differ in length: {len(p)} vs {len(g)}")
    if isinstance(delta, bool) or not isinstance(delta, (int, np.integer)) or delta < 1:
        raise MetricError(f"delta must be a positive integer, got {delta!r}")
    if delta >= len(p):
        raise MetricError(f"delta={delta} leaves no frame pairs in a trajectory of {len(p)} poses")
    try:
        rel_p = invert_pose(p[:-delta]) @ p[delta:]
        rel_g = invert_pose(g[:-delta]) @ g[delta:]
        E = invert_pose(rel_g) @ rel_p
        rot = np.atleast_1d(rotation_angle(E[:, :3, :3]))
    except GeometryError as exc:
        raise MetricError(f"invalid poses: {exc}") from exc
    trans = np.linalg.norm(E[:, :3, 3], axis=1)
    out = {**_stats(trans, "trans_"), **_stats(rot, "rot_", "_deg")}
    out["num_pairs"] = int(len(trans))
    return out


# --------------------------------------------------------------------------------------------
# Object-level 3D (SpatialRGPT-style questions)
# --------------------------------------------------------------------------------------------


def _quantity_inputs(pred: Any, gt: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = as_predictions(pred)
    g = np.asarray(gt, dtype=np.float64).reshape(-1)
    if p.shape != g.shape:
        raise MetricError(f"{p.size} predictions for {g.size} ground-truth values")
    if p.size == 0:
        raise MetricError("no values")
    if not np.all(np.isfinite(g) & (g > 0)):
        raise MetricError("ground-truth quantities must be finite and positive (leave zero-length truths out)")
    return p, g, np.isfinite(p) & (p >= 0)


def quantity_success(pred: Any, gt: Any, tolerance: float = 0.25) -> float:
    """Fraction of answers within ``tolerance`` (relative) of the truth; missing answers fail."""
    if not tolerance > 0:
        raise MetricError(f"tolerance must be > 0, got {tolerance}")
    p, g, valid = _quantity_inputs(pred, gt)
    ok = np.zeros(p.shape, bool)
    ok[valid] = np.abs(p[valid] - g[valid]) <= tolerance * g[valid]
    return float(np.mean(ok))


def quantity_abs_rel(pred: Any, gt: Any) -> float:
    """Mean ``|pred - gt| / gt`` over the parsed answers (NaN when there are none)."""
    p, g, valid = _quantity_inputs(pred, gt)
    if not valid.any():
        return float("nan")
    return float(np.mean(np.abs(p[valid] - g[valid]) / g[valid]))


def qualitative_accuracy(pred: Any, truth: Any) -> float:
    """Fraction of answers (bool or region index; None = unparseable, wrong) equal to the truth."""
    p, t = list(pred), list(truth)
    if len(p) != len(t):
        raise MetricError(f"{len(p)} predictions for {len(t)} truths")
    if not p:
        raise MetricError("no values")
    if any(v is None for v in t):
        raise MetricError("a truth is missing")
    return float(np.mean([a is not None and bool(a == b) for a, b in zip(p, t)]))


def object_metrics(records: Iterable[Tuple[str, Any, Any]], tolerance: float = 0.25) -> Dict[str, Dict[str, float]]:
    """Metrics of object answers ``(question id, predicted value or None, true value)``.

    Per question id: ``count``, ``unparseable`` and, for quantities, ``success_rate`` and
    ``abs_rel``; for predicates and choices ``accuracy``. ``"quantitative"`` and
    ``"qualitative"`` hold the same over all questions of each kind (quantities whose truth is 0
    are left out of the quantitative ones).
    """
    from .protocol import OBJECT_QUESTIONS

    groups: Dict[str, list] = {}
    for qid, pred, truth in records:
        if qid not in OBJECT_QUESTIONS:
            raise MetricError(f"unknown object question {qid!r}")
        groups.setdefault(qid, []).append((pred, truth))
    if not groups:
        raise MetricError("no object answers")
    out: Dict[str, Dict[str, float]] = {}
    pooled: Dict[str, list] = {"quantitative": [], "qualitative": []}
    for qid, rows in sorted(groups.items()):
        quantitative = OBJECT_QUESTIONS[qid].kind == "quantity"
        if quantitative:
            rows = [(p, t) for p, t in rows if float(t) > 0]
        pooled["quantitative" if quantitative else "qualitative"] += rows
        if rows:
            out[qid] = _object_group(rows, quantitative, tolerance)
    for name, rows in pooled.items():
        if rows:
            out[name] = _object_group(rows, name == "quantitative", tolerance)
    return out


def _object_group(rows: list, quantitative: bool, tolerance: float) -> Dict[str, float]:
    preds, truths = [p for p, _ in rows], [t for _, t in rows]
    stats = {"count": float(len(rows)), "unparseable": float(sum(p is None for p in preds))}
    if quantitative:
        stats["success_rate"] = quantity_success(preds, truths, tolerance)
        stats["abs_rel"] = quantity_abs_rel(preds, truths)
    else:
        stats["accuracy"] = qualitative_accuracy(preds, truths)
    return stats
