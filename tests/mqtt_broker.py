"""Real Mosquitto for tests: a fleet CA with identities, brokers on free ports, and MQTT
clients that record what happens to them and wait for it with timeouts (never fixed sleeps).

Shared by the broker tests and, later, the agent's transport tests. Every broker is a
private ``mosquitto`` process with its own configuration, port and data directory; the
system broker on port 1883 is never used.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common.atomic import write_atomic
from fleet_server.broker import Broker, BrokerConfig
from fleet_server.ca import FleetCA
from fleet_server.mosquitto import find_mosquitto
from protocol.topics import device_topic
from transport.mqtt import TLSIdentity, close_client
from transport.x509 import make_device_key_and_csr

FLEET = "testfleet"
#: Long enough for a loaded CI machine, short enough that a hang fails the test quickly.
TIMEOUT = 5.0


def require_mosquitto() -> str:
    """The mosquitto executable. Its absence fails the test: the transport is proved only
    against a real broker (scripts/install.sh installs it)."""
    executable = find_mosquitto()
    if executable is None:
        pytest.fail("mosquitto is not installed; run scripts/install.sh (apt-get install "
                    "mosquitto)")
    return executable


@dataclass
class TestFleet:
    """A fleet CA and the identity files issued from it, under one directory."""

    __test__ = False  # not a test class, despite the name

    ca: FleetCA
    directory: Path

    @classmethod
    def create(cls, directory: Path, fleet: str = FLEET) -> TestFleet:
        """A new CA in ``directory/ca`` for ``fleet``."""
        return cls(FleetCA.create(directory / "ca", fleet), directory)

    def broker_config(self, data_dir: Path, **options: Any) -> BrokerConfig:
        """An embedded broker on a free localhost port, with a server certificate (written
        beside ``data_dir``)."""
        tls = self.ca.write_identity(self.ca.issue_server_cert(),
                                     data_dir.with_name(f"{data_dir.name}-tls"), "broker")
        return BrokerConfig(self.ca.fleet, data_dir, tls, bind_address="127.0.0.1",
                            **options)

    def server_identity(self, name: str = "fleet-server") -> TLSIdentity:
        """The fleet server's client identity."""
        return self.ca.write_identity(self.ca.issue_client_cert(name), self.directory / name)

    def device_identity(self, device_id: str) -> TLSIdentity:
        """A device identity made the way enrollment makes it: key and CSR on the device,
        certificate from the CA."""
        key_pem, csr_pem = make_device_key_and_csr(device_id)
        directory = self.directory / "devices" / device_id
        write_atomic(directory / "device.key", key_pem, 0o600)
        write_atomic(directory / "device.crt", self.ca.sign_device_csr(csr_pem, device_id))
        write_atomic(directory / "ca.crt", self.ca.cert_pem)
        return TLSIdentity(directory / "ca.crt", directory / "device.crt",
                           directory / "device.key")

    def topic(self, device_id: str, leaf: str) -> str:
        """A topic of one device of this fleet."""
        return device_topic(self.ca.fleet, device_id, leaf)


