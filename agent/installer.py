"""Installs on disk: persisted install records, the bundle file, verification and staging.

What happens in memory (loading the session, self-test, swap, probation) is the runtime's,
and the order of things is the state machine's (:mod:`agent.install_state`, driven by
:mod:`agent.install_driver`); this module owns everything an install leaves on disk, so a
restart can pick up from the records alone, and the startup sweep can delete what no record
references.

Disk space: an install needs at most the bundle's size plus its largest artifact (the
plaintext slot is written while the bundle file is still there), plus a small reserve. The
bundle's share is checked before fetching (or copying) it and the artifact's before staging,
so a full disk is noticed before it is filled; if it fills anyway (ENOSPC), the install ends
``failed`` with reason ``disk_full`` and its files are deleted.

Fault injection: when the environment variable ``EDGEFLEET_AGENT_CRASH_AFTER`` names a state,
the process kills itself with SIGKILL right after persisting a record in that state. Tests
use it to prove that ``kill -9`` in every state leaves a serving agent after restart.
"""

from __future__ import annotations

import atexit
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bundle.archive import READ_BLOCK, Limits
from bundle.crypto import open_artifact
from bundle.delta import apply_delta
from bundle.errors import BundleError, DeltaBaseError
from bundle.manifest import ArtifactVariant
from bundle.trust import TrustedState, VerifiedBundle
from common.atomic import write_atomic
from firmware_profiles.model import Profile

from .bundle_verifier import verify_in_child
from .errors import AgentError, InstallError
from .install_state import RECORD_VERSION, InstallRecord, InstallState, new_install
from .model_store import ModelStore, StoredModel
from .trust_store import TrustStore
from .variants import choose_variant, composite_members

__all__ = ["CRASH_ENV", "FLEET_SOURCE", "RESERVE_BYTES", "Installer", "StateDirs", "Verifier",
           "is_disk_full"]

