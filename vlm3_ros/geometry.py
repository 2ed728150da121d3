"""Camera geometry: rays and depth, projection, rotations, rigid poses and pose estimation.

Conventions used throughout (and by the rest of ``vlm3_ros``):

* **Camera frame**: the optical frame of REP-103, x right, y down, z forward.
* **Pixels**: continuous coordinates ``(u, v)`` = (column, row) with integer values at pixel
  centres, so pixel ``(0, 0)`` is the centre of the top-left pixel.
* **Intrinsics**: a 3x3 pinhole matrix ``K`` (``fx, fy > 0``, bottom row ``[0, 0, 1]``; skew is
  allowed). Distortion is handled elsewhere (images are undistorted before they get here).
* **Depth**: ``z`` is the distance along the optical axis (what a depth image stores, REP-118);
  ``ray`` (or "distance") is the Euclidean distance from the camera centre to the point. They are
  related by ``z = ray / |K^-1 [u, v, 1]|``.
* **Poses**: 4x4 homogeneous matrices. ``T_a_b`` maps points in frame ``b`` to frame ``a``:
  ``X_a = T_a_b @ X_b``; its rotation holds ``b``'s axes expressed in ``a`` and its translation is
  ``b``'s origin expressed in ``a``. World poses are camera-to-world ``T_w_c`` (as 7-Scenes
  ``pose.txt`` files), so the relative pose "camera 1 <- camera 2" is
  ``T_c1_c2 = inv(T_w_c1) @ T_w_c2``.
* **VLM3 Euler angles**: ``R = Ry(yaw) @ Rx(pitch) @ Rz(roll)`` with ordinary right-handed
  rotation matrices (intrinsic Y-X'-Z''). Positive yaw turns the camera right (its forward axis
  moves toward +x), positive pitch looks up (forward moves toward -y), positive roll turns the
  camera's x axis toward +y.

Every function validates its inputs and raises :class:`GeometryError` (a ``ValueError``) naming
the problem. Functions are vectorised over points (``(N, 2)`` / ``(N, 3)`` arrays) and, where it
is natural, over stacks of rotations / poses (``(..., 3, 3)`` / ``(..., 4, 4)``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

__all__ = [
    "GeometryError",
    "PoseEstimate",
    "as_intrinsics",
    "ray_norm",
    "ray_to_z",
    "z_to_ray",
    "backproject",
    "project",
    "depth_image_to_points",
    "nearest_pixel",
    "sample_nearest",
    "euler_to_matrix",
    "matrix_to_euler",
    "rotation_angle",
    "make_pose",
    "invert_pose",
    "orthonormalize",
    "compose",
    "relative_pose",
    "transform_points",
    "unit",
    "angle_between",
    "pose_from_correspondences",
    "umeyama",
    "estimate_pose_3d",
    "pose_from_3d_matches",
]

DEPTH_KINDS = ("z", "ray")

#: Tolerance for accepting a matrix as a rotation (max deviation of R^T R from I, and of det from
#: 1). Loose enough for stored ground truth that is slightly off orthonormal (7-Scenes KinectFusion
#: poses deviate by up to about 2e-4), tight enough to reject anything that is not a rotation.
ROTATION_TOLERANCE = 2e-3


class GeometryError(ValueError):
    """Raised for invalid geometric input (bad shapes, non-finite values, degenerate data)."""


@dataclass(frozen=True)
class PoseEstimate:
    """Result of a robust relative pose estimate.

    Attributes:
        T: 4x4 relative pose ``T_c1_c2`` (camera 1 <- camera 2).
        inliers: boolean mask over the input correspondences (rows that were invalid on input,
            e.g. non-finite or non-positive depth, are ``False``).
        num_inliers: ``int(inliers.sum())``.
        residual: RMS residual over the inliers (pixels for PnP, input units for 3D-3D).
    """

    T: np.ndarray
    inliers: np.ndarray
    num_inliers: int
    residual: float = float("nan")


# --------------------------------------------------------------------------------------------
# Input validation helpers
# --------------------------------------------------------------------------------------------


def as_intrinsics(K: Any) -> np.ndarray:
    """Return ``K`` as a validated float64 3x3 pinhole matrix.

    Accepts a 3x3 array-like, or any object with a ``K`` attribute holding one (for instance
    :class:`vlm3_ros.camera.Intrinsics`). Such an object that reports lens distortion
    (``has_distortion``) is rejected: these functions model an ideal pinhole, so undistort first.
    """
    if hasattr(K, "K") and not isinstance(K, np.ndarray):
        if getattr(K, "has_distortion", False):
            raise GeometryError(
                f"intrinsics {K!r} have lens distortion; undistort to an ideal pinhole first"
            )
        K = K.K
    try:
        K = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"intrinsics must be a 3x3 numeric matrix, got {K!r}") from exc
    if K.shape != (3, 3):
        raise GeometryError(f"intrinsics K must have shape (3, 3), got {K.shape}")
    if not np.all(np.isfinite(K)):
        raise GeometryError(f"intrinsics K contains non-finite values: {K.tolist()}")
    if not np.allclose(K[2], [0.0, 0.0, 1.0]):
        raise GeometryError(f"intrinsics K must have bottom row [0, 0, 1], got {K[2].tolist()}")
    if K[1, 0] != 0.0:
        raise GeometryError(f"intrinsics K must be upper triangular, got K[1, 0] = {K[1, 0]}")
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise GeometryError(f"focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}")
    return K


def _as_uv(uv: Any, name: str = "uv") -> Tuple[np.ndarray, bool]:
    """Return ``(N, 2)`` float64 pixels and whether a single ``(2,)`` pixel was given."""
    a = np.asarray(uv, dtype=np.float64)
    if a.shape == (2,):
        return a[None, :], True
    if a.ndim != 2 or a.shape[1] != 2:
        raise GeometryError(f"{name} must have shape (N, 2) or (2,), got {a.shape}")
    return a, False


def _as_points(points: Any, name: str = "points") -> Tuple[np.ndarray, bool]:
    a = np.asarray(points, dtype=np.float64)
    if a.shape == (3,):
        return a[None, :], True
    if a.ndim != 2 or a.shape[1] != 3:
        raise GeometryError(f"{name} must have shape (N, 3) or (3,), got {a.shape}")
    return a, False


def _as_values(values: Any, n: int, name: str) -> np.ndarray:
    """Per-point scalar values broadcast to ``(n,)``."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 0:
        return np.full(n, float(a))
    a = a.reshape(-1) if a.ndim == 2 and 1 in a.shape else a
    if a.shape != (n,):
        raise GeometryError(f"{name} must be a scalar or have shape ({n},), got {a.shape}")
    return a


