"""Camera intrinsics and the image preparation each VLM3 task needs.

Every task prepares its image(s) differently (see DESIGN.md section 2):

* depth: undistort to an ideal pinhole where needed, then scale so ``fx = fy = 1000`` px;
* pose: the same with 750 px;
* correspondence: resize so that ``max(width, height) = 1024`` (no focal unification).

The model answers in pixels of the *prepared* image, so each preparation returns, next to the
resampled image, the prepared image's intrinsics and an exact :class:`PixelMap` between original
and prepared pixels in both directions.

Conventions used throughout the project
---------------------------------------
* Pixel coordinates are continuous, with integer values at pixel centres (OpenCV / ROS): the centre
  of pixel ``(0, 0)`` is ``(0.0, 0.0)`` and the image spans ``[-0.5, W - 0.5]``.
* A resize by ``(sx, sy)`` maps ``x' = (x + 0.5) * sx - 0.5`` (what ``cv2.resize`` and
  ``torch.nn.functional.interpolate(align_corners=False)`` do), so ``fx' = fx * sx`` and
  ``cx' = (cx + 0.5) * sx - 0.5``. :meth:`Intrinsics.scaled` implements this and every resize in
  the project goes through it. The output size of a resize by ``s`` is ``round(W * s)``
  (round half to even, like OpenCV).
* Focal unification keeps the exact scale ``s = target / f``: ``fx' == target`` holds exactly
  and the sampling positions use ``s`` itself, not ``round(W * s) / W``.
* Distortion coefficients live in normalised image coordinates and are unchanged by resizing.

Resampling backends
-------------------
numpy arrays are resampled with OpenCV, torch tensors with torch on their own device (the
undistortion grid is computed once with OpenCV on the CPU and cached per device). Upscaling is
bilinear, downscaling area-averaged (OpenCV ``INTER_AREA``) or antialiased (torch), depth and
label maps use nearest neighbour. Undistortion is one ``remap`` / ``grid_sample`` pass straight from
the original into the prepared geometry, preceded by a Gaussian low-pass filter when it downscales.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Tuple, Union

import cv2
import numpy as np

from .geometry import nearest_pixel
from .protocol import Preprocess, ProtocolError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    ImageLike = Union[np.ndarray, torch.Tensor]
else:
    ImageLike = Any

__all__ = [
    "CameraError",
    "DISTORTION_MODELS",
    "MAX_IMAGE_SIDE",
    "Intrinsics",
    "PixelMap",
    "PreparedImage",
    "Preprocess",
    "unify_focal",
    "resize_max_edge",
    "prepare_image",
    "preparation_map",
    "prepare_depth",
    "resize_image",
    "normalized_rays",
    "project_points",
    "project_cloud",
]


class CameraError(ValueError):
    """Invalid camera model, image or preprocessing request."""


#: Distortion models understood (ROS ``sensor_msgs/CameraInfo`` names).
DISTORTION_MODELS = ("plumb_bob", "rational_polynomial", "equidistant", "none")
_D_LENGTHS = {"plumb_bob": (5,), "rational_polynomial": (8, 12, 14), "equidistant": (4,), "none": (0,)}
#: Largest image side accepted, in pixels (original or prepared).
MAX_IMAGE_SIDE = 16384
_PINHOLE_TOL = 1e-9  # relative tolerance for fx == fy and for zero skew in K
_UNDISTORT_TOL_PX = 1e-4  # a point whose inverse distortion misses by more than this becomes NaN
_CACHE_SIZE = 16


def _real(name: str, value: Any) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise CameraError(f"{name} must be a real number, got {value!r}")


# --------------------------------------------------------------------------------------------
# Intrinsics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics with an optional lens distortion model, for one image size.

    Construction normalises the values (numbers to ``int``/``float``, ``D`` to a tuple; an empty
    ``D`` or an empty model name with all-zero ``D`` means ``"none"``, as ROS image_geometry
    treats them) and validates them, so an ``Intrinsics`` instance is always usable. Instances are
    immutable and hashable (used as cache keys).
    """

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion_model: str = "none"
    D: Tuple[float, ...] = ()

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise CameraError(f"{name} must be a positive integer number of pixels, got {value!r}")
            put(name, int(value))
        for name in ("fx", "fy", "cx", "cy"):
            put(name, _real(name, getattr(self, name)))
        model = self.distortion_model
        if not isinstance(model, str):
            raise CameraError(f"distortion_model must be a string, got {model!r}")
        try:
            coeffs = tuple(float(v) for v in np.asarray(self.D, dtype=np.float64).ravel())
        except (TypeError, ValueError) as exc:
            raise CameraError(f"distortion coefficients D must be numbers, got {self.D!r}") from exc
        all_zero = not any(coeffs)
        if model == "" or (model in _D_LENGTHS and not coeffs):
            if not all_zero:
                raise CameraError(f"distortion_model is empty but D = {coeffs} is non-zero; name the model")
            model, coeffs = "none", ()
        elif model == "none":
            if not all(math.isfinite(v) for v in coeffs) or not all_zero:
                raise CameraError(f"distortion_model 'none' needs an empty or all-zero D, got D = {coeffs}")
            coeffs = ()
        put("distortion_model", model)
        put("D", coeffs)
        self.validate()

    def validate(self) -> "Intrinsics":
        """Check the values; return ``self`` or raise :class:`CameraError` naming the problem."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_IMAGE_SIDE:
                raise CameraError(f"{name} must be in [1, {MAX_IMAGE_SIDE}] pixels, got {value}")
        if self.fx == 0 and self.fy == 0 and self.cx == 0 and self.cy == 0:
            raise CameraError("K is all zero: the camera is uncalibrated")
        for name in ("fx", "fy"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise CameraError(f"focal length {name} must be finite and > 0, got {value}")
        for name, size in (("cx", self.width), ("cy", self.height)):
            value = getattr(self, name)
            if not (math.isfinite(value) and -0.5 * size <= value <= 1.5 * size):
                raise CameraError(
                    f"principal point {name} = {value} is outside the sane range "
                    f"[{-0.5 * size}, {1.5 * size}] for an image {size} px across"
                )
        if self.distortion_model not in _D_LENGTHS:
            raise CameraError(
                f"unknown distortion model {self.distortion_model!r}; expected one of {DISTORTION_MODELS}"
            )
        lengths = _D_LENGTHS[self.distortion_model]
        if len(self.D) not in lengths:
            raise CameraError(
                f"distortion model {self.distortion_model!r} needs {' or '.join(map(str, lengths))} "
                f"coefficients, got {len(self.D)}: D = {self.D}"
            )
        if not all(math.isfinite(v) for v in self.D):
            raise CameraError(f"distortion coefficients must be finite, got D = {self.D}")
        return self

    # ---- views ------------------------------------------------------------------------------

    @property
    def K(self) -> np.ndarray:
        """The 3x3 camera matrix (float64, a fresh array)."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def has_distortion(self) -> bool:
        """True when any distortion coefficient is non-zero."""
        return any(self.D)

    @property
    def is_ideal_pinhole(self) -> bool:
        """True when ``fx == fy`` (within 1e-9 relative) and there is no distortion."""
        return abs(self.fx - self.fy) <= _PINHOLE_TOL * max(self.fx, self.fy) and not self.has_distortion

    # ---- constructors -----------------------------------------------------------------------

    @classmethod
    def from_K(
        cls,
        K: Any,
        width: int,
        height: int,
        D: Any = (),
        distortion_model: str | None = None,
    ) -> "Intrinsics":
        """Build from a camera matrix (3x3 or 9 values, row-major) and optional distortion.

        Without ``distortion_model`` the model follows from ``len(D)``: 0 none, 5 plumb_bob,
        8/12/14 rational_polynomial; 4 is ambiguous (OpenCV k1,k2,p1,p2 or equidistant) and must be
        named.
        """
        try:
            K = np.asarray(K, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise CameraError(f"K must be 3x3 numbers, got {K!r}") from exc
        if K.size != 9:
            raise CameraError(f"K must have 9 values (3x3), got shape {K.shape}")
        K = K.reshape(3, 3)
        if not np.all(np.isfinite(K)):
            raise CameraError(f"K has non-finite values: {K.tolist()}")
        scale = max(abs(K[0, 0]), abs(K[1, 1]), 1.0)
        if abs(K[0, 1]) > _PINHOLE_TOL * scale:
            raise CameraError(f"K has skew K[0,1] = {K[0, 1]}; only zero-skew pinhole cameras are supported")
        if abs(K[1, 0]) > _PINHOLE_TOL * scale or np.max(np.abs(K[2] - (0.0, 0.0, 1.0))) > 1e-12:
            raise CameraError(f"K is not of pinhole form [[fx,0,cx],[0,fy,cy],[0,0,1]]: {K.tolist()}")
        try:
            coeffs = np.asarray(D, dtype=np.float64).ravel()
        except (TypeError, ValueError) as exc:
            raise CameraError(f"distortion coefficients D must be numbers, got {D!r}") from exc
        if distortion_model is None:
            by_length = {0: "none", 5: "plumb_bob", 8: "rational_polynomial", 12: "rational_polynomial",
                         14: "rational_polynomial"}
            if coeffs.size not in by_length:
                raise CameraError(
                    f"cannot infer the distortion model from {coeffs.size} coefficients; pass distortion_model"
                )
            distortion_model = by_length[coeffs.size]
        return cls(width, height, K[0, 0], K[1, 1], K[0, 2], K[1, 2], distortion_model, tuple(coeffs))

    @classmethod
    def from_camera_info(cls, msg: Any, *, rectified: bool = False) -> "Intrinsics":
        """Build from a ``sensor_msgs/CameraInfo`` (duck-typed: ``k``, ``d``, ``distortion_model``,
        ``width``, ``height``; ROS 1 ``K``/``D`` are accepted too).

        ``rectified=True`` describes the rectified image (``image_rect``): the intrinsics are the
        left 3x3 of the projection matrix ``p`` and there is no distortion (REP-104).
        Binning and a region of interest are not supported and raise :class:`CameraError`.
        """

        def field(name: str) -> Any:
            for attr in (name, name.upper()):
                if hasattr(msg, attr):
                    return getattr(msg, attr)
            raise CameraError(f"camera info {type(msg).__name__} has no field {name!r}")

        for name in ("binning_x", "binning_y"):
            if getattr(msg, name, 0) not in (0, 1):
                raise CameraError(f"camera info {name} = {getattr(msg, name)} (binning) is not supported")
        roi = getattr(msg, "roi", None)
        if roi is not None and (
            getattr(roi, "x_offset", 0) or getattr(roi, "y_offset", 0)
            or getattr(roi, "width", 0) not in (0, field("width"))
            or getattr(roi, "height", 0) not in (0, field("height"))
        ):
            raise CameraError("camera info with a region of interest (roi) is not supported")
        if rectified:
            P = np.asarray(field("p"), dtype=np.float64)
            if P.size != 12:
                raise CameraError(f"camera info p must have 12 values, got {P.size}")
            return cls.from_K(P.reshape(3, 4)[:, :3], field("width"), field("height"))
        return cls.from_K(field("k"), field("width"), field("height"), D=tuple(field("d")),
                          distortion_model=field("distortion_model"))

    @classmethod
    def from_focal(cls, width: int, height: int, focal: float, cx: float | None = None,
                   cy: float | None = None) -> "Intrinsics":
        """Ideal pinhole with ``fx = fy = focal``; the principal point defaults to the image centre
        ``((width - 1) / 2, (height - 1) / 2)``."""
        cx = (width - 1) / 2 if cx is None else cx
        cy = (height - 1) / 2 if cy is None else cy
        return cls(width, height, focal, focal, cx, cy)

    # ---- transforms -------------------------------------------------------------------------

    def scaled(self, sx: float, sy: float | None = None) -> "Intrinsics":
        """Intrinsics of this image resized by ``(sx, sy)`` (``sy`` defaults to ``sx``).

        ``fx' = fx*sx``, ``cx' = (cx + 0.5)*sx - 0.5`` (same for y), size ``round(W*sx) x
        round(H*sy)``; distortion coefficients are unchanged.
        """
        sx = _real("sx", sx)
        sy = sx if sy is None else _real("sy", sy)
        for name, value in (("sx", sx), ("sy", sy)):
            if not math.isfinite(value) or value <= 0:
                raise CameraError(f"scale {name} must be finite and > 0, got {value}")
        return Intrinsics(
            round(self.width * sx), round(self.height * sy), self.fx * sx, self.fy * sy,
            (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5, self.distortion_model, self.D,
        )

    def to_dict(self) -> dict:
        """Plain-type dictionary (JSON/YAML friendly)."""
        return {"width": self.width, "height": self.height, "fx": self.fx, "fy": self.fy,
                "cx": self.cx, "cy": self.cy, "distortion_model": self.distortion_model, "D": list(self.D)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Intrinsics":
        """Inverse of :meth:`to_dict`; ``distortion_model`` and ``D`` are optional."""
        if not isinstance(data, Mapping):
            raise CameraError(f"intrinsics must be a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise CameraError(f"unknown intrinsics keys {sorted(unknown)}; expected {sorted(fields)}")
        missing = {"width", "height", "fx", "fy", "cx", "cy"} - set(data)
        if missing:
            raise CameraError(f"intrinsics are missing {sorted(missing)}")
        return cls(**{k: (tuple(v) if k == "D" else v) for k, v in data.items()})


# --------------------------------------------------------------------------------------------
# Point mapping
# --------------------------------------------------------------------------------------------


def _distort(xy: np.ndarray, cam: Intrinsics) -> np.ndarray:
    """Project normalised ideal points ``(N, 2)`` (z = 1) through ``cam`` to pixels."""
    if len(xy) == 0:
        return np.empty((0, 2))
    obj = np.concatenate([xy, np.ones((len(xy), 1))], axis=1).reshape(-1, 1, 3)
    zero = np.zeros((3, 1))
    if cam.distortion_model == "equidistant":
        pix, _ = cv2.fisheye.projectPoints(obj, zero, zero, cam.K, np.asarray(cam.D))
    else:
        pix, _ = cv2.projectPoints(obj, zero, zero, cam.K, np.asarray(cam.D) if cam.D else None)
    return pix.reshape(-1, 2).astype(np.float64)


def _distort_jacobian(q: np.ndarray, cam: Intrinsics) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of normalised points and the forward-difference Jacobian columns d/dx, d/dy."""
    h = 1e-7
    p = _distort(np.concatenate([q, q + (h, 0.0), q + (0.0, h)]), cam).reshape(3, -1, 2)
    return p[0], (p[1] - p[0]) / h, (p[2] - p[0]) / h


def _undistort(uv: np.ndarray, cam: Intrinsics) -> np.ndarray:
    """Normalised ideal coordinates of pixels ``(N, 2)`` of ``cam``; NaN where not invertible.

    OpenCV's iterative undistortion gives the start, Newton steps on the forward projection refine
    it to about 1e-10 px. A point becomes NaN when the result misses by more than
    ``_UNDISTORT_TOL_PX`` or lies on a folded branch of the distortion polynomial (where the model
    is not one-to-one: orientation reversed, or on the opposite side of the principal point).
    """
    if len(uv) == 0:
        return np.empty((0, 2))
    pts = uv.reshape(-1, 1, 2)
    if cam.distortion_model == "equidistant":
        q = cv2.fisheye.undistortPoints(pts, cam.K, np.asarray(cam.D))
    else:
        q = cv2.undistortPoints(pts, cam.K, np.asarray(cam.D))
    q = q.reshape(-1, 2).astype(np.float64)
    bad = ~np.all(np.isfinite(q), axis=1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for iteration in range(21):
            q[bad] = 0.0
            p, jx, jy = _distort_jacobian(q, cam)
            r = p - uv
            bad |= ~np.all(np.isfinite(r) & np.isfinite(jx) & np.isfinite(jy), axis=1)
            r[bad] = 0.0
            if np.max(np.abs(r)) <= 1e-10 or iteration == 20:
                break
            det = jx[:, 0] * jy[:, 1] - jy[:, 0] * jx[:, 1]
            q = q - np.stack([jy[:, 1] * r[:, 0] - jy[:, 0] * r[:, 1],
                              jx[:, 0] * r[:, 1] - jx[:, 1] * r[:, 0]], axis=1) / det[:, None]
            bad |= ~np.all(np.isfinite(q), axis=1)
        det = jx[:, 0] * jy[:, 1] - jy[:, 0] * jx[:, 1]
        distorted = (uv - (cam.cx, cam.cy)) / (cam.fx, cam.fy)
        ok = ~bad & (np.hypot(r[:, 0], r[:, 1]) <= _UNDISTORT_TOL_PX) & (det > 0)
        ok &= np.sum(q * distorted, axis=1) >= 0
    q[~ok] = np.nan
    return q


def _as_points(uv: Any) -> Tuple[np.ndarray, Tuple[int, ...]]:
    pts = np.asarray(uv, dtype=np.float64)
    if pts.ndim == 0 or pts.shape[-1] != 2:
        raise CameraError(f"points must have shape (..., 2), got {pts.shape}")
    return pts.reshape(-1, 2), pts.shape


def normalized_rays(uv: Any, intrinsics: Intrinsics) -> np.ndarray:
    """Rays ``(N, 3)`` with unit z through pixels ``uv`` ``(N, 2)`` of a camera, its lens
    distortion undone (NaN rays where the distortion cannot be inverted)."""
    pts, _ = _as_points(uv)
    if not intrinsics.has_distortion:
        xy = (pts - (intrinsics.cx, intrinsics.cy)) / (intrinsics.fx, intrinsics.fy)
    else:
        xy = _undistort(pts, intrinsics)
    return np.concatenate([xy, np.ones((len(xy), 1))], axis=1)


def project_points(points: Any, intrinsics: Intrinsics) -> Tuple[np.ndarray, np.ndarray]:
    """Camera-frame points ``(N, 3)`` -> pixels ``(N, 2)`` through the lens model, and z ``(N,)``.

    Points with ``z <= 0`` get NaN pixels."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    z = points[:, 2].copy()
    front = z > 1e-9
    uv = np.full((len(points), 2), np.nan)
    if front.any():
        xy = points[front, :2] / z[front, None]
        if not intrinsics.has_distortion:
            uv[front] = xy * (intrinsics.fx, intrinsics.fy) + (intrinsics.cx, intrinsics.cy)
        else:
            uv[front] = _distort(xy, intrinsics)
    return uv, z


def project_cloud(points: Any, T_camera_cloud: Any, intrinsics: Intrinsics, min_depth: float = 1e-3) -> np.ndarray:
    """A sparse depth image (z metres, NaN where no point) from a point cloud ``(N, 3)``.

    Points are moved into the camera frame by ``T_camera_cloud`` (4x4), projected through the
    lens model and z-buffered: a pixel keeps the nearest point that projects onto it.
    """
    T = np.asarray(T_camera_cloud, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    cam = pts @ T[:3, :3].T + T[:3, 3]
    cam = cam[cam[:, 2] > min_depth]
    uv, z = project_points(cam, intrinsics)
    cols, rows, inside = nearest_pixel(uv, intrinsics.width, intrinsics.height)
    depth = np.full((intrinsics.height, intrinsics.width), np.nan, dtype=np.float32)
    if not inside.any():
        return depth
    lin = rows[inside] * intrinsics.width + cols[inside]
    zz = z[inside]
    order = np.argsort(zz, kind="stable")
    lin, zz = lin[order], zz[order]
    unique, first = np.unique(lin, return_index=True)  # first occurrence = nearest point
    depth.ravel()[unique] = zz[first]
    return depth


@dataclass(frozen=True)
class PixelMap:
    """Exact mapping between original-image pixels and prepared-image pixels.

    Either a resize by ``(sx, sy)`` (``undistort`` False: ``x' = (x + 0.5)*sx - 0.5``), or an
    undistortion into the ideal pinhole ``prepared`` (``undistort`` True: original pixel ->
    normalised ray through ``source``'s distortion model -> ``prepared.K``). ``sx, sy`` are then the
    nominal scales ``prepared.fx / source.fx`` and ``prepared.fy / source.fy``.

    Points outside either image are mapped all the same (the caller decides what to do with them);
    only a point for which the inverse of the distortion does not exist maps to NaN.
    """

    source: Intrinsics
    prepared: Intrinsics
    sx: float
    sy: float
    undistort: bool = False

    def to_prepared(self, uv: Any) -> np.ndarray:
        """Original pixel coordinates ``(..., 2)`` -> prepared pixel coordinates (float64)."""
        pts, shape = _as_points(uv)
        if not self.undistort:
            out = (pts + 0.5) * (self.sx, self.sy) - 0.5
        else:
            out = np.full_like(pts, np.nan)
            ok = np.all(np.isfinite(pts), axis=1)
            q = _undistort(pts[ok], self.source)
            p = self.prepared
            out[ok] = q * (p.fx, p.fy) + (p.cx, p.cy)
        return out.reshape(shape)

    def to_original(self, uv: Any) -> np.ndarray:
        """Prepared pixel coordinates ``(..., 2)`` -> original pixel coordinates (float64)."""
        pts, shape = _as_points(uv)
        if not self.undistort:
            out = (pts + 0.5) / (self.sx, self.sy) - 0.5
        else:
            out = np.full_like(pts, np.nan)
            ok = np.all(np.isfinite(pts), axis=1)
            p = self.prepared
            out[ok] = _distort((pts[ok] - (p.cx, p.cy)) / (p.fx, p.fy), self.source)
        return out.reshape(shape)


@dataclass(frozen=True)
class PreparedImage:
    """An image prepared for one task, with its intrinsics and the mapping to the original."""

    image: ImageLike  #: same type, device, dtype and layout (H, W[, C]) as the input
    intrinsics: Intrinsics  #: of the prepared image
    source: Intrinsics  #: of the original image
    mapping: PixelMap

    @property
    def width(self) -> int:
        return self.intrinsics.width

    @property
    def height(self) -> int:
        return self.intrinsics.height


# --------------------------------------------------------------------------------------------
# Geometry of each preparation (cached per camera and request)
# --------------------------------------------------------------------------------------------


def _as_preprocess(spec: Any) -> Preprocess:
    """A :class:`~vlm3_ros.protocol.Preprocess` from itself, a mapping or any object with
    ``mode``/``value``[/``undistort``]; problems are reported as :class:`CameraError`."""
    if isinstance(spec, Preprocess):
        return spec
    get = spec.get if isinstance(spec, Mapping) else functools.partial(getattr, spec)
    try:
        mode, value, undistort = get("mode"), get("value"), get("undistort", False)
    except (AttributeError, KeyError) as exc:
        raise CameraError(f"preprocess needs fields mode and value, got {spec!r}") from exc
    if not isinstance(undistort, (bool, np.bool_)):
        raise CameraError(f"preprocess undistort must be a bool, got {undistort!r}")
    try:
        return Preprocess(str(mode), _real("preprocess value", value), bool(undistort))
    except ProtocolError as exc:
        raise CameraError(str(exc)) from None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _plan(source: Intrinsics, spec: Preprocess) -> PixelMap:
    """The mapping a preparation request produces for a camera."""
    W, H = source.width, source.height
    if spec.mode == "max_edge" and min(W, H) * spec.value / max(W, H) < 0.5:
        raise CameraError(f"max_edge {spec.value} leaves less than one pixel for the short side of {W}x{H}")
    if spec.mode == "focal":
        target = spec.value
    elif spec.undistort and not source.is_ideal_pinhole:
        # Ideal pinhole at the original's horizontal scale, then scaled so the longest side fits.
        target = source.fx * spec.value / max(W, H * source.fx / source.fy)
    else:
        s = spec.value / max(W, H)
        sx, sy = round(W * s) / W, round(H * s) / H  # plain resize to the rounded size
        return PixelMap(source, source.scaled(sx, sy), sx, sy, False)
    sx, sy = target / source.fx, target / source.fy
    try:
        size = source.scaled(sx, sy)
    except CameraError as exc:
        raise CameraError(f"{spec.mode} {spec.value} of a {W}x{H} camera with fx={source.fx}, "
                          f"fy={source.fy} gives an unusable image: {exc}") from None
    prepared = Intrinsics(size.width, size.height, target, target, size.cx, size.cy)
    return PixelMap(source, prepared, sx, sy, source.has_distortion)


# --------------------------------------------------------------------------------------------
# Resampling (one path per backend)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Warp:
    """What the resamplers need: source size, output size, scales, and the mapping to undistort
    (None for a plain resize)."""

    src_size: Tuple[int, int]
    size: Tuple[int, int]
    sx: float
    sy: float
    remap: PixelMap | None = None

    @classmethod
    def of(cls, m: PixelMap) -> "_Warp":
        return cls((m.source.width, m.source.height), (m.prepared.width, m.prepared.height),
                   m.sx, m.sy, m if m.undistort else None)

    @property
    def smooths(self) -> bool:
        """Area/antialiased resize: only when no axis is enlarged and at least one shrinks."""
        return self.sx <= 1 and self.sy <= 1 and (self.sx < 1 or self.sy < 1)

    def prefilter_kernels(self) -> Tuple[np.ndarray, np.ndarray] | None:
        """1-D Gaussian low-pass kernels (x, y) applied before an undistortion that shrinks."""
        if self.remap is None or min(self.sx, self.sy) >= 1:
            return None
        kernels = []
        for s in (self.sx, self.sy):
            sigma = max(0.0, (1.0 / s - 1.0) / 2.0)
            radius = int(math.ceil(3 * sigma))
            kernels.append(cv2.getGaussianKernel(2 * radius + 1, sigma).ravel() if radius else np.ones(1))
        return kernels[0], kernels[1]


def _readonly(*arrays: np.ndarray) -> Tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _remap_maps(m: PixelMap) -> Tuple[np.ndarray, np.ndarray]:
    """Original-pixel coordinates (float32 maps) of every prepared pixel of an undistortion."""
    src, dst = m.source, m.prepared
    size = (dst.width, dst.height)
    if src.distortion_model == "equidistant":
        mx, my = cv2.fisheye.initUndistortRectifyMap(src.K, np.asarray(src.D), np.eye(3), dst.K, size,
                                                     cv2.CV_32FC1)
    else:
        mx, my = cv2.initUndistortRectifyMap(src.K, np.asarray(src.D), None, dst.K, size, cv2.CV_32FC1)
    return _readonly(mx, my)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _nearest_index(w: _Warp) -> Tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Source row/column of the nearest pixel for every output pixel, and a validity mask
    (None: all valid). Separable (1-D rows/cols) for a plain resize."""
    W, H = w.src_size
    if w.remap is None:
        cols = np.clip(np.floor((np.arange(w.size[0]) + 0.5) / w.sx), 0, W - 1).astype(np.int64)
        rows = np.clip(np.floor((np.arange(w.size[1]) + 0.5) / w.sy), 0, H - 1).astype(np.int64)
        return _readonly(rows[:, None], cols[None, :]) + (None,)
    mx, my = _remap_maps(w.remap)
    cols, rows = np.floor(mx + 0.5).astype(np.int64), np.floor(my + 0.5).astype(np.int64)
    valid = (cols >= 0) & (cols < W) & (rows >= 0) & (rows < H)
    return _readonly(np.where(valid, rows, 0), np.where(valid, cols, 0), valid)


_NUMPY_DTYPES = (np.uint8, np.uint16, np.float32, np.float64)


def _check_image(image: Any, size: Tuple[int, int], what: str = "image") -> bool:
    """Validate an image against the expected (W, H); return True for a torch tensor."""
    torch = sys.modules.get("torch")
    is_torch = torch is not None and isinstance(image, torch.Tensor)
    if is_torch:
        if image.dtype not in (torch.uint8, torch.uint16, torch.float16, torch.bfloat16, torch.float32,
                               torch.float64):
            raise CameraError(f"{what} dtype {image.dtype} is not supported")
    else:
        if not isinstance(image, np.ndarray):
            raise CameraError(f"{what} must be a numpy array or torch tensor, got {type(image).__name__}")
        if image.dtype.type not in _NUMPY_DTYPES:
            raise CameraError(f"{what} dtype {image.dtype} is not supported; use uint8, uint16, float32 or float64")
    if image.ndim not in (2, 3):
        raise CameraError(f"{what} must have shape (H, W) or (H, W, C), got {tuple(image.shape)}")
    if (image.shape[1], image.shape[0]) != tuple(size):
        raise CameraError(
            f"{what} is {image.shape[1]}x{image.shape[0]} but the camera is {size[0]}x{size[1]}"
        )
    return is_torch


def _resample(image: ImageLike, w: _Warp, interpolation: str, fill: float = 0.0) -> ImageLike:
    if interpolation not in ("linear", "nearest"):
        raise CameraError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    is_torch = _check_image(image, w.src_size)
    if interpolation == "nearest":
        return _gather_nearest(image, w, fill, is_torch)
    return (_resample_torch if is_torch else _resample_cv2)(image, w)


def _gather_nearest(image: ImageLike, w: _Warp, fill: float, is_torch: bool) -> ImageLike:
    rows, cols, valid = _torch_index(w, image.device) if is_torch else _nearest_index(w)
    out = image[rows, cols]
    if valid is not None:
        out[~valid] = fill
    return out


def _resample_cv2(image: np.ndarray, w: _Warp) -> np.ndarray:
    src = np.ascontiguousarray(image)
    if w.remap is None:
        flag = cv2.INTER_AREA if w.smooths else cv2.INTER_LINEAR
        out = cv2.resize(src, None, fx=w.sx, fy=w.sy, interpolation=flag)
    else:
        kernels = w.prefilter_kernels()
        if kernels is not None:
            work = np.float64 if image.dtype == np.float64 else np.float32
            src = cv2.sepFilter2D(src.astype(work), -1, kernels[0], kernels[1], borderType=cv2.BORDER_REPLICATE)
        mx, my = _remap_maps(w.remap)
        out = cv2.remap(src, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if out.dtype != image.dtype and image.dtype.kind == "u":
            info = np.iinfo(image.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        out = out.astype(image.dtype, copy=False)
    if (out.shape[1], out.shape[0]) != w.size:  # pragma: no cover - guards the size convention
        raise RuntimeError(f"OpenCV produced {out.shape[1]}x{out.shape[0]}, expected {w.size}")
    return out.reshape(out.shape[:2] + image.shape[2:])


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _torch_grid(m: PixelMap, device: Any) -> "torch.Tensor":
    """``grid_sample`` grid (align_corners=False) for an undistortion, on ``device``."""
    import torch

    mx, my = _remap_maps(m)
    gx = (2.0 * mx + 1.0) / m.source.width - 1.0
    gy = (2.0 * my + 1.0) / m.source.height - 1.0
    return torch.from_numpy(np.stack([gx, gy], axis=-1)[None]).to(device)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _torch_index(w: _Warp, device: Any) -> Tuple[Any, ...]:
    import torch

    return tuple(None if a is None else torch.from_numpy(np.array(a)).to(device) for a in _nearest_index(w))


def _resample_torch(image: "torch.Tensor", w: _Warp) -> "torch.Tensor":
    import torch
    import torch.nn.functional as F

    x = image[..., None] if image.ndim == 2 else image
    x = x.permute(2, 0, 1)[None].to(torch.float64 if image.dtype == torch.float64 else torch.float32)
    Wp, Hp = w.size
    if w.remap is None:
        # interpolate() with a scale factor keeps that exact scale but floors the output size, so
        # pad (edge replicate, as OpenCV clamps at the border) and crop to round(W * s).
        pad_x, pad_y = int(math.ceil(1 / w.sx)) + 2, int(math.ceil(1 / w.sy)) + 2
        x = F.pad(x, (0, pad_x, 0, pad_y), mode="replicate")
        x = F.interpolate(x, scale_factor=(w.sy, w.sx), mode="bilinear", align_corners=False,
                          recompute_scale_factor=False, antialias=w.smooths)[..., :Hp, :Wp]
    else:
        kernels = w.prefilter_kernels()
        if kernels is not None:
            c = x.shape[1]
            for kernel, axis in zip(kernels, (3, 2)):
                r = len(kernel) // 2
                if r == 0:
                    continue
                k = torch.as_tensor(kernel, dtype=x.dtype, device=x.device)
                k = k.view(1, 1, 1, -1) if axis == 3 else k.view(1, 1, -1, 1)
                pad = (r, r, 0, 0) if axis == 3 else (0, 0, r, r)
                x = F.conv2d(F.pad(x, pad, mode="replicate"), k.expand(c, 1, *k.shape[2:]), groups=c)
        x = F.grid_sample(x, _torch_grid(w.remap, image.device).to(x.dtype), mode="bilinear",
                          padding_mode="zeros", align_corners=False)
    if x.shape[-2:] != (Hp, Wp):  # pragma: no cover - guards the size convention
        raise RuntimeError(f"torch produced {tuple(x.shape[-2:])}, expected {(Hp, Wp)}")
    out = x[0].permute(1, 2, 0)
    out = out[..., 0] if image.ndim == 2 else out
    if not image.dtype.is_floating_point:
        info = torch.iinfo(image.dtype)
        out = out.round().clamp(info.min, info.max)
    return out.to(image.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# Public preparation functions
# --------------------------------------------------------------------------------------------


def _prepare(image: ImageLike, intrinsics: Intrinsics, spec: Preprocess, interpolation: str) -> PreparedImage:
    m = preparation_map(intrinsics, spec)
    return PreparedImage(_resample(image, _Warp.of(m), interpolation), m.prepared, intrinsics, m)


def preparation_map(intrinsics: Intrinsics, preprocess: Any) -> PixelMap:
    """The geometry a preparation produces, without resampling an image: the :class:`PixelMap`
    (``.prepared`` holds the prepared intrinsics). Cached per (camera, request)."""
    if not isinstance(intrinsics, Intrinsics):
        raise CameraError(f"intrinsics must be an Intrinsics, got {type(intrinsics).__name__}")
    return _plan(intrinsics, _as_preprocess(preprocess))


def unify_focal(image: ImageLike, intrinsics: Intrinsics, target_focal: float, *,
                interpolation: str = "linear") -> PreparedImage:
    """Resample to an ideal pinhole with ``fx = fy = target_focal`` (VLM3 focal unification).

    The scale is ``sx = target/fx``, ``sy = target/fy`` (equal for ``fx == fy``); the output is
    ``round(W*sx) x round(H*sy)`` with ``cx' = (cx + 0.5)*sx - 0.5`` (same for y): the original's
    field of view on the pinhole image plane is kept (up to the rounding of the size), with no
    crop or pad. Without distortion this is a plain (possibly anisotropic) resize at exactly that
    scale; with distortion the original is undistorted into that geometry in one remap pass
    (pixels whose source falls outside the original are 0). ``interpolation``: "linear" (bilinear,
    area/antialiased when shrinking) or "nearest".
    """
    return _prepare(image, intrinsics, _as_preprocess({"mode": "focal", "value": target_focal}), interpolation)


def resize_max_edge(image: ImageLike, intrinsics: Intrinsics, max_edge: float, *,
                    undistort: bool = False) -> PreparedImage:
    """Resize so that ``max(width, height) = max_edge`` (VLM3 correspondence preprocessing).

    Without undistortion this is a plain resize to ``round(W*s) x round(H*s)``, ``s = max_edge /
    max(W, H)``, using the scales ``W'/W`` and ``H'/H`` of that size (as any image library does);
    the intrinsics keep their distortion and are scaled with :meth:`Intrinsics.scaled`. With
    ``undistort=True`` a camera that is not an ideal pinhole is undistorted to one whose longest
    side is ``max_edge``.
    """
    return _prepare(image, intrinsics, _as_preprocess({"mode": "max_edge", "value": max_edge, "undistort": undistort}),
                    "linear")


def prepare_image(image: ImageLike, intrinsics: Intrinsics, preprocess: Any) -> PreparedImage:
    """Prepare an image for a task; ``preprocess`` has ``mode`` ("focal" | "max_edge"), ``value``
    and optionally ``undistort`` (a :class:`Preprocess`, mapping or object)."""
    return _prepare(image, intrinsics, _as_preprocess(preprocess), "linear")


def prepare_depth(depth: ImageLike, prepared: PreparedImage) -> ImageLike:
    """Resample a depth (or label) map of the original image into ``prepared``'s geometry.

    Nearest neighbour (no mixing of valid and invalid values); prepared pixels whose source is
    outside the original get NaN (float) or 0 (integer). Depth along z and ray distance are both
    unchanged by the preparation (same camera centre and orientation), so values are kept as is.
    """
    m = prepared.mapping
    is_torch = _check_image(depth, (m.source.width, m.source.height), "depth map")
    floating = depth.dtype.is_floating_point if is_torch else np.issubdtype(depth.dtype, np.floating)
    return _gather_nearest(depth, _Warp.of(m), math.nan if floating else 0, is_torch)


def resize_image(image: ImageLike, width: int, height: int, *, interpolation: str = "linear") -> ImageLike:
    """Resize to ``width x height`` (scales ``width/W``, ``height/H``, pixel-centre convention).

    "linear" is bilinear (area/antialiased when shrinking); "nearest" picks the source pixel whose
    centre is nearest (use it for depth and label maps).
    """
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_IMAGE_SIDE:
            raise CameraError(f"resize {name} must be an integer in [1, {MAX_IMAGE_SIDE}], got {value!r}")
    if getattr(image, "ndim", 0) not in (2, 3):
        raise CameraError(f"image must have shape (H, W) or (H, W, C), got {getattr(image, 'shape', None)}")
    W, H = image.shape[1], image.shape[0]
    return _resample(image, _Warp((W, H), (int(width), int(height)), width / W, height / H), interpolation)
