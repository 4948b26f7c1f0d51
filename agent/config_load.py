"""Reading the agent's config file: every key checked against its definition
(:mod:`agent.config`), an unknown key or a bad value refused with the key's name and its
line in the file; and the same checks for a command-line flag standing for a key."""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from .config import TYPE_NAMES, AgentConfig, FleetSettings, bound_text, dotted, field_kind
from .errors import AgentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["load_config", "option_type"]

#: A config file bigger than this is not a config file.
_MAX_FILE_BYTES = 1 << 20
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
                hint = (f"did you mean {dotted(*at, close[0])}?" if close
                        else f"known keys{f' in [{dotted(*at)}]' if at else ''}: "
                        f"{', '.join(known)}")
                raise self.error((*at, key), f"unknown key {dotted(*at, key)}; {hint} "
                                 "(docs/agent-config.md lists them all)")
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name in table:
                values[name] = self._value(table[name], hints[name], f, (*at, name))
            elif f.default is MISSING and f.default_factory is MISSING:
                raise self.error(at, f"missing key {dotted(*at, name)} "
                                 f"({f.metadata['meaning']})")
        return cls(**values)

    def _value(self, value: Any, hint: Any, f: Field[Any], keys: tuple[str, ...]) -> Any:
        kind = field_kind(hint)
        name = dotted(*keys)
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
                             f"{bound_text(low)} to {bound_text(high)}")
        if meta["check"] is not None:
            try:
                meta["check"](converted)
            except ValueError as exc:
                raise self.error(keys, f"{name}: {exc}") from None
        return converted


def _convert(value: Any, kind: Any) -> Any:
    """``value`` as a ``kind`` (str, Path, bool, int, float, a tuple of one of them); TypeError
    names what it must be."""
    if get_origin(kind) is tuple:
        item = get_args(kind)[0]
        if not isinstance(value, list):
            raise TypeError(f"a list of {TYPE_NAMES[item]}s")
        try:
            return tuple(_convert(v, item) for v in value)
        except TypeError as exc:
            raise TypeError(f"a list, each {exc}") from None
    if kind in (str, Path):
        if not isinstance(value, str) or not value or "\0" in value:
            raise TypeError("a non-empty string")
        return Path(value) if kind is Path else value
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError("true or false")
        return value
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


def option_type(table: type[Any], key: str) -> tuple[Callable[[str], Any], Any, str]:
    """For a command-line flag standing for ``key`` of ``table``: a converter for argparse's
    ``type=`` that applies the key's type and bounds, the key's default and its meaning."""
    (f,) = (f for f in fields(table) if f.name == key)
    kind = field_kind(get_type_hints(table)[key])
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
            raise argparse.ArgumentTypeError(f"{text} is out of range; use {bound_text(low)} to "
                                             f"{bound_text(high)}")
        return value

    return convert, f.default, f.metadata["meaning"]