def _require_finite(a: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise GeometryError(
            f"{name} contains non-finite values (first at index {tuple(int(i) for i in bad)}: "
            f"{a[tuple(bad)]})"
        )


def _as_rotation(R: Any, name: str = "R") -> np.ndarray:
    """Validated ``(..., 3, 3)`` rotation matrix (or stack)."""
    a = np.asarray(R, dtype=np.float64)
    if a.ndim < 2 or a.shape[-2:] != (3, 3):
        raise GeometryError(f"{name} must have shape (..., 3, 3), got {a.shape}")
    _require_finite(a, name)
    eye = np.eye(3)
    orth = np.abs(np.swapaxes(a, -1, -2) @ a - eye).max(initial=0.0)
    det = np.linalg.det(a) if a.size else np.ones(1)
    if orth > ROTATION_TOLERANCE or np.abs(det - 1.0).max(initial=0.0) > ROTATION_TOLERANCE:
        raise GeometryError(
            f"{name} is not a rotation matrix (max |R^T R - I| = {orth:.3g}, "
            f"det = {np.asarray(det).reshape(-1)[:3].tolist()})"
        )
    return a


def _as_pose(T: Any, name: str = "T") -> np.ndarray:
    """Validated ``(..., 4, 4)`` rigid transform (or stack)."""
    a = np.asarray(T, dtype=np.float64)
    if a.ndim < 2 or a.shape[-2:] != (4, 4):
        raise GeometryError(f"{name} must have shape (..., 4, 4), got {a.shape}")
    _require_finite(a, name)
    if not np.allclose(a[..., 3, :], [0.0, 0.0, 0.0, 1.0]):
        raise GeometryError(f"{name} must have bottom row [0, 0, 0, 1]")
    _as_rotation(a[..., :3, :3], f"rotation part of {name}")
    return a


# --------------------------------------------------------------------------------------------
# Rays, depth and projection
# --------------------------------------------------------------------------------------------


def _rays(uv: np.ndarray, K: np.ndarray) -> np.ndarray:
    """``K^-1 [u, v, 1]`` for each row of ``uv`` (rays with unit z)."""
    fx, s, cx = K[0]
    fy, cy = K[1, 1], K[1, 2]
    y = (uv[:, 1] - cy) / fy
    x = (uv[:, 0] - cx - s * y) / fx
    return np.stack([x, y, np.ones_like(x)], axis=1)


def ray_norm(uv: Any, K: Any) -> np.ndarray:
    """Length of ``K^-1 [u, v, 1]`` for each pixel: the ray distance of a point at ``z = 1``.

    Args:
        uv: pixels, ``(N, 2)`` (or one ``(2,)`` pixel, giving a 0-d result).
        K: 3x3 intrinsics.

    Returns:
        ``(N,)`` array, always >= 1 (equal to 1 at the principal point).
    """
    K = as_intrinsics(K)
    uv_, single = _as_uv(uv)
    n = np.linalg.norm(_rays(uv_, K), axis=1)
    return n[0] if single else n


def ray_to_z(distance: Any, uv: Any, K: Any) -> np.ndarray:
    """Convert ray distances (camera centre to point) to depth along z: ``z = d / |K^-1 [u,v,1]|``.

    Non-finite distances propagate as NaN/inf; no sign check is made (a pure conversion).
    """
    uv_, single = _as_uv(uv)
    n = np.atleast_1d(ray_norm(uv_, K))
    z = _as_values(distance, len(n), "distance") / n
    return z[0] if single else z


def z_to_ray(z: Any, uv: Any, K: Any) -> np.ndarray:
    """Convert depth along z to ray distance: ``d = z * |K^-1 [u, v, 1]|`` (inverse of ray_to_z)."""
    uv_, single = _as_uv(uv)
    n = np.atleast_1d(ray_norm(uv_, K))
    d = _as_values(z, len(n), "z") * n
    return d[0] if single else d


def backproject(uv: Any, depth: Any, K: Any, kind: str = "z") -> np.ndarray:
    """Lift pixels with depth to 3D points in the camera optical frame.

    Args:
        uv: ``(N, 2)`` pixels (or one ``(2,)`` pixel).
        depth: ``(N,)`` depth values (or a scalar), metres; NaN propagates to NaN points.
        K: 3x3 intrinsics.
        kind: ``"z"`` (depth along the optical axis) or ``"ray"`` (Euclidean distance).

    Returns:
        ``(N, 3)`` points (``(3,)`` for a single pixel).
    """
    if kind not in DEPTH_KINDS:
        raise GeometryError(f"depth kind must be one of {DEPTH_KINDS}, got {kind!r}")
    K = as_intrinsics(K)
    uv_, single = _as_uv(uv)
    rays = _rays(uv_, K)
    d = _as_values(depth, len(uv_), "depth")
    z = d / np.linalg.norm(rays, axis=1) if kind == "ray" else d
    pts = rays * z[:, None]
    return pts[0] if single else pts


def project(points: Any, K: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Project camera-frame 3D points to pixels.

    Args:
        points: ``(N, 3)`` points in the optical frame (or one ``(3,)`` point).
        K: 3x3 intrinsics.

    Returns:
        ``(uv, z)``: ``(N, 2)`` pixels and ``(N,)`` depths along z. Points with ``z <= 0`` (on or
        behind the camera plane) get ``uv = NaN``; use ``z > 0`` to mask them.
    """
    K = as_intrinsics(K)
    p, single = _as_points(points)
    z = p[:, 2].copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        x = p[:, 0] / z
        y = p[:, 1] / z
    uv = np.stack([K[0, 0] * x + K[0, 1] * y + K[0, 2], K[1, 1] * y + K[1, 2]], axis=1)
    uv[~(z > 0)] = np.nan
    if single:
        return uv[0], z[0]
    return uv, z


def depth_image_to_points(
    depth: Any, K: Any, stride: int = 1, mask: Optional[Any] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Convert a depth image (metres along z) to 3D points.

    Args:
        depth: ``(H, W)`` depth image in metres along z; ``0``, negative and NaN/inf are invalid.
        K: 3x3 intrinsics of that image.
        stride: keep every ``stride``-th row and column, starting at pixel ``(0, 0)``.
        mask: optional ``(H, W)`` boolean image; only pixels where it is true are kept.

    Returns:
        ``(points, uv)``: ``(M, 3)`` points in the optical frame and their ``(M, 2)`` pixels,
        in row-major order.
    """
    K = as_intrinsics(K)
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim != 2:
        raise GeometryError(f"depth image must have shape (H, W), got {d.shape}")
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise GeometryError(f"stride must be a positive integer, got {stride!r}")
    valid = np.isfinite(d) & (d > 0)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != d.shape:
            raise GeometryError(f"mask shape {m.shape} does not match depth shape {d.shape}")
        valid &= m.astype(bool)
    if stride > 1:
        sub = np.zeros_like(valid)
        sub[::stride, ::stride] = True
        valid &= sub
    rows, cols = np.nonzero(valid)
    uv = np.stack([cols, rows], axis=1).astype(np.float64)
    pts = _rays(uv, K) * d[rows, cols][:, None]
    return pts, uv


def nearest_pixel(uv: Any, width: int, height: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column and row of the pixel whose centre is nearest to each ``uv`` (halves round up), and
    whether it lies inside a ``width`` x ``height`` image (non-finite ``uv`` are outside)."""
    uv_, _ = _as_uv(uv)
    finite = np.all(np.isfinite(uv_), axis=1)
    cols = np.full(len(uv_), -1, dtype=np.int64)
    rows = np.full(len(uv_), -1, dtype=np.int64)
    cols[finite] = np.floor(uv_[finite, 0] + 0.5).astype(np.int64)
    rows[finite] = np.floor(uv_[finite, 1] + 0.5).astype(np.int64)
    inside = finite & (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    return cols, rows, inside


def sample_nearest(image: Any, uv: Any, fill: float = np.nan) -> np.ndarray:
    """Values of ``image`` at the pixel nearest to each ``uv`` (``fill`` outside or for NaN uv).

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array.
        uv: ``(N, 2)`` continuous pixel coordinates.

    Returns:
        ``(N,)`` or ``(N, C)`` float64 values.
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise GeometryError(f"image must have shape (H, W) or (H, W, C), got {img.shape}")
    uv_, _ = _as_uv(uv)
    h, w = img.shape[:2]
    cols, rows, inside = nearest_pixel(uv_, w, h)
    out = np.full((len(uv_),) + img.shape[2:], fill, dtype=np.float64)
    out[inside] = img[rows[inside], cols[inside]]
    return out


# --------------------------------------------------------------------------------------------
# Rotations
# --------------------------------------------------------------------------------------------


def euler_to_matrix(yaw: Any, pitch: Any, roll: Any, degrees: bool = True) -> np.ndarray:
    """VLM3 Euler angles to a rotation matrix ``R = Ry(yaw) @ Rx(pitch) @ Rz(roll)``.

    Scalars give a 3x3 matrix; equal-length 1-D arrays give ``(N, 3, 3)``.
    """
    parts = (np.asarray(a, dtype=np.float64) for a in (yaw, pitch, roll))
    angles = np.stack(np.broadcast_arrays(*parts), axis=-1)
    _require_finite(angles, "euler angles")
    if angles.ndim > 2:
        raise GeometryError(
            f"euler angles must be scalars or 1-D arrays, got shape {angles.shape[:-1]}"
        )
    return Rotation.from_euler("YXZ", angles, degrees=degrees).as_matrix()


def matrix_to_euler(R: Any, degrees: bool = True) -> Tuple[Any, Any, Any]:
    """Rotation matrix to VLM3 Euler angles ``(yaw, pitch, roll)`` (inverse of euler_to_matrix).

    Ranges: yaw and roll in [-180, 180], pitch in [-90, 90] (degrees). At gimbal lock
    (pitch = +-90) yaw and roll are not unique: roll is set to 0 and yaw absorbs the rest.
    """
    Rm = _as_rotation(R)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Gg]imbal lock.*")
        e = Rotation.from_matrix(Rm).as_euler("YXZ", degrees=degrees)
    return e[..., 0], e[..., 1], e[..., 2]


def rotation_angle(R: Any, degrees: bool = True) -> Any:
    """Geodesic rotation angle of ``R`` (or of each matrix of a stack), in [0, 180] degrees.

    Uses ``atan2(|axis * sin|, cos)`` which is accurate for small and large angles alike.
    """
    Rm = _as_rotation(R)
    cos = (np.trace(Rm, axis1=-2, axis2=-1) - 1.0) / 2.0
    w = np.stack(
        [
            Rm[..., 2, 1] - Rm[..., 1, 2],
            Rm[..., 0, 2] - Rm[..., 2, 0],
            Rm[..., 1, 0] - Rm[..., 0, 1],
        ],
        axis=-1,
    )
    sin = np.linalg.norm(w, axis=-1) / 2.0
    ang = np.arctan2(sin, cos)
    if degrees:
        ang = np.degrees(ang)
    return float(ang) if np.ndim(ang) == 0 else ang


# --------------------------------------------------------------------------------------------
# Rigid poses
# --------------------------------------------------------------------------------------------


def make_pose(R: Any, t: Any) -> np.ndarray:
    """Build a 4x4 pose (or ``(N, 4, 4)`` stack) from rotation(s) and translation(s)."""
    Rm = _as_rotation(R)
    tv = np.asarray(t, dtype=np.float64)
    if tv.shape != Rm.shape[:-1]:
        raise GeometryError(
            f"translation shape {tv.shape} does not match rotation shape {Rm.shape}"
        )
    _require_finite(tv, "translation")
    T = np.zeros(Rm.shape[:-2] + (4, 4))
    T[..., :3, :3] = Rm
    T[..., :3, 3] = tv
    T[..., 3, 3] = 1.0
    return T


def invert_pose(T: Any) -> np.ndarray:
    """Inverse of a rigid transform (or stack).

    The exact matrix inverse is used (not ``R^T``), so ``invert_pose(T) @ T == I`` to rounding
    even for stored poses whose rotation is slightly off orthonormal.
    """
    Tm = _as_pose(T)
    out = np.linalg.inv(Tm)
    out[..., 3, :] = (0.0, 0.0, 0.0, 1.0)
    return out


def orthonormalize(R: Any) -> np.ndarray:
    """Nearest rotation matrix (Frobenius norm) to ``R`` (or each of a stack), via SVD."""
    a = np.asarray(R, dtype=np.float64)
    if a.ndim < 2 or a.shape[-2:] != (3, 3):
        raise GeometryError(f"R must have shape (..., 3, 3), got {a.shape}")
    _require_finite(a, "R")
    U, _, Vt = np.linalg.svd(a)
    d = np.sign(np.linalg.det(U @ Vt))
    U = U.copy()
    U[..., :, 2] *= d[..., None]
    return U @ Vt


def compose(*Ts: Any) -> np.ndarray:
    """Product ``Ts[0] @ Ts[1] @ ...`` of rigid transforms (stacks broadcast)."""
    if not Ts:
        raise GeometryError("compose needs at least one transform")
    out = _as_pose(Ts[0], "Ts[0]")
    for i, T in enumerate(Ts[1:], start=1):
        out = out @ _as_pose(T, f"Ts[{i}]")
    return out


def relative_pose(T_w_c1: Any, T_w_c2: Any) -> np.ndarray:
    """Relative pose camera 1 <- camera 2 from camera-to-world poses: ``inv(T_w_c1) @ T_w_c2``."""
    return invert_pose(T_w_c1) @ _as_pose(T_w_c2, "T_w_c2")


def transform_points(T: Any, points: Any) -> np.ndarray:
    """Apply a rigid transform to ``(N, 3)`` points: ``R @ p + t`` for each row."""
    Tm = _as_pose(T)
    if Tm.shape != (4, 4):
        raise GeometryError(f"transform_points needs a single 4x4 transform, got {Tm.shape}")
    p, single = _as_points(points)
    out = p @ Tm[:3, :3].T + Tm[:3, 3]
    return out[0] if single else out


# --------------------------------------------------------------------------------------------
# Vectors
# --------------------------------------------------------------------------------------------


def unit(v: Any, eps: float = 1e-12) -> np.ndarray:
    """Normalise vectors along the last axis; raises for (near) zero-length vectors."""
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 0 or a.shape[-1] == 0:
        raise GeometryError(f"unit needs vectors along the last axis, got shape {a.shape}")
    _require_finite(a, "vector")
    n = np.linalg.norm(a, axis=-1, keepdims=True)
    if np.any(n <= eps):
        raise GeometryError(f"cannot normalise a zero-length vector (norm <= {eps})")
    return a / n


def angle_between(v1: Any, v2: Any, degrees: bool = True) -> Any:
    """Angle between vectors (along the last axis, broadcasting), in [0, 180] degrees.

    Computed as ``atan2(|v1 x v2|, v1 . v2)``, accurate near 0 and 180. Zero-length vectors raise.
    """
    a = unit(v1)
    b = unit(v2)
    if a.shape[-1] != 3 or b.shape[-1] != 3:
        # General dimension: fall back to a clipped arccos.
        ang = np.arccos(np.clip(np.sum(a * b, axis=-1), -1.0, 1.0))
    else:
        ang = np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), np.sum(a * b, axis=-1))
    if degrees:
        ang = np.degrees(ang)
    return float(ang) if np.ndim(ang) == 0 else ang


