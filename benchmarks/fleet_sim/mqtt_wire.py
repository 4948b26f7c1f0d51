"""The packets of a minimal MQTT 5 client, enough for a simulated device.

A load generator, not product code: CONNECT as the agent's paho client sends it, QoS 1
PUBLISH and SUBSCRIBE, and the variable-length integer both directions need."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from protocol.errors import ProtocolError

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
#: The agent's settings (transport/mqtt.py).
KEEPALIVE_S = 60
SESSION_EXPIRY_S = 7 * 24 * 3600


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str, will_topic: str, will_payload: bytes) -> bytes:
    """CONNECT as the agent's paho client sends it: MQTT 5, clean_start False with a session
    expiry, a QoS 1 will, keepalive 60 s."""
    flags = 0x04 | 0x08  # will flag, will QoS 1; clean start off (persistent session)
    properties = b"\x11" + struct.pack(">I", SESSION_EXPIRY_S)
    body = (_str("MQTT") + bytes([5, flags]) + struct.pack(">H", KEEPALIVE_S)
            + _varint(len(properties)) + properties
            + _str(client_id) + b"\x00" + _str(will_topic)
            + struct.pack(">H", len(will_payload)) + will_payload)
    return _packet(CONNECT << 4, body)


def subscribe_packet(mid: int, topics: Sequence[str]) -> bytes:
    """SUBSCRIBE to ``topics`` at QoS 1."""
    body = struct.pack(">H", mid) + b"\x00" + b"".join(_str(t) + b"\x01" for t in topics)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def publish_packet(mid: int, topic: str, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH without properties."""
    return _packet((PUBLISH << 4) | 0x02, _str(topic) + struct.pack(">H", mid) + b"\x00"
                   + payload)


def read_varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None if the buffer ends inside it."""
    value, shift = 0, 0
    while pos < len(data):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ProtocolError("malformed MQTT remaining length")
    return None
