"""Fleet benchmark: one fleet server + one Mosquitto, N simulated devices, one rollout.

The target (docs/benchmarks.md, "Fleet rollout at scale"): on this 2-core machine, one
FleetService with its embedded Mosquitto keeps >= 1,000 simulated devices connected and
rolls a ~1 MB signed bundle out to all of them in under 60 s.

What runs, all on this machine:

- **The server**, in this process: a real :class:`fleet_server.service.FleetService` with
  the embedded Mosquitto (its own process), a SQLite registry and fleet CA in a temporary
  directory, TUF keys made as ``fleet keys init`` makes them (``init_keys``), and a real
  signed bundle whose one artifact is ``--bundle-bytes`` of random bytes declared as an ONNX
  model (transport does not look inside it; ``service.add_bundle`` verifies the signatures).
- **The devices**, in ``--workers`` processes, each driving its share of the devices with
  one ``selectors`` loop over non-blocking TLS sockets and a minimal MQTT 5 client written
  for this benchmark (a load generator, not product code; paho's one thread per client
  does not scale to 1,000 clients on 2 cores). Each device is enrolled the way the agent
  enrolls (a key and CSR from ``transport.x509.make_device_key_and_csr``, a one-time
  token, ``service.enroll`` in-process rather than over HTTP), then connects over mutual
  TLS with its own certificate (client id = CN, MQTT 5, persistent session, a will,
  keepalive 60 s: the agent's settings from ``transport.mqtt``) and subscribes to its
  ``desired`` and ``inbox/chunks``.
- **On the wire each device does what the agent does** (agent/fleet_link.py,
  agent/bundle_fetch.py): on a new desired state it asks for the bundle in 256 KiB chunks,
  at most 4 outstanding, re-asking a chunk unanswered for 5 s (the wait doubling, up to
  a minute, while answers are late); checks every chunk's sha256
  (``protocol.messages.decode_chunk``) and the whole bundle's; and reports like the agent:
  a ``fetch.started`` event and a "downloading" report, then one event and one report per
  install transition (downloading, verifying, staged, activating, probation, committed),
  and a last report with the model committed (``--chatter minimal``: the last report only).
  Skipped, because they are device-local work that 1,000 real devices do in parallel on
  their own CPUs and disks, not load on the server: writing the ``.part`` file with an
  fsync per chunk (chunks are hashed in memory), the signature check (``--verify`` runs
  ``bundle.trust.verify_bundle`` on each device), loading the model, and the probation
  period (60 s by default on the agent: a policy wait, added to a real rollout as is).

Measured: time to enroll and to connect every device (confirmed on the broker's side by
counting its established TCP connections); the rollout time from ``service.publish(sha,
group=...)`` to the registry holding a converged report from every device (the latest
``reported_at``; ``unconverged()`` decides when to stop, asked once a second and, once the
workers say every device has reported, every 50 ms); per-device completion p50/p95; the
time from a chunk request to its answer at the device; bytes moved; CPU and memory of the
broker, the server process (which includes this polling) and the device workers; and, as
the baseline in the same run, the same rollout to a group of 1 and a group of 10 devices
(connected throughout, so the fleet is N + 11 connections).

Run::

    .venv/bin/python benchmarks/fleet_bench.py                  # 1,000 devices
    .venv/bin/python benchmarks/fleet_bench.py --devices 5 --baseline 1   # a quick check

Exit status 0 when every device connected and the rollout converged (the targets are
printed as OK/MISSED beside the figures), 1 otherwise. ``--keep DIR`` keeps the server's
data (registry, Mosquitto's log) for a look afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import resource
import secrets
import selectors
import socket
import ssl
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import psutil

from bundle.errors import BundleError
from bundle.signing import ArtifactInput, BundleSpec, build_bundle
from bundle.trust import TrustedState, verify_bundle
from common.atomic import write_atomic
from protocol import messages
from protocol.errors import ProtocolError
from protocol.topics import CHUNK_LEAF, CHUNK_REQUEST_LEAF, device_topic
from transport.mqtt import TLSIdentity, tls_context
from transport.x509 import make_device_key_and_csr

TARGET_DEVICES = 1000
TARGET_ROLLOUT_S = 60.0
PROFILE = "x86-64-avx2"
MODEL = "bench"
FLEET = "bench"
FLEET_GROUP = "fleet"
AGENT_VERSION = "fleet-bench"
#: The agent's defaults (agent/bundle_fetch.py, bundle/mqtt.py).
CHUNK_BYTES = messages.DEFAULT_CHUNK_BYTES
WINDOW = 4
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_TIMEOUT_S = 60.0
KEEPALIVE_S = 60
SESSION_EXPIRY_S = 7 * 24 * 3600
#: Install transitions the agent reports after a fetch, each as an event and a report.
INSTALL_STATES = ("downloading", "verifying", "staged", "activating", "probation",
                  "committed")
TICK_S = 0.25


# --- a minimal MQTT 5 client, enough for a device -------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14


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
    body = struct.pack(">H", mid) + b"\x00" + b"".join(_str(t) + b"\x01" for t in topics)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def publish_packet(mid: int, topic: str, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH without properties."""
    return _packet((PUBLISH << 4) | 0x02, _str(topic) + struct.pack(">H", mid) + b"\x00"
                   + payload)