@dataclass
class Recorder:
    """A paho client with a network thread that records connects, disconnects, messages,
    SUBACKs and PUBACKs, and waits for them."""

    client: Client
    messages: list[MQTTMessage] = field(default_factory=list)
    disconnects: list[ReasonCode] = field(default_factory=list)
    connack: tuple[ReasonCode, bool] | None = None
    _subacks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    _pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def connect(self) -> bool:
        """Connect (the settings stored by create_client) and wait for the CONNACK; returns
        whether the broker resumed a session (session_present)."""
        self.client.reconnect()
        self.client.loop_start()
        self.wait(lambda: self.connack is not None, "a CONNACK")
        assert self.connack is not None
        code, session_present = self.connack
        assert not code.is_failure, f"connection refused: {code}"
        return session_present

    def subscribe(self, *topics: str, qos: int = 1) -> list[ReasonCode]:
        """Subscribe and return the SUBACK's reason codes, one per topic."""
        _, mid = self.client.subscribe([(t, qos) for t in topics])
        assert mid is not None, "subscribe() failed: the client is not connected"
        self.wait(lambda: mid in self._subacks, f"the SUBACK for {topics}")
        return self._subacks[mid]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish with QoS 1 and return the PUBACK's reason code."""
        mid = self.client.publish(topic, payload, qos=1, retain=retain).mid
        self.wait(lambda: mid in self._pubacks, f"the PUBACK for {topic}")
        return self._pubacks[mid]

    def wait_message(self, topic: str, payload: bytes | None = None) -> MQTTMessage:
        """The first message received on ``topic`` (with ``payload``, if given)."""
        def found() -> MQTTMessage | None:
            return next((m for m in self.messages if m.topic == topic
                         and (payload is None or m.payload == payload)), None)
        self.wait(lambda: found() is not None, f"a message on {topic}")
        message = found()
        assert message is not None
        return message

    def topics(self) -> set[str]:
        """Topics of every message received so far."""
        with self._changed:
            return {m.topic for m in self.messages}

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        """Wait until ``condition()`` holds, at most TIMEOUT seconds."""
        with self._changed:
            if not self._changed.wait_for(condition, TIMEOUT):
                raise AssertionError(f"timed out after {TIMEOUT} s waiting for {what}")

    def close(self) -> None:
        """Disconnect cleanly (the session stays on the broker) and stop the thread."""
        if self.client.is_connected():
            before = len(self.disconnects)
            self.client.disconnect()
            # Once on_disconnect ran, DISCONNECT is sent and the socket closed.
            self.wait(lambda: len(self.disconnects) > before, "the disconnect")
        close_client(self.client)

    def _notify(self, update: Callable[[], None]) -> None:
        with self._changed:
            update()
            self._changed.notify_all()

    def _on_connect(self, _client: Client, _userdata: object, flags: ConnectFlags,
                    code: ReasonCode, _properties: Properties | None) -> None:
        self._notify(lambda: setattr(self, "connack", (code, flags.session_present)))

    def _on_disconnect(self, _client: Client, _userdata: object, _flags: DisconnectFlags,
                       code: ReasonCode, _properties: Properties | None) -> None:
        self._notify(lambda: self.disconnects.append(code))

    def _on_message(self, _client: Client, _userdata: object, message: MQTTMessage) -> None:
        self._notify(lambda: self.messages.append(message))

    def _on_subscribe(self, _client: Client, _userdata: object, mid: int,
                      codes: list[ReasonCode], _properties: Properties | None) -> None:
        self._notify(lambda: self._subacks.__setitem__(mid, codes))

    def _on_publish(self, _client: Client, _userdata: object, mid: int, code: ReasonCode,
                    _properties: Properties | None) -> None:
        self._notify(lambda: self._pubacks.__setitem__(mid, code))


@contextmanager
def recorders(broker: Broker) -> Iterator[Callable[..., Recorder]]:
    """A factory of connected recorders for ``broker``; all are closed on exit."""
    made: list[Recorder] = []

    def connect(identity: TLSIdentity,
                protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5) -> Recorder:
        recorder = Recorder(broker.client(identity, protocol))
        made.append(recorder)
        recorder.connect()
        return recorder

    try:
        yield connect
    finally:
        for recorder in made:
            recorder.close()


def connection_outcome(client: Client, host: str, port: int) -> str:
    """Try one connection without a network thread; "connected", or why it failed.

    For clients that must be refused: no reconnect loop runs, so nothing outlives the call.
    """
    outcome: list[str] = []
    client.on_connect = lambda *args: outcome.append(
        "connected" if not args[3].is_failure else f"refused: {args[3]}")
    client.on_disconnect = lambda *args: outcome.append(f"disconnected: {args[3]}")
    try:
        client.connect(host, port)
    except OSError as exc:  # ssl.SSLError included: the handshake itself failed
        return f"handshake failed: {exc}"
    deadline = time.monotonic() + TIMEOUT
    try:
        while not outcome and time.monotonic() < deadline:
            client.loop(timeout=0.05)
    finally:
        client.disconnect()
    return outcome[0] if outcome else "no answer"


def stalled_subscriber(address: Any, identity: TLSIdentity, topic: str) -> Any:
    """A device that connects (persistent session), subscribes to ``topic`` at QoS 1 and
    then never reads its socket again: what a hostile or wedged client looks like to the
    broker. Returns the TLS socket; close it to end the connection.

    Raw MQTT 3.1.1 packets, since every client library reads its socket by itself.
    """
    import socket
    import struct

    from transport.mqtt import tls_context

    def packet(kind: int, body: bytes) -> bytes:
        length, encoded = len(body), b""
        while True:
            digit, length = length % 128, length // 128
            encoded += bytes([digit | (0x80 if length else 0)])
            if not length:
                return bytes([kind]) + encoded + body

    def text(value: str) -> bytes:
        return struct.pack(">H", len(value)) + value.encode()

    raw = socket.create_connection((address.host, address.port), timeout=TIMEOUT)
    sock = tls_context(identity).wrap_socket(raw, server_hostname=address.host)
    # CONNECT: protocol "MQTT" level 4, flags 0 (persistent session), keepalive 600 s.
    sock.sendall(packet(0x10, text("MQTT") + bytes([4, 0]) + struct.pack(">H", 600)
                        + text(identity.common_name())))
    if sock.recv(4)[:1] != b"\x20":
        raise AssertionError("no CONNACK from the broker")
    sock.sendall(packet(0x82, struct.pack(">H", 1) + text(topic) + bytes([1])))
    if sock.recv(5)[:1] != b"\x90":
        raise AssertionError("no SUBACK from the broker")
    return sock


def process_rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
