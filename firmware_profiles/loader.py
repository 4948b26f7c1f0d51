"""Read and validate firmware profiles (TOML, schema in docs/profiles.md).

:func:`parse_profile` is pure (text and a file name in, a :class:`Profile` out); the other
functions only add file reading. Every problem raises :class:`InvalidProfileError` naming the
file and the dotted key, so a malformed profile costs its author one look.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Ubuntu 22.04 gateways): the same parser, from PyPI
    import tomli as tomllib

from .errors import InvalidProfileError, UnknownProfileError
from .model import (
    ACCELERATOR_KINDS,
    ARCHES,
    DTYPES,
    FEATURES,
    FORMATS,
    RUNTIMES,
    SCHEMA_VERSION,
    Accelerator,
    Cpu,
    Profile,
)

__all__ = ["PROFILES_DIR", "get_profile", "load_profile", "load_profiles", "parse_profile"]

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


class _Table:
    """One TOML table being read: typed getters, and a check that no key was left unread."""

    def __init__(self, data: dict[str, Any], file: str, prefix: str = "") -> None:
        self._data, self._file, self._prefix = data, file, prefix
        self._read: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def fail(self, key: str, problem: str) -> InvalidProfileError:
        return InvalidProfileError(self._file, self._key(key), problem)

    def _get(self, key: str, kind: type | tuple[type, ...], kind_name: str,
             default: Any = None, required: bool = True) -> Any:
        self._read.add(key)
        if key not in self._data:
            if required:
                raise self.fail(key, f"missing; add it ({kind_name}), see docs/profiles.md")
            return default
        value = self._data[key]
        # bool is an int in Python; a TOML `true` where a number belongs is still a mistake.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.fail(key, f"expected {kind_name}, got {_toml_type(value)} {value!r}")
        return value

    def text(self, key: str, required: bool = True, default: str = "") -> str:
        return str(self._get(key, str, "a string", default, required))

    def flag(self, key: str, default: bool = False) -> bool:
        return bool(self._get(key, bool, "true or false", default, required=False))

    def count(self, key: str, minimum: int = 0, required: bool = True, default: int = 0) -> int:
        value = int(self._get(key, int, "an integer", default, required))
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        return value

    def choice(self, key: str, allowed: Iterable[str]) -> str:
        value = self.text(key)
        _check_allowed(self, key, value, allowed)
        return value

    def choices(self, key: str, allowed: Iterable[str], required: bool = True,
                alternatives: bool = False) -> tuple[str, ...]:
        values = self._get(key, list, "an array of strings", [], required)
        allowed = tuple(allowed)
        for index, value in enumerate(values):
            item = f"{key}[{index}]"
            if not isinstance(value, str):
                raise self.fail(item, f"expected a string, got {_toml_type(value)} {value!r}")
            for option in value.split("|") if alternatives else [value]:
                _check_allowed(self, item, option, allowed)
        return tuple(values)

    def strings(self, key: str) -> tuple[str, ...]:
        values = self._get(key, list, "an array of strings", [], required=False)
        for index, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise self.fail(f"{key}[{index}]", f"expected a non-empty string, got {value!r}")
        return tuple(values)

    def table(self, key: str) -> _Table:
        value = self._get(key, dict, "a table")
        return _Table(value, self._file, f"{self._key(key)}.")

    def tables(self, key: str) -> list[_Table]:
        values = self._get(key, list, "an array of tables ([[...]])", [], required=False)
        tables = []
        for index, value in enumerate(values):
            if not isinstance(value, dict):
                raise self.fail(f"{key}[{index}]", f"expected a table, got {value!r}")
            tables.append(_Table(value, self._file, f"{self._key(key)}[{index}]."))
        return tables

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            raise self.fail(unknown[0], "unknown key (misspelt?); allowed here: "
                            + ", ".join(sorted(self._read)))


def _check_allowed(table: _Table, key: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise table.fail(key, f"unknown value '{value}'; expected one of: {', '.join(allowed)}")


def _toml_type(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def parse_profile(text: str, file: str) -> Profile:
    """Parse and validate one profile; ``file`` is used in messages and must be NAME.toml."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidProfileError(file, "", f"not valid TOML: {exc}") from exc
    top = _Table(data, file)
    version = top.count("schema_version")
    if version != SCHEMA_VERSION:
        raise top.fail("schema_version", f"unsupported version {version}; this edgefleet "
                       f"reads version {SCHEMA_VERSION}")
    name = top.text("name")
    stem = Path(file).stem
    if name != stem:
        raise top.fail("name", f"'{name}' does not match the file name '{stem}.toml'; "
                       "rename one of them")
    description = top.text("description")
    requires_accelerator = top.flag("requires_accelerator")

    cpu_table = top.table("cpu")
    cpu = Cpu(arch=cpu_table.choice("arch", ARCHES),
              features=cpu_table.choices("features", FEATURES, alternatives=True),
              cores=cpu_table.count("cores", minimum=1),
              fast_int8=cpu_table.flag("fast_int8"))
    cpu_table.finish()

    memory = top.table("memory")
    ram_mb = memory.count("ram_mb", minimum=1)
    model_budget_mb = memory.count("model_budget_mb", minimum=1)
    storage_mb = memory.count("storage_mb", minimum=1)
    if model_budget_mb > ram_mb:
        raise memory.fail("model_budget_mb", f"{model_budget_mb} MB exceeds ram_mb "
                          f"({ram_mb} MB); the model budget is part of the device's memory")
    memory.finish()

    models = top.table("models")
    formats = models.choices("formats", FORMATS)
    dtypes = models.choices("dtypes", DTYPES)
    avoid_ops = models.strings("avoid_ops")
    for key, values in (("formats", formats), ("dtypes", dtypes)):
        if not values:
            raise models.fail(key, "must list at least one entry, most preferred first")
    models.finish()

    accelerators = tuple(_accelerator(t) for t in top.tables("accelerators"))
    if requires_accelerator and not accelerators:
        raise top.fail("requires_accelerator", "is true but no [[accelerators]] are listed")
    top.finish()
    return Profile(name=name, description=description, cpu=cpu, accelerators=accelerators,
                   requires_accelerator=requires_accelerator, ram_mb=ram_mb,
                   model_budget_mb=model_budget_mb, storage_mb=storage_mb, formats=formats,
                   dtypes=dtypes, avoid_ops=avoid_ops, source=file)


