"""``vlm3-train eval``: metrics of a checkpoint (or the ground-truth oracle) on datasets or bags."""

from __future__ import annotations

import argparse
import json
import sys

from vlm3_ros.cli.server_options import SERVER_URL_HELP, add_server_options, server_backend

HELP = ("evaluate a checkpoint (or the oracle) on VLM3 datasets or rosbag2 recordings: depth, correspondence, pose, "
        "trajectory, dense depth, objects (SpatialRGPT-style)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="*", help="dataset directories (from `vlm3-train convert`); or use --bag")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", help="checkpoint directory or hub id (local cache) to evaluate")
    who.add_argument("--oracle", action="store_true",
                     help="answer from the ground truth instead of a model (validates data and metrics)")
    who.add_argument("--server", metavar="URL", help=SERVER_URL_HELP)
    parser.add_argument("--bag", action="append", default=[], metavar="BAG",
                        help="a rosbag2 recording to evaluate (repeatable); converted with the model's task specs")
    parser.add_argument("--output", required=True, help="report directory (report.json and PNG plots)")
    parser.add_argument("--adapter", help="LoRA adapter directory applied to --checkpoint")
    parser.add_argument("--device", default="auto", help="default auto (CUDA if available); cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="default auto (bfloat16 on CUDA, float32 on CPU); float32, bfloat16")
    parser.add_argument("--tasks", help="comma-separated tasks to evaluate (default: all present; bags: depth, "
                        "correspondence, pose; object reads the /detections topic)")
    parser.add_argument("--split", default="auto", choices=("auto", "train", "val", "all"),
                        help="dataset rows to use (default auto: val where present, else all; bags: all)")
    parser.add_argument("--max-samples", type=int, help="at most this many samples per task and dataset")
    parser.add_argument("--max-new-tokens", type=int, help="answer length limit (default per task)")
    parser.add_argument("--points", type=int, default=10, help="bags: depth/correspondence questions per sample (default 10)")
    parser.add_argument("--pose-gap", type=int, default=1,
                        help="bags: frame gap of the pose pairs, chained into the trajectory (default 1)")
    parser.add_argument("--correspondence-gap", type=int, default=5, help="bags: frame gap of correspondence pairs (default 5)")
    parser.add_argument("--frame-stride", type=int, default=1, help="bags: use every n-th frame (default 1)")
    parser.add_argument("--keep-dataset", help="bags: keep the converted dataset at this path")
    parser.add_argument("--dense", type=int, default=0, metavar="N",
                        help="bags: also score dense depth from N questions per frame (grid + adaptive second round, "
                             "as the depth node) against each frame's depth image (default 0: off)")
    parser.add_argument("--dense-share", type=float, default=0.35, help="bags: share of the N asked in the second round (default 0.35)")
    parser.add_argument("--dense-frames", type=int, default=0, help="bags: at most this many frames per bag for dense "
                        "depth (default 0: all; --frame-stride applies)")
    parser.add_argument("--no-plots", action="store_true", help="write report.json only")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_server_options(parser)


def run(args: argparse.Namespace) -> int:
    from .progress import library_progress_bars

    with library_progress_bars(not args.quiet):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from vlm3_ros.engine import EngineError, load_backend

    from .evaluate import EvalError, evaluate_bags, evaluate_datasets

    if not args.data and not args.bag:
        print("vlm3-train eval: give dataset directories or --bag BAG", file=sys.stderr)
        return 2
    if args.data and args.bag:
        print("vlm3-train eval: give either dataset directories or --bag, not both", file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.dense and not args.bag:
        print("vlm3-train eval: --dense needs --bag (frames with a full depth image)", file=sys.stderr)
        return 2
    try:
        dense = None
        if args.dense:
            from .dense_eval import DenseOptions

            dense = DenseOptions(points=args.dense, share=args.dense_share, frame_stride=args.frame_stride,
                                 max_frames=args.dense_frames)
        if args.oracle:
            backend = load_backend("oracle")
        elif args.server:
            backend = server_backend(args)
        else:
            backend = load_backend("transformers", checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
                                   adapter=args.adapter)
        common = dict(oracle=args.oracle, tasks=tasks, max_samples=args.max_samples,
                      max_new_tokens=args.max_new_tokens, plots=not args.no_plots, progress=not args.quiet)
        if args.bag:
            report = evaluate_bags(backend, args.bag, args.output, points_per_image=args.points, pose_gap=args.pose_gap,
                                   correspondence_gap=args.correspondence_gap, frame_stride=args.frame_stride,
                                   keep_dataset=args.keep_dataset, dense=dense, **common)
        else:
            report = evaluate_datasets(backend, args.data, args.output, split=args.split, **common)
    except (EvalError, EngineError, ValueError) as exc:
        print(f"vlm3-train eval: {exc}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("depth", "correspondence", "pose", "object", "dense") if k in report}
    if "trajectory" in report:
        summary["trajectory"] = {k: v for k, v in report["trajectory"].items() if k != "trajectories"}
    print(json.dumps({"output": args.output, "samples": report["samples"], **summary}, indent=2))
    return 0
