"""The fleet's once-only periodic work, run by the leader among the server processes
(:mod:`fleet_server.leadership`): today telemetry retention.

Every ``interval_s`` the housekeeping thread asks the leadership whether this process
leads and, if so, runs each job with the current time. A job that fails is logged and
tried again next round; it must be safe to run again (retention deletes by age in one
statement, so two leaders overlapping for a moment delete nothing twice).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.periodic import Periodic

from .leadership import Leadership
from .registry import Registry

__all__ = ["Housekeeping", "Job", "retention_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One piece of once-only work: ``run(now)``."""

    name: str
    run: Callable[[float], object]


def retention_job(registry: Registry, keep_s: float) -> Job:
    """Delete telemetry samples older than ``keep_s`` seconds."""
    def prune(now: float) -> None:
        removed = registry.prune_telemetry(before=now - keep_s)
        if removed:
            log.info("retention: removed %d telemetry sample(s) older than %.0f days",
                     removed, keep_s / 86400)
    return Job("telemetry retention", prune)


class Housekeeping:
    """Runs ``jobs`` every ``interval_s`` while ``leadership`` says this process leads."""

    def __init__(self, leadership: Leadership, jobs: Sequence[Job], *,
                 interval_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.leadership = leadership
        self.jobs = tuple(jobs)
        self.interval_s = interval_s
        self.clock = clock
        #: Rounds run as leader, for tests and logs.
        self.rounds = 0
        self._periodic = Periodic("fleet-housekeeping", self._round, interval_s,
                                  wait_first=True)

    def start(self) -> None:
        """Start the thread (nothing to do without jobs)."""
        if self.jobs:
            self._periodic.start()

    def stop(self) -> None:
        """Stop after the job under way. Idempotent."""
        self._periodic.stop()

    def run_once(self) -> bool:
        """One round: the jobs, if this process leads; whether it did."""
        if not self.leadership.is_leader():
            return False
        for job in self.jobs:
            try:
                job.run(self.clock())
            except Exception:
                log.exception("%s failed; retried in %.0f s", job.name, self.interval_s)
        self.rounds += 1
        return True

    def _round(self) -> None:
        self.run_once()  # its answer is for callers; the next round comes in any case
