"""Scenes, boxes and independently computed ground truth for the object tests.

* :func:`rectangles_depth`: a depth image of flat rectangles in front of a wall (known geometry);
* :func:`rectangle_box`: the image box of such a rectangle;
* :func:`segmented_boxes`: boxes around depth-segmented regions of a real depth image;
* :class:`Counting`: a backend around another that records its requests;
* :func:`assert_matches_ground_truth`: an estimate against :func:`expected_object`, within the
  answers' rounding;
* :func:`expected_object`: what an object estimate must be for a box, computed here from the
  definitions (vlm3_ros.objects docstring) and the protocol's coordinate conventions with plain
  numpy, without the package's functions.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import pytest
from scipy import ndimage

from vlm3_ros import objects
from vlm3_ros.engine import Backend, Request, Response

#: (x0, y0, x1, y1, z): a rectangle facing the camera at depth z (metres, optical frame)
Rectangle = Tuple[float, float, float, float, float]


def rectangles_depth(K: np.ndarray, width: int, height: int, rectangles: Sequence[Rectangle],
                     wall: float = 4.0) -> np.ndarray:
    """z of the nearest rectangle at each pixel, else the wall."""
    uu, vv = np.meshgrid(np.arange(width), np.arange(height))
    rays = np.linalg.solve(K, np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)])).T.reshape(height, width, 3)
    depth = np.full((height, width), wall)
    for x0, y0, x1, y1, z in sorted(rectangles, key=lambda r: -r[4]):
        x, y = rays[..., 0] * z, rays[..., 1] * z
        depth[(x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)] = z
    return depth


def rectangle_box(K: np.ndarray, rect: Rectangle) -> np.ndarray:
    """The box (corner coordinates) of a rectangle seen by a pinhole camera K."""
    x0, y0, x1, y1, z = rect
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    return np.array([fx * x0 / z + cx + 0.5, fy * y0 / z + cy + 0.5, fx * x1 / z + cx + 0.5, fy * y1 / z + cy + 0.5])


def segmented_boxes(depth: np.ndarray, step: float = 0.25, min_area: int = 3000, min_fill: float = 0.6,
                    max_fraction: float = 0.6) -> List[np.ndarray]:
    """Boxes around connected regions of similar depth (``step`` m bins) that fill most of their box."""
    height, width = depth.shape
    bins = np.floor(np.nan_to_num(depth, nan=0.0) / step)
    boxes = []
    for b in np.unique(bins[bins > 0]):
        labels, n = ndimage.label(bins == b)
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            area = int((labels[sl] == k).sum())
            if area >= min_area and area / (h * w) >= min_fill and w <= max_fraction * width and h <= max_fraction * height:
                boxes.append(np.array([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop], float))
    return boxes


def _band(z: np.ndarray) -> np.ndarray:
    ok = np.isfinite(z) & (z > 0)
    median = np.median(z[ok])
    return ok & (np.abs(z - median) <= max(objects.BAND_MIN_M, objects.BAND_REL * median))


def focal_unified(depth: np.ndarray, K: np.ndarray, focal: float = 1000.0):
    """The depth image as the object task sees it (an ideal pinhole camera scaled to ``focal``,
    nearest-neighbour, pixel centres at integers): (depth, K, scale)."""
    s = focal / K[0, 0]
    height, width = depth.shape
    cols = np.clip(np.floor((np.arange(round(width * s)) + 0.5) / s), 0, width - 1).astype(int)
    rows = np.clip(np.floor((np.arange(round(height * s)) + 0.5) / s), 0, height - 1).astype(int)
    K2 = np.array([[focal, 0, (K[0, 2] + 0.5) * s - 0.5], [0, focal, (K[1, 2] + 0.5) * s - 0.5], [0, 0, 1]])
    return depth[rows[:, None], cols[None, :]], K2, s


def expected_object(depth: np.ndarray, K: np.ndarray, box: Sequence[float], grid: int = 3,
                    inner: float = 0.5) -> dict:
    """The object estimate for ``box`` (original image) from a reference depth image (metres along
    z) of an ideal pinhole camera K, as the object task sees it (:func:`focal_unified`; the box and
    the depth pixels referenced in text coordinates, [0, 1000] and [0, 2000], as the protocol says):

    ``width`` / ``height``: the 1st-99th percentile range of x / y over the region's pixels in the
    depth band; ``near`` / ``far``: the band's range over the depths at the grid of sample pixels;
    ``centre``: on the ray through the region centre at (near + far) / 2. ``stable``: no sample
    depth is within 1.2 cm of the band's edge (so answer rounding cannot move one across it).
    """
    d, K2, s = focal_unified(depth, K)
    height, width = d.shape
    size = np.array([width, height, width, height], float)
    region = np.round(np.asarray(box, float) * s / size * 1000) / 1000 * size  # as referenced in the question
    x1, y1, x2, y2 = region
    u, v = np.arange(width), np.arange(height)
    uu, vv = np.meshgrid(u[(u + 0.5 >= x1) & (u + 0.5 < x2)], v[(v + 0.5 >= y1) & (v + 0.5 < y2)])
    z = d[vv, uu]
    keep = _band(z)
    x = (uu[keep] - K2[0, 2]) / K2[0, 0] * z[keep]
    y = (vv[keep] - K2[1, 2]) / K2[1, 1] * z[keep]
    extent_x = np.diff(np.percentile(x, objects.PERCENTILES))[0]
    extent_y = np.diff(np.percentile(y, objects.PERCENTILES))[0]
    # Sample pixels: spread over the original box, moved into the focal-unified image, referenced
    # in [0, 2000] text coordinates; the depth is read at the nearest pixel.
    bx1, by1, bx2, by2 = box
    f = np.linspace(0.5 - inner / 2, 0.5 + inner / 2, grid)
    su = (bx1 + (bx2 - bx1) * f) * s - 0.5
    sv = (by1 + (by2 - by1) * f) * s - 0.5
    su = np.round(np.round(su / width * 2000) / 2000 * width).astype(int)
    sv = np.round(np.round(sv / height * 2000) / 2000 * height).astype(int)
    zs = d[np.meshgrid(sv, su, indexing="ij")].ravel()
    ok = np.isfinite(zs) & (zs > 0)
    median = np.median(zs[ok])
    margin = np.abs(np.abs(zs[ok] - median) - max(objects.BAND_MIN_M, objects.BAND_REL * median))
    zs = zs[_band(zs)]
    near, far = float(zs.min()), float(zs.max())
    ray = np.array([((x1 + x2) / 2 - 0.5 - K2[0, 2]) / K2[0, 0], ((y1 + y2) / 2 - 0.5 - K2[1, 2]) / K2[1, 1], 1.0])
    return {"width": float(extent_x), "height": float(extent_y), "near": near, "far": far,
            "centre": ray * (near + far) / 2, "size": np.array([extent_x, extent_y, far - near]),
            "stable": bool(np.all(margin > 0.012))}


def assert_matches_ground_truth(centre, size, truth) -> None:
    """Within the answers' rounding: each answer has 2 decimals (0.005 m); the centre's z is the
    mean of two depth answers, the depth extent their difference."""
    eps = 1e-6
    np.testing.assert_allclose(centre, truth["centre"], atol=0.005 + eps)
    np.testing.assert_allclose(size[:2], truth["size"][:2], atol=0.005 + eps)
    assert size[2] == pytest.approx(truth["size"][2], abs=0.01 + eps)


class Counting(Backend):
    """A backend around another one that records every request (to count requests per frame)."""

    def __init__(self, inner: Backend, name: str = "counting") -> None:
        self.inner, self.name, self.requests = inner, name, []

    @property
    def specs(self):
        return self.inner.specs

    def answer(self, request: Request) -> Response:
        self.requests.append(request)
        return self.inner.answer(request)
