"""``kill -9`` of the agent in every install state, then a restart: it serves a good model.

The agent process is killed by SIGKILL right after it persisted each state (the
``EDGEFLEET_AGENT_CRASH_AFTER`` fault-injection hook), which is the worst moment: the record
says the state was entered and none of its work is done. A second test kills a serving
agent from outside while it hot-swaps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.daemon import find_running
from agent.install_state import InstallState
from agent.installer import CRASH_ENV
from agent.model_store import ModelStore
from agent.probation import ProbationPolicy
from agent.runtime import Runtime
from firmware_profiles.model import Profile
from tests.agent.bundles import (
    DIGITS,
    PROFILE,
    digits_spec,
    outputs,
    perturbed_digits,
    samples,
    write_bundle,
)
from tests.bundle.repo import Repo

pytestmark = pytest.mark.integration

S = InstallState
QUICK = ProbationPolicy(window_s=0.0)


def _edge_agent(*args: str | Path, env: dict[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, check=False)


def _serving_correctly(runtime: Runtime) -> int | None:
    x = samples(4)
    got = runtime.infer("digits", {"input": x})["logits"]
    np.testing.assert_allclose(got, outputs(DIGITS.read_bytes(), x), rtol=1e-4, atol=1e-4)
    return runtime.model("digits").version


# Terminal states need no resuming: failed is covered below, committed and rolled back are
# reached only by a serving agent's probation (tests/agent/test_runtime.py restarts after).
@pytest.mark.parametrize("state", [S.DOWNLOADING, S.VERIFYING, S.STAGED, S.ACTIVATING,
                                   S.PROBATION])
def test_kill_9_in_each_install_state_then_restart(state: InstallState, state_dir: Path,
                                                   repo: Repo, tmp_path: Path,
                                                   x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=QUICK)
    runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
    runtime.check_probation()
    v2 = write_bundle(repo, tmp_path, digits_spec(2))

    crashed = _edge_agent("install", v2, "--state-dir", state_dir, "--profile", PROFILE,
                          env={CRASH_ENV: state.value})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr

    restarted = Runtime(state_dir, x86, policy=QUICK)
    # Serving a good model the moment it is back, whichever version that is...
    assert _serving_correctly(restarted) in (1, 2)
    # ...and the interrupted install finishes: v2 was sound, so it ends up committed.
    restarted.resume_installs()
    restarted.check_probation()
    assert _serving_correctly(restarted) == 2
    assert restarted.installer is not None
    assert restarted.installer.pending() == []
    latest = restarted.installer.records()[0]
    assert (latest.version, latest.state) == (2, S.COMMITTED)
    assert ModelStore(state_dir / "models").versions("digits") == [1, 2]
    assert not list((state_dir / "incoming").glob("*"))


def test_kill_9_right_after_a_failed_install(state_dir: Path, repo: Repo, tmp_path: Path,
                                            x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=QUICK)
    runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
    runtime.check_probation()
    bad = write_bundle(repo, tmp_path, digits_spec(2, perturbed_digits(),
                                                   golden_from=DIGITS.read_bytes()))
    crashed = _edge_agent("install", bad, "--state-dir", state_dir, "--profile", PROFILE,
                          env={CRASH_ENV: "failed"})
    assert crashed.returncode == -signal.SIGKILL
    restarted = Runtime(state_dir, x86, policy=QUICK)
    restarted.resume_installs()
    assert _serving_correctly(restarted) == 1
    assert restarted.installer is not None
    assert restarted.installer.pending() == []
    assert restarted.installer.records()[0].reason == "self_test_failed"


def test_a_model_that_crashes_the_agent_on_activation_is_given_up(
        state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=QUICK)
    runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
    runtime.check_probation()
    v2 = write_bundle(repo, tmp_path, digits_spec(2))
    assert _edge_agent("install", v2, "--state-dir", state_dir, "--profile", PROFILE,
                       env={CRASH_ENV: "activating"}).returncode == -signal.SIGKILL
    # Every restart dies again while activating v2, as a crashing model would make it.
    script = ("import sys; from pathlib import Path; from agent.runtime import Runtime; "
              "from firmware_profiles import get_profile; "
              f"Runtime(Path(sys.argv[1]), get_profile({PROFILE!r})).resume_installs()")
    for _ in range(2):
        again = subprocess.run([sys.executable, "-c", script, str(state_dir)],
                               env={**os.environ, CRASH_ENV: "activating"}, check=False,
                               capture_output=True, timeout=120)
        assert again.returncode == -signal.SIGKILL
    restarted = Runtime(state_dir, x86, policy=QUICK)
    restarted.resume_installs()
    assert _serving_correctly(restarted) == 1
    assert restarted.installer is not None
    latest = restarted.installer.records()[0]
    assert (latest.version, latest.state, latest.reason) == (2, S.FAILED, "crash_loop")


def test_serving_agent_killed_during_a_hot_swap_comes_back_serving(
        state_dir: Path, repo: Repo, tmp_path: Path) -> None:
    v1 = write_bundle(repo, tmp_path, digits_spec(1))
    v2 = write_bundle(repo, tmp_path, digits_spec(2))

    log = tmp_path / "agent.log"

    def serve() -> subprocess.Popen[str]:
        with log.open("a") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "agent", "serve", "--state-dir", str(state_dir),
                 "--profile", PROFILE, "--port", "0", "--probation", "3600"],
                stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert process.stdout is not None
        with process.stdout:
            assert "edge-agent serving" in process.stdout.readline(), log.read_text()
        return process

    agent = serve()
    try:
        running = find_running(state_dir)
        assert running is not None
        with running.client() as client:
            assert client.install(v1)["state"] == "probation"
            second = client.install(v2)
            assert second["state"] == "probation", (second["reason"], second["detail"])
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=30)
        agent = serve()
        running = find_running(state_dir)
        assert running is not None
        assert running.pid == agent.pid
        with running.client() as client:
            # Serving at once (the last good version first), the install resumed behind it.
            assert client.status()["models"][0]["version"] == 2
            deadline = time.monotonic() + 60
            while (status := client.status())["models"][0]["state"] != "probation":
                assert time.monotonic() < deadline, status  # resumed, not skipped
                time.sleep(0.05)
            assert status["models"][0]["version"] == 2
            assert status["installs"][1]["state"] == "committed"
            assert "superseded by v2" in status["installs"][1]["detail"]
            assert client.infer("digits", {"input": samples(1)})["logits"].shape == (1, 10)
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert find_running(state_dir) is None



def test_clean_stops_and_offline_installs_never_roll_back_a_model_on_probation(
        state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile) -> None:
    watching = ProbationPolicy(window_s=3600.0)  # v1 stays on probation throughout
    runtime = Runtime(state_dir, x86, policy=watching)
    runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
    runtime.close()
    empty = tmp_path / "empty.efb"
    empty.write_bytes(b"")
    for _ in range(3):  # each offline install starts the agent's state and stops it cleanly
        refused = _edge_agent("install", empty, "--state-dir", state_dir, "--profile",
                              PROFILE)
        assert refused.returncode == 1, refused.stderr
        again = Runtime(state_dir, x86, policy=watching)
        again.resume_installs()
        again.close()
    restarted = Runtime(state_dir, x86, policy=watching)
    restarted.resume_installs()
    assert _serving_correctly(restarted) == 1
    assert restarted.installer is not None
    v1 = next(r for r in restarted.installer.records() if r.version == 1)
    assert (v1.state, v1.restarts) == (S.PROBATION, 0)
