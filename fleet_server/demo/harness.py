"""What every act of ``fleet demo`` uses: :class:`Demo` (numbered steps, the commands it
runs and the processes it starts), the agents, and the fleet's state as the operator API
shows it."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_server.api_client import ServerClient
from fleet_server.errors import FleetError

__all__ = ["GROUP", "Agent", "Demo", "DemoError", "converged", "group_devices", "install_of",
           "predict", "table", "tool", "write_samples"]

#: The group every demo device enrolls into.
GROUP = "demo"
_WAIT_S = 60.0


class DemoError(FleetError):
    """A demo step did not behave as the demo expects."""


def tool(name: str) -> str:
    """The console script installed beside this interpreter (the demo's own venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class Demo:
    """The demo's run: numbered steps, the commands it runs (output shown indented) and
    the long-running processes it started, stopped by :meth:`stop_all`."""

    def __init__(self, workdir: Path, models: Path) -> None:
        self.workdir = workdir
        self.models = models
        self.step = 0
        self.started = time.monotonic()
        self.processes: list[subprocess.Popen[bytes]] = []

    def title(self, text: str) -> None:
        """Begin the next numbered step."""
        self.step += 1
        print(f"\n[{self.step}] {text}", flush=True)

    def run(self, argv: list[str], *, expect_success: bool = True, show: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        """Run a command, show its output; DemoError if it fails (or, with
        ``expect_success=False``, succeeds)."""
        print(f"    $ {shlex.join([Path(argv[0]).name, *argv[1:]])}", flush=True)
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        for line in (result.stdout + result.stderr if show else result.stderr).splitlines():
            print(f"    {line}")
        if (result.returncode == 0) != expect_success:
            raise DemoError(f"step {self.step}: `{shlex.join(argv)}` exited "
                            f"{result.returncode}, which the demo did not expect; see above")
        return result

    def start(self, argv: list[str], log: Path, ready: Callable[[], bool], what: str) -> None:
        """Start a long-running process and wait until ``ready``."""
        print(f"    $ {shlex.join([Path(argv[0]).name, *argv[1:]])} &  (log: {log.name})",
              flush=True)
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        self.wait(lambda: process.poll() is None and ready(), what,
                  lambda: f"its log {log} says:\n{log.read_text(errors='replace')[-2000:]}")

    def wait(self, condition: Callable[[], bool], what: str,
             explain: Callable[[], str] = lambda: "", timeout: float = _WAIT_S) -> None:
        """Poll ``condition`` until it holds; DemoError naming ``what`` (and ``explain()``)
        after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise DemoError(f"step {self.step}: timed out after {timeout:.0f} s waiting for "
                        f"{what}. {explain()}")

    def stop_all(self) -> None:
        """SIGTERM every process started, newest first, and wait for each."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass(frozen=True)
class Agent:
    """One demo device: its id, the profile it claims and its state directory."""

    device: str
    profile: str
    state_dir: Path


def group_devices(api: ServerClient) -> list[dict[str, Any]]:
    """The demo group's devices as ``GET /api/devices`` shows them."""
    devices: list[dict[str, Any]] = api.get("/api/devices", {"group": GROUP})["devices"]
    return devices


def install_of(device: dict[str, Any]) -> dict[str, Any]:
    """The install of the digits model the device last reported ({} if none)."""
    installs: dict[str, Any] = (device.get("reported") or {}).get("installs", {})
    install: dict[str, Any] = installs.get("digits", {})
    return install


def converged(demo: Demo, api: ServerClient, version: int) -> None:
    """Wait until every device reports ``version`` of digits committed."""
    def done() -> bool:
        devices = group_devices(api)
        return bool(devices) and all(
            d["converged"] and d["desired"]["digits"]["version"] == version for d in devices)

    demo.wait(done, f"every device to report v{version} committed",
              lambda: json.dumps([(d["id"], d.get("reported")) for d in group_devices(api)]))


def table(demo: Demo, fleet: list[str]) -> None:
    """Show ``fleet devices``."""
    demo.run([tool("fleet"), "devices", *fleet])


def predict(demo: Demo, agent: Agent, x: Path) -> None:
    """One ``edge-agent predict`` through ``agent``'s local API; shows its first line."""
    result = demo.run([tool("edge-agent"), "predict", "digits", "--input", str(x),
                       "--state-dir", str(agent.state_dir)], show=False)
    print(f"    {agent.device}: {result.stdout.splitlines()[0]}")


def write_samples(data: Path, out: Path, count: int = 3) -> None:
    """``count`` eval images as a .npy file, without importing numpy into the server."""
    subprocess.run([sys.executable, "-c", "import numpy, sys; numpy.save(sys.argv[2], "
                    "numpy.load(sys.argv[1])['eval_x'][:int(sys.argv[3])])", str(data),
                    str(out), str(count)], check=True)

