"""``vlm3-ros query``: ask a VLM3 model about image files from the command line.

The command-line version of the public VLM3 notebook: image file(s), the camera intrinsics (or
just a focal length), pixels and a task in; a table (or JSON) of the answers and their metric
values out: depth in metres and 3D points, matched pixels, or the relative pose.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .server_options import SERVER_URL_HELP, add_server_options, server_backend

HELP = "Ask a VLM3 model (or the oracle) for depth, correspondences or pose on image files."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image file (two for correspondence and pose)")
    parser.add_argument("--task", choices=("depth", "correspondence", "pose"), default="depth")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory or hub id (hub ids need the local cache or --online)")
    source.add_argument("--oracle", action="store_true", help="answer from ground truth (--depth / --relative-pose)")
    source.add_argument("--server", metavar="URL", help=SERVER_URL_HELP)
    parser.add_argument("--adapter", help="LoRA adapter directory applied to --model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--online", action="store_true", help="allow downloading a hub id")
    cam = parser.add_mutually_exclusive_group(required=True)
    cam.add_argument("--focal", type=float, help="focal length in pixels (principal point at the image centre)")
    cam.add_argument("--intrinsics", type=float, nargs=4, metavar=("FX", "FY", "CX", "CY"))
    cam.add_argument("--camera-info", type=Path, help="ROS camera calibration YAML or vlm3 intrinsics JSON")
    parser.add_argument("--distortion", type=float, nargs="+", metavar="K", help="plumb_bob coefficients k1 k2 p1 p2 k3")
    pixels = parser.add_mutually_exclusive_group()
    pixels.add_argument("--pixel", type=float, nargs=2, action="append", metavar=("X", "Y"), help="a pixel (repeatable)")
    pixels.add_argument("--grid", type=int, default=None, help="a regular grid of about N pixels")
    parser.add_argument("--margin", type=float, default=0.05, help="grid border margin (fraction)")
    parser.add_argument("--depth", type=Path, help="oracle: depth image of image 1 (16-bit PNG in mm, or .npy metres)")
    parser.add_argument("--depth-scale", type=float, default=0.001, help="metres per unit of a 16-bit depth PNG")
    parser.add_argument("--relative-pose", type=Path, help="oracle: 4x4 text file, camera 1 <- camera 2")
    parser.add_argument("--think", action="store_true", help="correspondence: ask for a think block")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--json", nargs="?", const="-", help="write JSON (to a path, or - for stdout)")
    add_server_options(parser)


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"error: cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _intrinsics(args: argparse.Namespace, width: int, height: int):
    from ..camera import Intrinsics

    if args.camera_info:
        text = args.camera_info.read_text()
        if args.camera_info.suffix == ".json":
            return Intrinsics.from_dict(json.loads(text))
        import yaml

        data = yaml.safe_load(text)
        K = np.asarray(data["camera_matrix"]["data"], float).reshape(3, 3)
        D = tuple(data.get("distortion_coefficients", {}).get("data", ()))
        return Intrinsics.from_K(K, int(data["image_width"]), int(data["image_height"]), D=D,
                                 distortion_model=data.get("distortion_model"))
    if args.focal:
        cam = Intrinsics.from_focal(width, height, args.focal)
        K = cam.K
    else:
        fx, fy, cx, cy = args.intrinsics
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    if args.distortion:
        return Intrinsics.from_K(K, width, height, D=tuple(args.distortion), distortion_model="plumb_bob")
    return Intrinsics.from_K(K, width, height)


def _reference_depth(path: Path | None, scale: float) -> np.ndarray | None:
    if path is None:
        return None
    if path.suffix == ".npy":
        depth = np.load(path).astype(np.float32)
    else:
        import cv2

        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise SystemExit(f"error: cannot read depth image {path}")
        depth = raw.astype(np.float32) * scale
        depth[raw == 0] = np.nan
    return depth


def _num(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    return None if not math.isfinite(value) else round(value, 6)


def run(args: argparse.Namespace) -> int:
    from ..engine import EngineError, load_backend
    from ..pipeline import CorrespondenceMatcher, DepthEstimator, PoseEstimator, query_grid

    needed = 1 if args.task == "depth" else 2
    if len(args.images) != needed:
        print(f"error: the {args.task} task takes {needed} image(s), got {len(args.images)}", file=sys.stderr)
        return 2
    images = [_read_rgb(p) for p in args.images]
    height, width = images[0].shape[:2]
    cameras = [_intrinsics(args, im.shape[1], im.shape[0]) for im in images]
    try:
        backend = (
            load_backend("oracle")
            if args.oracle
            else server_backend(args)
            if args.server
            else load_backend("transformers", checkpoint=args.model, adapter=args.adapter, device=args.device,
                              dtype=args.dtype, offline=not args.online)
        )
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.pixel:
        uv = np.asarray(args.pixel, float)
    else:
        uv = query_grid(width, height, args.grid or 16, args.margin)
    depth = _reference_depth(args.depth, args.depth_scale)
    pose = np.loadtxt(args.relative_pose).reshape(4, 4) if args.relative_pose else None
    if args.oracle and ((args.task == "depth" and depth is None) or (args.task == "pose" and pose is None)
                        or (args.task == "correspondence" and (depth is None or pose is None))):
        print("error: --oracle needs --depth (depth), --relative-pose (pose) or both (correspondence)", file=sys.stderr)
        return 2
    tokens = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    try:
        if args.task == "depth":
            estimator = DepthEstimator(backend, **tokens)
            res = estimator.estimate(images[0], cameras[0], uv, reference_depth=depth)
            rows = [
                {"u": _num(res.uv[i, 0]), "v": _num(res.uv[i, 1]), "answer": res.answers[i],
                 "distance_m": _num(res.distance[i]), "z_m": _num(res.z[i]),
                 "point": [_num(c) for c in res.points[i]], "error": res.errors[i]}
                for i in range(len(uv))
            ]
            summary = {"points": len(rows), "valid": int(res.valid.sum()), "parse_failures": res.parse_failures,
                       "depth_kind": estimator.depth_kind}
        elif args.task == "correspondence":
            res = CorrespondenceMatcher(backend, think=args.think, **tokens).match(
                images[0], cameras[0], images[1], cameras[1], uv, reference_depth1=depth, reference_pose=pose)
            rows = [
                {"u1": _num(res.uv1[i, 0]), "v1": _num(res.uv1[i, 1]), "answer": res.answers[i],
                 "u2": _num(res.uv2[i, 0]), "v2": _num(res.uv2[i, 1]), "error": res.errors[i]}
                for i in range(len(uv))
            ]
            summary = {"points": len(rows), "valid": int(res.valid.sum())}
        else:
            res = PoseEstimator(backend, **tokens).estimate(images[0], cameras[0], images[1], cameras[1], reference_pose=pose)
            rows = [{"question": qid, "answer": text} for qid, text in res.answers.items()]
            summary = {"error": res.error}
            if res.pose is not None:
                from ..geometry import matrix_to_euler

                yaw, pitch, roll = matrix_to_euler(res.pose.R)
                summary.update(
                    yaw_pitch_roll_deg=[_num(yaw), _num(pitch), _num(roll)],
                    direction=[_num(c) for c in res.pose.direction],
                    distance_m=_num(res.pose.distance),
                    matrix=None if res.pose.matrix is None else np.round(res.pose.matrix, 6).tolist(),
                )
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {"task": args.task, "backend": backend.describe(), "summary": summary, "rows": rows}
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            print(f"wrote {args.json}")
    if args.json != "-":
        _print_table(rows)
        print("  ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = [k for k in rows[0] if k != "error"]

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}"
        if isinstance(value, list):
            return "(" + ", ".join(fmt(v) for v in value) + ")"
        text = str(value).replace("\n", " ")
        return text if len(text) <= 60 else text[:57] + "..."

    table = [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(row[i]) for row in table)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
