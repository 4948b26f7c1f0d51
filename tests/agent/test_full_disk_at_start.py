"""A full disk when the agent starts: one line, exit 1, nothing left half-written.

Regression for issue 10, item 8 ("ENOSPC at start"): ``edge-agent serve`` and ``run`` died
with a traceback writing the API token or the run file, and an interrupted token write left
an empty token file that every later start refused. The disk is really full: a small tmpfs,
mounted in a user and mount namespace of the test's own (``unshare -rm``), filled up.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig, write_config
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
"$@" 2>"$ERR"
echo "exit $?"
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
                            env={"MNT": str(mount), "ERR": str(tmp_path / "stderr"), "TOKEN": token,
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
def test_the_agent_cannot_announce_itself(tmp_path: Path, command: str) -> None:
    config = tmp_path / "agent.toml"
    write_config(config, AgentConfig(tmp_path / "mnt" / "state"))
    args = (["serve", "--state-dir", "{state}", "--model", str(DIGITS), "--port", "0"]
            if command == "serve" else ["run", "--config", str(config)])
    out = _on_a_full_disk(tmp_path, _AGENT, *args, token="t0ken")
    assert out[0] == "exit 1"
    assert out[1].startswith("edge-agent: error: cannot write the run file agent.json in ")
    assert out[1].endswith("(No space left on device); free space there or fix its "
                           "permissions, then start again")
    assert out[2:] == ["./api-token 6"]  # the run file is not there, nor a temporary file
