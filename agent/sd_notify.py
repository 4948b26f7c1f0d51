"""systemd's notify protocol: tell the service manager the agent is ready, alive, stopping.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a Unix datagram socket; a leading
``@`` means the abstract namespace) and, with ``WatchdogSec=``, ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``, the process it is meant for). The agent sends ``READY=1`` once its API
serves, ``WATCHDOG=1`` every half interval while a health check passes (so a hung agent is
restarted, not just a dead one), and ``STOPPING=1`` on its way out. Outside systemd every
call here does nothing. The protocol is a few lines (sd_notify(3)); no libsystemd binding
is needed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

__all__ = ["Watchdog", "notify", "notify_address", "watchdog_interval"]

log = logging.getLogger(__name__)


def notify_address(env: Mapping[str, str]) -> str | None:
    """The socket address in ``$NOTIFY_SOCKET`` (abstract ones start with NUL), or None."""
    path = env.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return None
    return "\0" + path[1:] if path[0] == "@" else path


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None when systemd
    asks for none, or asks another process (``$WATCHDOG_PID``)."""
    usec, for_pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if for_pid and (not for_pid.isdigit() or int(for_pid) != pid):
        return None
    return int(usec) / 2e6


def notify(state: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager; False outside systemd or
    if it cannot be sent (never raises: the agent serves on either way)."""
    address = notify_address(env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s (%s)", env.get("NOTIFY_SOCKET"), exc)
        return False
    return True


class Watchdog:
    """Sends ``WATCHDOG=1`` every ``interval_s`` while ``healthy()`` says so, in a daemon
    thread; when it does not, the pings stop and systemd restarts the agent."""

    def __init__(self, interval_s: float, healthy: Callable[[], bool],
                 env: Mapping[str, str] = os.environ) -> None:
        self.interval_s = interval_s
        self.healthy = healthy
        self.env = env
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgefleet-watchdog",
                                        daemon=True)

    def start(self) -> None:
        """Start pinging."""
        self._thread.start()

    def stop(self) -> None:
        """Stop pinging (the thread ends within one interval)."""
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                ok = self.healthy()
            except Exception:  # a failing check means unhealthy, never a dead watchdog
                log.exception("watchdog health check failed")
                ok = False
            if ok:
                notify("WATCHDOG=1", self.env)
            else:
                log.error("health check failed: not pinging the systemd watchdog")
