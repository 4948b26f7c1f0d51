"""One Mosquitto process, as :class:`fleet_server.broker.Broker` runs it: finding the
executable, tying its life to the server's (``setpriv --pdeathsig``), waiting until it
accepts TLS, terminating it, stopping one an earlier server left behind, and the ports it
listens on."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from transport.mqtt import BrokerAddress, TLSIdentity

from .broker_config import BrokerConfig
from .errors import BrokerError

__all__ = ["POLL_INTERVAL", "check_port_free", "death_signal_prefix", "find_mosquitto",
           "free_port", "local_host", "stop_orphan", "terminate", "wait_ready"]

log = logging.getLogger(__name__)

#: Where distributions install mosquitto when it is not on PATH (Debian: /usr/sbin).
_MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
#: Seconds between two looks at a process or a log file that is expected to change.
POLL_INTERVAL = 0.02


def find_mosquitto() -> str | None:
    """The mosquitto executable: on PATH, else where distributions put it; None if absent."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((c for c in _MOSQUITTO_CANDIDATES if os.access(c, os.X_OK)), None)


def terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("mosquitto did not exit %.0f s after SIGTERM; killing it", timeout)
            process.kill()
            process.wait()
    log.debug("mosquitto exited with code %s", process.returncode)


def death_signal_prefix() -> list[str]:
    """``setpriv --pdeathsig TERM``: Mosquitto gets SIGTERM when the thread that started
    it dies, however it dies. Without setpriv (not Linux util-linux), the pid file check at
    the next start stops a broker a killed server left behind."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def stop_orphan(config: BrokerConfig) -> None:
    """Stop a Mosquitto that an earlier server on this data directory left running.

    Only a process whose command line names this data directory's configuration is
    touched: a stale pid file whose number now belongs to another process is ignored.
    """
    pid_file = config.data_dir / "mosquitto.pid"
    try:
        pid = int(pid_file.read_text(encoding="ascii").strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    conf = str(config.data_dir / "mosquitto.conf").encode()
    if not any(part.endswith(b"mosquitto") for part in cmdline) or conf not in cmdline:
        return
    log.warning("stopping mosquitto (pid %d) left running by an earlier fleet server on %s",
                pid, config.data_dir)
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    except PermissionError as exc:
        raise BrokerError(f"mosquitto (pid {pid}) of an earlier server still runs on "
                          f"{config.data_dir} and cannot be stopped ({exc}); stop it "
                          "yourself") from exc


def check_port_free(bind_address: str, port: int) -> None:
    """Raise BrokerError if another process listens on ``port`` (as Mosquitto binds it)."""
    family = socket.AF_INET6 if ":" in bind_address else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_address, port))
        except OSError as exc:
            raise BrokerError(f"port {port} is in use by another process ({exc.strerror}); "
                              "stop it, or give the broker another port (--mqtt-port)") from exc


def wait_ready(process: subprocess.Popen[bytes], address: BrokerAddress, tls: TLSIdentity,
                timeout: float, log_tail: Callable[[], str]) -> None:
    """Return once the broker completes a TLS handshake; raise BrokerError if it exits,
    presents a certificate that does not verify, or is not ready within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            raise BrokerError(f"mosquitto exited with code {code} at start; fix what its log "
                              f"says:\n{log_tail()}")
        try:
            _tls_handshake(address, tls.ca_file)
            if process.poll() is not None:
                continue  # someone else answered; report why our process exited
        except ssl.SSLCertVerificationError as exc:
            raise BrokerError(
                f"the broker's certificate {tls.cert_file} does not verify against "
                f"{tls.ca_file} for host {address.host} ({exc.verify_message}); issue it "
                "with the fleet CA (FleetCA.issue_server_cert) for that host") from exc
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto did not accept TLS connections on {address.url} "
                                  f"within {timeout:.0f} s; its log:\n{log_tail()}") from None
            time.sleep(POLL_INTERVAL)
        else:
            return


def _tls_handshake(address: BrokerAddress, ca_file: Path) -> None:
    """One TLS handshake with the broker, verifying its certificate.

    No client certificate is sent, and TLS 1.3 is used so that the handshake completes on
    our side before the broker checks for one; the broker then logs the probe as a client
    that "did not return a certificate".
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=ca_file)
    with socket.create_connection((address.host, address.port), timeout=1.0) as sock, \
            context.wrap_socket(sock, server_hostname=address.host):
        pass


def free_port(bind_address: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in bind_address else socket.AF_INET) as sock:
        sock.bind((bind_address, 0))
        port: int = sock.getsockname()[1]
    return port


def local_host(bind_address: str) -> str:
    """The host a client on this machine uses to reach a listener on ``bind_address``."""
    if bind_address in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind_address == "::":
        return "::1"
    return bind_address

