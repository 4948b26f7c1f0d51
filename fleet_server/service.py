"""The fleet service: the server's end of the MQTT protocol, around one registry.

:class:`FleetService` owns the registry, the fleet CA, the broker (an embedded Mosquitto by
default, or an external one by URL) and one MQTT client with the server's identity
(``fleet-server``). It

- ingests what devices send (:mod:`protocol.messages`): ``reported`` state, ``events`` and
  ``telemetry`` go to the registry; ``outbox/chunks`` requests are answered with chunks of
  the requested bundle on the device's ``inbox/chunks``, for bundles that are or were
  desired for that device only;
- publishes each device's desired state, retained, whenever it changes (:meth:`publish`,
  :meth:`rollback`, :meth:`enroll`) and on every connection to the broker, since a broker
  that crashed may have lost retained messages;
- enrolls devices: checks the CSR, redeems the one-time token, records the device and
  returns what the device needs (:class:`Enrollment`).

Chunk requests are answered on paho's network thread (each chunk read and framed once, then
served from memory); everything to store goes to one ingest thread, which writes up to
:data:`_INGEST_BATCH` messages per transaction and acknowledges them to the broker only
once committed, so a message is never lost between receipt and storage (the broker
delivers an unacknowledged one again). A malformed message is logged and recorded as a
``protocol_error`` event; nothing a device sends stops the service. The MQTT client keeps a
persistent session (messages sent while the server is down wait on the broker) and
reconnects with back-off by itself.

Layout of the data directory (``fleet serve --data DIR``)::

    DATA/
      fleet.db         the registry on SQLite (unless --db URL)
      bundles/         bundle blobs, <sha256>.efb
      ca/              the fleet CA (fleet_server.ca); back up ca.key
      identity/        the server's MQTT identity: fleet-server.crt, .key (0600), ca.crt
      broker/          the embedded Mosquitto: mosquitto.conf, acl, mosquitto.log,
                       persistence/
      broker-tls/      the broker's server certificate, re-issued at every start
      state.json       the embedded broker's port when it was chosen automatically
      admin.token      the operator API's bearer token (0600; fleet_server.api)
      server.json      while `fleet serve` runs: its API URL, pid, token file
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from cryptography import x509
from paho.mqtt.client import (
    Client,
    ConnectFlags,
    DisconnectFlags,
    MQTTMessage,
    MQTTMessageInfo,
)
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from bundle.errors import InvalidRootError
from bundle.root import check_root
from bundle.trust import TrustedState, verify_bundle
from common.atomic import write_atomic
from protocol import messages
from protocol.defaults import MQTTS_PORT
from protocol.errors import ProtocolError
from protocol.topics import CHUNK_LEAF, CHUNK_REQUEST_LEAF, device_topic
from transport.mqtt import BrokerAddress, TLSIdentity, close_client
from transport.x509 import certificate_fingerprint

from .broker import SERVER_IDENTITY, Broker, BrokerConfig
from .ca import FleetCA
from .errors import BrokerError, EnrollmentError, RegistryError, ServiceError
from .rate_limit import TokenBuckets
from .registry import BundleRecord, DesiredChange, Device, Registry, open_registry

__all__ = [
    "DEFAULT_FLEET",
    "DEVICE_EVENT_PREFIX",
    "OFFLINE_EVENT",
    "PROTOCOL_ERROR",
    "Enrollment",
    "FleetService",
    "PublishResult",
    "ServiceConfig",
]

log = logging.getLogger(__name__)

DEFAULT_FLEET = "default"
#: Event kind recorded for a message a device sent that could not be used.
PROTOCOL_ERROR = "protocol_error"
#: An ``events`` message of this kind (the agent's MQTT will, for example) marks the device
#: offline; every other message from a device marks it online.
OFFLINE_EVENT = "offline"
#: Device -> server leaves the service subscribes to, for every device (``+``). All of
#: ``outbox/#``, not only chunk requests, so a request this server does not know (a newer
#: agent) is recorded as a protocol error instead of vanishing.
_INGEST_LEAVES = ("reported", "events", "telemetry", "outbox/#")
#: At most this many protocol_error events per device per minute reach the registry; a device
#: stuck in a loop of bad messages must not fill the event log (the log file still says).
_PROTOCOL_ERRORS_PER_MINUTE = 10
#: Re-issue the server's MQTT certificate when it expires within this long.
_RENEW_BEFORE = timedelta(days=30)
_RECONNECT_MIN_S = 1
_RECONNECT_MAX_S = 30
#: Encoded chunk frames kept in memory (least recently used dropped beyond this): in a
#: rollout every device asks for the same chunks, which are then read, hashed and framed
#: once instead of once per device.
_FRAME_CACHE_BYTES = 64 * 1024 * 1024
#: What devices send to be stored (reports, events, telemetry) is written by one ingest
#: thread, up to this many messages per transaction (one commit, on SQLite one fsync, instead
#: of one per message), and acknowledged to the broker once committed.
_INGEST_BATCH = 200
#: Device messages waiting for the ingest thread, at most. When the database falls behind,
#: the MQTT network thread waits for room: the broker then holds (and bounds, with its
#: per-client limits) what would otherwise pile up in this process's memory.
_INGEST_QUEUE = 10_000
#: Event kinds devices send are stored under this prefix (``agent.install.committed``): a
#: device cannot write an event that reads as one of the server's own.
DEVICE_EVENT_PREFIX = "agent."


@dataclass(frozen=True)
class ServiceConfig:
    """How one fleet service runs. Only ``data_dir`` and ``keys_dir`` are required."""

    #: Everything the server keeps on disk (module docstring).
    data_dir: Path
    #: The fleet's keys directory (``fleet keys init --dir KEYS``); only ``KEYS/root.json``
    #: is read: uploads are verified against it and enrolling devices pin it.
    keys_dir: Path
    #: The fleet's name (topic root ``edgefleet/{fleet}``). None: the CA's, or
    #: :data:`DEFAULT_FLEET` for a new data directory. Fixed once the CA exists.
    fleet: str | None = None
    #: Registry URL (docs/registry.md); None is ``DATA/fleet.db`` (SQLite).
    db_url: str | None = None
    #: ``mqtts://host[:port]`` of an external broker; None runs the embedded Mosquitto.
    broker_url: str | None = None
    #: Port of the embedded broker. 0 picks a free port once and keeps it in state.json.
    mqtt_port: int = MQTTS_PORT
    #: Address the embedded broker listens on; "" is every interface (devices are other
    #: machines).
    mqtt_bind: str = ""
    #: Host names or addresses devices use to reach the embedded broker. The first is the
    #: one enrollment hands out; all go into the broker's certificate. Empty: this host's
    #: loopback address, which suits a demo on one machine only.
    broker_hosts: tuple[str, ...] = ()
    #: Seconds to wait for the broker connection at start.
    connect_timeout: float = 10.0
    #: Bundle bytes per second one device may fetch, after a burst of ``chunk_burst_bytes``;
    #: chunk requests beyond it go unanswered (the agent asks again after its back-off), so
    #: a device asking for chunks faster than it reads them cannot flood the broker.
    chunk_rate_bytes: float = 8 * 1024 * 1024
    chunk_burst_bytes: float = 32 * 1024 * 1024
    #: A device not heard from for this long counts as offline, whatever its last word (a
    #: will lost while the server was down would leave it online forever). Agents send
    #: telemetry every 30 s by default; a few missed samples are tolerated.
    offline_after_s: float = 180.0


@dataclass(frozen=True)
class Enrollment:
    """What an enrolled device needs: its certificate, whom to trust, where to connect."""

    device_id: str
    fleet: str
    group: str
    certificate_pem: bytes
    ca_certificate_pem: bytes
    #: ``mqtts://host:port`` as the device should use it.
    broker_url: str
    #: The fleet's TUF root (``KEYS/root.json``), for the device to pin.
    root_json: bytes = field(repr=False)


@dataclass(frozen=True)
class PublishResult:
    """The desired-state changes made, and every device whose desired state was published
    (all selected devices: those already at the target are re-sent theirs, harmlessly)."""

    changes: tuple[DesiredChange, ...]
    devices: tuple[str, ...]
    #: False if the server had no broker connection: the desired states are stored and
    #: will be sent when the connection returns, but nobody has them yet.
    delivered: bool = True


class FleetService:
    """The fleet server's MQTT side and the operations on desired state (module docstring).

    ``start()`` / ``stop()``, or use it as a context manager. Thread-safe: the HTTP API
    calls it from its threads while the MQTT network thread ingests.
    """

    def __init__(self, config: ServiceConfig) -> None:
        """Nothing is opened or started until :meth:`start`."""
        self.config = config
        self._registry: Registry | None = None
        self._ca: FleetCA | None = None
        self._broker: Broker | None = None
        self._client: Client | None = None
        self._broker_url = ""
        self._connected = threading.Event()
        self._connect_failure: str | None = None
        # Held from reading a device's desired state to queueing its message, so the last
        # message queued for a device is always the newest state (paho sends in order).
        self._desired_lock = threading.Lock()
        self._error_budget: dict[str, tuple[float, int]] = {}
        # Chunk serving, on the network thread: stored bundles by sha256 (immutable and never
        # deleted), (device, sha256) pairs known to be fetchable (was_desired only ever turns
        # true), and encoded frames.
        self._bundles: dict[str, BundleRecord] = {}
        self._fetchable: set[tuple[str, str]] = set()
        self._frames = _FrameCache(_FRAME_CACHE_BYTES)
        self._inbox: queue.Queue[_Inbound | None] = queue.Queue(_INGEST_QUEUE)
        self._chunk_budget = TokenBuckets(config.chunk_rate_bytes, config.chunk_burst_bytes)
        #: When (time.time()) the connection to the broker was lost; None while connected.
        self.disconnected_since: float | None = None
        self._ingest_thread: threading.Thread | None = None
        self._lock_file: IO[str] | None = None
        # Counts connections, so a message is not acknowledged on a later connection than
        # the one it came on (the broker re-sends unacknowledged ones after a reconnect).
        self._generation = 0

    # --- life cycle ---

    def start(self) -> None:
        """Open the registry and CA, start the broker, connect and subscribe, then publish
        every device's desired state. Raises ServiceError, BrokerError, CAError or
        RegistryError with what to fix; whatever was started is stopped again."""
        if self._registry is not None:
            raise RuntimeError("the fleet service is already started; stop() it first")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Disconnect, stop an embedded broker and close the registry. Idempotent.

        Messages received so far are stored and acknowledged first; any arriving meanwhile
        stay unacknowledged, and the broker delivers them again on the next start."""
        ingest, self._ingest_thread = self._ingest_thread, None
        if ingest is not None:
            self._inbox.put(None)
            ingest.join()
        client, self._client = self._client, None
        if client is not None:
            _flush(client, f"edgefleet/{self._ca.fleet}/server/flush" if self._ca else None)
            close_client(client)
        self._connected.clear()
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.stop()
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.close()
        lock, self._lock_file = self._lock_file, None
        if lock is not None:
            lock.close()  # releases the data directory

    def __enter__(self) -> FleetService:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def _start(self) -> None:
        data = self.config.data_dir
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError(f"cannot create the data directory {data} ({exc.strerror}); "
                               "choose a writable --data directory") from exc
        self._lock_file = _lock_data_dir(data)
        self.root_json()  # fail at start, not at the first enrollment
        self._ca = self._load_ca()
        self._registry = open_registry(self.config.db_url or data / "fleet.db",
                                       blob_dir=data / "bundles")
        identity = self._server_identity(self._ca)
        self._broker = self._start_broker(self._ca)
        client = self._broker.client(identity)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
        # Stored messages are acknowledged by the ingest thread once committed.
        client.manual_ack_set(True)
        self._client = client
        self._inbox = queue.Queue(_INGEST_QUEUE)
        self._ingest_thread = threading.Thread(target=self._ingest_loop, args=(self._inbox,),
                                               name="fleet-ingest", daemon=True)
        self._ingest_thread.start()
        client.loop_start()
        if not self._connected.wait(self.config.connect_timeout):
            why = self._connect_failure or "no answer"
            raise BrokerError(f"could not connect to the broker at {self._broker.address.url} "
                              f"as {SERVER_IDENTITY} within {self.config.connect_timeout:.0f} "
                              f"s ({why}); check that it runs, trusts the fleet CA and grants "
                              f"{SERVER_IDENTITY} the fleet's topics (docs/transport.md)")
        log.info("fleet %s: service connected to %s", self.fleet, self._broker.address.url)

    def _load_ca(self) -> FleetCA:
        directory = self.config.data_dir / "ca"
        if (directory / "ca.key").exists():
            ca = FleetCA.load(directory)
            if self.config.fleet is not None and self.config.fleet != ca.fleet:
                raise ServiceError(f"{self.config.data_dir} belongs to fleet {ca.fleet!r}, not "
                                   f"{self.config.fleet!r}; drop --fleet or use another "
                                   "--data directory")
            return ca
        return FleetCA.create(directory, self.config.fleet or DEFAULT_FLEET)

    def _server_identity(self, ca: FleetCA) -> TLSIdentity:
        """The server's MQTT identity, issued once and kept (re-issued near expiry)."""
        directory = self.config.data_dir / "identity"
        files = TLSIdentity(directory / "ca.crt", directory / f"{SERVER_IDENTITY}.crt",
                            directory / f"{SERVER_IDENTITY}.key")
        try:
            cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
            fresh = (files.key_file.exists() and cert.issuer == ca.certificate.subject and
                     cert.not_valid_after_utc - _RENEW_BEFORE > datetime.now(timezone.utc))
        except (OSError, ValueError):
            fresh = False
        if fresh:
            return files
        log.info("issuing the fleet server's MQTT identity in %s", directory)
        return ca.write_identity(ca.issue_client_cert(SERVER_IDENTITY), directory)

    def _start_broker(self, ca: FleetCA) -> Broker:
        if self.config.broker_url is not None:
            broker = Broker.external(self.config.broker_url)
            self._broker_url = broker.address.url
            return broker
        data = self.config.data_dir
        hosts = self.config.broker_hosts
        tls = ca.write_identity(ca.issue_server_cert(hosts), data / "broker-tls", "broker")
        remembered = self.config.mqtt_port == 0 and self._remembered_port()
        port = self.config.mqtt_port or remembered or 0

        def config(port: int) -> BrokerConfig:
            return BrokerConfig(ca.fleet, data / "broker", tls, port=port,
                                bind_address=self.config.mqtt_bind)

        broker = Broker.embedded(config(port))
        try:
            broker.start()
        except BrokerError:
            if not remembered:
                raise
            log.warning("the broker's earlier port %d is taken; picking another (enrolled "
                        "devices will not find it: give --mqtt-port a fixed port)", port)
            broker = Broker.embedded(config(0))
            broker.start()
        if self.config.mqtt_port == 0:
            self._remember_port(broker.address.port)
        host = hosts[0] if hosts else broker.address.host
        self._broker_url = BrokerAddress(host, broker.address.port).url
        return broker

    def _remembered_port(self) -> int:
        try:
            state = json.loads((self.config.data_dir / "state.json").read_text("utf-8"))
            return int(state["mqtt_port"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _remember_port(self, port: int) -> None:
        write_atomic(self.config.data_dir / "state.json",
                     json.dumps({"mqtt_port": port}).encode())

    # --- properties ---

    @property
    def registry(self) -> Registry:
        """The registry (while started)."""
        if self._registry is None:
            raise RuntimeError("the fleet service is not started")
        return self._registry

    @property
    def ca(self) -> FleetCA:
        """The fleet CA (while started)."""
        if self._ca is None:
            raise RuntimeError("the fleet service is not started")
        return self._ca

    @property
    def broker(self) -> Broker:
        """The broker (while started): embedded or external."""
        if self._broker is None:
            raise RuntimeError("the fleet service is not started")
        return self._broker

    @property
    def fleet(self) -> str:
        """The fleet's name (while started)."""
        return self.ca.fleet

    @property
    def broker_url(self) -> str:
        """``mqtts://host:port`` as devices should use it (while started)."""
        return self._broker_url

    @property
    def connected(self) -> bool:
        """Whether the service's MQTT client is connected right now."""
        return self._connected.is_set()

    def root_json(self) -> bytes:
        """The fleet's current TUF root (``KEYS/root.json``), read afresh so a key rotation
        takes effect without a restart, and checked: a garbage root handed to enrolling
        devices would make them refuse every bundle."""
        path = self.config.keys_dir / "root.json"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ServiceError(f"cannot read the fleet's root {path} ({exc.strerror}); create "
                               "the keys with `fleet keys init --dir KEYS` and pass --keys "
                               "KEYS") from exc
        try:
            check_root(data, str(path))
        except InvalidRootError as exc:
            raise ServiceError(str(exc)) from exc
        return data

    # --- operations ---

    def enroll(self, token: str, device_id: str, csr_pem: bytes, profile: str,
               tags: Sequence[str] = ()) -> Enrollment:
        """Enroll a device: sign its CSR, use up the token, record the device, publish its
        desired state (kept from an earlier enrollment, else empty).

        Everything that can be checked is checked before the token is used, so a bad CSR,
        profile or tag leaves the token valid. Raises CSRError (bad CSR or device id),
        RegistryError (bad profile or tags), EnrollmentError (token refused)."""
        _check_text("profile", profile)
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise RegistryError(f"tags must be a list of strings, got {tags!r}")
        for tag in tags:
            _check_text("tag", tag)
        certificate = self.ca.sign_device_csr(csr_pem, device_id)
        try:
            group = self.registry.redeem_token(token, device_id)
        except RegistryError as exc:
            raise EnrollmentError(str(exc)) from exc
        device = self.registry.upsert_device(
            device_id, group=group, profile=profile,
            cert_fingerprint=certificate_fingerprint(certificate), tags=tags)
        with self._desired_lock:
            self._send_desired(device)
        log.info("enrolled %s into group %s (profile %s)", device_id, group, profile)
        return Enrollment(device_id=device_id, fleet=self.fleet, group=group,
                          certificate_pem=certificate, ca_certificate_pem=self.ca.cert_pem,
                          broker_url=self.broker_url, root_json=self.root_json())

    def add_bundle(self, data: bytes) -> BundleRecord:
        """Verify an uploaded bundle against the fleet's root and store it under the name
        and version of its signed manifest.

        Raises a ``bundle.errors.BundleError`` subclass naming why the bundle is refused (bad
        signature, tampered, expired, ...), RegistryError if another bundle has that name and
        version. Idempotent for the same bytes."""
        verified = verify_bundle(data, TrustedState(root=self.root_json()),
                                 now=datetime.now(timezone.utc), profile=None)
        manifest = verified.manifest
        record = self.registry.put_bundle(data, manifest.name, manifest.version)
        log.info("stored bundle %s v%d (%s)", record.name, record.version, record.sha256[:12])
        return record

    def publish(self, bundle_sha256: str, *, devices: Sequence[str] | None = None,
                group: str | None = None) -> PublishResult:
        """Make a stored bundle desired for ``devices`` or every device of ``group`` and
        publish their desired state. RegistryError for an unknown bundle, device or group."""
        changes = self.registry.set_desired(bundle_sha256, devices=devices, group=group)
        return self._publish_selected(changes, devices, group)

    def rollback(self, *, devices: Sequence[str] | None = None, group: str | None = None,
                 model: str | None = None) -> PublishResult:
        """Undo the last desired-state change (of ``model``, if given) of the devices or the
        group, and publish their desired state. RegistryError if nothing can be undone."""
        changes = self.registry.rollback(devices=devices, group=group, model=model)
        return self._publish_selected(changes, devices, group)

    def republish_all(self) -> int:
        """Publish every device's desired state (retained); returns how many."""
        with self._desired_lock:
            devices = self.registry.list_devices()
            for device in devices:
                self._send_desired(device)
        log.info("published the desired state of %d device(s)", len(devices))
        return len(devices)

    def _publish_selected(self, changes: list[DesiredChange], devices: Sequence[str] | None,
                          group: str | None) -> PublishResult:
        with self._desired_lock:
            if group is not None:
                selected = self.registry.list_devices(group=group)
            else:
                found = (self.registry.get_device(d) for d in sorted(set(devices or ())))
                selected = [d for d in found if d is not None]
            for device in selected:
                self._send_desired(device)
        delivered = self.connected
        if not delivered:
            log.warning("desired state of %d device(s) stored but not sent: no broker "
                        "connection; it is sent when the connection returns", len(selected))
        return PublishResult(tuple(changes), tuple(d.id for d in selected), delivered)

    def _send_desired(self, device: Device) -> None:
        """Queue ``device``'s desired state, retained (call with _desired_lock held)."""
        models = dict(sorted(device.desired.items()))
        payload = messages.encode(messages.Desired(models=models, issued_at=time.time()))
        self._publish(device.id, "desired", payload, retain=True)

    def _publish(self, device_id: str, leaf: str, payload: bytes, *,
                 retain: bool = False) -> None:
        client = self._client
        if client is None:
            raise RuntimeError("the fleet service is not started")
        # While disconnected paho keeps QoS 1 messages and sends them on reconnect; desired
        # states are re-published on every connection anyway.
        client.publish(device_topic(self.fleet, device_id, leaf), payload, qos=1,
                       retain=retain)

    # --- MQTT callbacks (paho's network thread) ---

    def _on_connect(self, client: Client, _userdata: object, flags: ConnectFlags,
                    reason: ReasonCode, _properties: Properties | None) -> None:
        if reason.is_failure:
            self._connect_failure = f"the broker refused the connection: {reason}"
            log.warning("broker refused the connection: %s", reason)
            return
        self._connect_failure = None
        self._generation += 1
        self.disconnected_since = None
        # No-local: the server's own publishes (clearing a device's retained message) must
        # not come back to it as if a device had sent them. Retain-as-published: a device's
        # retained message arrives marked retained also when the server is subscribed
        # already, so it can be refused (_refuse_retained).
        options = SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True)
        client.subscribe([(device_topic(self.fleet, "+", leaf), options)
                          for leaf in _INGEST_LEAVES])
        try:
            self.republish_all()
        except Exception:
            # A database outage must not kill the network thread; the next connection
            # (or publish) sends the states again.
            log.exception("could not re-publish desired states after connecting")
        log.info("connected to the broker (session %s)",
                 "resumed" if flags.session_present else "new")
        self._connected.set()

    def _on_connect_fail(self, _client: Client, _userdata: object) -> None:
        self._connect_failure = "the TCP or TLS connection failed"

    def _on_disconnect(self, _client: Client, _userdata: object, _flags: DisconnectFlags,
                       reason: ReasonCode, _properties: Properties | None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            self.disconnected_since = time.time()
        if was and self._client is not None:
            log.warning("lost the broker connection (%s); reconnecting", reason)

    def _on_message(self, _client: Client, _userdata: object, message: MQTTMessage) -> None:
        prefix = device_topic(self.fleet, "", "")[:-1]  # "edgefleet/{fleet}/devices/"
        device, _, leaf = message.topic.removeprefix(prefix).partition("/")
        inbound = _Inbound(device, leaf, bytes(message.payload), message.mid, message.qos,
                           self._generation)
        if message.retain:
            self._refuse_retained(message.topic, inbound)
            return
        if leaf != CHUNK_REQUEST_LEAF:
            self._inbox.put(inbound)  # stored, then acknowledged, by the ingest thread
            return
        # Chunk requests are answered here, at once: nothing to store.
        try:
            self._serve_chunk(device, inbound.payload)
        except (ProtocolError, RegistryError) as exc:
            self._inbox.put(replace(inbound, error=exc))  # to record as a protocol error
            return
        except Exception:
            # The database is down, or a bug: log it and keep serving the other devices.
            log.exception("failed to answer a chunk request of %s", device)
        self._ack(inbound)

    def _refuse_retained(self, topic: str, inbound: _Inbound) -> None:
        """Devices never publish retained messages: one would stay on the broker (and come
        back at every subscription) however large. Clear it and record why."""
        client = self._client
        clearing = None
        if client is not None and inbound.payload:
            clearing = client.publish(topic, b"", qos=1, retain=True)
        error = ProtocolError("devices must not publish retained messages; it was cleared")
        self._inbox.put(replace(inbound, error=error, clearing=clearing))

    def _ack(self, inbound: _Inbound) -> None:
        client = self._client
        if client is not None and inbound.generation == self._generation:
            client.ack(inbound.mid, inbound.qos)

    # --- ingest (the ingest thread) ---

    def _ingest_loop(self, inbox: queue.Queue[_Inbound | None]) -> None:
        """Store what devices send, in batches, until None arrives."""
        while True:
            item = inbox.get()
            batch: list[_Inbound] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= _INGEST_BATCH:
                    break
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._ingest_batch(batch)
            if item is None:
                return

    def _ingest_batch(self, batch: list[_Inbound]) -> None:
        """Store ``batch`` in one transaction, then acknowledge it. Should the transaction
        fail (the database, not a message, is at fault), each message is handled alone."""
        # By device (stable: each device's messages keep their order), so rows are locked
        # in id order as everywhere else in the registry.
        batch = sorted(batch, key=lambda item: item.device)
        try:
            with self.registry.batch():
                for item in batch:
                    self._ingest(item, in_batch=True)
        except Exception:
            log.warning("could not store %d device message(s) in one transaction; storing "
                        "them one by one", len(batch), exc_info=True)
            for item in batch:
                self._ingest(item, in_batch=False)
        for item in batch:
            if item.clearing is None or _published(item.clearing):
                self._ack(item)
            # else: unacknowledged, the broker delivers it again and it is cleared then

    def _ingest(self, item: _Inbound, *, in_batch: bool) -> None:
        """Store one message. A bad message is recorded as a protocol error; any other
        failure is raised in a batch (which is then undone), else logged."""
        device, leaf, payload = item.device, item.leaf, item.payload
        try:
            if item.error is not None:
                raise item.error
            if leaf == "reported":
                self._ingest_reported(device, payload)
            elif leaf == "events":
                self._ingest_event(device, payload)
            elif leaf == "telemetry":
                self._ingest_telemetry(device, payload)
            else:
                raise ProtocolError(f"unexpected topic {device_topic(self.fleet, device, leaf)}; "
                                    "this server answers outbox/chunks only")
        except (ProtocolError, RegistryError) as exc:
            self._protocol_error(device, leaf, payload, exc, in_batch=in_batch)
        except Exception:
            if in_batch:
                raise
            # The database is down, or a bug: log it and keep serving the other devices.
            log.exception("failed to handle %s from %s", leaf, device)

    def _ingest_reported(self, device: str, payload: bytes) -> None:
        self.registry.set_reported(device, payload)  # parsed there, once

    def _ingest_event(self, device: str, payload: bytes) -> None:
        event = messages.decode_event(payload)
        detail: dict[str, Any] = {**event.detail, "device_at": event.at}
        self.registry.add_event(DEVICE_EVENT_PREFIX + event.kind, device=device,
                                detail=detail, seq=event.seq)
        self.registry.set_online(device, event.kind != OFFLINE_EVENT)

    def _ingest_telemetry(self, device: str, payload: bytes) -> None:
        sample = messages.decode_telemetry(payload)
        self.registry.add_telemetry(device, [sample])

    def _serve_chunk(self, device: str, payload: bytes) -> None:
        request = messages.decode_chunk_request(payload)
        if not self._chunk_budget.take(device, request.length, time.monotonic()):
            log.debug("chunk request of %s over its rate; not answered", device)
            return
        self._publish(device, CHUNK_LEAF, self._chunk_frame(device, request))

    def _chunk_frame(self, device: str, request: messages.ChunkRequest) -> bytes:
        """The encoded answer to ``request``: the bundle's bytes if ``device`` may fetch it
        (from the frame cache, else read from the blob and cached), or a refusal."""
        sha = request.bundle_sha256
        record = self._bundle_record(sha)
        fetchable = record is not None and self._may_fetch(device, sha)
        key = (sha, request.offset, request.length)
        if fetchable:
            frame = self._frames.get(key)
            if frame is not None:
                return frame
        chunk = self._read_chunk(device, request, record if fetchable else None)
        frame = messages.encode_chunk(chunk)
        if chunk.error is not None:
            log.info("chunk request of %s refused: %s", device, chunk.error)
        else:
            self._frames.put(key, frame)
        return frame

    def _bundle_record(self, sha256: str) -> BundleRecord | None:
        record = self._bundles.get(sha256)
        if record is None:
            record = self.registry.get_bundle(sha256)
            if record is not None:  # unknown ones are asked again: they may be uploaded
                self._bundles[sha256] = record
        return record

    def _may_fetch(self, device: str, sha256: str) -> bool:
        if (device, sha256) in self._fetchable:
            return True
        if not self.registry.was_desired(device, sha256):
            return False
        self._fetchable.add((device, sha256))
        return True

    def _read_chunk(self, device: str, request: messages.ChunkRequest,
                    record: BundleRecord | None) -> messages.Chunk:
        """The chunk of ``record``'s blob, or a refusal; ``record`` is None for a bundle
        that is unknown or not available to ``device``."""
        sha = request.bundle_sha256

        def refuse(error: str, total: int = 0) -> messages.Chunk:
            return messages.Chunk(sha, request.offset, total, b"", error)

        # Unknown and not-for-you get one answer, so a device cannot probe what is stored.
        if record is None:
            return refuse(f"bundle {sha} is not available to device {device}; only bundles "
                          "in its desired state can be fetched")
        if request.offset >= record.size:
            return refuse(f"offset {request.offset} is at or past the end of the bundle "
                          f"({record.size} bytes)", record.size)
        try:
            with record.path.open("rb") as f:
                f.seek(request.offset)
                data = f.read(request.length)
        except OSError as exc:
            log.error("bundle blob %s is unreadable (%s); re-upload the bundle to repair it",
                      record.path, exc)
            return refuse("the server cannot read this bundle right now; retry later",
                          record.size)
        return messages.Chunk(sha, request.offset, record.size, data)

    def _protocol_error(self, device: str, leaf: str, payload: bytes,
                        exc: Exception, *, in_batch: bool = False) -> None:
        log.warning("unusable %s message from %s: %s", leaf, device, exc)
        now = time.monotonic()
        start, count = self._error_budget.get(device, (now, 0))
        if now - start >= 60:
            start, count = now, 0
        self._error_budget[device] = (start, count + 1)
        if count >= _PROTOCOL_ERRORS_PER_MINUTE:
            return
        detail = {"topic": leaf, "error": str(exc), "size": len(payload),
                  "head": payload[:64].decode("utf-8", errors="replace")}
        try:
            self.registry.add_event(PROTOCOL_ERROR, device=device, detail=detail)
        except Exception:
            if in_batch:
                raise  # the batch is undone and its messages handled one by one
            log.exception("could not record a protocol error of %s", device)


@dataclass(frozen=True)
class _Inbound:
    """A message from a device, with what its acknowledgement needs."""

    device: str
    leaf: str
    payload: bytes
    mid: int
    qos: int
    #: The connection it came on (FleetService._generation).
    generation: int
    #: A chunk request that could not be answered: the error to record.
    error: Exception | None = None
    #: A refused retained message: the publish that clears it from the broker, which must
    #: have gone out before the message is acknowledged.
    clearing: MQTTMessageInfo | None = None


class _FrameCache:
    """Encoded chunk frames by (bundle sha256, offset, length), at most ``max_bytes`` of them;
    the least recently used go first. Bundles are immutable, so a frame never goes stale."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._frames: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> bytes | None:
        with self._lock:
            frame = self._frames.get(key)
            if frame is not None:
                self._frames.move_to_end(key)
            return frame

    def put(self, key: tuple[str, int, int], frame: bytes) -> None:
        if len(frame) > self.max_bytes:
            return
        with self._lock:
            old = self._frames.pop(key, None)
            self._bytes += len(frame) - (0 if old is None else len(old))
            self._frames[key] = frame
            while self._bytes > self.max_bytes:
                _, dropped = self._frames.popitem(last=False)
                self._bytes -= len(dropped)


def _flush(client: Client, topic: str | None) -> None:
    """Make sure the broker has processed everything sent before (acknowledgements above
    all): it handles a connection's packets in order, so once it has answered a QoS 1
    publish sent last, it has read the rest. An embedded broker stopped right after a
    disconnect could otherwise die before reading them, and deliver again on the next
    start what was already stored."""
    if topic is not None and client.is_connected():
        _published(client.publish(topic, b"", qos=1))


def _published(info: MQTTMessageInfo) -> bool:
    """Wait for a QoS 1 publish to be acknowledged by the broker (at most 10 s)."""
    try:
        info.wait_for_publish(timeout=10.0)
    except (RuntimeError, ValueError):  # never queued: the connection was gone
        return False
    return info.is_published()


def _lock_data_dir(data: Path) -> IO[str]:
    """Hold ``DATA/serve.lock`` (an exclusive flock, released when the file is closed or
    the process dies): two servers on one data directory would share a broker, a registry
    and server.json, and each would undo the other."""
    path = data / "serve.lock"
    try:
        lock = path.open("a+", encoding="ascii")
    except OSError as exc:
        raise ServiceError(f"cannot open {path} ({exc.strerror}); choose a writable --data "
                           "directory") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ServiceError(f"another fleet server (pid {holder}) is running on {data}; stop "
                           "it first, or give this one another --data directory") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _check_text(what: str, value: object) -> None:
    """The registry's rule for labels, checked before an enrollment uses its token."""
    if (not isinstance(value, str) or not value or value != value.strip()
            or len(value) > 128 or not value.isprintable()):
        raise RegistryError(f"invalid {what} {value!r}: use 1-128 printable characters "
                            "without leading or trailing spaces")
