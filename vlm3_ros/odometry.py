"""Visual odometry from VLM3 answers: relative poses, their covariance, fusion and chaining.

Pure core (no ROS): the odometry node converts messages into :class:`OdometryFrame` objects,
calls :meth:`VisualOdometry.process` and publishes the :class:`OdometryUpdate` it returns.

Frames and conventions
----------------------
Poses are 4x4 matrices ``T_a_b`` mapping points of frame ``b`` into frame ``a`` (see
:mod:`vlm3_ros.geometry`). Cameras are optical frames (x right, y down, z forward). REP-105's
``odom`` frame is the pose of ``base_link`` at the first frame, so with the static extrinsic
``T_base_camera`` (base_link <- camera optical frame)::

    T_odom_base(t) = T_base_camera @ T_cam0_cam(t) @ inv(T_base_camera)

where ``T_cam0_cam(t)`` is the chain of measured relative camera poses.

Relative poses are measured from the current **keyframe** to each new frame. A frame becomes
the keyframe when ``keyframe_interval`` frames have passed since the last one (1: every frame,
i.e. consecutive frames), so drift accumulates once per keyframe rather than once per frame.

Measurements (``mode``)
-----------------------
* ``pose``: the four VLM3 pose questions (rotation, direction, distance) on the keyframe and the
  current frame.
* ``correspondence``: depth questions at query pixels of the keyframe (once per keyframe) and
  correspondence questions for the same pixels, then PnP with RANSAC
  (:func:`vlm3_ros.geometry.pose_from_correspondences`) in the depth task's ideal pinhole
  geometry (lens distortion removed).
* ``both``: the two fused (below); either alone is used when the other fails.

Covariance model
----------------
Every relative pose carries a 6x6 covariance over ``(tx, ty, tz, rx, ry, rz)``: a translation
error ``dt`` and a rotation error ``dw`` applied on the left in the parent frame,
``R = Exp(dw) R_est``, ``t = t_est + dt``. This is the parametrisation of
``nav_msgs/Odometry.pose.covariance`` (x, y, z, rotation about X, Y, Z of the parent frame).

* Pose answers (:func:`estimate_from_pose_answers`): rotation ``sigma = rotation_deg`` on each
  axis; translation ``sigma = distance_rel * d`` along the answered direction and
  ``d * direction_rad`` across it, plus an isotropic floor ``translation_floor_m`` that covers the
  answers' 1 cm rounding.
* PnP (:func:`estimate_from_correspondences`): the Gauss-Newton covariance
  ``s^2 (J^T J)^-1`` of the reprojection problem at the solution (``J`` from
  ``cv2.projectPoints``, ``s`` = the inlier RMS residual, at least ``pixel_sigma``), mapped to
  camera 1 <- camera 2, plus ``(depth_rel * |t|)^2`` along the translation for a common scale error
  of the answered depths.
* Fusion (:func:`fuse`): information-weighted mean in the tangent space about the first estimate,
  ``d = (sum L_i)^-1 sum L_i d_i`` with ``L_i = inv(C_i)``, covariance ``(sum L_i)^-1``. When the
  squared Mahalanobis distance between two estimates, ``e^T (C_1 + C_2)^-1 e``, exceeds
  ``fusion_gate`` (chi-square, 6 degrees of freedom) they are not averaged: the one with the smaller
  covariance determinant is kept.
* Chaining (:class:`TrajectoryChain`): first-order propagation through ``T_0t = T_0k T_kt``,
  starting from ``initial_variance`` on every axis (the first pose defines odom; a small positive
  prior keeps the covariance positive definite for filters). A frame whose relative pose cannot
  be measured keeps the last pose (``status`` "lost") and its covariance grows by
  ``lost_variance`` per frame; the keyframe stays, so the next measured frame is measured against
  it and no motion is lost (after ``max_lost_frames`` lost frames in a row the current frame
  becomes the keyframe at the held pose). A frame not after the keyframe in time is refused
  (:class:`LateFrame`); the trajectory goes on.
* Twist (in the child frame ``base_link``, REP-105): the measured keyframe -> frame motion as a
  constant body velocity over the time between the two frames (the SE(3) logarithm, expressed
  in the current ``base_link``), with that measurement's covariance rotated into the current
  ``base_link`` and divided by the squared time.
* Sanity: answered depths beyond ``max_depth`` are not used, and a PnP solution must be finite,
  keep its inliers in front of both cameras and move less than ``max_depth``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from . import geometry
from .camera import Intrinsics, preparation_map
from .geometry import GeometryError
from .pipeline import NO_REFERENCE
from .protocol import RelativePose

__all__ = [
    "MODES",
    "QUERY_METHODS",
    "LateFrame",
    "Matches",
    "NoiseModel",
    "OdometryConfig",
    "OdometryError",
    "OdometryFrame",
    "OdometryUpdate",
    "RelativeEstimate",
    "TrajectoryChain",
    "VisualOdometry",
    "estimate_from_correspondences",
    "estimate_from_pose_answers",
    "fuse",
    "mahalanobis2",
    "pose_to_xyz_quaternion",
    "select_query_pixels",
    "transform_covariance",
    "xyz_rotation_to_pose",
]

MODES = ("pose", "correspondence", "both")
QUERY_METHODS = ("grid", "features")
#: Variance used for quantities that are not measured (the first frame's twist, a lost frame's twist).
UNKNOWN_VARIANCE = 1e6


class OdometryError(ValueError):
    """A relative pose could not be estimated, or an odometry input is invalid."""


class LateFrame(OdometryError):
    """A frame whose stamp is not after the keyframe's: it is skipped, the trajectory goes on."""


