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

Chunk requests are answered on paho's network thread (:mod:`fleet_server.chunk_server`);
everything to store goes to the ingest thread (:mod:`fleet_server.ingest`), which
acknowledges a message only once it is committed. The MQTT client keeps a persistent session
(messages sent while the server is down wait on the broker) and reconnects with back-off by
itself. The data directory's layout is :mod:`fleet_server.data_dir`'s.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import IO

from paho.mqtt.client import (
    Client,
    ConnectFlags,
    DisconnectFlags,
    MQTTMessage,
)
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from bundle.errors import InvalidRootError
from bundle.root import check_root
from bundle.trust import TrustedState, verify_bundle
from protocol import messages
from protocol.defaults import MQTTS_PORT
from protocol.enrollment import EnrollmentToken, pin_of
from protocol.errors import ProtocolError
from protocol.topics import CHUNK_LEAF, CHUNK_REQUEST_LEAF, device_topic
from transport.mqtt import BrokerAddress, TLSIdentity, close_client, wait_published
from transport.x509 import certificate_fingerprint

from .broker import SERVER_IDENTITY, Broker, BrokerConfig
from .bundle_http import BundleHttpServer, bundle_urls
from .ca import FleetCA
from .chunk_server import ChunkServer
from .data_dir import (
    load_ca,
    lock_data_dir,
    remember_port,
    remembered_port,
    server_identity,
)
from .delta_store import DeltaStore
from .deltas import TransferPlan, offer_for, plan_transfers
from .enrollment import check_token
from .errors import BrokerError, EnrollmentError, RegistryError, ServiceError
from .housekeeping import Housekeeping, retention_job
from .ingest import Inbound, Ingest
from .leadership import Leadership, leadership_for
from .monitoring.config import MonitoringConfig
from .monitoring.monitor import Monitor
from .recipients import Candidate, Recipients, select_recipients
from .registry import (
    BundleRecord,
    DeltaRecord,
    DesiredChange,
    Device,
    Registry,
    open_registry,
)
from .releases import Releaser, check_publishable
from .rollouts.runner import RolloutRunner

__all__ = [
    "API_IDENTITY",
    "Enrollment",
    "FleetService",
    "IssuedToken",
    "PublishResult",
    "ServiceConfig",
]

log = logging.getLogger(__name__)

#: CN of the operator API's server certificate.
API_IDENTITY = "edgefleet-api"
#: Device -> server leaves the service subscribes to, for every device (``+``). All of
#: ``outbox/#``, not only chunk requests, so a request this server does not know (a newer
#: agent) is recorded as a protocol error instead of vanishing.
_INGEST_LEAVES = ("reported", "events", "telemetry", "outbox/#")
_RECONNECT_MIN_S = 1
_RECONNECT_MAX_S = 30


