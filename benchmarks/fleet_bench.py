"""Fleet benchmark: one fleet server + one Mosquitto, N simulated devices, one rollout.

The target (docs/benchmarks.md, "Fleet rollout at scale"): on this 2-core machine, one
FleetService with its embedded Mosquitto keeps >= 1,000 simulated devices connected and
rolls a ~1 MB signed bundle out to all of them in under 60 s.

What runs, all on this machine:

- **The server**, in this process: a real :class:`fleet_server.service.FleetService` with
  the embedded Mosquitto (its own process), a SQLite registry and fleet CA in a temporary
  directory, TUF keys made as ``fleet keys init`` makes them (``init_keys``), and a real
  signed bundle whose one artifact is ``--bundle-bytes`` of random bytes declared as an ONNX
  model (transport does not look inside it; ``service.add_bundle`` verifies the signatures).
- **The devices**, in ``--workers`` processes of the fleet simulator
  (``benchmarks/fleet_sim/``: many devices per process in one ``selectors`` loop over
  non-blocking TLS sockets, a minimal MQTT 5 client, on the wire what the agent does). Each
  device is enrolled the way the agent enrolls (a key and CSR from
  ``transport.x509.make_device_key_and_csr``, a one-time token, ``service.enroll``
  in-process rather than over HTTP), then connects over mutual TLS with its own certificate
  (client id = CN, MQTT 5, persistent session, a will, keepalive 60 s: the agent's settings
  from ``transport.mqtt``), subscribes to its ``desired`` and ``inbox/chunks``, and on the
  new desired state fetches the bundle in 256 KiB chunks with the agent's window and
  back-off and reports every install transition (``--chatter minimal``: the last report
  only). Device-local work is skipped (fleet_sim's docstring says what and why); ``--verify``
  runs ``bundle.trust.verify_bundle`` on each device.

Measured: time to enroll and to connect every device (confirmed on the broker's side by
counting its established TCP connections); the rollout time from ``service.publish(sha,
group=...)`` to the registry holding a converged report from every device (the latest
``reported_at``; ``unconverged()`` decides when to stop, asked once a second and, once the
workers say every device has reported, every 50 ms); per-device completion p50/p95; the
time from a chunk request to its answer at the device; bytes moved; CPU and memory of the
broker, the server process (which includes this polling) and the device workers; and, as
the baseline in the same run, the same rollout to a group of 1 and a group of 10 devices
(connected throughout, so the fleet is N + 11 connections).

Run::

    .venv/bin/python benchmarks/fleet_bench.py                  # 1,000 devices
    .venv/bin/python benchmarks/fleet_bench.py --devices 5 --baseline 1   # a quick check

Exit status 0 when every device connected and the rollout converged (the targets are
printed as OK/MISSED beside the figures), 1 otherwise. ``--keep DIR`` keeps the server's
data (registry, Mosquitto's log) for a look afterwards.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import psutil
from fleet_sim.device import CHUNK_BYTES, PROFILE, REQUEST_TIMEOUT_S, WINDOW
from fleet_sim.fixtures import (
    device_specs,
    make_bundle,
    percentile,
    raise_open_files,
    work_dir,
)
from fleet_sim.worker import WorkerConfig, WorkerPool

from common.atomic import write_atomic
from transport.x509 import make_device_key_and_csr

TARGET_DEVICES = 1000
TARGET_ROLLOUT_S = 60.0
FLEET = "bench"
FLEET_GROUP = "fleet"


# --- the parent: server, enrollment, rollouts -----------------------------------------------

@dataclass
class CpuSnapshot:
    at: float
    broker: float
    server: float
    workers: float
    machine_busy: float

    @classmethod
    def take(cls, broker: psutil.Process, workers: list[psutil.Process]) -> CpuSnapshot:
        def used(p: psutil.Process) -> float:
            t = p.cpu_times()
            return float(t.user + t.system)

        machine = psutil.cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return cls(time.monotonic(), used(broker), used(psutil.Process()),
                   sum(used(w) for w in workers), busy)


@dataclass
class Rollout:
    label: str
    devices: int
    seconds: float
    polled_seconds: float
    completions: list[float]
    converged: int
    chunk_bytes: int
    wire_in: int
    refetched: int
    chunk_latencies: list[float]
    cpu: dict[str, float]


class Fleet:
    """The server side of the benchmark and the handles of the worker processes."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.pool = WorkerPool()
        self.groups: dict[str, list[str]] = {}

    @contextmanager
    def running(self) -> Iterator[Fleet]:
        from fleet_server.service import FleetService, ServiceConfig

        keys = self.tmp / "keys"
        self.bundle = make_bundle(keys, self.args.bundle_bytes)
        self.root_json = (keys / "root.json").read_bytes()
        config = ServiceConfig(data_dir=self.tmp / "server", keys_dir=keys, fleet=FLEET,
                               mqtt_port=0, mqtt_bind="127.0.0.1", connect_timeout=30)
        with FleetService(config) as service:
            self.service = service
            # The embedded Mosquitto is this process's child.
            self.broker = next(p for p in psutil.Process().children()
                               if p.name() == "mosquitto")
            try:
                yield self
            finally:
                self.pool.stop()

    def enroll(self) -> float:
        """Enroll every device through the service (as ``edge-agent enroll`` does, minus
        HTTP); returns the seconds it took."""
        sizes = [(f"base{n}", n) for n in self.args.baseline]
        sizes.append((FLEET_GROUP, self.args.devices))
        started = time.perf_counter()
        for group, count in sizes:
            ids = [f"{group}-{i:05d}" for i in range(count)]
            for device_id in ids:
                key_pem, csr_pem = make_device_key_and_csr(device_id)
                token = self.service.issue_token(group, 3600).token
                enrollment = self.service.enroll(token, device_id, csr_pem, PROFILE)
                home = self.tmp / "devices" / device_id
                write_atomic(home / "device.key", key_pem, 0o600)
                write_atomic(home / "device.crt", enrollment.certificate_pem)
                write_atomic(home / "ca.crt", enrollment.ca_certificate_pem)
            self.groups[group] = ids
        return time.perf_counter() - started

    def start_workers(self) -> None:
        ids = [d for group in self.groups.values() for d in group]
        count = max(1, min(self.args.workers, len(ids)))
        address = self.service.broker.address
        self.pool.start([WorkerConfig(address.host, address.port, FLEET,
                                      device_specs(self.tmp, ids[w::count]), self.root_json,
                                      window=self.args.window,
                                      request_timeout=self.args.request_timeout,
                                      chatter=self.args.chatter == "agent",
                                      verify=self.args.verify,
                                      connect_concurrency=self.args.connect_concurrency)
                         for w in range(count)], "fleet-bench-worker")

    def broker_connections(self) -> int:
        """Established TCP connections on the broker's listening port, seen from the broker
        process (the fleet server's own connection included)."""
        port = self.service.broker.address.port
        return sum(1 for c in self.broker.net_connections("tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)

    def rollout(self, group: str, sha: str) -> Rollout:
        """Publish ``sha`` to ``group`` and wait for the registry to show it converged.

        The registry is the judge, but asking it costs the server a read of every device
        under its lock, so it is asked once a second until the workers say all their
        devices have reported, then every 50 ms; the rollout time is the latest
        ``reported_at``, not the moment of the poll."""
        ids = self.groups[group]
        registry = self.service.registry
        workers = self.pool.processes()
        pipes = self.pool.pipes
        for pipe in pipes:
            pipe.send(("watch", f"{group}-", sha))
        before = CpuSnapshot.take(self.broker, workers)
        started = time.time()
        self.service.publish(sha, group=group)
        deadline = time.monotonic() + self.args.timeout
        pending, left, polls = set(pipes), len(ids), 0
        next_poll = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for ready in wait(list(pending), max(0.0, next_poll - time.monotonic())):
                assert isinstance(ready, Connection)
                message = ready.recv()
                assert message[0] == "finished", message
                pending.discard(ready)
            if pending and time.monotonic() < next_poll:
                continue
            left = len(registry.unconverged(group=group))
            if not left:
                break
            if not pending:  # every 50 ms at first, backing off to once a second
                polls += 1
            next_poll = time.monotonic() + (1.0 if pending else min(1.0, 0.05 * 1.5 ** polls))
        polled = time.time() - started
        after = CpuSnapshot.take(self.broker, workers)
        devices = registry.list_devices(group=group)
        done = [d.reported_at - started for d in devices
                if d.converged and d.reported_at is not None]
        results, _ = self.pool.collect()
        members = set(ids)
        mine = [r for r in results if r["device"] in members and r["sha256"] == sha]
        wall = after.at - before.at
        cpu = {"broker": after.broker - before.broker, "server": after.server - before.server,
               "devices": after.workers - before.workers,
               "machine": after.machine_busy - before.machine_busy, "wall": wall}
        seconds = max(done) if len(done) == len(ids) else float("inf")
        return Rollout(group, len(ids), seconds, polled, done, len(ids) - left,
                       sum(r["chunk_bytes"] for r in mine), sum(r["wire_in"] for r in mine),
                       sum(r["refetched"] for r in mine),
                       [x for r in mine for x in r["latencies"]], cpu)


# --- output ---------------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_rollout(r: Rollout, baseline: Rollout | None) -> None:
    cpu = r.cpu
    wall = cpu["wall"] or 1.0
    ratio = f", {r.seconds / baseline.seconds:.1f}x the {baseline.devices}-device rollout" \
        if baseline and baseline.seconds else ""
    print(f"  {r.label}: {r.devices} device(s), converged {r.converged}; rollout "
          f"{r.seconds:.2f} s{ratio} (polled: {r.polled_seconds:.2f} s)")
    done = r.completions
    print(f"    per device, publish -> converged report stored: p50 {percentile(done, 50):.2f} "
          f"s, p95 {percentile(done, 95):.2f} s, max {percentile(done, 100):.2f} s")
    lat = r.chunk_latencies
    print(f"    chunk request -> answer at the device: p50 {percentile(lat, 50) * 1e3:.0f} ms, "
          f"p95 {percentile(lat, 95) * 1e3:.0f} ms, max {percentile(lat, 100) * 1e3:.0f} ms "
          f"({len(lat)} chunks)")
    print(f"    bundle bytes delivered {_mb(r.chunk_bytes)}, MQTT bytes received by devices "
          f"{_mb(r.wire_in)}, re-requested {_mb(r.refetched)}; "
          f"{r.chunk_bytes / 1e6 / max(r.seconds, 1e-9):,.1f} MB/s")
    print(f"    CPU seconds over {wall:.2f} s: broker {cpu['broker']:.2f} "
          f"({cpu['broker'] / wall:.0%} of a core), server {cpu['server']:.2f} "
          f"({cpu['server'] / wall:.0%}), devices {cpu['devices']:.2f} "
          f"({cpu['devices'] / wall:.0%}); whole machine busy {cpu['machine']:.2f} of "
          f"{wall * (os.cpu_count() or 1):.2f} (others: "
          f"{cpu['machine'] - cpu['broker'] - cpu['server'] - cpu['devices']:.2f})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=TARGET_DEVICES,
                        help="devices in the rolled-out group (default %(default)s)")
    parser.add_argument("--baseline", type=lambda s: [int(x) for x in s.split(",") if x],
                        default=[1, 10], help="sizes of the baseline groups (default 1,10)")
    parser.add_argument("--bundle-bytes", type=int, default=1 << 20,
                        help="size of the bundle's artifact (default 1 MiB)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="device worker processes (default: one per core)")
    parser.add_argument("--window", type=int, default=WINDOW,
                        help="chunk requests outstanding per device (agent: 4)")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S,
                        help="re-ask a chunk unanswered this long (agent: 5 s)")
    parser.add_argument("--chatter", choices=("agent", "minimal"), default="agent",
                        help="agent: the agent's events and reports per install; minimal: "
                             "only the final report")
    parser.add_argument("--verify", action="store_true",
                        help="devices also verify the bundle's signatures (verify_bundle)")
    parser.add_argument("--connect-concurrency", type=int, default=32,
                        help="connections each worker opens at once")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="give up on a rollout after this many seconds")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep the server's data (registry, broker log) in DIR, which "
                             "must not exist")
    return parser.parse_args(argv)


