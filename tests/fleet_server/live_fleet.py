"""A whole fleet as separate processes, driven the way an operator and installers drive it:
``fleet keys init``, ``fleet serve`` (embedded Mosquitto, HTTPS API), ``fleet`` operator
commands, ``edge-agent enroll`` and ``edge-agent run``. For end-to-end tests of what only
the whole fleet shows (take-over, encryption to recipients, rollback).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.client import AgentClient
from agent.daemon import find_running
from fleet_server.api_client import ServerClient, locate
from tests.mqtt_broker import require_mosquitto

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
PROFILE = "x86-64-avx2"
GROUP = "lab"
WAIT_S = 60.0


@dataclass
class LiveFleet:
    """Keys, a running ``fleet serve`` and the agents started so far, under ``home``."""

    home: Path
    #: Extra ``fleet serve`` arguments.
    serve_args: tuple[str, ...] = ()
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def keys(self) -> Path:
        return self.home / "keys"

    @property
    def data(self) -> Path:
        return self.home / "server"

    @property
    def api(self) -> ServerClient:
        return locate(None, self.data)

    def fleet(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``fleet ARGS`` (server commands get ``--data`` from the caller)."""
        return _run([sys.executable, "-m", "fleet_server", *map(str, args)], check)

    def agent(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``edge-agent ARGS``."""
        return _run([sys.executable, "-m", "agent", *map(str, args)], check)

    def serve(self) -> None:
        """``fleet serve`` in the background, with the whole keys directory (the server
        signs re-releases with its online keys)."""
        self._start("server", [sys.executable, "-m", "fleet_server", "serve", "--data",
                               self.data, "--keys", self.keys, "--fleet", "live", "--port",
                               "0", "--mqtt-port", "0", "--mqtt-bind", "127.0.0.1",
                               *self.serve_args],
                    (self.data / "server.json").exists)

    def build(self, version: int, model: Path, *extra: str | Path) -> Path:
        """``fleet bundle build`` of ``model`` as digits ``version``; the bundle file."""
        out = self.home / f"digits-{version}.efb"
        self.fleet("bundle", "build", "--name", "digits", "--version", str(version),
                   "--model", model, "--profile", PROFILE, "--keys", self.keys, "--out", out,
                   *extra)
        return out

    def token(self, *args: str) -> str:
        """A token from ``fleet enroll-token ARGS``."""
        return self.fleet("enroll-token", "--data", self.data, *args).stdout.strip()

    def state(self, device: str) -> Path:
        return self.home / device

    def enroll(self, device: str, token: str, *, state: Path | None = None,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        """``edge-agent enroll`` of ``device`` into ``state`` (default: home/DEVICE)."""
        return self.agent("enroll", "--server", self.api.url, f"--token={token}",
                          "--device-id", device, "--state-dir", state or self.state(device),
                          "--profile", PROFILE, "--port", "0", "--probation", "1",
                          "--telemetry-interval", "2", check=check)

    def run_agent(self, name: str, state: Path) -> None:
        """``edge-agent run`` from ``state`` in the background, known as ``name``."""
        self._start(name, [sys.executable, "-m", "agent", "run", "--config",
                           state / "agent.toml"], lambda: find_running(state) is not None)

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")

    def devices(self) -> dict[str, dict[str, Any]]:
        """Every device as the API shows it, by id."""
        return {d["id"]: d for d in self.api.get("/api/devices")["devices"]}

    def infer(self, state: Path, x: np.ndarray) -> np.ndarray:
        """The running agent's answer for ``x`` through its local API."""
        running = find_running(state)
        assert running is not None, f"no agent runs from {state}"
        with running.client(timeout=10) as client:
            assert isinstance(client, AgentClient)
            return client.infer("digits", {"input": x})["logits"]

    def wait(self, condition: Callable[[], object], what: str,
             timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}.log ---\n{self.log(n)[-3000:]}"
                                 for n in self.processes)
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                     f"{logs}")
            time.sleep(0.2)

    def close(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)

    def _start(self, name: str, argv: list[Any], ready: Callable[[], bool]) -> None:
        with (self.home / f"{name}.log").open("wb") as log:
            process = subprocess.Popen([str(a) for a in argv], cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT)
        self.processes[name] = process
        self.wait(lambda: process.poll() is None and ready(), f"{name} to start")


@contextmanager
def live_fleet(home: Path, *serve_args: str) -> Iterator[LiveFleet]:
    """Keys made, ``fleet serve ARGS`` running; everything stopped on exit."""
    require_mosquitto()
    fleet = LiveFleet(home, serve_args)
    try:
        fleet.fleet("keys", "init", "--dir", fleet.keys)
        fleet.serve()
        yield fleet
    finally:
        fleet.close()


def converged(fleet: LiveFleet, devices: list[str], version: int) -> Callable[[], bool]:
    """Whether every one of ``devices`` runs digits ``version`` as desired, committed."""
    def check() -> bool:
        known = fleet.devices()
        return all(d in known and known[d]["converged"]
                   and known[d]["desired"].get("digits", {}).get("version") == version
                   for d in devices)
    return check


def _run(argv: list[str], check: bool) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n"
                             f"{done.stderr}")
    return done


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
