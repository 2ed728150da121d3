"""Object-level geometry: image boxes, the 3D extent of the object a box holds, and the true answers
of the object questions (:data:`vlm3_ros.protocol.OBJECT_QUESTIONS`).

Definitions (camera optical frame: x right, y down, z forward; metres):

* A **box** is ``(x1, y1, x2, y2)`` in corner coordinates: the pixel with centre ``(u, v)`` (integer
  coordinates, the convention of the intrinsics) is inside when ``x1 <= u + 0.5 < x2`` and
  ``y1 <= v + 0.5 < y2``; the box of a whole W x H image is ``(0, 0, W, H)``.
* The **object** in a box is the part of the box's back-projected depth near its median depth:
  points whose z is within ``max(BAND_MIN_M, BAND_REL * median z)`` of the median (so the wall
  behind a cup in its box is left out).
* Its **extent** along each camera axis is the range between the ``PERCENTILES`` of its points'
  coordinates (robust to stray depth pixels); ``width`` is the extent along x, ``height`` along y,
  ``depth`` along z; the **centre** is the middle of the extents; the **volume** is their product.
* Relations compare centres (left/right: x, above/below: y), the nearest z (in front / behind:
  the lower z percentile, as SpatialRGPT compares the nearest points), volumes, heights and
  widths. Distances are between centres: ``direct`` (Euclidean), ``horizontal`` (|dx|),
  ``vertical`` (|dy|).

Where this differs from SpatialRGPT's data generator (``osdsynth``, AnjieCheng/SpatialRGPT): it
measures in a gravity-aligned frame (camera roll and pitch removed, y up) that a single camera
frame does not provide, so here the camera's own axes are used (equal for a level camera); and
its direct distance is the mean nearest-neighbour distance between the two point clouds rather
than the distance between centres. Both are noted in README ("Object-level 3D").

The same functions give the oracle's answers (:class:`vlm3_ros.engine.OracleBackend`) and the
ground truth of training and evaluation samples, so a model is trained and scored on what the
oracle answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .protocol import OBJECT_QUESTIONS, ObjectQuestion, ProtocolError

__all__ = [
    "BAND_MIN_M",
    "BAND_REL",
    "MIN_POINTS",
    "PERCENTILES",
    "ObjectExtent",
    "box_pixel_mask",
    "box_samples",
    "check_box",
    "depth_band",
    "object_extent",
    "object_measure",
    "region_extent",
    "region_points",
    "true_answer",
]

#: half-width of the depth band around the median z that belongs to the object: max of these
BAND_MIN_M = 0.10
BAND_REL = 0.15
#: percentiles of the object's coordinates taken as its extent
PERCENTILES = (1.0, 99.0)
#: fewer object points than this: no extent (the question is not answerable)
MIN_POINTS = 20


def check_box(box: Sequence[float]) -> np.ndarray:
    """A box as a float array ``(x1, y1, x2, y2)``; ValueError unless finite with x2 > x1, y2 > y1."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        raise ValueError(f"a box is four finite numbers (x1, y1, x2, y2), got {box!r}")
    if not (b[2] > b[0] and b[3] > b[1]):
        raise ValueError(f"a box needs x2 > x1 and y2 > y1, got {tuple(float(v) for v in b)}")
    return b


def box_pixel_mask(box: Sequence[float], width: int, height: int) -> tuple[slice, slice]:
    """Rows and columns (slices) of the pixels inside ``box`` (see the module docstring)."""
    x1, y1, x2, y2 = check_box(box)
    cols = slice(int(np.clip(np.ceil(x1 - 0.5), 0, width)), int(np.clip(np.ceil(x2 - 0.5), 0, width)))
    rows = slice(int(np.clip(np.ceil(y1 - 0.5), 0, height)), int(np.clip(np.ceil(y2 - 0.5), 0, height)))
    return rows, cols


def box_samples(box: Sequence[float], grid: int, inner: float) -> np.ndarray:
    """``grid`` x ``grid`` pixel positions (pixel-centre coordinates, row by row) spread over the
    central ``inner`` fraction of ``box`` (each side), where depth is asked."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if not 0.0 < inner <= 1.0:
        raise ValueError(f"inner must be in (0, 1], got {inner}")
    x1, y1, x2, y2 = check_box(box)
    f = np.linspace(0.5 - inner / 2, 0.5 + inner / 2, grid) if grid > 1 else np.array([0.5])
    xs, ys = x1 + (x2 - x1) * f - 0.5, y1 + (y2 - y1) * f - 0.5
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


def region_points(depth: np.ndarray, K: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The back-projected points (N, 3) of the valid depth pixels (z, metres) inside ``box``."""
    depth = np.asarray(depth)
    height, width = depth.shape[:2]
    rows, cols = box_pixel_mask(box, width, height)
    z = np.asarray(depth[rows, cols], dtype=np.float64)
    v, u = np.mgrid[rows, cols]
    ok = np.isfinite(z) & (z > 0)
    K = np.asarray(K, dtype=np.float64)
    x = (u[ok] - K[0, 2] - K[0, 1] * (v[ok] - K[1, 2]) / K[1, 1]) / K[0, 0]
    y = (v[ok] - K[1, 2]) / K[1, 1]
    return np.column_stack([x * z[ok], y * z[ok], z[ok]])


