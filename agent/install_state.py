"""The install state machine: one transition table and a pure ``step``, no I/O.

One install moves through::

    idle -> downloading -> verifying -> staged -> activating -> probation -> committed
                 |             |           |           |             |
                 +-------------+-----------+--> failed +             +--> rolled_back

``failed`` means the install never served (bad bundle, failed self-test, full disk);
``rolled_back`` means the new model served for a while and was replaced by the previous one.

:func:`step` is the whole decision: ``step(record, event, now) -> (record, actions)``. An
:class:`InstallEvent` is what happened (the bundle is fetched, verified, the model serves,
probation judged it, something failed, the agent restarted); the :class:`Action` tuple is
what the adapter (:mod:`agent.install_driver`) must do next. The adapter persists the
returned record *before* it performs any action, so after a crash the record alone says what
may be half done, and a ``RESTARTED`` event (after a crash) or ``RESUMED`` (after a clean
stop) resumes it. The record carries a restart counter of crashes only: an install that
keeps the agent from coming back (a model that crashes it while activating or verifying) is
given up after :data:`MAX_RESTARTS` of them instead of looping, while stopping and starting
the agent on purpose, however often, blames nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

# The state names are the protocol's: the agent reports them and the fleet server reads them.
from protocol.install_states import InstallState

__all__ = ["MAX_RESTARTS", "RECORD_VERSION", "TABLE", "TERMINAL", "Action", "InstallEvent",
           "InstallRecord", "InstallState", "InvalidTransition", "Trigger", "new_install",
           "step"]

#: Version of the persisted record's layout (``record_version`` in the JSON).
RECORD_VERSION = 2


class Trigger(str, enum.Enum):
    """What happened to an install."""

    START = "start"            # a record exists: get the bundle
    FETCHED = "fetched"        # the whole bundle file is in the state dir
    VERIFIED = "verified"      # verified, variant chosen, slot written (model, version)
    PREPARED = "prepared"      # an older probation settled; previous_version known
    ACTIVATED = "activated"    # loaded, self-tested, pointer flipped, swapped in
    HEALTHY = "healthy"        # probation's verdict: keep it (detail says why)
    UNHEALTHY = "unhealthy"    # probation's verdict: roll back (detail says why)
    FAILED = "failed"          # a step could not be done (reason, detail)
    RESTARTED = "restarted"    # the agent restarted after a crash, this record unfinished
    RESUMED = "resumed"        # the agent started again after a clean stop, same


class Action(str, enum.Enum):
    """What the adapter does after a step, in order."""

    FETCH = "fetch"                        # bring the bundle file into the state dir
    VERIFY = "verify"                      # verify it, choose the variant, write the slot
    PREPARE = "prepare"                    # settle an older probation, note what to go back to
    ACTIVATE = "activate"                  # load, self-test, flip the pointer, swap
    WATCH = "watch"                        # (re)start probation
    COMMIT = "commit"                      # keep it: prune old slots and records
    RESTORE_PREVIOUS = "restore_previous"  # serve the previous version again if it was replaced
    RECLAIM = "reclaim"                    # delete what the install left (bundle, unused slot)


class InvalidTransition(ValueError):
    """An event that the table has no row for in the record's state (a bug in the caller)."""


S, T, A = InstallState, Trigger, Action
TERMINAL = frozenset({S.COMMITTED, S.ROLLED_BACK, S.FAILED})
_UNDO = (A.RESTORE_PREVIOUS, A.RECLAIM)

#: The whole machine: (state, trigger) -> (next state, actions).
TABLE: dict[tuple[InstallState, Trigger], tuple[InstallState, tuple[Action, ...]]] = {
    (S.IDLE, T.START): (S.DOWNLOADING, (A.FETCH,)),
    (S.DOWNLOADING, T.FETCHED): (S.VERIFYING, (A.VERIFY,)),
    (S.VERIFYING, T.VERIFIED): (S.STAGED, (A.PREPARE,)),
    (S.STAGED, T.PREPARED): (S.ACTIVATING, (A.ACTIVATE,)),
    (S.ACTIVATING, T.ACTIVATED): (S.PROBATION, (A.WATCH,)),
    (S.PROBATION, T.HEALTHY): (S.COMMITTED, (A.COMMIT,)),
    (S.PROBATION, T.UNHEALTHY): (S.ROLLED_BACK, _UNDO),
    (S.IDLE, T.FAILED): (S.FAILED, (A.RECLAIM,)),
    (S.DOWNLOADING, T.FAILED): (S.FAILED, (A.RECLAIM,)),
    (S.VERIFYING, T.FAILED): (S.FAILED, (A.RECLAIM,)),
    (S.STAGED, T.FAILED): (S.FAILED, (A.RECLAIM,)),
    # The pointer may have been flipped before the failure: go back if so.
    (S.ACTIVATING, T.FAILED): (S.FAILED, _UNDO),
    # A failure while serving in probation is a verdict on the model.
    (S.PROBATION, T.FAILED): (S.ROLLED_BACK, _UNDO),
}

