"""A full disk when the agent starts: one line, and nothing left half-written.

Regression for issue 10, items 2 and 8 ("ENOSPC at start"): ``edge-agent serve`` and
``run`` died with a traceback writing the API token or the run file (``agent.json``). Now
an agent that has no token yet cannot create one and says so in one line (exit 1, no empty
token file left to refuse the next start); an agent that has its token serves on, with one
warning that the run file is missing. The disk is really full: a small tmpfs, mounted in a
user and mount namespace of the test's own (``unshare -rm``), filled up.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig, ApiConfig
from agent.config_write import write_config
from tests.agent.bundles import DIGITS

pytestmark = pytest.mark.integration

_AGENT = str(Path(sys.executable).parent / "edge-agent")
_SCRIPT = """
set -eu
mount -t tmpfs -o size=256k tmpfs "$MNT"
mkdir "$MNT/state"
if [ -n "$TOKEN" ]; then (umask 077; echo "$TOKEN" > "$MNT/state/api-token"); fi
dd if=/dev/zero of="$MNT/fill" bs=4k 2>/dev/null || true
set +e
if [ -n "$TOKEN" ]; then  # it should serve: wait for its banner, then stop it
    "$@" >"$OUT" 2>"$ERR" &
    i=0
    while [ ! -s "$OUT" ] && kill -0 $! 2>/dev/null && [ $i -lt 600 ]; do
        sleep 0.1; i=$((i + 1))
    done
    head -n 1 "$OUT"
    kill -TERM $!
    wait $!
    echo "exit $?"
else
    "$@" 2>"$ERR"
    echo "exit $?"
fi
cat "$ERR"
cd "$MNT/state" && find . -type f -exec sh -c 'printf "%s %s\\n" "$1" "$(wc -c < "$1")"' _ {} \\;
"""


def _on_a_full_disk(tmp_path: Path, *command: str, token: str = "") -> list[str]:
    """Run ``command`` (``{state}`` is the state dir) with its state on a full tmpfs; the
    exit line, its stderr and the state dir's files afterwards, with their sizes."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], check=False).returncode != 0:
        pytest.fail("this test needs user namespaces (unshare -rm) to mount a small tmpfs")
    mount = tmp_path / "mnt"
    mount.mkdir()
    args = [arg.replace("{state}", str(mount / "state")) for arg in command]
    result = subprocess.run(["unshare", "-rm", "sh", "-c", _SCRIPT, "sh", *args],
                            env={"MNT": str(mount), "ERR": str(tmp_path / "stderr"),
                                 "OUT": str(tmp_path / "stdout"), "TOKEN": token,
                                 "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_serve_cannot_create_its_token(tmp_path: Path) -> None:
    out = _on_a_full_disk(tmp_path, _AGENT, "serve", "--state-dir", "{state}", "--model",
                          str(DIGITS), "--port", "0")
    assert out[0] == "exit 1"
    assert out[1].startswith("edge-agent: error: cannot create the API token file ")
    assert out[1].endswith("(No space left on device); check that its directory is writable "
                           "and has free space")
    assert out[2:] == []  # one line, and no empty token file left to refuse the next start


@pytest.mark.parametrize("command", ["serve", "run"])
def test_the_agent_serves_without_its_run_file(tmp_path: Path, command: str) -> None:
    config = tmp_path / "agent.toml"
    write_config(config, AgentConfig(tmp_path / "mnt" / "state", api=ApiConfig(port=0)))
    args = (["serve", "--state-dir", "{state}", "--model", str(DIGITS), "--port", "0"]
            if command == "serve" else ["run", "--config", str(config)])
    out = _on_a_full_disk(tmp_path, _AGENT, *args, token="t0ken")
    assert out[0].startswith(f"edge-agent {'serving' if command == 'serve' else 'running'}")
    assert out[1] == "exit 0"
    assert len(out) == 4, out
    assert out[2].startswith("WARNING agent.daemon: cannot write ")
    assert out[2].endswith("agent.json (No space left on device): the other edge-agent "
                           "commands will not find this agent; it serves on")
    assert out[3:] == ["./api-token 6"]  # the run file is not there, nor a temporary file
