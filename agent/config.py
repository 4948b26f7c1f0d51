"""The agent's configuration file (TOML), written by ``edge-agent enroll``.

Example (every key but ``state_dir`` optional; an agent without ``[fleet]`` runs offline)::

    state_dir = "/var/lib/edgefleet/agent"
    profile = "rpi5"                     # default: probe the host

    [api]
    host = "127.0.0.1"
    port = 8470
    unix_socket = "/run/edgefleet/agent.sock"
    threads = 0
    probation_s = 60

    [fleet]
    name = "factory-7"
    device_id = "gw-0042"
    server_url = "http://fleet.example:8780"
    broker_url = "mqtts://fleet.example:8883"
    ca_file = "keys/ca.crt"              # relative paths are relative to state_dir
    cert_file = "keys/device.crt"
    key_file = "keys/device.key"
    telemetry_interval_s = 30
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import write_atomic
from protocol.defaults import AGENT_API_PORT

from .errors import AgentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["AgentConfig", "FleetSettings", "load_config", "write_config"]


@dataclass(frozen=True)
class FleetSettings:
    """How this device reaches its fleet."""

    name: str
    device_id: str
    broker_url: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    server_url: str | None = None
    telemetry_interval_s: float = 30.0


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``edge-agent run`` needs."""

    state_dir: Path
    profile: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int | None = AGENT_API_PORT
    unix_socket: Path | None = None
    threads: int = 0
    probation_s: float = 60.0
    fleet: FleetSettings | None = None


def load_config(path: Path) -> AgentConfig:
    """Read and validate ``path``; AgentError names the file and the key on a problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AgentError(f"cannot read agent config {path} ({exc.strerror}); create it with "
                         "`edge-agent enroll` or pass --config") from exc
    except tomllib.TOMLDecodeError as exc:
        raise AgentError(f"{path}: not valid TOML ({exc})") from exc
    reader = _Reader(path, raw)
    state_dir = Path(reader.text("state_dir"))
    api = reader.table("api") or _Reader(path, {}, "api.")
    fleet_raw = reader.table("fleet")
    fleet = None
    if fleet_raw is not None:
        def local(key: str) -> Path:
            value = Path(fleet_raw.text(key))
            return value if value.is_absolute() else state_dir / value

        fleet = FleetSettings(
            name=fleet_raw.text("name"), device_id=fleet_raw.text("device_id"),
            broker_url=fleet_raw.text("broker_url"), ca_file=local("ca_file"),
            cert_file=local("cert_file"), key_file=local("key_file"),
            server_url=fleet_raw.text("server_url", required=False),
            telemetry_interval_s=fleet_raw.number("telemetry_interval_s", 30.0))
    socket = api.text("unix_socket", required=False)
    return AgentConfig(
        state_dir=state_dir, profile=reader.text("profile", required=False),
        api_host=api.text("host", required=False) or "127.0.0.1",
        api_port=int(api.number("port", AGENT_API_PORT)),
        unix_socket=Path(socket) if socket else None,
        threads=int(api.number("threads", 0)), probation_s=api.number("probation_s", 60.0),
        fleet=fleet)


def write_config(path: Path, config: AgentConfig) -> None:
    """Write ``config`` as TOML (atomically; it holds no secrets, the key is a file)."""
    def value(v: Any) -> str:
        return json.dumps(str(v) if isinstance(v, Path) else v)

    lines = [f"state_dir = {value(config.state_dir)}"]
    if config.profile:
        lines.append(f"profile = {value(config.profile)}")
    lines += ["", "[api]", f"host = {value(config.api_host)}",
              f"port = {value(config.api_port or 0)}", f"threads = {config.threads}",
              f"probation_s = {config.probation_s}"]
    if config.unix_socket:
        lines.append(f"unix_socket = {value(config.unix_socket)}")
    if config.fleet:
        f = config.fleet
        lines += ["", "[fleet]", f"name = {value(f.name)}", f"device_id = {value(f.device_id)}",
                  f"broker_url = {value(f.broker_url)}", f"ca_file = {value(f.ca_file)}",
                  f"cert_file = {value(f.cert_file)}", f"key_file = {value(f.key_file)}",
                  f"telemetry_interval_s = {f.telemetry_interval_s}"]
        if f.server_url:
            lines.append(f"server_url = {value(f.server_url)}")
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))


class _Reader:
    """Typed access to one TOML table, with errors naming file and key."""

    def __init__(self, path: Path, table: dict[str, Any], prefix: str = "") -> None:
        self.path, self.data, self.prefix = path, table, prefix

    def _missing(self, key: str) -> AgentError:
        return AgentError(f"{self.path}: missing key {self.prefix}{key}")

    def text(self, key: str, *, required: bool = True) -> Any:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self._missing(key)
            return None
        if not isinstance(value, str) or not value:
            raise AgentError(f"{self.path}: key {self.prefix}{key} must be a non-empty "
                             f"string, not {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise AgentError(f"{self.path}: key {self.prefix}{key} must be a non-negative "
                             f"number, not {value!r}")
        return float(value)

    def table(self, key: str) -> _Reader | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise AgentError(f"{self.path}: {self.prefix}{key} must be a table [{key}]")
        return _Reader(self.path, value, f"{key}.")
