"""``vlm3-ros make-model``: write a randomly initialised Qwen3-VL or Qwen2.5-VL checkpoint (offline)."""

from __future__ import annotations

import argparse

HELP = "Write a randomly initialised checkpoint of a preset (test, bench, qwen3-vl-4b, test-qwen2.5-vl), offline."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="checkpoint directory to create")
    parser.add_argument("--preset", default="test", help="model size preset (default: test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same model)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing directory")


def run(args: argparse.Namespace) -> int:
    from ..engine.model_factory import PRESETS, build_checkpoint

    if args.preset not in PRESETS:
        print(f"error: unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        return 2
    try:
        path = build_checkpoint(args.output, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"error: {exc} (use --overwrite)")
        return 2
    print(f"wrote {args.preset} checkpoint to {path}")
    return 0
