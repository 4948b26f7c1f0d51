"""The ingest threads on a real registry: a device looping on bad messages; on PostgreSQL,
several threads keeping each device's messages in order; event batches; a bad message
among good ones; PostgreSQL going away while messages flow; with the service and a real
Mosquitto, a flooding device held to its allowance."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from fleet_server.ingest import (
    PROTOCOL_ERROR,
    PROTOCOL_ERRORS_PER_MINUTE,
    RATE_LIMITED,
    WORKERS,
    Inbound,
    Ingest,
)
from fleet_server.registry import Registry, open_registry
from fleet_server.service import FleetService
from protocol import messages
from tests.bundle.repo import Repo
from tests.fleet_server.server_env import (
    connect_device,
    enroll,
    service_config,
    wait_until,
    write_keys,
)
from tests.mqtt_broker import Recorder
from tests.postgres import postgres_schema
from tests.tcp_proxy import tcp_proxy


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


def _enrolled(db_url: str, *devices: str) -> Registry:
    registry = open_registry(db_url)
    for device in devices:
        registry.upsert_device(device, group="lab", profile="x86-64-avx2",
                               cert_fingerprint="ab" * 32)
    return registry


def _run(registry: Registry, batch: list[Inbound]) -> list[int]:
    """Store ``batch`` (queued before the threads start: one batch per thread); the mids
    acknowledged."""
    acked: list[int] = []
    ingest = Ingest(registry, lambda inbound: acked.append(inbound.mid))
    for inbound in batch:
        ingest.put(inbound)
    ingest.start()
    ingest.stop()
    return sorted(acked)


def test_an_event_batch_is_stored_whole_each_event_once(db_url: str) -> None:
    events = tuple(messages.Event(f"install.{state}", 100.0 + n, {"n": n}, seq=n + 1)
                   for n, state in enumerate(("staged", "verifying", "committed")))
    batch = messages.encode(messages.EventBatch(events))
    single = messages.encode(messages.Event("install.staged", 100.0, {"n": 0}, seq=1))
    with _enrolled(db_url, "gw-0") as registry:
        # The batch, a re-delivery of it, and one of its events sent alone again.
        assert _run(registry, [Inbound("gw-0", "events", batch, 1, 1, 0),
                               Inbound("gw-0", "events", batch, 2, 1, 0),
                               Inbound("gw-0", "events", single, 3, 1, 0)]) == [1, 2, 3]
        assert _run(registry, [Inbound("gw-0", "events", batch, 4, 1, 0)]) == [4]
        stored = [(e.kind, e.detail) for e in registry.events(device="gw-0")
                  if e.kind.startswith("agent.")]
        assert stored == [(f"agent.{e.kind}", {"n": n, "device_at": 100.0 + n})
                          for n, e in enumerate(events)]
        device = registry.get_device("gw-0")
        assert device is not None
        assert device.online


def test_a_bad_message_in_the_middle_of_a_batch_is_recorded_and_the_others_stored(
        db_url: str) -> None:
    def report(version: int, at: float) -> bytes:
        return messages.encode(messages.Reported("x86-64-avx2", "test", {
            "m": messages.ModelReport(version, "ab" * 32, "committed")}, {}, at=at))

    sample = messages.encode(messages.Telemetry(7, 100.0, {"cpu_percent": 1.0}))
    with _enrolled(db_url, "gw-0", "gw-1") as registry:
        acked = _run(registry, [
            Inbound("gw-0", "reported", report(1, 100.0), 1, 1, 0),
            Inbound("gw-0", "events", b'{"kind": "install.staged"', 2, 1, 0),  # cut short
            Inbound("gw-1", "reported", report(5, 100.0), 3, 1, 0),
            Inbound("gw-0", "telemetry", sample, 4, 1, 0),
            Inbound("gw-9", "reported", report(1, 100.0), 5, 1, 0),  # never enrolled
            Inbound("gw-0", "reported", report(2, 101.0), 6, 1, 0)])  # the newest wins
        assert acked == [1, 2, 3, 4, 5, 6]
        running = {d.id: d.running["m"].version for d in registry.list_devices()}
        assert running == {"gw-0": 2, "gw-1": 5}
        assert [r.sample.seq for r in registry.telemetry("gw-0")] == [7]
        errors = {str(e.device): e.detail for e in registry.events() if e.kind == PROTOCOL_ERROR}
        assert sorted(errors) == ["gw-0", "gw-9"]
        assert errors["gw-0"]["topic"] == "events"
        assert "unknown device 'gw-9'" in errors["gw-9"]["error"]


def test_a_failed_batch_is_stored_message_by_message(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # Monitoring failing fails the batch's transaction: each message is then stored on its
    # own, and the failure costs only the time series.
    def broken(samples: list[tuple[str, messages.Telemetry]]) -> None:
        raise RuntimeError("the time series are broken")

    with _enrolled(db_url, "gw-0") as registry:
        acked: list[int] = []
        ingest = Ingest(registry, lambda inbound: acked.append(inbound.mid), broken)
        for seq in (1, 2):
            ingest.put(Inbound("gw-0", "telemetry", messages.encode(
                messages.Telemetry(seq, 100.0, {"n": seq})), seq, 1, 0))
        ingest.put(Inbound("gw-0", "events", b"[]", 3, 1, 0))
        with caplog.at_level(logging.WARNING, logger="fleet_server.ingest"):
            ingest.start()
            ingest.stop()
        assert sorted(acked) == [1, 2, 3]
        assert [r.sample.seq for r in registry.telemetry("gw-0")] == [1, 2]
        assert [e.detail["topic"] for e in registry.events(device="gw-0")
                if e.kind == PROTOCOL_ERROR] == ["events"]
        logged = [r.getMessage() for r in caplog.records]
        assert any("storing them one by one" in m for m in logged)
        assert sum("failed to handle telemetry from gw-0" in m for m in logged) == 2


@pytest.mark.integration
def test_nothing_is_acknowledged_before_it_is_stored_while_postgresql_goes_away(
        caplog: pytest.LogCaptureFixture) -> None:
    # The registry reaches PostgreSQL through a proxy cut for 3 s while one device
    # sends numbered telemetry and events: every message must be stored exactly once, and
    # each acknowledged only once it is in the database (checked, at each acknowledgement,
    # on a connection that does not go through the proxy).
    with postgres_schema() as (direct_url, _):
        parts = urlsplit(direct_url)
        with _enrolled(direct_url, "gw-0") as direct, \
                tcp_proxy((parts.hostname or "127.0.0.1", parts.port or 5432)) as proxy:
            proxied = urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{proxy.port}"))
            unstored: list[int] = []
            acked: list[int] = []

            def ack(inbound: Inbound) -> None:
                seq = inbound.mid
                if inbound.leaf == "telemetry":
                    stored = [r.sample.seq for r in direct.telemetry("gw-0", since_seq=seq - 1,
                                                                     limit=1)] == [seq]
                else:
                    stored = any(e.detail.get("n") == seq
                                 for e in direct.events(device="gw-0", newest=True, limit=50))
                if not stored:
                    unstored.append(seq)
                acked.append(seq)

            with open_registry(proxied) as registry, \
                    caplog.at_level(logging.WARNING, logger="fleet_server.ingest"):
                ingest = Ingest(registry, ack)
                ingest.start()
                sent = 0
                for seq in range(1, 121):
                    # 1.5 s of connections killed as they are used (as pg_terminate_backend
                    # in a loop), then 1.5 s of refused connections.
                    if 20 <= seq < 80:
                        proxy.cut()
                    if seq < 50 or seq == 80:
                        proxy.restore()
                    if seq % 3:
                        payload = messages.encode(messages.Telemetry(seq, 100.0 + seq,
                                                                     {"n": seq}))
                        ingest.put(Inbound("gw-0", "telemetry", payload, seq, 1, 0))
                    else:
                        payload = messages.encode(messages.Event("install.tick", 100.0 + seq,
                                                                 {"n": seq}, seq=seq))
                        ingest.put(Inbound("gw-0", "events", payload, seq, 1, 0))
                    sent += 1
                    time.sleep(0.05)
                # The next try after the outage may be up to OUTAGE_MAX_WAIT_S away.
                wait_until(lambda: len(acked) == sent, "every message stored", timeout=60)
                ingest.stop()
            assert unstored == []
            assert sorted(acked) == list(range(1, sent + 1))
            samples = [r.sample.seq for r in direct.telemetry("gw-0")]
            assert samples == [seq for seq in range(1, sent + 1) if seq % 3]
            ticks = [e.detail["n"] for e in direct.events(device="gw-0")
                     if e.kind == "agent.install.tick"]
            assert ticks == [seq for seq in range(1, sent + 1) if not seq % 3]
    logged = [r.getMessage() for r in caplog.records]
    assert sum("database is unavailable" in m for m in logged) == 1
    assert sum("database is back" in m for m in logged) == 1


@pytest.mark.integration
def test_a_flooding_device_is_bounded_while_another_s_messages_flow(
        tmp_path: Path, db_url: str, repo: Repo, clients: list[Recorder]) -> None:
    rate, burst = 5.0, 20.0
    config = service_config(tmp_path / "server", write_keys(tmp_path / "keys", repo), db_url,
                            telemetry_rate=rate, telemetry_burst=burst)
    flood = 600
    with FleetService(config) as service:
        flooder, calm = (enroll(service, tmp_path, name) for name in ("flooder", "calm"))
        r_flood, r_calm = connect_device(flooder, clients), connect_device(calm, clients)
        started = time.monotonic()
        mids = [r_flood.client.publish(flooder.topic("telemetry"), messages.encode(
            messages.Telemetry(seq, 100.0 + seq, {"n": seq})), qos=1).mid
            for seq in range(1, flood + 1)]
        for seq in range(1, 11):  # meanwhile, within its allowance
            r_calm.publish(calm.topic("telemetry"), messages.encode(
                messages.Telemetry(seq, 100.0 + seq, {"n": seq})))
        r_flood.wait(lambda: all(mid in r_flood._pubacks for mid in mids), "every PUBACK")
        registry = service.registry
        wait_until(lambda: len(registry.telemetry("calm")) == 10, "the calm device's samples")
        # Each message of the flood is either stored or dropped (and acknowledged, so the
        # broker holds none of it for the server).
        wait_until(lambda: len(registry.telemetry("flooder", limit=flood))
                   + service.ingest.dropped == flood, "the flood stored or dropped")
        elapsed = time.monotonic() - started
        stored = len(registry.telemetry("flooder", limit=flood))
        assert stored <= burst + rate * elapsed + 1
        assert service.ingest.dropped > 0
    with open_registry(db_url) as registry:
        limited = [e for e in registry.events(device="flooder") if e.kind == RATE_LIMITED]
        assert [e.detail for e in limited] == [{"dropped": {"telemetry": flood - stored}}]
        assert not [e for e in registry.events(device="calm") if e.kind == RATE_LIMITED]
