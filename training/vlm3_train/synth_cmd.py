"""``vlm3-train synth``: write synthetic RGB-D bags with exact depth and poses."""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "render synthetic RGB-D scenes (textured rooms and boxes) into rosbag2 bags with exact depth and poses"


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT (e.g. 256x192), got {text!r}") from None
    if not (8 <= width <= 4096 and 8 <= height <= 4096):
        raise argparse.ArgumentTypeError(f"size {width}x{height} is outside 8..4096 pixels per side")
    return width, height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .synthetic import DEFAULT_FOCAL, DEFAULT_SIZE

    parser.add_argument("out", metavar="OUT", help="output directory (bags scene_NNN and descriptions scene_NNN.json)")
    parser.add_argument("--scenes", type=int, default=4, help="number of scenes, one bag each (default 4)")
    parser.add_argument("--frames", type=int, default=30, help="frames per scene (default 30, 10 Hz stamps)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the output is identical for a seed (default 0)")
    parser.add_argument("--storage", choices=("sqlite3", "mcap"), default="sqlite3", help="rosbag2 storage (default sqlite3)")
    parser.add_argument("--size", type=_size, default=DEFAULT_SIZE,
                        help=f"image size WIDTHxHEIGHT (default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})")
    parser.add_argument("--fx", type=float, default=DEFAULT_FOCAL,
                        help=f"focal length in pixels, fx = fy (default {DEFAULT_FOCAL:g})")
    parser.add_argument("--depth-encoding", choices=("32FC1", "16UC1"), default="32FC1",
                        help="depth image encoding: 32FC1 metres (exact; default) or 16UC1 millimetres")
    parser.add_argument("--supersample", type=int, default=2, help="colour rays per pixel along each axis (default 2)")
    parser.add_argument("--detections", action="store_true",
                        help="also write each frame's objects as 2D detections (vision_msgs/Detection2DArray on "
                             "/detections), for the object task of `vlm3-train convert --tasks object`")
    parser.add_argument("--overwrite", action="store_true", help="replace existing bags")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from vlm3_ros.bags import BagError
    from vlm3_ros.camera import CameraError

    from .synthetic import SyntheticError, default_intrinsics, synthesize

    start = time.perf_counter()
    try:
        intrinsics = default_intrinsics(args.size[0], args.size[1], args.fx)
        paths = synthesize(args.out, scenes=args.scenes, frames=args.frames, seed=args.seed, intrinsics=intrinsics,
                           storage=args.storage, depth_encoding=args.depth_encoding, supersample=args.supersample,
                           overwrite=args.overwrite, progress=not args.quiet, detections=args.detections)
    except (SyntheticError, BagError, CameraError) as exc:
        print(f"vlm3-train synth: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"bags": [str(p) for p in paths], "frames_per_bag": args.frames,
                      "seconds": round(time.perf_counter() - start, 2)}, indent=2))
    return 0
