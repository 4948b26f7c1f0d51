"""Monitoring benchmark: what the time series cost the fleet server, on SQLite and PostgreSQL.

Three questions, each measured in one run against its own baseline:

- **ingest**: a batch of 200 telemetry samples (the contract's format: one model with a
  latency histogram and the monitor's drift) stored in one transaction as the ingest
  thread does, with ``add_telemetry`` alone (the baseline: what ingest did before) and with
  the monitor's fold into the minute series after each new sample (``Monitor.observe``).
  The two take turns, round after round, so other load on the machine falls on both alike.
- **scrape**: one ``/metrics`` exposition and one ``/api/metrics`` (sums per group, model
  and version over an hour), with ``--devices`` devices that each sent a sample a minute
  for ``--minutes`` minutes.
- **evaluate**: one round of the default alert rules over the same fleet.

Run::

    .venv/bin/python benchmarks/monitoring_bench.py                       # 1,000 devices
    .venv/bin/python benchmarks/monitoring_bench.py --devices 200 --minutes 10 --repeat 5
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from fleet_server.monitoring.config import MonitoringConfig  # noqa: E402
from fleet_server.monitoring.monitor import Monitor  # noqa: E402
from fleet_server.monitoring.prometheus import IngestFigures, exposition  # noqa: E402
from fleet_server.registry import Registry, open_registry  # noqa: E402
from protocol.messages import Telemetry  # noqa: E402
from tests.postgres import PG_URL, with_search_path  # noqa: E402

BATCH = 200


def sample_metrics(k: int) -> dict[str, Any]:
    """A sample as an agent with the monitor sends it."""
    return {"interval_s": 30.0, "latency_buckets_ms": [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25,
                                                       50, 100, 250, 1000],
            "models": {"digits": {
                "version": 1 + k % 2, "state": "serving", "requests": 300, "errors": k % 3,
                "p50_ms": 0.7, "p99_ms": 2.0,
                "latency_hist": [0, 0, 0, 10, 250, 30, 10, 0, 0, 0, 0, 0, 0, 0],
                "monitor": {"version": 1 + k % 2, "sampled": 15,
                            "inputs": {"input": {"counts": [9] * 10, "psi": 0.02, "ks": 0.01}},
                            "outputs": {"logits": {"kind": "classes", "counts": [1] * 10,
                                                   "confidence_mean": 0.9,
                                                   "entropy_mean": 0.2, "psi": 0.5}},
                            "drift": {"psi": 0.5, "ks": 0.01, "worst": "output:logits"}}}}}


@contextlib.contextmanager
def databases(which: list[str]) -> Iterator[list[tuple[str, str]]]:
    """(name, URL) of a fresh SQLite file and a fresh PostgreSQL schema."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        found = []
        if "sqlite" in which:
            found.append(("SQLite", f"sqlite:///{tmp}/bench.db"))
        if "postgresql" in which:
            admin = stack.enter_context(psycopg.connect(PG_URL, autocommit=True))
            schema = f"bench_{secrets.token_hex(4)}"
            admin.execute(f"CREATE SCHEMA {schema}")
            stack.callback(admin.execute, f"DROP SCHEMA {schema} CASCADE")
            found.append(("PostgreSQL", with_search_path(PG_URL, schema)))
        yield found


def best_and_median(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times)


def enroll(registry: Registry, devices: int) -> list[str]:
    ids = [f"gw-{i:05d}" for i in range(devices)]
    with registry.batch():
        for i, device in enumerate(ids):
            registry.upsert_device(device, group=f"g{i % 10}", profile="x86-64-avx2",
                                   cert_fingerprint="ab" * 32)
    return ids


def bench_ingest(registry: Registry, monitor: Monitor, ids: list[str],
                 repeat: int) -> dict[str, list[float]]:
    seq = iter(range(1, 10**9))
    times: dict[str, list[float]] = {"baseline": [], "with series": []}

    def batch(fold: bool) -> None:
        # As fleet_server.ingest does: the new samples folded once, at the batch's end.
        with registry.batch():
            new = []
            for i in range(BATCH):
                device = ids[i % len(ids)]
                sample = Telemetry(next(seq), time.time(), sample_metrics(i))
                if registry.add_telemetry(device, [sample]):
                    new.append((device, sample))
            if fold:
                monitor.observe(new)

    for round_ in range(repeat):
        for name in (("baseline", "with series") if round_ % 2 else
                     ("with series", "baseline")):
            started = time.perf_counter()
            batch(name == "with series")
            times[name].append(time.perf_counter() - started)
    return times


def fill(registry: Registry, monitor: Monitor, ids: list[str], minutes: int) -> None:
    now = time.time()
    seq = 10**9
    for minute in range(minutes):
        with registry.batch():
            new = []
            for i, device in enumerate(ids):
                seq += 1
                sample = Telemetry(seq, now - (minutes - minute) * 60, sample_metrics(i))
                registry.add_telemetry(device, [sample])
                new.append((device, sample))
            monitor.observe(new)


def scrape_figures(monitor: Monitor, repeat: int) -> str:
    """Times of one /metrics, one /api/metrics and one round of the alert rules."""
    def ingest() -> IngestFigures:
        return IngestFigures(0, 0.0)

    scrape = best_and_median(lambda: exposition(monitor, ingest), repeat)
    totals = best_and_median(lambda: monitor.totals(3600, ("group", "model", "version")),
                             repeat)
    rules = best_and_median(monitor.evaluate_once, repeat)
    size = len(exposition(monitor, ingest))
    return (f"/metrics {scrape[0] * 1e3:.1f} / {scrape[1] * 1e3:.1f} ms ({size} bytes), "
            f"/api/metrics (1 h, by group, model, version) {totals[0] * 1e3:.1f} / "
            f"{totals[1] * 1e3:.1f} ms, alert rules {rules[0] * 1e3:.1f} / "
            f"{rules[1] * 1e3:.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--db", action="append", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    with databases(args.db or ["sqlite", "postgresql"]) as found:
        for name, url in found:
            registry = open_registry(url)
            try:
                monitor = Monitor(registry, MonitoringConfig(), offline_after_s=180)
                ids = enroll(registry, args.devices)
                times = bench_ingest(registry, monitor, ids, args.repeat)
                base_best, base_median = min(times["baseline"]), statistics.median(
                    times["baseline"])
                with_best, with_median = min(times["with series"]), statistics.median(
                    times["with series"])
                print(f"{name}: ingest of {BATCH} samples, best / median of {args.repeat}: "
                      f"baseline {base_best * 1e3:.1f} / {base_median * 1e3:.1f} ms, with "
                      f"series {with_best * 1e3:.1f} / {with_median * 1e3:.1f} ms "
                      f"({with_best / base_best:.2f}x / {with_median / base_median:.2f}x)")
                fill(registry, monitor, ids, args.minutes)
                report = scrape_figures(monitor, args.repeat)
                print(f"{name}: {args.devices} devices x {args.minutes} min of minute points, "
                      f"best / median of {args.repeat}: {report}")
            finally:
                registry.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
