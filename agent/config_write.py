"""Writing the agent's config out, from its one definition (:mod:`agent.config`): as a TOML
file (tomli-w, so any path round-trips) and as the reference of every key that
``edge-agent config --doc`` prints and docs/agent-config.md holds."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import MISSING, Field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

from common.atomic import write_atomic

from .config import TYPE_NAMES, AgentConfig, ApiLimits, bound_text, dotted, field_kind

__all__ = ["config_reference", "config_to_toml", "write_config"]

_KIB, _MIB = 1 << 10, 1 << 20


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
        heading = f"[{dotted(*at)}]" if at else "top level"
        lines += ["", f"## {heading}", "", str(cls.__doc__).replace("``", "`"), "",
                  "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        hints = get_type_hints(cls)
        for f in fields(cls):
            kind = field_kind(hints[f.name])
            if is_dataclass(kind):
                continue
            lines.append(f"| `{f.name}` | {TYPE_NAMES[kind]} | {_default(f)} | "
                         f"{_allowed(f)} | {f.metadata['meaning']} |")
    return "\n".join(lines) + "\n"


def _tables(cls: type[Any], at: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], type[Any]]]:
    """Each table dataclass under ``cls`` with its key path, ``cls`` first."""
    yield at, cls
    hints = get_type_hints(cls)
    for f in fields(cls):
        kind = field_kind(hints[f.name])
        if is_dataclass(kind):
            yield from _tables(kind, (*at, f.name))  # type: ignore[arg-type]


def _default(f: Field[Any]) -> str:
    if f.default is MISSING:
        return "required"
    if f.default is None:
        return "unset"
    if isinstance(f.default, bool):
        return f"`{str(f.default).lower()}`"
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
        return f"{bound_text(meta['low'])} to {bound_text(meta['high'])}"
    if meta["in_state_dir"]:
        return "absolute, or relative to `state_dir`"
    return ""
