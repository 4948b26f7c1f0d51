"""Validation of the JSON fields of protocol messages: each function takes a parsed
object (or payload) and a key, returns the value in the type the message needs, or raises
ProtocolError saying which field was wrong and what it must be. Shared by the decoders of
:mod:`protocol.messages` so every message checks the same field kinds the same way."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .errors import ProtocolError
from .names import is_valid_name

__all__ = ["MAX_INT", "PROTOCOL_VERSION", "SHA256", "as_dict", "dict_field", "float_field",
           "int_field", "message_object", "model_name", "object_of", "opt_int", "opt_sha",
           "opt_str", "sha_field", "share_field", "str_field"]

PROTOCOL_VERSION = 1
#: Integers travel as JSON numbers and are stored as SQL BIGINT: at most 2**63 - 1.
MAX_INT = 2**63 - 1
SHA256 = re.compile(r"[0-9a-f]{64}")


def object_of(payload: bytes, what: str) -> dict[str, Any]:
    """The JSON object ``payload`` holds (``what`` names it in errors)."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what} is not JSON ({exc})") from None
    except RecursionError:
        raise ProtocolError(f"{what} nests JSON too deeply") from None
    return as_dict(obj, what)


def as_dict(obj: Any, where: str) -> dict[str, Any]:
    """``obj`` if it is a JSON object (``where`` names it in errors)."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where} must be a JSON object")
    return obj


def dict_field(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The object at ``key`` (an empty one when absent)."""
    return as_dict(obj.get(key, {}), key)


def int_field(obj: Mapping[str, Any], key: str) -> int:
    """The integer at ``key``, 0 to 2**63 - 1 (a SQL BIGINT)."""
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise ProtocolError(f"field {key!r} must be an integer from 0 to 2**63 - 1, not "
                            f"{value!r}"[:200])
    return value


def opt_int(obj: Mapping[str, Any], key: str) -> int | None:
    """The integer at ``key``, or None when absent or null."""
    return None if obj.get(key) is None else int_field(obj, key)


def float_field(obj: Mapping[str, Any], key: str) -> float:
    """The finite number at ``key``."""
    value = obj.get(key)
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(
            value, bool) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise ProtocolError(f"field {key!r} must be a finite number, not {value!r}"[:200])
    return number


def share_field(obj: Mapping[str, Any], key: str) -> float:
    """The number at ``key``, between 0 and 1."""
    value = float_field(obj, key)
    if not 0.0 <= value <= 1.0:
        raise ProtocolError(f"field {key!r} must be a share between 0 and 1, not {value}")
    return value


def str_field(obj: Mapping[str, Any], key: str) -> str:
    """The non-empty string at ``key``."""
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"field {key!r} must be a non-empty string, not {value!r}")
    return value


def opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    """The non-empty string at ``key``, or None when absent or null."""
    return None if obj.get(key) is None else str_field(obj, key)


def sha_field(obj: Mapping[str, Any], key: str) -> str:
    """The sha256 (64 lowercase hex digits) at ``key``."""
    value = obj.get(key)
    if not isinstance(value, str) or not SHA256.fullmatch(value):
        raise ProtocolError(f"field {key!r} must be 64 lowercase hex digits")
    return value


def opt_sha(obj: Mapping[str, Any], key: str) -> str | None:
    """The sha256 at ``key``, or None when absent or null."""
    return None if obj.get(key) is None else sha_field(obj, key)


def model_name(name: str) -> str:
    """``name`` if it is a valid model name (protocol.names)."""
    if not is_valid_name(name):
        raise ProtocolError(f"model name {name!r} is not valid")
    return name


def message_object(payload: bytes, what: str, max_bytes: int | None = None) -> dict[str, Any]:
    """The JSON object of a message payload of at most ``max_bytes``, of this protocol's
    version (``what`` names the message in errors)."""
    if max_bytes is not None and len(payload) > max_bytes:
        raise ProtocolError(f"{what} of {len(payload)} bytes exceeds the {max_bytes // 1024} "
                            "KiB limit of its kind")
    obj = object_of(payload, what)
    version = obj.get("protocol")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{what} has protocol version {version!r}; this side speaks "
                            f"{PROTOCOL_VERSION}: upgrade the older of agent and server")
    return obj