# --------------------------------------------------------------------------------------------
# Pose estimation
# --------------------------------------------------------------------------------------------


def _check_spread(points: np.ndarray, what: str, rank: int = 2, rel_tol: float = 1e-6) -> None:
    """Raise if centred ``points`` span fewer than ``rank + 1`` dimensions (collinear etc.)."""
    c = points - points.mean(axis=0)
    s = np.linalg.svd(c, compute_uv=False)
    if s[0] <= 0 or s[rank - 1] <= rel_tol * s[0]:
        shape = "coincident" if s[0] <= 0 else ("collinear" if rank >= 2 else "degenerate")
        raise GeometryError(f"{what} are degenerate ({shape}; singular values {s.tolist()})")


def pose_from_correspondences(
    uv1: Any,
    depth1: Any,
    uv2: Any,
    K1: Any,
    K2: Any = None,
    *,
    depth_kind: str = "z",
    ransac_reprojection_px: float = 2.0,
    confidence: float = 0.999,
    min_inliers: int = 6,
    max_iterations: int = 1000,
) -> PoseEstimate:
    """Relative pose camera 1 <- camera 2 from pixels with depth in frame 1 matched to frame 2.

    Frame 1's pixels are lifted to 3D with their depth (``depth_kind`` ``"z"`` or ``"ray"``),
    ``cv2.solvePnPRansac`` finds the pose of camera 2 relative to those points (camera 2 <-
    camera 1), the pose is refined with Levenberg-Marquardt on the inliers, then inverted.

    Rows with non-finite values or non-positive depth are ignored (their inlier flag is False).

    Args:
        uv1: ``(N, 2)`` pixels in image 1.
        depth1: ``(N,)`` depth of those pixels in metres.
        uv2: ``(N, 2)`` matching pixels in image 2.
        K1: intrinsics of image 1; ``K2`` those of image 2 (default: ``K1``).
        ransac_reprojection_px: RANSAC inlier threshold in image-2 pixels.
        confidence: RANSAC confidence.
        min_inliers: raise if fewer inliers (or fewer valid rows) than this.
        max_iterations: RANSAC iteration cap.

    Returns:
        :class:`PoseEstimate` with ``T = T_c1_c2`` and ``residual`` = inlier RMS reprojection
        error in pixels.

    Raises:
        GeometryError: mismatched shapes, too few valid points or inliers, degenerate points, or
            a PnP failure.
    """
    K1m = as_intrinsics(K1)
    K2m = K1m if K2 is None else as_intrinsics(K2)
    a, _ = _as_uv(uv1, "uv1")
    b, _ = _as_uv(uv2, "uv2")
    if a.shape != b.shape:
        raise GeometryError(f"uv1 and uv2 must have the same shape, got {a.shape} and {b.shape}")
    d = _as_values(depth1, len(a), "depth1")
    if int(min_inliers) < 4:
        raise GeometryError(f"min_inliers must be at least 4 for PnP, got {min_inliers}")
    if not ransac_reprojection_px > 0:
        raise GeometryError(
            f"ransac_reprojection_px must be positive, got {ransac_reprojection_px}"
        )
    if not 0 < confidence < 1:
        raise GeometryError(f"confidence must be in (0, 1), got {confidence}")

    valid = np.all(np.isfinite(a), axis=1) & np.all(np.isfinite(b), axis=1)
    valid &= np.isfinite(d) & (d > 0)
    n_valid = int(valid.sum())
    if n_valid < min_inliers:
        raise GeometryError(
            f"too few valid correspondences for PnP: {n_valid} of {len(a)} have finite pixels and "
            f"positive depth, need at least {min_inliers}"
        )
    obj = backproject(a[valid], d[valid], K1m, kind=depth_kind)
    img = b[valid]
    _check_spread(obj, "3D points of frame 1")
    _check_spread(img, "pixels of frame 2", rank=2)

    ok, rvec, tvec, idx = cv2.solvePnPRansac(
        obj,
        img,
        K2m,
        None,
        iterationsCount=int(max_iterations),
        reprojectionError=float(ransac_reprojection_px),
        confidence=float(confidence),
        flags=cv2.SOLVEPNP_EPNP,
    )
    if not ok or idx is None:
        raise GeometryError(f"PnP RANSAC found no pose from {n_valid} correspondences")
    inl_local = np.zeros(n_valid, dtype=bool)
    inl_local[np.asarray(idx).reshape(-1)] = True
    if inl_local.sum() < min_inliers:
        raise GeometryError(
            f"PnP RANSAC found only {int(inl_local.sum())} inliers (< min_inliers={min_inliers}) "
            f"among {n_valid} correspondences at {ransac_reprojection_px} px"
        )
    # Refine on the inliers, re-select inliers with the refined pose, and refine once more.
    for _ in range(2):
        rvec, tvec = cv2.solvePnPRefineLM(obj[inl_local], img[inl_local], K2m, None, rvec, tvec)
        proj, _ = cv2.projectPoints(obj, rvec, tvec, K2m, None)
        err = np.linalg.norm(proj.reshape(-1, 2) - img, axis=1)
        new_inl = err < ransac_reprojection_px
        if new_inl.sum() < min_inliers or np.array_equal(new_inl, inl_local):
            break
        inl_local = new_inl
    R21, _ = cv2.Rodrigues(rvec)
    T_c2_c1 = np.eye(4)
    T_c2_c1[:3, :3] = R21
    T_c2_c1[:3, 3] = np.asarray(tvec).reshape(3)
    T = invert_pose(T_c2_c1)
    inliers = np.zeros(len(a), dtype=bool)
    inliers[np.flatnonzero(valid)[inl_local]] = True
    rms = float(np.sqrt(np.mean(err[inl_local] ** 2)))
    return PoseEstimate(T=T, inliers=inliers, num_inliers=int(inliers.sum()), residual=rms)


