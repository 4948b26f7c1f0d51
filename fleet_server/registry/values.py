"""Checks of what callers hand the registry, and how values are stored (JSON, times).

Every check raises :class:`~fleet_server.errors.RegistryError` with a message that says how
to fix the value; the registry checks before it writes, so a refused call changes nothing.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any

from fleet_server.errors import RegistryError
from protocol.names import InvalidNameError, check_name

__all__ = ["MAX_LABEL", "SHA256_HEX", "check_device_id", "check_label", "clean_tags", "dumps",
           "iso"]

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_LABEL = 128


def check_device_id(device_id: str) -> None:
    """Device ids are MQTT client ids, certificate CNs and topic levels: the one name rule."""
    try:
        check_name(device_id)
    except InvalidNameError as exc:
        raise RegistryError(str(exc)) from None


def check_label(what: str, value: str) -> None:
    """Groups, profiles, tags, event kinds and bundle names: short printable text."""
    if (not isinstance(value, str) or not value or value != value.strip()
            or len(value) > MAX_LABEL or not value.isprintable()):
        raise RegistryError(f"invalid {what} {value!r}: use 1-{MAX_LABEL} printable "
                            "characters without leading or trailing spaces")


def clean_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """The tags sorted, without duplicates, each checked."""
    if isinstance(tags, str):
        raise RegistryError(f"tags must be a list of strings, got the string {tags!r}")
    cleaned = tuple(sorted(set(tags)))
    for tag in cleaned:
        check_label("tag", tag)
    return cleaned


def dumps(obj: Any, what: str) -> str:
    """``obj`` as the registry stores JSON: compact, keys sorted, no NaN."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} is not JSON-serialisable ({exc}); send plain objects, "
                            "lists, strings, finite numbers, booleans and null") from exc


def iso(at: float) -> str:
    """A Unix time as ISO 8601 UTC, for messages."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
