"""The one naming rule for everything that becomes a path, a topic level or a certificate CN.

Device ids, fleet names, server identities and model names all end up in places with
reserved characters: MQTT topic levels (``edgefleet/{fleet}/devices/{device}/...``), X.509
common names (at most 64 characters), directory names on devices and keys of protocol
messages. One rule for all of them means a device the CA can certify is one the registry
accepts and whose topics the broker's ACL can name, and a model the server can sign is one
every device can store.
"""

from __future__ import annotations

import re

__all__ = ["NAME_PATTERN", "InvalidNameError", "check_name", "is_valid_name"]

#: Letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit (so never ``.``
#: or ``..``), 1 to 64 characters (the X.509 limit for a common name). No ``/``, ``+``,
#: ``#``, spaces or control characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class InvalidNameError(ValueError):
    """A name that breaks :data:`NAME_PATTERN`; the message says how to fix it."""


def is_valid_name(name: object) -> bool:
    """True if ``name`` is a string that follows :data:`NAME_PATTERN`."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def check_name(name: object, what: str = "device id") -> str:
    """Return ``name`` if it is valid; else raise :class:`InvalidNameError` naming ``what``."""
    if not is_valid_name(name):
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it becomes an MQTT topic level, a file name "
            "and a certificate common name)")
    assert isinstance(name, str)
    return name