def _read_varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
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


# --- a simulated device ---------------------------------------------------------------------

@dataclass
class DeviceSpec:
    """What a worker needs to run one device."""

    id: str
    identity: TLSIdentity


@dataclass
class Fetch:
    """One bundle being fetched, as agent.bundle_fetch.BundleFetch does it but in memory:
    the window is counted from the first missing byte, chunks ahead of it wait."""

    model: str
    version: int
    sha256: str
    size: int
    started: float
    wire_in_at_start: int
    have: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    kept: list[bytes] | None = None
    early: dict[int, bytes] = field(default_factory=dict)
    asked: dict[int, float] = field(default_factory=dict)
    refetched: int = 0
    chunk_bytes: int = 0
    #: Seconds from (the latest) request to answer, per chunk.
    latencies: list[float] = field(default_factory=list)
    #: The agent's back-off (agent/bundle_fetch.py): a request that timed out doubles the
    #: wait, up to a minute; an answer brings it back to the base timeout. 0: the base.
    wait_s: float = 0.0

    def requests(self, window: int, timeout: float, now: float) -> list[messages.ChunkRequest]:
        end = min(self.size, self.have + window * CHUNK_BYTES)
        wait = self.wait_s or timeout
        wanted = []
        for offset in range(self.have, end, CHUNK_BYTES):
            asked = self.asked.get(offset)
            if offset in self.early or (asked is not None and now - asked <= wait):
                continue
            length = min(CHUNK_BYTES, self.size - offset)
            if asked is not None:
                self.refetched += length
                self.wait_s = min(wait * 2, MAX_REQUEST_TIMEOUT_S)
            wanted.append(messages.ChunkRequest(self.sha256, offset, length))
            self.asked[offset] = now
        return wanted

    def receive(self, chunk: messages.Chunk) -> bool:
        """Take one checked chunk; True once the whole bundle is in (hash not yet checked)."""
        if chunk.error is not None:
            raise ProtocolError(f"the server refused a chunk: {chunk.error}")
        if chunk.total != self.size:
            raise ProtocolError(f"bundle is {chunk.total} bytes on the server, desired says "
                                f"{self.size}")
        asked = self.asked.pop(chunk.offset, None)
        self.wait_s = 0.0
        if asked is not None:
            self.latencies.append(time.monotonic() - asked)
        self.chunk_bytes += len(chunk.data)
        if chunk.offset >= self.have and chunk.offset % CHUNK_BYTES == 0:
            self.early[chunk.offset] = chunk.data
        while self.have in self.early:
            data = self.early.pop(self.have)
            self.hasher.update(data)
            if self.kept is not None:
                self.kept.append(data)
            self.have += len(data)
        return self.have >= self.size


