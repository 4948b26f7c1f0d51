"""Rollouts through a real ``fleet serve`` process (embedded Mosquitto, SQLite or
PostgreSQL) with devices on real MQTT clients: the operator commands, a halt at the canary,
and a server killed with ``kill -9`` mid-rollout that resumes on restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_server.api_client import locate
from fleet_server.cli import main
from tests.bundle.repo import Repo, spec
from tests.fleet_server.rollouts.fake_agents import AgentLoop, FakeAgent, enroll_agent
from tests.fleet_server.server_env import wait_until, write_keys
from tests.mqtt_broker import require_mosquitto

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
PROFILES = ("x86-avx2", "arm64-neon")


class Server:
    """``fleet serve`` as a child process, restartable."""

    def __init__(self, tmp_path: Path, db_url: str, repo: Repo) -> None:
        require_mosquitto()
        self.tmp, self.db_url = tmp_path, db_url
        self.data, self.keys = tmp_path / "server", write_keys(tmp_path / "keys", repo)
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with (self.tmp / "serve.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fleet_server", "serve", "--data", str(self.data),
                 "--keys", str(self.keys), "--db", self.db_url, "--port", "0",
                 "--mqtt-port", "0", "--mqtt-bind", "127.0.0.1", "--rollout-tick", "0.5"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        process = self.process
        wait_until(lambda: self._up() or process.poll() is not None, "fleet serve", 30)
        assert process.poll() is None, (self.tmp / "serve.log").read_text()

    def _up(self) -> bool:
        try:
            info = json.loads((self.data / "server.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(info.get("pid") == (self.process.pid if self.process else None))

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
        code = main([str(a) for a in argv] + ["--data", str(self.data)])
        out, err = capsys.readouterr()
        return code, out + err

    def status(self, rollout: str) -> dict[str, Any]:
        return dict(locate(None, self.data).get(f"/api/rollouts/{rollout}"))


@pytest.fixture
def server(tmp_path: Path, db_url: str, repo: Repo) -> Iterator[Server]:
    started = Server(tmp_path, db_url, repo)
    try:
        yield started
    finally:
        started.close()


def _fleet(server: Server, n: int, behaviour: Any = None) -> list[FakeAgent]:
    api = locate(None, server.data)
    info = json.loads((server.data / "server.json").read_text())
    agents = []
    for i in range(n):
        token = api.post("/api/enroll-tokens", {"group": "lab"})["token"]
        agent = enroll_agent(info["api_url"], Path(info["ca_file"]), token, f"gw-{i}",
                             home=server.tmp / f"gw-{i}", profile=PROFILES[i % 2],
                             **({"behaviour": behaviour} if behaviour else {}))
        agent.connect()
        agents.append(agent)
    return agents


def _bundle(tmp: Path, repo: Repo, version: int) -> Path:
    path = tmp / f"digits-{version}.efb"
    path.write_bytes(repo.build(spec("digits", version)))
    return path


def test_a_good_version_survives_kill_9_and_succeeds(server: Server, repo: Repo,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    agents = _fleet(server, 6)
    loop = AgentLoop(agents)
    try:
        code, out = server.run(capsys, "publish", _bundle(server.tmp, repo, 1), "--group",
                               "lab")
        assert code == 0, out
        wait_until(lambda: all(a.version == 1 for a in agents), "v1 everywhere", 30)
        code, out = server.run(capsys, "rollout", "start", _bundle(server.tmp, repo, 2),
                               "--group", "lab", "--steps", "30,100", "--bake", "2s",
                               "--gate", "agreement>=0.9", "--min-reporting", "1")
        assert code == 0, out
        rollout = out.strip()
        assert rollout.startswith("r-")
        first = server.status(rollout)
        assert first["state"] == "running"
        assert first["step"] == "30%"
        canary = set(first["devices_in_step"])
        assert len(canary) == 2  # one device of each profile
        wait_until(lambda: {a.id for a in agents if a.version == 2} == canary, "canary on v2",
                   30)
    finally:
        loop.close()
    # The server dies mid-step; the devices lose their broker with it.
    server.kill9()
    for agent in agents:
        agent.close()
    server.start()
    for agent in agents:
        agent.connect()
    loop = AgentLoop(agents)
    try:
        code, out = server.run(capsys, "rollout", "status", rollout, "--wait")
        assert code == 0, out
        assert "SUCCEEDED" in out
    finally:
        loop.close()
    view = server.status(rollout)
    assert [s["verdict"] for s in view["steps"]] == ["passed", "passed"]
    assert view["steps"][1]["required"] == 6  # every device (--min-reporting 1)
    assert {g["metric"]: g["status"] for g in view["steps"][0]["gates"]}["agreement"] == "pass"
    assert all(a.version == 2 for a in agents)
    desired = {a.id: a.desired() for a in agents}
    assert all(d is not None and d.version == 2 and d.compare_previous == 0.0
               for d in desired.values())
    code, out = server.run(capsys, "audit", "verify")
    assert code == 0, out
    code, out = server.run(capsys, "audit", "--json")
    actions = [e["action"] for e in json.loads(out)["entries"]]
    assert actions[:2] == ["keys.rotated", "enroll"]  # the root recorded at first start
    assert {"publish", "bundle.upload", "rollout.started", "rollout.step",
            "rollout.succeeded"} <= set(actions)
    for agent in agents:
        agent.close()


def test_a_failing_install_halts_at_the_canary(server: Server, repo: Repo,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    agents = _fleet(server, 8, behaviour=lambda v: (v == 3, 1.0))
    loop = AgentLoop(agents)
    try:
        code, out = server.run(capsys, "publish", _bundle(server.tmp, repo, 1), "--group",
                               "lab")
        assert code == 0, out
        wait_until(lambda: all(a.version == 1 for a in agents), "v1 everywhere", 30)
        code, out = server.run(capsys, "rollout", "start", _bundle(server.tmp, repo, 3),
                               "--group", "lab", "--bake", "60s", "--json")
        assert code == 0, out
        rollout = json.loads(out)["id"]
        code, out = server.run(capsys, "rollout", "status", rollout, "--wait")
        assert code == 1, out
        assert "HALTED" in out
        assert "install_failures" in out
        view = server.status(rollout)
        canary = set(view["steps"][0]["devices"])
        assert len(canary) == 2
        # The canary devices were told v3, then v1 again; nobody else ever heard of v3.
        wait_until(lambda: all(a.desired_seen[-1:] == [1] for a in agents), "v1 desired", 30)
        assert {a.id for a in agents if 3 in a.desired_seen} == canary
        assert all(a.version == 1 for a in agents)
        halted = [e for e in locate(None, server.data).get("/api/events")["events"]
                  if e["kind"] == "rollout.halted"]
        assert len(halted) == 1
        assert halted[0]["detail"]["gate"] == "install_failures<=0.05"
        assert halted[0]["detail"]["n"] in (1, 2)  # one failed canary may be enough
        code, out = server.run(capsys, "rollout", "resume", rollout)
        assert code == 1
        assert "halted" in out
        code, out = server.run(capsys, "rollout", "list")
        assert code == 0
        assert out.startswith(f"{rollout}  digits v3  halted    at 5%")
        assert "2/8 devices  group:lab" in out
        code, out = server.run(capsys, "rollout", "status")  # the newest
        assert code == 0
        assert out.startswith(f"rollout {rollout}: digits v3 to group:lab (8 devices): "
                              "HALTED at 5%")
    finally:
        loop.close()
        for agent in agents:
            agent.close()


def test_the_demo_rollouts_with_contract_telemetry(server: Server, repo: Repo,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's two rollouts, with devices reporting ``previous``/``shadow`` as the
    monitoring contract says: a model that disagrees (v2) is halted at the canary by the
    agreement gate; a good one (v3) goes shadow -> canary -> 100%."""
    agents = _fleet(server, 3, behaviour=lambda v: (False, 0.8 if v == 2 else 1.0))
    shadowed: set[str] = set()
    loop = AgentLoop(agents)
    try:
        code, out = server.run(capsys, "publish", _bundle(server.tmp, repo, 1), "--group",
                               "lab")
        assert code == 0, out
        wait_until(lambda: all(a.version == 1 for a in agents), "v1 everywhere", 30)
        code, out = server.run(capsys, "rollout", "start", _bundle(server.tmp, repo, 2),
                               "--group", "lab", "--steps", "34,100", "--bake", "20s")
        rollout = out.strip()
        code, out = server.run(capsys, "rollout", "status", rollout, "--wait")
        assert code == 1, out
        view = server.status(rollout)
        assert view["reason"]["gate"] == "agreement>=0.98"
        assert view["reason"]["value"] == pytest.approx(0.8, abs=0.02)
        canary = set(view["steps"][0]["devices"])
        assert len(canary) == 2  # one of each profile
        wait_until(lambda: all(a.version == 1 for a in agents), "v1 again", 30)
        assert {a.id for a in agents if 2 in a.served} == canary

        code, out = server.run(capsys, "rollout", "start", _bundle(server.tmp, repo, 3),
                               "--group", "lab", "--shadow", "3s", "--steps", "34,100",
                               "--bake", "2s")
        rollout = out.strip()

        def in_shadow() -> bool:
            for agent in agents:
                want = agent.desired()
                if want is not None and want.shadow is not None:
                    shadowed.add(agent.id)
            return bool(server.status(rollout)["phase"] != "shadow")

        wait_until(in_shadow, "the shadow phase to end", 60)
        code, out = server.run(capsys, "rollout", "status", rollout, "--wait")
        assert code == 0, out
    finally:
        loop.close()
        for agent in agents:
            agent.close()
    view = server.status(rollout)
    assert [s["name"] for s in view["steps"]] == ["shadow", "34%", "100%"]
    assert [s["verdict"] for s in view["steps"]] == ["passed"] * 3
    assert shadowed == set(view["steps"][0]["devices"])
    assert all(a.version == 3 for a in agents)
