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
- **The devices**: the fleet simulator (``benchmarks/fleet_sim/``: many devices per worker
  process in one selector loop, mutual TLS with each device's own certificate, MQTT 5, the
  agent's chunk fetch, back-off and reports). A device of the ``http``, ``base`` and
  ``fleet`` groups downloads the bundle from the first URL of its desired state (the
  server's endpoint, with its client certificate; range requests to resume) on a small
  thread pool per worker, and falls back to chunks as the agent does; a device of the
  ``mqtt`` group ignores the URLs. Certificates are pre-issued (key and CSR made as the
  agent makes them, signed by the fleet CA in a pool of processes, the devices recorded
  in the registry as enrollment records them, 250 per transaction), which is enrollment
  minus its HTTP round trip and token.

Measured: devices connected and how long it took; server and broker resident memory and
CPU per 1,000 connected devices (idle for ``--idle`` seconds, server ``a`` alone);
telemetry ingest: every device sends ``--telemetry`` samples at once, timed until
PostgreSQL holds all, with server ``a`` alone, then with ``b`` too; then a
``--bundle-bytes`` bundle rolled out to ``--rollout`` devices over MQTT chunks, then to as
many others over HTTP (time to the registry showing all converged, bytes re-requested, CPU
of broker and servers). With ``--fleet-rollout`` instead: the bundle over HTTP to a
``--baseline`` group (1,000), then to the fleet of ``--devices`` (10,000; the target: every
device's converged report stored within 120 s of ``fleet publish``), each with the time to
50%, 90% and 100% of the converged reports stored in the registry, when the last device
sent its report, device errors, bytes, CPU seconds of the broker, each server, the
PostgreSQL backends serving the servers and the device workers, the whole machine's busy
CPU and load average, and peak resident memory.

With ``--mirror nginx``: nginx (if installed) on a free port, its config and logs in the
work directory, serves server ``a``'s bundle directory over plain HTTP as both servers'
``--bundle-mirror``, so devices download from it first; its CPU is reported as ``nginx``.

Run::

    .venv/bin/python benchmarks/scale_bench.py --devices 10000
    .venv/bin/python benchmarks/scale_bench.py --devices 50 --rollout 5 --bundle-bytes 65536
    .venv/bin/python benchmarks/scale_bench.py --fleet-rollout --devices 10000 \
        --baseline 1000 --bundle-bytes 1048576 --telemetry 0

Exit status 0 when every device connected and both rollouts converged.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import math
import multiprocessing
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import psycopg
from fleet_sim.device import PROFILE
from fleet_sim.fixtures import (
    device_specs,
    issue_device,
    make_bundle,
    percentile,
    raise_open_files,
    work_dir,
)
from fleet_sim.worker import WorkerConfig, WorkerPool

from fleet_server.broker import Broker, BrokerConfig
from fleet_server.ca import FleetCA
from fleet_server.registry import Registry, open_registry

ROOT = Path(__file__).resolve().parents[1]
FLEET = "bench"
PG_URL = os.environ.get("EDGEFLEET_TEST_POSTGRES_URL",
                        "postgresql://postgres@127.0.0.1:5432/test")
INSTANCES = ("a", "b")
#: Groups whose devices download over HTTP from the desired state's URLs (the ``mqtt``
#: group fetches chunks over MQTT).
HTTP_GROUPS = ("http-", "base-", "fleet-")
TARGET_FLEET = 10_000
TARGET_ROLLOUT_S = 120.0
#: This Mosquitto stands for the operator's broker, sized for a rollout's burst: with the
#: embedded broker's defaults (10,000 messages, 32 MiB per client) it dropped messages for
#: a server process as a 10,000-device rollout started (docs/benchmarks.md, run B).
BROKER_QUEUED_MESSAGES = 500_000
BROKER_QUEUED_BYTES = 512 * 2**20


# --- the servers ------------------------------------------------------------------------------

@dataclass
class Usage:
    """CPU seconds and resident memory (MiB) of each role's processes, and the whole
    machine's busy CPU seconds, at one moment."""

    at: float
    cpu: dict[str, float]
    rss: dict[str, float]
    machine_busy: float

    @classmethod
    def take(cls, processes: dict[str, list[psutil.Process]]) -> Usage:
        cpu, rss = {}, {}
        for name, group in processes.items():
            cpu[name] = rss[name] = 0.0
            for process in group:
                with suppress(psutil.NoSuchProcess):
                    times = process.cpu_times()
                    cpu[name] += times.user + times.system
                    rss[name] += process.memory_info().rss / 2**20
        machine = psutil.cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return cls(time.monotonic(), cpu, rss, busy)

    def minus(self, before: Usage) -> dict[str, float]:
        return {n: self.cpu[n] - before.cpu.get(n, 0.0) for n in self.cpu}


@dataclass
class RolloutResult:
    """One rollout: when each device's converged report was stored (seconds from the
    publish command's start, sorted), what the devices saw, and what it cost."""

    group: str
    devices: int
    converged: int
    publish_s: float
    stored: list[float]
    reported: list[float]
    bundle_bytes: int
    refetched: int
    over_http: int
    errors: list[tuple[str, str]]
    cpu: dict[str, float]
    peak_rss: dict[str, float]
    wall: float
    load_before: float
    load_after: float
    machine_busy: float

    def time_to(self, share: float) -> float:
        """Seconds until ``share`` of the devices had their converged report stored (inf
        if that many never did)."""
        needed = max(1, math.ceil(share * self.devices))
        return self.stored[needed - 1] if len(self.stored) >= needed else float("inf")


class Cluster:
    """Mosquitto, PostgreSQL schema, two server processes, the device workers."""

    def __init__(self, args: argparse.Namespace, home: Path) -> None:
        self.args, self.home = args, home
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.pool = WorkerPool()
        self.groups: dict[str, list[str]] = {}
        #: ``--mirror nginx``: the mirror's URL prefix and processes (master and worker).
        self.mirror_url: str | None = None
        self.nginx: list[psutil.Process] = []

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
                              crl_file=self.ca.crl_path,
                              max_queued_messages=BROKER_QUEUED_MESSAGES,
                              max_queued_bytes=BROKER_QUEUED_BYTES)
        try:
            with Broker.embedded(config) as broker, self.mirror():
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

    @contextmanager
    def mirror(self) -> Iterator[None]:
        """With ``--mirror nginx``, nginx serving server ``a``'s bundle directory (where
        ``fleet publish --data a`` stores the bundle) as the servers' ``--bundle-mirror``."""
        if self.args.mirror != "nginx":
            yield
            return
        with start_nginx(self.home / "a" / "bundles", self.home / "nginx") as (port, master):
            self.mirror_url = f"http://127.0.0.1:{port}/"
            self.nginx = [master, *master.children()]
            yield

    def start_server(self, name: str) -> None:
        data = self.home / name
        argv = [sys.executable, "-m", "fleet_server", "serve", "--data", str(data), "--keys",
                str(self.keys), "--db", self.db_url, "--fleet", FLEET, "--broker-url",
                self.broker.address.url, "--instance", name, "--shared-subscriptions",
                "--bundle-port", "0", "--port", "0", "--host", "127.0.0.1"]
        if self.mirror_url is not None:
            argv += ["--bundle-mirror", self.mirror_url]
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

    def processes(self) -> dict[str, list[psutil.Process]]:
        """The processes whose CPU and memory are reported, by role: the broker, each
        server, the PostgreSQL backends serving the servers, the device workers."""
        found = {"broker": [self.broker_process]}
        servers = {f"server-{n}": psutil.Process(p.pid) for n, p in self.servers.items()}
        found.update({n: [p] for n, p in servers.items()})
        found["postgres"] = self.postgres_backends(servers.values())
        found["devices"] = self.pool.processes()
        if self.nginx:
            found["nginx"] = self.nginx
        return found

    def postgres_backends(self, servers: Iterable[psutil.Process]) -> list[psutil.Process]:
        """The PostgreSQL backend processes of the servers' connections (found by their
        client ports in pg_stat_activity)."""
        ports = {c.laddr.port for server in servers
                 for c in server.net_connections("tcp")
                 if c.raddr and c.raddr.port == (urlsplit(PG_URL).port or 5432)}
        if not ports:
            return []
        with psycopg.connect(PG_URL, autocommit=True) as db:
            rows = db.execute("SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)",
                              (list(ports),)).fetchall()
        backends = []
        for (pid,) in rows:
            with suppress(psutil.NoSuchProcess):
                backends.append(psutil.Process(pid))
        return backends

    def fleet_cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "fleet_server", *args, "--data",
                               str(self.home / "a")], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=600)
        return done.stdout

    def group_sizes(self) -> dict[str, int]:
        """Devices per group: with ``--fleet-rollout`` a baseline group and the fleet, else
        the two rollout groups (HTTP and MQTT chunks) and the idle rest."""
        args = self.args
        if args.fleet_rollout:
            return {"base": args.baseline, "fleet": args.devices}
        return {"http": args.rollout, "mqtt": args.rollout,
                "idle": args.devices - 2 * args.rollout}

    def enroll(self) -> float:
        """Pre-issue every device's certificate and record the device in the registry
        (:func:`issue_identities`, :func:`record_devices`)."""
        started = time.perf_counter()
        for group, count in self.group_sizes().items():
            ids = [f"{group}-{i:05d}" for i in range(count)]
            # Each chunk is recorded while the pool issues the next ones.
            for issued in issue_identities(self.ca.directory, self.home / "devices", ids):
                record_devices(self.registry, group, issued)
            self.groups[group] = ids
        return time.perf_counter() - started

    def start_workers(self) -> None:
        ids = [d for group in self.groups.values() for d in group]
        count = max(1, min(self.args.workers, len(ids)))
        address = self.broker.address
        self.pool.start([WorkerConfig(address.host, address.port, FLEET,
                                      device_specs(self.home, ids[w::count]), b"",
                                      connect_concurrency=self.args.connect_concurrency,
                                      http_prefixes=HTTP_GROUPS)
                         for w in range(count)], "scale-bench-worker")

    def rollout(self, group: str) -> RolloutResult:
        """``fleet publish`` the bundle to ``group``; wait until the devices say they have
        installed it and the registry shows every one converged."""
        sha = hashlib.sha256(self.bundle.read_bytes()).hexdigest()
        members = self.groups[group]
        pipes = self.pool.pipes
        for pipe in pipes:
            pipe.send(("watch", f"{group}-", sha))
        load = os.getloadavg()[0]
        processes = self.processes()
        before = Usage.take(processes)
        peak = dict(before.rss)
        started = time.time()
        self.fleet_cli("publish", str(self.bundle), "--group", group)
        published = time.time() - started
        deadline = time.monotonic() + self.args.timeout
        pending = set(pipes)
        left = len(members)
        while time.monotonic() < deadline:
            if pending:
                for ready in wait(list(pending), 1.0):
                    assert isinstance(ready, Connection)
                    message = ready.recv()
                    assert message[0] == "finished", message
                    pending.discard(ready)
            else:
                left = len(self.registry.unconverged(group=group))
                if not left:
                    break
                time.sleep(0.5)
            now = Usage.take(processes)
            peak = {n: max(v, now.rss.get(n, 0.0)) for n, v in peak.items()}
        after = Usage.take(processes)
        done = sorted(d.reported_at - started for d in self.registry.list_devices(group=group)
                      if d.converged and d.reported_at is not None)
        results, errors = self.pool.collect()
        member_set = set(members)
        mine = [r for r in results if r["device"] in member_set and r["sha256"] == sha]
        return RolloutResult(
            group, len(members), len(members) - left, published, done,
            sorted(r["reported_at"] - started for r in mine),
            sum(r["chunk_bytes"] for r in mine), sum(r["refetched"] for r in mine),
            sum(1 for r in mine if r["http"]),
            [e for e in errors if e[0] in member_set and e[1] != "closed"],
            after.minus(before), peak, after.at - before.at, load, os.getloadavg()[0],
            after.machine_busy - before.machine_busy)

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


