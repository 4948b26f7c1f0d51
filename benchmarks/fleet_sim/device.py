"""One simulated device: a TLS connection with its own certificate, MQTT 5 framing, and on
the wire what the agent does (agent/fleet_link.py, agent/bundle_fetch.py, agent/http_fetch.py).

On a new desired state a device fetches the bundle: over HTTP(S) from the first of the
desired state's URLs when its worker says so (``WorkerConfig.http_prefixes``; on a small
thread pool per worker, falling back to chunks as the agent does), else in 256 KiB chunks
over MQTT, at most ``window`` outstanding, re-asking a chunk unanswered for the request
timeout (the wait doubling, up to a minute, while answers are late). It checks every
chunk's sha256 (``protocol.messages.decode_chunk``) and the whole bundle's, and reports like
the agent (without ``chatter``: the last report only).

What the agent sends per install, and the simulator with it: counted in a real
``edge-agent run`` against ``fleet serve`` (``benchmarks/agent_messages.py``; docs/
benchmarks.md, "Simulator and agent messages per install (issue 16)"). The agent's
publisher, woken while idle, lingers 0.25 s (``agent.publisher.LINGER_S``) so that what
happens in one burst goes in one pass: one report, and the events as one batch to a server
whose desired state lists ``events.batch`` (else one message each). A live install then
comes in bursts: the fetch starting; the download done (verification starts); the verified
bundle staged, activated and put on probation (milliseconds apart, after the verifier's
child process); the commit after probation. Counted with a 0.1 MB model: 3 reports and 3
event messages carrying 7 events (the download fits in the first burst's linger). The
simulator sends a burst's messages at once, four bursts per install (the download as a
burst of its own, as with any bundle that takes longer than the linger to fetch):

- fetch starting: events ``install.downloading`` and ``fetch.started``, a report
  (agent/fleet_link.py ``start_fetch``, ``_on_install_change``);
- bundle whole: event ``install.verifying``, a report;
- verified: events ``install.staged``, ``install.activating``, ``install.probation``, a
  report showing the new version on probation;
- event ``install.committed``, a report showing it committed.

Events are numbered per device (``seq``), as the agent's outbox numbers them, so the
server stores each once.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import os
import selectors
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from bundle.errors import BundleError
from bundle.trust import TrustedState, verify_bundle
from fleet_sim.http_download import http_download
from fleet_sim.mqtt_wire import (
    CONNACK,
    DISCONNECT,
    KEEPALIVE_S,
    PINGREQ,
    PUBACK,
    PUBLISH,
    SUBACK,
    connect_packet,
    publish_packet,
    read_varint,
    subscribe_packet,
)
from protocol import messages
from protocol.errors import ProtocolError
from protocol.topics import CHUNK_LEAF, CHUNK_REQUEST_LEAF, device_topic
from transport.mqtt import TLSIdentity

if TYPE_CHECKING:
    from fleet_sim.worker import Worker

PROFILE = "x86-64-avx2"
AGENT_VERSION = "fleet-sim"
#: The agent's defaults (agent/bundle_fetch.py, bundle/mqtt.py).
CHUNK_BYTES = messages.DEFAULT_CHUNK_BYTES
WINDOW = 4
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_TIMEOUT_S = 60.0
#: Install transitions the agent reports after a fetch, each as an event and a report.


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
        self.event_seq = 0  # the agent's outbox numbers events (and samples)
        self.desired: messages.Desired | None = None
        self.fetch: Fetch | None = None
        self.results: list[dict[str, Any]] = []
        self.topic_desired = self.topic("desired")
        self.topic_chunks = self.topic(CHUNK_LEAF)
        self.use_http = spec.id.startswith(worker.http_prefixes)
        self.download: concurrent.futures.Future[tuple[Any, int, int]] | None = None
        self.http_failed: set[str] = set()

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
            header = read_varint(buf, pos + 1)
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
            props = read_varint(body, pos)
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
            props = read_varint(body, 2)
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
                self._events(("install.downloading", self._install_detail(fetch)),
                             ("fetch.started", {"model": name, "version": want.version,
                                                "bundle_sha256": want.bundle_sha256,
                                                "resume_at": 0}))
                self._report(installs={name: messages.InstallReport(
                    None, want.bundle_sha256, "downloading", progress=0.0)})
            self.request_chunks()
            return

    def _urls(self, fetch: Fetch) -> tuple[str, ...]:
        if not self.use_http or self.desired is None:
            return ()
        want = self.desired.models.get(fetch.model)
        return want.urls if want is not None and want.bundle_sha256 == fetch.sha256 else ()

    def request_chunks(self) -> None:
        """Start the HTTP download if this device uses the desired state's URLs and has
        not failed with them, else ask for the chunks due."""
        fetch = self.fetch
        if fetch is None or self.sock is None or self.download is not None:
            return
        urls = self._urls(fetch)
        if urls and fetch.sha256 not in self.http_failed:
            self.download = self.worker.http_pool.submit(
                http_download, urls[0], self.worker.context(self.spec), fetch.size)
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
        if self.worker.chatter:
            detail = self._install_detail(fetch)
            self._events(("install.verifying", detail))
            self._report(installs={name: messages.InstallReport(version, sha, "verifying")})
            self._events(*((f"install.{state}", detail)
                           for state in ("staged", "activating", "probation")))
            self._report(models={**self._running_models(),
                                 name: messages.ModelReport(version, sha, "probation")},
                         installs={name: messages.InstallReport(version, sha, "probation")})
            self._events(("install.committed", detail))
        self.running[name] = (version, sha)
        self._report(installs={name: messages.InstallReport(version, sha, "committed")})
        self.results.append({
            "device": self.id, "sha256": sha, "http": bool(self._urls(fetch)),
            "desired_at": fetch.started,
            "fetched_at": fetched, "reported_at": time.time(),
            "chunk_bytes": fetch.chunk_bytes, "refetched": fetch.refetched,
            "wire_in": self.wire_in - fetch.wire_in_at_start, "latencies": fetch.latencies})
        self.worker.on_finished(self, sha)
        self._start_next_fetch()

    def _install_detail(self, fetch: Fetch) -> dict[str, Any]:
        """An install event's detail as the agent's (agent/install_announcements.py)."""
        return {"install_id": f"{self.id}-{fetch.started:.6f}", "model": fetch.model,
                "version": fetch.version, "bundle_sha256": fetch.sha256,
                "bundle_size": fetch.size, "release_sha256": None, "reason": None,
                "detail": None}

    def _events(self, *events: tuple[str, dict[str, Any]]) -> None:
        """One burst's events: one batch if the server takes batches, else one each."""
        now = time.time()
        numbered = []
        for kind, detail in events:
            self.event_seq += 1
            numbered.append(messages.Event(kind, now, detail, seq=self.event_seq))
        if (len(numbered) > 1 and self.desired is not None
                and messages.FEATURE_EVENT_BATCH in self.desired.features):
            self.publish("events", messages.encode(messages.EventBatch(tuple(numbered))))
            return
        for event in numbered:
            self.publish("events", messages.encode(event))

    def _running_models(self) -> dict[str, messages.ModelReport]:
        return {n: messages.ModelReport(v, s, "committed") for n, (v, s) in self.running.items()}

    def _report(self, *, models: dict[str, messages.ModelReport] | None = None,
                installs: dict[str, messages.InstallReport] | None = None) -> None:
        if models is None:
            models = self._running_models()
        self.publish("reported", messages.encode(messages.Reported(
            PROFILE, AGENT_VERSION, models, installs or {}, at=time.time())))

    def _download_done(self) -> None:
        download, fetch = self.download, self.fetch
        if download is None or not download.done() or fetch is None:
            return
        self.download = None
        try:
            hasher, received, again = download.result()
        except (OSError, http.client.HTTPException) as exc:
            self.http_failed.add(fetch.sha256)
            self.error = f"HTTP download failed, chunks instead: {exc}"
        else:
            fetch.hasher, fetch.have = hasher, fetch.size
            fetch.chunk_bytes, fetch.refetched = received, again
            self._finish(fetch)

    def tick(self, now: float) -> None:
        """Every TICK_S: take a finished download, re-ask late chunks, keep alive."""
        self._download_done()
        if self.sock is None or self.state != "ready":
            return
        if self.fetch is not None:
            self.request_chunks()  # re-asks chunks unanswered for request_timeout
        if now - self.last_sent > KEEPALIVE_S / 2:
            self.send(bytes([PINGREQ << 4, 0]))


