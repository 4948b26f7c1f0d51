"""A model session in a child process (agent/side_process.py): same answers as in-process,
one round trip per batch, a failure of the child reported per request, never raised into
the side thread, and the child gone once the session is closed or dropped."""

from __future__ import annotations

import gc
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ModelLoadError
from agent.sessions import open_session
from agent.side_process import MovingSession, ProcessSession, run_many

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.onnx"


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    x = np.load(ROOT / "models" / "digits_data.npz")["eval_x"].astype(np.float32)
    return [{"input": x[i:i + 1]} for i in range(count)]


def _gone(pid: int, within: float = 5.0) -> bool:
    """Whether process ``pid`` ended (exited or a zombie) within ``within`` seconds."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if stat.read_text().split()[2] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_a_batch_runs_in_the_child_and_answers_as_in_process() -> None:
    local = open_session(DIGITS, "onnx", threads=1)
    remote = ProcessSession(DIGITS, "onnx", threads=1)
    try:
        assert remote.pid is not None
        assert remote.pid != os.getpid()
        assert remote.inputs == local.inputs
        assert remote.outputs == local.outputs
        assert remote.backend == local.backend
        feeds = _feeds(16)
        results = run_many(remote, feeds)
        assert len(results) == 16
        for one, (outputs, error, took_ms) in zip(feeds, results, strict=True):
            assert error is None
            assert outputs is not None
            np.testing.assert_allclose(outputs[0], local.run(one)[0], rtol=1e-5, atol=1e-6)
            assert took_ms > 0
        np.testing.assert_allclose(remote.run(feeds[0])[0], local.run(feeds[0])[0],
                                   rtol=1e-5, atol=1e-6)
    finally:
        remote.close()


def test_a_failed_request_is_reported_with_its_reason_and_the_others_run() -> None:
    remote = ProcessSession(DIGITS, "onnx", threads=1)
    try:
        good = _feeds(1)[0]
        bad = {"input": np.zeros((1, 3), np.float32)}
        results = run_many(remote, [good, bad, good])
        assert [r[1] is None for r in results] == [True, False, True]
        assert results[1][0] is None
        assert results[1][1]
        with pytest.raises(ModelLoadError):
            remote.run(bad)
    finally:
        remote.close()


def test_a_model_the_child_cannot_open_is_a_load_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        ProcessSession(broken, "onnx", threads=1)


def test_a_dead_child_fails_each_run_without_raising() -> None:
    remote = ProcessSession(DIGITS, "onnx", threads=1)
    pid = remote.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert _gone(pid)
    results = run_many(remote, _feeds(3))
    assert len(results) == 3
    assert all(outputs is None and error for outputs, error, _ in results)
    remote.close()


def test_a_silent_child_is_stopped_after_the_timeout() -> None:
    remote = ProcessSession(DIGITS, "onnx", threads=1, timeout=30.0)
    pid = remote.pid
    assert pid is not None
    remote._timeout = 0.5  # the model opened; now a child that never answers
    os.kill(pid, signal.SIGSTOP)
    try:
        results = run_many(remote, _feeds(2))
        assert all(outputs is None and "within 0.5 s" in (error or "")
                   for outputs, error, _ in results)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _gone(pid)
    remote.close()


@pytest.mark.parametrize("how", ["close", "dropped"])
def test_the_child_ends_with_the_session(how: str) -> None:
    remote = ProcessSession(DIGITS, "onnx", threads=1)
    pid = remote.pid
    assert pid is not None
    if how == "close":
        remote.close()
    else:
        del remote
        gc.collect()
    assert _gone(pid)


def _moved(session: MovingSession, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    while not session.moved and time.monotonic() < deadline:
        time.sleep(0.05)
    return session.moved


def test_a_moving_session_runs_here_until_its_child_opened_then_there() -> None:
    local = open_session(DIGITS, "onnx", threads=1)
    moving = MovingSession(local, DIGITS, "onnx")
    feeds = _feeds(4)
    expected = [local.run(one)[0] for one in feeds]
    for (outputs, error, _), want in zip(run_many(moving, feeds), expected, strict=True):
        assert error is None  # here or there, the answers are the same
        assert outputs is not None
        np.testing.assert_allclose(outputs[0], want, rtol=1e-5, atol=1e-6)
    assert _moved(moving)
    remote = moving._remote
    assert remote is not None
    pid = remote.pid
    assert pid is not None
    for (outputs, _, _), want in zip(run_many(moving, feeds), expected, strict=True):
        assert outputs is not None
        np.testing.assert_allclose(outputs[0], want, rtol=1e-5, atol=1e-6)
    os.kill(pid, signal.SIGKILL)  # the child dies: runs come back here
    assert _gone(pid)
    results = run_many(moving, feeds)
    assert [error for _, error, _ in results] == [None] * len(results)
    moving.close()


def test_a_moving_session_whose_child_cannot_open_stays_here(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    moving = MovingSession(open_session(DIGITS, "onnx", threads=1), broken, "onnx")
    time.sleep(3.0)  # long enough for the child to have failed (a success would show)
    assert not moving.moved
    assert all(error is None for _, error, _ in run_many(moving, _feeds(2)))


def test_the_child_runs_at_the_side_priority_from_its_start() -> None:
    from agent.side_process import SIDE_NICE

    remote = ProcessSession(DIGITS, "onnx", threads=1)
    try:
        assert remote.pid is not None
        # Field 19 of /proc/PID/stat is the nice value (after the command in parentheses).
        fields = Path(f"/proc/{remote.pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(fields[16]) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + SIDE_NICE)
    finally:
        remote.close()


def test_a_moving_session_waits_its_delay_and_a_close_meanwhile_spawns_nothing() -> None:
    local = open_session(DIGITS, "onnx", threads=1)
    waiting = MovingSession(local, DIGITS, "onnx", delay_s=3600.0)
    time.sleep(1.0)
    assert not waiting.moved  # still waiting out an install's probation: runs stay here
    assert all(error is None for _, error, _ in run_many(waiting, _feeds(2)))
    waiting.close()
    assert not waiting.moved
    delayed = MovingSession(local, DIGITS, "onnx", delay_s=0.5)
    try:
        assert _moved(delayed)
    finally:
        delayed.close()
