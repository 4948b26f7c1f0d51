"""Starting a long-running command in the background and stopping it again.

``fleet serve --detach`` and ``edge-agent serve|run --detach`` re-run themselves without
``--detach`` as a child in a new session (so closing the terminal does not stop it), with
output appended to a log file, and return only once the child says it is ready (it wrote
its run file) or has died; ``pg_ctl start -w`` behaves the same. A command started with a
plain ``&`` gives the shell back before it can be used, so the next command of a script
would race it. ``fleet stop`` and ``edge-agent stop`` end such a process with SIGTERM and
wait for it to go.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DETACH_FLAG", "Started", "start_detached", "stop_pid", "without_detach"]

DETACH_FLAG = "--detach"
_POLL_S = 0.1


@dataclass(frozen=True)
class Started:
    """How a background start went: ``ready`` (serving), or not, with the child's exit code
    (None: still starting when the wait ended) and the last line it logged."""

    pid: int
    ready: bool
    exit_code: int | None
    last_line: str
    log_file: Path
    timeout_s: float

    def failure(self, what: str) -> str | None:
        """Why ``what`` (e.g. "the agent") is not serving, in one line; None if it is."""
        if self.ready:
            return None
        if self.exit_code is None:
            return (f"{what} (pid {self.pid}) is not serving after {self.timeout_s:g} s; "
                    f"see {self.log_file}")
        return (f"{what} exited with code {self.exit_code} before serving: "
                f"{self.last_line or 'no output'} (log {self.log_file})")


def without_detach(argv: Sequence[str]) -> list[str]:
    """``argv`` without the detach flag (the child's arguments)."""
    return [arg for arg in argv if arg != DETACH_FLAG]


def start_detached(module: str, argv: Sequence[str], log_file: Path,
                   ready: Callable[[int], bool], timeout_s: float) -> Started:
    """Run ``python -m module argv`` in its own session, output appended to ``log_file``,
    and wait until ``ready(pid)``, the child's exit, or ``timeout_s``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        start = log.tell()
        # posix_spawn rather than subprocess.Popen: the child is meant to outlive this
        # process, which Popen reports as a leak when its object goes away.
        pid = os.posix_spawn(sys.executable, [sys.executable, "-m", module, *argv],
                             os.environ, setsid=True, file_actions=[
                                 (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                 (os.POSIX_SPAWN_DUP2, log.fileno(), 1),
                                 (os.POSIX_SPAWN_DUP2, log.fileno(), 2)])
    deadline = time.monotonic() + timeout_s
    while True:
        waited, status = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return Started(pid, False, os.waitstatus_to_exitcode(status),
                           _last_line(log_file, start), log_file, timeout_s)
        if ready(pid) or time.monotonic() >= deadline:
            return Started(pid, ready(pid), None, _last_line(log_file, start), log_file,
                           timeout_s)
        time.sleep(_POLL_S)


def stop_pid(pid: int, timeout_s: float) -> bool:
    """Send SIGTERM to ``pid`` and wait up to ``timeout_s`` for it to end; True if it did
    (or was already gone)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(_POLL_S)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A child of this process that exited but was not reaped yet is gone for our purpose.
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return waited == 0


def _last_line(log_file: Path, start: int) -> str:
    try:
        with log_file.open("rb") as log:
            log.seek(start)
            tail = log.read()[-4096:]
    except OSError:
        return ""
    lines = [line for line in tail.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
