"""The running agent process: runtime + local API + the file that tells other commands where.

``edge-agent serve`` builds an :class:`AgentProcess` and blocks in :meth:`run`; the other
commands (``install``, ``status``, ``predict``) find it through ``agent.json`` in the state
directory and talk to its API, or work on the state directory directly when it is not
running.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from common.atomic import write_atomic
from firmware_profiles import get_profile, load_profiles, probe_host
from firmware_profiles.matching import best_profile
from firmware_profiles.model import Profile

from .client import AgentClient
from .errors import AgentError
from .experiments import DeviceExperiments
from .http_api import ApiServer, ApiSettings, load_or_create_token
from .runtime import Runtime
from .sd_notify import Watchdog, notify, watchdog_interval

if TYPE_CHECKING:
    from .grpc_api import GrpcServer

__all__ = ["AgentProcess", "RunningAgent", "find_running", "resolve_profile"]

log = logging.getLogger(__name__)
_RUN_FILE = "agent.json"
_SWITCH_INTERVAL_S = 0.0005
_TOKEN_FILE = "api-token"


@dataclass(frozen=True)
class RunningAgent:
    """Where a running agent listens, from its ``agent.json``."""

    pid: int
    url: str | None
    unix_socket: str | None
    token_file: str | None

    def client(self, timeout: float = 30.0) -> AgentClient:
        """A client for this agent's API."""
        token_file = Path(self.token_file) if self.token_file else None
        if self.url is not None:
            return AgentClient(self.url, token_file=token_file, timeout=timeout)
        return AgentClient(unix_socket=Path(self.unix_socket or ""), token_file=token_file,
                           timeout=timeout)


def find_running(state_dir: Path) -> RunningAgent | None:
    """The agent serving from ``state_dir``, if one is running."""
    try:
        raw = json.loads((state_dir / _RUN_FILE).read_bytes())
        agent = RunningAgent(int(raw["pid"]), raw.get("url"), raw.get("unix_socket"),
                             raw.get("token_file"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(agent.pid, 0)
    except ProcessLookupError:
        return None  # a stale file left by a killed agent
    except PermissionError:
        pass  # alive, owned by another user
    return agent


def resolve_profile(name: str | None, profiles_dir: Path | None = None) -> Profile | None:
    """The named profile, or the best match for this host (None: generic CPU)."""
    if name is not None:
        return get_profile(name, profiles_dir)
    profiles = load_profiles(profiles_dir)
    return best_profile(probe_host(profiles), profiles)


def _grpc_server(runtime: Runtime, settings: ApiSettings) -> GrpcServer:
    try:
        from .grpc_api import GrpcServer
    except ImportError as exc:
        raise AgentError(f"{exc}; or leave out --grpc-port (api.grpc_port)") from exc
    assert settings.grpc_port is not None
    return GrpcServer(runtime, settings.host, settings.grpc_port, settings.token,
                      settings.limits)


class AgentProcess:
    """The agent serving its models over the local API until stopped."""

    def __init__(self, runtime: Runtime, settings: ApiSettings, state_dir: Path | None,
                 device: str = "local") -> None:
        self.runtime = runtime
        self.settings = settings
        self.state_dir = state_dir
        #: The experiments this device takes part in: the API serves their arms and takes
        #: feedback, telemetry carries their deltas, the fleet link starts and stops them.
        self.experiments = DeviceExperiments(device, state_dir)
        self.server = ApiServer(runtime, settings, self.experiments)
        self.grpc = None if settings.grpc_port is None else _grpc_server(runtime, settings)
        self._stop = threading.Event()
        self._watchdog: Watchdog | None = None

    @staticmethod
    def token(state_dir: Path | None, token_file: Path | None) -> tuple[str, Path]:
        """The API token and its file (default: ``api-token`` in the state directory)."""
        if token_file is None:
            if state_dir is None:
                raise AgentError("give --token-file or --state-dir so the API token can be "
                                 "kept somewhere private (or --no-auth for a throwaway test)")
            token_file = state_dir / _TOKEN_FILE
        return load_or_create_token(token_file), token_file

    def start(self, token_file: Path | None) -> None:
        """Start serving and announce it in ``agent.json`` for the other commands."""
        # An install's Python work (verification, staging) would otherwise hold the GIL for
        # up to the default 5 ms at a time while requests wait on it; 0.5 ms bounds that
        # wait during a hot-swap at a negligible cost in switching (docs/benchmarks.md).
        sys.setswitchinterval(_SWITCH_INTERVAL_S)
        self.server.start()
        if self.grpc is not None:
            self.grpc.start()
        self.runtime.start()
        if self.state_dir is not None:
            try:
                self._write_run_file(token_file)
            except OSError as exc:  # a full disk must not stop the serving
                log.warning("cannot write %s (%s): the other edge-agent commands will not "
                            "find this agent; it serves on", self.state_dir / _RUN_FILE,
                            exc.strerror)
        # Under systemd (Type=notify): ready now that the API serves; pinged while it answers.
        notify(f"READY=1\nSTATUS=serving on {self.server.url or self.settings.unix_socket}\n"
               f"MAINPID={os.getpid()}")
        interval = watchdog_interval(os.environ, os.getpid())
        if interval is not None:
            self._watchdog = Watchdog(interval, self._answers)
            self._watchdog.start()

    def _answers(self) -> bool:
        """Whether this agent's own API answers a liveness probe (the watchdog's check)."""
        timeout = 5.0 if self._watchdog is None else self._watchdog.interval_s
        port = self.server.port
        try:
            if port is not None:
                # A wildcard address is reached through the loopback of its family.
                host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(
                    self.settings.host, self.settings.host)
                host = f"[{host}]" if ":" in host and not host.startswith("[") else host
                client = AgentClient(f"http://{host}:{port}", timeout=timeout)
            else:
                client = AgentClient(unix_socket=self.settings.unix_socket, timeout=timeout)
            with client:
                return client.live()
        except AgentError:
            return False

    def wait(self) -> None:
        """Serve until SIGINT/SIGTERM or :meth:`stop`, then shut down."""
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._stop.wait()
        finally:
            notify("STOPPING=1")
            if self._watchdog is not None:
                self._watchdog.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.server.stop()
            if self.grpc is not None:
                self.grpc.stop()
            self.runtime.close()
            if self.state_dir is not None:
                (self.state_dir / _RUN_FILE).unlink(missing_ok=True)

    def stop(self) -> None:
        """Ask :meth:`wait` to return."""
        self._stop.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        self._stop.set()

    def _write_run_file(self, token_file: Path | None) -> None:
        assert self.state_dir is not None
        info: dict[str, Any] = {
            "pid": os.getpid(), "url": self.server.url,
            "unix_socket": None if self.settings.unix_socket is None
            else str(self.settings.unix_socket.absolute()),
            "token_file": None if token_file is None else str(token_file.absolute())}
        write_atomic(self.state_dir / _RUN_FILE, json.dumps(info).encode())

