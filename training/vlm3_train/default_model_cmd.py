"""``vlm3-train default-model``: build (or find) the small default checkpoint trained on synthetic scenes."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "build the small default model on synthetic scenes (CPU, minutes; cached) and print its path and held-out scores"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", help="where models are cached (default $VLM3_CACHE/models or ~/.cache/vlm3_ros/models)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached model exists")
    parser.add_argument("--path-only", action="store_true", help="print only the checkpoint path")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from .default_model import REPORT_NAME, DefaultModelError, ensure_default_model
    from .progress import library_progress_bars

    try:
        with library_progress_bars(not args.quiet):
            path = ensure_default_model(args.cache_dir, force=args.force, progress=not args.quiet)
    except DefaultModelError as exc:
        print(f"vlm3-train default-model: {exc}", file=sys.stderr)
        return 1
    if args.path_only:
        print(path)
        return 0
    report = json.loads((path / REPORT_NAME).read_text())
    print(json.dumps({"path": str(path), "heldout_delta1": report["heldout_delta1"],
                      "heldout_abs_rel": report["heldout_abs_rel"], "build_seconds": report["seconds"]}, indent=2))
    return 0