log = logging.getLogger(__name__)
CRASH_ENV = "EDGEFLEET_AGENT_CRASH_AFTER"
#: Source of an install whose bundle is fetched from the fleet: ``fleet:<bundle sha256>``.
FLEET_SOURCE = "fleet:"
#: Free space kept beyond what an install needs: records, logs, the telemetry buffer.
RESERVE_BYTES = 8 * 1024 * 1024
_KEEP_RECORDS = 50
#: In ``installs/`` while an agent runs (removed by a clean stop): tells a crash from a stop.
_RUN_MARKER = "running"
#: Verifies the bundle file at a path for the trusted state, time and profile.
Verifier = Callable[[Path, TrustedState, datetime, "str | None"], VerifiedBundle]


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
                 clock: Callable[[], float] = time.time,
                 verifier: Verifier | None = None) -> None:
        self.dirs = dirs
        self._at_exit: Callable[[], None] | None = None
        self.profile = profile
        self.formats = formats
        self.clock = clock
        self.store = ModelStore(dirs.models)
        self.trust = TrustStore(dirs.trust)
        self._verify = verifier or verify_in_child
        #: Called with every record that entered a new state (the fleet link reports them).
        self.listeners: list[Callable[[InstallRecord], None]] = []

    # -- records -------------------------------------------------------------------------

    def save(self, record: InstallRecord) -> None:
        """Persist ``record`` durably; honours the fault-injection hook."""
        data = dict(asdict(record), state=record.state.value, record_version=RECORD_VERSION,
                    history=[list(h) for h in record.history])
        self.dirs.installs.mkdir(parents=True, exist_ok=True)
        write_atomic(self._record_path(record.install_id), json.dumps(data, indent=1).encode())
        if os.environ.get(CRASH_ENV) == record.state.value:
            os.kill(os.getpid(), signal.SIGKILL)

    def announce(self, record: InstallRecord) -> InstallRecord:
        """Hand every state of ``record`` the listeners have not had yet to them, oldest
        first, and note that they had them (only if someone listens: with nobody listening
        the states wait for the next agent that does, e.g. after an offline install)."""
        if not self.listeners or record.announced >= len(record.history):
            return record
        for index in range(record.announced, len(record.history)):
            latest = index == len(record.history) - 1
            state = InstallState(record.history[index][0])
            view = record if latest else replace(
                record, state=state, reason=None, detail=None,
                history=record.history[:index + 1])
            for listener in list(self.listeners):
                try:
                    listener(view)
                except Exception:  # a reporting failure must not fail the install
                    log.exception("install listener failed")
        announced = replace(record, announced=len(record.history))
        try:
            self.save(announced)
        except OSError as exc:  # the states are out; at worst they go out again
            log.warning("cannot note that install %s was reported (%s)", record.install_id,
                        exc.strerror)
        return announced

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
        return sorted(records, key=lambda r: r.at, reverse=True)

    def pending(self) -> list[InstallRecord]:
        """Records not yet in a terminal state, oldest first (the order to resume them)."""
        return [r for r in reversed(self.records()) if not r.done]

    def given_up(self) -> dict[str, str]:
        """Model -> bundle sha256 whose latest install failed for good (not ``retry``): the
        fleet link does not fetch it again until the desired state names another bundle."""
        given_up: dict[str, str] = {}
        seen: set[str] = set()
        for record in self.records():  # newest first: only each model's latest counts
            if record.model is None or record.model in seen:
                continue
            seen.add(record.model)
            if (record.state not in (InstallState.FAILED, InstallState.ROLLED_BACK)
                    or record.bundle_sha256 is None):
                continue
            # A retry-able failure waits for what it lacked: a full disk for free space.
            waiting = record.retry and record.reason == "disk_full" and not self.has_room(
                record.size or 0)
            if not record.retry or waiting:
                given_up[record.model] = record.bundle_sha256
        return given_up

    def forget_old(self) -> None:
        """Keep the newest finished records only."""
        done = [r for r in self.records() if r.done]
        for record in done[_KEEP_RECORDS:]:
            self._record_path(record.install_id).unlink(missing_ok=True)

    # -- steps ---------------------------------------------------------------------------

    def begin(self, source: str, *, model: str | None = None, version: int | None = None,
              bundle_sha256: str | None = None, size: int | None = None,
              release_sha256: str | None = None) -> InstallRecord:
        """A new record (not yet saved: the driver persists it with its first step);
        ``release_sha256`` is the full bundle when ``source`` is a delta bundle of it."""
        return new_install(uuid.uuid4().hex[:12], source, self.clock(), model=model,
                           version=version, bundle_sha256=bundle_sha256, size=size,
                           release_sha256=release_sha256)

    def copy_in(self, record: InstallRecord) -> str:
        """Copy the local bundle file of ``record`` into the state dir (so the source may
        vanish); returns its sha256."""
        source, target = Path(record.source), self.bundle_path(record)
        limit = Limits().max_bundle_bytes
        try:
            size = source.stat().st_size
        except OSError as exc:
            raise InstallError("download_failed", f"cannot read bundle {source} "
                               f"({exc.strerror}); check the path") from exc
        if size > limit:
            raise InstallError("rejected:OversizeError", f"{source} is {size} bytes, over "
                               f"the bundle limit of {limit}")
        self.check_space(size, f"the bundle {source.name}")
        partial = self.partial_path(record)
        try:
            src = open(source, "rb")  # noqa: SIM115 - closed below, errors told apart
        except OSError as exc:
            raise InstallError("download_failed", f"cannot read bundle {source} "
                               f"({exc.strerror}); check the path") from exc
        with src, open(partial, "wb") as dst:
            digest = _copy(src, dst)
        os.replace(partial, target)
        return digest

    def has_room(self, needed: int) -> bool:
        """Whether ``needed`` bytes plus the reserve are free under the state dir."""
        return self._free() >= needed + RESERVE_BYTES

    def _free(self) -> int:
        self.dirs.incoming.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.dirs.incoming).free

    def check_space(self, needed: int, what: str) -> None:
        """Raise InstallError(``disk_full``, transient) unless ``needed`` bytes plus the
        reserve are free under the state dir."""
        free = self._free()
        if free < needed + RESERVE_BYTES:
            raise InstallError("disk_full", f"{what} needs {needed} bytes and "
                               f"{RESERVE_BYTES} in reserve, but only {free} are free under "
                               f"{self.dirs.root}; free some space (the install is retried "
                               "once there is room)", transient=True)

    def verify_and_stage(self, record: InstallRecord, *, raise_floor: bool = True,
                         ) -> StoredModel:
        """Verify the fetched bundle, choose this device's variant, write its slot.

        ``raise_floor=False`` (a shadow candidate, which never serves) leaves the trusted
        version floor where it is, so the served older version stays installable. Raises
        InstallError (``rejected:<check>`` for a bundle that fails verification).
        """
        trusted = self.trust.load()
        path = self.bundle_path(record)
        try:
            verified = self._verify(path, trusted, datetime.now(timezone.utc),
                                    self.profile.name if self.profile else None)
        except BundleError as exc:
            # Not retried even if the error is transient in general (a checksum): these
            # bytes hash to what the fleet asked for, so fetching them again changes nothing.
            raise InstallError(f"rejected:{type(exc).__name__}", str(exc)) from exc
        manifest = verified.manifest
        if (record.model, record.version) not in ((None, None),
                                                  (manifest.name, manifest.version)):
            raise InstallError("rejected:unexpected_bundle", f"the bundle holds "
                               f"{manifest.name} v{manifest.version}, but the fleet asked for "
                               f"{record.model} v{record.version}; the desired state is wrong")
        if manifest.composite is not None:
            stored = self._stage_members(record, verified)
        else:
            stored = self._stage_variant(record, verified)
        # The version floor rises once the bundle is verified and kept, so an older signed
        # bundle cannot be replayed even if this install later rolls back.
        if raise_floor:
            self.trust.save(verified.trusted.with_installed(
                manifest.name, manifest.version, verified.manifest_sha256))
        return stored

    def _stage_variant(self, record: InstallRecord, verified: VerifiedBundle) -> StoredModel:
        """Stage the one artifact variant this device runs best (rebuilt from a delta)."""
        manifest = verified.manifest
        variant = choose_variant(manifest, self.profile, self.formats)
        # A delta bundle's artifact is rebuilt into a file first: twice the room.
        rebuilt = 2 if verified.delta_base is not None else 1
        self.check_space(rebuilt * variant.size,
                         f"{manifest.name} v{manifest.version} ({variant.path})")
        try:
            if verified.delta_base is None:
                plain = open_artifact(manifest, variant.path,
                                      verified.artifact_blocks(variant.path), self._device_key())
            else:
                plain = self._rebuild(record, verified, variant)
            stored = self.store.stage(manifest, variant, plain, self.clock(),
                                      record.release_sha256 or record.bundle_sha256)
        except BundleError as exc:
            raise InstallError(f"rejected:{type(exc).__name__}", str(exc)) from exc
        finally:
            self.rebuilt_path(record).unlink(missing_ok=True)
        return stored

    def _stage_members(self, record: InstallRecord, verified: VerifiedBundle) -> StoredModel:
        """Stage every member artifact of a composite bundle (served as one model)."""
        manifest = verified.manifest
        if verified.delta_base is not None:
            # As a delta whose base is missing is answered: the full bundle is fetched.
            raise InstallError("rejected:DeltaBaseError", f"{manifest.name} "
                               f"v{manifest.version} is a composite; its members are "
                               "installed from the full bundle")
        members = composite_members(manifest, self.profile, self.formats)
        self.check_space(sum(m.size for m in members),
                         f"{manifest.name} v{manifest.version} ({len(members)} members)")
        key = self._device_key()
        try:
            return self.store.stage_members(
                manifest, [(m, open_artifact(manifest, m.path, verified.artifact_blocks(m.path),
                                             key)) for m in members],
                self.clock(), record.release_sha256 or record.bundle_sha256)
        except BundleError as exc:
            raise InstallError(f"rejected:{type(exc).__name__}", str(exc)) from exc

    def _rebuild(self, record: InstallRecord, verified: VerifiedBundle,
                 variant: ArtifactVariant) -> Iterator[bytes]:
        """The artifact ``variant`` rebuilt from the stored base and the delta bundle's delta
        (written to :meth:`rebuilt_path` as it streams, checked against the signed sha256
        before a block is handed on), as blocks. DeltaBaseError when the base is missing,
        damaged or has no delta for this variant: the full bundle is fetched instead."""
        manifest, base_version = verified.manifest, verified.delta_base
        assert base_version is not None
        delta = variant.delta_from(base_version)
        if delta is None:
            raise DeltaBaseError(f"{manifest.name} v{manifest.version} has no delta from "
                                 f"v{base_version} for {variant.path}, the variant this device "
                                 "runs; install the full bundle")
        try:
            base = self.store.slot(manifest.name, base_version)
        except AgentError as exc:
            raise DeltaBaseError(f"the delta builds on {manifest.name} v{base_version}, which "
                                 f"this device no longer holds ({exc}); install the full "
                                 "bundle") from exc
        path = self.rebuilt_path(record)
        try:
            with base.path.open("rb") as old, path.open("wb") as out:
                apply_delta(verified.artifact_blocks(delta.path), delta.size, old, out,
                            base_sha256=delta.base_sha256, target_sha256=variant.sha256,
                            target_size=variant.size)
        except FileNotFoundError as exc:
            raise DeltaBaseError(f"the stored {manifest.name} v{base_version} is missing "
                                 f"({exc.filename}); install the full bundle") from exc
        return _file_blocks(path)

    def rebuilt_path(self, record: InstallRecord) -> Path:
        """Where the artifact of a delta install is rebuilt before it is staged."""
        return self.dirs.incoming / f"{record.install_id}.rebuilt"

    def drop_bundle(self, record: InstallRecord) -> None:
        """Delete the bundle file: once staged, the slot holds all that is needed."""
        self.bundle_path(record).unlink(missing_ok=True)
        self.partial_path(record).unlink(missing_ok=True)

    def discard(self, record: InstallRecord) -> None:
        """Drop what an install that did not succeed left (bundle files, non-active slot)."""
        self.drop_bundle(record)
        if record.model is not None and record.version is not None:
            try:
                pointer = self.store.active(record.model)
            except AgentError:
                return  # a damaged pointer: keep every slot, the restore sorts it out
            if pointer is None or record.version not in (pointer.version, pointer.previous):
                self.store.remove(record.model, record.version)

    def begin_run(self) -> bool:
        """Mark the state directory as in use by a running agent; returns whether the
        previous run ended without :meth:`end_run` (a crash, a kill, a power cut), which is
        what counts against an unfinished install (:mod:`agent.install_state`)."""
        marker = self.dirs.installs / _RUN_MARKER
        crashed = marker.exists()
        if not crashed:
            try:
                write_atomic(marker, b"")
            except OSError as exc:  # a full disk must not keep the agent from serving
                log.warning("cannot write %s (%s): a crash before the next clean stop will "
                            "not count against an unfinished install", marker, exc.strerror)
        # Any exit of the interpreter is clean, an error that ends a command included (a
        # port in use): only a kill or a crash skips it.
        self._at_exit = functools.partial(marker.unlink, missing_ok=True)
        atexit.register(self._at_exit)
        return crashed

    def end_run(self) -> None:
        """The agent stops cleanly: its unfinished installs resume without blame."""
        (self.dirs.installs / _RUN_MARKER).unlink(missing_ok=True)
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None

    def sweep(self) -> list[Path]:
        """Delete what no unfinished install references: bundle files in ``incoming/``,
        slots that are neither active, previous nor being installed, staging directories.
        Run at start, before installs resume; returns what it deleted."""
        pending = self.pending()
        wanted = {p.name for r in pending for p in (self.bundle_path(r), self.partial_path(r))}
        removed = []
        for path in self.dirs.incoming.iterdir() if self.dirs.incoming.is_dir() else ():
            if path.name not in wanted:
                _remove(path)
                removed.append(path)
        installing = {(r.model, r.version) for r in pending}
        for name in self.store.all_names():
            removed += self.store.sweep(name, {v for m, v in installing if m == name
                                               and v is not None})
        if removed:
            log.info("startup sweep: deleted %d files no install references (%s)",
                     len(removed), ", ".join(p.name for p in removed[:5]))
        return removed

    def bundle_path(self, record: InstallRecord) -> Path:
        """Where the whole bundle file of ``record`` is kept until staged."""
        return self.dirs.incoming / f"{record.install_id}.efb"

    def partial_path(self, record: InstallRecord) -> Path:
        """Where the bundle of ``record`` grows while it is fetched or copied."""
        return self.dirs.incoming / f"{record.install_id}.part"

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


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the file system saying it has no room (or quota) left."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _copy(src: BinaryIO, dst: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: src.read(READ_BLOCK), b""):
        digest.update(block)
        dst.write(block)
    dst.flush()
    os.fsync(dst.fileno())
    return digest.hexdigest()


def _file_blocks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from iter(lambda: f.read(READ_BLOCK), b"")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _load_record(path: Path) -> InstallRecord:
    try:
        raw = json.loads(path.read_bytes())
        raw.pop("record_version", None)
        raw["state"] = InstallState(raw["state"])
        raw["history"] = tuple((str(s), float(t)) for s, t in raw["history"])
        # Records written before announcements were tracked were announced as they went.
        raw.setdefault("announced", len(raw["history"]))
        return InstallRecord(**raw)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AgentError(f"install record {path} is corrupt ({exc!r}); delete it to forget "
                         "that install") from exc
