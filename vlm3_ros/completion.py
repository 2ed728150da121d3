"""Dense metric depth from a frame's sparse answers, guided by the image.

A frame's answers are metric depths at a few hundred pixels. This module turns them into a depth
value and a confidence at every pixel of the original image, and says where more questions about
the same frame would help most.

The completion works in inverse depth (``w = 1 / z``), which is an affine function of the pixel
position on any plane, so a plane between samples is interpolated exactly:

1. **Linear**: the samples are triangulated (Delaunay, :mod:`scipy.spatial`) and ``w`` is
   interpolated linearly inside each triangle. This is right wherever a triangle's corners lie
   on one smooth surface; across an object boundary it blends foreground and background into a
   ramp ("bleeding": depths that exist nowhere in the scene).
2. **Edge-aware**: the samples are spread over the image by normalized convolution with OpenCV's
   fast global smoother (``cv2.ximgproc``, Min et al. 2014) guided by the colour image: ``w`` and
   the sample indicator are both filtered and divided, so each pixel takes the samples it is
   connected to without crossing a colour edge. This keeps object boundaries where the image has
   them but is only piecewise smooth.
3. **Blend**: a triangle's *spread* (the range of ``log z`` over its corners) tells the two apart.
   Below ``discontinuity`` the linear value is used, above ``2 * discontinuity`` the edge-aware one,
   in between a linear mix; outside the samples' convex hull the edge-aware value is used.

The **confidence** (0..1) of a pixel falls with its triangle's spread (a depth discontinuity or a
steep surface lies somewhere inside) and with its distance from the nearest sample relative to the
samples' mean spacing; :meth:`DenseDepth.masked` turns pixels below a threshold into NaN.

:func:`select_adaptive_pixels` places a second round of questions where the first round's
completion is least certain: large spread (depth discontinuities), far from any sample, optionally
weighted toward image edges and the lower image band a ground robot drives into (greedy weighted
farthest-point sampling). :func:`interpolate_linear` is the plain baseline (linear in ``z``,
nearest sample outside the convex hull) the completion is measured against.

Everything here works on numpy arrays in the original image's pixel grid (integer coordinates at
pixel centres) and imports no ROS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "AdaptiveConfig",
    "CompletionConfig",
    "CompletionError",
    "DenseDepth",
    "complete_depth",
    "edge_strength",
    "interpolate_linear",
    "select_adaptive_pixels",
]

#: Depth values (m) the completion clamps its output to; far outside any camera's range.
MIN_DEPTH, MAX_DEPTH = 1e-3, 1e4


class CompletionError(ValueError):
    """Inputs the completion cannot use (shapes, sizes, settings)."""


@dataclass(frozen=True)
class CompletionConfig:
    """Settings of :func:`complete_depth`.

    Attributes:
        smoothness: the fast global smoother's lambda: how far a sample spreads along smooth image
            regions (larger: farther, across weaker edges). Defined at ``work_size``.
        color_sigma: the smoother's colour sigma (intensity levels): colour differences well above
            it stop the spreading.
        discontinuity: ``log z`` spread over a triangle above which the edge-aware estimate starts
            to replace the linear one (0.2: the corners' depths differ by about 22 %); fully
            replaced at twice the value.
        confidence_spread: the confidence halves with every ``confidence_spread`` of spread.
        confidence_distance: distance from the nearest sample, in mean sample spacings, at which
            the confidence has fallen by a factor ``exp(-1)`` (far from every sample: outside the
            samples' hull, large holes).
        work_size: the completion runs on an image whose longer side is at most this many pixels
            (larger images are reduced for it and the result is resized back).
    """

    smoothness: float = 150.0
    color_sigma: float = 5.0
    discontinuity: float = 0.2
    confidence_spread: float = 0.2
    confidence_distance: float = 3.0
    work_size: int = 640

    def __post_init__(self) -> None:
        for name in ("smoothness", "color_sigma", "discontinuity", "confidence_spread", "confidence_distance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise CompletionError(f"completion {name} must be a positive number, got {value!r}")
        if not (isinstance(self.work_size, (int, np.integer)) and 16 <= self.work_size <= 16384):
            raise CompletionError(f"completion work_size must be an integer in [16, 16384], got {self.work_size!r}")


@dataclass(frozen=True)
class AdaptiveConfig:
    """Settings of :func:`select_adaptive_pixels`.

    Attributes:
        margin: border left out, as a fraction of the image size (as the first round's grid).
        lower_band: extra weight of the lower third of the image (0: none; 1: twice the weight),
            where a ground robot's path lies.
        edge_weight: weight of image edges (0..1 normalised gradient strength) added to the spread.
        spread_floor: smallest spread a candidate is given, so that smooth regions far from any
            sample are still filled.
        distance_power: exponent of the distance to the nearest sample in the score.
        step: spacing (pixels of the working image) of the candidate pixels.
    """

    margin: float = 0.02
    lower_band: float = 0.0
    edge_weight: float = 0.0
    spread_floor: float = 0.02
    distance_power: float = 2.0
    step: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 0.5:
            raise CompletionError(f"adaptive margin must be in [0, 0.5), got {self.margin!r}")
        for name in ("lower_band", "edge_weight"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise CompletionError(f"adaptive {name} must be >= 0, got {value!r}")
        if not (np.isfinite(self.spread_floor) and self.spread_floor > 0):
            raise CompletionError(f"adaptive spread_floor must be > 0, got {self.spread_floor!r}")
        if not (np.isfinite(self.distance_power) and self.distance_power > 0):
            raise CompletionError(f"adaptive distance_power must be > 0, got {self.distance_power!r}")
        if not (isinstance(self.step, (int, np.integer)) and 1 <= self.step <= 64):
            raise CompletionError(f"adaptive step must be an integer in [1, 64], got {self.step!r}")


@dataclass
class DenseDepth:
    """A dense depth map of one frame and what it is based on.

    Attributes:
        depth: (H, W) float32 metres along z, finite wherever at least one sample exists
            (all NaN when there is none).
        confidence: (H, W) float32 in [0, 1].
        spread: (H, W) float32 ``log z`` range over the corners of the pixel's triangle (outside the
            samples' convex hull: over the three nearest samples).
        distance: (H, W) float32 pixels to the nearest sample.
        samples: number of samples used.
    """

    depth: np.ndarray
    confidence: np.ndarray
    spread: np.ndarray
    distance: np.ndarray
    samples: int

    def masked(self, min_confidence: float) -> np.ndarray:
        """The depth with NaN where the confidence is below ``min_confidence`` (REP-118 unknown)."""
        out = self.depth.copy()
        out[~(self.confidence >= min_confidence)] = np.nan
        return out


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def _check_size(width: int, height: int) -> None:
    if not (int(width) >= 2 and int(height) >= 2):
        raise CompletionError(f"image size must be at least 2x2, got {width}x{height}")


def _samples(uv: Any, z: Any, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Usable samples: finite, z > 0, inside the image; samples at the same pixel position merged
    (mean inverse depth)."""
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    if len(uv) != len(z):
        raise CompletionError(f"{len(uv)} pixels but {len(z)} depths")
    ok = np.all(np.isfinite(uv), axis=1) & np.isfinite(z) & (z > 0)
    ok &= (uv[:, 0] >= -0.5) & (uv[:, 0] <= width - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] <= height - 0.5)
    uv, z = uv[ok], z[ok]
    if len(uv) == 0:
        return uv, z
    key = np.round(uv * 1000).astype(np.int64)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    if len(first) == len(uv):
        return uv, z
    inverse = inverse.reshape(-1)
    w = np.bincount(inverse, weights=1.0 / z) / np.bincount(inverse)
    return uv[first], 1.0 / w


def _guide(image: Any, width: int, height: int) -> np.ndarray:
    image = np.asarray(image)
    if image.shape[:2] != (height, width):
        raise CompletionError(f"guide image is {image.shape[1]}x{image.shape[0]}, the depth map {width}x{height}")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
        raise CompletionError(f"guide image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
    if image.dtype != np.uint8:
        image = cv2.normalize(np.nan_to_num(image.astype(np.float32)), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return np.ascontiguousarray(image)


def _work_scale(width: int, height: int, work_size: int) -> float:
    return min(1.0, work_size / max(width, height))


def _to_work(image: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1.0:
        return image
    size = (max(2, int(round(image.shape[1] * scale))), max(2, int(round(image.shape[0] * scale))))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _uv_to_work(uv: np.ndarray, width: int, height: int, work: tuple[int, int]) -> np.ndarray:
    sx, sy = work[0] / width, work[1] / height
    return np.column_stack([(uv[:, 0] + 0.5) * sx - 0.5, (uv[:, 1] + 0.5) * sy - 0.5])


# ------------------------------------------------------------------------------------------------
# Interpolation
# ------------------------------------------------------------------------------------------------


def _triangulate(uv: np.ndarray):
    """A Delaunay triangulation of the samples, or None where they span no triangle."""
    from scipy.spatial import Delaunay, QhullError

    if len(uv) < 3:
        return None
    try:
        return Delaunay(uv)
    except QhullError:  # collinear samples
        return None


def _pixels(width: int, height: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.column_stack([xs.ravel(), ys.ravel()]).astype(np.float64)


_SUBPIXEL_BITS = 4
_MAX_WALK = 16


def _barycentric_of(tri, simplex: np.ndarray, pix: np.ndarray) -> np.ndarray:
    """Barycentric coordinates (N, 3) of pixels ``pix`` in their triangles ``simplex`` (all >= 0)."""
    corners = tri.points[tri.simplices[simplex]]  # (N, 3, 2)
    e0, e1 = corners[:, 0] - corners[:, 2], corners[:, 1] - corners[:, 2]
    d = pix - corners[:, 2]
    with np.errstate(all="ignore"):
        det = e0[:, 0] * e1[:, 1] - e0[:, 1] * e1[:, 0]
        b0 = (d[:, 0] * e1[:, 1] - d[:, 1] * e1[:, 0]) / det
        b1 = (e0[:, 0] * d[:, 1] - e0[:, 1] * d[:, 0]) / det
    return np.column_stack([b0, b1, 1.0 - b0 - b1])


def _locate(tri, width: int, height: int, pix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The triangle holding each pixel (-1 outside the convex hull) and the pixel's barycentric
    coordinates in it. Triangles are rasterised with OpenCV (fast, but a pixel on or next to an
    edge may land in a neighbour); a pixel outside its triangle walks to the neighbour across the
    edge it lies beyond until it is inside (or leaves the hull)."""
    labels = np.full((height, width), -1, dtype=np.int32)
    corners = np.round(tri.points[tri.simplices] * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    for index, polygon in enumerate(corners):
        cv2.fillConvexPoly(labels, polygon, index, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    simplex = labels.reshape(-1).copy()
    bary = np.full((len(pix), 3), np.nan)
    found = simplex >= 0
    bary[found] = _barycentric_of(tri, simplex[found], pix[found])
    for _ in range(_MAX_WALK):
        wrong = np.flatnonzero((simplex >= 0) & ~(np.nan_to_num(bary, nan=-1.0).min(axis=1) >= -1e-9))
        if not len(wrong):
            break
        # The neighbour opposite the corner with the most negative coordinate (-1: outside the hull).
        step = tri.neighbors[simplex[wrong], np.argmin(np.nan_to_num(bary[wrong], nan=-1.0), axis=1)]
        simplex[wrong] = step
        bary[wrong] = np.nan
        moved = wrong[step >= 0]
        bary[moved] = _barycentric_of(tri, simplex[moved], pix[moved])
    else:  # still not inside after the walk (degenerate slivers): treated as outside
        simplex[(simplex >= 0) & ~(np.nan_to_num(bary, nan=-1.0).min(axis=1) >= -1e-9)] = -1
    return simplex, bary


def _interpolate(tri, simplex: np.ndarray, bary: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` at the triangle corners interpolated linearly (NaN outside the hull)."""
    out = np.full(len(simplex), np.nan)
    inside = simplex >= 0
    out[inside] = np.einsum("ni,ni->n", bary[inside], values[tri.simplices[simplex[inside]]])
    return out


def _nearest(uv: np.ndarray, pix: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial import cKDTree

    distance, index = cKDTree(uv).query(pix, k=min(k, len(uv)))
    return distance.reshape(len(pix), -1), index.reshape(len(pix), -1)


def _nearest_map(uv: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(distance in pixels to the nearest sample, that sample's index) at every pixel (row-major),
    by OpenCV's distance transform (samples rounded to their pixel)."""
    cols = np.clip(np.round(uv[:, 0]).astype(int), 0, width - 1)
    rows = np.clip(np.round(uv[:, 1]).astype(int), 0, height - 1)
    free = np.ones((height, width), np.uint8)
    free[rows, cols] = 0
    distance, labels = cv2.distanceTransformWithLabels(free, cv2.DIST_L2, cv2.DIST_MASK_5,
                                                        labelType=cv2.DIST_LABEL_PIXEL)
    owner = np.zeros(len(uv) + 1, dtype=np.int64)  # label of each sample pixel -> sample index
    owner[labels[rows, cols]] = np.arange(len(uv))
    return distance.reshape(-1), owner[labels.reshape(-1)]


def interpolate_linear(uv: Any, z: Any, width: int, height: int) -> np.ndarray:
    """Plain linear interpolation of depth ``z`` at pixels ``uv`` over a ``width x height`` image.

    Linear in ``z`` inside the samples' Delaunay triangles, the nearest sample's value outside
    their convex hull; NaN everywhere when there is no sample. The baseline of the benchmarks.
    """
    _check_size(width, height)
    uv, z = _samples(uv, z, width, height)
    if len(uv) == 0:
        return np.full((height, width), np.nan, dtype=np.float32)
    pix = _pixels(width, height)
    tri = _triangulate(uv)
    out = np.full(len(pix), np.nan)
    if tri is not None:
        out = _interpolate(tri, *_locate(tri, width, height, pix), z)
    missing = ~np.isfinite(out)
    if missing.any():
        _, nearest = _nearest(uv, pix[missing])
        out[missing] = z[nearest[:, 0]]
    return out.reshape(height, width).astype(np.float32)


def _smoother(guide: np.ndarray, config: CompletionConfig) -> Any:
    ximgproc = getattr(cv2, "ximgproc", None)
    if ximgproc is None:
        raise CompletionError(f"OpenCV {cv2.__version__} here has no contrib modules (cv2.ximgproc); dense depth "
                              "needs them: pip install opencv-contrib-python-headless (instead of "
                              "opencv-python-headless) or a python3-opencv built with the contrib modules")
    return ximgproc.createFastGlobalSmootherFilter(guide, float(config.smoothness), float(config.color_sigma))


def _edge_aware(guide: np.ndarray, uv: np.ndarray, w: np.ndarray, config: CompletionConfig) -> np.ndarray:
    """Normalized convolution of the inverse depths with the fast global smoother (image-guided)."""
    height, width = guide.shape[:2]
    data = np.zeros((height, width, 2), np.float32)
    cols = np.clip(np.round(uv[:, 0]).astype(int), 0, width - 1)
    rows = np.clip(np.round(uv[:, 1]).astype(int), 0, height - 1)
    np.add.at(data, (rows, cols, 0), w.astype(np.float32))
    np.add.at(data, (rows, cols, 1), 1.0)
    filtered = _smoother(guide, config).filter(data)
    support = filtered[..., 1].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = filtered[..., 0] / support
    bad = ~(np.isfinite(out) & (out > 0) & (support > 1e-12))
    if bad.any():  # numerically unreachable pixels: the nearest sample
        ys, xs = np.nonzero(bad)
        _, nearest = _nearest(uv, np.column_stack([xs, ys]).astype(np.float64))
        out[bad] = w[nearest[:, 0]]
    return out


def complete_depth(image: Any, uv: Any, z: Any, config: CompletionConfig | None = None) -> DenseDepth:
    """Dense depth (metres along z) and confidence from depths ``z`` at pixels ``uv`` of ``image``.

    ``image`` is the frame the answers are about, (H, W[, C]) (uint8 preferred; RGB or grey), in the
    same pixel grid as ``uv``; the result has its size. Samples that are not finite, not positive or
    outside the image are ignored. See the module docstring for the method.
    """
    config = config or CompletionConfig()
    image = np.asarray(image)
    if image.ndim < 2:
        raise CompletionError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    height, width = image.shape[:2]
    _check_size(width, height)
    guide = _guide(image, width, height)
    uv, z = _samples(uv, z, width, height)
    if len(uv) == 0:
        nan = np.full((height, width), np.nan, dtype=np.float32)
        return DenseDepth(nan, np.zeros((height, width), np.float32), nan.copy(),
                          np.full((height, width), np.inf, np.float32), 0)

    scale = _work_scale(width, height, config.work_size)
    work_guide = _to_work(guide, scale)
    wh, ww = work_guide.shape[:2]
    wuv = _uv_to_work(uv, width, height, (ww, wh)) if scale < 1.0 else uv
    w = 1.0 / z
    logz = np.log(z)
    pix = _pixels(ww, wh)

    tri = _triangulate(wuv)
    linear = np.full(len(pix), np.nan)
    spread = np.full(len(pix), np.nan)
    if tri is not None:
        simplex, bary = _locate(tri, ww, wh, pix)
        linear = _interpolate(tri, simplex, bary, w)
        corner = logz[tri.simplices]
        tri_spread = corner.max(axis=1) - corner.min(axis=1)
        inside = simplex >= 0
        spread[inside] = tri_spread[simplex[inside]]
    d0, _ = _nearest_map(wuv, ww, wh)
    outside = ~np.isfinite(spread)
    if outside.any():
        _, near = _nearest(wuv, pix[outside], k=3)
        spread[outside] = logz[near].max(axis=1) - logz[near].min(axis=1)

    edge = _edge_aware(work_guide, wuv, w, config).reshape(-1)
    t = config.discontinuity
    alpha = np.clip((spread - t) / t, 0.0, 1.0)
    alpha[~np.isfinite(linear)] = 1.0
    inv = np.where(alpha >= 1.0, edge, (1.0 - alpha) * np.nan_to_num(linear) + alpha * edge)
    depth = 1.0 / np.clip(inv, 1.0 / MAX_DEPTH, 1.0 / MIN_DEPTH)

    spacing = np.sqrt(ww * wh / len(wuv))
    confidence = 0.5 ** (spread / config.confidence_spread) * np.exp(-((d0 / (config.confidence_distance * spacing)) ** 2))

    maps = [a.reshape(wh, ww).astype(np.float32) for a in (depth, confidence, spread, d0 / (scale if scale < 1 else 1.0))]
    if scale < 1.0:
        maps = [cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in maps]
    return DenseDepth(depth=maps[0], confidence=np.clip(maps[1], 0.0, 1.0), spread=maps[2], distance=maps[3],
                      samples=len(uv))


# ------------------------------------------------------------------------------------------------
# Adaptive questions
# ------------------------------------------------------------------------------------------------


def edge_strength(image: Any) -> np.ndarray:
    """Image edge strength in [0, 1] (smoothed gradient magnitude over its 99th percentile)."""
    image = np.asarray(image)
    gray = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    gray = cv2.GaussianBlur(gray.astype(np.float32), (0, 0), 1.5)
    grad = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    grad = cv2.GaussianBlur(grad, (0, 0), 4.0)
    top = float(np.percentile(grad, 99))
    return np.clip(grad / top, 0.0, 1.0) if top > 0 else np.zeros_like(grad)


def select_adaptive_pixels(dense: DenseDepth, uv: Any, count: int, config: AdaptiveConfig | None = None, *,
                           image: Any = None) -> np.ndarray:
    """``count`` pixels for a second round of questions, where ``dense`` (the completion of the
    first round's answers at pixels ``uv``) is least certain.

    Each candidate pixel (a grid of ``config.step`` pixels inside ``config.margin``) is scored by
    ``weight * distance ** distance_power``, where ``distance`` is to the nearest pixel already
    asked or chosen and ``weight`` is the completion's spread at the candidate (at least
    ``spread_floor``), plus ``edge_weight`` times the image's edge strength (``image`` needed), times
    ``1 + lower_band`` in the lower third of the image. The best candidate is taken and the
    distances updated, ``count`` times (weighted farthest-point sampling): uncertain regions get
    many questions, every region some. Returns (count, 2) integer pixel positions as float64.
    """
    config = config or AdaptiveConfig()
    if count < 0:
        raise CompletionError(f"adaptive count must be >= 0, got {count}")
    height, width = dense.depth.shape
    if count == 0:
        return np.zeros((0, 2))
    x0, x1 = config.margin * (width - 1), (1 - config.margin) * (width - 1)
    y0, y1 = config.margin * (height - 1), (1 - config.margin) * (height - 1)
    xs = np.arange(np.ceil(x0), np.floor(x1) + 1, config.step)
    ys = np.arange(np.ceil(y0), np.floor(y1) + 1, config.step)
    cand = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    ci, ri = cand[:, 0].astype(int), cand[:, 1].astype(int)
    spread = np.nan_to_num(dense.spread[ri, ci], nan=0.0)
    weight = np.maximum(spread, config.spread_floor)
    if config.edge_weight > 0:
        if image is None:
            raise CompletionError("adaptive edge_weight > 0 needs the image")
        weight = weight + config.edge_weight * edge_strength(image)[ri, ci]
    if config.lower_band > 0:
        weight = weight * (1.0 + config.lower_band * (cand[:, 1] >= (2.0 / 3.0) * (height - 1)))
    asked = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    asked = asked[np.all(np.isfinite(asked), axis=1)]
    if len(asked):
        distance = _nearest(asked, cand)[0][:, 0]
    else:
        distance = np.full(len(cand), float(np.hypot(width, height)))
    chosen = []
    for _ in range(min(count, len(cand))):
        i = int(np.argmax(weight * distance ** config.distance_power))
        if distance[i] <= 0:
            break
        chosen.append(cand[i])
        distance = np.minimum(distance, np.hypot(cand[:, 0] - cand[i, 0], cand[:, 1] - cand[i, 1]))
    return np.array(chosen, dtype=np.float64).reshape(-1, 2)