def umeyama(
    src: Any, dst: Any, with_scale: bool = False, allow_degenerate: bool = False
) -> Tuple[np.ndarray, np.ndarray, float]:
    """Least-squares similarity (or rigid) transform with ``dst ~ s * R @ src + t``.

    Umeyama (1991); with ``with_scale=False`` this is the Kabsch solution and ``s = 1``.

    Args:
        src, dst: ``(N, D)`` matched points (D = 2 or 3, usually 3).
        with_scale: also estimate a uniform scale.
        allow_degenerate: return an optimal (but non-unique) solution for collinear / too few
            points instead of raising. Useful where only the residual matters.

    Returns:
        ``(R, t, s)``: ``(D, D)`` rotation, ``(D,)`` translation and scale.
    """
    x = np.asarray(src, dtype=np.float64)
    y = np.asarray(dst, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise GeometryError(f"src and dst must both have shape (N, D), got {x.shape} and {y.shape}")
    n, dim = x.shape
    if n == 0:
        raise GeometryError("umeyama needs at least one point pair")
    _require_finite(x, "src")
    _require_finite(y, "dst")
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    cov = yc.T @ xc / n
    U, S, Vt = np.linalg.svd(cov)
    if not allow_degenerate and (n < dim or S[0] <= 0 or S[dim - 2] <= 1e-9 * S[0]):
        raise GeometryError(
            f"umeyama: points are degenerate (need {dim} or more non-collinear pairs; got {n} "
            f"pairs, cross-covariance singular values {S.tolist()})"
        )
    sign = np.ones(dim)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        sign[-1] = -1.0
    R = (U * sign) @ Vt
    if with_scale:
        var = np.sum(xc**2) / n
        if var <= 0:
            raise GeometryError("umeyama: source points are all identical, scale is undefined")
        s = float(np.sum(S * sign) / var)
    else:
        s = 1.0
    t = my - s * R @ mx
    return R, t, s


def _kabsch_batch(
    x: np.ndarray, y: np.ndarray, with_scale: bool
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Umeyama on a batch of minimal samples: x, y ``(B, k, 3)`` -> R ``(B,3,3)``, t, s."""
    mx = x.mean(axis=1, keepdims=True)
    my = y.mean(axis=1, keepdims=True)
    xc, yc = x - mx, y - my
    cov = np.swapaxes(yc, 1, 2) @ xc
    U, S, Vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(U) * np.linalg.det(Vt))
    d[d == 0] = 1.0
    sign = np.ones((len(x), 3))
    sign[:, 2] = d
    R = (U * sign[:, None, :]) @ Vt
    if with_scale:
        var = np.sum(xc**2, axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.sum(S * sign, axis=1) / var
    else:
        s = np.ones(len(x))
    t = my[:, 0] - s[:, None] * np.einsum("bij,bj->bi", R, mx[:, 0])
    return R, t, s


def estimate_pose_3d(
    p1: Any,
    p2: Any,
    *,
    ransac: bool = False,
    threshold: float = 0.05,
    confidence: float = 0.999,
    max_iterations: int = 2000,
    with_scale: bool = False,
    seed: Optional[int] = 0,
) -> PoseEstimate:
    """Rigid (or similarity) pose camera 1 <- camera 2 from matched 3D points.

    ``p1[i]`` and ``p2[i]`` are the same physical point in camera 1's and camera 2's frames, so the
    result satisfies ``p1 ~ T_c1_c2 @ p2`` (with ``with_scale``, ``p1 ~ s R p2 + t`` and the
    returned 4x4 has ``s R`` in its upper-left block).

    With ``ransac=True`` minimal 3-point samples are drawn (vectorised in batches), hypotheses
    are scored by the number of pairs with ``|p1 - T p2| < threshold`` (input units, metres), the
    iteration count adapts to the inlier ratio, and the best hypothesis is refitted on its
    inliers (twice). Rows with non-finite values are ignored.

    Returns:
        :class:`PoseEstimate`; ``residual`` is the inlier RMS distance.
    """
    a, _ = _as_points(p1, "p1")
    b, _ = _as_points(p2, "p2")
    if a.shape != b.shape:
        raise GeometryError(f"p1 and p2 must have the same shape, got {a.shape} and {b.shape}")
    valid = np.all(np.isfinite(a), axis=1) & np.all(np.isfinite(b), axis=1)
    idx_valid = np.flatnonzero(valid)
    a, b = a[valid], b[valid]
    if len(a) < 3:
        raise GeometryError(f"need at least 3 finite 3D-3D matches, got {len(a)}")
    _check_spread(b, "3D points of frame 2")

    def _fit(mask: np.ndarray) -> np.ndarray:
        R, t, s = umeyama(b[mask], a[mask], with_scale=with_scale)
        T = np.eye(4)
        T[:3, :3] = s * R
        T[:3, 3] = t
        return T

    def _resid(T: np.ndarray) -> np.ndarray:
        return np.linalg.norm(a - (b @ T[:3, :3].T + T[:3, 3]), axis=1)

    if ransac:
        if not threshold > 0:
            raise GeometryError(f"RANSAC threshold must be positive, got {threshold}")
        if not 0 < confidence < 1:
            raise GeometryError(f"confidence must be in (0, 1), got {confidence}")
        rng = np.random.default_rng(seed)
        n = len(a)
        best_count, best_mask = -1, None
        needed, done, batch = int(max_iterations), 0, 64
        while done < min(needed, max_iterations):
            k = min(batch, max_iterations - done)
            samples = rng.integers(0, n, size=(2 * k, 3))
            distinct = (samples[:, 0] != samples[:, 1]) & (samples[:, 0] != samples[:, 2]) & (
                samples[:, 1] != samples[:, 2]
            )
            samples = samples[distinct][:k]
            k = len(samples)
            if k == 0:
                continue
            R, t, s = _kabsch_batch(b[samples], a[samples], with_scale)
            pred = s[:, None, None] * np.einsum("bij,nj->bni", R, b) + t[:, None, :]
            res = np.linalg.norm(pred - a[None], axis=2)
            counts = np.sum(res < threshold, axis=1)
            counts[~np.isfinite(s)] = -1
            j = int(np.argmax(counts))
            if counts[j] > best_count:
                best_count, best_mask = int(counts[j]), res[j] < threshold
                w = best_count / n
                p_good = max(w**3, 1e-12)
                needed = (
                    0 if p_good >= 1 else int(np.ceil(np.log(1 - confidence) / np.log(1 - p_good)))
                )
            done += k
        if best_mask is None or best_count < 3:
            raise GeometryError(
                f"3D RANSAC found no hypothesis with 3 or more inliers at threshold {threshold}"
            )
        mask = best_mask
        T = _fit(mask)
        for _ in range(2):
            new_mask = _resid(T) < threshold
            if new_mask.sum() < 3 or np.array_equal(new_mask, mask):
                break
            mask = new_mask
            T = _fit(mask)
    else:
        mask = np.ones(len(a), dtype=bool)
        T = _fit(mask)
    r = _resid(T)[mask]
    inliers = np.zeros(len(valid), dtype=bool)
    inliers[idx_valid[mask]] = True
    return PoseEstimate(
        T=T, inliers=inliers, num_inliers=int(inliers.sum()), residual=float(np.sqrt(np.mean(r**2)))
    )


def pose_from_3d_matches(
    p1: Any,
    p2: Any,
    ransac: bool = False,
    *,
    threshold: float = 0.05,
    confidence: float = 0.999,
    max_iterations: int = 2000,
    with_scale: bool = False,
    seed: Optional[int] = 0,
) -> np.ndarray:
    """4x4 ``T_c1_c2`` with ``p1 ~ T_c1_c2 @ p2`` (Kabsch / Umeyama, optionally inside RANSAC).

    Thin wrapper around :func:`estimate_pose_3d` returning only the transform; use that
    function for the inlier mask and residual.
    """
    return estimate_pose_3d(
        p1,
        p2,
        ransac=ransac,
        threshold=threshold,
        confidence=confidence,
        max_iterations=max_iterations,
        with_scale=with_scale,
        seed=seed,
    ).T
