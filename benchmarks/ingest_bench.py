"""Ingest benchmark: what storing device messages costs the server and its database.

The fleet server's real :class:`fleet_server.ingest.Ingest` (its threads, batches and
registry calls, nothing stubbed) is fed the messages of an install on ``--devices``
enrolled devices, as ``benchmarks/fleet_sim`` sends them: per device 7 events
(``fetch.started`` and the six install states, each numbered), 8 reports (downloading, each
state, the final one) and a telemetry sample, 16 messages, in the order a burst brings them
(every device's first message, then every device's second, ...). They are queued as fast as
the ingest takes them, and the clock stops at the last acknowledgement (after its commit).

Measured: messages per second (wall time: read it with the load average), and the CPU
time per message of this process (every thread: the ingest, the queueing) and of its
PostgreSQL backends (psutil, found by this process's connections' client ports in
``pg_stat_activity``, as ``scale_bench.py`` finds the servers'). Each variant runs in a
child process of its own:

- **base**: the code in ``--baseline-src`` (a plain copy of an older commit:
  ``git archive COMMIT | tar -x -C DIR``), e.g. the per-message ingest before set-based
  storage (548b06b);
- **new**: this checkout's code;
- **new, batched events**: this checkout with each device's 7 events in one
  ``EventBatch`` message (10 messages per device), as an agent sends them to a server that
  advertises the feature.

on PostgreSQL (a fresh schema on ``--pg``, dropped after) and on SQLite (a file in a
temporary directory). The variants take turns ``--repeat`` times; the best of each is
printed (the run least disturbed by other load on the machine).

Run::

    .venv/bin/python benchmarks/ingest_bench.py --devices 2000 --baseline-src /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("EDGEFLEET_TEST_POSTGRES_URL",
                        "postgresql://postgres@127.0.0.1:5432/test")
STATES = ("downloading", "verifying", "staged", "activating", "probation", "committed")
SHA = "ab" * 32


def install_messages(devices: list[str], *, batched: bool) -> list[tuple[str, str, bytes]]:
    """(device, leaf, payload) of every device's install, interleaved across devices."""
    from protocol import messages

    per_device: list[list[tuple[str, str, bytes]]] = []
    for device in devices:
        at = 1_800_000_000.0
        events: list[Any] = [messages.Event("fetch.started", at, {"model": "m", "version": 2},
                                            seq=1)]
        reports = [messages.Reported("x86-64-avx2", "bench", {
            "m": messages.ModelReport(1, "cd" * 32, "committed")}, {
            "m": messages.InstallReport(None, SHA, "downloading", progress=0.0)}, at=at)]
        for n, state in enumerate(STATES):
            at += 0.01
            events.append(messages.Event(f"install.{state}", at, {
                "install_id": f"{device}-1", "model": "m", "version": 2,
                "bundle_sha256": SHA, "reason": None, "detail": None}, seq=n + 2))
            serving = ({"m": messages.ModelReport(2, SHA, state)}
                       if state in ("probation", "committed") else {})
            reports.append(messages.Reported("x86-64-avx2", "bench", serving, {
                "m": messages.InstallReport(2, SHA, state)}, at=at))
        reports.append(messages.Reported("x86-64-avx2", "bench", {
            "m": messages.ModelReport(2, SHA, "committed")}, {
            "m": messages.InstallReport(2, SHA, "committed")}, at=at + 0.01))
        sample = messages.Telemetry(len(events) + 1, at, {"cpu_percent": 12.5, "requests": 7})
        own: list[tuple[str, str, bytes]] = []
        if batched:
            own.append((device, "events", messages.encode(messages.EventBatch(tuple(events)))))
            own += [(device, "reported", messages.encode(r)) for r in reports]
        else:
            for event, report in zip(events, reports, strict=False):
                own += [(device, "events", messages.encode(event)),
                        (device, "reported", messages.encode(report))]
            own.append((device, "reported", messages.encode(reports[-1])))
        own.append((device, "telemetry", messages.encode(sample)))
        per_device.append(own)
    return [m for step in zip(*per_device, strict=True) for m in step]


