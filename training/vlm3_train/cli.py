"""``vlm3-train``: the command-line entry point of the training package.

Each subcommand lives in its own module of this package exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules import their heavy dependencies
(torch, datasets) inside ``run`` so ``vlm3-train --help`` stays fast. A subcommand whose module
is not present in this installation is left out.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from vlm3_ros.cli.main import build_parser as _build_parser
from vlm3_ros.cli.main import run_commands

# subcommand -> module (in vlm3_train)
COMMANDS = {
    "synth": "synth_cmd",
    "convert": "convert_cmd",
    "train": "train_cmd",
    "eval": "eval_cmd",
    "default-model": "default_model_cmd",
    "bench-packing": "bench_packing_cmd",
}
DESCRIPTION = "Training data, fine-tuning and evaluation for vlm3_ros (VLM3 protocol)."


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand registered."""
    return _build_parser("vlm3-train", DESCRIPTION, __package__, COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlm3-train`` with ``argv`` (default: the process arguments); returns the exit code."""
    return run_commands(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
