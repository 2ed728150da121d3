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

from .server_options import SERVER_URL_HELP, add_server_options, server_backend

HELP = "Ask a VLM3 model (or the oracle) for depth, correspondences, pose or objects on image files."


DEFAULT_GRID = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image file (two for correspondence and pose)")
    parser.add_argument("--task", choices=("depth", "correspondence", "pose", "object"), default="depth",
                        help="what to ask: metric depth at pixels, the matching pixels in image 2, the relative "
                             "pose of the two views, or the 3D size and relations of image boxes (--box)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory or hub id (hub ids need the local cache or --online)")
    source.add_argument("--oracle", action="store_true", help="answer from ground truth (--depth / --relative-pose)")
    source.add_argument("--server", metavar="URL", help=SERVER_URL_HELP)
    parser.add_argument("--adapter", help="LoRA adapter directory applied to --model")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--online", action="store_true", help="allow downloading a hub id")
    cam = parser.add_mutually_exclusive_group(required=True)
    cam.add_argument("--focal", type=float, help="focal length in pixels (principal point at the image centre)")
    cam.add_argument("--intrinsics", type=float, nargs=4, metavar=("FX", "FY", "CX", "CY"),
                     help="pinhole intrinsics in pixels")
    cam.add_argument("--camera-info", type=Path, help="ROS camera calibration YAML or vlm3 intrinsics JSON")
    parser.add_argument("--distortion", type=float, nargs="+", metavar="K", help="plumb_bob coefficients k1 k2 p1 p2 k3")
    pixels = parser.add_mutually_exclusive_group()
    pixels.add_argument("--pixel", type=float, nargs=2, action="append", metavar=("X", "Y"), help="a pixel (repeatable)")
    pixels.add_argument("--grid", type=int, default=None, metavar="N",
                        help=f"a regular grid of about N pixels (default {DEFAULT_GRID} when no --pixel is given)")
    parser.add_argument("--margin", type=float, default=0.05, help="grid border margin (fraction)")
    parser.add_argument("--depth", type=Path, help="oracle: depth image of image 1 (16-bit PNG in mm, or .npy metres)")
    parser.add_argument("--depth-scale", type=float, default=0.001, help="metres per unit of a 16-bit depth PNG")
    parser.add_argument("--relative-pose", type=Path, help="oracle: 4x4 text file, camera 1 <- camera 2")
    parser.add_argument("--think", action="store_true", help="correspondence: ask for a think block")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="tokens generated per answer at most (default: the pipeline's, 32 to 64 by task)")
    parser.add_argument("--json", nargs="?", const="-", help="write JSON (to a path, or - for stdout)")
    add_server_options(parser)
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


class QueryError(ValueError):
    """A query that cannot be run as given (reported in one line, exit status 2)."""