def postgres_backends() -> list[Any]:
    """The PostgreSQL backends serving this process's connections."""
    import psutil
    import psycopg

    port = urlsplit(PG_URL).port or 5432
    ports = [c.laddr.port for c in psutil.Process().net_connections("tcp")
             if c.raddr and c.raddr.port == port]
    with psycopg.connect(PG_URL, autocommit=True) as db:
        pids = [r[0] for r in db.execute(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)", (ports,))]
    found = []
    for pid in pids:
        with suppress(psutil.NoSuchProcess):
            found.append(psutil.Process(pid))
    return found


def cpu(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def child(src: str, url: str, devices: int, batched: bool) -> dict[str, Any]:
    """One variant's run, in this (child) process with ``src`` first on the path."""
    sys.path.insert(0, src)
    import psutil

    import fleet_server
    from fleet_server.ingest import Inbound, Ingest
    from fleet_server.registry import open_registry

    assert Path(fleet_server.__file__).is_relative_to(src), fleet_server.__file__
    ids = [f"dev-{n:05d}" for n in range(devices + 50)]
    with open_registry(url) as registry:
        for device in ids:
            registry.upsert_device(device, group="bench", profile="x86-64-avx2",
                                   cert_fingerprint="ab" * 32)
        done = threading.Event()
        acked = [0]
        lock = threading.Lock()
        expected = [0]

        def ack(inbound: Any) -> None:
            with lock:
                acked[0] += 1
                if acked[0] == expected[0]:
                    done.set()

        def feed(batch: list[tuple[str, str, bytes]]) -> float:
            expected[0], acked[0] = len(batch), 0
            done.clear()
            inbound = [Inbound(d, leaf, payload, mid, 1, 0)
                       for mid, (d, leaf, payload) in enumerate(batch, 1)]
            start = time.monotonic()
            for item in inbound:
                ingest.put(item)
            done.wait()
            return time.monotonic() - start

        ingest = Ingest(registry, ack)
        ingest.start()
        # Warm-up on devices outside the measured set: every thread's connection opened.
        feed(install_messages(ids[devices:], batched=batched))
        me = psutil.Process()
        backends = postgres_backends() if url.startswith("postgresql") else []
        before = cpu(me), {b.pid: cpu(b) for b in backends}
        batch = install_messages(ids[:devices], batched=batched)
        wall = feed(batch)
        after_backends = postgres_backends() if backends else []
        server_cpu = cpu(me) - before[0]
        backend_cpu = sum(cpu(b) - before[1].get(b.pid, 0.0) for b in after_backends)
        ingest.stop()
        stored = registry.list_devices(group="bench")
        converged = sum(1 for d in stored[:devices]
                        if d.running.get("m") is not None and d.running["m"].version == 2)
        measured = set(ids[:devices])
        agent_events = len([e for e in registry.events(limit=1_000_000)
                            if e.kind.startswith("agent.") and e.device in measured])
    return {"messages": len(batch), "wall_s": wall, "server_cpu_s": server_cpu,
            "backend_cpu_s": backend_cpu, "backends": len(after_backends),
            "converged": converged, "agent_events": agent_events,
            "workers": ingest.workers}


def run_variant(src: Path, database: str, devices: int, batched: bool) -> dict[str, Any]:
    """Run one variant in a child process on a fresh database; its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        if database == "sqlite":
            url = f"sqlite:///{tmp}/fleet.db"
            return _spawn(src, url, devices, batched)
        import psycopg

        schema = f"bench_{secrets.token_hex(6)}"
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
            try:
                separator = "&" if "?" in PG_URL else "?"
                return _spawn(src, f"{PG_URL}{separator}options=-csearch_path%3D{schema}",
                              devices, batched)
            finally:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")


def _spawn(src: Path, url: str, devices: int, batched: bool) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", str(src), url, str(devices),
                           "1" if batched else "0"], capture_output=True, text=True,
                          check=False, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the run of {src} on {url} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, code, url, devices, in_batches = sys.argv
        print(json.dumps(child(code, url, int(devices), in_batches == "1")))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="a copy of the code to compare with (git archive COMMIT)")
    parser.add_argument("--databases", default="postgresql,sqlite")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    variants = [("new", ROOT, False), ("new, batched events", ROOT, True)]
    if args.baseline_src is not None:
        variants.insert(0, ("base", args.baseline_src.resolve(), False))
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {args.devices} devices, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    for database in args.databases.split(","):
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeat):
            for name, src, batched in variants:
                r = run_variant(src, database, args.devices, batched)
                r["load"] = os.getloadavg()[0]
                per = (r["server_cpu_s"] + r["backend_cpu_s"]) / r["messages"]
                if name not in best or per < best[name]["per"]:
                    best[name] = {**r, "per": per}
        print(f"\n{database} ({best[variants[-1][0]]['workers']} ingest thread(s))")
        print("| variant | messages | msg/s | server CPU ms/msg | backend CPU ms/msg | "
              "CPU ms per device (server + backend) | converged / events | load |")
        print("|---|---|---|---|---|---|---|---|")
        for name, _, _ in variants:
            r = best[name]
            n = r["messages"]
            print(f"| {name} | {n} | {n / r['wall_s']:,.0f} | "
                  f"{1000 * r['server_cpu_s'] / n:.3f} | {1000 * r['backend_cpu_s'] / n:.3f} | "
                  f"{1000 * (r['server_cpu_s'] + r['backend_cpu_s']) / args.devices:.2f} | "
                  f"{r['converged']} / {r['agent_events']} | {r['load']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