# --- enrollment -------------------------------------------------------------------------------

#: Devices per task of the issuing processes, and per registry transaction.
ISSUE_CHUNK = 250
#: Issuing processes: more than the cores, since each waits on the fsync that records every
#: certificate it issues in the CA directory (``FleetCA.sign_device_csr``).
ISSUE_PROCESSES = 4 * (os.cpu_count() or 1)


def issue_identities(ca_dir: Path, devices_dir: Path, ids: Sequence[str],
                     ) -> Iterator[list[tuple[str, str]]]:
    """Each device's key and CSR made as the agent makes them, signed by the fleet CA in
    ``ca_dir``, written to ``devices_dir/ID/`` (device.key, device.crt, ca.crt); yields
    ``(id, certificate fingerprint)`` ISSUE_CHUNK devices at a time, in the order of
    ``ids``. In a process pool: a key, a signature and the CA's fsync'd record of the
    certificate cost about 10 ms a device, mostly waiting on the disk."""
    chunks = [list(ids[i:i + ISSUE_CHUNK]) for i in range(0, len(ids), ISSUE_CHUNK)]
    if len(chunks) <= 1:
        yield from (_issue_chunk(ca_dir, devices_dir, chunk) for chunk in chunks)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(ISSUE_PROCESSES, len(chunks)),
                                                mp_context=context) as pool:
        yield from pool.map(_issue_chunk, [ca_dir] * len(chunks),
                            [devices_dir] * len(chunks), chunks)