def print_targets(args: argparse.Namespace, connected: int, connected_ok: bool,
                  rollout: Rollout, bundle_size: int) -> None:
    def verdict(ok: bool) -> str:
        if args.devices < TARGET_DEVICES:
            return f"not measured (--devices {args.devices} < {TARGET_DEVICES:,})"
        return "OK" if ok else "MISSED"

    print("\ntargets")
    print(f"  devices connected at once: {connected} (target >= {TARGET_DEVICES:,}) "
          f"{verdict(connected_ok and connected >= TARGET_DEVICES)}")
    print(f"  rollout of a {bundle_size / 1e6:.2f} MB bundle to {rollout.devices} devices: "
          f"{rollout.seconds:.2f} s (target < {TARGET_ROLLOUT_S:.0f} s) "
          f"{verdict(rollout.converged == rollout.devices and rollout.seconds < TARGET_ROLLOUT_S)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    total = args.devices + sum(args.baseline)
    # Mosquitto needs one descriptor per connection plus its own few; it inherits ours.
    before, soft, hard = raise_open_files(total + 64)
    print(f"fleet rollout benchmark: {args.devices} devices (+ baseline groups "
          f"{', '.join(map(str, args.baseline))}), bundle artifact {args.bundle_bytes:,} "
          f"bytes, window {args.window} x {CHUNK_BYTES // 1024} KiB, chatter {args.chatter}"
          f"{', verify' if args.verify else ''}, {args.workers} worker process(es); "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    print("  devices skip the agent's device-local work: fsync of each chunk, "
          f"{'' if args.verify else 'signature check (--verify), '}model load, probation")
    print(f"  open-file limit: soft {before} -> {soft}, hard {hard}", end="")
    if soft < total + 64:
        print(f": TOO LOW for {total} connections (the broker needs one descriptor each); "
              "raise the hard limit (ulimit -Hn) to measure the target")
    else:
        print(f": enough for {total} connections")

    with work_dir(args.keep) as tmp, Fleet(args, tmp).running() as fleet:
        record = fleet.service.add_bundle(fleet.bundle)
        print(f"  bundle {record.sha256[:12]}: {record.size:,} bytes "
              f"({-(-record.size // CHUNK_BYTES)} chunks), verified and stored by the server")
        enroll_s = fleet.enroll()
        print(f"  enrolled {total} devices through service.enroll in {enroll_s:.1f} s "
              f"({total / enroll_s:.0f}/s)")
        fleet.start_workers()
        connect_s, ready, failed = fleet.pool.connect()
        on_broker = fleet.broker_connections() - 1  # minus the fleet server's own
        print(f"  connected {ready}/{total} devices (mutual TLS, subscribed) in "
              f"{connect_s:.2f} s; the broker counts {on_broker} device connections "
              f"(its open-file limit: {fleet.broker.rlimit(resource.RLIMIT_NOFILE)[0]})")
        for device_id, why in failed[:5]:
            print(f"    {device_id}: {why}")
        baselines = []
        for n in args.baseline:
            result = fleet.rollout(f"base{n}", record.sha256)
            print_rollout(result, None)
            baselines.append(result)
        main_result = fleet.rollout(FLEET_GROUP, record.sha256)
        print_rollout(main_result, baselines[0] if baselines else None)
        for base in baselines[1:]:
            if base.seconds:
                print(f"    vs the {base.devices}-device rollout: "
                      f"{main_result.seconds / base.seconds:.1f}x the time for "
                      f"{main_result.devices / base.devices:.0f}x the devices")
        _, errors = fleet.pool.collect()
        for device_id, why in errors[:5]:
            print(f"    device error {device_id}: {why}")
        rss = {name: sum(p.memory_info().rss for p in procs) / 2**20 for name, procs in (
            ("broker", [fleet.broker]), ("server", [psutil.Process()]),
            ("devices", fleet.pool.processes()))}
        print(f"  resident memory after the rollout: broker {rss['broker']:.0f} MB, server "
              f"{rss['server']:.0f} MB, device workers {rss['devices']:.0f} MB")

    connected_ok = ready == total and on_broker >= total
    print_targets(args, ready, connected_ok, main_result, record.size)
    return 0 if connected_ok and main_result.converged == main_result.devices else 1


if __name__ == "__main__":
    sys.exit(main())
