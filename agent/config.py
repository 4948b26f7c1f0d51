"""The agent's configuration file (TOML): one definition for the loader, the writer and the docs.

Each TOML table is a frozen dataclass below and each key a field whose metadata gives its
meaning and bounds beside its type and default. From that one definition:

- :func:`agent.config_load.load_config` reads a file, refusing an unknown key or a bad value
  with the key's name and its line in the file;
- :func:`agent.config_write.write_config` writes one with a TOML writer (tomli-w), so any
  path round-trips;
- :func:`agent.config_write.config_reference` renders the reference that ``edge-agent
  config --doc`` prints and docs/agent-config.md holds (a test checks that the committed
  file is its output).

An example (``edge-agent enroll`` writes one like it; every key but ``state_dir`` may be left
out, and an agent without ``[fleet]`` runs offline)::

    state_dir = "/var/lib/edgefleet/agent"
    profile = "rpi5"

    [api]
    port = 8470
    unix_socket = "/run/edgefleet/agent.sock"

    [api.limits]
    max_batch = 16

    [fleet]
    name = "factory-7"
    device_id = "gw-0042"
    server_url = "http://fleet.example:8780"
    broker_url = "mqtts://fleet.example:8883"
    ca_file = "keys/ca.crt"
    cert_file = "keys/device.crt"
    key_file = "keys/device.key"
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin
from urllib.parse import urlsplit

from protocol.defaults import AGENT_API_PORT
from protocol.names import check_name

__all__ = [
    "DEFAULT_API_HOST",
    "DEFAULT_MONITOR_RATE",
    "TYPE_NAMES",
    "AgentConfig",
    "ApiConfig",
    "ApiLimits",
    "FleetSettings",
    "MonitorConfig",
    "bound_text",
    "dotted",
    "field_kind",
]

#: Where the local API listens unless told otherwise: apps on this device only.
DEFAULT_API_HOST = "127.0.0.1"
#: Share of requests the monitor samples by default (docs/benchmarks.md, monitoring cost).
DEFAULT_MONITOR_RATE = 0.05
_KIB, _MIB, _GIB = 1 << 10, 1 << 20, 1 << 30
_MAX_ORIGINS = 32


def _meta(meaning: str, *, low: float | None = None, high: float | None = None,
          check: Callable[[Any], object] | None = None, allowed: str | None = None,
          in_state_dir: bool = False) -> dict[str, Any]:
    """A key's metadata: its one-line ``meaning``, inclusive bounds ``low``/``high``, a
    ``check`` that raises ValueError for a bad value (``allowed`` says what it accepts, for
    the docs), and ``in_state_dir`` for a path taken relative to ``state_dir``."""
    return {"meaning": meaning, "low": low, "high": high, "check": check, "allowed": allowed,
            "in_state_dir": in_state_dir}


def _check_broker_url(url: str) -> None:
    from transport.mqtt import BrokerAddress  # paho-mqtt: imported only to check a [fleet]

    BrokerAddress.from_url(url)


def _check_mqtt_version(version: str) -> None:
    if version not in ("5", "3.1.1"):
        raise ValueError(f"{version!r} is not an MQTT version this agent speaks")


def _check_http_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
    _ = parts.port  # ValueError for a port out of range


def _check_origins(origins: tuple[str, ...]) -> None:
    from .cors import check_origin

    if len(origins) > _MAX_ORIGINS:
        raise ValueError(f"{len(origins)} origins, over the limit of {_MAX_ORIGINS}")
    for origin in origins:
        check_origin(origin)


@dataclass(frozen=True)
class ApiLimits:
    """Bounds on what one client of the local API can make the agent hold."""

    max_connections: int = field(default=64, metadata=_meta(
        "connections served at once; at the limit the least recently active one the agent "
        "is not answering is closed, or the new one answered 503", low=1, high=4096))
    idle_timeout_s: float = field(default=300.0, metadata=_meta(
        "seconds a connection may send nothing before it is closed", low=1, high=86400))
    max_head_bytes: int = field(default=32 * _KIB, metadata=_meta(
        "largest request line plus headers (431 above it)", low=_KIB, high=_MIB))
    max_headers: int = field(default=100, metadata=_meta(
        "most header lines in one request (431 above it)", low=1, high=1000))
    max_body_bytes: int = field(default=64 * _MIB, metadata=_meta(
        "largest inference request body (413 before it is read)", low=_KIB, high=4 * _GIB))
    max_json_bytes: int = field(default=8 * _MIB, metadata=_meta(
        "largest JSON part of an inference request: parsed JSON numbers take about 30 bytes "
        "each in memory, so large tensors belong in the binary extension",
        low=_KIB, high=4 * _GIB))
    max_input_bytes: int = field(default=64 * _MIB, metadata=_meta(
        "largest total size of one request's input tensors, from their declared shapes and "
        "datatypes, checked before any array is made (413)", low=_KIB, high=4 * _GIB))
    max_batch: int = field(default=64, metadata=_meta(
        "largest batch (first dimension, where the model leaves it open) of one request "
        "(413); memory for a model's activations grows with it", low=1, high=1 << 20))
    max_bundle_bytes: int = field(default=512 * _MIB, metadata=_meta(
        "largest bundle accepted by POST /v2/edgefleet/install", low=_KIB, high=16 * _GIB))


@dataclass(frozen=True)
class ApiConfig:
    """The local inference API, and how models are run and watched."""

    host: str = field(default=DEFAULT_API_HOST, metadata=_meta(
        "address the local API listens on (the default serves apps on this device only)"))
    port: int = field(default=AGENT_API_PORT, metadata=_meta(
        "TCP port of the local API; 0 picks a free one", low=0, high=65535))
    unix_socket: Path | None = field(default=None, metadata=_meta(
        "also listen on this Unix socket (created 0660)"))
    grpc_port: int | None = field(default=None, metadata=_meta(
        "also serve KServe v2 gRPC on this TCP port of `host` (the agent-grpc extra); 0 picks "
        "a free one; unset: no gRPC", low=0, high=65535))
    threads: int = field(default=0, metadata=_meta(
        "inference threads per model; 0 lets the runtime decide", low=0, high=256))
    probation_s: float = field(default=60.0, metadata=_meta(
        "seconds a newly installed model is watched before it is committed",
        low=0, high=7 * 86400))
    cors_origins: tuple[str, ...] = field(default=(), metadata=_meta(
        "web origins whose pages may call the API from a browser (CORS); empty: none",
        check=_check_origins, allowed="origins as browsers send them, e.g. "
        "`[\"http://localhost:3000\"]`; at most 32"))
    limits: ApiLimits = field(default_factory=ApiLimits, metadata=_meta(
        "bounds on requests and connections"))


@dataclass(frozen=True)
class FleetSettings:
    """How this device reaches its fleet."""

    name: str = field(metadata=_meta(
        "the fleet's name", check=lambda v: check_name(v, "fleet name"),
        allowed="a name: 1-64 of A-Z a-z 0-9 . _ -"))
    device_id: str = field(metadata=_meta(
        "this device's id in the fleet (its certificate's CN)", check=check_name,
        allowed="a name: 1-64 of A-Z a-z 0-9 . _ -"))
    broker_url: str = field(metadata=_meta(
        "the fleet's MQTT broker", check=_check_broker_url,
        allowed="mqtts://host[:port]"))
    ca_file: Path = field(metadata=_meta(
        "the fleet CA certificate the broker is verified with", in_state_dir=True))
    cert_file: Path = field(metadata=_meta(
        "this device's certificate (PEM)", in_state_dir=True))
    key_file: Path = field(metadata=_meta(
        "this device's private key (PEM, mode 0600)", in_state_dir=True))
    server_url: str | None = field(default=None, metadata=_meta(
        "the fleet server's operator API (enrollment)", check=_check_http_url,
        allowed="http[s]://host[:port]"))
    telemetry_interval_s: float = field(default=30.0, metadata=_meta(
        "seconds between telemetry samples", low=0.1, high=86400))
    mqtt_version: str = field(default="5", metadata=_meta(
        "MQTT version towards the broker (3.1.1 for a broker without MQTT 5)",
        check=_check_mqtt_version, allowed='"5" or "3.1.1"'))


@dataclass(frozen=True)
class MonitorConfig:
    """What the served models see and answer: sampled input and output statistics against
    the bundle's baseline, and the local Prometheus endpoint (docs/telemetry.md)."""

    sample_rate: float = field(default=DEFAULT_MONITOR_RATE, metadata=_meta(
        "share of requests folded into the input/output statistics (0: monitoring off); "
        "the default keeps the cost on the request path within the targets "
        "(docs/benchmarks.md)", low=0, high=1))
    queue: int = field(default=16, metadata=_meta(
        "sampled requests waiting for the side thread (statistics, shadow and previous-"
        "version runs); one that finds it full is dropped and counted", low=1, high=4096))
    prometheus: bool = field(default=False, metadata=_meta(
        "serve GET /metrics (Prometheus text format) on the local API, behind its token"))


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``edge-agent run`` needs."""

    state_dir: Path = field(metadata=_meta(
        "the agent's state directory: trusted metadata, models, installs, keys, API token"))
    profile: str | None = field(default=None, metadata=_meta(
        "this device's firmware profile (`edge-agent probe` lists them); unset: probe the "
        "host"))
    api: ApiConfig = field(default_factory=ApiConfig, metadata=_meta(
        "the local API"))
    fleet: FleetSettings | None = field(default=None, metadata=_meta(
        "the fleet this device follows; without it the agent runs offline"))
    monitor: MonitorConfig = field(default_factory=MonitorConfig, metadata=_meta(
        "monitoring of the served models"))


def field_kind(hint: Any) -> Any:
    """``X`` for a hint ``X`` or ``X | None``."""
    if get_origin(hint) in (Union, types.UnionType):
        (kind,) = (arg for arg in get_args(hint) if arg is not type(None))
        return kind
    return hint


def dotted(*keys: str) -> str:
    """A key's path as the file and the docs write it: ``api.limits.max_batch``."""
    return ".".join(keys)


def bound_text(value: float | None) -> str:
    """A key's bound as messages and the docs show it (None: no bound)."""
    if value is None:
        return "any"
    if not float(value).is_integer():
        return str(value)
    return f"{int(value):,}" if value >= 1_000_000 else str(int(value))


#: What the docs and error messages call each key type.
TYPE_NAMES: dict[Any, str] = {str: "string", Path: "path", int: "integer",
              float: "number", bool: "boolean", tuple[str, ...]: "list of strings"}


