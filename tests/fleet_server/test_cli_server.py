"""``fleet serve`` as a real process (embedded Mosquitto, SQLite or PostgreSQL) driven by the
operator commands, with a device enrolled over HTTP and connected over MQTT as an agent
would be.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from common.atomic import write_atomic
from fleet_server import __version__
from fleet_server.api_client import ServerClient
from fleet_server.cli import main
from protocol import messages
from protocol.topics import device_topic
from tests.bundle.repo import Repo
from tests.fleet_server.server_env import PROFILE, wait_until, write_keys
from tests.mqtt_broker import TIMEOUT, Recorder, require_mosquitto
from transport.mqtt import BrokerAddress, ClientSettings, TLSIdentity, create_client
from transport.x509 import make_device_key_and_csr

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["serve", "stop", "status", "enroll-token", "devices", "device show", "bundles",
            "publish", "rollback", "events"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def server(tmp_path: Path, db_url: str,
           repo: Repo) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """``fleet serve`` in a child process; its data directory and the process."""
    require_mosquitto()
    data, keys = tmp_path / "server", write_keys(tmp_path / "keys", repo)
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "fleet_server", "serve", "--data", str(data), "--keys",
         str(keys), "--db", db_url, "--fleet", "clifleet", "--port", "0", "--mqtt-port", "0",
         "--mqtt-bind", "127.0.0.1"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_until(lambda: (data / "server.json").exists() or process.poll() is not None,
                   "fleet serve to start", timeout=20)
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        yield data, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def _device(data: Path, tmp_path: Path, token: str) -> tuple[Recorder, dict[str, Any]]:
    """Enroll gw-1 over HTTP as edge-agent does, then connect it as a device."""
    info = json.loads((data / "server.json").read_text())
    key, csr = make_device_key_and_csr("gw-1")
    api = ServerClient(info["api_url"], "", Path(info["ca_file"]))
    answer = api.post("/api/enroll", {"token": token, "device_id": "gw-1",
                                      "csr": csr.decode(), "profile": PROFILE})
    home = tmp_path / "gw-1"
    write_atomic(home / "device.key", key, 0o600)
    write_atomic(home / "device.crt", answer["certificate"].encode())
    write_atomic(home / "ca.crt", answer["ca_certificate"].encode())
    identity = TLSIdentity(home / "ca.crt", home / "device.crt", home / "device.key")
    recorder = Recorder(create_client(ClientSettings(
        BrokerAddress.from_url(answer["broker_url"]), identity)))
    recorder.connect()
    return recorder, answer


def test_serve_and_operate_a_fleet(server: tuple[Path, subprocess.Popen[bytes]],
                                   tmp_path: Path, bundles: dict[str, bytes],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    data, process = server
    where = ("--data", data)
    info = json.loads((data / "server.json").read_text())
    assert info["pid"] == process.pid
    assert info["fleet"] == "clifleet"

    code, token, _ = _run(capsys, "enroll-token", *where, "--group", "lab")
    assert code == 0
    token = token.strip()
    assert len(token) >= 40
    assert "\n" not in token
    recorder, enrollment = _device(data, tmp_path, token)
    try:
        desired = device_topic("clifleet", "gw-1", "desired")
        recorder.subscribe(desired)
        recorder.wait(lambda: len(recorder.messages) == 1, "the initial desired state")

        bundle = tmp_path / "digits-v1.efb"
        bundle.write_bytes(bundles["v1"])
        code, out, err = _run(capsys, "publish", bundle, "--group", "lab", *where)
        assert code == 0, err
        assert out.startswith("published digits v1 (sha256 ")
        assert "to 1 device(s) of group lab; 1 changed" in out
        recorder.wait(lambda: len(recorder.messages) == 2, "the published desired state")
        want = messages.decode_desired(bytes(recorder.messages[1].payload)).models["digits"]
        assert (want.version, want.size) == (1, len(bundles["v1"]))

        code, out, _ = _run(capsys, "status", *where)
        assert code == 0
        assert out.splitlines()[:2] == [
            f"fleet clifleet: server {__version__}, leader",
            f"broker {info['broker_url']}: connected"]
        assert "ingest: 0 queued, 0 dropped over rate limits" in out

        code, out, _ = _run(capsys, "devices", *where)
        assert code == 0
        header, row = out.splitlines()
        assert header.split() == ["DEVICE", "GROUP", "PROFILE", "ONLINE", "DESIRED",
                                  "REPORTED", "CONVERGED", "LAST", "SEEN"]
        assert row.split()[:8] == ["gw-1", "lab", PROFILE, "no", "digits", "v1", "-", "no"]

        recorder.publish(device_topic("clifleet", "gw-1", "reported"), messages.encode(
            messages.Reported(PROFILE, "0.1.0", {"digits": messages.ModelReport(
                1, want.bundle_sha256, "committed")}, at=1.0)))

        def listed() -> list[dict[str, Any]]:
            code, out, _ = _run(capsys, "devices", *where, "--json")
            assert code == 0
            return list(json.loads(out))

        wait_until(lambda: listed()[0]["converged"], "the device to converge")
        code, out, _ = _run(capsys, "devices", *where, "--group", "lab")
        assert out.splitlines()[1].split()[3:10] == [
            "yes", "digits", "v1", "digits", "v1", "committed", "yes"]

        code, out, _ = _run(capsys, "device", "show", "gw-1", *where)
        assert code == 0
        assert "converged  yes" in out
        assert "desired.set" in out
        code, out, _ = _run(capsys, "bundles", *where)
        assert out.splitlines()[1].split()[:2] == ["digits", "1"]

        code, out, _ = _run(capsys, "rollback", "--device", "gw-1", *where)
        assert code == 0
        assert out.splitlines() == ["rolled back 1 device(s):", "  gw-1: digits v1 -> nothing"]
        recorder.wait(lambda: len(recorder.messages) == 3, "the rolled-back desired state")
        assert messages.decode_desired(bytes(recorder.messages[2].payload)).models == {}

        code, out, _ = _run(capsys, "events", *where, "--device", "gw-1", "--json")
        kinds = [e["kind"] for e in json.loads(out)]
        assert kinds[:2] == ["token.redeemed", "device.enrolled"]
        assert kinds[-1] == "desired.rolled_back"
        code, out, _ = _run(capsys, "events", *where, "--since", "3", "--limit", "1")
        assert len(out.splitlines()) == 1
        assert out.split()[0] == "4"
        code, out, _ = _run(capsys, "events", *where, "--limit", "2")
        newest = [int(line.split()[0]) for line in out.splitlines()]
        code, out, _ = _run(capsys, "events", *where, "--json", "--limit", "10000")
        ids = [e["id"] for e in json.loads(out)]
        assert newest == ids[-2:]  # the newest two, oldest of them first
        follow = subprocess.Popen(
            [sys.executable, "-m", "fleet_server", "events", "--follow", "--limit", "1",
             "--data", str(data)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert follow.stdout is not None
            line = _lines(follow.stdout)
            assert int(line().split()[0]) == ids[-1]  # the newest
            _run(capsys, "enroll-token", *where, "--group", "field")
            assert "token.issued" in line()  # followed as it came
        finally:
            follow.send_signal(signal.SIGINT)
            assert follow.wait(timeout=10) == 130
            follow.stdout.close()  # type: ignore[union-attr]
        code, _, err = _run(capsys, "devices", *where, "--group", "lba")
        assert (code, err.strip()) == (0, "no devices with group 'lba'; the groups in use "
                                          "are: lab")

        # Failures: one line on stderr, exit 1.
        tampered = tmp_path / "tampered.efb"
        tampered.write_bytes(bundles["v1"][:-1] + bytes([bundles["v1"][-1] ^ 1]))
        for argv, message in [
                (("publish", tampered, "--group", "lab"), "bundle refused: ChecksumError"),
                (("publish", tmp_path / "missing.efb", "--group", "lab"), "cannot read"),
                (("publish", ROOT / "models" / "digits_cnn.onnx", "--group", "lab"),
                 "not an edgefleet bundle"),
                (("publish", bundle, "--group", "nowhere"), "has no devices"),
                (("device", "show", "gw-9"), "no device 'gw-9' is enrolled; `fleet devices` "
                                             "lists them")]:
            code, _, err = _run(capsys, *argv, *where)
            assert code == 1
            assert err.count("\n") == 1
            assert message in err
    finally:
        recorder.close()

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert not (data / "server.json").exists()
    lines = (tmp_path / "serve.log").read_text().splitlines()
    assert lines[0].startswith(f"fleet clifleet: API {info['api_url']} (admin token ")
    assert f"MQTT {enrollment['broker_url']}" in lines[0]
    assert lines[-1] == "fleet server stopped"
    with pytest.raises(ConnectionRefusedError), socket.create_connection(
            ("127.0.0.1", BrokerAddress.from_url(enrollment["broker_url"]).port), timeout=1):
        pass  # the embedded broker stopped with the server
    code, _, err = _run(capsys, "devices", *where)
    assert code == 1
    assert "no fleet server runs" in err


def _lines(stream: IO[str]) -> Callable[[], str]:
    """A reader of a child's output lines that fails after TIMEOUT seconds without one."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()

    def next_line() -> str:
        try:
            return lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no output line within {TIMEOUT} s") from None

    return next_line


