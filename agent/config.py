"""The agent's configuration file (TOML): one definition for the loader, the writer and the docs.

Each TOML table is a frozen dataclass below and each key a field whose metadata gives its
meaning and bounds beside its type and default. From that one definition:

- :func:`load_config` reads a file, refusing an unknown key or a bad value with the key's
  name and its line in the file;
- :func:`write_config` writes one with a TOML writer (tomli-w), so any path round-trips;
- :func:`config_reference` renders the reference that ``edge-agent config --doc`` prints and
  docs/agent-config.md holds (a test checks that the committed file is its output).

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

import argparse
import difflib
import math
import re
import sys
import textwrap
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import tomli_w

from common.atomic import write_atomic
from protocol.defaults import AGENT_API_PORT
from protocol.names import check_name

from .errors import AgentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["DEFAULT_API_HOST", "AgentConfig", "ApiConfig", "ApiLimits", "FleetSettings",
           "config_reference", "config_to_toml", "load_config", "option_type", "write_config"]

#: Where the local API listens unless told otherwise: apps on this device only.
DEFAULT_API_HOST = "127.0.0.1"
_KIB, _MIB, _GIB = 1 << 10, 1 << 20, 1 << 30
#: A config file bigger than this is not a config file.
_MAX_FILE_BYTES = _MIB
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


# -- loading ----------------------------------------------------------------------------------

_T = TypeVar("_T")


def load_config(path: Path) -> AgentConfig:
    """Read and check ``path``; AgentError names the file, the key and its line on a problem.

    Relative paths in ``[fleet]`` are taken relative to ``state_dir``.
    """
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise AgentError(f"cannot read agent config {path} ({exc.strerror}); create it with "
                         "`edge-agent enroll` or pass --config") from exc
    if len(data) > _MAX_FILE_BYTES:
        raise AgentError(f"{path} is over {_MAX_FILE_BYTES} bytes; it is not an agent config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise AgentError(f"{path}, line {line}: not UTF-8 text (byte {data[exc.start]:#x}); "
                         "save the file as UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AgentError(f"{path}: not valid TOML ({exc}); fix that line") from None
    source = _Source(path, text)
    config = source.build(AgentConfig, raw, ())
    if config.fleet is None:
        return config
    local = {f.name: config.state_dir / getattr(config.fleet, f.name)
             for f in fields(FleetSettings) if f.metadata["in_state_dir"]}
    return replace(config, fleet=replace(config.fleet, **local))


@dataclass(frozen=True)
class _Source:
    """One config file's text, for errors that name the line of a key."""

    path: Path
    text: str

    def error(self, keys: tuple[str, ...], message: str) -> AgentError:
        line = _line_of(self.text, keys)
        where = f"{self.path}, line {line}" if line else str(self.path)
        return AgentError(f"{where}: {message}")

    def build(self, cls: type[_T], table: Mapping[str, Any], at: tuple[str, ...]) -> _T:
        """An instance of the table dataclass ``cls`` from the TOML table at ``at``."""
        hints = get_type_hints(cls)
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = (f"did you mean {_dotted(*at, close[0])}?" if close
                        else f"known keys{f' in [{_dotted(*at)}]' if at else ''}: "
                        f"{', '.join(known)}")
                raise self.error((*at, key), f"unknown key {_dotted(*at, key)}; {hint} "
                                 "(docs/agent-config.md lists them all)")
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name in table:
                values[name] = self._value(table[name], hints[name], f, (*at, name))
            elif f.default is MISSING and f.default_factory is MISSING:
                raise self.error(at, f"missing key {_dotted(*at, name)} "
                                 f"({f.metadata['meaning']})")
        return cls(**values)

    def _value(self, value: Any, hint: Any, f: Field[Any], keys: tuple[str, ...]) -> Any:
        kind = _kind(hint)
        name = _dotted(*keys)
        if is_dataclass(kind):
            if not isinstance(value, dict):
                raise self.error(keys, f"{name} must be a table [{name}], not {value!r}")
            return self.build(kind, value, keys)  # type: ignore[arg-type]
        try:
            converted = _convert(value, kind)
        except TypeError as exc:
            raise self.error(keys, f"{name} must be {exc}, not {value!r}") from None
        meta = f.metadata
        low, high = meta["low"], meta["high"]
        if (low is not None and converted < low) or (high is not None and converted > high):
            raise self.error(keys, f"{name} = {value!r} is out of range; use "
                             f"{_number(low)} to {_number(high)}")
        if meta["check"] is not None:
            try:
                meta["check"](converted)
            except ValueError as exc:
                raise self.error(keys, f"{name}: {exc}") from None
        return converted


