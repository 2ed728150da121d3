"""``vlm3-ros query``: ask a VLM3 model about image files from the command line.

The command-line version of the public VLM3 notebook: image file(s), the camera intrinsics (or
just a focal length), pixels and a task in; a table (or JSON) of the answers and their metric
values out: depth in metres and 3D points, matched pixels, or the relative pose. With
``--task object``, boxes (``--box X1 Y1 X2 Y2``, repeatable) instead of pixels: each box's 3D
centre and size in metres, and the answers to ``--ask`` questions about every pair of boxes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

HELP = "Ask a VLM3 model (or the oracle) for depth, correspondences, pose or objects on image files."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image file (two for correspondence and pose)")
    parser.add_argument("--task", choices=("depth", "correspondence", "pose", "object"), default="depth")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory or hub id (hub ids need the local cache or --online)")
    source.add_argument("--oracle", action="store_true", help="answer from ground truth (--depth / --relative-pose)")
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
    obj = parser.add_argument_group("object task")
    obj.add_argument("--box", type=float, nargs=4, action="append", metavar=("X1", "Y1", "X2", "Y2"),
                     help="an image box in pixels, corners (repeatable)")
    obj.add_argument("--ask", action="append", default=[], metavar="QUESTION",
                     help="questions (comma-separated, repeatable): width and height are always asked; "
                          "pair questions (distance, horizontal, vertical, left, right, above, below, behind, "
                          "front, bigger, smaller, taller, shorter, wider, thinner, or a question id such as "
                          "left_choice) are asked about every pair of boxes")
    obj.add_argument("--depth-model", help="checkpoint for the depth questions inside the boxes (default: --model)")
    obj.add_argument("--depth-grid", type=int, default=3, help="depth questions per box: N x N over its centre")


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

    needed = 1 if args.task in ("depth", "object") else 2
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
    if args.oracle and ((args.task in ("depth", "object") and depth is None) or (args.task == "pose" and pose is None)
                        or (args.task == "correspondence" and (depth is None or pose is None))):
        print("error: --oracle needs --depth (depth, object), --relative-pose (pose) or both (correspondence)",
              file=sys.stderr)
        return 2
    if args.task == "object":
        return _run_object(args, backend, images[0], cameras[0], depth)
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
    return _emit(args, {"task": args.task, "backend": backend.describe(), "summary": summary, "rows": rows}, [rows])


def _emit(args: argparse.Namespace, report: dict, tables: list[list[dict]]) -> int:
    """Write the report as JSON (``--json``) and, unless it went to stdout, print the tables and
    the summary line."""
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            print(f"wrote {args.json}")
    if args.json != "-":
        for k, table in enumerate(t for t in tables if t):
            if k:
                print()
            _print_table(table)
        print("  ".join(f"{k}={v}" for k, v in report["summary"].items()))
    return 0


def _run_object(args: argparse.Namespace, backend: Any, image: np.ndarray, camera: Any, depth: Any) -> int:
    from .. import protocol
    from ..engine import EngineError, load_backend
    from ..object_query import ObjectQuery

    if not args.box:
        print("error: --task object needs at least one --box X1 Y1 X2 Y2", file=sys.stderr)
        return 2
    names = [n.strip() for item in args.ask for n in item.split(",") if n.strip()]
    try:
        ids = [protocol.object_question_id(n) for n in names]
    except protocol.ProtocolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    relations = [q for q in dict.fromkeys(ids) if protocol.OBJECT_QUESTIONS[q].regions == 2]
    try:
        depth_backend = backend
        if args.depth_model and not args.oracle:
            depth_backend = load_backend("transformers", checkpoint=args.depth_model, device=args.device,
                                         dtype=args.dtype, offline=not args.online)
        tokens = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
        query = ObjectQuery(backend, depth_backend=depth_backend, depth_grid=args.depth_grid, relations=relations,
                            **tokens)
        res = query.query(image, camera, args.box, reference_depth=depth)
    except (EngineError, protocol.ProtocolError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [
        {"box": [_num(v) for v in o.box], "width_m": _num(o.size[0]), "height_m": _num(o.size[1]),
         "depth_m": _num(o.size[2]), "centre": [_num(c) for c in o.centre], "depth_answers": o.depth_samples,
         "region": o.region, "answers": o.answers, "error": "; ".join(o.errors) or None}
        for o in res.objects
    ]
    relation_rows = [
        {"a": r.a, "b": r.b, "question": r.question,
         "value": r.value if isinstance(r.value, (bool, type(None))) else _num(r.value),
         "answer": r.answer, "error": r.error}
        for r in res.relations
    ]
    summary = {"objects": len(rows), "measured": sum(o.valid for o in res.objects),
               "parse_failures": res.parse_failures, "requests": len(res.responses)}
    report = {"task": "object", "backend": backend.describe(), "summary": summary, "rows": rows,
              "relations": relation_rows}
    table = [{k: v for k, v in r.items() if k not in ("region", "answers")} for r in rows]
    return _emit(args, report, [table, relation_rows])


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
