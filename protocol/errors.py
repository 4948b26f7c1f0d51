"""The one error the protocol package raises."""

from __future__ import annotations

__all__ = ["ProtocolError"]


class ProtocolError(Exception):
    """A fleet protocol message that does not parse or validate (bad data, never transient:
    the same bytes will fail again). The message names the field and what was expected."""