def _kind(hint: Any) -> Any:
    """``X`` for a hint ``X`` or ``X | None``."""
    if get_origin(hint) in (Union, types.UnionType):
        (kind,) = (arg for arg in get_args(hint) if arg is not type(None))
        return kind
    return hint


def _convert(value: Any, kind: Any) -> Any:
    """``value`` as a ``kind`` (str, Path, int, float, a tuple of one of them); TypeError
    names what it must be."""
    if get_origin(kind) is tuple:
        item = get_args(kind)[0]
        if not isinstance(value, list):
            raise TypeError(f"a list of {_TYPE_NAMES[item]}s")
        try:
            return tuple(_convert(v, item) for v in value)
        except TypeError as exc:
            raise TypeError(f"a list, each {exc}") from None
    if kind in (str, Path):
        if not isinstance(value, str) or not value or "\0" in value:
            raise TypeError("a non-empty string")
        return Path(value) if kind is Path else value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError("an integer")
        return value
    if kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(
                value):
            raise TypeError("a number")
        return float(value)
    raise AssertionError(f"no conversion for {kind!r}")  # a key of a type added without one


_BARE_KEY = r"[A-Za-z0-9_-]+"
_KEY = rf"(?:{_BARE_KEY}|\"[^\"]*\"|'[^']*')"
_TABLE_LINE = re.compile(rf"\[\[?\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*\]\]?")
_KEY_LINE = re.compile(rf"({_KEY}(?:\s*\.\s*{_KEY})*)\s*=")
_KEY_PART = re.compile(_KEY)


def _line_of(text: str, keys: tuple[str, ...]) -> int | None:
    """The line that sets ``keys`` (or the table or dotted key that holds it), or None."""
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = _TABLE_LINE.match(stripped)
        if header:
            table = _key_parts(header.group(1))
            if table == keys:
                return number
            continue
        match = _KEY_LINE.match(stripped)
        if match:
            path = (*table, *_key_parts(match.group(1)))
            if path == keys[:len(path)]:
                return number
    return None


def _key_parts(dotted: str) -> tuple[str, ...]:
    return tuple(part.strip("\"'") for part in _KEY_PART.findall(dotted))


def _dotted(*keys: str) -> str:
    return ".".join(keys)


def _number(value: float | None) -> str:
    if value is None:
        return "any"
    if not float(value).is_integer():
        return str(value)
    return f"{int(value):,}" if value >= 1_000_000 else str(int(value))


def option_type(table: type[Any], key: str) -> tuple[Callable[[str], Any], Any, str]:
    """For a command-line flag standing for ``key`` of ``table``: a converter for argparse's
    ``type=`` that applies the key's type and bounds, the key's default and its meaning."""
    (f,) = (f for f in fields(table) if f.name == key)
    kind = _kind(get_type_hints(table)[key])
    low, high = f.metadata["low"], f.metadata["high"]

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range; use {_number(low)} to "
                                             f"{_number(high)}")
        return value

    return convert, f.default, f.metadata["meaning"]


# -- writing ------------------------------------------------------------------------------------

def write_config(path: Path, config: AgentConfig) -> None:
    """Write ``config`` as TOML, leaving out limits at their defaults (atomically; it holds
    no secrets, the key is a file of its own). Raises OSError."""
    write_atomic(path, config_to_toml(config, all_limits=False).encode("utf-8"))


