"""The fleet simulator's MQTT framing (benchmarks/fleet_sim/mqtt_wire.py): what the
benchmarks' devices send and parse must be MQTT, or every figure they give is wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ProtocolError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from fleet_sim.mqtt_wire import (
    PUBLISH,
    _varint,
    publish_packet,
    read_varint,
)


@given(st.integers(min_value=0, max_value=268_435_455))
def test_remaining_length_round_trips(n: int) -> None:
    raw = b"\x30" + _varint(n)
    assert read_varint(raw, 1) == (n, len(raw))
    # Cut anywhere inside, it asks for more bytes instead of guessing.
    assert read_varint(raw[:-1], 1) is None


def test_a_remaining_length_of_five_bytes_is_refused() -> None:
    with pytest.raises(ProtocolError, match="malformed MQTT remaining length"):
        read_varint(b"\xff\xff\xff\xff\x01", 0)


def test_a_publish_packet_frames_topic_id_and_payload() -> None:
    packet = publish_packet(7, "edgefleet/f/devices/d/events", b"{}")
    assert packet[0] == (PUBLISH << 4) | 0x02
    length, start = read_varint(packet, 1) or (0, 0)
    assert len(packet) - start == length
    body = packet[start:]
    assert body[:2] == b"\x00\x1c"
    assert body[2:30] == b"edgefleet/f/devices/d/events"
    assert body[30:32] == b"\x00\x07"
    assert body[32:] == b"\x00{}"
