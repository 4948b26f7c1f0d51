"""Starting a command in the background and stopping it: real child processes."""

from __future__ import annotations

import time
from pathlib import Path

from common.background import start_detached, stop_pid, without_detach


def test_the_detach_flag_is_dropped_from_the_childs_arguments() -> None:
    assert without_detach(["-v", "serve", "--detach", "--port", "1"]) == [
        "-v", "serve", "--port", "1"]


def test_a_child_that_dies_before_ready_reports_its_code_and_last_line(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    log.write_text("an earlier run's line\n")
    started = start_detached("json.tool", [str(tmp_path / "missing.json")], log,
                             ready=lambda pid: False, timeout_s=30)
    assert not started.ready
    assert started.exit_code not in (None, 0)
    assert "missing.json" in started.last_line
    assert log.read_text().startswith("an earlier run's line\n")  # appended, not replaced


def test_ready_returns_at_once_and_stop_ends_the_child(tmp_path: Path) -> None:
    started = start_detached("http.server", ["--bind", "127.0.0.1", "0"], tmp_path / "log",
                             ready=lambda pid: pid > 0, timeout_s=30)
    assert started.ready
    assert started.exit_code is None
    assert stop_pid(started.pid, timeout_s=10)
    assert stop_pid(started.pid, timeout_s=1)  # already gone: nothing to do


def test_a_child_still_starting_at_the_deadline_is_left_running(tmp_path: Path) -> None:
    begun = time.monotonic()
    started = start_detached("http.server", ["--bind", "127.0.0.1", "0"], tmp_path / "log",
                             ready=lambda pid: False, timeout_s=0.5)
    try:
        assert not started.ready
        assert started.exit_code is None
        assert time.monotonic() - begun < 10
    finally:
        assert stop_pid(started.pid, timeout_s=10)
