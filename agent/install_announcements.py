"""Install transitions announced to the fleet from the install records themselves.

Every install record keeps its history of states; the outbox keeps, per record, a mark of
how many of its entries were announced. :class:`InstallAnnouncer` puts the transitions
after the mark into the outbox with the new mark, in one transaction, so a transition
persisted while no link listened (before it started, or just before a kill) is sent when
it starts, and none is sent twice. :func:`install_events` (*pure*) says which events those
are.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .install_state import InstallRecord
from .outbox import Outbox, OutboxError

__all__ = ["InstallAnnouncer", "clip", "install_events"]

log = logging.getLogger(__name__)
#: Outbox marks of install announcements: this prefix, then the install id.
_INSTALL_MARK = "install/"
#: Characters of a text kept in an event's detail (an error message can be long): a few
#: of them stay well within the server's limit for an event (MAX_EVENT_BYTES).
_MAX_TEXT = 2000


def install_events(record: InstallRecord, announced: int,
                   ) -> list[tuple[str, float, dict[str, Any]]]:
    """The events announcing ``record``'s transitions after the first ``announced`` entries
    of its history (the first entry, ``idle``, is never announced): ``(kind, at, detail)``,
    oldest first, each at the time of its transition. Only the latest carries the record's
    ``reason`` and ``detail``, which belong to its current state."""
    events = []
    last = len(record.history) - 1
    for index in range(max(announced, 1), last + 1):
        state, at = record.history[index]
        events.append((f"install.{state}", at, {
            "install_id": record.install_id, "model": record.model,
            "version": record.version, "bundle_sha256": record.bundle_sha256,
            # What was fetched: a delta bundle (of the release release_sha256) or the full.
            "bundle_size": record.size, "release_sha256": record.release_sha256,
            "reason": clip(record.reason) if index == last else None,
            "detail": clip(record.detail) if index == last else None}))
    return events


def clip(text: str | None) -> str | None:
    """``text`` cut to the length an event's detail keeps."""
    return text if text is None or len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


class InstallAnnouncer:
    """Queues install transitions in ``outbox``; ``queued`` is called after each record
    with new ones (to wake the publisher)."""

    def __init__(self, outbox: Outbox, queued: Callable[[], None]) -> None:
        self.outbox = outbox
        self._queued = queued
        self._lock = threading.Lock()

    def announce_all(self, records: Sequence[InstallRecord]) -> None:
        """Announce what every install record kept says and was not announced yet (oldest
        first), and forget the marks of records that are gone."""
        for record in reversed(records):
            self.announce(record)
        with self._lock:
            self.outbox.forget_marks(_INSTALL_MARK, keep={
                _INSTALL_MARK + record.install_id for record in records})

    def announce(self, record: InstallRecord) -> None:
        """Put ``record``'s transitions not yet announced into the outbox, with the mark
        that says so, in one transaction. If that fails they are announced later, from
        the record, with its next transition or at the next start."""
        key = _INSTALL_MARK + record.install_id
        with self._lock:
            try:
                events = install_events(record, self.outbox.mark(key))
                if events:
                    self.outbox.add_events(events, mark=(key, len(record.history)))
            except (OutboxError, ValueError) as exc:
                log.error("install %s: cannot queue its events (%s); they are sent later, "
                          "from its record", record.install_id, exc)
                return
        self._queued()