def test_commands_without_a_server(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_SERVER_DIR", str(tmp_path / "nothing"))
    code, _, err = _run(capsys, "devices")
    assert code == 1
    assert f"no fleet server runs with data directory {tmp_path / 'nothing'}" in err
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", "t")
    code, _, err = _run(capsys, "bundles", "--server", "http://127.0.0.1:9")
    assert code == 1
    assert "cannot reach the fleet server at http://127.0.0.1:9" in err
    code, _, err = _run(capsys, "serve", "--data", tmp_path / "d", "--keys", tmp_path / "no",
                        "--port", "0", "--mqtt-port", "0")
    assert code == 1
    assert "fleet keys init" in err
    code, _, err = _run(capsys, "serve", "--data", tmp_path / "d", "--keys", tmp_path / "no",
                        "--broker-url", "mqtts://127.0.0.1:9", "--shared-subscriptions",
                        "--mqtt-version", "3.1.1")
    assert code == 1
    assert "shared subscriptions need MQTT 5" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["rollback", "--data", str(tmp_path)])
    assert exit_info.value.code == 2  # neither --group nor --device
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([*command.split(), "--help"])
        assert exit_info.value.code == 0
    capsys.readouterr()


def test_serve_detach_returns_once_serving_and_stop_ends_it(
        tmp_path: Path, db_url: str, repo: Repo, capsys: pytest.CaptureFixture[str]) -> None:
    require_mosquitto()
    data, keys = tmp_path / "server", write_keys(tmp_path / "keys", repo)
    code, out, err = _run(capsys, "serve", "--data", data, "--keys", keys, "--db", db_url,
                          "--port", "0", "--mqtt-port", "0", "--mqtt-bind", "127.0.0.1",
                          "--detach")
    assert code == 0, err
    assert "fleet server started in the background" in out
    # Ready means the next command is answered, with no wait of its own.
    code, out, err = _run(capsys, "devices", "--data", data)
    assert code == 0, err
    pid = json.loads((data / "server.json").read_text())["pid"]
    # A second server on the same data is refused and leaves the first one's files alone.
    code, _, err = _run(capsys, "serve", "--data", data, "--keys", keys, "--db", db_url,
                        "--port", "0", "--mqtt-port", "0", "--detach")
    assert code == 1
    assert f"another fleet server (pid {pid}) is running" in err
    assert json.loads((data / "server.json").read_text())["pid"] == pid
    code, out, err = _run(capsys, "stop", "--data", data)
    assert (code, out.strip()) == (0, f"stopped the fleet server (pid {pid})"), err
    assert not (data / "server.json").exists()
    assert "fleet server stopped" in (data / "server.log").read_text()
    code, out, _ = _run(capsys, "stop", "--data", data)
    assert code == 0
    assert "no fleet server runs on" in out