@dataclass(frozen=True)
class ServiceConfig:
    """How one fleet service runs. Only ``data_dir`` and ``keys_dir`` are required."""

    #: Everything the server keeps on disk (module docstring).
    data_dir: Path
    #: The fleet's keys directory (``fleet keys init --dir KEYS``). ``KEYS/root.json`` is
    #: what uploads are verified against and enrolling devices pin; with the online keys
    #: (``KEYS/online``) and the root history there too, the server signs re-releases
    #: (rollback, encryption at publish) itself (:mod:`fleet_server.releases`).
    keys_dir: Path
    #: The fleet's name (topic root ``edgefleet/{fleet}``). None: the CA's, or
    #: :data:`~fleet_server.data_dir.DEFAULT_FLEET` for a new data directory. Fixed once the
    #: CA exists.
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
    #: Days the metadata of a re-release the server signs stays valid (as ``fleet bundle
    #: build --valid-days``).
    release_valid_days: int = 30
    #: A device not heard from for this long counts as offline, whatever its last word (a
    #: will lost while the server was down would leave it online forever). Agents send
    #: telemetry every 30 s by default; a few missed samples are tolerated.
    offline_after_s: float = 180.0
    #: Time series retention, alert rules and webhooks (docs/monitoring.md).
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    #: Seconds between two ticks of the rollout controller (docs/rollouts.md).
    rollout_tick_s: float = 5.0
    #: Port of the bundle download endpoint (HTTPS, device certificates;
    #: :mod:`fleet_server.bundle_http`); None serves bundles over MQTT chunks only, 0 picks
    #: a free port. It listens on ``mqtt_bind`` and is announced on ``broker_hosts[0]``.
    bundle_port: int | None = None
    #: URL prefixes (ending in ``/``) of mirrors holding ``<sha256>.efb`` bundle files (a
    #: CDN, an S3-compatible bucket), offered to devices before the server's own endpoint.
    bundle_mirrors: tuple[str, ...] = ()
    #: This process's name among several ``fleet serve`` processes of one fleet (on one
    #: PostgreSQL, docs/scale.md): its MQTT identity is ``fleet-server-{instance}``, so each
    #: has its own client id. None: the only process, ``fleet-server``.
    instance: str | None = None
    #: Subscribe to device messages through an MQTT 5 shared subscription
    #: (``$share/edgefleet-{fleet}/...``): the broker gives each message to one of the
    #: server processes. Required with several processes, each of which would otherwise
    #: store every message.
    shared_subscriptions: bool = False
    #: Telemetry samples older than this are deleted (by the leader, hourly); None keeps all.
    telemetry_retention_s: float | None = None
    #: Seconds between leadership checks (the take-over time after a leader dies).
    leader_interval_s: float = 1.0
    #: MQTT version towards the broker: 5, or 3.1.1 for an external broker without MQTT 5
    #: (NATS, RabbitMQ before 3.13; docs/scale.md): no shared subscriptions then, and no
    #: reason codes on refused publishes.
    mqtt_protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5


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
class IssuedToken:
    """An enrollment token as the operator gets it."""

    token: str = field(repr=False)
    group: str
    expires_at: float
    #: The device id it is for, or None for any new device.
    device: str | None = None


@dataclass(frozen=True)
class PublishResult:
    """The desired-state changes made, and every device whose desired state was published
    (all selected devices: those already at the target are re-sent theirs, harmlessly)."""

    changes: tuple[DesiredChange, ...]
    devices: tuple[str, ...]
    #: False if the server had no broker connection: the desired states are stored and
    #: will be sent when the connection returns, but nobody has them yet.
    delivered: bool = True
    #: Bundles the server signed for this (re-releases), to show the operator.
    released: tuple[BundleRecord, ...] = ()
    #: For a publish: which devices get a delta and the bytes that saves.
    transfer: TransferPlan | None = None


