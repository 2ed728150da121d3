"""The `vlm3-train` command line: every option explains itself and states its default."""

from __future__ import annotations

import argparse

import pytest

from vlm3_train.cli import COMMANDS, build_parser


def _commands() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_is_registered():
    assert set(_commands()) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_states_its_default(command):
    parser = _commands()[command]
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            problems.append(f"{name}: no help text")
            continue
        default = action.default
        has_default = not (default is None or default is False or default == argparse.SUPPRESS or default in ([], ()))
        if action.option_strings and has_default and "default" not in action.help:
            problems.append(f"{name}: default {default!r} not stated in {action.help!r}")
    assert not problems, "\n".join(problems)
