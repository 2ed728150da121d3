"""``vlm3-ros bag``: make and inspect rosbag2 recordings (no ROS install needed).

``vlm3-ros bag from-rgbd DIR OUT``
    A folder of RGB-D frames -> a rosbag2 bag with the topics of :data:`vlm3_ros.bags.TOPICS`
    (rgb8 Image, CameraInfo, depth Image, ground-truth PoseStamped) and ``/tf``, each frame's
    messages sharing one stamp. Layouts: 7-Scenes (``frame-NNNNNN.{color.png|color.jpg,depth.png,pose.txt}``,
    no timestamps: frames are stamped at a fixed ``--rate`` from ``--start``; intrinsics from
    ``camera-intrinsics.txt``) and TUM RGB-D (``rgb.txt``, ``depth.txt``, ``groundtruth.txt``:
    the files' own timestamps; colour, depth and pose associated within 0.02 s; published
    intrinsics of the sensor named in the folder name unless ``--intrinsics fx fy cx cy``).
    The bag is written atomically: it appears at OUT only when complete.

``vlm3-ros bag info BAG``
    Topics with types and counts, duration and storage of a bag.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

HELP = "make (from-rgbd) and inspect (info) rosbag2 recordings of RGB-D frames"

LAYOUTS = ("auto", "7scenes", "tum")
DEFAULT_RATE = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bag_command", metavar="BAG_COMMAND")
    sub.required = True

    make = sub.add_parser("from-rgbd", help="turn a folder of RGB-D frames (7-Scenes or TUM RGB-D) into a rosbag2",
                          description=__doc__, formatter_class=parser.formatter_class)
    make.add_argument("dir", metavar="DIR", type=Path, help="folder of RGB-D frames")
    make.add_argument("out", metavar="OUT", type=Path, help="bag directory to create")
    make.add_argument("--layout", choices=LAYOUTS, default="auto", help="folder layout (default: detected)")
    make.add_argument("--storage", choices=("sqlite3", "mcap"), default="sqlite3", help="bag storage (default sqlite3)")
    make.add_argument("--rate", type=float, default=None,
                      help=f"frame rate in Hz for layouts without timestamps (7-Scenes; default {DEFAULT_RATE:g})")
    make.add_argument("--start", type=float, default=1.0, metavar="SEC",
                      help="stamp of the first frame in seconds, for layouts without timestamps (default 1.0)")
    make.add_argument("--first", type=int, default=0, metavar="N",
                      help="skip the first N frames of the sequence (default 0)")
    make.add_argument("--count", type=int, default=None, metavar="M", help="write at most M frames (default all)")
    make.add_argument("--intrinsics", type=float, nargs=4, metavar=("FX", "FY", "CX", "CY"), default=None,
                      help="pinhole intrinsics overriding the dataset's (no distortion)")
    make.add_argument("--max-difference", type=float, default=0.02, metavar="SEC",
                      help="TUM: association window between colour, depth and pose stamps (default 0.02)")
    make.add_argument("--depth-encoding", choices=("16UC1", "32FC1"), default="16UC1",
                      help="16UC1 millimetres (default) or 32FC1 metres")
    make.add_argument("--camera-frame", default=None, help="frame_id of the images (default camera_optical_frame)")
    make.add_argument("--world-frame", default=None, help="frame_id of the poses (default map)")
    make.add_argument("--no-tf", action="store_true", help="do not write the world -> camera transforms on /tf")
    make.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(_bag_run=run_from_rgbd)

    info = sub.add_parser("info", help="topics, counts, duration and storage of a bag",
                          description="Topics with types and counts, duration and storage of a bag.",
                          formatter_class=parser.formatter_class)
    info.add_argument("bag", metavar="BAG", type=Path, help="rosbag2 directory")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(_bag_run=run_info)


def run(args: argparse.Namespace) -> int:
    from ..bags import BagError

    try:
        return int(args._bag_run(args) or 0)
    except (BagError, ValueError, OSError) as exc:
        print(f"vlm3-ros bag: error: {exc}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------


def detect_layout(root: Path) -> str:
    """``"7scenes"`` or ``"tum"`` for a folder of frames; raises BagError naming what is missing."""
    from ..bags import BagError
    from ..datasets.tum import TumRgbd

    if not root.exists():
        raise BagError(f"no such folder: {root}")
    if not root.is_dir():
        raise BagError(f"{root} is not a folder")
    entries = list(root.iterdir())
    if not entries:
        raise BagError(f"{root} is empty: expected 7-Scenes frames or a TUM RGB-D sequence")
    if TumRgbd.looks_like(root):
        return "tum"
    for folder in (root, root / "rgbd-frames"):
        if folder.is_dir() and any(folder.glob("frame-*.pose.txt")):
            return "7scenes"
    names = ", ".join(sorted(e.name for e in entries)[:8]) + (", ..." if len(entries) > 8 else "")
    raise BagError(f"{root} is neither a 7-Scenes sequence (frame-NNNNNN.color.png or .color.jpg, .depth.png, "
                   f".pose.txt, directly or in rgbd-frames/) nor a TUM RGB-D sequence (rgb.txt, depth.txt, "
                   f"groundtruth.txt); it holds {names}")


Frame = Tuple[int, Any, Any, Any]  # stamp_ns, rgb, depth_m, T_w_c


def _window(total: int, first: int, count: Optional[int]) -> range:
    from ..bags import BagError

    if first < 0:
        raise BagError(f"--first must be >= 0, got {first}")
    if count is not None and count < 1:
        raise BagError(f"--count must be >= 1, got {count}")
    if first >= total:
        raise BagError(f"--first {first} is past the end of the sequence ({total} frames)")
    stop = total if count is None else min(total, first + count)
    return range(first, stop)


def _sevenscenes(args: argparse.Namespace) -> Tuple[Any, int, Iterator[Frame]]:
    import numpy as np

    from ..bags import BagError
    from ..camera import Intrinsics
    from ..datasets.sevenscenes import SevenScenes

    rate = DEFAULT_RATE if args.rate is None else args.rate
    if not (np.isfinite(rate) and rate > 0):
        raise BagError(f"--rate must be a positive number of Hz, got {rate}")
    if not (np.isfinite(args.start) and 0 <= args.start < 2**31):
        raise BagError(f"--start must be a time in seconds in [0, 2^31), got {args.start}")
    data = SevenScenes(args.dir)
    ids = data.frame_ids
    window = _window(len(ids), args.first, args.count)
    height, width = data.load_rgb(ids[window[0]]).shape[:2]
    if args.intrinsics is not None:
        intrinsics = Intrinsics(width, height, *args.intrinsics)
    else:
        intrinsics = Intrinsics.from_K(data.intrinsics(), width, height)
    start_ns = int(round(args.start * 1e9))

    def frames() -> Iterator[Frame]:
        for k, position in enumerate(window):
            rgb, depth, pose = data.load_frame(ids[position])
            yield start_ns + int(round(k * 1e9 / rate)), rgb, depth, pose

    return intrinsics, len(window), frames()


def _tum(args: argparse.Namespace) -> Tuple[Any, int, Iterator[Frame]]:
    from ..bags import BagError
    from ..datasets.tum import TumRgbd

    if args.rate is not None:
        raise BagError("--rate does not apply to TUM RGB-D: its frames carry their own timestamps")
    data = TumRgbd(args.dir, intrinsics=args.intrinsics, max_difference=args.max_difference)
    window = _window(len(data), args.first, args.count)

    def frames() -> Iterator[Frame]:
        for index in window:
            rgb, depth, pose = data.load_frame(index)
            yield data.frames[index].stamp_ns, rgb, depth, pose

    return data.intrinsics(), len(window), frames()


def run_from_rgbd(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..bags import RgbdBagWriter

    layout = detect_layout(args.dir) if args.layout == "auto" else args.layout
    if args.layout != "auto":
        detect_layout(args.dir)  # same clear errors for a missing or empty folder
    intrinsics, total, frames = (_sevenscenes if layout == "7scenes" else _tum)(args)
    options: dict = {"storage": args.storage, "overwrite": args.overwrite, "depth_encoding": args.depth_encoding,
                     "tf": not args.no_tf}
    if args.camera_frame:
        options["camera_frame"] = args.camera_frame
    if args.world_frame:
        options["world_frame"] = args.world_frame
    with RgbdBagWriter(args.out, **options) as writer:
        for stamp_ns, rgb, depth, pose in tqdm(frames, total=total, unit="frame", desc=args.out.name,
                                               disable=True if args.quiet else None):
            writer.write_frame(stamp_ns, rgb=rgb, intrinsics=intrinsics, depth_m=depth, T_w_c=pose)
    duration = ((writer.last_stamp or 0) - (writer.first_stamp or 0)) / 1e9
    topics: List[str] = sorted(writer.counts)
    print(f"wrote {writer.frames_written} frames ({layout}) to {args.out} [{args.storage}]: "
          f"{len(topics)} topics ({', '.join(topics)}), {duration:.3f} s")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..bags import bag_info

    info = bag_info(args.bag)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"bag:      {info['path']}")
    print(f"storage:  {info['storage']}")
    print(f"duration: {info['duration_s']:.3f} s (from {info['start_ns']} ns)")
    print(f"messages: {info['message_count']}")
    width = max((len(t) for t in info["topics"]), default=0)
    for topic, entry in info["topics"].items():
        print(f"  {topic:<{width}}  {entry['count']:>7}  {entry['type']}")
    return 0
