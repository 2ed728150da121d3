"""Reader for Microsoft 7-Scenes RGB-D sequences.

Layout accepted: a directory holding ``frame-NNNNNN.color.png`` (or ``.color.jpg``),
``frame-NNNNNN.depth.png`` and ``frame-NNNNNN.pose.txt`` files, either directly (the original
``seq-XX`` folders) or in an ``rgbd-frames/`` subfolder (the tsdf-fusion demo packaging, whose
colour frames are JPEG), with an optional ``camera-intrinsics.txt`` (3x3 K) next to them or one
level up.

Values returned follow the package conventions (see :mod:`vlm3_ros.geometry`):

* colour: ``(H, W, 3)`` uint8 **RGB** (OpenCV reads BGR; it is converted);
* depth: ``(H, W)`` float32 metres along the optical axis (z), NaN where invalid (raw value 0,
  or 65535 as in the original release);
* pose: ``(4, 4)`` float64 camera-to-world ``T_w_c``.

Colour and depth come from two cameras of the Kinect that 7-Scenes did not calibrate against each
other: the colour image is about 9 % larger in scale than the depth image and shifted by a few
pixels, so an object's outline in colour can lie 10-30 px from its outline in depth.
:meth:`SevenScenes.colour_registration` estimates the similarity that maps colour pixels onto depth
pixels from the frames themselves (:func:`register_colour_to_depth`), and
:meth:`SevenScenes.load_registered_rgb` resamples the colour image into the depth image's pixel
grid, as an RGB-D camera's "aligned" stream would be.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, List, Tuple, Union

import cv2
import numpy as np

__all__ = ["DatasetError", "SevenScenes", "DEFAULT_INTRINSICS", "DEPTH_SCALE", "register_colour_to_depth"]

#: Nominal Kinect v1 intrinsics published with 7-Scenes (used when no camera-intrinsics.txt).
DEFAULT_INTRINSICS = np.array([[585.0, 0.0, 320.0], [0.0, 585.0, 240.0], [0.0, 0.0, 1.0]])

#: Depth PNG units per metre (millimetres).
DEPTH_SCALE = 1000.0

#: Raw depth values that mean "no measurement".
INVALID_RAW_DEPTH = (0, 65535)

_FRAME_RE = re.compile(r"^frame-(\d+)\.pose\.txt$")


class DatasetError(ValueError):
    """Raised for a missing or malformed dataset file, or an unknown frame."""


class SevenScenes:
    """One 7-Scenes sequence (or a subset of its frames) on disk.

    Args:
        root: sequence directory (see the module docstring for accepted layouts).

    Attributes:
        frame_dir: directory holding the frame files.
        frame_ids: sorted frame numbers available (those with a ``pose.txt``).
    """

    def __init__(self, root: Union[str, Path]) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"7-Scenes directory not found: {root}")
        self.root = root
        sub = root / "rgbd-frames"
        self.frame_dir = sub if sub.is_dir() else root
        ids = []
        for p in self.frame_dir.iterdir():
            m = _FRAME_RE.match(p.name)
            if m:
                ids.append(int(m.group(1)))
        if not ids:
            raise DatasetError(f"no frame-NNNNNN.pose.txt files in {self.frame_dir}")
        self.frame_ids: List[int] = sorted(ids)
        self._K = self._read_intrinsics()

    # -- metadata ---------------------------------------------------------------------------

    def _read_intrinsics(self) -> np.ndarray:
        for cand in (self.root / "camera-intrinsics.txt", self.frame_dir / "camera-intrinsics.txt"):
            if cand.is_file():
                try:
                    K = np.loadtxt(cand, dtype=np.float64)
                except ValueError as exc:
                    raise DatasetError(f"cannot parse intrinsics {cand}: {exc}") from exc
                if K.shape != (3, 3) or not np.all(np.isfinite(K)):
                    raise DatasetError(
                        f"intrinsics in {cand} must be a finite 3x3 matrix, got {K.shape}"
                    )
                return K
        return DEFAULT_INTRINSICS.copy()

    def intrinsics(self) -> np.ndarray:
        """3x3 pinhole K shared by colour and depth (no distortion model is provided)."""
        return self._K.copy()

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.frame_ids)

    def path(self, frame_id: int, kind: str) -> Path:
        """Path of ``frame-NNNNNN.{kind}`` (kind: ``color.png``, ``color.jpg``, ``depth.png``, ``pose.txt``)."""
        if int(frame_id) not in self.frame_ids:
            raise DatasetError(
                f"frame {frame_id} not in this sequence "
                f"(frames {self.frame_ids[0]}..{self.frame_ids[-1]})"
            )
        return self.frame_dir / f"frame-{int(frame_id):06d}.{kind}"

    # -- per-frame data ---------------------------------------------------------------------

    def load_rgb(self, frame_id: int) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB image (``color.png``, else ``color.jpg``)."""
        p = self.path(frame_id, "color.png")
        if not p.is_file() and self.path(frame_id, "color.jpg").is_file():
            p = self.path(frame_id, "color.jpg")
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetError(f"cannot read colour image {p}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def load_depth(self, frame_id: int) -> np.ndarray:
        """``(H, W)`` float32 depth in metres along z, NaN where invalid."""
        p = self.path(frame_id, "depth.png")
        raw = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise DatasetError(f"cannot read depth image {p}")
        if raw.dtype != np.uint16 or raw.ndim != 2:
            raise DatasetError(
                f"depth image {p} must be single-channel uint16, got {raw.dtype} {raw.shape}"
            )
        depth = raw.astype(np.float32) / np.float32(DEPTH_SCALE)
        depth[np.isin(raw, INVALID_RAW_DEPTH)] = np.nan
        return depth

    def load_pose(self, frame_id: int) -> np.ndarray:
        """``(4, 4)`` camera-to-world pose ``T_w_c``."""
        p = self.path(frame_id, "pose.txt")
        try:
            T = np.loadtxt(p, dtype=np.float64)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read pose {p}: {exc}") from exc
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise DatasetError(f"pose {p} must be a finite 4x4 matrix, got shape {T.shape}")
        return T

    def load_frame(self, frame_id: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rgb, depth_m, T_w_c)`` for one frame (see the individual loaders)."""
        return self.load_rgb(frame_id), self.load_depth(frame_id), self.load_pose(frame_id)

    def poses(self) -> np.ndarray:
        """``(N, 4, 4)`` camera-to-world poses of all frames, in ``frame_ids`` order."""
        return np.stack([self.load_pose(i) for i in self.frame_ids])

    # -- colour/depth registration ------------------------------------------------------------

    def colour_registration(self, frames: int = 10) -> np.ndarray:
        """``(2, 3)`` affine map of colour pixels onto depth pixels, estimated once (cached) on
        ``frames`` frames spread over the sequence with :func:`register_colour_to_depth`."""
        cached = getattr(self, "_registration", None)
        if cached is None or cached[0] != frames:
            ids = [self.frame_ids[i] for i in np.linspace(0, len(self.frame_ids) - 1, min(frames, len(self))).astype(int)]
            affine = register_colour_to_depth([self.load_rgb(i) for i in ids], [self.load_depth(i) for i in ids])
            self._registration = cached = (frames, affine)
        return cached[1].copy()

    def load_registered_rgb(self, frame_id: int) -> np.ndarray:
        """The colour image resampled into the depth image's pixel grid (:meth:`colour_registration`;
        pixels with no colour source repeat the border)."""
        rgb = self.load_rgb(frame_id)
        return cv2.warpAffine(rgb, self.colour_registration(), (rgb.shape[1], rgb.shape[0]), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)


def _gradient(image: np.ndarray) -> np.ndarray:
    return np.hypot(cv2.Sobel(image, cv2.CV_32F, 1, 0), cv2.Sobel(image, cv2.CV_32F, 0, 1))


def register_colour_to_depth(rgbs, depths, *, scales=(0.9, 1.2), shift=24.0, edge_threshold=0.3) -> np.ndarray:
    """The similarity (scale about the image centre and shift) mapping colour pixels onto depth
    pixels that best puts colour edges on depth edges, as a ``(2, 3)`` affine matrix.

    Depth edges are pixels where the log-depth gradient (Sobel) exceeds ``edge_threshold`` away
    from invalid depth; the score of a candidate is the mean colour-gradient magnitude found at the
    colour pixels it maps onto those edges. A grid search over scale in ``scales`` and shift within
    +-``shift`` pixels is refined twice around the best candidate.
    """
    points, grads = [], []
    for rgb, depth in zip(rgbs, depths):
        depth = np.asarray(depth, np.float32)
        valid = np.isfinite(depth) & (depth > 0)
        logd = np.log(np.where(valid, depth, 1.0))
        edges = (_gradient(logd) > edge_threshold) & (cv2.erode(valid.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0)
        rows, cols = np.nonzero(edges)
        points.append(np.column_stack([cols, rows]).astype(np.float64))
        gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)
        grads.append(_gradient(gray))
    if not points or not sum(len(p) for p in points):
        raise DatasetError("no depth edges to register the colour images on")
    height, width = grads[0].shape
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])

    def score(s: float, dx: float, dy: float) -> float:
        total, count = 0.0, 0
        for pts, grad in zip(points, grads):
            colour = (pts - centre - (dx, dy)) / s + centre
            c, r = np.round(colour[:, 0]).astype(int), np.round(colour[:, 1]).astype(int)
            ok = (c >= 0) & (c < width) & (r >= 0) & (r < height)
            total += float(grad[r[ok], c[ok]].sum())
            count += int(ok.sum())
        return total / max(count, 1)

    s_grid = np.arange(scales[0], scales[1] + 1e-9, 0.02)
    t_grid = np.arange(-shift, shift + 1e-9, 4.0)
    best = max((score(s, dx, dy), s, dx, dy) for s in s_grid for dx in t_grid for dy in t_grid)
    for ds, dt in ((0.01, 2.0), (0.0025, 0.5)):
        _, s0, x0, y0 = best
        best = max((score(s, dx, dy), s, dx, dy) for s in s0 + ds * np.arange(-2, 3)
                   for dx in x0 + dt * np.arange(-2, 3) for dy in y0 + dt * np.arange(-2, 3))
    _, s, dx, dy = best
    return np.array([[s, 0.0, (1 - s) * centre[0] + dx], [0.0, s, (1 - s) * centre[1] + dy]])
