"""``edge-agent serve``, ``predict``, ``status`` and ``install`` as an operator runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.agent.bundles import DIGITS, PROFILE, digits_spec, samples, write_bundle
from tests.bundle.repo import Repo

pytestmark = pytest.mark.integration


def _agent(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *map(str, args)], check=False,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    state = tmp_path / "state"
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "serve", "--model", str(DIGITS), "--name", "digits",
         "--state-dir", str(state), "--profile", PROFILE, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    with process.stdout:
        banner = process.stdout.readline()
    assert "edge-agent serving digits v- (onnxruntime:CPUExecutionProvider)" in banner
    assert f"token in {state / 'api-token'}" in banner
    yield process, state
    if process.poll() is None:
        process.kill()
        process.wait()


def test_predict_status_and_clean_shutdown(served: tuple[subprocess.Popen[str], Path],
                                           tmp_path: Path) -> None:
    process, state = served
    x = tmp_path / "x.npy"
    np.save(x, samples(3))
    predicted = _agent("predict", "digits", "--input", x, "--state-dir", state, "--json")
    assert predicted.returncode == 0, predicted.stderr
    logits = np.array(json.loads(predicted.stdout)["logits"])
    assert logits.argmax(1).tolist() == [1, 4, 5]
    human = _agent("predict", "digits", "--input", f"input={x}", "--state-dir", state)
    assert "logits: float32[3, 10]  argmax per row: [1, 4, 5]" in human.stdout

    status = _agent("status", "--state-dir", state, "--json")
    assert status.returncode == 0, status.stderr
    parsed = json.loads(status.stdout)
    assert parsed["running"] is True
    assert parsed["models"][0]["requests"] == 2

    wrong = _agent("predict", "digits", "--input", tmp_path / "missing.npy", "--state-dir",
                   state)
    assert wrong.returncode == 1
    assert "cannot read" in wrong.stderr

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert not (state / "agent.json").exists()
    offline = _agent("status", "--state-dir", state)
    assert offline.stdout.startswith("agent: not running")


def test_install_into_a_state_dir_then_serve_it(tmp_path: Path) -> None:
    repo = Repo()
    root = tmp_path / "root.json"
    root.write_bytes(repo.root)
    state = tmp_path / "state"
    bundle = write_bundle(repo, tmp_path, digits_spec(1))
    installed = _agent("install", bundle, "--state-dir", state, "--root", root,
                       "--profile", PROFILE)
    assert installed.returncode == 0, installed.stderr
    assert "installed digits v1 into" in installed.stdout
    status = _agent("status", "--state-dir", state)
    assert "digits" in status.stdout
    assert "probation" in status.stdout  # watched once an agent serves it

    tampered = tmp_path / "t.efb"
    tampered.write_bytes(bundle.read_bytes()[:-40] + b"\0" * 40)
    refused = _agent("install", tampered, "--state-dir", state, "--profile", PROFILE)
    assert refused.returncode == 1
    assert "install failed: rejected:" in refused.stderr

    no_agent = _agent("predict", "digits", "--input", "x.npy", "--state-dir", state)
    assert no_agent.returncode == 1
    assert "no agent is running from" in no_agent.stderr


def test_detach_returns_once_serving_and_stop_ends_the_agent(tmp_path: Path) -> None:
    state = tmp_path / "state"
    started = _agent("serve", "--model", DIGITS, "--name", "digits", "--state-dir", state,
                     "--profile", PROFILE, "--port", "0", "--detach")
    assert started.returncode == 0, started.stderr
    assert "edge-agent started in the background" in started.stdout
    # Ready means ready: the very next command finds the agent and is answered.
    status = _agent("status", "--state-dir", state, "--json")
    assert json.loads(status.stdout)["running"] is True
    assert "edge-agent serving digits" in (state / "agent.log").read_text()
    # A second agent on the same state directory is refused, whatever its port, and leaves
    # the first one's run file alone.
    pid = json.loads((state / "agent.json").read_text())["pid"]
    second = _agent("serve", "--state-dir", state, "--profile", PROFILE, "--port", "0")
    assert second.returncode == 1
    assert f"another agent (pid {pid}) serves from {state}" in second.stderr
    assert json.loads((state / "agent.json").read_text())["pid"] == pid
    stopped = _agent("stop", "--state-dir", state)
    assert stopped.returncode == 0
    assert "stopped the agent" in stopped.stdout
    assert not (state / "agent.json").exists()
    again = _agent("stop", "--state-dir", state)
    assert again.returncode == 0
    assert "no agent runs from" in again.stdout


def test_detach_reports_why_the_agent_did_not_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    bad = tmp_path / "bad.efb"
    bad.write_bytes(b"not a bundle at all")
    failed = _agent("serve", "--model", bad, "--state-dir", state, "--profile", PROFILE,
                    "--port", "0", "--detach")
    assert failed.returncode == 1
    assert "exited with code 1 before serving" in failed.stderr
    assert "bad.efb" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
