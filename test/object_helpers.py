"""Scenes, boxes and independently computed ground truth for the object tests.

* :func:`rectangles_depth`: a depth image of flat rectangles in front of a wall (known geometry);
* :func:`rectangle_box`: the image box of such a rectangle;
* :func:`segmented_boxes`: boxes around depth-segmented regions of a real depth image;
* :func:`expected_object`: what an object estimate must be for a box, computed here from the
  definitions (vlm3_ros.objects docstring) with plain numpy, without the package's functions.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
from scipy import ndimage

from vlm3_ros import objects

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


def expected_object(depth: np.ndarray, K: np.ndarray, box: Sequence[float], grid: int = 3,
                    inner: float = 0.5) -> dict:
    """The object estimate for ``box`` from a reference depth image (metres along z):

    ``width`` / ``height``: the 1st-99th percentile range of x / y over the box's pixels in the depth
    band; ``near`` / ``far``: the band's range over the depth at the grid of sample pixels;
    ``centre``: on the ray through the box centre at (near + far) / 2.
    """
    x1, y1, x2, y2 = box
    u = np.arange(depth.shape[1])
    v = np.arange(depth.shape[0])
    cols = u[(u + 0.5 >= x1) & (u + 0.5 < x2)]
    rows = v[(v + 0.5 >= y1) & (v + 0.5 < y2)]
    uu, vv = np.meshgrid(cols, rows)
    z = depth[vv, uu]
    keep = _band(z)
    x = (uu[keep] - K[0, 2]) / K[0, 0] * z[keep]
    y = (vv[keep] - K[1, 2]) / K[1, 1] * z[keep]
    width = np.diff(np.percentile(x, objects.PERCENTILES))[0]
    height = np.diff(np.percentile(y, objects.PERCENTILES))[0]
    f = np.linspace(0.5 - inner / 2, 0.5 + inner / 2, grid)
    su = np.clip(np.round(x1 + (x2 - x1) * f - 0.5).astype(int), 0, depth.shape[1] - 1)
    sv = np.clip(np.round(y1 + (y2 - y1) * f - 0.5).astype(int), 0, depth.shape[0] - 1)
    zs = depth[np.meshgrid(sv, su, indexing="ij")].ravel()
    zs = zs[_band(zs)]
    near, far = float(zs.min()), float(zs.max())
    ray = np.array([((x1 + x2) / 2 - 0.5 - K[0, 2]) / K[0, 0], ((y1 + y2) / 2 - 0.5 - K[1, 2]) / K[1, 1], 1.0])
    return {"width": float(width), "height": float(height), "near": near, "far": far,
            "centre": ray * (near + far) / 2, "size": np.array([width, height, far - near])}
