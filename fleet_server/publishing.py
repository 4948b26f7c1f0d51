"""Desired state: the operator's uploads, publishes and rollbacks, and sending each device
its desired state, retained, over the :class:`~fleet_server.device_link.DeviceLink`.

A device's desired state is sent whenever it changes (:meth:`Publisher.publish`,
:meth:`Publisher.rollback`, an enrollment, a rollout's step) and after connections to the
broker (:meth:`Publisher.republish_all`; which ones: ``FleetService._on_connected``). Each
message carries, per model, the delta from the version the device runs when the release
has one (:mod:`fleet_server.deltas`) and where the full bundle can be downloaded over HTTPS
(:mod:`fleet_server.bundle_http`).

Many devices' messages are made in batches: what they are made of is read set-based, a
page of devices at a time (:meth:`Registry.desired_states_page`), and each distinct message
of a batch is encoded once, so a publish to 10,000 devices is a few dozen queries and one
paho publish per device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from bundle.trust import TrustedState, verify_bundle
from protocol import messages

from .bundle_http import bundle_urls
from .delta_store import DeltaStore
from .deltas import TransferPlan, offer_for, plan_transfers
from .device_link import DeviceLink
from .errors import RegistryError
from .recipients import Candidate, Recipients, select_recipients
from .registry import BundleRecord, DeltaRecord, DesiredChange, DesiredState, Device, Registry
from .releases import Releaser, check_publishable

__all__ = ["PublishResult", "Publisher"]

log = logging.getLogger(__name__)

#: Devices whose desired states are read and queued at a time (a group, republish_all):
#: a few set-based queries per page, and memory bounded however large the fleet.
_PAGE = 2000


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


class Publisher:
    """The operations on desired state, and their messages (module docstring).

    Thread-safe: the HTTP API, the rollout runner and the MQTT network thread call it.
    ``root`` returns the fleet's current root.json, which uploads are verified against;
    ``bundle_prefixes`` are the URL prefixes devices download bundle files from.
    """

    def __init__(self, registry: Registry, releaser: Releaser, deltas: DeltaStore,
                 link: DeviceLink, *, root: Callable[[], bytes],
                 bundle_prefixes: Sequence[str] = ()) -> None:
        self._registry = registry
        self._releaser = releaser
        self._deltas = deltas
        self._link = link
        self._root = root
        self._bundle_prefixes = tuple(bundle_prefixes)
        # Held from reading a device's desired state to queueing its message, so the last
        # message queued for a device is always the newest state (paho sends in order).
        self._desired_lock = threading.Lock()

    def add_bundle(self, data: bytes) -> BundleRecord | DeltaRecord:
        """Verify an uploaded bundle against the fleet's root and store it under the name
        and version of its signed manifest (with its metadata version); a delta bundle is
        stored with the full bundle of its release (:mod:`fleet_server.delta_store`).

        Raises a ``bundle.errors.BundleError`` subclass naming why the bundle is refused (bad
        signature, tampered, expired, ...), RegistryError if another bundle has that name and
        version. Idempotent for the same bytes."""
        verified = verify_bundle(data, TrustedState(root=self._root()),
                                 now=datetime.now(timezone.utc), profile=None)
        manifest = verified.manifest
        if verified.delta_base is not None:
            delta = self._deltas.add(data, verified)
            log.info("stored the delta bundle of %s v%d from v%d (%s, %d bytes)",
                     manifest.name, manifest.version, delta.base_version, delta.sha256[:12],
                     delta.size)
            return delta
        record = self._registry.put_bundle(data, manifest.name, manifest.version,
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
        record = self._registry.get_bundle(bundle_sha256)
        if record is None:
            raise RegistryError(f"no stored bundle has sha256 {bundle_sha256!r}; upload it "
                                "first")
        # Read once, set-based: the check, the transfer plan and (after the change) the
        # messages need each selected device's desired and running models.
        selected = self._selected(devices, group)
        # Checked before a re-release uses up a version: if devices would take the bundle,
        # they take its re-release (a higher version, newer metadata) too.
        check_publishable(record, selected, self._registry.get_bundle)
        released: tuple[BundleRecord, ...] = ()
        if encrypt_for:
            recipients = self.recipients(encrypt_for)
            record = self._releaser.rerelease(record, recipients=recipients.keys)
            released = (record,)
        transfer = plan_transfers(record.desired, record.name, selected,
                                  self._deltas.of(record.sha256))
        changes = self._registry.set_desired(record.sha256, devices=devices, group=group)
        return replace(self.publish_selected(changes, devices, group), released=released,
                       transfer=transfer)

    def rollback(self, *, devices: Sequence[str] | None = None, group: str | None = None,
                 model: str | None = None) -> PublishResult:
        """Undo the last desired-state change (of ``model``, if given) of the devices or the
        group, and publish their desired state. The bundle each goes back to is
        re-released first as the next version of its model (devices refuse lower
        versions), signed here (:class:`~fleet_server.releases.Releaser`). RegistryError if
        nothing can be undone, ReleaseError if this server cannot sign."""
        plan = self._registry.rollback(devices=devices, group=group, model=model,
                                       dry_run=True)
        substitute: dict[str, messages.DesiredModel] = {}
        released = []
        for sha in sorted({c.after.bundle_sha256 for c in plan if c.after is not None}):
            source = self._registry.get_bundle(sha)
            if source is None:  # desired states only name stored bundles
                raise RegistryError(f"bundle {sha} to roll back to is not stored")
            record = self._releaser.rerelease(source, rollback_of=source.version)
            released.append(record)
            substitute[sha] = record.desired
        changes = self._registry.rollback(devices=devices, group=group, model=model,
                                          substitute=substitute)
        return replace(self.publish_selected(changes, devices, group),
                       released=tuple(released))

    def recipients(self, selectors: Sequence[str]) -> Recipients:
        """The devices ``selectors`` choose and their encryption keys (ReleaseError if one
        matches nothing or a device has no key)."""
        return select_recipients(selectors, (
            Candidate(d.id, d.group, d.profile, d.encryption_key)
            for d in self._registry.list_devices()))

    def check_rollout(self, bundle_sha256: str, devices: Sequence[Device]) -> None:
        """ReleaseError if one of ``devices`` would refuse the stored bundle (the rollout
        runner's check before it starts a rollout)."""
        record = self._registry.get_bundle(bundle_sha256)
        if record is not None:
            check_publishable(record, devices, self._registry.get_bundle)

    def republish_all(self) -> int:
        """Publish every device's desired state (retained); returns how many. Read and sent
        a page of devices at a time: memory stays bounded however large the fleet."""
        count = len(self._send_pages(None))
        log.info("published the desired state of %d device(s)", count)
        return count

    def send(self, device: Device) -> None:
        """Publish ``device``'s desired state (retained), as just read from the registry."""
        with self._desired_lock:
            self._send_states(self._registry.desired_states([device.id]))

    def publish_selected(self, changes: Sequence[DesiredChange],
                         devices: Sequence[str] | None, group: str | None) -> PublishResult:
        """Publish the desired state of ``devices`` or every device of ``group``, after
        ``changes`` were made to it."""
        if group is not None:
            sent = self._send_pages(group)
        else:
            with self._desired_lock:
                sent = self._send_states(self._registry.desired_states(devices or ()))
        delivered = self._link.connected
        if not delivered:
            log.warning("desired state of %d device(s) stored but not sent: no broker "
                        "connection; it is sent when the connection returns", len(sent))
        return PublishResult(tuple(changes), tuple(sent), delivered)

    def _selected(self, devices: Sequence[str] | None,
                  group: str | None) -> list[DesiredState]:
        if group is None:
            return self._registry.desired_states(devices or ())
        found: list[DesiredState] = []
        self._each_page(group, found.extend)
        return found

    def _send_pages(self, group: str | None) -> list[str]:
        """Send the desired state of ``group``'s devices (None: all); the ids sent."""
        sent: list[str] = []
        self._each_page(group, lambda page: sent.extend(self._send_states(page)))
        return sent

    def _each_page(self, group: str | None,
                   handle: Callable[[list[DesiredState]], object]) -> None:
        """Read the desired states of ``group``'s devices (None: all) a page at a time and
        ``handle`` each page, under the lock from the read on. Taken per page, so a
        publish to a few devices need not wait for a fleet-wide one."""
        after = ""
        while True:
            with self._desired_lock:
                page = self._registry.desired_states_page(group=group, after=after,
                                                          limit=_PAGE)
                handle(page)
            if not page:
                return
            after = page[-1].id

    def _send_states(self, states: Sequence[DesiredState]) -> list[str]:
        """Queue each device's desired state, retained (call with _desired_lock held, from
        reading ``states`` on); the ids."""
        batch = _Batch(time.time())
        for state in states:
            self._send_desired(state, batch)
        return [s.id for s in states]

    def _send_desired(self, device: DesiredState, batch: _Batch) -> None:
        """Queue ``device``'s desired state, retained (call with _desired_lock held)."""
        # The delta from the version the device runs, if the release has one, and where
        # the full bundle can be downloaded over HTTP(S).
        models = {}
        for name, want in sorted(device.desired.items()):
            sha = want.bundle_sha256
            if sha not in batch.urls:
                batch.urls[sha] = bundle_urls(self._bundle_prefixes, sha)
            models[name] = replace(offer_for(want, device.running.get(name),
                                             self._deltas.of(sha)), urls=batch.urls[sha])
        # The experiments by identity: the devices of one page share their decoded
        # declarations (Registry.desired_states_page), and ``states`` holds them for the
        # whole batch, so no id is reused meanwhile.
        key = (tuple(models.items()), tuple(id(e) for e in device.experiments))
        payload = batch.payloads.get(key)
        if payload is None:
            payload = batch.payloads[key] = messages.encode(messages.Desired(
                models=models, issued_at=batch.issued_at,
                experiments=tuple(device.experiments),
                features=(messages.FEATURE_EVENT_BATCH,)))
        self._link.publish(device.id, "desired", payload, retain=True)


@dataclass
class _Batch:
    """What the messages of one batch share: one ``issued_at``, each bundle's download
    URLs, and each distinct message, encoded once (in a group publish most devices get
    the same bytes)."""

    issued_at: float
    urls: dict[str, tuple[str, ...]] = field(default_factory=dict)
    payloads: dict[tuple[object, ...], bytes] = field(default_factory=dict)