class Device:
    """One simulated device: a TLS connection, MQTT 5 framing, the agent's fetch and
    reporting. Driven by the worker's selector loop."""

    def __init__(self, spec: DeviceSpec, worker: Worker) -> None:
        self.id = spec.id
        self.spec = spec
        self.worker = worker
        self.state = "idle"
        self.sock: ssl.SSLSocket | None = None
        self.raw: socket.socket | None = None
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.events = 0
        self.next_mid = 1
        self.last_sent = 0.0
        self.wire_in = 0
        self.wire_out = 0
        self.error: str | None = None
        self.running: dict[str, tuple[int, str]] = {}  # model -> (version, sha256)
        self.desired: messages.Desired | None = None
        self.fetch: Fetch | None = None
        self.results: list[dict[str, Any]] = []
        self.install_seq = 0
        self.topic_desired = self.topic("desired")
        self.topic_chunks = self.topic(CHUNK_LEAF)

    def topic(self, leaf: str) -> str:
        return device_topic(self.worker.fleet, self.id, leaf)

    # -- connection ---------------------------------------------------------------------

    def start(self) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = raw.connect_ex((self.worker.host, self.worker.port))
        if err not in (0, 115):  # EINPROGRESS
            raw.close()
            self.fail(f"connect: {os.strerror(err)}")
            return
        self.raw = raw
        self.state = "tcp"
        self._watch(selectors.EVENT_WRITE)

    def _watch(self, events: int) -> None:
        fileobj = self.sock if self.sock is not None else self.raw
        if fileobj is None or events == self.events:
            return
        if self.events:
            self.worker.selector.modify(fileobj, events, self)
        else:
            self.worker.selector.register(fileobj, events, self)
        self.events = events

    def on_event(self, mask: int) -> None:
        if self.state == "closed":  # closed earlier in this round of events
            return
        if self.state == "tcp":
            assert self.raw is not None
            err = self.raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(f"connect: {os.strerror(err)}")
                return
            self.worker.selector.unregister(self.raw)
            self.events = 0
            self.sock = self.worker.context(self.spec).wrap_socket(
                self.raw, server_hostname=self.worker.host, do_handshake_on_connect=False)
            self.state = "tls"
            self._handshake()
            return
        if self.state == "tls":
            self._handshake()
            return
        if mask & selectors.EVENT_READ:
            self._read()
        if self.sock is not None and (mask & selectors.EVENT_WRITE or self.outbuf):
            self._flush()

    def _handshake(self) -> None:
        assert self.sock is not None
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(selectors.EVENT_WRITE)
            return
        except OSError as exc:
            self.fail(f"TLS handshake: {exc}")
            return
        self.state = "connack"
        will = messages.encode(messages.Event("offline", time.time(), {}))
        self.send(connect_packet(self.id, self.topic("events"), will))

    def send(self, data: bytes) -> None:
        self.outbuf += data
        self.last_sent = time.monotonic()
        self._flush()

    def _flush(self) -> None:
        sock = self.sock
        if sock is None:
            return
        while self.outbuf:
            try:
                sent = sock.send(self.outbuf)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                break
            except OSError as exc:
                self.fail(f"send: {exc}")
                return
            self.wire_out += sent
            del self.outbuf[:sent]
        self._watch(selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0))

    def _read(self) -> None:
        sock = self.sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(1 << 18)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            except ssl.SSLWantWriteError:
                self._watch(selectors.EVENT_READ | selectors.EVENT_WRITE)
                break
            except OSError as exc:
                self.fail(f"recv: {exc}")
                return
            if not data:
                self.fail("the broker closed the connection")
                return
            self.wire_in += len(data)
            self.inbuf += data
        self._parse()

    def _parse(self) -> None:
        buf, pos = self.inbuf, 0
        while len(buf) - pos >= 2:
            header = _read_varint(buf, pos + 1)
            if header is None:
                break
            length, start = header
            end = start + length
            if end > len(buf):
                break
            first, body = buf[pos], bytes(buf[start:end])
            pos = end
            try:
                self._handle(first, body)
            except (ProtocolError, BundleError) as exc:
                self.fail(f"{type(exc).__name__}: {exc}")
                return
            if self.sock is None:
                return
        del buf[:pos]

    def _handle(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == PUBLISH:
            qos = (first >> 1) & 3
            n = struct.unpack_from(">H", body)[0]
            topic, pos = body[2:2 + n].decode(), 2 + n
            if qos:
                mid = body[pos:pos + 2]
                pos += 2
                self.send(bytes([PUBACK << 4, 2]) + mid)
            props = _read_varint(body, pos)
            if props is None:
                raise ProtocolError("truncated PUBLISH properties")
            payload = body[props[1] + props[0]:]
            if topic == self.topic_chunks:
                self._on_chunk(payload)
            elif topic == self.topic_desired:
                self._on_desired(payload)
        elif kind == PUBACK:
            pass
        elif kind == CONNACK:
            if body[1] != 0:
                self.fail(f"CONNACK reason code {body[1]:#x}")
                return
            self.state = "suback"
            self.send(subscribe_packet(self._mid(), [self.topic_desired, self.topic_chunks]))
        elif kind == SUBACK:
            props = _read_varint(body, 2)
            assert props is not None
            codes = body[props[1] + props[0]:]
            if any(c >= 0x80 for c in codes):
                self.fail(f"SUBACK refused: {codes.hex()}")
                return
            self.state = "ready"
            self.worker.on_ready(self)
        elif kind == DISCONNECT:
            self.fail(f"the broker disconnected us ({body[:1].hex() or '00'})")

    def _mid(self) -> int:
        mid = self.next_mid
        self.next_mid = mid % 65535 + 1
        return mid

    def publish(self, leaf: str, payload: bytes) -> None:
        self.send(publish_packet(self._mid(), self.topic(leaf), payload))

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self.close()

    def close(self) -> None:
        if self.state == "closed":
            return
        fileobj = self.sock if self.sock is not None else self.raw
        if fileobj is not None:
            if self.events:
                self.worker.selector.unregister(fileobj)
            fileobj.close()
        self.events = 0
        self.sock = self.raw = None
        if self.state != "ready":
            self.worker.on_failed(self)
        self.state = "closed"

    def disconnect(self) -> None:
        """A clean DISCONNECT (so the broker does not publish the will)."""
        if self.sock is None:
            return
        self.send(bytes([DISCONNECT << 4, 0]))
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(2)
            if self.outbuf:
                self.sock.sendall(self.outbuf)
        except OSError:
            pass
        self.error = self.error or "closed"
        self.state = "closed"
        if self.events:
            self.worker.selector.unregister(self.sock)
            self.events = 0
        self.sock.close()
        self.sock = None

    # -- the agent's behaviour ------------------------------------------------------------

    def _on_desired(self, payload: bytes) -> None:
        self.desired = messages.decode_desired(payload)
        self._start_next_fetch()

    def _start_next_fetch(self) -> None:
        if self.fetch is not None or self.desired is None:
            return
        for name, want in sorted(self.desired.models.items()):
            if self.running.get(name, (None, None))[1] == want.bundle_sha256:
                continue
            fetch = Fetch(name, want.version, want.bundle_sha256, want.size,
                          started=time.time(), wire_in_at_start=self.wire_in)
            if self.worker.verify:
                fetch.kept = []
            self.fetch = fetch
            if self.worker.chatter:
                self._event("fetch.started", {"model": name, "version": want.version,
                                              "bundle_sha256": want.bundle_sha256,
                                              "resume_at": 0})
                self._report(installs={name: messages.InstallReport(
                    None, want.bundle_sha256, "downloading", progress=0.0)})
            self.request_chunks()
            return

    def request_chunks(self) -> None:
        fetch = self.fetch
        if fetch is None or self.sock is None:
            return
        for request in fetch.requests(self.worker.window, self.worker.request_timeout,
                                      time.monotonic()):
            self.publish(CHUNK_REQUEST_LEAF, messages.encode(request))

    def _on_chunk(self, payload: bytes) -> None:
        chunk = messages.decode_chunk(payload)  # checks the chunk's sha256
        fetch = self.fetch
        if fetch is None or chunk.bundle_sha256 != fetch.sha256:
            return
        if fetch.receive(chunk):
            self._finish(fetch)
        else:
            self.request_chunks()

    def _finish(self, fetch: Fetch) -> None:
        if fetch.hasher.hexdigest() != fetch.sha256:
            raise ProtocolError(f"bundle arrived complete but hashes to "
                                f"{fetch.hasher.hexdigest()[:12]}, not {fetch.sha256[:12]}")
        fetched = time.time()
        if fetch.kept is not None:
            verify_bundle(b"".join(fetch.kept), TrustedState(root=self.worker.root_json),
                          now=datetime.now(timezone.utc), profile=PROFILE)
        self.fetch = None
        name, sha, version = fetch.model, fetch.sha256, fetch.version
        self.install_seq += 1
        install_id = f"{self.id}-{self.install_seq}"
        if self.worker.chatter:
            for state in INSTALL_STATES:
                serving = {}
                if state in ("probation", "committed"):
                    serving = {name: messages.ModelReport(
                        version, sha, "probation" if state == "probation" else "committed")}
                self._event(f"install.{state}", {
                    "install_id": install_id, "model": name, "version": version,
                    "bundle_sha256": sha, "reason": None, "detail": None})
                self._report(models=serving, installs={
                    name: messages.InstallReport(version, sha, state)})
        self.running[name] = (version, sha)
        self._report(installs={name: messages.InstallReport(version, sha, "committed")})
        self.results.append({
            "device": self.id, "sha256": sha, "desired_at": fetch.started,
            "fetched_at": fetched, "reported_at": time.time(),
            "chunk_bytes": fetch.chunk_bytes, "refetched": fetch.refetched,
            "wire_in": self.wire_in - fetch.wire_in_at_start, "latencies": fetch.latencies})
        self.worker.on_finished()
        self._start_next_fetch()

    def _event(self, kind: str, detail: dict[str, Any]) -> None:
        self.publish("events", messages.encode(messages.Event(kind, time.time(), detail)))

    def _report(self, *, models: dict[str, messages.ModelReport] | None = None,
                installs: dict[str, messages.InstallReport] | None = None) -> None:
        if models is None:
            models = {n: messages.ModelReport(v, s, "committed")
                      for n, (v, s) in self.running.items()}
        self.publish("reported", messages.encode(messages.Reported(
            PROFILE, AGENT_VERSION, models, installs or {}, at=time.time())))

    def tick(self, now: float) -> None:
        if self.sock is None or self.state != "ready":
            return
        if self.fetch is not None:
            self.request_chunks()  # re-asks chunks unanswered for request_timeout
        if now - self.last_sent > KEEPALIVE_S / 2:
            self.send(bytes([PINGREQ << 4, 0]))


# --- the worker process ---------------------------------------------------------------------

@dataclass
class WorkerConfig:
    host: str
    port: int
    fleet: str
    devices: list[DeviceSpec]
    root_json: bytes
    window: int = WINDOW
    request_timeout: float = REQUEST_TIMEOUT_S
    chatter: bool = True
    verify: bool = False
    connect_concurrency: int = 32


class Worker:
    """Runs its share of the devices in one selector loop; talks to the parent over a pipe:
    ``go`` -> connect all and answer ``connected``; ``collect`` -> ``results``; ``stop``.
    Subclasses (benchmarks/scale_bench.py) set ``device_class`` and take more commands in
    :meth:`command`."""

    device_class: type[Device] = Device

    def __init__(self, config: WorkerConfig, pipe: Connection) -> None:
        self.host, self.port, self.fleet = config.host, config.port, config.fleet
        self.window, self.request_timeout = config.window, config.request_timeout
        self.chatter, self.verify, self.root_json = (config.chatter, config.verify,
                                                     config.root_json)
        self.concurrency = config.connect_concurrency
        self.pipe = pipe
        self.selector = selectors.DefaultSelector()
        self.devices = [self.device_class(spec, self) for spec in config.devices]
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.to_connect: list[Device] = []
        self.connecting = 0
        self.ready: list[tuple[str, float]] = []
        self.failed: list[tuple[str, str]] = []
        self.connect_reported = False
        self.stopping = False
        self.watching: dict[str, str] = {}  # device id prefix -> bundle sha256

    def context(self, spec: DeviceSpec) -> ssl.SSLContext:
        return self.contexts[spec.id]

    def prepare(self) -> None:
        """Load every device's TLS identity (the agent's own TLS context, transport.mqtt)."""
        for device in self.devices:
            self.contexts[device.id] = tls_context(device.spec.identity)

    def on_ready(self, device: Device) -> None:
        self.ready.append((device.id, time.time()))
        self.connecting -= 1
        self._start_more()

    def on_failed(self, device: Device) -> None:
        """A device that had not finished connecting gave up (later failures are kept in
        ``device.error``)."""
        if device.state in ("idle", "tcp", "tls", "connack", "suback"):
            self.failed.append((device.id, device.error or "failed"))
            self.connecting -= 1
            self._start_more()

    def on_finished(self) -> None:
        """Tell the parent when every watched device has finished (and reported)."""
        for prefix, sha in list(self.watching.items()):
            if all(any(r["sha256"] == sha for r in d.results)
                   for d in self.devices if d.id.startswith(prefix)):
                del self.watching[prefix]
                self.pipe.send(("finished", prefix))

    def _start_more(self) -> None:
        while self.to_connect and self.connecting < self.concurrency:
            device = self.to_connect.pop()
            self.connecting += 1
            device.start()

    def run(self) -> None:
        self.prepare()
        self.pipe.send(("prepared", len(self.devices)))
        self.selector.register(self.pipe, selectors.EVENT_READ, None)
        next_tick = time.monotonic() + TICK_S
        while not self.stopping:
            timeout = max(0.0, next_tick - time.monotonic())
            for key, mask in self.selector.select(timeout):
                if key.data is None:
                    self._command()
                else:
                    key.data.on_event(mask)
            if (not self.connect_reported and self.to_connect == [] and self.connecting == 0
                    and self.ready_or_failed()):
                self.connect_reported = True
                self.pipe.send(("connected", self.ready, self.failed))
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                for device in self.devices:
                    device.tick(now)

    def ready_or_failed(self) -> bool:
        return len(self.ready) + len(self.failed) >= len(self.devices)

    def _command(self) -> None:
        try:
            command, *args = self.pipe.recv()
        except EOFError:
            self.stopping = True
            return
        if command == "go":
            self.to_connect = list(reversed(self.devices))
            self._start_more()
        elif command == "watch":
            prefix, sha = args
            self.watching[prefix] = sha
            self.on_finished()
        elif command == "collect":
            results = [r for d in self.devices for r in d.results]
            errors = [(d.id, d.error) for d in self.devices if d.error]
            self.pipe.send(("results", results, errors))
        elif command == "stop":
            for device in self.devices:
                device.disconnect()
            self.pipe.send(("stopped",))
            self.stopping = True
        else:
            self.command(command, args)

    def command(self, command: str, args: list[Any]) -> None:
        """A command of a subclass."""
        raise ValueError(f"unknown worker command {command!r}")


def worker_main(config: WorkerConfig, pipe: Connection) -> None:
    """Entry point of a worker process."""
    with suppress(KeyboardInterrupt):
        Worker(config, pipe).run()


# --- the parent: server, enrollment, rollouts -----------------------------------------------

def raise_open_files(needed: int) -> tuple[int, int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (Mosquitto and the workers
    inherit it); returns (before, now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed * 2)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard


def make_bundle(keys_dir: Path, size: int) -> bytes:
    """A signed bundle (keys as ``fleet keys init`` makes them) whose one artifact is
    ``size`` random bytes declared as an fp32 ONNX model."""
    from fleet_server.keys import KeyStore, init_keys

    store = KeyStore.at(keys_dir)
    init_keys(store)
    spec = BundleSpec(name=MODEL, version=1, profiles=(PROFILE,), artifacts=(
        ArtifactInput("model.onnx", secrets.token_bytes(size), "onnx", "fp32"),))
    expires = datetime.fromtimestamp(time.time() + 30 * 86400, timezone.utc).replace(
        microsecond=0)
    return build_bundle(spec, root_chain=store.root_chain(),
                        signers={r: store.signers(r) for r in ("targets", "snapshot",
                                                               "timestamp")},
                        metadata_version=1, expires=expires)


@dataclass
class CpuSnapshot:
    at: float
    broker: float
    server: float
    workers: float
    machine_busy: float

    @classmethod
    def take(cls, broker: psutil.Process, workers: list[psutil.Process]) -> CpuSnapshot:
        def used(p: psutil.Process) -> float:
            t = p.cpu_times()
            return float(t.user + t.system)

        machine = psutil.cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return cls(time.monotonic(), used(broker), used(psutil.Process()),
                   sum(used(w) for w in workers), busy)


@dataclass
class Rollout:
    label: str
    devices: int
    seconds: float
    polled_seconds: float
    completions: list[float]
    converged: int
    chunk_bytes: int
    wire_in: int
    refetched: int
    chunk_latencies: list[float]
    cpu: dict[str, float]


class WorkerPool:
    """The device worker processes of a benchmark and the parent's end of their pipes."""

    def __init__(self) -> None:
        self.workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []

    @property
    def pipes(self) -> list[Connection]:
        return [pipe for _, pipe in self.workers]

    def start(self, configs: Sequence[WorkerConfig],
              target: Callable[[WorkerConfig, Connection], None], name: str) -> None:
        """One process per config running ``target``; returns once each has loaded its
        devices' TLS identities."""
        context = multiprocessing.get_context("spawn")
        for w, config in enumerate(configs):
            parent, child = context.Pipe()
            process = context.Process(target=target, args=(config, child),
                                      name=f"{name}-{w}", daemon=True)
            process.start()
            child.close()
            self.workers.append((process, parent))
        for pipe in self.pipes:
            reply = pipe.recv()
            assert reply[0] == "prepared", reply

    def processes(self) -> list[psutil.Process]:
        return [psutil.Process(p.pid) for p, _ in self.workers if p.pid is not None]

    def connect(self) -> tuple[float, int, list[tuple[str, str]]]:
        """Connect every device; (seconds until the last SUBACK, devices ready, failures)."""
        started = time.time()
        for pipe in self.pipes:
            pipe.send(("go",))
        last, ready, failed = started, 0, []
        for pipe in self.pipes:
            kind, ready_list, failed_list = pipe.recv()
            assert kind == "connected"
            ready += len(ready_list)
            failed += failed_list
            last = max([last, *(t for _, t in ready_list)])
        return last - started, ready, failed

    def collect(self) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Every device's finished fetches, and the devices' errors."""
        results: list[dict[str, Any]] = []
        errors: list[tuple[str, str]] = []
        for pipe in self.pipes:
            pipe.send(("collect",))
        for pipe in self.pipes:
            kind, r, e = pipe.recv()
            assert kind == "results"
            results += r
            errors += e
        return results, errors

    def stop(self) -> None:
        for process, pipe in self.workers:
            try:
                pipe.send(("stop",))
                pipe.recv()
            except (OSError, EOFError):
                pass
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
        self.workers = []


def device_specs(home: Path, ids: Sequence[str]) -> list[DeviceSpec]:
    """The devices ``ids`` with their identity files under ``home/devices/ID``."""
    return [DeviceSpec(d, TLSIdentity(home / "devices" / d / "ca.crt",
                                      home / "devices" / d / "device.crt",
                                      home / "devices" / d / "device.key")) for d in ids]


class Fleet:
    """The server side of the benchmark and the handles of the worker processes."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.pool = WorkerPool()
        self.groups: dict[str, list[str]] = {}

    @contextmanager
    def running(self) -> Iterator[Fleet]:
        from fleet_server.service import FleetService, ServiceConfig

        keys = self.tmp / "keys"
        self.bundle = make_bundle(keys, self.args.bundle_bytes)
        self.root_json = (keys / "root.json").read_bytes()
        config = ServiceConfig(data_dir=self.tmp / "server", keys_dir=keys, fleet=FLEET,
                               mqtt_port=0, mqtt_bind="127.0.0.1", connect_timeout=30)
        with FleetService(config) as service:
            self.service = service
            # The embedded Mosquitto is this process's child.
            self.broker = next(p for p in psutil.Process().children()
                               if p.name() == "mosquitto")
            try:
                yield self
            finally:
                self.pool.stop()

    def enroll(self) -> float:
        """Enroll every device through the service (as ``edge-agent enroll`` does, minus
        HTTP); returns the seconds it took."""
        sizes = [(f"base{n}", n) for n in self.args.baseline]
        sizes.append((FLEET_GROUP, self.args.devices))
        started = time.perf_counter()
        for group, count in sizes:
            ids = [f"{group}-{i:05d}" for i in range(count)]
            for device_id in ids:
                key_pem, csr_pem = make_device_key_and_csr(device_id)
                token = self.service.issue_token(group, 3600).token
                enrollment = self.service.enroll(token, device_id, csr_pem, PROFILE)
                home = self.tmp / "devices" / device_id
                write_atomic(home / "device.key", key_pem, 0o600)
                write_atomic(home / "device.crt", enrollment.certificate_pem)
                write_atomic(home / "ca.crt", enrollment.ca_certificate_pem)
            self.groups[group] = ids
        return time.perf_counter() - started

    def start_workers(self) -> None:
        ids = [d for group in self.groups.values() for d in group]
        count = max(1, min(self.args.workers, len(ids)))
        address = self.service.broker.address
        self.pool.start([WorkerConfig(address.host, address.port, FLEET,
                                      device_specs(self.tmp, ids[w::count]), self.root_json,
                                      window=self.args.window,
                                      request_timeout=self.args.request_timeout,
                                      chatter=self.args.chatter == "agent",
                                      verify=self.args.verify,
                                      connect_concurrency=self.args.connect_concurrency)
                         for w in range(count)], worker_main, "fleet-bench-worker")

    def broker_connections(self) -> int:
        """Established TCP connections on the broker's listening port, seen from the broker
        process (the fleet server's own connection included)."""
        port = self.service.broker.address.port
        return sum(1 for c in self.broker.net_connections("tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)

    def rollout(self, group: str, sha: str) -> Rollout:
        """Publish ``sha`` to ``group`` and wait for the registry to show it converged.

        The registry is the judge, but asking it costs the server a read of every device
        under its lock, so it is asked once a second until the workers say all their
        devices have reported, then every 50 ms; the rollout time is the latest
        ``reported_at``, not the moment of the poll."""
        ids = self.groups[group]
        registry = self.service.registry
        workers = self.pool.processes()
        pipes = self.pool.pipes
        for pipe in pipes:
            pipe.send(("watch", f"{group}-", sha))
        before = CpuSnapshot.take(self.broker, workers)
        started = time.time()
        self.service.publish(sha, group=group)
        deadline = time.monotonic() + self.args.timeout
        pending, left, polls = set(pipes), len(ids), 0
        next_poll = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for ready in wait(list(pending), max(0.0, next_poll - time.monotonic())):
                assert isinstance(ready, Connection)
                message = ready.recv()
                assert message[0] == "finished", message
                pending.discard(ready)
            if pending and time.monotonic() < next_poll:
                continue
            left = len(registry.unconverged(group=group))
            if not left:
                break
            if not pending:  # every 50 ms at first, backing off to once a second
                polls += 1
            next_poll = time.monotonic() + (1.0 if pending else min(1.0, 0.05 * 1.5 ** polls))
        polled = time.time() - started
        after = CpuSnapshot.take(self.broker, workers)
        devices = registry.list_devices(group=group)
        done = [d.reported_at - started for d in devices
                if d.converged and d.reported_at is not None]
        results, _ = self.pool.collect()
        members = set(ids)
        mine = [r for r in results if r["device"] in members and r["sha256"] == sha]
        wall = after.at - before.at
        cpu = {"broker": after.broker - before.broker, "server": after.server - before.server,
               "devices": after.workers - before.workers,
               "machine": after.machine_busy - before.machine_busy, "wall": wall}
        seconds = max(done) if len(done) == len(ids) else float("inf")
        return Rollout(group, len(ids), seconds, polled, done, len(ids) - left,
                       sum(r["chunk_bytes"] for r in mine), sum(r["wire_in"] for r in mine),
                       sum(r["refetched"] for r in mine),
                       [x for r in mine for x in r["latencies"]], cpu)


# --- output ---------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank), NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_rollout(r: Rollout, baseline: Rollout | None) -> None:
    cpu = r.cpu
    wall = cpu["wall"] or 1.0
    ratio = f", {r.seconds / baseline.seconds:.1f}x the {baseline.devices}-device rollout" \
        if baseline and baseline.seconds else ""
    print(f"  {r.label}: {r.devices} device(s), converged {r.converged}; rollout "
          f"{r.seconds:.2f} s{ratio} (polled: {r.polled_seconds:.2f} s)")
    done = r.completions
    print(f"    per device, publish -> converged report stored: p50 {percentile(done, 50):.2f} "
          f"s, p95 {percentile(done, 95):.2f} s, max {percentile(done, 100):.2f} s")
    lat = r.chunk_latencies
    print(f"    chunk request -> answer at the device: p50 {percentile(lat, 50) * 1e3:.0f} ms, "
          f"p95 {percentile(lat, 95) * 1e3:.0f} ms, max {percentile(lat, 100) * 1e3:.0f} ms "
          f"({len(lat)} chunks)")
    print(f"    bundle bytes delivered {_mb(r.chunk_bytes)}, MQTT bytes received by devices "
          f"{_mb(r.wire_in)}, re-requested {_mb(r.refetched)}; "
          f"{r.chunk_bytes / 1e6 / max(r.seconds, 1e-9):,.1f} MB/s")
    print(f"    CPU seconds over {wall:.2f} s: broker {cpu['broker']:.2f} "
          f"({cpu['broker'] / wall:.0%} of a core), server {cpu['server']:.2f} "
          f"({cpu['server'] / wall:.0%}), devices {cpu['devices']:.2f} "
          f"({cpu['devices'] / wall:.0%}); whole machine busy {cpu['machine']:.2f} of "
          f"{wall * (os.cpu_count() or 1):.2f} (others: "
          f"{cpu['machine'] - cpu['broker'] - cpu['server'] - cpu['devices']:.2f})")


@contextmanager
def work_dir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        yield Path(tmp)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=TARGET_DEVICES,
                        help="devices in the rolled-out group (default %(default)s)")
    parser.add_argument("--baseline", type=lambda s: [int(x) for x in s.split(",") if x],
                        default=[1, 10], help="sizes of the baseline groups (default 1,10)")
    parser.add_argument("--bundle-bytes", type=int, default=1 << 20,
                        help="size of the bundle's artifact (default 1 MiB)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="device worker processes (default: one per core)")
    parser.add_argument("--window", type=int, default=WINDOW,
                        help="chunk requests outstanding per device (agent: 4)")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S,
                        help="re-ask a chunk unanswered this long (agent: 5 s)")
    parser.add_argument("--chatter", choices=("agent", "minimal"), default="agent",
                        help="agent: the agent's events and reports per install; minimal: "
                             "only the final report")
    parser.add_argument("--verify", action="store_true",
                        help="devices also verify the bundle's signatures (verify_bundle)")
    parser.add_argument("--connect-concurrency", type=int, default=32,
                        help="connections each worker opens at once")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="give up on a rollout after this many seconds")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep the server's data (registry, broker log) in DIR, which "
                             "must not exist")
    return parser.parse_args(argv)


def print_targets(args: argparse.Namespace, connected: int, connected_ok: bool,
                  rollout: Rollout, bundle_size: int) -> None:
    def verdict(ok: bool) -> str:
        if args.devices < TARGET_DEVICES:
            return f"not measured (--devices {args.devices} < {TARGET_DEVICES:,})"
        return "OK" if ok else "MISSED"

    print("\ntargets")
    print(f"  devices connected at once: {connected} (target >= {TARGET_DEVICES:,}) "
          f"{verdict(connected_ok and connected >= TARGET_DEVICES)}")
    print(f"  rollout of a {bundle_size / 1e6:.2f} MB bundle to {rollout.devices} devices: "
          f"{rollout.seconds:.2f} s (target < {TARGET_ROLLOUT_S:.0f} s) "
          f"{verdict(rollout.converged == rollout.devices and rollout.seconds < TARGET_ROLLOUT_S)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    total = args.devices + sum(args.baseline)
    # Mosquitto needs one descriptor per connection plus its own few; it inherits ours.
    before, soft, hard = raise_open_files(total + 64)
    print(f"fleet rollout benchmark: {args.devices} devices (+ baseline groups "
          f"{', '.join(map(str, args.baseline))}), bundle artifact {args.bundle_bytes:,} "
          f"bytes, window {args.window} x {CHUNK_BYTES // 1024} KiB, chatter {args.chatter}"
          f"{', verify' if args.verify else ''}, {args.workers} worker process(es); "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    print("  devices skip the agent's device-local work: fsync of each chunk, "
          f"{'' if args.verify else 'signature check (--verify), '}model load, probation")
    print(f"  open-file limit: soft {before} -> {soft}, hard {hard}", end="")
    if soft < total + 64:
        print(f": TOO LOW for {total} connections (the broker needs one descriptor each); "
              "raise the hard limit (ulimit -Hn) to measure the target")
    else:
        print(f": enough for {total} connections")

    with work_dir(args.keep) as tmp, Fleet(args, tmp).running() as fleet:
        record = fleet.service.add_bundle(fleet.bundle)
        print(f"  bundle {record.sha256[:12]}: {record.size:,} bytes "
              f"({-(-record.size // CHUNK_BYTES)} chunks), verified and stored by the server")
        enroll_s = fleet.enroll()
        print(f"  enrolled {total} devices through service.enroll in {enroll_s:.1f} s "
              f"({total / enroll_s:.0f}/s)")
        fleet.start_workers()
        connect_s, ready, failed = fleet.pool.connect()
        on_broker = fleet.broker_connections() - 1  # minus the fleet server's own
        print(f"  connected {ready}/{total} devices (mutual TLS, subscribed) in "
              f"{connect_s:.2f} s; the broker counts {on_broker} device connections "
              f"(its open-file limit: {fleet.broker.rlimit(resource.RLIMIT_NOFILE)[0]})")
        for device_id, why in failed[:5]:
            print(f"    {device_id}: {why}")
        baselines = []
        for n in args.baseline:
            result = fleet.rollout(f"base{n}", record.sha256)
            print_rollout(result, None)
            baselines.append(result)
        main_result = fleet.rollout(FLEET_GROUP, record.sha256)
        print_rollout(main_result, baselines[0] if baselines else None)
        for base in baselines[1:]:
            if base.seconds:
                print(f"    vs the {base.devices}-device rollout: "
                      f"{main_result.seconds / base.seconds:.1f}x the time for "
                      f"{main_result.devices / base.devices:.0f}x the devices")
        _, errors = fleet.pool.collect()
        for device_id, why in errors[:5]:
            print(f"    device error {device_id}: {why}")
        rss = {name: sum(p.memory_info().rss for p in procs) / 2**20 for name, procs in (
            ("broker", [fleet.broker]), ("server", [psutil.Process()]),
            ("devices", fleet.pool.processes()))}
        print(f"  resident memory after the rollout: broker {rss['broker']:.0f} MB, server "
              f"{rss['server']:.0f} MB, device workers {rss['devices']:.0f} MB")

    connected_ok = ready == total and on_broker >= total
    print_targets(args, ready, connected_ok, main_result, record.size)
    return 0 if connected_ok and main_result.converged == main_result.devices else 1


if __name__ == "__main__":
    sys.exit(main())