def _accelerator(table: _Table) -> Accelerator:
    runtime = table.choice("runtime", RUNTIMES)
    library = table.text("library", required=False, default="") or None
    if library is not None and runtime != "litert":
        raise table.fail("library", "only LiteRT delegates are loaded from a library; "
                         "remove it or set runtime = \"litert\"")
    accelerator = Accelerator(name=table.text("name"), kind=table.choice("kind", ACCELERATOR_KINDS),
                              runtime=runtime, provider=table.text("provider"), library=library,
                              dtypes=table.choices("dtypes", DTYPES))
    table.finish()
    return accelerator


def load_profile(path: Path) -> Profile:
    """Read and validate the profile file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidProfileError(str(path), "", f"cannot read it ({exc})") from exc
    return parse_profile(text, str(path))


def load_profiles(directory: Path | None = None) -> list[Profile]:
    """Every ``*.toml`` profile in ``directory`` (default: the packaged ones), by name."""
    directory = directory or PROFILES_DIR
    profiles = [load_profile(path) for path in sorted(directory.glob("*.toml"))]
    if not profiles:
        raise UnknownProfileError(f"{directory}: no *.toml profiles found; pass a directory "
                                  "of profiles or reinstall edgefleet")
    return profiles


def get_profile(name: str, directory: Path | None = None) -> Profile:
    """The profile called ``name`` in ``directory`` (default: the packaged ones)."""
    directory = directory or PROFILES_DIR
    path = directory / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(directory.glob("*.toml")))
        raise UnknownProfileError(f"no profile named '{name}' in {directory}; known: {known}")
    return load_profile(path)
