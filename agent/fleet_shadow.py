"""What the desired state asks beside the served models: shadow candidates and the previous
version (rollouts, issue 14), done for the fleet link.

:func:`agent.watch_plan.watch_actions` decides; :class:`ShadowCandidates` does it with the
runtime: keeps the previous version loaded or switches back to it, changes a shadow's share
of the requests or unloads it, and starts, loads or gives up a shadow candidate. The link
fetches a candidate's bundle in its one fetch slot once no install is due
(:meth:`ShadowCandidates.begin` makes the fetch), then :meth:`ShadowCandidates.load`
verifies, stages, self-tests and loads it on the install worker without serving
(:meth:`Runtime.load_candidate <agent.runtime.Runtime.load_candidate>`) and runs it beside
the served model. A candidate that fails is not tried again until the desired state names
another bundle.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from protocol.messages import Desired

from .bundle_fetch import BundleFetch
from .install_state import InstallRecord
from .installer import FLEET_SOURCE
from .runtime import Runtime
from .watch_plan import WatchAction, Watched, watch_actions

__all__ = ["ShadowCandidates"]

log = logging.getLogger(__name__)


class ShadowCandidates:
    """The shadow candidates and previous versions of ``runtime``'s models.

    ``desired`` returns the link's current desired state; ``event(kind, detail)`` queues an
    event for the fleet, ``report`` asks for a fresh reported state and ``wake`` wakes the
    link's worker. None of them is called with this object's lock held.
    """

    def __init__(self, runtime: Runtime, *, desired: Callable[[], Desired | None],
                 event: Callable[[str, dict[str, Any]], None], report: Callable[[], None],
                 wake: Callable[[], None]) -> None:
        assert runtime.installer is not None
        self.runtime = runtime
        self.installer = runtime.installer
        self._desired = desired
        self._event = event
        self._report = report
        self._wake = wake
        self._lock = threading.Lock()
        # By model: the shadow bundle being fetched or loaded, and the one given up.
        self._loading: dict[str, str] = {}
        self._given_up: dict[str, str] = {}

    def watch(self, desired: Desired | None, *, load: bool) -> WatchAction | None:
        """Do what ``desired`` asks of the models beside the served ones; with ``load``,
        return the first shadow candidate to fetch (the caller calls :meth:`begin`)."""
        if desired is None:
            return None
        with self._lock:
            given_up = dict(self._given_up)
        watched = {name: self._watched(name) for name in desired.models}
        for action in watch_actions(desired, watched, given_up):
            if action.kind == "load_shadow":
                if load:
                    return action
                continue
            self._perform(action)
        return None

    def begin(self, action: WatchAction, chunk_bytes: int,
              ) -> tuple[BundleFetch, InstallRecord, float] | None:
        """The fetch of ``action``'s shadow bundle, its (never persisted) install record and
        share of requests; None if there is no room for it (reported, given up)."""
        shadow = action.shadow
        assert shadow is not None
        name, sha = action.model, shadow.bundle_sha256
        record = self.runtime.candidate_record(name, shadow.version, FLEET_SOURCE + sha, sha,
                                               shadow.size)
        try:
            self.installer.check_space(shadow.size, f"shadow bundle {sha[:12]}")
        except Exception as exc:  # no room: reported, tried again when the desired state changes
            self.failed(record, str(exc))
            return None
        fetch = BundleFetch(self.installer.dirs.incoming, sha, shadow.size,
                            chunk_bytes=chunk_bytes, name=record.install_id)
        with self._lock:
            self._loading[name] = sha
        log.info("fetching shadow candidate %s v%d (bundle %s, %d bytes)", name, shadow.version,
                 sha[:12], shadow.size)
        return fetch, record, shadow.sample_rate

    def abandon(self, name: str) -> None:
        """The fetch of ``name``'s candidate made way for an install; it starts again later."""
        with self._lock:
            self._loading.pop(name, None)

    def load(self, record: InstallRecord, rate: float) -> None:
        """Verify, self-test and load the fetched shadow bundle on the install worker, then
        run it beside the served model."""
        def loaded(future: Future[Any]) -> None:
            exc = future.exception()
            if exc is not None:
                self.failed(record, str(exc))
                return
            name = record.model
            assert name is not None
            desired = self._desired()
            with self._lock:
                current = self._loading.get(name)
            if current != record.bundle_sha256 or desired is None or name not in desired.models:
                return  # the desired state moved on while it loaded
            self.runtime.attach(name, "shadow", future.result(), rate)
            with self._lock:
                self._loading.pop(name, None)
            log.info("shadow candidate %s v%s runs on %.0f%% of the requests", name,
                     record.version, rate * 100)
            self._event("shadow.loaded", {"model": name, "version": record.version,
                                          "bundle_sha256": record.bundle_sha256,
                                          "sample_rate": rate})
            self._wake()
        self.runtime.load_candidate(record).add_done_callback(loaded)

    def failed(self, record: InstallRecord, reason: str) -> None:
        """Give up ``record``'s candidate until the desired state names another bundle."""
        name, sha = record.model, record.bundle_sha256
        assert name is not None
        assert sha is not None
        log.error("shadow candidate %s v%s not loaded: %s", name, record.version, reason)
        with self._lock:
            self._loading.pop(name, None)
            self._given_up[name] = sha
        self._event("shadow.failed", {"model": name, "version": record.version,
                                      "bundle_sha256": sha, "reason": reason})
        self._wake()

    def _watched(self, name: str) -> Watched:
        runtime = self.runtime
        try:
            served: int | None = runtime.served(name).version
        except Exception:  # not served (yet)
            served = None
        shadow = runtime.shadow_of(name)
        sha, rate = None, 0.0
        if shadow is not None:
            stored = shadow[0].stored
            sha, rate = (None if stored is None else stored.bundle_sha256), shadow[1]
        with self._lock:
            loading = self._loading.get(name)
        if loading is not None:
            sha = loading
        return Watched(served, runtime.previous_version(name), runtime.keep_rate(name), sha,
                       rate)

    def _perform(self, action: WatchAction) -> None:
        name = action.model
        if action.kind == "keep_previous":
            self.runtime.keep_previous(name, action.rate)
        elif action.kind == "switch_back" and action.version is not None:
            if self.runtime.switch_back(name, action.version):
                log.info("%s: switched back to v%d", name, action.version)
                self._event("model.switched_back", {"model": name, "version": action.version})
                self._report()
        elif action.kind == "unload_shadow":
            with self._lock:
                self._loading.pop(name, None)
            model = self.runtime.detach(name, "shadow")
            if model is not None:
                self._event("shadow.unloaded", {"model": name, "version": model.version})
        elif action.kind == "shadow_rate":
            shadow = self.runtime.shadow_of(name)
            if shadow is not None:
                self.runtime.attach(name, "shadow", shadow[0], action.rate)
