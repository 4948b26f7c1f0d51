"""Scale-out benchmark: two ``fleet serve`` processes on one PostgreSQL and one Mosquitto,
many simulated devices, a bundle over HTTP against over MQTT chunks, telemetry ingest with
two server processes against one (issue 16; docs/scale.md, docs/benchmarks.md).

What runs, all on this machine:

- **Mosquitto** (2.x) started here, TLS with required client certificates, the ACL of
  ``fleet_server.broker_config.render_acl`` with two server identities (``fleet-server-a``,
  ``-b``): what an operator's external broker would be.
- **Two server processes**, ``fleet serve --instance a|b --shared-subscriptions
  --bundle-port 0 --broker-url ... --db postgresql://...``, on one fresh PostgreSQL schema,
  sharing one fleet CA (copied) and the keys directory.
- **The devices**: the load generator of ``benchmarks/fleet_bench.py`` (many devices per
  worker process in one selector loop, mutual TLS with each device's own certificate, MQTT
  5, the agent's chunk fetch and reports), extended here: a device of the ``http`` group
  downloads the bundle from the first URL of its desired state (the server's endpoint,
  with its client certificate; range requests to resume), on a small thread pool per
  worker, and falls back to chunks as the agent does; a device of the ``mqtt`` group ignores
  the URLs. Certificates are pre-issued (key and CSR made as the agent makes them, signed
  by the fleet CA, recorded with a one-time token in the registry), which is enrollment
  minus its HTTP round trip.

Measured: devices connected and how long it took; server and broker resident memory and
CPU per 1,000 connected devices (idle for ``--idle`` seconds, server ``a`` alone);
telemetry ingest: every device sends ``--telemetry`` samples at once, timed until
PostgreSQL holds all, with server ``a`` alone, then with ``b`` too; then a
``--bundle-bytes`` bundle rolled out to ``--rollout`` devices over MQTT chunks, then to as
many others over HTTP (time to the registry showing all converged, bytes re-requested, CPU
of broker and servers).

Run::

    .venv/bin/python benchmarks/scale_bench.py --devices 10000
    .venv/bin/python benchmarks/scale_bench.py --devices 50 --rollout 5 --bundle-bytes 65536

Exit status 0 when every device connected and both rollouts converged.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import http.client
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg
from fleet_bench import (
    PROFILE,
    Device,
    DeviceSpec,
    Fetch,
    Worker,
    WorkerConfig,
    WorkerPool,
    device_specs,
    make_bundle,
    percentile,
    raise_open_files,
    work_dir,
)

from fleet_server.broker import Broker, BrokerConfig
from fleet_server.ca import FleetCA
from fleet_server.registry import open_registry
from protocol import messages
from transport.x509 import certificate_fingerprint, make_device_key_and_csr

ROOT = Path(__file__).resolve().parents[1]
FLEET = "bench"
PG_URL = os.environ.get("EDGEFLEET_TEST_POSTGRES_URL",
                        "postgresql://postgres@127.0.0.1:5432/test")
INSTANCES = ("a", "b")
HTTP_THREADS = 8
HTTP_ATTEMPTS = 5


# --- devices: the fleet_bench load generator, with HTTP downloads ---------------------------

def http_download(url: str, context: ssl.SSLContext, size: int,
                  ) -> tuple[Any, int, int]:
    """GET ``url`` whole, resuming with Range after a broken connection: (sha256 hasher,
    body bytes received, bytes received again). Bounded by ``size``; raises OSError or
    HTTPException when it cannot finish."""
    parts = urlsplit(url)
    hasher = hashlib.sha256()
    have = received = 0
    for attempt in range(HTTP_ATTEMPTS):
        connection = http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                                 context=context, timeout=60)
        try:
            connection.request("GET", parts.path,
                               headers={"Range": f"bytes={have}-"} if have else {})
            response = connection.getresponse()
            if response.status not in (200, 206):
                raise http.client.HTTPException(f"answered {response.status}")
            while have < size:
                data = response.read1(min(1 << 18, size - have))
                if not data:
                    break
                hasher.update(data)
                have += len(data)
                received += len(data)
            if have >= size:
                return hasher, received, received - size
        except (OSError, http.client.HTTPException):
            if attempt == HTTP_ATTEMPTS - 1:
                raise
        finally:
            connection.close()
    raise http.client.HTTPException(f"stopped at byte {have} of {size}")


class HttpDevice(Device):
    """A device that downloads its bundle over HTTP when its group says so."""

    worker: ScaleWorker

    def __init__(self, spec: DeviceSpec, worker: Worker) -> None:
        super().__init__(spec, worker)
        self.download: concurrent.futures.Future[tuple[Any, int, int]] | None = None
        self.http_failed: set[str] = set()

    def _urls(self, fetch: Fetch) -> tuple[str, ...]:
        if not self.id.startswith("http-") or self.desired is None:
            return ()
        want = self.desired.models.get(fetch.model)
        return want.urls if want is not None and want.bundle_sha256 == fetch.sha256 else ()

    def request_chunks(self) -> None:
        fetch = self.fetch
        if fetch is None or self.download is not None:
            return
        urls = self._urls(fetch)
        if urls and fetch.sha256 not in self.http_failed:
            self.download = self.worker.pool.submit(
                http_download, urls[0], self.worker.context(self.spec), fetch.size)
            return
        super().request_chunks()

    def tick(self, now: float) -> None:
        download, fetch = self.download, self.fetch
        if download is not None and download.done() and fetch is not None:
            self.download = None
            try:
                hasher, received, again = download.result()
            except (OSError, http.client.HTTPException) as exc:
                self.http_failed.add(fetch.sha256)
                self.error = f"HTTP download failed, chunks instead: {exc}"
            else:
                fetch.hasher, fetch.have = hasher, fetch.size
                fetch.chunk_bytes, fetch.refetched = received, again
                self._finish(fetch)
        super().tick(now)


class ScaleWorker(Worker):
    """fleet_bench's worker with HTTP devices and a ``telemetry`` command."""

    device_class = HttpDevice

    def __init__(self, config: WorkerConfig, pipe: Connection) -> None:
        super().__init__(config, pipe)
        self.pool = concurrent.futures.ThreadPoolExecutor(HTTP_THREADS)

    def command(self, command: str, args: list[Any]) -> None:
        if command != "telemetry":
            super().command(command, args)
            return
        count, first_seq = args
        sent = 0
        for device in self.devices:
            if device.state != "ready":
                continue
            for seq in range(first_seq, first_seq + count):
                device.publish("telemetry", messages.encode(messages.Telemetry(
                    seq, time.time(), {"cpu_percent": 12.5, "requests": seq})))
                sent += 1
        self.pipe.send(("telemetry", sent))