# ------------------------------------------------------------------------------------------------
# Small SE(3) helpers
# ------------------------------------------------------------------------------------------------


def _skew(v: np.ndarray) -> np.ndarray:
    x, y, z = v
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def _rotvec(R: np.ndarray) -> np.ndarray:
    return Rotation.from_matrix(geometry.orthonormalize(R)).as_rotvec()


def _exp(w: np.ndarray) -> np.ndarray:
    return Rotation.from_rotvec(w).as_matrix()


def _body_velocity(T: np.ndarray) -> np.ndarray:
    """``(v, w)``: the constant body velocity (per unit time) that moves a frame by ``T`` (SE(3) log).

    ``v`` and ``w`` are in the moving frame's own axes (the same at the start and at the end of a
    constant-velocity motion): ``v = V(w)^-1 t``.
    """
    w = _rotvec(T[:3, :3])
    theta = float(np.linalg.norm(w))
    W = _skew(w)
    if theta < 1e-6:
        c = 1.0 / 12.0 + theta**2 / 720.0
    else:
        c = (1.0 - theta * math.sin(theta) / (2.0 * (1.0 - math.cos(theta)))) / theta**2
    V_inv = np.eye(3) - 0.5 * W + c * W @ W
    return np.concatenate([V_inv @ T[:3, 3], w])


def _tangent(T: np.ndarray, T_ref: np.ndarray) -> np.ndarray:
    """``(dt, dw)`` with ``R = Exp(dw) R_ref`` and ``t = t_ref + dt``."""
    return np.concatenate([T[:3, 3] - T_ref[:3, 3], _rotvec(T[:3, :3] @ T_ref[:3, :3].T)])


