"""Installs on disk: persisted install records, fetching into the state dir, verify and stage.

What happens in memory (loading the session, self-test, swap, probation) is the runtime's
(:mod:`agent.runtime`); this module owns everything the install leaves on disk, so a restart
can pick up from the records alone. Each record is persisted *before* the work of its state
is done: the record says what may be half-done.

Fault injection: when the environment variable ``EDGEFLEET_AGENT_CRASH_AFTER`` names a state,
the process kills itself with SIGKILL right after persisting a record in that state. Tests
use it to prove that ``kill -9`` in every state leaves a serving agent after restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bundle.archive import Limits
from bundle.crypto import open_artifacts
from bundle.errors import BundleError
from bundle.trust import TrustedState, VerifiedBundle, verify_bundle
from common.atomic import write_atomic
from firmware_profiles.model import Profile

from .errors import AgentError, InstallError
from .install_state import InstallRecord, InstallState, advance, new_install
from .model_store import ModelStore, StoredModel
from .trust_store import TrustStore
from .variants import choose_variant

__all__ = ["CRASH_ENV", "Installer", "StateDirs"]

log = logging.getLogger(__name__)
CRASH_ENV = "EDGEFLEET_AGENT_CRASH_AFTER"
_KEEP_RECORDS = 50


@dataclass(frozen=True)
class StateDirs:
    """Where the agent keeps each kind of state under its state directory."""

    root: Path

    @property
    def trust(self) -> Path:
        return self.root / "trust"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def installs(self) -> Path:
        return self.root / "installs"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def device_key(self) -> Path:
        """The device's X25519 private key (PEM), for bundles encrypted to it."""
        return self.root / "keys" / "device-x25519.pem"


