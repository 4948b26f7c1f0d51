"""The ingest threads on a real registry: a device looping on bad messages; on PostgreSQL,
several threads keeping each device's messages in order."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from fleet_server.ingest import (
    PROTOCOL_ERROR,
    PROTOCOL_ERRORS_PER_MINUTE,
    WORKERS,
    Inbound,
    Ingest,
)
from fleet_server.registry import open_registry
from protocol import messages


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


def test_a_device_s_messages_keep_their_order_across_ingest_threads(db_url: str) -> None:
    # On PostgreSQL several threads store at once (fleet_server/ingest.py): a device's
    # messages must still be stored in order (its last report wins) and each exactly once.
    acked: list[int] = []
    threads: set[str] = set()

    def ack(inbound: Inbound) -> None:
        threads.add(threading.current_thread().name)
        acked.append(inbound.mid)

    with open_registry(db_url) as registry:
        devices = [f"gw-{n}" for n in range(12)]
        for device in devices:
            registry.upsert_device(device, group="lab", profile="x86-64-avx2",
                                   cert_fingerprint="ab" * 32)
        ingest = Ingest(registry, ack)
        ingest.start()
        mid = 0
        for seq in range(1, 21):
            for device in devices:
                mid += 1
                ingest.put(Inbound(device, "events", messages.encode(
                    messages.Event("install.tick", 1000.0 + seq, {}, seq=seq)), mid, 1, 0))
                mid += 1
                ingest.put(Inbound(device, "reported", messages.encode(messages.Reported(
                    "x86-64-avx2", "test", {"m": messages.ModelReport(seq, "ab" * 32,
                                                                      "committed")},
                    {}, at=1000.0 + seq)), mid, 1, 0))
        ingest.stop()
        assert sorted(acked) == list(range(1, mid + 1))
        expected = WORKERS if registry.concurrent_writers else 1
        assert len(threads) == expected
        for device in devices:
            stored = registry.get_device(device)
            assert stored is not None
            assert stored.running["m"].version == 20
            ticks = [e.detail["device_at"] for e in registry.events(device=device)
                     if e.kind == "agent.install.tick"]
            assert ticks == [1000.0 + seq for seq in range(1, 21)]