class FleetService:
    """The fleet server's MQTT side and the operations on desired state (module docstring).

    ``start()`` / ``stop()``, or use it as a context manager. Thread-safe: the HTTP API
    calls it from its threads while the MQTT network thread ingests.
    """

    def __init__(self, config: ServiceConfig) -> None:
        """Nothing is opened or started until :meth:`start`."""
        self.config = config
        self._registry: Registry | None = None
        self._releaser: Releaser | None = None
        self._deltas: DeltaStore | None = None
        self._ca: FleetCA | None = None
        self._broker: Broker | None = None
        self._client: Client | None = None
        self._broker_url = ""
        self._connected = threading.Event()
        self._connect_failure: str | None = None
        # Held from reading a device's desired state to queueing its message, so the last
        # message queued for a device is always the newest state (paho sends in order).
        self._desired_lock = threading.Lock()
        self._ingest: Ingest | None = None
        self._monitor: Monitor | None = None
        self._rollouts: RolloutRunner | None = None
        self._chunks: ChunkServer | None = None
        self._bundle_http: BundleHttpServer | None = None
        self._bundle_prefixes: tuple[str, ...] = ()
        self._leadership: Leadership | None = None
        self._housekeeping: Housekeeping | None = None
        #: When (time.time()) the connection to the broker was lost; None while connected.
        self.disconnected_since: float | None = None
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
        rollouts, self._rollouts = self._rollouts, None
        if rollouts is not None:
            rollouts.stop()
        ingest, self._ingest = self._ingest, None
        if ingest is not None:
            ingest.stop()
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop()
        self._chunks = None
        housekeeping, self._housekeeping = self._housekeeping, None
        if housekeeping is not None:
            housekeeping.stop()
        leadership, self._leadership = self._leadership, None
        if leadership is not None:
            leadership.stop()
        bundle_http, self._bundle_http = self._bundle_http, None
        if bundle_http is not None:
            bundle_http.stop()
        client, self._client = self._client, None
        if client is not None:
            if self._ca is not None and client.is_connected():
                # The broker handles a connection's packets in order: once it answered this,
                # it has read every acknowledgement before it. An embedded broker stopped
                # right after could otherwise die first and deliver those messages again.
                wait_published(client.publish(
                    f"edgefleet/{self._ca.fleet}/server/flush", b"", qos=1))
            close_client(client)
        self._connected.clear()
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.stop()
        self._releaser = None
        self._deltas = None
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
        self._lock_file = lock_data_dir(data)
        self.root_json()  # fail at start, not at the first enrollment
        self._ca = load_ca(data, self.config.fleet)
        self._registry = open_registry(self.config.db_url or data / "fleet.db",
                                       blob_dir=data / "bundles")
        self._deltas = DeltaStore(self._registry)
        self._releaser = Releaser(self._registry, self.config.keys_dir,
                                  valid_days=self.config.release_valid_days,
                                  root=self.root_json)
        log.info("keys %s: %s", self.config.keys_dir,
                 "online keys found, the server signs re-releases (rollback)"
                 if self._releaser.can_sign else "no online keys: rollback and encryption "
                 "at publish need them (fleet serve --keys KEYS)")
        identity = server_identity(data, self._ca, self.client_name)
        self._start_leadership(self._ca.fleet, self._registry)
        self._broker = self._start_broker(self._ca)
        client = self._broker.client(identity, self.config.mqtt_protocol)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
        # Stored messages are acknowledged by the ingest thread once committed.
        client.manual_ack_set(True)
        self._client = client
        self._chunks = ChunkServer(self._registry, rate_bytes=self.config.chunk_rate_bytes,
                                   burst_bytes=self.config.chunk_burst_bytes)
        self._monitor = Monitor(self._registry, self.config.monitoring,
                                offline_after_s=self.config.offline_after_s,
                                is_leader=self.leadership.is_leader)
        self._monitor.start()
        self._start_bundle_http(self._ca, self._registry)
        self._ingest = Ingest(self._registry, self._ack, on_samples=self._monitor.observe)
        self._ingest.start()
        client.loop_start()
        if not self._connected.wait(self.config.connect_timeout):
            why = self._connect_failure or "no answer"
            raise BrokerError(f"could not connect to the broker at {self._broker.address.url} "
                              f"as {self.client_name} within {self.config.connect_timeout:.0f} "
                              f"s ({why}); check that it runs, trusts the fleet CA and grants "
                              f"{self.client_name} the fleet's topics (docs/transport.md)")
        log.info("fleet %s: service connected to %s", self.fleet, self._broker.address.url)
        self._rollouts = RolloutRunner(
            self._registry, publish=lambda ids: self._publish_selected([], ids, None),
            online=lambda d, now: d.online_at(now, self.config.offline_after_s),
            tick_s=self.config.rollout_tick_s, check=self._check_rollout)
        self._rollouts.start()  # resumes the rollouts the registry holds

    def _start_broker(self, ca: FleetCA) -> Broker:
        if self.config.broker_url is not None:
            broker = Broker.external(self.config.broker_url)
            self._broker_url = broker.address.url
            return broker
        data = self.config.data_dir
        hosts = self.config.broker_hosts
        tls = ca.write_identity(ca.issue_server_cert(hosts), data / "broker-tls", "broker")
        remembered = self.config.mqtt_port == 0 and remembered_port(data)
        port = self.config.mqtt_port or remembered or 0

        def config(port: int) -> BrokerConfig:
            return BrokerConfig(ca.fleet, data / "broker", tls, port=port,
                                bind_address=self.config.mqtt_bind, crl_file=ca.crl_path)

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
            remember_port(data, broker.address.port)
        host = hosts[0] if hosts else broker.address.host
        self._broker_url = BrokerAddress(host, broker.address.port).url
        return broker

    def _start_leadership(self, fleet: str, registry: Registry) -> None:
        """Compete for the fleet's once-only work (:mod:`fleet_server.leadership`)."""
        self._leadership = leadership_for(self.config.db_url, fleet,
                                          interval_s=self.config.leader_interval_s)
        self._leadership.start()
        keep = self.config.telemetry_retention_s
        jobs = [] if keep is None else [retention_job(registry, keep)]
        self._housekeeping = Housekeeping(self._leadership, jobs, interval_s=3600.0)
        self._housekeeping.start()

    @property
    def client_name(self) -> str:
        """This process's MQTT identity (certificate CN and client id)."""
        instance = self.config.instance
        return SERVER_IDENTITY if instance is None else f"{SERVER_IDENTITY}-{instance}"

    @property
    def leadership(self) -> Leadership:
        """Whether this process does the fleet's once-only work (while started)."""
        if self._leadership is None:
            raise RuntimeError("the fleet service is not started")
        return self._leadership

    def _start_bundle_http(self, ca: FleetCA, registry: Registry) -> None:
        """Serve bundles over HTTPS if configured; the URL prefixes devices are given."""
        prefixes = list(self.config.bundle_mirrors)
        if self.config.bundle_port is not None:
            hosts = self.config.broker_hosts
            tls = ca.write_identity(ca.issue_server_cert(hosts, common_name="edgefleet-bundles"),
                                    self.config.data_dir / "bundle-tls", "bundles")
            self._bundle_http = BundleHttpServer(registry, tls, host=self.config.mqtt_bind,
                                                 port=self.config.bundle_port)
            self._bundle_http.start()
            host = hosts[0] if hosts else "127.0.0.1"
            host = f"[{host}]" if ":" in host else host
            prefixes.append(f"https://{host}:{self._bundle_http.port}/bundles/")
        self._bundle_prefixes = tuple(prefixes)

    # --- properties ---

    @property
    def registry(self) -> Registry:
        """The registry (while started)."""
        if self._registry is None:
            raise RuntimeError("the fleet service is not started")
        return self._registry

    @property
    def ingest(self) -> Ingest:
        """The ingest of device messages (while started): its queue depth, for one."""
        if self._ingest is None:
            raise RuntimeError("the fleet service is not started")
        return self._ingest

    @property
    def monitor(self) -> Monitor:
        """Time series, alerts (``monitor.raise_alert``) and fleet figures."""
        if self._monitor is None:
            raise RuntimeError("the fleet service is not started")
        return self._monitor

    @property
    def rollouts(self) -> RolloutRunner:
        """The rollouts (:mod:`fleet_server.rollouts`); RuntimeError before start()."""
        if self._rollouts is None:
            raise RuntimeError("the fleet service is not started")
        return self._rollouts

    def _check_rollout(self, bundle_sha256: str, devices: Sequence[Device]) -> None:
        record = self.registry.get_bundle(bundle_sha256)
        if record is not None:
            check_publishable(record, devices, self.registry.get_bundle)

    @property
    def releaser(self) -> Releaser:
        """Versions and re-releases (while started)."""
        if self._releaser is None:
            raise RuntimeError("the fleet service is not started")
        return self._releaser

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

    def api_identity(self, hosts: Sequence[str] = ()) -> TLSIdentity:
        """The operator API's TLS certificate and key, issued by the fleet CA for ``hosts``
        (and localhost) into ``DATA/api-tls`` (re-issued at every start, so a new name takes
        effect on restart, as the broker's does)."""
        issued = self.ca.issue_server_cert(hosts, common_name=API_IDENTITY)
        return self.ca.write_identity(issued, self.config.data_dir / "api-tls", "api")

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

    def issue_token(self, group: str, ttl: float, device: str | None = None) -> IssuedToken:
        """A one-time enrollment token for ``group``, valid ``ttl`` seconds, carrying the
        pins of the fleet CA and the current root.json (:mod:`protocol.enrollment`); with
        ``device``, for that device id only, which it may take over (re-enrollment)."""
        _check_text("group", group)
        issued_at = time.time()  # the registry's clock is the wall clock too
        secret = self.registry.issue_token(group, ttl, device)
        token = EnrollmentToken(secret, self.ca_pin, pin_of(self.root_json()))
        return IssuedToken(token.encode(), group, issued_at + ttl, device)

    @property
    def ca_pin(self) -> bytes:
        """The pin of the fleet CA certificate: SHA-256 of its DER (while started)."""
        return bytes.fromhex(certificate_fingerprint(self.ca.cert_pem))

    def enroll(self, token: str, device_id: str, csr_pem: bytes, profile: str,
               tags: Sequence[str] = (), *, encryption_key: str | None = None,
               ) -> Enrollment:
        """Enroll a device: check the token's pins, sign its CSR, use up the token and record
        the device (with the public X25519 ``encryption_key`` it registers, base64), revoke
        the certificate it replaces, publish its desired state (kept from an earlier
        enrollment, else empty).

        An enrolled device id is taken only with a token issued for it or after
        :meth:`reset_device` (:meth:`Registry.enroll_device`). Everything that can be
        checked is checked before the token is used, so a bad CSR, profile, tag, key or a
        token of another root leaves the token valid. Raises CSRError (bad CSR or device
        id), RegistryError (bad profile, tags or key), EnrollmentError (token refused)."""
        _check_text("profile", profile)
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise RegistryError(f"tags must be a list of strings, got {tags!r}")
        for tag in tags:
            _check_text("tag", tag)
        parsed = check_token(token, ca_pin=self.ca_pin, root=self.root_json(),
                             earlier_roots=self._earlier_roots())
        certificate = self.ca.sign_device_csr(csr_pem, device_id)
        try:
            enrolled = self.registry.enroll_device(
                parsed.secret, device_id, profile=profile,
                cert_fingerprint=certificate_fingerprint(certificate), tags=tags,
                encryption_key=encryption_key)
        except RegistryError as exc:
            raise EnrollmentError(str(exc)) from exc
        device = enrolled.device
        if enrolled.replaced_fingerprint is not None:
            self._revoke(device_id, enrolled.replaced_fingerprint,
                         "replaced by a new enrollment")
            self._drop_connection(device)
        with self._desired_lock:
            self._send_desired(device)
        log.info("enrolled %s into group %s (profile %s)", device_id, device.group, profile)
        return Enrollment(device_id=device_id, fleet=self.fleet, group=device.group,
                          certificate_pem=certificate, ca_certificate_pem=self.ca.cert_pem,
                          broker_url=self.broker_url, root_json=self.root_json())

    def reset_device(self, device_id: str) -> Device:
        """The operator's reset: revoke the device's certificate (the broker refuses it from
        now on, and an embedded broker drops its connection), and let any token enroll its
        id again. Its group, tags and desired state stay for the device that enrolls next.
        RegistryError if there is no such device."""
        device = self.registry.reset_device(device_id)
        self._revoke(device_id, device.cert_fingerprint, "device reset by the operator")
        self._drop_connection(device)
        log.info("reset %s: certificate %s revoked", device_id, device.cert_fingerprint[:16])
        return device

    def _drop_connection(self, device: Device) -> None:
        """End the connection a just-revoked certificate may still hold: the broker checks
        the CRL only when a client connects."""
        if self._chunks is not None:
            self._chunks.forget_device(device.id)
        # Mosquitto 2.0 cannot drop one client: a restart drops all, who reconnect (the
        # revoked one cannot). Not needed for a device that never connected.
        if device.last_seen is not None:
            self.broker.restart()

    def _earlier_roots(self) -> list[bytes]:
        """Every root version the keys directory keeps (``fleet keys`` keeps them)."""
        history = self.config.keys_dir / "repository" / "root_history"
        roots = []
        for path in sorted(history.glob("*.root.json")) if history.is_dir() else ():
            with contextlib.suppress(OSError):
                roots.append(path.read_bytes())
        return roots

    def _revoke(self, device_id: str, fingerprint: str, reason: str) -> None:
        """Revoke a certificate of ``device_id`` and make the broker refuse it from now on."""
        if not self.ca.revoke(fingerprint, reason):
            self.registry.add_event("certificate.not_revoked", device=device_id, detail={
                "cert_fingerprint": fingerprint, "reason": "the CA has no record of it "
                "(issued by an older edgefleet); it stays valid until it expires"})
            return
        self.broker.reload_crl()
        self.registry.add_event("certificate.revoked", device=device_id, detail={
            "cert_fingerprint": fingerprint, "reason": reason})

    def add_bundle(self, data: bytes) -> BundleRecord | DeltaRecord:
        """Verify an uploaded bundle against the fleet's root and store it under the name
        and version of its signed manifest (with its metadata version); a delta bundle is
        stored with the full bundle of its release (:mod:`fleet_server.delta_store`).

        Raises a ``bundle.errors.BundleError`` subclass naming why the bundle is refused (bad
        signature, tampered, expired, ...), RegistryError if another bundle has that name and
        version. Idempotent for the same bytes."""
        verified = verify_bundle(data, TrustedState(root=self.root_json()),
                                 now=datetime.now(timezone.utc), profile=None)
        manifest = verified.manifest
        if verified.delta_base is not None:
            assert self._deltas is not None
            delta = self._deltas.add(data, verified)
            log.info("stored the delta bundle of %s v%d from v%d (%s, %d bytes)",
                     manifest.name, manifest.version, delta.base_version, delta.sha256[:12],
                     delta.size)
            return delta
        record = self.registry.put_bundle(data, manifest.name, manifest.version,
                                          metadata_version=verified.metadata_version,
                                          rollback_of=manifest.rollback_of)
        log.info("stored bundle %s v%d (%s)", record.name, record.version, record.sha256[:12])
        return record

    def publish(self, bundle_sha256: str, *, devices: Sequence[str] | None = None,
                group: str | None = None, encrypt_for: Sequence[str] = ()) -> PublishResult:
        """Make a stored bundle desired for ``devices`` or every device of ``group`` and
        publish their desired state. With ``encrypt_for`` (selectors, see
        :mod:`fleet_server.recipients`) the bundle's artifacts are first encrypted for those
        devices in a re-release (the next version), and that is published.

        Nothing changes, and ReleaseError says why, if a selected device would refuse the
        bundle (an older version than it has, older metadata than it trusts). RegistryError
        for an unknown bundle, device or group."""
        record = self.registry.get_bundle(bundle_sha256)
        if record is None:
            raise RegistryError(f"no stored bundle has sha256 {bundle_sha256!r}; upload it "
                                "first")
        # Checked before a re-release uses up a version: if devices would take the bundle,
        # they take its re-release (a higher version, newer metadata) too.
        check_publishable(record, self._selected(devices, group), self.registry.get_bundle)
        released: tuple[BundleRecord, ...] = ()
        if encrypt_for:
            recipients = self.recipients(encrypt_for)
            record = self.releaser.rerelease(record, recipients=recipients.keys)
            released = (record,)
        transfer = plan_transfers(record.desired, record.name, self._selected(devices, group),
                                  self._deltas_of(record.sha256))
        changes = self.registry.set_desired(record.sha256, devices=devices, group=group)
        return replace(self._publish_selected(changes, devices, group), released=released,
                       transfer=transfer)

    def _deltas_of(self, bundle_sha256: str) -> list[DeltaRecord]:
        if self._deltas is None:
            raise RuntimeError("the fleet service is not started")
        return self._deltas.of(bundle_sha256)

    def rollback(self, *, devices: Sequence[str] | None = None, group: str | None = None,
                 model: str | None = None) -> PublishResult:
        """Undo the last desired-state change (of ``model``, if given) of the devices or the
        group, and publish their desired state. The bundle each goes back to is
        re-released first as the next version of its model (devices refuse lower
        versions), signed here (:class:`~fleet_server.releases.Releaser`). RegistryError if
        nothing can be undone, ReleaseError if this server cannot sign."""
        plan = self.registry.rollback(devices=devices, group=group, model=model,
                                      dry_run=True)
        substitute: dict[str, messages.DesiredModel] = {}
        released = []
        for sha in sorted({c.after.bundle_sha256 for c in plan if c.after is not None}):
            source = self.registry.get_bundle(sha)
            if source is None:  # desired states only name stored bundles
                raise RegistryError(f"bundle {sha} to roll back to is not stored")
            record = self.releaser.rerelease(source, rollback_of=source.version)
            released.append(record)
            substitute[sha] = record.desired
        changes = self.registry.rollback(devices=devices, group=group, model=model,
                                         substitute=substitute)
        return replace(self._publish_selected(changes, devices, group),
                       released=tuple(released))

    def recipients(self, selectors: Sequence[str]) -> Recipients:
        """The devices ``selectors`` choose and their encryption keys (ReleaseError if one
        matches nothing or a device has no key)."""
        return select_recipients(selectors, (
            Candidate(d.id, d.group, d.profile, d.encryption_key)
            for d in self.registry.list_devices()))

    def _selected(self, devices: Sequence[str] | None, group: str | None) -> list[Device]:
        if group is not None:
            return self.registry.list_devices(group=group)
        found = (self.registry.get_device(d) for d in sorted(set(devices or ())))
        return [d for d in found if d is not None]

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
            selected = self._selected(devices, group)
            for device in selected:
                self._send_desired(device)
        delivered = self.connected
        if not delivered:
            log.warning("desired state of %d device(s) stored but not sent: no broker "
                        "connection; it is sent when the connection returns", len(selected))
        return PublishResult(tuple(changes), tuple(d.id for d in selected), delivered)

    def _send_desired(self, device: Device) -> None:
        """Queue ``device``'s desired state, retained (call with _desired_lock held)."""
        # The delta from the version the device runs, if the release has one, and where
        # the full bundle can be downloaded over HTTP(S).
        models = {name: replace(offer_for(want, device.running.get(name),
                                          self._deltas_of(want.bundle_sha256)),
                                urls=bundle_urls(self._bundle_prefixes, want.bundle_sha256))
                  for name, want in sorted(device.desired.items())}
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
        # A shared subscription may not ask for no-local (MQTT 5, 3.8.3.1); the server's
        # own clearing publishes (empty) are then dropped in _on_message.
        shared = self.config.shared_subscriptions
        options = SubscribeOptions(qos=1, noLocal=not shared, retainAsPublished=True)
        prefix = f"$share/edgefleet-{self.fleet}/" if shared else ""
        topics = [prefix + device_topic(self.fleet, "+", leaf) for leaf in _INGEST_LEAVES]
        if self.config.mqtt_protocol == MQTTProtocolVersion.MQTTv5:
            client.subscribe([(topic, options) for topic in topics])
        else:  # 3.1.1 has QoS only; a device's retained message then arrives retained only
            # when the server subscribes, and is refused the same way
            client.subscribe([(topic, 1) for topic in topics])
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
        inbound = Inbound(device, leaf, bytes(message.payload), message.mid, message.qos,
                          self._generation)
        ingest, chunks = self._ingest, self._chunks
        if ingest is None or chunks is None:
            return  # stopping: unacknowledged, the broker delivers it again
        if message.retain and not inbound.payload:
            self._ack(inbound)  # a retained message cleared, by this or another server
            return
        if message.retain:
            self._refuse_retained(message.topic, inbound, ingest)
            return
        if leaf != CHUNK_REQUEST_LEAF:
            ingest.put(inbound)  # stored, then acknowledged, by the ingest thread
            return
        # Chunk requests are answered here, at once: nothing to store.
        try:
            frame = chunks.answer(device, inbound.payload)
            if frame is not None:
                self._publish(device, CHUNK_LEAF, frame)
        except (ProtocolError, RegistryError) as exc:
            ingest.put(replace(inbound, error=exc))  # to record as a protocol error
            return
        except Exception:
            # The database is down, or a bug: log it and keep serving the other devices.
            log.exception("failed to answer a chunk request of %s", device)
        self._ack(inbound)

    def _refuse_retained(self, topic: str, inbound: Inbound, ingest: Ingest) -> None:
        """Devices never publish retained messages: one would stay on the broker (and come
        back at every subscription) however large. Clear it and record why."""
        client = self._client
        clearing = None
        if client is not None and inbound.payload:
            clearing = client.publish(topic, b"", qos=1, retain=True)
        error = ProtocolError("devices must not publish retained messages; it was cleared")
        ingest.put(replace(inbound, error=error, clearing=clearing))

    def _ack(self, inbound: Inbound) -> None:
        client = self._client
        if client is not None and inbound.generation == self._generation:
            client.ack(inbound.mid, inbound.qos)


def _check_text(what: str, value: object) -> None:
    """The registry's rule for labels, checked before an enrollment uses its token."""
    if (not isinstance(value, str) or not value or value != value.strip()
            or len(value) > 128 or not value.isprintable()):
        shown = repr(value)[:64] + ("..." if len(repr(value)) > 64 else "")
        raise RegistryError(f"invalid {what} {shown}: use 1-128 printable characters "
                            "without leading or trailing spaces")
