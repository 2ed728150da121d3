"""Reader for TUM RGB-D sequences (the ``rgbd_dataset_freiburgN_*`` folders).

Layout: ``rgb.txt`` and ``depth.txt`` (``timestamp filename`` per line), ``groundtruth.txt``
(``timestamp tx ty tz qx qy qz qw``, the colour camera's optical centre in the motion-capture
world: a camera-to-world pose), ``#`` comment lines, and the PNG files they name. Colour images
are 8-bit RGB, depth images 16-bit in 1/5000 m (0: no measurement), registered to the colour
camera.

Colour frames are associated with the depth image and the ground-truth pose nearest in time,
within ``max_difference`` seconds (0.02 s, as the benchmark's own association tool); a depth
image is used by at most one colour frame. Values follow the package conventions: RGB uint8,
depth float32 metres along z with NaN invalid, ``T_w_c`` 4x4 float64.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from ..camera import Intrinsics
from .sevenscenes import DatasetError

__all__ = ["DEPTH_SCALE", "TUM_INTRINSICS", "TumFrame", "TumRgbd", "freiburg_of", "tum_intrinsics"]

#: Depth PNG units per metre.
DEPTH_SCALE = 5000.0
#: Image size of every TUM RGB-D sequence.
WIDTH, HEIGHT = 640, 480
#: Published calibration of the colour cameras (fx, fy, cx, cy, plumb_bob d0..d4) per sensor.
TUM_INTRINSICS: Dict[int, Tuple[Tuple[float, float, float, float], Tuple[float, ...]]] = {
    1: ((517.3, 516.5, 318.6, 255.3), (0.2624, -0.9531, -0.0054, 0.0026, 1.1633)),
    2: ((520.9, 521.0, 325.1, 249.7), (0.2312, -0.7849, -0.0033, -0.0001, 0.9172)),
    3: ((535.4, 539.2, 320.1, 247.6), (0.0, 0.0, 0.0, 0.0, 0.0)),
}
_FREIBURG_RE = re.compile(r"(?:freiburg|fr)([123])(?![0-9])", re.IGNORECASE)


def freiburg_of(name: str) -> Optional[int]:
    """Sensor number (1, 2, 3) named in a sequence folder name (``..._freiburg2_...``), else None."""
    found = _FREIBURG_RE.search(name)
    return int(found.group(1)) if found else None


def tum_intrinsics(freiburg: int) -> Intrinsics:
    """Published colour-camera calibration of TUM sensor ``freiburg`` (1, 2 or 3)."""
    if freiburg not in TUM_INTRINSICS:
        raise DatasetError(f"unknown TUM sensor freiburg{freiburg}; expected 1, 2 or 3")
    (fx, fy, cx, cy), D = TUM_INTRINSICS[freiburg]
    if not any(D):
        return Intrinsics(WIDTH, HEIGHT, fx, fy, cx, cy)
    return Intrinsics(WIDTH, HEIGHT, fx, fy, cx, cy, distortion_model="plumb_bob", D=D)


def _stamp_ns(text: str, where: str) -> int:
    """Seconds as written (``1305031102.175304``) -> integer nanoseconds, without float rounding."""
    match = re.fullmatch(r"(\d+)(?:\.(\d{1,9}))?", text)
    if not match:
        raise DatasetError(f"{where}: timestamp {text!r} is not a non-negative decimal number of seconds")
    frac = (match.group(2) or "").ljust(9, "0")
    return int(match.group(1)) * 1_000_000_000 + int(frac)


def _read_list(path: Path, columns: int) -> List[List[str]]:
    if not path.is_file():
        raise DatasetError(f"TUM RGB-D file missing: {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != columns:
            raise DatasetError(f"{path}:{number}: expected {columns} columns, got {len(parts)}: {line!r}")
        rows.append(parts)
    return rows


@dataclass(frozen=True)
class TumFrame:
    """One associated frame: stamps in nanoseconds (the colour stamp names the frame)."""

    stamp_ns: int
    rgb_path: Path
    depth_path: Path
    depth_stamp_ns: int
    pose_stamp_ns: int
    T_w_c: np.ndarray


def _nearest(target: np.ndarray, stamps: np.ndarray, max_diff: int) -> np.ndarray:
    """Index in sorted ``stamps`` nearest to each ``target`` within ``max_diff`` (else -1)."""
    out = np.full(target.size, -1, dtype=np.int64)
    if stamps.size == 0:
        return out
    right = np.clip(np.searchsorted(stamps, target), 0, stamps.size - 1)
    left = np.clip(right - 1, 0, stamps.size - 1)
    pick = np.where(np.abs(stamps[left] - target) <= np.abs(stamps[right] - target), left, right)
    close = np.abs(stamps[pick] - target) <= max_diff
    out[close] = pick[close]
    return out


class TumRgbd:
    """One TUM RGB-D sequence on disk with its associated frames.

    Args:
        root: the sequence folder (holding ``rgb.txt``, ``depth.txt``, ``groundtruth.txt``).
        intrinsics: camera calibration: an :class:`~vlm3_ros.camera.Intrinsics`, or ``(fx, fy,
            cx, cy)`` (pinhole, image size read from the first colour image); default: the
            published calibration of the sensor named in the folder name (``freiburg1/2/3``).
        max_difference: association window in seconds.

    Attributes:
        frames: the associated :class:`TumFrame` list, in time order.
        unmatched: colour frames left out (no depth image or no pose within the window).
    """

    def __init__(self, root: Union[str, Path], *, intrinsics: Union[Intrinsics, Sequence[float], None] = None,
                 max_difference: float = 0.02) -> None:
        from scipy.spatial.transform import Rotation

        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"TUM RGB-D directory not found: {self.root}")
        if intrinsics is None:
            freiburg = freiburg_of(self.root.resolve().name)
            if freiburg is None:
                raise DatasetError(f"cannot tell the TUM sensor from the folder name {self.root.resolve().name!r} "
                                   "(no freiburg1/2/3 in it); give the intrinsics (--intrinsics fx fy cx cy)")
            intrinsics = tum_intrinsics(freiburg)
        if not max_difference > 0:
            raise DatasetError(f"max_difference must be > 0 seconds, got {max_difference}")
        window = int(round(max_difference * 1e9))

        rgb_rows = _read_list(self.root / "rgb.txt", 2)
        depth_rows = _read_list(self.root / "depth.txt", 2)
        gt_rows = _read_list(self.root / "groundtruth.txt", 8)
        if not rgb_rows:
            raise DatasetError(f"{self.root / 'rgb.txt'} lists no images")
        rgb = sorted((_stamp_ns(r[0], "rgb.txt"), r[1]) for r in rgb_rows)
        depth = sorted((_stamp_ns(r[0], "depth.txt"), r[1]) for r in depth_rows)
        gt_stamps = np.array([_stamp_ns(r[0], "groundtruth.txt") for r in gt_rows], dtype=np.int64)
        try:
            gt = np.array([[float(v) for v in r[1:]] for r in gt_rows], dtype=np.float64).reshape(-1, 7)
        except ValueError as exc:
            raise DatasetError(f"{self.root / 'groundtruth.txt'}: {exc}") from exc
        if not np.all(np.isfinite(gt)):
            raise DatasetError(f"{self.root / 'groundtruth.txt'} has non-finite values")
        order = np.argsort(gt_stamps, kind="stable")
        gt_stamps, gt = gt_stamps[order], gt[order]

        rgb_stamps = np.array([s for s, _ in rgb], dtype=np.int64)
        depth_stamps = np.array([s for s, _ in depth], dtype=np.int64)
        depth_pick = _nearest(rgb_stamps, depth_stamps, window)
        # A depth image serves one colour frame: the nearest one keeps it.
        best: Dict[int, int] = {}
        for i, j in enumerate(depth_pick.tolist()):
            if j < 0:
                continue
            k = best.get(j)
            if k is None or abs(rgb_stamps[i] - depth_stamps[j]) < abs(rgb_stamps[k] - depth_stamps[j]):
                best[j] = i
        depth_of = {i: j for j, i in best.items()}
        pose_pick = _nearest(rgb_stamps, gt_stamps, window)

        norms = np.linalg.norm(gt[:, 3:], axis=1)
        self.frames: List[TumFrame] = []
        self.unmatched = 0
        for i, (stamp, name) in enumerate(rgb):
            j, g = depth_of.get(i, -1), int(pose_pick[i])
            if j < 0 or g < 0:
                self.unmatched += 1
                continue
            if norms[g] < 1e-6:
                raise DatasetError(f"{self.root / 'groundtruth.txt'}: zero quaternion at {gt_stamps[g]} ns")
            T = np.eye(4)
            T[:3, :3] = Rotation.from_quat(gt[g, 3:] / norms[g]).as_matrix()
            T[:3, 3] = gt[g, :3]
            self.frames.append(TumFrame(stamp, self.root / name, self.root / depth[j][1], int(depth_stamps[j]),
                                        int(gt_stamps[g]), T))
        if not self.frames:
            raise DatasetError(f"no colour image in {self.root} has a depth image and a pose within "
                               f"{max_difference} s ({len(rgb)} colour, {len(depth)} depth, {len(gt_stamps)} poses)")
        if not isinstance(intrinsics, Intrinsics):
            values = [float(v) for v in intrinsics]
            if len(values) != 4:
                raise DatasetError(f"intrinsics must be (fx, fy, cx, cy), got {values}")
            height, width = self.load_rgb(0).shape[:2]
            intrinsics = Intrinsics(width, height, *values)
        self._intrinsics: Intrinsics = intrinsics

    def intrinsics(self) -> Intrinsics:
        """The colour camera's intrinsics (depth is registered to it)."""
        return self._intrinsics

    def __len__(self) -> int:
        return len(self.frames)

    def load_rgb(self, index: int) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB of frame ``index``."""
        path = self.frames[index].rgb_path
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetError(f"cannot read colour image {path}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def load_depth(self, index: int) -> np.ndarray:
        """``(H, W)`` float32 metres along z of frame ``index``, NaN where there is no measurement."""
        path = self.frames[index].depth_path
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise DatasetError(f"cannot read depth image {path}")
        if raw.dtype != np.uint16 or raw.ndim != 2:
            raise DatasetError(f"depth image {path} must be single-channel uint16, got {raw.dtype} {raw.shape}")
        depth = raw.astype(np.float32) / np.float32(DEPTH_SCALE)
        depth[raw == 0] = np.nan
        return depth

    def load_pose(self, index: int) -> np.ndarray:
        """``(4, 4)`` camera-to-world pose of frame ``index``."""
        return self.frames[index].T_w_c.copy()

    def load_frame(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rgb, depth_m, T_w_c)`` of frame ``index``."""
        return self.load_rgb(index), self.load_depth(index), self.load_pose(index)

    @staticmethod
    def looks_like(root: Union[str, Path]) -> bool:
        """Whether ``root`` has the TUM RGB-D index files."""
        root = Path(root)
        return (root / "rgb.txt").is_file() and (root / "depth.txt").is_file()