def _issue_chunk(ca_dir: Path, devices_dir: Path, ids: list[str]) -> list[tuple[str, str]]:
    ca = FleetCA.load(ca_dir)
    return [(device_id, issue_device(ca, devices_dir, device_id)[1]) for device_id in ids]


def record_devices(registry: Registry, group: str, issued: Sequence[tuple[str, str]]) -> None:
    """Record each ``(id, fingerprint)`` in ``group`` as enrollment does
    (``Registry.upsert_device``: the device row, its tags, the ``device.enrolled`` event),
    ISSUE_CHUNK devices per transaction (a commit each cost more than the rest)."""
    for start in range(0, len(issued), ISSUE_CHUNK):
        with registry.batch():
            for device_id, fingerprint in issued[start:start + ISSUE_CHUNK]:
                registry.upsert_device(device_id, group=group, profile=PROFILE,
                                       cert_fingerprint=fingerprint)

# --- the nginx mirror (--mirror nginx) ---------------------------------------------------------

#: An untrusted mirror as a CDN would serve it: static files, sendfile, keep-alive; devices
#: check each bundle's sha256 and signatures, so plain HTTP is enough (docs/scale.md).
NGINX_CONF = """\
daemon off;
user {user};
worker_processes 1;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {home}/access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000;
    client_body_temp_path {home}/tmp; proxy_temp_path {home}/tmp;
    fastcgi_temp_path {home}/tmp; uwsgi_temp_path {home}/tmp; scgi_temp_path {home}/tmp;
    types {{ application/octet-stream efb; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ try_files $uri =404; }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nginx_binary() -> str | None:
    """nginx's path (on PATH, or in sbin, which is not on every user's PATH), or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


