"""``vlm3-ros bench-dense``: dense depth from a frame's answers against its full ground truth.

On real RGB-D frames (a 7-Scenes folder), for each total question count N, in one run:

* **grid**: N questions on a regular grid; the completion and plain linear interpolation of the
  same answers;
* **adaptive**: ``(1 - share) N`` on a grid, then ``share N`` where the grid's completion is least
  certain (one more request about the same image: the engine reuses its prefix); the completion
  and linear interpolation of those same answers.

Answers come from the oracle (ground truth in the protocol's text: their only error is the
2-decimal rounding, so the numbers measure the completion) or from a checkpoint (``--model``).
Scores are over every pixel with ground truth: delta1 and AbsRel of the completion, of linear
interpolation, of the completion's confident pixels (with their coverage: what ``depth/dense``
keeps) and of the answers themselves at their pixels. ``--plot`` draws one frame.

7-Scenes colour and depth come from two cameras that are not registered; the colour image is first
resampled onto the depth image (``SevenScenes.load_registered_rgb``) unless ``--raw-colour``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

HELP = "Dense depth completion against full ground truth on RGB-D frames (oracle or a model), vs linear interpolation."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="a 7-Scenes sequence folder (e.g. ../shared/data/7scenes_redkitchen)")
    parser.add_argument("--points", type=int, nargs="+", default=[64, 256, 1024], help="total questions per frame N")
    parser.add_argument("--share", type=float, default=0.35, help="share of N asked in the adaptive second round")
    parser.add_argument("--frame-step", type=int, default=1, help="use every n-th frame (default: all)")
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the ground-truth oracle)")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when available), cpu, cuda, cuda:N "
                        "(default auto)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="model weights' dtype (default auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                        help="tokens generated per answer at most (default 64)")
    parser.add_argument("--min-confidence", type=float, default=0.5, help="confidence kept in depth/dense")
    parser.add_argument("--margin", type=float, default=0.02, help="border left out of the questions (fraction)")
    parser.add_argument("--edge-weight", type=float, default=0.0, help="adaptive round: weight of image edges")
    parser.add_argument("--lower-band", type=float, default=0.0, help="adaptive round: extra weight of the lower third")
    parser.add_argument("--raw-colour", action="store_true", help="do not register 7-Scenes colour onto depth")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--plot", type=Path, help="write a PNG (or .jpg) of one frame (image, ground truth, maps, errors)")
    parser.add_argument("--plot-frame", type=int, help="frame id of the plot (default: the first used)")
    parser.add_argument("--plot-points", type=int, default=256, help="N of the plot (adaptive)")


def _row_text(row: dict) -> str:
    def pair(kind: str) -> str:
        m = row[kind]
        return f"{m['delta1']:.4f} / {m['abs_rel']:.4f}"

    c = row["confident"]
    asked = f"{row['rounds'][0]}+{row['rounds'][1]}" if row["rounds"][1] else f"{row['questions_per_frame']:.0f}"
    return (f"| {row['points']} | {row['mode']} {asked} | **{pair('dense')}** | "
            f"{pair('linear')} | {c['coverage']:.3f}: {c['delta1'] / c['coverage']:.4f} / {c['abs_rel']:.4f} | "
            f"{pair('sparse')} | {1000 * row['seconds_per_frame']:.0f} |")


def _plot(path: Path, frame: int, rgb, depth, evaluated, points: int, min_confidence: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..paths import write_atomic

    result = evaluated.result
    dense, sparse = result.dense, result.sparse
    lo, hi = np.nanpercentile(depth, 1), np.nanpercentile(depth, 99)
    valid = np.isfinite(depth)

    def err(pred):
        e = np.abs(pred - depth) / depth
        e[~valid] = np.nan
        return e

    fig, axes = plt.subplots(2, 4, figsize=(20, 8.2))
    first = result.first_round
    axes[0, 0].imshow(rgb)
    axes[0, 0].plot(sparse.uv[:first, 0], sparse.uv[:first, 1], "c.", ms=4, label=f"grid ({first})")
    axes[0, 0].plot(sparse.uv[first:, 0], sparse.uv[first:, 1], "r.", ms=4, label=f"adaptive ({result.second_round})")
    axes[0, 0].legend(loc="lower right", fontsize=8)
    axes[0, 0].set_title(f"frame {frame}: the {points} questions")
    panels = [
        (axes[0, 1], depth, "ground truth depth (m)", "turbo", (lo, hi)),
        (axes[0, 2], dense.depth, "completion (m)", "turbo", (lo, hi)),
        (axes[0, 3], dense.masked(min_confidence), f"depth/dense: confidence >= {min_confidence:g}", "turbo", (lo, hi)),
        (axes[1, 0], dense.confidence, "confidence", "viridis", (0, 1)),
        (axes[1, 1], evaluated.linear, "linear interpolation, same answers (m)", "turbo", (lo, hi)),
        (axes[1, 2], err(dense.depth), "completion |error| / depth", "magma", (0, 0.25)),
        (axes[1, 3], err(evaluated.linear), "linear |error| / depth", "magma", (0, 0.25)),
    ]
    for ax, image, title, cmap, (vmin, vmax) in panels:
        shown = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(title)
        fig.colorbar(shown, ax=ax, fraction=0.035)
    d, l = evaluated.metrics("dense"), evaluated.metrics("linear")
    axes[1, 2].set_xlabel(f"delta1 {d['delta1']:.4f}  AbsRel {d['abs_rel']:.4f}")
    axes[1, 3].set_xlabel(f"delta1 {l['delta1']:.4f}  AbsRel {l['abs_rel']:.4f}")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    data = io.BytesIO()
    if path.suffix.lower() in (".jpg", ".jpeg"):  # compact, for documentation
        fig.savefig(data, format="jpeg", dpi=60, pil_kwargs={"quality": 80})
    else:
        fig.savefig(data, format="png", dpi=70)
    plt.close(fig)
    write_atomic(path, data.getvalue())


def run(args: argparse.Namespace) -> int:
    from ..camera import Intrinsics
    from ..completion import AdaptiveConfig, CompletionError
    from ..datasets.sevenscenes import DatasetError, SevenScenes
    from ..dense_eval import DenseTally, evaluate_dense_frame
    from ..engine import EngineError, load_backend
    from ..paths import write_json_atomic
    from ..pipeline import DepthEstimator, dense_rounds

    try:
        data = SevenScenes(args.data)
        for n in args.points:
            dense_rounds(n, args.share)
        adaptive = AdaptiveConfig(margin=args.margin, edge_weight=args.edge_weight, lower_band=args.lower_band)
    except (DatasetError, ValueError, CompletionError) as exc:
        print(f"vlm3-ros bench-dense: {exc}", file=sys.stderr)
        return 2
    oracle = not args.model
    try:
        backend = load_backend("oracle") if oracle else load_backend(
            "transformers", checkpoint=args.model, device=args.device, dtype=args.dtype)
    except EngineError as exc:
        print(f"vlm3-ros bench-dense: {exc}", file=sys.stderr)
        return 2
    estimator = DepthEstimator(backend, max_new_tokens=args.max_new_tokens)
    frames = data.frame_ids[:: max(1, args.frame_step)]
    rgb0 = data.load_rgb(frames[0])
    height, width = rgb0.shape[:2]
    intrinsics = Intrinsics.from_K(data.intrinsics(), width, height)
    t0 = time.perf_counter()
    registration = None if args.raw_colour else data.colour_registration()
    info = {"data": str(args.data), "frames": len(frames), "frame_ids": [frames[0], frames[-1]], "answers": "oracle" if oracle
            else f"model {args.model}", "colour": "raw" if args.raw_colour else "registered onto depth",
            "registration": None if registration is None else np.round(registration, 4).tolist(),
            "share": args.share, "edge_weight": args.edge_weight, "lower_band": args.lower_band,
            "min_confidence": args.min_confidence, "margin": args.margin,
            "registration_seconds": round(time.perf_counter() - t0, 2)}
    print("  ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print("| N | questions (grid+adaptive) | completion delta1 / AbsRel | linear, same answers | confident: coverage: "
          "delta1 / AbsRel | answers themselves | ms per frame |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    plot_frame = args.plot_frame if args.plot_frame is not None else frames[0]
    rows = []
    for n in args.points:
        for mode, share in (("grid", 0.0), ("adaptive", args.share)):
            tally = DenseTally()
            for frame in frames:
                rgb = data.load_rgb(frame) if args.raw_colour else data.load_registered_rgb(frame)
                depth = data.load_depth(frame)
                evaluated = evaluate_dense_frame(estimator, rgb, intrinsics, depth, n, share=share, margin=args.margin,
                                                 min_confidence=args.min_confidence, oracle=oracle, adaptive=adaptive)
                tally.add(evaluated)
                if args.plot and mode == "adaptive" and n == args.plot_points and frame == plot_frame:
                    _plot(args.plot, frame, rgb, depth, evaluated, n, args.min_confidence)
            row = {"points": n, "mode": mode, "rounds": list(dense_rounds(n, share)), **tally.report()}
            rows.append(row)
            print(_row_text(row), flush=True)
    if args.json:
        write_json_atomic(args.json, {"info": info, "results": rows})
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {args.plot}" if args.plot.exists() else f"no plot: frame {plot_frame} / N {args.plot_points} not run")
    return 0