def _positive(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise QueryError(f"{name} must be a positive finite number, got {value:g}")
    return value


def _check_arguments(args: argparse.Namespace) -> None:
    needed = 1 if args.task in ("depth", "object") else 2
    if len(args.images) != needed:
        raise QueryError(f"the {args.task} task takes {needed} image(s), got {len(args.images)}")
    if args.focal is not None:
        _positive("--focal (pixels)", args.focal)
    if args.intrinsics is not None:
        fx, fy, cx, cy = args.intrinsics
        _positive("--intrinsics FX", fx)
        _positive("--intrinsics FY", fy)
        if not (math.isfinite(cx) and math.isfinite(cy)):
            raise QueryError(f"--intrinsics CX CY must be finite, got {cx:g} {cy:g}")
    if args.distortion is not None and not all(math.isfinite(k) for k in args.distortion):
        raise QueryError(f"--distortion coefficients must be finite, got {args.distortion}")
    if args.grid is not None and args.grid < 1:
        raise QueryError(f"--grid must be at least 1 pixel, got {args.grid}")
    if not (math.isfinite(args.margin) and 0 <= args.margin < 0.5):
        raise QueryError(f"--margin must be a fraction in [0, 0.5), got {args.margin:g}")
    if args.pixel and not all(math.isfinite(v) for p in args.pixel for v in p):
        raise QueryError(f"--pixel values must be finite, got {args.pixel}")
    _positive("--depth-scale", args.depth_scale)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise QueryError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.json not in (None, "-"):
        target = Path(args.json)
        if target.is_dir():
            raise QueryError(f"--json {target} is a directory; give a file path")


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    if not path.is_file():
        raise QueryError(f"cannot read image {path}: no such file")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise QueryError(f"cannot read image {path}: not an image OpenCV can decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _camera_file(path: Path):
    from ..camera import Intrinsics

    try:
        text = path.read_text()
    except OSError as exc:
        raise QueryError(f"cannot read --camera-info {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".json":
            return Intrinsics.from_dict(json.loads(text))
        import yaml

        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError("expected a mapping with camera_matrix, image_width and image_height")
        K = np.asarray(data["camera_matrix"]["data"], float).reshape(3, 3)
        D = tuple((data.get("distortion_coefficients") or {}).get("data", ()))
        return Intrinsics.from_K(K, int(data["image_width"]), int(data["image_height"]), D=D,
                                 distortion_model=data.get("distortion_model"))
    except KeyError as exc:
        raise QueryError(f"--camera-info {path}: missing {exc}") from None
    except Exception as exc:  # noqa: BLE001 - YAML, JSON, shape and camera errors all mean a bad file
        raise QueryError(f"--camera-info {path} is not a usable calibration: {exc}") from None


def _intrinsics(args: argparse.Namespace, width: int, height: int):
    from ..camera import CameraError, Intrinsics

    try:
        if args.camera_info:
            camera = _camera_file(args.camera_info)
            if (camera.width, camera.height) != (width, height):
                raise QueryError(f"--camera-info {args.camera_info} is for {camera.width}x{camera.height} images, "
                                 f"the image is {width}x{height}")
            return camera
        if args.focal:
            K = Intrinsics.from_focal(width, height, args.focal).K
        else:
            fx, fy, cx, cy = args.intrinsics
            K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
        if args.distortion:
            return Intrinsics.from_K(K, width, height, D=tuple(args.distortion), distortion_model="plumb_bob")
        return Intrinsics.from_K(K, width, height)
    except CameraError as exc:
        raise QueryError(f"the camera is not usable: {exc}") from None


def _reference_depth(path: Path | None, scale: float) -> np.ndarray | None:
    if path is None:
        return None
    try:
        if path.suffix == ".npy":
            depth = np.load(path).astype(np.float32)
        else:
            import cv2

            raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise ValueError("not an image OpenCV can decode")
            depth = raw.astype(np.float32) * scale
            depth[raw == 0] = np.nan
    except (OSError, ValueError) as exc:
        raise QueryError(f"cannot read depth image {path}: {exc}") from None
    if depth.ndim != 2:
        raise QueryError(f"depth image {path} must have one channel, got shape {depth.shape}")
    return depth


def _relative_pose(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    try:
        T = np.loadtxt(path, dtype=float).reshape(4, 4)
    except (OSError, ValueError) as exc:
        raise QueryError(f"--relative-pose {path} must be a 4x4 matrix in a text file: {exc}") from None
    if not np.all(np.isfinite(T)):
        raise QueryError(f"--relative-pose {path} has non-finite values")
    return T


def _num(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    return None if not math.isfinite(value) else round(value, 6)


def run(args: argparse.Namespace) -> int:
    from ..engine import EngineError

    try:
        return _run(args)
    except (QueryError, EngineError) as exc:
        print(f"vlm3-ros query: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return 2


def _run(args: argparse.Namespace) -> int:
    from ..engine import load_backend
    from ..pipeline import CorrespondenceMatcher, DepthEstimator, PoseEstimator, query_grid

    _check_arguments(args)
    images = [_read_rgb(p) for p in args.images]
    height, width = images[0].shape[:2]
    cameras = [_intrinsics(args, im.shape[1], im.shape[0]) for im in images]
    depth = _reference_depth(args.depth, args.depth_scale)
    if depth is not None and depth.shape != (height, width):
        raise QueryError(f"depth image {args.depth} is {depth.shape[1]}x{depth.shape[0]}, image 1 is {width}x{height}")
    pose = _relative_pose(args.relative_pose)
    if args.oracle and ((args.task in ("depth", "object") and depth is None) or (args.task == "pose" and pose is None)
                        or (args.task == "correspondence" and (depth is None or pose is None))):
        raise QueryError("--oracle needs --depth (depth, object), --relative-pose (pose) or both (correspondence)")
    backend = (
        load_backend("oracle")
        if args.oracle
        else server_backend(args)
        if args.server
        else load_backend("transformers", checkpoint=args.model, adapter=args.adapter, device=args.device,
                          dtype=args.dtype, offline=not args.online)
    )
    if args.pixel:
        uv = np.asarray(args.pixel, float)
    else:
        uv = query_grid(width, height, DEFAULT_GRID if args.grid is None else args.grid, args.margin)
    if args.task == "object":
        return _run_object(args, backend, images[0], cameras[0], depth)
    tokens = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}
    if args.task == "depth":
        estimator = DepthEstimator(backend, **tokens)
        res = estimator.estimate(images[0], cameras[0], uv, reference_depth=depth)
        rows = [
            {"x": _num(uv[i, 0]), "y": _num(uv[i, 1]), "u": _num(res.uv[i, 0]), "v": _num(res.uv[i, 1]),
             "answer": res.answers[i], "distance_m": _num(res.distance[i]), "z_m": _num(res.z[i]),
             "point": [_num(c) for c in res.points[i]], "reason": res.errors[i]}
            for i in range(len(uv))
        ]
        summary = {"points": len(rows), "valid": int(res.valid.sum()), "parse_failures": res.parse_failures,
                   "no_reference": res.no_reference, "depth_kind": estimator.depth_kind}
    elif args.task == "correspondence":
        res = CorrespondenceMatcher(backend, think=args.think, **tokens).match(
            images[0], cameras[0], images[1], cameras[1], uv, reference_depth1=depth, reference_pose=pose)
        rows = [
            {"x": _num(uv[i, 0]), "y": _num(uv[i, 1]), "u": _num(res.uv1_used[i, 0]),
             "v": _num(res.uv1_used[i, 1]), "answer": res.answers[i], "u2": _num(res.uv2[i, 0]),
             "v2": _num(res.uv2[i, 1]), "reason": res.errors[i]}
            for i in range(len(uv))
        ]
        summary = {"points": len(rows), "valid": int(res.valid.sum()), "parse_failures": res.parse_failures,
                   "no_reference": res.no_reference}
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
    return _emit(args, {"task": args.task, "backend": backend.describe(), "summary": summary, "rows": rows}, [rows])


def _emit(args: argparse.Namespace, report: dict, tables: list[list[dict]]) -> int:
    """Write the report as JSON (``--json``) and, unless it went to stdout, print the tables and
    the summary line."""
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            from ..paths import write_atomic

            try:
                write_atomic(args.json, text + "\n")
            except OSError as exc:
                raise QueryError(f"cannot write --json {args.json}: {exc.strerror or exc}") from None
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
    from ..engine import load_backend
    from ..object_query import ObjectQuery

    if not args.box:
        raise QueryError("--task object needs at least one --box X1 Y1 X2 Y2")
    if not all(math.isfinite(v) for box in args.box for v in box):
        raise QueryError(f"--box values must be finite, got {args.box}")
    if args.depth_grid < 1:
        raise QueryError(f"--depth-grid must be at least 1, got {args.depth_grid}")
    names = [n.strip() for item in args.ask for n in item.split(",") if n.strip()]
    try:
        ids = [protocol.object_question_id(n) for n in names]
    except protocol.ProtocolError as exc:
        raise QueryError(str(exc)) from None
    relations = [q for q in dict.fromkeys(ids) if protocol.OBJECT_QUESTIONS[q].regions == 2]
    depth_backend = backend
    if args.depth_model and not args.oracle:
        depth_backend = load_backend("transformers", checkpoint=args.depth_model, device=args.device,
                                     dtype=args.dtype, offline=not args.online)
    tokens = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}
    try:
        query = ObjectQuery(backend, depth_backend=depth_backend, depth_grid=args.depth_grid, relations=relations,
                            **tokens)
        res = query.query(image, camera, args.box, reference_depth=depth)
    except (protocol.ProtocolError, ValueError) as exc:
        raise QueryError(str(exc)) from None
    rows = [
        {"box": [_num(v) for v in o.box], "width_m": _num(o.size[0]), "height_m": _num(o.size[1]),
         "depth_m": _num(o.size[2]), "centre": [_num(c) for c in o.centre], "depth_answers": o.depth_samples,
         "region": o.region, "answers": o.answers, "reason": "; ".join(o.errors) or None}
        for o in res.objects
    ]
    relation_rows = [
        {"a": r.a, "b": r.b, "question": r.question,
         "value": r.value if isinstance(r.value, (bool, type(None))) else _num(r.value),
         "answer": r.answer, "reason": r.error}
        for r in res.relations
    ]
    summary = {"objects": len(rows), "measured": sum(o.valid for o in res.objects),
               "parse_failures": res.parse_failures, "requests": len(res.responses)}
    report = {"task": "object", "backend": backend.describe(), "summary": summary, "rows": rows,
              "relations": relation_rows}
    return _emit(args, report, [rows, relation_rows])


#: Table columns: header -> the row keys shown together (a pixel is "(x, y)"); a table shows the
#: columns its rows have, in this order.
_COLUMNS = {"asked": ("x", "y"), "used": ("u", "v"), "box": ("box",), "a": ("a",), "b": ("b",),
            "question": ("question",), "answer": ("answer",), "value": ("value",), "distance_m": ("distance_m",),
            "z_m": ("z_m",), "match": ("u2", "v2"), "width_m": ("width_m",), "height_m": ("height_m",),
            "depth_m": ("depth_m",), "centre": ("centre",), "depth_answers": ("depth_answers",),
            "reason": ("reason",)}


def _print_table(rows: list[dict]) -> None:
    """Rows as a table: the pixel asked for, the pixel the question used (moved by the text
    coordinates' rounding), the answer and its values, and why a row has no value."""
    if not rows:
        return
    columns = [(name, keys) for name, keys in _COLUMNS.items() if all(k in rows[0] for k in keys)]

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}"
        if isinstance(value, (list, tuple)):
            return "(" + ", ".join(fmt(v) for v in value) + ")"
        text = str(value).replace("\n", " ")
        return text if len(text) <= 60 else text[:57] + "..."

    def cell(row: dict, keys: tuple) -> str:
        values = [row.get(k) for k in keys]
        if len(keys) > 1:
            return "-" if all(v is None for v in values) else fmt(values)
        return fmt(values[0])

    table = [[cell(r, keys) for _, keys in columns] for r in rows]
    widths = [max(len(name), *(len(row[i]) for row in table)) for i, (name, _) in enumerate(columns)]
    print("  ".join(name.ljust(w) for (name, _), w in zip(columns, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
