"""The fleet service: the server's end of the MQTT protocol, around one registry.

:class:`FleetService` owns the registry, the fleet CA, the broker (an embedded Mosquitto by
default, or an external one by URL) and one MQTT client with the server's identity
(``fleet-server``), and starts and stops the parts that work with them:

- :mod:`fleet_server.device_link`: the MQTT session; what devices send (``reported``,
  ``events``, ``telemetry``) goes to the ingest thread (:mod:`fleet_server.ingest`), which
  acknowledges a message only once it is committed, and ``outbox/chunks`` requests are
  answered at once (:mod:`fleet_server.chunk_server`), for bundles that are or were desired
  for that device only;
- :mod:`fleet_server.publishing`: uploads, publish and rollback, and each device's desired
  state, retained, whenever it changes and on every connection to the broker, since a
  broker that crashed may have lost retained messages;
- :mod:`fleet_server.enroller`: enrollment tokens, enrollments and resets;
- the monitor (:mod:`fleet_server.monitoring`), the rollout runner
  (:mod:`fleet_server.rollouts`), the bundle download endpoint
  (:mod:`fleet_server.bundle_http`) and the leader's housekeeping.

Its operations (:meth:`FleetService.publish`, :meth:`FleetService.enroll`, ...) are those
parts' own, offered here so the API and tests have one object to hold. The configuration is
:class:`~fleet_server.service_config.ServiceConfig`; the data directory's layout is
:mod:`fleet_server.data_dir`'s.

Why one module of some 550 lines: it is the composition root, the one place that knows the
order in which the parts start and stop (registry before CA, claim before the broker
session, the share left before the ingest stops); each part's logic is in its own module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Protocol, TypeVar

from bundle.errors import InvalidRootError
from bundle.root import check_root
from common.periodic import Periodic
from transport.mqtt import BrokerAddress, TLSIdentity

from .broker import Broker
from .broker_config import SERVER_IDENTITY, BrokerConfig
from .bundle_http import BundleHttpServer
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
from .device_link import MAX_INBOUND_PACKET_BYTES, DeviceLink
from .enroller import Enroller, Enrollment, IssuedToken
from .errors import BrokerError, ServiceError
from .experiment_runner import ExperimentRunner
from .housekeeping import Housekeeping, retention_job
from .ingest import MESSAGES, TELEMETRY, Ingest
from .instance_claim import InstanceClaim
from .leadership import Leadership, leadership_for
from .monitoring.monitor import Monitor
from .publishing import Publisher, PublishResult
from .rate_limit import Allowance, MessageLimits
from .recipients import Recipients
from .registry import BundleRecord, DeltaRecord, Device, Registry, open_registry
from .releases import Releaser
from .rollouts.runner import RolloutRunner
from .service_config import ServiceConfig

__all__ = ["API_IDENTITY", "FleetService", "ServiceConfig"]

log = logging.getLogger(__name__)

#: CN of the operator API's server certificate.
API_IDENTITY = "edgefleet-api"

#: Seconds between two looks at the registry's revocations: how long a certificate another
#: server process revoked stays on this process's CRL file unlisted at most.
#: Seconds between checks that this process still holds its instance claim (an outage
#: ends the claim's database session).
_CLAIM_CHECK_S = 5.0
_CRL_REFRESH_S = 10.0
_T = TypeVar("_T")


class _Stoppable(Protocol):
    """A part of the service running on a thread of its own."""

    def stop(self) -> None:
        """Stop it (idempotent)."""
        ...


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
        self._ca: FleetCA | None = None
        self._broker: Broker | None = None
        self._link: DeviceLink | None = None
        self._publisher: Publisher | None = None
        self._enroller: Enroller | None = None
        self._broker_url = ""
        self._ingest: Ingest | None = None
        self._monitor: Monitor | None = None
        self._rollouts: RolloutRunner | None = None
        self._experiments: ExperimentRunner | None = None
        self._bundle_http: BundleHttpServer | None = None
        self._leadership: Leadership | None = None
        self._housekeeping: Housekeeping | None = None
        self._lock_file: IO[str] | None = None
        self._claim: InstanceClaim | None = None
        self._crl_refresh: Periodic | None = None
        self._claim_keeper: Periodic | None = None
        #: Whether the desired states were sent after a connection of this start's.
        self._republished = False

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

    def _leave_share(self, link: DeviceLink) -> None:
        """Leave the shared subscription if another process of the fleet runs (stop())."""
        others = None if self._claim is None else self._claim.others_running()
        if others:
            link.release_share()
        elif self.config.shared_subscriptions:
            log.info("%s: keeping the shared subscription, so the broker queues device "
                     "messages for this process until it starts again",
                     "no other server process of the fleet runs" if others is False else
                     "the registry cannot tell whether another server process runs")

    def stop(self) -> None:
        """Disconnect, stop an embedded broker and close the registry. Idempotent.

        With shared subscriptions, while another server process of the fleet runs, this
        one first leaves the shared subscription, so the others take every device message
        from then on (docs/scale.md, "Removing an instance"); the last one keeps it, so the
        broker queues device messages for its session until a process starts again
        (leaving it, nobody would be subscribed and the broker would drop them). Messages
        received so far are stored and acknowledged first; any arriving meanwhile stay
        unacknowledged, and the broker delivers them again on the next start."""
        rollouts, self._rollouts = self._rollouts, None
        if rollouts is not None:
            rollouts.stop()
        if self._link is not None:
            self._leave_share(self._link)
            self._link.detach()
        ingest, self._ingest = self._ingest, None
        if ingest is not None:
            ingest.stop()
        threads: tuple[_Stoppable | None, ...] = (
            self._monitor, self._housekeeping, self._leadership, self._crl_refresh,
            self._claim_keeper)
        self._monitor = self._housekeeping = self._leadership = self._crl_refresh = None
        self._claim_keeper = None
        for thread in threads:
            if thread is not None:
                thread.stop()
        bundle_http, self._bundle_http = self._bundle_http, None
        if bundle_http is not None:
            bundle_http.stop()
        link, self._link = self._link, None
        if link is not None:
            link.close()
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.release()
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.stop()
        self._enroller = None
        self._publisher = None
        self._releaser = None
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
        self._republished = False
        self.root_json()  # fail at start, not at the first enrollment
        # The registry first: one that does not open (an empty file, a wrong database
        # URL) must leave the data directory as it was, not with a new fleet CA in it.
        self._registry = open_registry(self.config.db_url or data / "fleet.db",
                                       blob_dir=data / "bundles")
        self._ca = load_ca(data, self.config.fleet)
        # Issued and revoked certificates in the registry, which every server process of
        # the fleet shares (fleet_server.ca, "Shared records").
        self._ca.share_records(self._registry)
        self._releaser = Releaser(self._registry, self.config.keys_dir,
                                  valid_days=self.config.release_valid_days,
                                  root=self.root_json)
        log.info("keys %s: %s", self.config.keys_dir,
                 "online keys found, the server signs re-releases (rollback)"
                 if self._releaser.can_sign else "no online keys: rollback and encryption "
                 "at publish need them (fleet serve --keys KEYS)")
        identity = server_identity(data, self._ca, self.client_name)
        db_url = self.config.db_url
        if db_url is not None and db_url.startswith(("postgresql://", "postgres://")):
            self._claim = InstanceClaim.take(db_url, self._ca.fleet, self.client_name)
            self._claim_keeper = Periodic("fleet-claim", self._claim.keep, _CLAIM_CHECK_S,
                                          wait_first=True)
            self._claim_keeper.start()
        self._start_leadership(self._ca.fleet, self._registry)
        self._broker = self._start_broker(self._ca)
        self._crl_refresh = Periodic("fleet-crl", self._refresh_crl, _CRL_REFRESH_S,
                                     wait_first=True)
        self._crl_refresh.start()
        link = self._link = DeviceLink(
            self._broker.client(identity, self.config.mqtt_protocol,
                                max_packet_size=MAX_INBOUND_PACKET_BYTES), self._ca.fleet,
            name=self.client_name, shared_subscriptions=self.config.shared_subscriptions,
            protocol=self.config.mqtt_protocol, on_connected=self._on_connected)
        chunks = ChunkServer(self._registry, rate_bytes=self.config.chunk_rate_bytes,
                             burst_bytes=self.config.chunk_burst_bytes)
        self._monitor = Monitor(self._registry, self.config.monitoring,
                                offline_after_s=self.config.offline_after_s,
                                is_leader=self.leadership.is_leader)
        self._monitor.start()
        publisher = self._publisher = Publisher(
            self._registry, self._releaser, DeltaStore(self._registry), link,
            root=self.root_json, bundle_prefixes=self._start_bundle_http(self._ca,
                                                                         self._registry))
        self._enroller = Enroller(self._registry, self._ca, self._broker, chunks,
                                  root=self.root_json, keys_dir=self.config.keys_dir,
                                  broker_url=self._broker_url, send_desired=publisher.send)
        self._experiments = ExperimentRunner(
            self._registry, publish=lambda ids: publisher.publish_selected([], ids, None),
            send=lambda device, leaf, payload, retain: link.publish(device, leaf, payload,
                                                                    retain=retain),
            rollouts=lambda model: {} if self._rollouts is None else self._rollouts.busy(model))
        config = self.config
        self._ingest = Ingest(self._registry, link.ack, on_samples=self._monitor.observe,
                              experiments=self._experiments, limits=MessageLimits({
                                  TELEMETRY: Allowance(config.telemetry_rate,
                                                       config.telemetry_burst),
                                  MESSAGES: Allowance(config.message_rate,
                                                      config.message_burst)}))
        self._ingest.start()
        if not link.start(self._ingest, chunks, self.config.connect_timeout):
            why = link.connect_failure or "no answer"
            raise BrokerError(f"could not connect to the broker at {self._broker.address.url} "
                              f"as {self.client_name} within {self.config.connect_timeout:.0f} "
                              f"s ({why}); check that it runs, trusts the fleet CA and grants "
                              f"{self.client_name} the fleet's topics (docs/transport.md)")
        log.info("fleet %s: service connected to %s", self.fleet, self._broker.address.url)
        self._rollouts = RolloutRunner(
            self._registry, publish=lambda ids: publisher.publish_selected([], ids, None),
            online=lambda d, now: d.online_at(now, self.config.offline_after_s),
            tick_s=self.config.rollout_tick_s, check=publisher.check_rollout,
            rerelease=lambda b: self.releaser.rerelease(b, rollback_of=b.version),
            experiments=self._experiments.running_on, is_leader=self.leadership.is_leader)
        # The leader's runner resumes the rollouts the registry holds.
        self._rollouts.start()

    def _on_connected(self) -> None:
        """After every connection to the broker (its network thread): send again what a
        broker that crashed may have lost, the retained desired states and the experiments'
        posterior pushes.

        The desired states: on this process's first connection (what it committed and had
        not sent when it was killed is sent now), and on a reconnection by the leader only.
        A broker that lost its retained messages is reconnected to by every process, the
        leader among them; one copy of each device's state is enough (they are retained
        and idempotent), not one per process: with two processes and 10,000 devices that
        halves a reconnection's burst to 10,000 messages. A process that becomes leader
        sends them too (:meth:`_on_leadership`), in case the leader went away before it
        reconnected."""
        first, self._republished = not self._republished, True
        if first or self.leadership.is_leader():
            self.republish_all()
        if self._experiments is not None:
            self._experiments.push_all()

    def _on_leadership(self, leader: bool) -> None:
        """Leadership moved (its thread). A new leader sends every desired state, on a
        thread of its own so the leadership checks go on meanwhile: the old leader may
        have gone before it reconnected to a broker that lost them (:meth:`_on_connected`).
        Not at start: the first connection sends them anyway."""
        if leader and self._republished and self.connected:
            threading.Thread(target=self._republish_quietly, name="republish",
                             daemon=True).start()

    def _refresh_crl(self) -> None:
        """Take in the revocations other server processes made (its thread): write the
        CRL again and have the broker re-read it (an external broker's operator is told to
        copy it)."""
        ca, broker = self._ca, self._broker
        if ca is not None and broker is not None and ca.refresh_crl():
            log.info("the fleet CA's revocation list changed in the registry (another "
                     "server process revoked a certificate); %s written again", ca.crl_path)
            broker.reload_crl()

    def _republish_quietly(self) -> None:
        try:
            self.republish_all()
        except Exception:  # stopped meanwhile, or the database away: the next one sends
            log.exception("re-publishing the desired states as the new leader failed")

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
                                          interval_s=self.config.leader_interval_s,
                                          on_change=self._on_leadership)
        self._leadership.start()
        keep = self.config.telemetry_retention_s
        jobs = [] if keep is None else [retention_job(registry, keep)]
        self._housekeeping = Housekeeping(self._leadership, jobs, interval_s=3600.0)
        self._housekeeping.start()

    def _start_bundle_http(self, ca: FleetCA, registry: Registry) -> tuple[str, ...]:
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
        return tuple(prefixes)

    # --- properties ---

    @property
    def client_name(self) -> str:
        """This process's MQTT identity (certificate CN and client id)."""
        instance = self.config.instance
        return SERVER_IDENTITY if instance is None else f"{SERVER_IDENTITY}-{instance}"

    @property
    def leadership(self) -> Leadership:
        """Whether this process does the fleet's once-only work (while started)."""
        return _started(self._leadership)

    @property
    def registry(self) -> Registry:
        """The registry (while started)."""
        return _started(self._registry)

    @property
    def ingest(self) -> Ingest:
        """The ingest of device messages (while started): its queue depth, for one."""
        return _started(self._ingest)

    @property
    def monitor(self) -> Monitor:
        """Time series, alerts (``monitor.raise_alert``) and fleet figures."""
        return _started(self._monitor)

    @property
    def rollouts(self) -> RolloutRunner:
        """The rollouts (:mod:`fleet_server.rollouts`); RuntimeError before start()."""
        return _started(self._rollouts)

    @property
    def experiments(self) -> ExperimentRunner:
        """The experiments (:mod:`fleet_server.experiment_runner`); RuntimeError before
        start()."""
        return _started(self._experiments)

    @property
    def releaser(self) -> Releaser:
        """Versions and re-releases (while started)."""
        return _started(self._releaser)

    @property
    def ca(self) -> FleetCA:
        """The fleet CA (while started)."""
        return _started(self._ca)

    @property
    def broker(self) -> Broker:
        """The broker (while started): embedded or external."""
        return _started(self._broker)

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
        return self._link is not None and self._link.connected

    @property
    def disconnected_since(self) -> float | None:
        """When (time.time()) the connection to the broker was lost; None while connected
        (or not started)."""
        return None if self._link is None else self._link.disconnected_since

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

    # --- operations: those of the publisher and the enroller ---

    @property
    def publisher(self) -> Publisher:
        """Uploads, publish and rollback, and devices' desired state (while started)."""
        return _started(self._publisher)

    @property
    def enroller(self) -> Enroller:
        """Enrollment tokens, enrollments and resets (while started)."""
        return _started(self._enroller)

    def add_bundle(self, data: bytes) -> BundleRecord | DeltaRecord:
        """Verify and store an uploaded bundle (:meth:`Publisher.add_bundle`)."""
        return self.publisher.add_bundle(data)

    def publish(self, bundle_sha256: str, *, devices: Sequence[str] | None = None,
                group: str | None = None, encrypt_for: Sequence[str] = ()) -> PublishResult:
        """Make a stored bundle desired for devices or a group and publish their desired
        state (:meth:`Publisher.publish`)."""
        return self.publisher.publish(bundle_sha256, devices=devices, group=group,
                                      encrypt_for=encrypt_for)

    def rollback(self, *, devices: Sequence[str] | None = None, group: str | None = None,
                 model: str | None = None) -> PublishResult:
        """Undo the last desired-state change of devices or a group
        (:meth:`Publisher.rollback`)."""
        return self.publisher.rollback(devices=devices, group=group, model=model)

    def recipients(self, selectors: Sequence[str]) -> Recipients:
        """The devices ``selectors`` choose and their encryption keys
        (:meth:`Publisher.recipients`)."""
        return self.publisher.recipients(selectors)

    def republish_all(self) -> int:
        """Publish every device's desired state (retained); returns how many."""
        return self.publisher.republish_all()

    def issue_token(self, group: str, ttl: float, device: str | None = None) -> IssuedToken:
        """A one-time enrollment token (:meth:`Enroller.issue_token`)."""
        return self.enroller.issue_token(group, ttl, device)

    @property
    def ca_pin(self) -> bytes:
        """The pin of the fleet CA certificate: SHA-256 of its DER (while started)."""
        return self.enroller.ca_pin

    def enroll(self, token: str, device_id: str, csr_pem: bytes, profile: str,
               tags: Sequence[str] = (), *, encryption_key: str | None = None,
               ) -> Enrollment:
        """Enroll a device with a one-time token (:meth:`Enroller.enroll`)."""
        return self.enroller.enroll(token, device_id, csr_pem, profile, tags,
                                    encryption_key=encryption_key)

    def reset_device(self, device_id: str) -> Device:
        """Revoke a device's certificate and free its id (:meth:`Enroller.reset_device`)."""
        return self.enroller.reset_device(device_id)


def _started(part: _T | None) -> _T:
    """``part`` of a started service; RuntimeError before start() or after stop()."""
    if part is None:
        raise RuntimeError("the fleet service is not started")
    return part
