"""The ingest thread on a real SQLite registry: a device looping on bad messages."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fleet_server.ingest import PROTOCOL_ERROR, PROTOCOL_ERRORS_PER_MINUTE, Inbound, Ingest
from fleet_server.registry import open_registry


def test_a_flood_of_bad_messages_is_recorded_and_logged_within_a_budget(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    acked: list[int] = []
    with open_registry(str(tmp_path / "fleet.db"), blob_dir=tmp_path / "blobs") as registry:
        ingest = Ingest(registry, lambda inbound: acked.append(inbound.mid))
        ingest.start()
        flood = 500
        with caplog.at_level(logging.WARNING, logger="fleet_server.ingest"):
            for mid in range(flood):
                ingest.put(Inbound("gw-1", "reported", b"{not json", mid, 1, 0))
            ingest.stop()
        assert sorted(acked) == list(range(flood))  # every one acknowledged, none stuck
        recorded = [e for e in registry.events(device="gw-1") if e.kind == PROTOCOL_ERROR]
        assert len(recorded) == PROTOCOL_ERRORS_PER_MINUTE
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == PROTOCOL_ERRORS_PER_MINUTE
    assert "further ones this minute are counted, not logged" in warnings[-1]