def scale_worker_main(config: WorkerConfig, pipe: Connection) -> None:
    """Entry point of a worker process."""
    with suppress(KeyboardInterrupt):
        ScaleWorker(config, pipe).run()


# --- the servers ------------------------------------------------------------------------------

@dataclass
class Usage:
    """CPU seconds and resident memory of the broker and each server process."""

    cpu: dict[str, float]
    rss: dict[str, float]

    @classmethod
    def take(cls, processes: dict[str, psutil.Process]) -> Usage:
        cpu, rss = {}, {}
        for name, process in processes.items():
            try:
                times = process.cpu_times()
                cpu[name] = times.user + times.system
                rss[name] = process.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                cpu[name] = rss[name] = 0.0
        return cls(cpu, rss)

    def minus(self, before: Usage) -> dict[str, float]:
        return {n: self.cpu[n] - before.cpu.get(n, 0.0) for n in self.cpu}


class Cluster:
    """Mosquitto, PostgreSQL schema, two server processes, the device workers."""

    def __init__(self, args: argparse.Namespace, home: Path) -> None:
        self.args, self.home = args, home
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.pool = WorkerPool()
        self.groups: dict[str, list[str]] = {}

    @contextmanager
    def running(self) -> Iterator[Cluster]:
        schema = f"scale_{secrets.token_hex(4)}"
        admin = psycopg.connect(PG_URL, autocommit=True)
        admin.execute(f"CREATE SCHEMA {schema}")
        self.db_url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        self.ca = FleetCA.create(self.home / "a" / "ca", FLEET)
        shutil.copytree(self.home / "a" / "ca", self.home / "b" / "ca")
        self.keys = self.home / "keys"
        self.bundle = self.home / "bundle.efb"
        self.bundle.write_bytes(make_bundle(self.keys, self.args.bundle_bytes))
        tls = self.ca.write_identity(self.ca.issue_server_cert(), self.home / "broker-tls",
                                     "broker")
        config = BrokerConfig(FLEET, self.home / "broker", tls, bind_address="127.0.0.1",
                              server_identity="fleet-server-a",
                              more_server_identities=("fleet-server-b",),
                              crl_file=self.ca.crl_path)
        try:
            with Broker.embedded(config) as broker:
                self.broker = broker
                self.broker_process = next(p for p in psutil.Process().children()
                                           if p.name() == "mosquitto")
                self.registry = open_registry(self.db_url)
                try:
                    self.start_server(INSTANCES[0])  # the other joins later (main)
                    yield self
                finally:
                    self.pool.stop()
                    for name in list(self.servers):
                        self.stop_server(name)
                    self.registry.close()
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
            admin.close()

    def start_server(self, name: str) -> None:
        data = self.home / name
        argv = [sys.executable, "-m", "fleet_server", "serve", "--data", str(data), "--keys",
                str(self.keys), "--db", self.db_url, "--fleet", FLEET, "--broker-url",
                self.broker.address.url, "--instance", name, "--shared-subscriptions",
                "--bundle-port", "0", "--port", "0", "--host", "127.0.0.1"]
        with (self.home / f"server-{name}.log").open("ab") as log:
            process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.servers[name] = process
        deadline = time.monotonic() + 120
        while not (data / "server.json").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {name} did not start: "
                                   f"{(self.home / f'server-{name}.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def stop_server(self, name: str) -> None:
        process = self.servers.pop(name)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def processes(self) -> dict[str, psutil.Process]:
        found = {"broker": self.broker_process}
        found.update({f"server-{n}": psutil.Process(p.pid) for n, p in self.servers.items()})
        return found

    def fleet_cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "fleet_server", *args, "--data",
                               str(self.home / "a")], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=600)
        return done.stdout

    def enroll(self) -> float:
        """Pre-issue every device's certificate and record it in the registry."""
        sizes = {"http": self.args.rollout, "mqtt": self.args.rollout,
                 "idle": self.args.devices - 2 * self.args.rollout}
        started = time.perf_counter()
        for group, count in sizes.items():
            ids = [f"{group}-{i:05d}" for i in range(count)]
            for device_id in ids:
                key_pem, csr_pem = make_device_key_and_csr(device_id)
                cert = self.ca.sign_device_csr(csr_pem, device_id)
                token = self.registry.issue_token(group, 3600)
                self.registry.enroll_device(token, device_id, profile=PROFILE,
                                            cert_fingerprint=certificate_fingerprint(cert))
                home = self.home / "devices" / device_id
                home.mkdir(parents=True)
                (home / "device.key").write_bytes(key_pem)
                os.chmod(home / "device.key", 0o600)
                (home / "device.crt").write_bytes(cert)
                (home / "ca.crt").write_bytes(self.ca.cert_pem)
            self.groups[group] = ids
        return time.perf_counter() - started

    def start_workers(self) -> None:
        ids = [d for group in self.groups.values() for d in group]
        count = max(1, min(self.args.workers, len(ids)))
        address = self.broker.address
        self.pool.start([WorkerConfig(address.host, address.port, FLEET,
                                      device_specs(self.home, ids[w::count]), b"",
                                      connect_concurrency=self.args.connect_concurrency)
                         for w in range(count)], scale_worker_main, "scale-bench-worker")

    def rollout(self, group: str, sha: str) -> dict[str, Any]:
        """Publish the bundle to ``group``; wait for the registry to show it converged."""
        before = Usage.take(self.processes())
        started = time.time()
        self.fleet_cli("publish", str(self.bundle), "--group", group)
        deadline = time.monotonic() + self.args.timeout
        left = len(self.groups[group])
        while time.monotonic() < deadline:
            left = len(self.registry.unconverged(group=group))
            if not left:
                break
            time.sleep(1.0)
        polled = time.time() - started
        cpu = Usage.take(self.processes()).minus(before)
        done = [d.reported_at - started for d in self.registry.list_devices(group=group)
                if d.converged and d.reported_at is not None]
        results, _ = self.pool.collect()
        members = set(self.groups[group])
        mine = [r for r in results if r["device"] in members and r["sha256"] == sha]
        return {"group": group, "devices": len(members), "converged": len(members) - left,
                "seconds": max(done) if len(done) == len(members) else float("inf"),
                "polled": polled, "p50": percentile(done, 50), "p95": percentile(done, 95),
                "bytes": sum(r["chunk_bytes"] for r in mine),
                "refetched": sum(r["refetched"] for r in mine), "cpu": cpu}

    def telemetry(self, count: int, first_seq: int) -> dict[str, float]:
        """Every connected device sends ``count`` samples at once; seconds until all are in
        PostgreSQL, and CPU used meanwhile."""
        with psycopg.connect(self.db_url, autocommit=True) as db:
            def stored() -> int:
                row = db.execute("SELECT count(*) FROM telemetry").fetchone()
                return int(row[0]) if row else 0

            base = stored()
            before = Usage.take(self.processes())
            started = time.monotonic()
            for pipe in self.pool.pipes:
                pipe.send(("telemetry", count, first_seq))
            sent = sum(int(pipe.recv()[1]) for pipe in self.pool.pipes)
            deadline = started + self.args.timeout
            have = 0
            while time.monotonic() < deadline:
                have = stored() - base
                if have >= sent:
                    break
                time.sleep(0.2)
            seconds = time.monotonic() - started
            cpu = Usage.take(self.processes()).minus(before)
        return {"sent": sent, "stored": have, "seconds": seconds,
                "per_s": have / seconds if seconds else 0.0, **{f"cpu_{k}": v
                                                                for k, v in cpu.items()}}


