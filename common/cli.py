"""Scaffolding the three command lines share: ``edge-agent``, ``edge-compress``, ``fleet``.

Each builds its parser with :func:`new_parser` (``--version``, ``-v``, subcommands) and runs
it with :func:`run`, which sets the log level and turns the errors a command expects into
one line on stderr and exit code 1 (argparse already exits 2 on bad usage). Under systemd,
with stderr connected to the journal, log lines carry their syslog priority instead of a
level name (:class:`JournalFormatter`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence

__all__ = ["JournalFormatter", "Subcommands", "describe_os_error", "journal_stream",
           "new_parser", "run"]

Subcommands = argparse._SubParsersAction  # argparse's type for add_subparsers()' result

_VERBOSE_FLAGS = frozenset({"-v", "-vv", "-vvv", "--verbose"})


def new_parser(prog: str, description: str, version: str, epilog: str | None = None,
               ) -> tuple[argparse.ArgumentParser, Subcommands[argparse.ArgumentParser]]:
    """A top-level parser with ``--version`` and ``-v/--verbose``, and its subcommands."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, subcommands


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
        expected: tuple[type[BaseException], ...],
        describe: Callable[[BaseException], str] = str,
        default_command: tuple[Subcommands[argparse.ArgumentParser], str] | None = None,
        ) -> int:
    """Parse ``argv``, configure logging and call the chosen subcommand's ``handler``.

    An ``expected`` error ends the command with ``PROG: error: MESSAGE`` (``describe``
    makes the message) and exit code 1, and so does an OSError no command translated (a file
    it names that cannot be read or written: ``PROG: error: FILE: REASON``); Ctrl-C ends it
    with 130; a closed output pipe quietly with 1.

    ``default_command`` is ``(subcommands, name)``: when the first argument after the ``-v``
    flags is neither a subcommand nor a help or version flag, ``name`` is inserted before
    it, so the main job can be run without naming it.
    """
    args_in = list(sys.argv[1:] if argv is None else argv)
    if default_command is not None:
        subcommands, name = default_command
        start = 0
        while start < len(args_in) and args_in[start] in _VERBOSE_FLAGS:
            start += 1
        if start < len(args_in) and args_in[start] not in {
                *subcommands.choices, "-h", "--help", "--version"}:
            args_in.insert(start, name)
    args = parser.parse_args(args_in)
    args.argv = args_in  # what a command re-runs itself with (common.background)
    _configure_logging(_log_level(args.verbose))
    try:
        return int(args.handler(args))
    except expected as exc:
        print(f"{parser.prog}: error: {describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): nothing more to say, and Python's flush of
        # stdout at exit must not print a traceback either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # The user's environment, not a bug: a file or directory that cannot be used.
        print(f"{parser.prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1


def describe_os_error(exc: OSError) -> str:
    """One line for ``exc``: the file it concerns (if any) and the system's reason."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    second = f" -> {exc.filename2}" if exc.filename2 is not None else ""
    return f"{exc.filename}{second}: {reason}"


_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """Lines for the systemd journal: the syslog priority as a ``<N>`` prefix (sd-daemon(3)),
    which journald turns into the entry's priority, and no time (journald adds its own)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        # One entry per record: a traceback's lines stay in its entry, not new ones.
        return f"<{priority}>" + super().format(record).replace("\n", "\n  ")


def journal_stream(env: Mapping[str, str], stderr_stat: os.stat_result | None) -> bool:
    """Whether stderr is the journal: ``$JOURNAL_STREAM`` names its device and inode."""
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    return (stderr_stat is not None and device.isdigit() and inode.isdigit()
            and (stderr_stat.st_dev, stderr_stat.st_ino) == (int(device), int(inode)))


def _configure_logging(level: int) -> None:
    try:
        stderr_stat: os.stat_result | None = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):  # no real stderr (captured, closed)
        stderr_stat = None
    handler = logging.StreamHandler()
    handler.setFormatter(JournalFormatter() if journal_stream(os.environ, stderr_stat)
                         else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _log_level(verbosity: int) -> int:
    return {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