def config_to_toml(config: AgentConfig, *, all_limits: bool = True) -> str:
    """``config`` as TOML text; ``all_limits=False`` leaves out ``[api.limits]`` keys that
    have their default value, so a later agent's better defaults apply."""
    return tomli_w.dumps(_table(config, all_limits))


def _table(obj: Any, all_limits: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue  # TOML has no null: an unset key is left out
        if isinstance(value, ApiLimits) and not all_limits:
            defaults = ApiLimits()
            changed = {k: v for k, v in _table(value, True).items()
                       if getattr(defaults, k) != v}
            if changed:
                out[f.name] = changed
        elif is_dataclass(value):
            out[f.name] = _table(value, all_limits)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = str(value) if isinstance(value, Path) else value
    return out


# -- the reference ------------------------------------------------------------------------------

def config_reference() -> str:
    """docs/agent-config.md: every key with its type, default, allowed values and meaning."""
    lines = [
        "# Agent configuration (`agent.toml`)",
        "",
        "<!-- Generated from agent/config.py by `edge-agent config --doc`; do not edit. -->",
        "",
        *textwrap.wrap(
            "`edge-agent enroll` writes `agent.toml` into the state directory; `edge-agent "
            "run --config FILE` reads it (default `/var/lib/edgefleet/agent/agent.toml`). "
            "Every key marked required here must be given (`state_dir`, and in a `[fleet]` "
            "table the keys that say so); the others may be left out. A key the agent does "
            "not know, or a "
            "value of the wrong type or out of range, is refused at start with the key's "
            "name and its line in the file. Relative paths in `[fleet]` are taken relative "
            "to `state_dir`. `edge-agent config --config FILE` checks a file and prints its "
            "values with every default filled in.", 92, break_on_hyphens=False),
    ]
    for at, cls in _tables(AgentConfig, ()):
        heading = f"[{_dotted(*at)}]" if at else "top level"
        lines += ["", f"## {heading}", "", str(cls.__doc__).replace("``", "`"), "",
                  "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        hints = get_type_hints(cls)
        for f in fields(cls):
            kind = _kind(hints[f.name])
            if is_dataclass(kind):
                continue
            lines.append(f"| `{f.name}` | {_TYPE_NAMES[kind]} | {_default(f)} | "
                         f"{_allowed(f)} | {f.metadata['meaning']} |")
    return "\n".join(lines) + "\n"


_TYPE_NAMES: dict[Any, str] = {str: "string", Path: "path", int: "integer",
                               float: "number", tuple[str, ...]: "list of strings"}


def _tables(cls: type[Any], at: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], type[Any]]]:
    """Each table dataclass under ``cls`` with its key path, ``cls`` first."""
    yield at, cls
    hints = get_type_hints(cls)
    for f in fields(cls):
        kind = _kind(hints[f.name])
        if is_dataclass(kind):
            yield from _tables(kind, (*at, f.name))  # type: ignore[arg-type]


def _default(f: Field[Any]) -> str:
    if f.default is MISSING:
        return "required"
    if f.default is None:
        return "unset"
    if f.default == ():
        return "`[]`"
    if isinstance(f.default, int) and not isinstance(f.default, bool) and f.default >= _KIB:
        return f"`{f.default}`" + (f" ({f.default // _MIB} MiB)" if f.default % _MIB == 0
                                   else f" ({f.default // _KIB} KiB)" if f.default % _KIB == 0
                                   else "")
    return f"`{f.default}`"


def _allowed(f: Field[Any]) -> str:
    meta = f.metadata
    if meta["allowed"]:
        return str(meta["allowed"])
    if meta["low"] is not None or meta["high"] is not None:
        return f"{_number(meta['low'])} to {_number(meta['high'])}"
    if meta["in_state_dir"]:
        return "absolute, or relative to `state_dir`"
    return ""
