"""The agent's link to its fleet: desired state in, bundles fetched, installs reported.

One MQTT connection (mutual TLS, persistent session, QoS 1; :mod:`transport.mqtt`) and one
worker thread. The worker compares the retained desired state with what the runtime
serves; for a model that differs it fetches the desired bundle in chunks
(:class:`~agent.bundle_fetch.BundleFetch`, resumable) — or the smaller delta bundle the
desired state offers for the version it runs, if that base is intact and no delta failed
here before (:func:`~agent.fetch_plan.wants_delta`; the full bundle otherwise) — installs
it with the runtime (the same verified, self-tested hot-swap as a local install) and
reports every install transition as an event plus a fresh ``reported`` state. A bundle
that failed is not retried until the desired state names another one, so a bad bundle
costs one attempt, not a loop (:func:`~agent.fetch_plan.next_fetch`).

Events and telemetry samples go through the durable :class:`~agent.outbox.Outbox`, which a
:class:`~agent.publisher.Publisher` drains on its own thread (events batched when the
latest desired state lists the server's ``events.batch`` feature); a
:class:`~agent.telemetry.TelemetrySampler` samples on its own schedule. Install transitions
are announced from the install records themselves
(:class:`~agent.install_announcements.InstallAnnouncer`), so a transition persisted while
the link was not listening (before it started, or just before a kill) is sent when it
starts.

Beside the served version a desired model may name a shadow candidate and a share of
requests to compare with the previous version (rollouts, issue 14): on every tick
:class:`~agent.fleet_shadow.ShadowCandidates` does what the desired state asks there. A
shadow bundle is fetched through the same chunked fetch once no install is due, then
loaded beside the served model without serving; a desired version still loaded beside the
served one is switched back to at once, before anything else.

The broker being down changes nothing for apps on the device: the runtime and its local
API do not depend on this link. paho reconnects with back-off; on every connect the link
re-subscribes, re-reports and resumes any fetch where its file ends.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol.errors import ProtocolError
from protocol.messages import (
    DEFAULT_CHUNK_BYTES,
    FEATURE_EVENT_BATCH,
    Desired,
    Event,
    InstallReport,
    ModelReport,
    Reported,
    decode_chunk,
    decode_desired,
    encode,
)
from protocol.topics import CHUNK_LEAF, CHUNK_REQUEST_LEAF, device_topic
from transport.mqtt import BrokerAddress, ClientSettings, TLSIdentity, close_client, create_client

from . import __version__
from .bundle_fetch import BundleFetch, FetchError
from .config import FleetSettings
from .errors import AgentError
from .experiment_link import ExperimentLink
from .experiments import DeviceExperiments
from .fetch_plan import next_fetch, wants_delta
from .fleet_shadow import ShadowCandidates
from .http_fetch import download_as_device
from .install_announcements import InstallAnnouncer, clip
from .install_state import InstallRecord, InstallState
from .installer import is_disk_full
from .loss_counter import Tally
from .outbox import Outbox, OutboxError
from .publisher import Publisher
from .runtime import Runtime
from .telemetry import TelemetrySampler, TelemetrySource
from .watch_plan import WatchAction

__all__ = ["FleetLink"]

log = logging.getLogger(__name__)
_TICK_S = 0.25
#: How long a clean stop waits for the broker to take its offline event.
_OFFLINE_TIMEOUT_S = 2.0
#: Whole bundles that may arrive hashing wrong before the server is not asked again.
_MAX_CORRUPT = 2


class FleetLink:
    """Connects ``runtime`` to its fleet as configured in ``settings``.

    ``telemetry`` (a :class:`~agent.telemetry.TelemetryCollector`, say) is sampled every
    ``settings.telemetry_interval_s``; None sends no telemetry. ``outbox`` holds events and
    samples until the broker has them; by default the link opens (and closes) the one in
    the runtime's state directory. ``experiments``: the device's experiments, driven by the
    desired state and the server's posterior pushes (:mod:`agent.experiment_link`).
    """

    def __init__(self, runtime: Runtime, settings: FleetSettings, *,
                 telemetry: TelemetrySource | None = None, outbox: Outbox | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 clock: Callable[[], float] = time.time,
                 experiments: DeviceExperiments | None = None) -> None:
        if runtime.installer is None:
            raise ValueError("the fleet link needs a runtime with a state directory")
        self.runtime = runtime
        self.settings = settings
        self.chunk_bytes = chunk_bytes
        self.clock = clock
        self.installer = runtime.installer
        assert runtime.installs is not None
        self.installs = runtime.installs
        self._owns_outbox = outbox is None
        if outbox is None:
            outbox = Outbox.open_in(self.installer.dirs.root)
        self.outbox = outbox
        self._publisher = Publisher(self.outbox, self._send, self._encode_report)
        self.sampler = None if telemetry is None else TelemetrySampler(
            telemetry, self.outbox, settings.telemetry_interval_s, clock=clock,
            on_sample=lambda sample: self._sampled())
        self._announcer = InstallAnnouncer(self.outbox, self._publisher.wake)
        self._identity = TLSIdentity(settings.ca_file, settings.cert_file, settings.key_file)
        self.experiments = ExperimentLink(experiments, self._topic)
        self._client = create_client(ClientSettings(
            BrokerAddress.from_url(settings.broker_url), self._identity,
            protocol=MQTTProtocolVersion.MQTTv311 if settings.mqtt_version == "3.1.1"
            else MQTTProtocolVersion.MQTTv5))
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        # The broker announces an unexpected disconnect for us, so the fleet sees the
        # device go offline without waiting for a missed report. Set before every connect,
        # so it carries the time of the connection it ends, not of the agent's start.
        self._client.on_pre_connect = self._set_will
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._desired: Desired | None = None
        self._intact: dict[tuple[str, int], bool] = {}  # stored bases checked for deltas
        self._fetch: BundleFetch | None = None
        self._fetch_model: str | None = None
        self._fetch_install: str | None = None
        # A shadow candidate's fetch (it has a record that is never persisted).
        self._fetch_shadow: tuple[InstallRecord, float] | None = None
        self.shadows = ShadowCandidates(runtime, desired=self._current_desired,
                                        event=self._event, report=self._report,
                                        wake=self._wake.set)
        #: URLs of the bundle being fetched not tried yet; emptied once tried (then chunks).
        self._fetch_urls: tuple[str, ...] = ()
        #: Set whenever the worker found nothing to fetch (the device is in line with its
        #: desired state, or gave up on what it names); tests wait on it.
        self.in_line = threading.Event()
        self._thread: threading.Thread | None = None
        self.installer.listeners.append(self._on_install_change)

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up."""
        return self._connected.is_set()

    @property
    def desired(self) -> Desired | None:
        """The latest desired state received (None before the first)."""
        return self._current_desired()

    def in_flight(self) -> int:
        """Outbox messages handed to the broker and not acknowledged yet."""
        return self._publisher.in_flight()

    def start(self) -> None:
        """Announce install transitions not sent yet, then connect (in the background,
        retrying), sample, publish and start the worker."""
        self.installs.fetcher = self
        self._announcer.announce_all(self.installer.records())
        self._publisher.start()
        if self.sampler is not None:
            self.sampler.start()
        self._client.loop_start()
        self._thread = threading.Thread(target=self._work, name="edgefleet-fleet-link",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and the worker, disconnect, stop publishing (what is not
        acknowledged stays in the outbox for the next start)."""
        if self.sampler is not None:
            self.sampler.stop()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._say_offline()
        close_client(self._client)
        self._publisher.stop()
        if self.installs.fetcher is self:
            self.installs.fetcher = None
        if self._on_install_change in self.installer.listeners:
            self.installer.listeners.remove(self._on_install_change)
        if self._owns_outbox:
            self.outbox.close()

    def _say_offline(self) -> None:
        """A clean stop sends what the broker's will says on a lost connection: the server
        shows the device offline at once, not once its last-seen time runs out."""
        if not self._client.is_connected():
            return
        info = self._client.publish(self._topic("events"),
                                    encode(Event("offline", self.clock(), {"clean": True})),
                                    qos=1)
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(timeout=_OFFLINE_TIMEOUT_S)

    # -- MQTT callbacks (paho's network thread) ---------------------------------------------

    def _topic(self, leaf: str) -> str:
        return device_topic(self.settings.name, self.settings.device_id, leaf)

    def _set_will(self, client: Client, userdata: Any) -> None:
        at = self.clock()
        client.will_set(self._topic("events"),
                        encode(Event("offline", at, {"connected_at": at})), qos=1)

    def _on_connect(self, client: Client, userdata: Any, flags: ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        log.info("connected to %s as %s", self.settings.broker_url, self.settings.device_id)
        client.subscribe([(self._topic("desired"), 1), (self._topic(CHUNK_LEAF), 1),
                          *self.experiments.subscriptions()])
        with self._lock:
            if self._fetch is not None:
                self._fetch.forget_requests()
        self._connected.set()
        self._publisher.connected()
        self._wake.set()

    def _on_disconnect(self, client: Client, userdata: Any, flags: DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        if self._connected.is_set():
            log.warning("lost the broker (%s); serving on, reconnecting", reason)
        self._connected.clear()
        self._publisher.disconnected()

    def _on_publish(self, client: Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self._publisher.acknowledged(mid, refused=reason.is_failure)

    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        try:
            if message.topic == self._topic("desired"):
                desired = decode_desired(bytes(message.payload))
                with self._lock:
                    self._desired = desired
                self._publisher.batch_events(FEATURE_EVENT_BATCH in desired.features)
                log.info("desired state: %s", {n: m.version for n, m in desired.models.items()})
                self.experiments.follow(desired)
            elif message.topic == self._topic(CHUNK_LEAF):
                self._on_chunk(bytes(message.payload))
            elif self.experiments.is_push(message.topic):
                self.experiments.on_push(message.topic, bytes(message.payload))
        except ProtocolError as exc:
            log.error("ignoring a bad message on %s: %s", message.topic, exc)
            self._event("protocol_error", {"topic": message.topic, "error": str(exc)})
        self._wake.set()

    def _current_desired(self) -> Desired | None:
        with self._lock:
            return self._desired

    def _on_chunk(self, payload: bytes) -> None:
        chunk = decode_chunk(payload)
        with self._lock:
            fetch = self._fetch
        if fetch is None or chunk.bundle_sha256 != fetch.sha256:
            return  # an answer to a fetch that was abandoned
        try:
            fetch.receive(chunk)
        except FetchError as exc:
            log.error("%s", exc)
            if not exc.transient or fetch.corrupted > _MAX_CORRUPT:
                self._fetch_failed(exc)
                return
        except OSError as exc:  # a full disk: the install fails, the link lives on
            log.error("cannot write bundle %s: %s", fetch.sha256[:12], exc)
            self._fetch_failed(exc)
            return
        self._request_chunks()

    # -- the worker -------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(_TICK_S)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._step()
            except Exception:  # the link must outlive any one failure
                log.exception("fleet link step failed")

    def _step(self) -> None:
        self.shadows.watch(self._current_desired(), load=False)
        if not self._connected.is_set():
            return
        with self._lock:
            fetch = self._fetch
        if fetch is None:
            self._start_next_fetch()
        elif fetch.done:
            self._install_fetched(fetch)
        elif self._fetch_urls:
            self._download(fetch)
        else:
            self._request_chunks()

    def _download(self, fetch: BundleFetch) -> None:
        """Try the bundle's URLs (on this worker thread); what they do not deliver is asked
        for in chunks over MQTT, from where the download stopped."""
        urls, self._fetch_urls = self._fetch_urls, ()
        download_as_device(fetch, urls, self._identity, self._stop)
        self._wake.set()

    def _start_next_fetch(self) -> None:
        with self._lock:
            desired = self._desired
        served = {name: self._served_bundle(name) for name in desired.models} if desired else {}
        working = (InstallState.VERIFYING, InstallState.STAGED, InstallState.ACTIVATING)
        busy = {r.model for r in self.installer.pending()
                if r.model is not None and r.state in working}
        chosen = next_fetch(desired, served, self.installer.given_up(), busy)
        if chosen is None:
            shadow = self.shadows.watch(desired, load=True)
            if shadow is not None and self._fetch_shadow_bundle(shadow):
                self.in_line.clear()
            else:
                self.in_line.set()
            return
        self.in_line.clear()
        name, want = chosen
        # The install record comes first, in downloading; it asks for the bytes through
        # start_fetch (or fails at once, e.g. without the room for the bundle).
        failed = {r.bundle_sha256 for r in self.installer.records() if r.model == name
                  and r.bundle_sha256 is not None
                  and r.state in (InstallState.FAILED, InstallState.ROLLED_BACK)}
        if want.delta is not None and wants_delta(
                want, failed, lambda base: self._base_intact(name, base)):
            self.installs.fetch(name, want.version, want.delta.bundle_sha256, want.delta.size,
                                release_sha256=want.bundle_sha256)
        else:
            self.installs.fetch(name, want.version, want.bundle_sha256, want.size)
        self._report()

    def _base_intact(self, name: str, version: int) -> bool:
        """Whether the stored ``name`` ``version`` hashes to what its slot recorded (checked
        once per version: a base damaged later fails the rebuild, and the full bundle is
        fetched then)."""
        key = (name, version)
        if key not in self._intact:
            try:
                self._intact[key] = self.installer.store.slot(name, version).intact()
            except AgentError:
                self._intact[key] = False
        return self._intact[key]

    def start_fetch(self, record: InstallRecord) -> None:
        """Fetch the bundle of the fleet install ``record`` in chunks (the install driver's
        :class:`~agent.install_driver.Fetcher`); resumes from its partial file."""
        assert record.bundle_sha256 is not None
        assert record.size is not None
        assert record.model is not None
        assert record.version is not None
        with self._lock:
            if self._fetch_install == record.install_id:
                return  # already under way
            if self._fetch_shadow is not None:  # an install comes first; the shadow later
                self.shadows.abandon(self._fetch_shadow[0].model or "")
                self._fetch_shadow = None
            fetch = BundleFetch(self.installer.dirs.incoming, record.bundle_sha256,
                                record.size, chunk_bytes=self.chunk_bytes,
                                name=record.install_id)
            self._fetch, self._fetch_model = fetch, record.model
            self._fetch_install = record.install_id
            want = self._desired.models.get(record.model) if self._desired else None
            self._fetch_urls = (want.urls if want is not None
                                and want.bundle_sha256 == record.bundle_sha256 else ())
        log.info("fetching %s v%d (bundle %s, %d bytes)", record.model, record.version,
                 record.bundle_sha256[:12], record.size)
        self._event("fetch.started", {"model": record.model, "version": record.version,
                                      "bundle_sha256": record.bundle_sha256,
                                      "resume_at": round(fetch.progress * record.size)})
        self._wake.set()

    def _served_bundle(self, name: str) -> str | None:
        try:
            stored = self.runtime.served(name).stored
        except Exception:  # not served (yet)
            return None
        return None if stored is None else stored.bundle_sha256

    def _request_chunks(self) -> None:
        with self._lock:
            fetch = self._fetch
        if fetch is None or not self._connected.is_set():
            return
        for request in fetch.requests():
            self._client.publish(self._topic(CHUNK_REQUEST_LEAF), encode(request), qos=1)

    def _install_fetched(self, fetch: BundleFetch) -> None:
        """The bundle is whole: the install goes on (verify, stage, swap) on the install
        worker, while this link goes on with the next model."""
        with self._lock:
            install_id, shadow = self._fetch_install, self._fetch_shadow
            self._fetch = self._fetch_model = self._fetch_install = self._fetch_shadow = None
        if install_id is not None:
            self.installs.fetched(install_id)
        if shadow is not None:
            self.shadows.load(*shadow)
        self._report()

    def _fetch_failed(self, error: FetchError | OSError) -> None:
        with self._lock:
            fetch, name, install_id = self._fetch, self._fetch_model, self._fetch_install
            shadow = self._fetch_shadow
            self._fetch = self._fetch_model = self._fetch_install = self._fetch_shadow = None
        if fetch is not None and name is not None and shadow is not None:
            self.shadows.failed(shadow[0], f"fetch failed: {error}")
            return
        if fetch is None or name is None or install_id is None:
            return
        self._event("fetch.failed", {"model": name, "bundle_sha256": fetch.sha256,
                                     "reason": str(error)})
        if is_disk_full(error):
            # Reclaimed by the failed install; retried once there is room again.
            self.installs.fail(install_id, "disk_full", f"disk full while fetching bundle "
                               f"{fetch.sha256[:12]}: {error}; free some space under "
                               f"{self.installer.dirs.root}", retry=True)
        else:
            # The server will not have it (or keeps sending other bytes): given up until
            # the desired state names another bundle, so a bad bundle costs one attempt.
            self.installs.fail(install_id, "fetch_failed", str(error))
        self._report()

    def _fetch_shadow_bundle(self, action: WatchAction) -> bool:
        begun = self.shadows.begin(action, self.chunk_bytes)
        if begun is None:
            return False
        fetch, record, rate = begun
        with self._lock:
            self._fetch, self._fetch_model = fetch, action.model
            self._fetch_install = None
            self._fetch_shadow = (record, rate)
        self._event("fetch.started", {"model": action.model, "version": record.version,
                                      "bundle_sha256": fetch.sha256, "shadow": True,
                                      "resume_at": 0})
        self._wake.set()
        return True

    # -- reporting --------------------------------------------------------------------------

    def _on_install_change(self, record: InstallRecord) -> None:
        self._announcer.announce(record)
        self._report()

    def _event(self, kind: str, detail: dict[str, Any]) -> None:
        """Queue an event for the fleet; sent in order once the broker is reachable."""
        clipped = {key: clip(value) if isinstance(value, str) else value
                   for key, value in detail.items()}
        try:
            self.outbox.add_event(kind, self.clock(), clipped)
        except OutboxError as exc:  # counted by the outbox, announced by the next sample
            log.error("event %s lost (counted as dropped): %s", kind, exc)
            return
        except ValueError as exc:
            log.error("event %s lost (counted as dropped): %s", kind, exc)
            self.outbox.count_lost(Tally(events=1))
            return
        self._publisher.wake()

    def _report(self) -> None:
        """Publish the reported state soon (on the publisher's thread, once connected)."""
        self._publisher.request_report()

    def _sampled(self) -> None:
        """A sample is in the outbox: send it, and the reported state with it."""
        self._publisher.wake()
        self._report()

    def _send(self, leaf: str, payload: bytes) -> int | None:
        info = self._client.publish(self._topic(leaf), payload, qos=1)
        # Taken while the connection drops (NO_CONN), paho sends it after reconnecting.
        if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return info.mid
        return None

    def _encode_report(self) -> bytes:
        return encode(self.reported())

    def reported(self) -> Reported:
        """What this device runs and how its latest installs went."""
        models = {}
        for info in self.runtime.models():
            if info.version is None:
                continue  # a model file served outside the fleet
            models[info.name] = ModelReport(info.version, self._served_bundle(info.name),
                                            "probation" if info.state == "probation"
                                            else "committed")
        latest: dict[str, InstallRecord] = {}
        for record in self.installer.records():  # newest first
            if record.model is not None and record.model not in latest:
                latest[record.model] = record
        installs = {name: InstallReport(r.version, r.bundle_sha256, r.state.value, r.reason,
                                        r.detail) for name, r in latest.items()}
        with self._lock:
            fetch, fetching = self._fetch, self._fetch_model
            if self._fetch_shadow is not None:
                fetching = None  # a shadow candidate is not an install
        if fetch is not None and fetching is not None and not fetch.done:
            installs[fetching] = InstallReport(None, fetch.sha256, "downloading",
                                           progress=round(fetch.progress, 4))
        profile = self.runtime.profile.name if self.runtime.profile else None
        return Reported(profile, __version__, models, installs, at=self.clock())