# --- output -----------------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_rollout(r: dict[str, Any], label: str) -> None:
    cpu = r["cpu"]
    print(f"  rollout over {label}: {r['converged']}/{r['devices']} converged in "
          f"{r['seconds']:.2f} s (p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s); bundle bytes "
          f"{_mb(r['bytes'])}, re-requested {_mb(r['refetched'])}")
    print("    CPU seconds: " + ", ".join(f"{n} {v:.1f}" for n, v in cpu.items()))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000,
                        help="simulated devices in all (default %(default)s)")
    parser.add_argument("--rollout", type=int, default=500,
                        help="devices in each rollout group, http and mqtt (default "
                        "%(default)s)")
    parser.add_argument("--bundle-bytes", type=int, default=5 * 2**20,
                        help="size of the bundle's artifact (default 5 MiB)")
    parser.add_argument("--telemetry", type=int, default=2,
                        help="samples each device sends at once, per measurement")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds to measure the connected, idle fleet")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--keep", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    if args.devices < 2 * args.rollout:
        parser.error("--devices must be at least twice --rollout")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _before, soft, hard = raise_open_files(args.devices + 256)
    print(f"scale-out benchmark: {args.devices:,} devices, 2 server processes on PostgreSQL, "
          f"one Mosquitto; bundle {args.bundle_bytes:,} bytes to {args.rollout} devices over "
          f"MQTT chunks and {args.rollout} over HTTP; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f} at start; open files {soft} (hard {hard})")
    with work_dir(args.keep) as home, Cluster(args, home).running() as cluster:
        enroll_s = cluster.enroll()
        print(f"  pre-issued and recorded {args.devices:,} device certificates in "
              f"{enroll_s:.1f} s")
        cluster.start_workers()
        empty = Usage.take(cluster.processes())
        connect_s, ready, failed = cluster.pool.connect()
        print(f"  connected {ready:,}/{args.devices:,} devices (mutual TLS, MQTT 5, "
              f"subscribed) in {connect_s:.1f} s; failures {len(failed)}")
        for device_id, why in failed[:3]:
            print(f"    {device_id}: {why}")
        idle_before = Usage.take(cluster.processes())
        time.sleep(args.idle)
        idle = Usage.take(cluster.processes())
        per_k = max(ready, 1) / 1000
        print(f"  idle for {args.idle:.0f} s with {ready:,} devices connected, per 1,000 "
              "devices: " + "; ".join(
                  f"{n} +{(idle.rss[n] - empty.rss[n]) / per_k:.1f} MB RSS, "
                  f"{(idle.cpu[n] - idle_before.cpu[n]) / args.idle / per_k:.2%} of a core"
                  for n in idle.rss))
        print("  resident memory, before the devices connected -> with them: " + ", ".join(
            f"{n} {empty.rss[n]:.0f} -> {v:.0f} MB" for n, v in idle.rss.items()))
        # One server process first, then two: a stopped member of a shared subscription
        # keeps its share queued on Mosquitto (docs/scale.md), so "one" is measured before
        # the second joins, not after it leaves.
        one = cluster.telemetry(args.telemetry, 1)
        print(f"  telemetry, 1 server process:  {one['stored']:,}/{one['sent']:,} samples "
              f"stored in {one['seconds']:.1f} s = {one['per_s']:,.0f}/s")
        cluster.start_server(INSTANCES[1])
        two = cluster.telemetry(args.telemetry, 1 + args.telemetry)
        print(f"  telemetry, 2 server processes: {two['stored']:,}/{two['sent']:,} samples "
              f"stored in {two['seconds']:.1f} s = {two['per_s']:,.0f}/s; 2 / 1 = "
              f"{two['per_s'] / max(one['per_s'], 1e-9):.2f}")
        for label, t in (("1 server", one), ("2 servers", two)):
            print(f"    CPU seconds with {label}: " + ", ".join(
                f"{k[4:]} {v:.1f}" for k, v in t.items() if k.startswith("cpu_")))
        sha = hashlib.sha256(cluster.bundle.read_bytes()).hexdigest()
        over_mqtt = cluster.rollout("mqtt", sha)
        print_rollout(over_mqtt, "MQTT chunks")
        over_http = cluster.rollout("http", sha)
        print_rollout(over_http, "HTTP (the servers' bundle endpoints)")
        if over_mqtt["seconds"] and over_http["seconds"] not in (0, float("inf")):
            ratio = over_http["seconds"] / over_mqtt["seconds"]
            print(f"    HTTP / MQTT rollout time: {ratio:.2f}")
        _, errors = cluster.pool.collect()
        for device_id, why in [e for e in errors if e[1] != "closed"][:3]:
            print(f"    device {device_id}: {why}")
    ok = (ready == args.devices and over_mqtt["converged"] == args.rollout
          and over_http["converged"] == args.rollout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
