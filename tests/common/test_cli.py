"""The shared command-line scaffolding (common.cli)."""

from __future__ import annotations

import argparse

import pytest

from common.cli import Subcommands, new_parser, run


class Refused(Exception):
    pass


def _parser() -> tuple[argparse.ArgumentParser, Subcommands[argparse.ArgumentParser]]:
    parser, subcommands = new_parser("tool", "a test tool", "1.2.3")
    main = subcommands.add_parser("main")
    main.add_argument("thing")
    main.set_defaults(handler=lambda args: 0 if args.thing == "ok" else _refuse(args.thing))
    other = subcommands.add_parser("other")
    other.set_defaults(handler=lambda args: 7)
    return parser, subcommands


def _refuse(thing: str) -> int:
    raise Refused(f"{thing} is not ok")


def test_expected_error_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    parser, _ = _parser()
    assert run(parser, ["main", "bad"], expected=(Refused,)) == 1
    assert capsys.readouterr().err == "tool: error: bad is not ok\n"


def test_describe_shapes_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    parser, _ = _parser()
    assert run(parser, ["main", "bad"], expected=(Refused,),
               describe=lambda exc: f"{type(exc).__name__}: {exc}") == 1
    assert capsys.readouterr().err == "tool: error: Refused: bad is not ok\n"


def test_default_command_is_inserted_after_verbose_flags() -> None:
    parser, subcommands = _parser()
    assert run(parser, ["-v", "ok"], expected=(Refused,),
               default_command=(subcommands, "main")) == 0
    parser, subcommands = _parser()
    assert run(parser, ["other"], expected=(Refused,),
               default_command=(subcommands, "main")) == 7


def test_bad_usage_exits_2_and_version_prints(capsys: pytest.CaptureFixture[str]) -> None:
    parser, _ = _parser()
    with pytest.raises(SystemExit) as exit_info:
        run(parser, ["nope"], expected=(Refused,))
    assert exit_info.value.code == 2
    parser, _ = _parser()
    with pytest.raises(SystemExit):
        run(parser, ["--version"], expected=(Refused,))
    assert capsys.readouterr().out == "tool 1.2.3\n"
