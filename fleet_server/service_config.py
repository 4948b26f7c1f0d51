"""How one fleet service runs: :class:`ServiceConfig`, built by ``fleet serve`` from its
options (:mod:`fleet_server.serve_cli`) and passed to
:class:`~fleet_server.service.FleetService`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from paho.mqtt.enums import MQTTProtocolVersion

from protocol.defaults import MQTTS_PORT

from .errors import ServiceError
from .monitoring.config import MonitoringConfig

__all__ = ["ServiceConfig"]


@dataclass(frozen=True)
class ServiceConfig:
    """How one fleet service runs. Only ``data_dir`` and ``keys_dir`` are required."""

    #: Everything the server keeps on disk (layout: :mod:`fleet_server.data_dir`).
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
    #: Device messages one device may send (fleet_server/ingest.py; docs/scale.md, "Rate
    #: limits"): telemetry samples per second sustained, after a burst of
    #: ``telemetry_burst``, and the same for every other message (events, reports). Beyond
    #: it a message is acknowledged and dropped, and counted. The bursts let an agent's
    #: back-fill after an outage through: a day of samples at the default 30 s interval is
    #: 2,880 messages.
    telemetry_rate: float = 1.0
    telemetry_burst: float = 3000.0
    message_rate: float = 2.0
    message_burst: float = 600.0
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

    def __post_init__(self) -> None:
        """ServiceError for options that cannot work together."""
        if not self.shared_subscriptions:
            return
        if self.mqtt_protocol != MQTTProtocolVersion.MQTTv5:
            raise ServiceError("shared subscriptions need MQTT 5 ($share/... is an MQTT 5 "
                               "feature; a 3.1.1 broker would take it for an ordinary "
                               "topic): drop --mqtt-version 3.1.1, or run one server "
                               "process without --shared-subscriptions")
        if self.broker_url is None:
            # The embedded broker's ACL grants one server identity, so no other process
            # could join the share; and a device could (docs/scale.md, "External brokers").
            raise ServiceError("shared subscriptions need an external broker (--broker-url) "
                               "that every server process connects to and that refuses "
                               "devices the shared subscription (docs/scale.md); the "
                               "embedded broker serves one server process: drop "
                               "--shared-subscriptions")
