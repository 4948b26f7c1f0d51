"""Every mistake a user can make on a command line ends in one line on stderr, never a
traceback, and changes nothing on disk (issue 17).

One table for the project's command lines: each case names its CLI (:data:`COMMANDS`),
its arguments with ``{placeholders}`` for the files :func:`_world` makes, and a phrase the
one-line error must contain. ``edge-agent``, ``fleet`` and ``edge-compress`` are walked
with bad paths, permissions and arguments.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.config import AgentConfig, FleetSettings
from agent.config_write import write_config
from agent.trust_store import TrustStore
from bundle.trust import TrustedState
from tests.agent.bundles import DIGITS, PROFILE, digits_spec, write_bundle
from tests.bundle.repo import Repo
from tests.mqtt_broker import TestFleet

pytestmark = pytest.mark.integration

_BIN = Path(sys.executable).parent
#: The command lines under test, by the name a user types.
COMMANDS = {name: [str(_BIN / name)] for name in ("edge-agent", "fleet", "edge-compress")}
_MODELS = Path(__file__).resolve().parents[2] / "models"


@dataclass(frozen=True)
class Case:
    """One mistake: ``cli`` run with ``args`` must exit ``code`` saying ``says``."""

    cli: str
    args: tuple[str, ...]
    says: str
    code: int = 1
    #: Files the command may leave before it fails (a state directory's API token, a data
    #: directory's lock), relative to the test's directory.
    creates: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.cli} {' '.join(self.args)}"[:90]


#: Well-formed (protocol.enrollment), of no fleet: enough to get as far as the network.
_TOKEN = "eft1." + ".".join(["A" * 43] * 3)

CASES = [
    # edge-agent serve
    Case("edge-agent", ("serve", "--state-dir", "/proc/forbidden", "--port", "0"),
         "cannot use /proc/forbidden as the state directory"),
    Case("edge-agent", ("serve", "--state-dir", "{tmp}/afile", "--port", "0"),
         "cannot use {tmp}/afile as the state directory"),
    pytest.param(
        Case("edge-agent", ("serve", "--state-dir", "{tmp}/readonly/state", "--port", "0"),
             "cannot use {tmp}/readonly/state as the state directory (Permission denied)"),
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")),
    Case("edge-agent", ("serve", "--state-dir", "/sys/edgefleet", "--port", "0"),
         "cannot use /sys/edgefleet as the state directory"),
    Case("edge-agent", ("serve", "--port", "99999"), "99999 is out of range; use 0 to 65535",
         code=2),
    Case("edge-agent", ("serve", "--port", "http"), "'http' is not an integer", code=2),
    Case("edge-agent", ("serve", "--max-batch", "0"), "0 is out of range", code=2),
    Case("edge-agent", ("serve", "--probation", "nan"), "not a finite number", code=2),
    Case("edge-agent", ("serve", "--model", "{tmp}/missing.onnx", "--state-dir", "{tmp}/s"),
         "{tmp}/missing.onnx: no such model or bundle file"),
    Case("edge-agent", ("serve", "--name", "x", "--state-dir", "{tmp}/s"),
         "more --name than --model options"),
    Case("edge-agent", ("serve", "--root", "{tmp}/garbage.json", "--state-dir", "{tmp}/s"),
         "{tmp}/garbage.json is not TUF metadata"),
    Case("edge-agent", ("serve", "--root", "{tmp}/missing.json", "--state-dir", "{tmp}/s"),
         "cannot read root metadata {tmp}/missing.json (No such file or directory)"),
    Case("edge-agent", ("serve", "--root", "{tmp}/root.json", "--state-dir", "{tmp}/pinned"),
         "{tmp}/pinned/trust/trust.json pins another root"),
    Case("edge-agent", ("serve", "--state-dir", "{tmp}/s", "--unix-socket", "/proc/x/sock",
                        "--port", "0"),
         "cannot listen on /proc/x/sock (No such file or directory)", creates=("s/api-token",)),
    Case("edge-agent", ("serve", "--state-dir", "{tmp}/s", "--host", "256.1.1.1"),
         "cannot listen on 256.1.1.1:8470 (not an address of this host)",
         creates=("s/api-token",)),
    Case("edge-agent", ("serve", "--state-dir", "{tmp}/s", "--token-file", "{tmp}/open-token",
                        "--port", "0"), "chmod 600 {tmp}/open-token"),
    Case("edge-agent", ("serve", "--state-dir", "{tmp}/s", "--profile", "no-such-profile"),
         "no-such-profile"),
    # edge-agent install / verify / predict / status
    Case("edge-agent", ("install", "{tmp}/missing.efb", "--state-dir", "{tmp}/s"),
         "{tmp}/missing.efb: no such bundle file"),
    Case("edge-agent", ("install", "{tmp}/missing.efb", "--state-dir", "{running}"),
         "{tmp}/missing.efb: no such bundle file"),
    Case("edge-agent", ("install", "{tmp}", "--state-dir", "{running}"),
         "{tmp}: no such bundle file"),
    Case("edge-agent", ("install", "{bundle}", "--root", "{tmp}/garbage.json",
                        "--state-dir", "{tmp}/s"), "{tmp}/garbage.json is not TUF metadata"),
    Case("edge-agent", ("verify", "{tmp}/missing.efb", "--root", "{tmp}/root.json",
                        "--state-dir", "{tmp}/s"),
         "cannot read {tmp}/missing.efb (No such file or directory)"),
    Case("edge-agent", ("verify", "{tmp}", "--root", "{tmp}/root.json", "--state-dir",
                        "{tmp}/s"), "cannot read {tmp} (Is a directory)"),
    Case("edge-agent", ("verify", "{bundle}", "--state-dir", "{tmp}/s"),
         "no trusted state in {tmp}/s; pass --root"),
    Case("edge-agent", ("verify", "{tmp}/garbage.json", "--root", "{tmp}/root.json",
                        "--state-dir", "{tmp}/s"), "MalformedBundleError"),
    Case("edge-agent", ("predict", "digits", "--input", "{tmp}/x.npy", "--state-dir",
                        "{tmp}/s"), "no agent is running from {tmp}/s"),
    Case("edge-agent", ("predict", "digits", "--input", "{tmp}/missing.npy", "--state-dir",
                        "{running}"), "cannot read {tmp}/missing.npy"),
    Case("edge-agent", ("predict", "digits", "--input", "{tmp}/garbage.json", "--state-dir",
                        "{running}"), "cannot read {tmp}/garbage.json as a .npy array"),
    Case("edge-agent", ("predict", "nope", "--input", "{tmp}/x.npy", "--state-dir",
                        "{running}"), "HTTP 404: no model named 'nope'"),
    Case("edge-agent", ("predict", "digits", "--input", "{tmp}/wrong-shape.npy",
                        "--state-dir", "{running}"), "HTTP 400: model digits: input input has"),
    Case("edge-agent", ("predict", "digits", "--state-dir", "{running}"),
         "the following arguments are required: --input", code=2),
    Case("edge-agent", ("status", "--state-dir", "{tmp}/afile"),
         "{tmp}/afile is not a directory"),
    Case("edge-agent", ("probe", "--profiles-dir", "{tmp}/missing"),
         "{tmp}/missing: no *.toml profiles found"),
    Case("edge-agent", ("enroll", "--server", "https://127.0.0.1:1", "--token", _TOKEN,
                        "--state-dir", "{tmp}/s", "--profile", PROFILE),
         "cannot reach the fleet server at https://127.0.0.1:1/api/fleet"),
    Case("edge-agent", ("enroll", "--server", "https://127.0.0.1:1", "--token", "t",
                        "--state-dir", "{tmp}/s", "--profile", PROFILE),
         "not an enrollment token"),
    Case("edge-agent", ("enroll", "--server", "http://127.0.0.1:1", "--token", _TOKEN,
                        "--state-dir", "{tmp}/s", "--profile", PROFILE),
         "the fleet server's API speaks HTTPS only"),
    Case("edge-agent", ("enroll", "--server", "x", "--token", "t", "--port", "-1"),
         "-1 is out of range", code=2),
    Case("edge-agent", ("nosuchcommand",), "invalid choice: 'nosuchcommand'", code=2),
    # edge-agent run and config: the config file and the files it names (issue 10, item 8)
    Case("edge-agent", ("run", "--config", "{tmp}/missing.toml"),
         "cannot read agent config {tmp}/missing.toml (No such file or directory)"),
    Case("edge-agent", ("config", "--config", "{tmp}/missing.toml"),
         "cannot read agent config {tmp}/missing.toml"),
    *(Case("edge-agent", (command, "--config", f"{{tmp}}/{name}.toml"), says)
      for command in ("run", "config") for name, says in [
        ("not-utf8", "{tmp}/not-utf8.toml, line 2: not UTF-8 text (byte 0xff)"),
        ("not-toml", "{tmp}/not-toml.toml: not valid TOML"),
        ("port", "{tmp}/port.toml, line 3: api.port = 99999 is out of range; use 0 to 65535"),
        ("unknown-key", "{tmp}/unknown-key.toml, line 3: unknown key api.prot; did you mean "
                        "api.port?"),
        ("http-broker", "{tmp}/http-broker.toml, line 5: fleet.broker_url: broker URL "
                        "'http://x' is not mqtts://host[:port]"),
      ]),
    Case("edge-agent", ("run", "--config", "{tmp}/proc-state.toml"),
         "cannot use /proc/forbidden as the state directory"),
    Case("edge-agent", ("run", "--config", "{tmp}/no-cert.toml"),
         "fleet.cert_file {tmp}/fleet-s/keys/missing.crt: cannot read it (No such file or "
         "directory); re-enroll the device"),
    Case("edge-agent", ("run", "--config", "{tmp}/no-ca.toml"),
         "fleet.ca_file {tmp}/fleet-s/keys/missing-ca.crt: cannot read it"),
    Case("edge-agent", ("run", "--config", "{tmp}/garbage-ca.toml"),
         "fleet.ca_file {tmp}/fleet-s/keys/garbage.pem holds no PEM CA certificate"),
    Case("edge-agent", ("run", "--config", "{tmp}/garbage-cert.toml"),
         "fleet.cert_file {tmp}/fleet-s/keys/garbage.pem is not a device certificate"),
    Case("edge-agent", ("run", "--config", "{tmp}/garbage-key.toml"),
         "fleet.key_file {tmp}/fleet-s/keys/garbage.pem is not the (unencrypted) private key "
         "of {tmp}/fleet-s/keys/device.crt"),
    Case("edge-agent", ("run", "--config", "{tmp}/other-key.toml"),
         "fleet.key_file {tmp}/fleet-s/keys/other.key is not the (unencrypted) private key"),
    # edge-agent doctor and the service commands (issue 17)
    Case("edge-agent", ("doctor", "--state-dir", "{tmp}/s", "--profile", "no-such-profile"),
         "no-such-profile"),
    Case("edge-agent", ("install-service", "--config", "{tmp}/missing.toml"),
         "cannot read agent config {tmp}/missing.toml"),
    Case("edge-agent", ("install-service", "--config", "{tmp}/port.toml", "--print"),
         "api.port = 99999 is out of range"),
    Case("edge-agent", ("install-service", "--config", "{tmp}/proc-state.toml", "--print"),
         "state directory /proc/forbidden is not under /var/lib"),
    Case("edge-agent", ("install-service", "--config", "{tmp}/proc-state.toml", "--user",
                        "no-such-user-x", "--print"), "no user 'no-such-user-x'"),
    Case("edge-agent", ("uninstall-service", "--unit-dir", "{tmp}"),
         "no unit {tmp}/edge-agent.service"),
    Case("edge-agent", ("serve", "--cors-origin", "*"), "'*' is not a web origin", code=2),
    # fleet
    Case("fleet", ("keys", "init", "--dir", "/proc/forbidden"),
         "cannot write keys to /proc/forbidden"),
    Case("fleet", ("keys", "init", "--dir", "{tmp}/afile"), "cannot write keys to {tmp}/afile"),
    Case("fleet", ("keys", "rotate", "--dir", "{tmp}/missing", "--role", "targets"),
         "no root metadata in {tmp}/missing"),
    Case("fleet", ("bundle", "build", "--name", "digits", "--version", "1", "--artifacts",
                   "{tmp}/missing", "--keys", "{tmp}/missing", "--out", "{tmp}/x.efb"),
         "{tmp}/missing is not a directory; point --artifacts at edge-compress output"),
    Case("fleet", ("bundle", "build", "--name", "digits", "--version", "1", "--artifacts",
                   "{tmp}/pinned", "--keys", "{tmp}/missing", "--out", "{tmp}/x.efb"),
         "{tmp}/pinned has no report.json and no .onnx or .tflite files"),
    Case("fleet", ("bundle", "build", "--name", "d", "--version", "one", "--artifacts", "a",
                   "--keys", "k", "--out", "o"), "invalid int value: 'one'", code=2),
    Case("fleet", ("bundle", "verify", "{tmp}/missing.efb", "--root", "{tmp}/root.json"),
         "cannot read {tmp}/missing.efb (No such file or directory)"),
    Case("fleet", ("bundle", "verify", "{tmp}/garbage.json", "--root", "{tmp}/root.json"),
         "MalformedBundleError"),
    Case("fleet", ("devices", "--data", "/proc/forbidden"),
         "no fleet server runs with data directory /proc/forbidden"),
    Case("fleet", ("enroll-token", "--data", "{tmp}/afile", "--group", "lab"),
         "{tmp}/afile/server.json is unreadable"),
    Case("fleet", ("publish", "{tmp}/missing.efb", "--group", "lab", "--data", "{tmp}/s"),
         "cannot read {tmp}/missing.efb (No such file or directory)"),
    Case("fleet", ("serve", "--data", "/proc/forbidden", "--keys", "{tmp}/missing", "--fleet",
                   "f"), "cannot create the data directory /proc/forbidden"),
    Case("fleet", ("serve", "--data", "{tmp}/srv", "--keys", "{tmp}/missing", "--fleet", "f"),
         "cannot read the fleet's root {tmp}/missing/root.json", creates=("srv/serve.lock",)),
    Case("fleet", ("nosuchcommand",), "invalid choice: 'nosuchcommand'", code=2),
    # edge-compress
    Case("edge-compress", ("{tmp}/missing.onnx", "--profile", PROFILE, "--out", "{tmp}/o"),
         "{tmp}/missing.onnx: not a readable ONNX model"),
    Case("edge-compress", ("{tmp}/garbage.json", "--profile", PROFILE, "--out", "{tmp}/o"),
         "takes an ONNX (.onnx) or TFLite (.tflite) model"),
    Case("edge-compress", (str(_MODELS / "digits_cnn.onnx"), "--profile", "no-such-profile",
                           "--out", "{tmp}/o"), "no profile named 'no-such-profile'"),
    Case("edge-compress", (str(_MODELS / "digits_cnn.onnx"), "--profile", PROFILE, "--out",
                           "{tmp}/o"), "no data: pass --calibration DATA.npz"),
    Case("edge-compress", (str(_MODELS / "digits_cnn.onnx"), "--profile", PROFILE,
                           "--calibration", "{tmp}/garbage.json", "--out", "{tmp}/o"),
         "{tmp}/garbage.json: not a readable .npz archive"),
    Case("edge-compress", (str(_MODELS / "digits_cnn.onnx"), "--profile", PROFILE,
                           "--calibration", "{tmp}/missing.npz", "--out", "{tmp}/o"),
         "{tmp}/missing.npz: no such file"),
    Case("edge-compress", (str(_MODELS / "digits_cnn.onnx"), "--profile", PROFILE,
                           "--calibration", str(_MODELS / "digits_data.npz"), "--out",
                           "/proc/forbidden/o"), "/proc/forbidden"),
]


def _world(tmp: Path) -> dict[str, str]:
    """The files the cases name, in ``tmp``; the placeholders' values."""
    (tmp / "afile").write_text("not a directory\n")
    readonly = tmp / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    (tmp / "garbage.json").write_text("garbage\n")
    (tmp / "open-token").write_text("token\n")
    (tmp / "open-token").chmod(0o644)
    np.save(tmp / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    np.save(tmp / "wrong-shape.npy", np.zeros((1, 64), np.float32))
    repo, other = Repo(), Repo()
    (tmp / "root.json").write_bytes(repo.root)
    TrustStore(tmp / "pinned" / "trust").save(TrustedState(root=other.root))
    bundle = write_bundle(repo, tmp, digits_spec(1))
    _configs(tmp)
    return {"tmp": str(tmp), "bundle": str(bundle)}


def _configs(tmp: Path) -> None:
    """agent.toml files, each wrong in one way, for a state dir with real TLS files."""
    state = tmp / "fleet-s"
    identity = TestFleet.create(tmp / "ca").device_identity("gw1")
    keys = state / "keys"
    keys.mkdir(parents=True)
    for source in (identity.ca_file, identity.cert_file, identity.key_file):
        shutil.copy(source, keys / source.name)
    (keys / "garbage.pem").write_text("-----BEGIN GARBAGE-----\nnope\n")
    shutil.copy(TestFleet.create(tmp / "ca2").device_identity("gw2").key_file,
                keys / "other.key")
    good = FleetSettings("fleet1", "gw1", "mqtts://127.0.0.1:1", Path("keys/ca.crt"),
                         Path("keys/device.crt"), Path("keys/device.key"))
    variants = {
        "no-cert": {"cert_file": Path("keys/missing.crt")},
        "no-ca": {"ca_file": Path("keys/missing-ca.crt")},
        "garbage-ca": {"ca_file": Path("keys/garbage.pem")},
        "garbage-cert": {"cert_file": Path("keys/garbage.pem")},
        "garbage-key": {"key_file": Path("keys/garbage.pem")},
        "other-key": {"key_file": Path("keys/other.key")},
    }
    for name, change in variants.items():
        write_config(tmp / f"{name}.toml", AgentConfig(
            state, fleet=FleetSettings(**{**good.__dict__, **change})))
    write_config(tmp / "proc-state.toml", AgentConfig(Path("/proc/forbidden")))
    texts = {
        "not-utf8": b'# agent\nprofile = "caf\xff"\n',
        "not-toml": b"state_dir = \n",
        "port": b'state_dir = "STATE"\n[api]\nport = 99999\n',
        "unknown-key": b'state_dir = "STATE"\n[api]\nprot = 8470\n',
        "http-broker": b'state_dir = "STATE"\n[fleet]\nname = "f"\ndevice_id = "d"\n'
                       b'broker_url = "http://x"\nca_file = "a"\ncert_file = "b"\n'
                       b'key_file = "c"\n',
    }
    for name, text in texts.items():
        (tmp / f"{name}.toml").write_bytes(text.replace(b"STATE", str(state).encode()))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The files, and an agent serving the digits model (``{running}``) for the cases that
    talk to one."""
    tmp = tmp_path_factory.mktemp("cli")
    values = _world(tmp)
    running = tmp / "running"
    process = subprocess.Popen(
        [*COMMANDS["edge-agent"], "serve", "--model", str(DIGITS), "--name", "digits",
         "--state-dir", str(running), "--profile", PROFILE, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    with process.stdout:
        assert "edge-agent serving digits" in process.stdout.readline()
    yield {**values, "running": str(running)}
    process.terminate()
    process.wait(timeout=30)
    (tmp / "readonly").chmod(0o700)


def _files(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: its mode and a hash of its content (directories that the
    command may create empty are not state)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = (path.stat().st_mode,
                                                hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_mistake_is_one_line_and_changes_nothing(case: Case, world: dict[str, str]) -> None:
    tmp = Path(world["tmp"])
    before = _files(tmp)
    args = [arg.format(**world) for arg in case.args]
    result = subprocess.run([*COMMANDS[case.cli], *args], capture_output=True, text=True,
                            timeout=120, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == case.code, result.stderr
    lines = result.stderr.splitlines()
    if case.code == 1:
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"{case.cli}: error: "), result.stderr
    else:  # bad usage: argparse's usage lines, then one error line
        assert re.match(rf"{case.cli}( \w+)*: error: ", lines[-1]), result.stderr
    assert case.says.format(**world) in lines[-1]
    after = _files(tmp)
    if case.creates:
        created = set(after) - set(before)
        assert created <= set(case.creates), created
        for name in created:
            (tmp / name).unlink()
        after = _files(tmp)
    assert after == before