class Installer:
    """The disk side of installing bundles into ``dirs``."""

    def __init__(self, dirs: StateDirs, profile: Profile | None, formats: Collection[str],
                 clock: Callable[[], float] = time.time) -> None:
        self.dirs = dirs
        self.profile = profile
        self.formats = formats
        self.clock = clock
        self.store = ModelStore(dirs.models)
        self.trust = TrustStore(dirs.trust)
        #: Called with every persisted record (the fleet link reports them).
        self.listeners: list[Callable[[InstallRecord], None]] = []

    # -- records -------------------------------------------------------------------------

    def move(self, record: InstallRecord, to: InstallState, **changes: object) -> InstallRecord:
        """Advance ``record`` to ``to`` and persist it before anything else happens."""
        moved = advance(record, to, self.clock(), **changes)  # type: ignore[arg-type]
        self.save(moved)
        for listener in self.listeners:
            try:
                listener(moved)
            except Exception:  # a reporting failure must not fail the install
                log.exception("install listener failed")
        if to in (InstallState.FAILED, InstallState.ROLLED_BACK):
            log.warning("install %s of %s: %s (%s)", moved.install_id, moved.source,
                        to.value, moved.detail or moved.reason)
        else:
            log.info("install %s: %s", moved.install_id, to.value)
        return moved

    def save(self, record: InstallRecord) -> None:
        """Persist ``record`` durably; honours the fault-injection hook."""
        data = dict(asdict(record), state=record.state.value,
                    history=[list(h) for h in record.history])
        write_atomic(self._record_path(record.install_id), json.dumps(data, indent=1).encode())
        if os.environ.get(CRASH_ENV) == record.state.value:
            os.kill(os.getpid(), signal.SIGKILL)

    def records(self) -> list[InstallRecord]:
        """Every install record kept, newest first."""
        if not self.dirs.installs.is_dir():
            return []
        records = []
        for path in self.dirs.installs.glob("*.json"):
            try:
                records.append(_load_record(path))
            except AgentError as exc:
                # A record is written atomically, so this is outside damage: report it and
                # go on serving rather than refuse to start.
                log.error("%s", exc)
        return sorted(records, key=lambda r: r.history[-1][1], reverse=True)

    def pending(self) -> list[InstallRecord]:
        """Records not yet in a terminal state, oldest first (the order to resume them)."""
        return [r for r in reversed(self.records()) if not r.done]

    def forget_old(self) -> None:
        """Keep the newest finished records only."""
        done = [r for r in self.records() if r.done]
        for record in done[_KEEP_RECORDS:]:
            self._record_path(record.install_id).unlink(missing_ok=True)

    # -- steps ---------------------------------------------------------------------------

    def begin(self, source: Path) -> InstallRecord:
        """A persisted record for installing the bundle file at ``source``."""
        record = new_install(uuid.uuid4().hex[:12], str(source.absolute()), self.clock())
        self.save(record)
        return record

    def download(self, record: InstallRecord) -> InstallRecord:
        """Copy the bundle of a ``downloading`` record into the state dir (so the source may
        vanish), then ``verifying``."""
        source, target = Path(record.source), self._bundle_path(record)
        limit = Limits().max_bundle_bytes
        try:
            size = source.stat().st_size
            if size > limit:
                raise InstallError("rejected:OversizeError", f"{source} is {size} bytes, over "
                                   f"the bundle limit of {limit}")
            self.dirs.incoming.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".part")
            digest = _copy_and_hash(source, partial)
            os.replace(partial, target)
        except OSError as exc:
            raise InstallError("download_failed", f"cannot read bundle {source} "
                               f"({exc.strerror}); check the path") from exc
        return self.move(record, InstallState.VERIFYING, bundle_sha256=digest)

    def verify_and_stage(self, record: InstallRecord) -> tuple[InstallRecord, StoredModel]:
        """Verify the fetched bundle, choose this device's variant, write its slot: staged.

        Raises InstallError (``rejected:<check>`` for a bundle that fails verification).
        """
        data = self._bundle_path(record).read_bytes()
        trusted = self.trust.load()
        try:
            verified = _verify_elsewhere(data, trusted, datetime.now(timezone.utc),
                                         self.profile.name if self.profile else None)
            manifest = verified.manifest
            variant = choose_variant(manifest, self.profile, self.formats)
            plain = open_artifacts(manifest, verified.artifacts, self._device_key())
        except BundleError as exc:
            raise InstallError(f"rejected:{type(exc).__name__}", str(exc)) from exc
        stored = self.store.stage(manifest, variant, plain[variant.path], self.clock(),
                                  record.bundle_sha256)
        # The version floor rises once the bundle is verified and kept, so an older signed
        # bundle cannot be replayed even if this install later rolls back.
        self.trust.save(verified.trusted.with_installed(manifest.name, manifest.version,
                                                        verified.manifest_sha256))
        record = self.move(record, InstallState.STAGED, model=manifest.name,
                           version=manifest.version)
        self.drop_bundle(record)
        return record, stored

    def drop_bundle(self, record: InstallRecord) -> None:
        """Delete the fetched bundle file: once staged, the slot holds all that is needed."""
        self._bundle_path(record).unlink(missing_ok=True)

    def discard(self, record: InstallRecord) -> None:
        """Drop what a failed install left behind (fetched bundle, non-active slot)."""
        self.drop_bundle(record)
        if record.model is not None and record.version is not None:
            pointer = self.store.active(record.model)
            if pointer is None or pointer.version != record.version:
                self.store.remove(record.model, record.version)

    def _device_key(self) -> X25519PrivateKey | None:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        path = self.dirs.device_key
        if not path.exists():
            return None
        key = load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, X25519PrivateKey):
            raise AgentError(f"{path} is not an X25519 private key; re-enroll the device")
        return key

    def _record_path(self, install_id: str) -> Path:
        return self.dirs.installs / f"{install_id}.json"

    def _bundle_path(self, record: InstallRecord) -> Path:
        return self.dirs.incoming / f"{record.install_id}.bundle"


def _copy_and_hash(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` and return its sha256, reading it once."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as dst:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            dst.write(block)
    return digest.hexdigest()


def _verify_elsewhere(data: bytes, trusted: TrustedState, now: datetime,
                      profile: str | None) -> VerifiedBundle:
    """verify_bundle in a short-lived child process at low priority.

    Verification is pure Python for the most part (TUF metadata, canonical JSON): run in
    the agent's own process it holds the GIL in 0.5 ms slices for tens of milliseconds,
    and every request served meanwhile waits for it. In a child process it costs the
    serving threads nothing but CPU, which the child yields (nice 10).
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context,
                             initializer=os.nice, initargs=(10,)) as pool:
        return pool.submit(verify_bundle, data, trusted, now=now, profile=profile).result()


def _load_record(path: Path) -> InstallRecord:
    try:
        raw = json.loads(path.read_bytes())
        raw["state"] = InstallState(raw["state"])
        raw["history"] = tuple((str(s), float(t)) for s, t in raw["history"])
        return InstallRecord(**raw)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AgentError(f"install record {path} is corrupt ({exc!r}); delete it to forget "
                         "that install") from exc