#: After a restart: the action that picks each state up again (each is safe to repeat:
#: fetching resumes from the partial file, verification starts over from the bundle file,
#: activation from the staged slot, probation from the start of its window).
_RESUME: dict[InstallState, Action] = {
    S.IDLE: A.FETCH, S.DOWNLOADING: A.FETCH, S.VERIFYING: A.VERIFY, S.STAGED: A.PREPARE,
    S.ACTIVATING: A.ACTIVATE, S.PROBATION: A.WATCH,
}
#: Restarts tolerated in a state before the install is blamed for them: a model that
#: crashes the agent (a faulty delegate, a runaway allocation, a verifier that runs out of
#: memory) must not crash it forever, while a single power cut should not throw a good model
#: away. Downloading is not counted: a long fetch may span any number of power cuts.
MAX_RESTARTS = 2
_COUNTED = frozenset({S.VERIFYING, S.STAGED, S.ACTIVATING, S.PROBATION})


@dataclass(frozen=True)
class InstallEvent:
    """What happened, with what the next state needs to know."""

    trigger: Trigger
    model: str | None = None
    version: int | None = None
    previous_version: int | None = None
    bundle_sha256: str | None = None
    reason: str | None = None
    detail: str | None = None
    retry: bool = False


@dataclass(frozen=True)
class InstallRecord:
    """One install, as persisted. ``model`` and ``version`` are known from the start for a
    fleet install (the desired state names them) and once verified for a local file."""

    install_id: str
    source: str
    state: InstallState = S.IDLE
    model: str | None = None
    version: int | None = None
    previous_version: int | None = None
    reason: str | None = None
    detail: str | None = None
    restarts: int = 0
    history: tuple[tuple[str, float], ...] = ()
    bundle_sha256: str | None = None  # of the bundle file (from the desired state, or fetched)
    size: int | None = None  # of the bundle file, when known before fetching
    #: For a failure: whether the same bundle may be tried again (a full disk, a bundle
    #: corrupted in transit) rather than given up until the desired state changes.
    retry: bool = False
    #: How many entries of ``history`` the installer's listeners have had (reported).
    announced: int = 0
    #: For an install from a delta bundle (``bundle_sha256``): the release's full bundle,
    #: which the installed model is recorded as coming from.
    release_sha256: str | None = None

    @property
    def done(self) -> bool:
        """Whether the install reached a terminal state."""
        return self.state in TERMINAL

    @property
    def at(self) -> float:
        """When the record last changed state (0 for a record without history)."""
        return self.history[-1][1] if self.history else 0.0

    def summary(self) -> dict[str, Any]:
        """The record as the API, ``status`` and ``install`` show it (JSON-ready)."""
        return {"id": self.install_id, "model": self.model, "version": self.version,
                "state": self.state.value, "reason": self.reason, "detail": self.detail,
                "source": self.source, "at": self.at}


def new_install(install_id: str, source: str, now: float, *, model: str | None = None,
                version: int | None = None, bundle_sha256: str | None = None,
                size: int | None = None, release_sha256: str | None = None) -> InstallRecord:
    """A fresh record for installing the bundle at ``source``."""
    return InstallRecord(install_id=install_id, source=source, model=model, version=version,
                         bundle_sha256=bundle_sha256, size=size, release_sha256=release_sha256,
                         history=((S.IDLE.value, now),))


def step(record: InstallRecord, event: InstallEvent,
         now: float) -> tuple[InstallRecord, tuple[Action, ...]]:
    """The record after ``event`` at ``now``, and the actions to perform, in order.

    Raises InvalidTransition for an event the table has no row for, a failure without a
    reason, or a verified bundle without model and version.
    """
    if event.trigger in (T.RESTARTED, T.RESUMED):
        return _resume(record, now, crashed=event.trigger is T.RESTARTED)
    row = TABLE.get((record.state, event.trigger))
    if row is None:
        raise InvalidTransition(f"install {record.install_id}: no transition from "
                                f"{record.state.value} on {event.trigger.value}")
    to, actions = row
    if to in (S.FAILED, S.ROLLED_BACK) and not event.reason:
        raise InvalidTransition(f"install {record.install_id}: {to.value} needs a reason")
    if event.trigger is T.VERIFIED and (event.model is None or event.version is None):
        raise InvalidTransition(f"install {record.install_id}: verified needs the model and "
                                "version")
    return _enter(record, to, now, event), actions


def _enter(record: InstallRecord, to: InstallState, now: float,
           event: InstallEvent) -> InstallRecord:
    # Identity fields, once known, are kept; reason and detail describe the newest state.
    return replace(
        record, state=to,
        model=event.model or record.model,
        version=record.version if event.version is None else event.version,
        previous_version=(record.previous_version if event.previous_version is None
                          else event.previous_version),
        bundle_sha256=event.bundle_sha256 or record.bundle_sha256,
        reason=event.reason, detail=event.detail, retry=event.retry,
        restarts=0 if to is not record.state else record.restarts,
        history=(*record.history, (to.value, now)))


def _resume(record: InstallRecord, now: float,
            crashed: bool) -> tuple[InstallRecord, tuple[Action, ...]]:
    if record.done:
        return record, ()
    if not crashed or record.state not in _COUNTED:
        return record, (_RESUME[record.state],)
    resumed = replace(record, restarts=record.restarts + 1)
    if resumed.restarts <= MAX_RESTARTS:
        return resumed, (_RESUME[record.state],)
    detail = (f"the agent crashed {resumed.restarts} times while this install was "
              f"{record.state.value}; the new model (or its bundle) may be crashing it")
    reason = "probation_failed" if record.state is S.PROBATION else "crash_loop"
    return step(resumed, InstallEvent(T.FAILED, reason=reason, detail=detail), now)