def depth_band(z: np.ndarray) -> np.ndarray:
    """Mask of the depths that belong to the object: within the band around their median."""
    z = np.asarray(z, dtype=np.float64)
    ok = np.isfinite(z) & (z > 0)
    if not ok.any():
        return ok
    median = float(np.median(z[ok]))
    return ok & (np.abs(z - median) <= max(BAND_MIN_M, BAND_REL * median))


@dataclass(frozen=True)
class ObjectExtent:
    """The robust axis-aligned extent of an object in the camera frame (see the module docstring)."""

    lower: np.ndarray  #: (3,) lower percentile of x, y, z
    upper: np.ndarray  #: (3,) upper percentile of x, y, z
    points: int  #: object points it was measured from

    @property
    def centre(self) -> np.ndarray:
        return (self.lower + self.upper) / 2

    @property
    def size(self) -> np.ndarray:
        return self.upper - self.lower

    @property
    def width(self) -> float:
        return float(self.size[0])

    @property
    def height(self) -> float:
        return float(self.size[1])

    @property
    def depth(self) -> float:
        return float(self.size[2])

    @property
    def volume(self) -> float:
        return float(np.prod(self.size))


def object_extent(points: np.ndarray) -> ObjectExtent | None:
    """The extent of the object among ``points`` (N, 3) (in-band points only); None below MIN_POINTS."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    obj = points[depth_band(points[:, 2])] if len(points) else points
    if len(obj) < MIN_POINTS:
        return None
    lower, upper = np.percentile(obj, PERCENTILES, axis=0)
    return ObjectExtent(lower=lower, upper=upper, points=len(obj))


def region_extent(depth: np.ndarray, K: np.ndarray, region: Sequence[float], scale: float = 1000.0) -> ObjectExtent | None:
    """The extent of the object in a region given in text coordinates (``[0, scale]`` of the width
    and height of ``depth``, the depth image of the image the region refers to, with intrinsics
    ``K``); None when it has too few points or covers no pixel."""
    height, width = np.asarray(depth).shape[:2]
    x1, y1, x2, y2 = (float(v) for v in region)
    box = (x1 / scale * width, y1 / scale * height, x2 / scale * width, y2 / scale * height)
    try:
        return object_extent(region_points(depth, K, box))
    except ValueError:  # an empty box
        return None


def object_measure(name: str, a: ObjectExtent, b: ObjectExtent | None = None) -> float:
    """A measure of one object (width, height, depth, volume, x, y, near) or of a pair (distance,
    horizontal_distance, vertical_distance)."""
    single = {
        "width": lambda e: e.width,
        "height": lambda e: e.height,
        "depth": lambda e: e.depth,
        "volume": lambda e: e.volume,
        "x": lambda e: float(e.centre[0]),
        "y": lambda e: float(e.centre[1]),
        "near": lambda e: float(e.lower[2]),
    }
    if name in single:
        return single[name](a)
    if b is None:
        raise ProtocolError(f"measure {name!r} needs two objects")
    delta = a.centre - b.centre
    pair = {
        "distance": float(np.linalg.norm(delta)),
        "horizontal_distance": abs(float(delta[0])),
        "vertical_distance": abs(float(delta[1])),
    }
    if name not in pair:
        raise ProtocolError(f"unknown object measure {name!r}")
    return pair[name]


def true_answer(question: ObjectQuestion | str, a: ObjectExtent, b: ObjectExtent | None = None) -> float | bool | int:
    """The true value of an object question: metres (quantity), bool (predicate: does region a have
    the larger / smaller measure, strictly) or the chosen region's index (choice; a on a tie)."""
    q = OBJECT_QUESTIONS[question] if isinstance(question, str) else question
    if q.regions == 2 and b is None:
        raise ProtocolError(f"object question {q.id!r} is about two regions")
    if q.kind == "quantity":
        return object_measure(q.measure, a, b)
    ma, mb = object_measure(q.measure, a), object_measure(q.measure, b)  # type: ignore[arg-type]
    if q.kind == "predicate":
        return bool(ma > mb) if q.sense > 0 else bool(ma < mb)
    return 0 if (ma >= mb if q.sense > 0 else ma <= mb) else 1