@contextmanager
def start_nginx(root: Path, home: Path) -> Iterator[tuple[int, psutil.Process]]:
    """nginx serving the files of ``root`` over plain HTTP on a free port, with its own
    config, logs and pid file under ``home``; yields the port and its master process (the
    worker is its child). RuntimeError if nginx is not installed or does not start."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("--mirror nginx needs nginx (apt-get install nginx-light)")
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    port = _free_port()
    conf = home / "nginx.conf"
    # The worker runs as this benchmark's user (as root, nginx would switch to nobody, who
    # cannot read the private work directory).
    conf.write_text(NGINX_CONF.format(home=home, port=port, root=root.resolve(),
                                      user=pwd.getpwuid(os.geteuid()).pw_name))
    with (home / "nginx.log").open("ab") as log:
        process = subprocess.Popen([binary, "-p", str(home), "-c", str(conf)],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        master = psutil.Process(process.pid)
        while True:
            # Listening is not enough: the worker (whose CPU is counted) must exist too.
            with suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                if master.children():
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nginx did not start: "
                                   f"{(home / 'error.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        yield port, master
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- output -----------------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_rollout(r: RolloutResult, label: str) -> None:
    print(f"  rollout over {label}: {r.converged}/{r.devices} converged; reports stored: "
          f"50% {r.time_to(0.5):.2f} s, 90% {r.time_to(0.9):.2f} s, 100% "
          f"{r.time_to(1.0):.2f} s (p50 {percentile(r.stored, 50):.2f} s, p95 "
          f"{percentile(r.stored, 95):.2f} s); `fleet publish` returned after "
          f"{r.publish_s:.2f} s; the last device sent its report at "
          f"{max(r.reported, default=float('nan')):.2f} s")
    print(f"    {r.over_http}/{len(r.reported)} fetched over HTTP; bundle bytes "
          f"{_mb(r.bundle_bytes)}, re-requested {_mb(r.refetched)}; device errors "
          f"{len(r.errors)}" + "".join(f"; {d}: {why}" for d, why in r.errors[:3]))
    print(f"    CPU seconds over {r.wall:.1f} s: " + ", ".join(
        f"{n} {v:.1f}" for n, v in r.cpu.items()) + f"; whole machine busy "
        f"{r.machine_busy:.1f} of {r.wall * (os.cpu_count() or 1):.1f}; load average "
        f"{r.load_before:.1f} -> {r.load_after:.1f}")
    print("    peak resident memory: " + ", ".join(
        f"{n} {v:.0f} MB" for n, v in r.peak_rss.items() if n != "postgres"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000,
                        help="simulated devices (default %(default)s); with --fleet-rollout, "
                        "the devices of the fleet rollout, the baseline group besides")
    parser.add_argument("--rollout", type=int, default=500,
                        help="devices in each rollout group, http and mqtt (default "
                        "%(default)s; not with --fleet-rollout)")
    parser.add_argument("--fleet-rollout", action="store_true",
                        help="instead of the HTTP/MQTT comparison: roll the bundle out over "
                        "HTTP to --baseline devices, then to all --devices")
    parser.add_argument("--baseline", type=int, default=1000,
                        help="devices of the baseline rollout (--fleet-rollout)")
    parser.add_argument("--bundle-bytes", type=int, default=5 * 2**20,
                        help="size of the bundle's artifact (default 5 MiB)")
    parser.add_argument("--telemetry", type=int, default=2,
                        help="samples each device sends at once, per measurement (0: skip)")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds to measure the connected, idle fleet")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--keep", type=Path, metavar="DIR")
    parser.add_argument("--mirror", choices=("nginx",),
                        help="serve the bundles from an nginx mirror over plain HTTP (its "
                        "URL first in each desired state; needs nginx installed)")
    args = parser.parse_args(argv)
    if args.mirror == "nginx" and nginx_binary() is None:
        parser.error("--mirror nginx: nginx is not installed (apt-get install nginx-light); "
                     "run without --mirror to measure the servers' endpoint")
    if not args.fleet_rollout and args.devices < 2 * args.rollout:
        parser.error("--devices must be at least twice --rollout")
    return args


def measure_telemetry(cluster: Cluster, args: argparse.Namespace) -> None:
    """Ingest with server ``a`` alone, then with ``b`` too (``b`` is started here)."""
    # One server process first, then two: a stopped member of a shared subscription keeps
    # its share queued on Mosquitto (docs/scale.md), so "one" is measured before the
    # second joins, not after it leaves.
    if not args.telemetry:
        cluster.start_server(INSTANCES[1])
        return
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


def measure_rollouts(cluster: Cluster, args: argparse.Namespace) -> bool:
    """The rollouts; True if every one converged."""
    if args.fleet_rollout:
        base = cluster.rollout("base")
        print_rollout(base, f"HTTP, baseline group of {base.devices:,}")
        fleet = cluster.rollout("fleet")
        print_rollout(fleet, f"HTTP, fleet of {fleet.devices:,}")
        per_device = {n: fleet.cpu[n] / fleet.devices / max(base.cpu[n] / base.devices, 1e-9)
                      for n in fleet.cpu if base.cpu[n] > 0.05}
        print(f"    {fleet.devices:,} / {base.devices:,} devices: 100% after "
              f"{fleet.time_to(1.0) / base.time_to(1.0):.2f}x the time; CPU per device "
              + ", ".join(f"{n} {v:.2f}x" for n, v in per_device.items()))
        seconds = fleet.time_to(1.0)
        verdict = ("not measured (fewer devices)" if fleet.devices < TARGET_FLEET
                   else "OK" if seconds < TARGET_ROLLOUT_S else "MISSED")
        print(f"\ntarget: rollout of a {args.bundle_bytes:,}-byte artifact to "
              f"{fleet.devices:,} devices: {seconds:.1f} s (target < {TARGET_ROLLOUT_S:.0f} s "
              f"for {TARGET_FLEET:,}) {verdict}; CPU seconds in all "
              f"{sum(fleet.cpu.values()):.0f} (broker, servers, PostgreSQL, devices)")
        return base.converged == base.devices and fleet.converged == fleet.devices
    over_mqtt = cluster.rollout("mqtt")
    print_rollout(over_mqtt, "MQTT chunks")
    over_http = cluster.rollout("http")
    print_rollout(over_http, "HTTP (the servers' bundle endpoints)")
    ratio = over_http.time_to(1.0) / over_mqtt.time_to(1.0)
    print(f"    HTTP / MQTT rollout time: {ratio:.2f}")
    return (over_mqtt.converged == over_mqtt.devices
            and over_http.converged == over_http.devices)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    total = args.devices + (args.baseline if args.fleet_rollout else 0)
    _before, soft, hard = raise_open_files(total + 256)
    what = (f"bundle {args.bundle_bytes:,} bytes over HTTP to {args.baseline:,} devices, then "
            f"to {args.devices:,}" if args.fleet_rollout else
            f"bundle {args.bundle_bytes:,} bytes to {args.rollout} devices over MQTT chunks and "
            f"{args.rollout} over HTTP")
    print(f"scale-out benchmark: {total:,} devices, 2 server processes on PostgreSQL, one "
          f"Mosquitto; {what}; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f} at start; open files {soft} (hard {hard})")
    with work_dir(args.keep) as home, Cluster(args, home).running() as cluster:
        enroll_s = cluster.enroll()
        print(f"  pre-issued and recorded {total:,} device certificates in {enroll_s:.1f} s")
        cluster.start_workers()
        empty = Usage.take(cluster.processes())
        connect_s, ready, failed = cluster.pool.connect()
        print(f"  connected {ready:,}/{total:,} devices (mutual TLS, MQTT 5, subscribed) in "
              f"{connect_s:.1f} s; failures {len(failed)}; load average "
              f"{os.getloadavg()[0]:.1f}")
        for device_id, why in failed[:3]:
            print(f"    {device_id}: {why}")
        idle_before = Usage.take(cluster.processes())
        time.sleep(args.idle)
        idle = Usage.take(cluster.processes())
        per_k = max(ready, 1) / 1000
        shown = ("broker", "server-a")
        print(f"  idle for {args.idle:.0f} s with {ready:,} devices connected, per 1,000 "
              "devices: " + "; ".join(
                  f"{n} +{(idle.rss[n] - empty.rss[n]) / per_k:.1f} MB RSS, "
                  f"{(idle.cpu[n] - idle_before.cpu[n]) / args.idle / per_k:.2%} of a core"
                  for n in shown))
        print("  resident memory, before the devices connected -> with them: " + ", ".join(
            f"{n} {empty.rss[n]:.0f} -> {idle.rss[n]:.0f} MB" for n in shown))
        measure_telemetry(cluster, args)
        converged = measure_rollouts(cluster, args)
    return 0 if ready == total and converged else 1


if __name__ == "__main__":
    sys.exit(main())