def test_serve_detach_reports_why_the_server_did_not_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "serve", "--data", tmp_path / "d", "--keys", tmp_path / "no",
                        "--port", "0", "--mqtt-port", "0", "--detach")
    assert code == 1
    assert "exited with code 1 before serving" in err
    assert "fleet keys init" in err


def test_bad_state_at_start_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        ) -> None:
    """Issue 10 item 7: a zero-length fleet.db opened as an empty registry, and a garbage
    root.json was handed to every enrolling device. Both are refused at start, in one line,
    and the empty file is left as it was."""
    keys = write_keys(tmp_path / "keys", Repo())
    data = tmp_path / "data"
    data.mkdir()
    (data / "fleet.db").touch()
    serve = ("serve", "--data", data, "--keys", keys, "--port", "0", "--mqtt-port", "0")
    code, _, err = _run(capsys, *serve)
    assert code == 1
    assert err.count("\n") == 1, err
    assert "fleet.db is an empty file (0 bytes), not a database" in err
    assert (data / "fleet.db").stat().st_size == 0
    assert not (data / "ca").exists()  # nothing made for a registry that did not open
    (data / "fleet.db").unlink()
    (keys / "root.json").write_text("garbage\n")
    code, _, err = _run(capsys, *serve)
    assert code == 1
    assert err.count("\n") == 1, err
    assert "root.json is not TUF metadata" in err
