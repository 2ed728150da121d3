"""``vlm3-train``: the command-line entry point of the training package.

Each subcommand lives in its own module of this package exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules import their heavy dependencies
(torch, datasets) inside ``run`` so ``vlm3-train --help`` stays fast. A subcommand whose module
is not present in this installation is left out.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# subcommand -> module (in vlm3_train)
COMMANDS = {
    "synth": "synth_cmd",
    "convert": "convert_cmd",
    "train": "train_cmd",
    "eval": "eval_cmd",
    "default-model": "default_model_cmd",
    "bench-packing": "bench_packing_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="vlm3-train",
        description="Training data, fine-tuning and evaluation for vlm3_ros (VLM3 protocol).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module_name}":
                raise
            continue  # a subcommand not shipped in this installation
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlm3-train`` with ``argv`` (default: the process arguments); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
