"""The periodic runner: real threads, waited on by events rather than fixed sleeps."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from common.periodic import Periodic

_WAIT_S = 10.0


def test_steps_repeat_until_stopped_and_stop_is_prompt() -> None:
    steps = 0
    three = threading.Event()

    def step() -> None:
        nonlocal steps
        steps += 1
        if steps == 3:
            three.set()

    runner = Periodic("test-repeat", step, 0.01)
    runner.start()
    assert three.wait(_WAIT_S)
    started = time.monotonic()
    runner.stop()
    assert time.monotonic() - started < 1.0
    assert not runner.running
    after = steps
    time.sleep(0.05)
    assert steps == after  # nothing runs once stop returned


def test_the_first_step_runs_at_once_unless_told_to_wait() -> None:
    ran = threading.Event()
    at_once = Periodic("test-at-once", ran.set, 3600.0)
    at_once.start()
    assert ran.wait(_WAIT_S)
    at_once.stop()

    waited = threading.Event()
    later = Periodic("test-later", waited.set, 3600.0, wait_first=True)
    later.start()
    started = time.monotonic()
    later.stop()  # wakes the hour-long wait at once
    assert time.monotonic() - started < 1.0
    assert not waited.is_set()


def test_a_failing_step_is_logged_and_the_next_round_comes(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = 0
    second = threading.Event()

    def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("broken round")
        second.set()

    runner = Periodic("test-failing", step, 0.01)
    with caplog.at_level(logging.ERROR, logger="common.periodic"):
        runner.start()
        assert second.wait(_WAIT_S)
        runner.stop()
    assert any("test-failing failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_step_chooses_the_wait_before_the_next_one() -> None:
    times: list[float] = []
    done = threading.Event()

    def step() -> float:
        times.append(time.monotonic())
        if len(times) == 2:
            done.set()
        return 0.0  # instead of the hour

    runner = Periodic("test-delay", step, 3600.0)
    runner.start()
    assert done.wait(_WAIT_S)
    runner.stop()
    assert times[1] - times[0] < 1.0


def test_on_exit_runs_on_the_thread_before_stop_returns_and_start_works_again() -> None:
    exits: list[str] = []
    ran = threading.Event()
    runner = Periodic("test-exit", ran.set, 3600.0,
                      on_exit=lambda: exits.append(threading.current_thread().name))
    runner.start()
    assert ran.wait(_WAIT_S)
    runner.stop()
    assert exits == ["test-exit"]
    runner.stop()  # idempotent
    assert exits == ["test-exit"]
    ran.clear()
    runner.start()
    assert ran.wait(_WAIT_S)
    runner.stop()
    assert exits == ["test-exit", "test-exit"]


def test_bad_intervals_and_a_second_start_are_refused() -> None:
    for interval in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="interval"):
            Periodic("test-bad", lambda: None, interval)
    runner = Periodic("test-twice", lambda: None, 3600.0, wait_first=True)
    runner.start()
    with pytest.raises(RuntimeError, match="already running"):
        runner.start()
    runner.stop()