def _retract(T_ref: np.ndarray, delta: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = _exp(delta[3:]) @ T_ref[:3, :3]
    T[:3, 3] = T_ref[:3, 3] + delta[:3]
    return T


def _symmetric(C: np.ndarray) -> np.ndarray:
    return 0.5 * (C + C.T)


def transform_covariance(C: np.ndarray, T_a_b: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Covariance of ``T_a_b @ T @ inv(T_a_b)`` given covariance ``C`` of ``T`` (left perturbation).

    Re-expresses a pose (or relative motion) and its uncertainty in another frame, e.g. an
    optical-frame motion in ``base_link``.
    """
    J = _reexpress_jacobian(T_a_b, T)
    return _symmetric(J @ C @ J.T)


def _reexpress_jacobian(T_a_b: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Jacobian of the tangent of ``T_a_b @ T @ inv(T_a_b)`` with respect to the tangent of ``T``."""
    R_ab, t_ba = T_a_b[:3, :3], geometry.invert_pose(T_a_b)[:3, 3]
    J = np.zeros((6, 6))
    J[:3, :3] = R_ab
    J[:3, 3:] = -R_ab @ _skew(T[:3, :3] @ t_ba)
    J[3:, 3:] = R_ab
    return J


def pose_to_xyz_quaternion(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4x4 pose -> (translation (3,), quaternion (x, y, z, w)) as ROS messages store them."""
    T = np.asarray(T, dtype=float)
    return T[:3, 3].copy(), Rotation.from_matrix(geometry.orthonormalize(T[:3, :3])).as_quat()


def xyz_rotation_to_pose(xyz: Sequence[float], rotation: Sequence[float]) -> np.ndarray:
    """A 4x4 pose from a translation and a rotation given as roll, pitch, yaw (radians, fixed axes
    X, Y, Z as in URDF and ``static_transform_publisher``) or as a quaternion (x, y, z, w)."""
    xyz = np.asarray(xyz, dtype=float).reshape(-1)
    rotation = np.asarray(rotation, dtype=float).reshape(-1)
    if xyz.shape != (3,) or not np.all(np.isfinite(xyz)):
        raise OdometryError(f"a translation needs 3 finite values, got {xyz.tolist()}")
    if not np.all(np.isfinite(rotation)):
        raise OdometryError(f"rotation values must be finite, got {rotation.tolist()}")
    if rotation.shape == (3,):
        R = Rotation.from_euler("xyz", rotation).as_matrix()
    elif rotation.shape == (4,):
        norm = float(np.linalg.norm(rotation))
        if abs(norm - 1.0) > 1e-3:
            raise OdometryError(f"a quaternion (x, y, z, w) must have unit norm, got norm {norm:.6f}")
        R = Rotation.from_quat(rotation / norm).as_matrix()
    else:
        raise OdometryError(
            f"a rotation needs 3 values (roll, pitch, yaw) or 4 (quaternion x, y, z, w), got {len(rotation)}"
        )
    return geometry.make_pose(R, xyz)


# ------------------------------------------------------------------------------------------------
# Relative pose estimates and their covariance
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseModel:
    """Parameters of the covariance model (see the module docstring)."""

    rotation_deg: float = 2.0
    direction_deg: float = 5.0
    distance_rel: float = 0.1
    translation_floor_m: float = 0.005
    pixel_sigma: float = 1.0
    depth_rel: float = 0.05
    lost_variance: float = 0.01
    initial_variance: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("rotation_deg", "direction_deg", "distance_rel", "translation_floor_m", "pixel_sigma",
                     "depth_rel", "lost_variance", "initial_variance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise OdometryError(f"noise model {name} must be a finite number > 0, got {value!r}")


@dataclass
class RelativeEstimate:
    """A relative pose camera 1 <- camera 2 with its covariance.

    ``covariance`` is 6x6 over ``(tx, ty, tz, rx, ry, rz)`` in camera 1's frame (see the module
    docstring). ``source`` is "pose", "correspondence" or "fused"; ``inliers`` and ``residual``
    (pixels) describe a PnP estimate; ``disagreement`` is the squared Mahalanobis distance between
    fused estimates.
    """

    T: np.ndarray
    covariance: np.ndarray
    source: str
    inliers: int = 0
    residual: float = float("nan")
    disagreement: float = float("nan")


def estimate_from_pose_answers(pose: RelativePose, noise: NoiseModel = NoiseModel()) -> RelativeEstimate:
    """The relative pose answered by the pose questions, with the covariance model of ``noise``."""
    if pose.distance is None:
        raise OdometryError("the pose answers give no translation distance; a metric pose needs one")
    d = float(pose.distance)
    u = np.asarray(pose.direction, dtype=float)
    u = u / np.linalg.norm(u)
    along = np.outer(u, u)
    C = np.zeros((6, 6))
    C[:3, :3] = (
        (noise.distance_rel * d) ** 2 * along
        + (d * math.radians(noise.direction_deg)) ** 2 * (np.eye(3) - along)
        + noise.translation_floor_m**2 * np.eye(3)
    )
    C[3:, 3:] = math.radians(noise.rotation_deg) ** 2 * np.eye(3)
    T = geometry.make_pose(geometry.orthonormalize(pose.R), u * d)
    return RelativeEstimate(T=T, covariance=C, source="pose")


def estimate_from_correspondences(
    uv1: np.ndarray,
    z1: np.ndarray,
    uv2: np.ndarray,
    K1: np.ndarray,
    K2: np.ndarray,
    *,
    noise: NoiseModel = NoiseModel(),
    ransac_px: float = 3.0,
    min_inliers: int = 8,
    max_translation: float = math.inf,
) -> tuple[RelativeEstimate, np.ndarray]:
    """PnP on ideal-pinhole pixels ``uv1`` with depth ``z1`` (along z) matched to ``uv2``.

    Returns the estimate of camera 1 <- camera 2 and the inlier mask over the rows.
    Raises :class:`OdometryError` naming the problem (too few matches or inliers, degenerate points,
    a solution that is not finite, puts inliers behind a camera or moves more than ``max_translation``).
    """
    try:
        result = geometry.pose_from_correspondences(
            uv1, z1, uv2, K1, K2, depth_kind="z", ransac_reprojection_px=ransac_px, min_inliers=min_inliers
        )
    except GeometryError as exc:
        raise OdometryError(f"PnP failed: {exc}") from None
    inl = result.inliers
    obj = geometry.backproject(np.asarray(uv1)[inl], np.asarray(z1)[inl], K1)
    if not np.all(np.isfinite(result.T)):
        raise OdometryError("PnP gave a non-finite pose")
    distance = float(np.linalg.norm(result.T[:3, 3]))
    if distance > max_translation:
        raise OdometryError(f"PnP moved the camera {distance:.3g} m between two frames, beyond max_depth "
                            f"{max_translation:g} m: not plausible")
    T21 = geometry.invert_pose(result.T)
    in_front2 = geometry.transform_points(T21, obj)[:, 2] > 0
    if not (np.all(obj[:, 2] > 0) and np.all(in_front2)):
        raise OdometryError(f"PnP put {int((~in_front2).sum())} of {len(obj)} inliers behind the second camera: "
                            "not plausible")
    rvec = cv2.Rodrigues(T21[:3, :3])[0].reshape(3)
    tvec = T21[:3, 3]
    _, jac = cv2.projectPoints(obj, rvec, tvec, np.asarray(K2, float), None)
    J = jac[:, :6]
    sigma = max(float(result.residual), noise.pixel_sigma)
    try:
        C_rt = sigma**2 * np.linalg.inv(J.T @ J)
    except np.linalg.LinAlgError:
        raise OdometryError("PnP covariance is singular (degenerate inlier geometry)") from None

    def _pose12(params: np.ndarray) -> np.ndarray:
        R21 = cv2.Rodrigues(params[:3])[0]
        return geometry.invert_pose(geometry.make_pose(R21, params[3:]))

    # Jacobian of (rvec, tvec) of camera 2 <- camera 1 -> tangent of camera 1 <- camera 2.
    x0 = np.concatenate([rvec, tvec])
    G = np.zeros((6, 6))
    eps = 1e-6
    for k in range(6):
        step = np.zeros(6)
        step[k] = eps
        G[:, k] = (_tangent(_pose12(x0 + step), result.T) - _tangent(_pose12(x0 - step), result.T)) / (2 * eps)
    C = G @ C_rt @ G.T
    t = result.T[:3, 3]
    C[:3, :3] += (noise.depth_rel**2) * np.outer(t, t)
    estimate = RelativeEstimate(T=result.T, covariance=_symmetric(C), source="correspondence",
                                inliers=result.num_inliers, residual=float(result.residual))
    return estimate, inl


def mahalanobis2(a: RelativeEstimate, b: RelativeEstimate) -> float:
    """Squared Mahalanobis distance between two estimates of the same relative pose."""
    e = _tangent(a.T, b.T)
    return float(e @ np.linalg.solve(a.covariance + b.covariance, e))


def fuse(estimates: Sequence[RelativeEstimate], gate: float = 22.46) -> RelativeEstimate:
    """Information-weighted fusion of estimates of one relative pose (see the module docstring)."""
    estimates = [e for e in estimates if e is not None]
    if not estimates:
        raise OdometryError("nothing to fuse: no relative pose estimate")
    if len(estimates) == 1:
        return estimates[0]
    worst = max(mahalanobis2(a, b) for i, a in enumerate(estimates) for b in estimates[i + 1:])
    if worst > gate:
        best = min(estimates, key=lambda e: float(np.linalg.slogdet(e.covariance)[1]))
        return replace(best, disagreement=worst)
    ref = estimates[0].T
    info = np.zeros((6, 6))
    vec = np.zeros(6)
    for e in estimates:
        L = np.linalg.inv(e.covariance)
        info += L
        vec += L @ _tangent(e.T, ref)
    C = np.linalg.inv(info)
    T = _retract(ref, C @ vec)
    inliers = max(e.inliers for e in estimates)
    residual = next((e.residual for e in estimates if e.source == "correspondence"), float("nan"))
    return RelativeEstimate(T=T, covariance=_symmetric(C), source="fused", inliers=inliers, residual=residual,
                            disagreement=worst)


# ------------------------------------------------------------------------------------------------
# Chaining
# ------------------------------------------------------------------------------------------------


class TrajectoryChain:
    """Chains keyframe -> frame relative poses into ``odom -> camera`` and ``odom -> base_link``.

    ``T_base_camera`` is the static base_link <- camera optical frame transform.
    """

    def __init__(self, T_base_camera: np.ndarray | None = None, lost_variance: float = 0.01,
                 initial_variance: float = 0.0) -> None:
        self.T_base_camera = np.eye(4) if T_base_camera is None else np.asarray(T_base_camera, float)
        self.lost_variance = float(lost_variance)
        self.initial_variance = float(initial_variance)
        self.reset()

    def reset(self) -> None:
        """Forget the trajectory; the next frame starts it again at the origin, its covariance in
        ``odom`` (of base_link) ``initial_variance`` on every axis."""
        self.started = False
        self.T_key = np.eye(4)  # odom-camera chain: cam0 <- keyframe
        J_inv = np.linalg.inv(_reexpress_jacobian(self.T_base_camera, np.eye(4)))
        self.C_key = _symmetric(J_inv @ (self.initial_variance * np.eye(6)) @ J_inv.T)
        self.T_cur = np.eye(4)  # cam0 <- current frame
        self.C_cur = self.C_key.copy()

    def start(self) -> None:
        self.reset()
        self.started = True

    def propagate(self, estimate: RelativeEstimate) -> tuple[np.ndarray, np.ndarray]:
        """Pose and covariance of the frame measured by ``estimate`` from the current keyframe."""
        R_0k = self.T_key[:3, :3]
        T = self.T_key @ estimate.T
        Ja = np.eye(6)
        Ja[:3, 3:] = -_skew(R_0k @ estimate.T[:3, 3])
        Jb = np.zeros((6, 6))
        Jb[:3, :3] = R_0k
        Jb[3:, 3:] = R_0k
        C = Ja @ self.C_key @ Ja.T + Jb @ estimate.covariance @ Jb.T
        return T, _symmetric(C)

    def update(self, estimate: RelativeEstimate) -> None:
        self.T_cur, self.C_cur = self.propagate(estimate)

    def hold(self) -> None:
        """The current frame could not be measured: keep the pose, grow its uncertainty."""
        self.C_cur = self.C_cur + self.lost_variance * np.eye(6)

    def make_keyframe(self) -> None:
        """The current frame becomes the keyframe."""
        self.T_key, self.C_key = self.T_cur.copy(), self.C_cur.copy()

    @property
    def T_odom_base(self) -> np.ndarray:
        return self.T_base_camera @ self.T_cur @ geometry.invert_pose(self.T_base_camera)

    @property
    def covariance_odom_base(self) -> np.ndarray:
        return transform_covariance(self.C_cur, self.T_base_camera, self.T_cur)


# ------------------------------------------------------------------------------------------------
# Query pixels
# ------------------------------------------------------------------------------------------------


def select_query_pixels(image: np.ndarray, count: int, margin: float = 0.05, method: str = "grid") -> np.ndarray:
    """Pixels to ask about: a regular grid, or corner features (filled up with the grid).

    ``image`` is (H, W[, C]); ``margin`` is the border fraction left out; returns (N, 2) integer
    pixel positions as float64, at most ``count`` for ``features`` and about ``count`` for ``grid``.
    """
    from .pipeline import query_grid

    if method not in QUERY_METHODS:
        raise OdometryError(f"query method must be one of {QUERY_METHODS}, got {method!r}")
    height, width = image.shape[:2]
    grid = query_grid(width, height, count, margin)
    if method == "grid":
        return grid
    gray = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    if gray.dtype != np.uint8:
        gray = cv2.normalize(gray.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    x0, x1 = int(math.ceil(margin * (width - 1))), int(math.floor((1 - margin) * (width - 1)))
    y0, y1 = int(math.ceil(margin * (height - 1))), int(math.floor((1 - margin) * (height - 1)))
    mask[y0:y1 + 1, x0:x1 + 1] = 255
    spacing = max(1.0, 0.5 * math.sqrt((x1 - x0 + 1) * (y1 - y0 + 1) / max(count, 1)))
    corners = cv2.goodFeaturesToTrack(gray, maxCorners=count, qualityLevel=0.01, minDistance=spacing, mask=mask)
    found = np.zeros((0, 2)) if corners is None else np.round(corners.reshape(-1, 2)).astype(np.float64)
    if len(found) >= count:
        return found[:count]
    # Fill with the grid pixels farthest from the features found.
    if len(found):
        dist = np.min(np.linalg.norm(grid[:, None, :] - found[None, :, :], axis=2), axis=1)
        grid = grid[np.argsort(-dist, kind="stable")]
    return np.concatenate([found, grid[: count - len(found)]], axis=0)


# ------------------------------------------------------------------------------------------------
# The per-frame odometry
# ------------------------------------------------------------------------------------------------


@dataclass
class OdometryFrame:
    """One camera frame: RGB image, intrinsics and (oracle only) ground truth.

    ``stamp`` is in seconds; ``reference_depth`` is metres along z aligned with the image;
    ``reference_pose`` the camera-to-world pose ``T_w_c`` of the optical frame.
    """

    stamp: float
    image: np.ndarray
    intrinsics: Intrinsics
    reference_depth: Optional[np.ndarray] = None
    reference_pose: Optional[np.ndarray] = None


@dataclass(frozen=True)
class OdometryConfig:
    """Settings of :class:`VisualOdometry` (the odometry node's parameters of the same names)."""

    mode: str = "both"
    keyframe_interval: int = 1
    query_count: int = 64
    query_margin: float = 0.05
    query_method: str = "grid"
    min_inliers: int = 8
    ransac_px: float = 3.0
    fusion_gate: float = 22.46
    noise: NoiseModel = field(default_factory=NoiseModel)
    T_base_camera: Optional[np.ndarray] = None
    max_lost_frames: int = 10
    max_depth: float = 100.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OdometryError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.query_method not in QUERY_METHODS:
            raise OdometryError(f"query_method must be one of {QUERY_METHODS}, got {self.query_method!r}")
        if int(self.keyframe_interval) < 1:
            raise OdometryError(f"keyframe_interval must be >= 1, got {self.keyframe_interval}")
        if int(self.min_inliers) < 4:
            raise OdometryError(f"min_inliers must be >= 4 (PnP), got {self.min_inliers}")
        if self.query_count < self.min_inliers:
            raise OdometryError(f"query_count {self.query_count} is below min_inliers {self.min_inliers}")
        if not (self.ransac_px > 0 and self.fusion_gate > 0):
            raise OdometryError("ransac_px and fusion_gate must be > 0")
        if int(self.max_lost_frames) < 1:
            raise OdometryError(f"max_lost_frames must be >= 1, got {self.max_lost_frames}")
        if not (self.max_depth > 0):
            raise OdometryError(f"max_depth must be > 0 m, got {self.max_depth}")


@dataclass
class Matches:
    """The correspondences behind a PnP estimate, for inspection.

    ``uv1`` (keyframe) and ``uv2`` (current frame) are original-image pixels, ``points1`` the
    keyframe's 3D points (optical frame, NaN where the depth was not answered), ``inliers`` the PnP
    inlier mask (all False when PnP failed).
    """

    keyframe_stamp: float
    uv1: np.ndarray
    uv2: np.ndarray
    points1: np.ndarray
    inliers: np.ndarray


@dataclass
class OdometryUpdate:
    """What the odometry knows after one frame.

    ``status``: "initialised" (first frame: the origin), "tracking" (measured) or "lost" (the pose
    is held). Poses: ``T_odom_camera`` (odom <- optical frame) and ``T_odom_base``; ``covariance``
    is the 6x6 of ``T_odom_base`` in the odom frame; ``twist`` (vx, vy, vz, wx, wy, wz) and its
    covariance are in the current base_link (the child frame). ``errors`` lists why a measurement
    failed; ``parse_failures`` counts unparseable answers of this frame, ``no_reference`` answers
    without a reference value (oracle).
    """

    stamp: float
    status: str
    T_odom_camera: np.ndarray
    T_odom_base: np.ndarray
    covariance: np.ndarray
    twist: np.ndarray
    twist_covariance: np.ndarray
    keyframe: bool
    estimate: Optional[RelativeEstimate] = None
    matches: Optional[Matches] = None
    errors: list = field(default_factory=list)
    parse_failures: int = 0
    no_reference: int = 0


@dataclass
class _Keyframe:
    frame: OdometryFrame
    uv: Optional[np.ndarray] = None  # original pixels the depth answers refer to
    z: Optional[np.ndarray] = None  # depth along z at uv (NaN unanswered)
    since: int = 0  # frames measured against it
    lost: int = 0  # frames in a row that could not be measured against it


class VisualOdometry:
    """Frame-to-keyframe odometry from VLM3 answers (see the module docstring).

    ``pose_estimator`` (:class:`~vlm3_ros.pipeline.PoseEstimator`) is needed for modes pose and
    both; ``matcher`` (:class:`~vlm3_ros.pipeline.CorrespondenceMatcher`) and ``depth_estimator``
    (:class:`~vlm3_ros.pipeline.DepthEstimator`) for correspondence and both. With an oracle
    backend, frames must carry ``reference_pose`` (and ``reference_depth`` for correspondences).
    """

    def __init__(self, config: OdometryConfig, *, pose_estimator: Any = None, matcher: Any = None,
                 depth_estimator: Any = None) -> None:
        self.config = config
        if config.mode in ("pose", "both") and pose_estimator is None:
            raise OdometryError(f"mode {config.mode!r} needs a pose estimator")
        if config.mode in ("correspondence", "both") and (matcher is None or depth_estimator is None):
            raise OdometryError(f"mode {config.mode!r} needs a correspondence matcher and a depth estimator")
        self.pose_estimator = pose_estimator
        self.matcher = matcher
        self.depth_estimator = depth_estimator
        self.chain = TrajectoryChain(config.T_base_camera, config.noise.lost_variance, config.noise.initial_variance)
        self._key: Optional[_Keyframe] = None

    def reset(self) -> None:
        """Start a new trajectory at the next frame."""
        self.chain.reset()
        self._key = None

    def reconfigure(self, config: OdometryConfig) -> None:
        """Apply new settings; a different extrinsic or mode restarts the trajectory."""
        restart = (config.mode != self.config.mode
                   or not np.array_equal(_pose_or_eye(config.T_base_camera), _pose_or_eye(self.config.T_base_camera)))
        self.config = config
        self.chain.lost_variance = config.noise.lost_variance
        self.chain.initial_variance = config.noise.initial_variance
        if restart:
            self.chain.T_base_camera = _pose_or_eye(config.T_base_camera)
            self.reset()

    # -- measurements ---------------------------------------------------------------------------

    def _reference_relative(self, key: OdometryFrame, frame: OdometryFrame) -> Optional[np.ndarray]:
        if key.reference_pose is None or frame.reference_pose is None:
            return None
        return geometry.relative_pose(key.reference_pose, frame.reference_pose)

    def _measure_pose(self, key: OdometryFrame, frame: OdometryFrame, errors: list, counts: dict) -> Optional[RelativeEstimate]:
        result = self.pose_estimator.estimate(key.image, key.intrinsics, frame.image, frame.intrinsics,
                                              reference_pose=self._reference_relative(key, frame))
        if result.pose is None:
            if result.error == NO_REFERENCE:
                counts["no_reference"] += 1
                errors.append("pose answers: no reference value")
            else:
                counts["parse"] += 1
                errors.append(f"pose answers unparseable: {result.error}")
            return None
        try:
            return estimate_from_pose_answers(result.pose, self.config.noise)
        except OdometryError as exc:
            errors.append(str(exc))
            return None

    def _keyframe_depth(self, key: _Keyframe, counts: dict) -> None:
        if key.uv is not None:
            return
        cfg = self.config
        uv = select_query_pixels(key.frame.image, cfg.query_count, cfg.query_margin, cfg.query_method)
        result = self.depth_estimator.estimate(key.frame.image, key.frame.intrinsics, uv,
                                               reference_depth=key.frame.reference_depth)
        counts["parse"] += result.parse_failures
        counts["no_reference"] += result.no_reference
        key.uv = np.where(result.valid[:, None], result.uv, uv)
        key.z = np.where(result.valid, result.z, np.nan)

    def _measure_correspondence(self, key: _Keyframe, frame: OdometryFrame, errors: list,
                                counts: dict) -> tuple[Optional[RelativeEstimate], Optional[Matches]]:
        self._keyframe_depth(key, counts)
        ok = np.isfinite(key.z) & (key.z > 0) & (key.z <= self.config.max_depth)
        if ok.sum() < self.config.min_inliers:
            errors.append(f"only {int(ok.sum())} keyframe depths answered within max_depth "
                          f"{self.config.max_depth:g} m, need {self.config.min_inliers}")
            return None, None
        uv1, z1 = key.uv[ok], key.z[ok]
        result = self.matcher.match(key.frame.image, key.frame.intrinsics, frame.image, frame.intrinsics, uv1,
                                    reference_depth1=key.frame.reference_depth,
                                    reference_pose=self._reference_relative(key.frame, frame))
        counts["parse"] += result.parse_failures
        counts["no_reference"] += result.no_reference
        spec = self.depth_estimator.spec.preprocess
        m1 = preparation_map(key.frame.intrinsics, spec)
        m2 = preparation_map(frame.intrinsics, spec)
        K1 = m1.prepared.K
        points1 = geometry.backproject(m1.to_prepared(uv1), z1, K1)
        matches = Matches(key.frame.stamp, uv1, result.uv2, points1, np.zeros(len(uv1), bool))
        try:
            estimate, inliers = estimate_from_correspondences(
                m1.to_prepared(uv1), z1, m2.to_prepared(result.uv2), K1, m2.prepared.K,
                noise=self.config.noise, ransac_px=self.config.ransac_px, min_inliers=self.config.min_inliers,
                max_translation=self.config.max_depth)
        except OdometryError as exc:
            errors.append(str(exc))
            return None, matches
        matches.inliers = inliers
        return estimate, matches

    # -- the per-frame step ---------------------------------------------------------------------

    def process(self, frame: OdometryFrame) -> OdometryUpdate:
        """Measure ``frame`` against the keyframe, chain it and return the new state.

        Backend exceptions propagate (the caller counts them); answers that cannot be parsed or
        matches too poor for PnP give a "lost" update with the reasons in ``errors``.
        """
        cfg = self.config
        if self._key is None or not self.chain.started:
            self.chain.start()
            self._key = _Keyframe(frame)
            return self._update(frame, "initialised", keyframe=True)
        key = self._key
        if frame.stamp <= key.frame.stamp:
            raise LateFrame(f"frame stamp {frame.stamp:.9f} is not after the keyframe's {key.frame.stamp:.9f}")
        errors: list = []
        counts = {"parse": 0, "no_reference": 0}
        estimates = []
        matches = None
        if cfg.mode in ("correspondence", "both"):
            est, matches = self._measure_correspondence(key, frame, errors, counts)
            estimates.append(est)
        if cfg.mode in ("pose", "both"):
            estimates.append(self._measure_pose(key.frame, frame, errors, counts))
        estimates = [e for e in estimates if e is not None]
        if not estimates:
            # Lost: hold the pose and keep the keyframe, so the next measured frame is measured against it
            # and the motion in between is not lost.
            self.chain.hold()
            key.lost += 1
            if key.lost >= cfg.max_lost_frames:
                # Too long without a measurement: continue from the held pose with the current frame.
                self.chain.make_keyframe()
                self._key = _Keyframe(frame)
            update = self._update(frame, "lost", keyframe=self._key.frame is frame, errors=errors,
                                  parse_failures=counts["parse"], no_reference=counts["no_reference"],
                                  matches=matches)
            return update
        key.since += 1
        key.lost = 0
        estimate = fuse(estimates, cfg.fusion_gate)
        self.chain.update(estimate)
        make_key = key.since >= cfg.keyframe_interval
        update = self._update(frame, "tracking", keyframe=make_key, estimate=estimate, errors=errors,
                              parse_failures=counts["parse"], no_reference=counts["no_reference"], matches=matches,
                              dt=frame.stamp - key.frame.stamp)
        if make_key:
            self.chain.make_keyframe()
            self._key = _Keyframe(frame)
        return update

    def _update(self, frame: OdometryFrame, status: str, *, keyframe: bool, estimate: RelativeEstimate | None = None,
                errors: list | None = None, parse_failures: int = 0, no_reference: int = 0,
                matches: Matches | None = None, dt: float = 0.0) -> OdometryUpdate:
        twist = np.zeros(6)
        twist_cov = UNKNOWN_VARIANCE * np.eye(6)
        Tbc = self.chain.T_base_camera
        if estimate is not None and dt > 0:
            motion = Tbc @ estimate.T @ geometry.invert_pose(Tbc)  # base(key) <- base(frame)
            twist = _body_velocity(motion) / dt  # in the current base frame (the child frame)
            to_child = np.kron(np.eye(2), motion[:3, :3].T)
            twist_cov = _symmetric(to_child @ transform_covariance(estimate.covariance, Tbc, estimate.T)
                                   @ to_child.T) / dt**2
        return OdometryUpdate(
            stamp=frame.stamp,
            status=status,
            T_odom_camera=self.chain.T_base_camera @ self.chain.T_cur,
            T_odom_base=self.chain.T_odom_base,
            covariance=self.chain.covariance_odom_base,
            twist=twist,
            twist_covariance=twist_cov,
            keyframe=keyframe,
            estimate=estimate,
            matches=matches,
            errors=list(errors or []),
            parse_failures=parse_failures,
            no_reference=no_reference,
        )


def _pose_or_eye(T: Optional[np.ndarray]) -> np.ndarray:
    return np.eye(4) if T is None else np.asarray(T, float)
