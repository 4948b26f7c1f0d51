"""The fleet protocol, pure: what the server and the agents say to each other.

No I/O and no third-party imports: :mod:`protocol.messages` (payload records and their
codecs), :mod:`protocol.topics` (the MQTT topic tree), :mod:`protocol.names` (the one rule
for device, fleet and model names) and :mod:`protocol.defaults` (well-known ports). The
MQTT connection itself is :mod:`transport.mqtt`. docs/transport.md describes the protocol.
"""

from __future__ import annotations

from .errors import ProtocolError

__all__ = ["ProtocolError"]
