"""Running the agent as a systemd service: the notify protocol over a real Unix datagram
socket (an agent process says READY, pings the watchdog, says STOPPING), the unit file
(checked by ``systemd-analyze verify`` where it exists), install and uninstall, and log
lines fit for the journal."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.sd_notify import Watchdog, notify, notify_address, watchdog_interval
from agent.service_install import ServiceRequest, install_service, uninstall_service, unit_for
from agent.systemd_unit import UnitSpec, memory_max_mb, render_unit
from common.cli import JournalFormatter, journal_stream
from firmware_profiles import get_profile
from tests.agent.bundles import DIGITS

_AGENT = str(Path(sys.executable).parent / "edge-agent")
_SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def test_notify_socket_and_watchdog_settings() -> None:
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@abstract"}) == "\0abstract"
    assert notify_address({"NOTIFY_SOCKET": "relative"}) is None
    assert notify_address({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}, 7) is None
    assert watchdog_interval({}, 7) is None
    assert notify("READY=1", {}) is False


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(30)
    yield sock, path
    sock.close()


def test_notify_and_watchdog_over_a_real_socket(
        notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path}
    assert notify("READY=1", env)
    assert sock.recv(4096) == b"READY=1"
    healthy = [True, False, True]
    watchdog = Watchdog(0.05, lambda: healthy.pop(0) if healthy else True, env)
    watchdog.start()
    try:
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"WATCHDOG=1"  # the unhealthy turn sent nothing
    finally:
        watchdog.stop()
    assert healthy == []  # the second ping came after the third check


@pytest.mark.integration
def test_an_agent_under_systemd_notify(notify_socket: tuple[socket.socket, str],
                                       tmp_path: Path) -> None:
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    process = subprocess.Popen(
        [_AGENT, "serve", "--model", str(DIGITS), "--state-dir", str(tmp_path / "s"),
         "--port", "0", "--profile", "x86-64-avx2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = sock.recv(4096).decode().split("\n")
        assert ready[0] == "READY=1"
        assert f"MAINPID={process.pid}" in ready
        assert any(line.startswith("STATUS=serving on http://127.0.0.1:") for line in ready)
        # Pinged every 0.1 s while the API answers its own liveness probe.
        assert [sock.recv(4096) for _ in range(3)] == [b"WATCHDOG=1"] * 3
        process.send_signal(signal.SIGTERM)
        while (message := sock.recv(4096)) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1"
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def test_memory_max_from_the_profile() -> None:
    rpi4 = get_profile("rpi4")
    assert memory_max_mb(rpi4.ram_mb, rpi4.model_budget_mb) == 256 + 2 * 256
    assert memory_max_mb(1024, 1024) == 1024  # never more than the device has


def _unit(tmp_path: Path, **options: object) -> Path:
    spec = UnitSpec(command=(sys.executable, "-m", "agent", "-v", "run", "--config",
                             "/var/lib/edgefleet/agent/agent.toml"), **options)  # type: ignore[arg-type]
    path = tmp_path / "edge-agent.service"
    path.write_text(render_unit(spec))
    return path


def _verify(unit: Path) -> None:
    if _SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed here (apt-get install systemd)")
    result = subprocess.run([_SYSTEMD_ANALYZE, "verify", "--man=no", unit.name],
                            cwd=unit.parent, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_the_dynamic_user_unit_verifies(tmp_path: Path) -> None:
    unit = _unit(tmp_path, state_dir=Path("/var/lib/edgefleet/agent"), memory_max_mb=768,
                 unix_socket=Path("/run/edgefleet/agent.sock"))
    text = unit.read_text()
    for line in ("Type=notify", "WatchdogSec=30", "Restart=on-failure", "DynamicUser=yes",
                 "StateDirectory=edgefleet/agent", "RuntimeDirectory=edgefleet",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "MemoryMax=768M",
                 "PrivateDevices=yes", "CapabilityBoundingSet="):
        assert line in text.splitlines(), line
    _verify(unit)


def test_a_named_user_unit_verifies(tmp_path: Path) -> None:
    unit = _unit(tmp_path, state_dir=Path("/srv/edge agent/100%"), user="daemon",
                 devices=True)
    lines = unit.read_text().splitlines()
    assert "User=daemon" in lines
    assert "ReadWritePaths=\"/srv/edge agent/100%%\"" in lines
    assert "PrivateDevices=yes" not in lines
    assert "# MemoryMax: no firmware profile to size it from" in lines
    _verify(unit)


def test_units_systemd_cannot_express_are_refused() -> None:
    with pytest.raises(ValueError, match="not under /var/lib"):
        render_unit(UnitSpec(("/bin/true",), Path("/srv/agent")))
    with pytest.raises(ValueError, match="temporary directory"):
        render_unit(UnitSpec(("/bin/true",), Path("/var/tmp/agent"), user="daemon"))
    with pytest.raises(ValueError, match="line break"):
        render_unit(UnitSpec(("/bin/true",), Path("/srv/a\nb"), user="daemon"))


def test_install_and_uninstall(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('state_dir = "/var/lib/edgefleet/gw-test"\nprofile = "rpi5"\n')
    units = tmp_path / "units"
    request = ServiceRequest(config, "edge-agent-test", None, units, start=False)
    message = install_service(request, get_profile("rpi5"))
    path = units / "edge-agent-test.service"
    assert message.startswith(f"wrote {path}; start it with: systemctl daemon-reload")
    assert path.read_text() == unit_for(request, get_profile("rpi5"))
    assert (path.stat().st_mode & 0o777) == 0o644
    assert f"--config {config}" in path.read_text()
    _verify(path)
    message = uninstall_service(units, "edge-agent-test", Path("/var/lib/edgefleet/gw-test"))
    assert not path.exists()
    assert "/var/lib/private/edgefleet/gw-test" in message
    with pytest.raises(AgentError, match="no unit"):
        uninstall_service(units, "edge-agent-test", Path("/var/lib/edgefleet/gw-test"))


def test_install_refuses_a_user_that_cannot_work(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    # Under /tmp: the unit's PrivateTmp would hide it from the agent, whoever runs it.
    with pytest.raises(AgentError, match="temporary directory"):
        unit_for(ServiceRequest(config), None)
    with pytest.raises(AgentError, match="is not a unit name"):
        unit_for(ServiceRequest(config, name="../evil"), None)
    with pytest.raises(AgentError, match="is not a unit name"):
        uninstall_service(tmp_path, "a/b", tmp_path)
    with pytest.raises(AgentError, match="no user 'no-such-user-x'"):
        unit_for(ServiceRequest(config, user="no-such-user-x"), None)
    with pytest.raises(AgentError, match="does not exist; create it owned by nobody"):
        unit_for(ServiceRequest(config, user="nobody"), None)
    (tmp_path / "state").mkdir()
    with pytest.raises(AgentError, match="is not owned by nobody; chown -R nobody:"):
        unit_for(ServiceRequest(config, user="nobody"), None)


def test_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('state_dir = "/var/lib/edgefleet/agent"\nprofile = "rpi4"\n')
    result = subprocess.run([_AGENT, "install-service", "--config", str(config), "--print"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert "MemoryMax=768M" in result.stdout.splitlines()
    result = subprocess.run([_AGENT, "install-service", "--config", str(config),
                             "--unit-dir", "/proc/nowhere"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("edge-agent: error: cannot write /proc/nowhere/")
    assert len(result.stderr.splitlines()) == 1


def test_journal_lines_carry_their_priority(tmp_path: Path) -> None:
    stat = os.stat(tmp_path)
    assert journal_stream({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}, stat)
    assert not journal_stream({"JOURNAL_STREAM": "1:2"}, stat)
    assert not journal_stream({}, stat)
    record = logging.LogRecord("agent.x", logging.WARNING, __file__, 1, "two\nlines", None,
                               None)
    assert JournalFormatter().format(record) == "<4>agent.x: two\n  lines"
    result = subprocess.run(
        [_AGENT, "-v", "serve", "--state-dir", "/proc/forbidden", "--port", "0"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1  # outside the journal: level names, as before
    assert "<" not in result.stderr.split(":")[0]
