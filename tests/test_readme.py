"""The README's tour runs as written: every ``sh`` block of "A short tour", in order, in one
shell, from a scratch directory laid out like the checkout (its ``.venv`` and ``models``).

The tour uses the default ports (agent API 8470, operator API 8780, MQTT 8883), as a user's
first run does, so the test needs them free.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.defaults import AGENT_API_PORT, MQTTS_PORT, SERVER_API_PORT

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def tour_script(readme: str) -> str:
    """The tour's shell blocks, joined into one script that stops at the first failure."""
    start = readme.index("## A short tour")
    end = readme.find("\n## ", start + 1)
    section = readme[start:end if end != -1 else None]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert blocks, "the README's tour has no sh blocks"
    return "set -euo pipefail\n" + "\n".join(blocks)


def test_the_tour_is_every_sh_block_of_its_section() -> None:
    script = tour_script("intro\n## A short tour\ntext\n```sh\na\n```\n```sh\nb\n```\n"
                         "## Layout\n```sh\nc\n```\n")
    assert script == "set -euo pipefail\na\n\nb\n"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kill_leftovers(workdir: Path) -> list[str]:
    """Stop whatever the tour left running; the run files name the processes."""
    left = []
    for run_file in ("tour/device/agent.json", "tour/gw1/agent.json", "tour/srv/server.json"):
        try:
            pid = int(json.loads((workdir / run_file).read_text())["pid"])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            continue
        left.append(run_file)
    return left


def test_the_readme_tour_runs_as_written(tmp_path: Path) -> None:
    busy = [p for p in (AGENT_API_PORT, SERVER_API_PORT, MQTTS_PORT) if not _port_free(p)]
    assert not busy, f"the tour needs the default ports; in use: {busy}"
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "models").symlink_to(ROOT / "models")
    script = tour_script((ROOT / "README.md").read_text(encoding="utf-8"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EDGEFLEET_") and k != "VIRTUAL_ENV"}
    try:
        done = subprocess.run(["bash", "-c", script], check=False, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        leftovers = _kill_leftovers(tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert not leftovers, f"the tour's stop commands left these running: {leftovers}"
    assert "Traceback" not in out, out[-4000:]
    for expected in ("argmax per row", "installed digits v2 into the running agent",
                     "stopped the agent", "rolled back 1 device(s)",
                     "stopped the fleet server"):
        assert expected in out, f"{expected!r} missing from the tour's output:\n{out[-4000:]}"
