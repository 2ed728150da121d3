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
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, List, Tuple, Union

import cv2
import numpy as np

__all__ = ["DatasetError", "SevenScenes", "DEFAULT_INTRINSICS", "DEPTH_SCALE"]

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
