"""``vlm3-ros``: the command-line entry point.

Each subcommand lives in its own module of this package exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules import their heavy dependencies
(torch, rclpy) inside ``run`` so ``vlm3-ros --help`` stays fast. :func:`build_parser` and
:func:`run_commands` serve any command of this shape (the training package's ``vlm3-train`` too).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Mapping, Sequence

# subcommand -> module (in vlm3_ros.cli)
COMMANDS = {
    "query": "query",
    "bench": "bench",
    "bench-dense": "bench_dense",
    "bench-node": "bench_node",
    "perception": "perception",
    "serve": "serve",
    "bag": "bag",
    "play": "play",
    "demo": "demo",
    "make-model": "make_model",
}
DESCRIPTION = "A vision-language model as a metric 3D sensor for ROS 2 (VLM3 protocol)."


def plain_text(text: str) -> str:
    """Docstring text for a terminal: reStructuredText roles and literals shown as plain words."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (paragraphs and lists kept) without reStructuredText markup, and each
    option's default after its help unless the help already names it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return super()._fill_text(plain_text(text), width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text.lower() or default in (None, False, argparse.SUPPRESS)
                or (isinstance(default, (list, tuple)) and not default)):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser(prog: str, description: str, package: str, commands: Mapping[str, str]) -> argparse.ArgumentParser:
    """A parser with one subcommand per available module ``package.<module>`` of ``commands``.

    A subcommand whose module is not present in this installation is left out. Help is formatted by
    :class:`HelpFormatter` (subcommands making their own subparsers pass ``parser.formatter_class`` on).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in commands.items():
        try:
            module = importlib.import_module(f"{package}.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{module_name}":
                raise
            continue
        command = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=HelpFormatter)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def run_commands(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns its exit code (130 on Ctrl-C)."""
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run_commands(build_parser("vlm3-ros", DESCRIPTION, __package__, COMMANDS), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
