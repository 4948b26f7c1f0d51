"""Monitoring's configuration: the ``[monitoring]`` table of the server's TOML config.

Frozen dataclasses with bounded defaults; :func:`load_config` is the only reader of the
file and refuses unknown keys and values out of bounds, naming the key. Example
(docs/monitoring.md has every key)::

    [monitoring]
    evaluate_every_s = 15
    scrape_token_file = "/etc/edgefleet/scrape.token"

    [[monitoring.webhook]]
    url = "https://alerts.example.com/hook"

    [[monitoring.alert]]
    kind = "drift"          # drift | error_rate | offline | rollout_halted
    psi = 0.25
    devices = 1
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomllib

from fleet_server.errors import MonitoringError

__all__ = ["ALERT_KINDS", "AlertRule", "MonitoringConfig", "Webhook", "load_config",
           "parse_config", "scrape_token"]

#: The kinds of alert rule; ``rollout_halted`` turns ``rollout.halted`` events into alerts.
ALERT_KINDS = ("drift", "error_rate", "offline", "rollout_halted")
_MAX_WEBHOOKS = 16
_MAX_RULES = 64


@dataclass(frozen=True)
class AlertRule:
    """One alert rule. Which fields count depends on ``kind``:

    - ``drift``: fires for a model when at least ``devices`` devices reported a drift PSI
      above ``psi`` within the last ``window_s`` seconds;
    - ``error_rate``: fires for a (group, model) whose failed requests per request exceeded
      ``rate`` over ``window_s``, once it served at least ``min_requests``;
    - ``offline``: fires for a device not heard from for ``after_s`` seconds;
    - ``rollout_halted``: fires for a rollout when a ``rollout.halted`` event is logged, and
      resolves when the rollout is resumed, aborted, promoted or succeeds.

    ``model`` / ``group`` limit a rule to one model / group.
    """

    kind: str
    psi: float = 0.25
    devices: int = 1
    rate: float = 0.05
    min_requests: int = 20
    window_s: float = 300.0
    after_s: float = 600.0
    model: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class Webhook:
    """Where alert notifications are POSTed (JSON), with bounded time and retries."""

    url: str
    timeout_s: float = 5.0
    retries: int = 4
    backoff_s: float = 1.0
    #: Extra request headers (for example an Authorization the receiver wants).
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MonitoringConfig:
    """How the server monitors: time series retention, alert rules, webhooks, scrape token."""

    #: Seconds between evaluations of the alert rules (and compactions of the series).
    evaluate_every_s: float = 15.0
    #: Minute points are kept this long, then rolled into hour points.
    minute_retention_s: float = 2 * 86400.0
    #: Hour points are kept this long.
    hour_retention_s: float = 90 * 86400.0
    #: The samples themselves (the registry's ``telemetry`` table, as devices sent them)
    #: are kept this long; the series keep their sums.
    telemetry_retention_s: float = 7 * 86400.0
    #: A file holding a token that may read ``/metrics`` only (the admin token may too).
    scrape_token_file: Path | None = None
    webhooks: tuple[Webhook, ...] = ()
    rules: tuple[AlertRule, ...] = (
        AlertRule("drift"), AlertRule("error_rate"), AlertRule("offline"),
        AlertRule("rollout_halted"))


def load_config(path: Path) -> MonitoringConfig:
    """The ``[monitoring]`` table of the TOML file at ``path`` (defaults if it has none)."""
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise MonitoringError(f"cannot read the server config {path} ({exc.strerror}); check "
                              "the --config path") from exc
    except tomllib.TOMLDecodeError as exc:
        raise MonitoringError(f"{path} is not valid TOML ({exc}); fix it") from exc
    _known(document, {"monitoring"}, f"{path}: the tables")  # a typo'd table is no default
    table = document.get("monitoring", {})
    if not isinstance(table, dict):
        raise MonitoringError(f"{path}: [monitoring] must be a table")
    return parse_config(table, base=path.parent, where=str(path))


def parse_config(table: Mapping[str, Any], *, base: Path = Path(),
                 where: str = "config") -> MonitoringConfig:
    """A MonitoringConfig from the ``[monitoring]`` table; relative paths are from ``base``."""
    _known(table, {"evaluate_every_s", "minute_retention_s", "hour_retention_s",
                   "telemetry_retention_s", "scrape_token_file", "webhook", "alert"},
           f"{where} [monitoring]")
    defaults = MonitoringConfig()
    token = table.get("scrape_token_file")
    if token is not None and not isinstance(token, str):
        raise MonitoringError(f"{where}: scrape_token_file must be a path (a string)")
    hooks = _list(table.get("webhook", []), "webhook", where, _MAX_WEBHOOKS)
    rules = table.get("alert")
    return MonitoringConfig(
        evaluate_every_s=_number(table, "evaluate_every_s", defaults.evaluate_every_s,
                                 0.2, 3600, where=where),
        minute_retention_s=_number(table, "minute_retention_s", defaults.minute_retention_s,
                                   600, 90 * 86400, where=where),
        hour_retention_s=_number(table, "hour_retention_s", defaults.hour_retention_s,
                                 3600, 3650 * 86400, where=where),
        telemetry_retention_s=_number(table, "telemetry_retention_s",
                                      defaults.telemetry_retention_s, 3600, 3650 * 86400,
                                      where=where),
        scrape_token_file=None if token is None else base / token,
        webhooks=tuple(_webhook(h, f"{where} webhook {i + 1}") for i, h in enumerate(hooks)),
        rules=defaults.rules if rules is None else tuple(
            _rule(r, f"{where} alert {i + 1}")
            for i, r in enumerate(_list(rules, "alert", where, _MAX_RULES))))


def _webhook(table: Mapping[str, Any], where: str) -> Webhook:
    _known(table, {f.name for f in fields(Webhook)}, where)
    url = table.get("url")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or \
            not urlsplit(url).hostname:
        raise MonitoringError(f"{where}: url must be an http:// or https:// URL, got {url!r}")
    headers = table.get("headers", {})
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.isprintable()
            for k, v in headers.items()):
        raise MonitoringError(f"{where}: headers must be a table of strings")
    return Webhook(url=url, timeout_s=_number(table, "timeout_s", 5.0, 0.1, 60, where=where),
                   retries=int(_number(table, "retries", 4, 0, 20, where=where,
                                       integer=True)),
                   backoff_s=_number(table, "backoff_s", 1.0, 0.01, 600, where=where),
                   headers=dict(headers))


def _rule(table: Mapping[str, Any], where: str) -> AlertRule:
    _known(table, {f.name for f in fields(AlertRule)}, where)
    kind = table.get("kind")
    if kind not in ALERT_KINDS:
        raise MonitoringError(f"{where}: kind must be one of {', '.join(ALERT_KINDS)}, got "
                              f"{kind!r}")
    # A key another kind uses would be silently ignored here: refused, so a misplaced
    # threshold does not leave the rule at its default.
    _known(table, {"kind", *_KIND_KEYS[kind]}, f"{where} (kind {kind})")
    for name in ("model", "group"):
        if table.get(name) is not None and not isinstance(table[name], str):
            raise MonitoringError(f"{where}: {name} must be a string")
    d = AlertRule(kind)
    return AlertRule(
        kind=kind, psi=_number(table, "psi", d.psi, 0.001, 100, where=where),
        devices=int(_number(table, "devices", d.devices, 1, 1_000_000, where=where,
                            integer=True)),
        rate=_number(table, "rate", d.rate, 0.0001, 1, where=where),
        min_requests=int(_number(table, "min_requests", d.min_requests, 1, 10**9, where=where,
                                 integer=True)),
        window_s=_number(table, "window_s", d.window_s, 60, 7 * 86400, where=where),
        after_s=_number(table, "after_s", d.after_s, 10, 365 * 86400, where=where),
        model=table.get("model"), group=table.get("group"))


#: The keys each kind of rule reads (besides ``kind``).
_KIND_KEYS: dict[str, frozenset[str]] = {
    "drift": frozenset({"psi", "devices", "window_s", "model", "group"}),
    "error_rate": frozenset({"rate", "min_requests", "window_s", "model", "group"}),
    "offline": frozenset({"after_s", "group"}),
    "rollout_halted": frozenset(),
}


def _known(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise MonitoringError(f"{where}: unknown key(s) {', '.join(unknown)}; the keys are "
                              f"{', '.join(sorted(allowed))}")


def _list(value: object, name: str, where: str, limit: int) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise MonitoringError(f"{where}: {name} must be an array of tables ([[monitoring."
                              f"{name}]])")
    if len(value) > limit:
        raise MonitoringError(f"{where}: at most {limit} [[monitoring.{name}]] entries")
    return value


def _number(table: Mapping[str, Any], name: str, default: float, low: float, high: float,
            *, where: str, integer: bool = False) -> float:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not float(value).is_integer()):
        raise MonitoringError(f"{where}: {name} must be a number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise MonitoringError(f"{where}: {name} = {value} is outside {low:g}..{high:g}")
    return float(value)


def scrape_token(config: MonitoringConfig) -> str | None:
    """The scrape token in ``config.scrape_token_file`` (None if none is configured)."""
    path = config.scrape_token_file
    if path is None:
        return None
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise MonitoringError(f"cannot read the scrape token {path} ({exc}); write the token "
                              "Prometheus sends (one line) into it") from exc
    if len(token) < 16:
        raise MonitoringError(f"the scrape token in {path} has {len(token)} characters; use "
                              "at least 16 random ones (e.g. `openssl rand -hex 32`)")
    return token
