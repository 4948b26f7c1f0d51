"""The install state machine: pure records and transitions, no I/O.

One install moves through::

    idle -> downloading -> verifying -> staged -> activating -> probation -> committed
                 |             |           |           |             |
                 +-------------+-----------+--> failed +             +--> rolled_back

``failed`` means the serving model was never touched (bad bundle, failed self-test);
``rolled_back`` means the new model served for a while and was replaced by the previous one.
The installer (:mod:`agent.installer`) persists the record before acting on each state, so
after a crash :func:`plan_resume` can say what to do next from the record alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

# The state names are the protocol's: the agent reports them and the fleet server reads them.
from protocol.install_states import InstallState

__all__ = ["MAX_RESTARTS", "TERMINAL", "TRANSITIONS", "InstallRecord", "InstallState",
           "Step", "advance", "new_install", "plan_resume"]


S = InstallState
TERMINAL = frozenset({S.COMMITTED, S.ROLLED_BACK, S.FAILED})
TRANSITIONS: dict[InstallState, frozenset[InstallState]] = {
    S.IDLE: frozenset({S.DOWNLOADING}),
    S.DOWNLOADING: frozenset({S.VERIFYING, S.FAILED}),
    S.VERIFYING: frozenset({S.STAGED, S.FAILED}),
    S.STAGED: frozenset({S.ACTIVATING, S.FAILED}),
    S.ACTIVATING: frozenset({S.PROBATION, S.FAILED}),
    S.PROBATION: frozenset({S.COMMITTED, S.ROLLED_BACK}),
    S.COMMITTED: frozenset(),
    S.ROLLED_BACK: frozenset(),
    S.FAILED: frozenset(),
}
#: Restarts tolerated while activating or in probation before the new model is blamed: a
#: model that crashes the agent (a faulty delegate, a runaway allocation) must not crash it
#: forever, while a single power cut should not throw a good model away.
MAX_RESTARTS = 2


class Step(str, enum.Enum):
    """What the installer does next with a resumed record."""

    DOWNLOAD = "download"
    VERIFY = "verify"
    ACTIVATE = "activate"
    PROBATION = "probation"
    ROLL_BACK = "roll_back"
    FAIL = "fail"
    NOTHING = "nothing"


@dataclass(frozen=True)
class InstallRecord:
    """One install, as persisted. ``model`` and ``version`` are known once verified."""

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
    bundle_sha256: str | None = None  # of the bundle file, once fetched

    @property
    def done(self) -> bool:
        """Whether the install reached a terminal state."""
        return self.state in TERMINAL

    def summary(self) -> dict[str, Any]:
        """The record as the API, ``status`` and ``install`` show it (JSON-ready)."""
        return {"id": self.install_id, "model": self.model, "version": self.version,
                "state": self.state.value, "reason": self.reason, "detail": self.detail,
                "source": self.source, "at": self.history[-1][1]}


def new_install(install_id: str, source: str, now: float) -> InstallRecord:
    """A fresh record for installing the bundle at ``source``."""
    return InstallRecord(install_id=install_id, source=source,
                         history=((S.IDLE.value, now),))


def advance(record: InstallRecord, to: InstallState, now: float, *,
            model: str | None = None, version: int | None = None,
            previous_version: int | None = None, reason: str | None = None,
            detail: str | None = None, bundle_sha256: str | None = None) -> InstallRecord:
    """``record`` moved to state ``to``; raises ValueError for a transition the machine lacks.

    ``failed`` and ``rolled_back`` need a ``reason``; the identity fields, once set, stay.
    """
    if to not in TRANSITIONS[record.state]:
        raise ValueError(f"install {record.install_id}: no transition {record.state.value} -> "
                         f"{to.value}")
    if to in (S.FAILED, S.ROLLED_BACK) and not reason:
        raise ValueError(f"install {record.install_id}: {to.value} needs a reason")
    return replace(
        record, state=to,
        model=record.model if model is None else model,
        version=record.version if version is None else version,
        previous_version=(record.previous_version if previous_version is None
                          else previous_version),
        reason=reason, detail=detail,
        bundle_sha256=record.bundle_sha256 if bundle_sha256 is None else bundle_sha256,
        history=(*record.history, (to.value, now)))


def plan_resume(record: InstallRecord) -> tuple[InstallRecord, Step]:
    """After a restart: the record to continue with and the step to take.

    Every step is safe to repeat: downloading and verifying start again from the source,
    activation is re-run from the staged slot (the active pointer is flipped atomically, so it
    names either the old or the new version), and a probation cut short starts again.
    """
    if record.done:
        return record, Step.NOTHING
    if record.state in (S.IDLE, S.DOWNLOADING):
        return record, Step.DOWNLOAD
    if record.state is S.VERIFYING:
        return record, Step.VERIFY
    resumed = replace(record, restarts=record.restarts + 1)
    if record.state is S.STAGED:
        return resumed, Step.ACTIVATE
    if resumed.restarts > MAX_RESTARTS:
        return resumed, Step.ROLL_BACK if record.state is S.PROBATION else Step.FAIL
    return resumed, Step.ACTIVATE if record.state is S.ACTIVATING else Step.PROBATION
