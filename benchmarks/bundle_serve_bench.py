"""What delivering bundle bytes costs the fleet server: the HTTPS bundle endpoint's CPU per
gigabyte and per request, against the cheapest Python TLS server and an nginx mirror
(issue 16; docs/scale.md "Bundles", docs/benchmarks.md "Bundle bytes").

What runs, all on this machine:

- **The endpoint**: a real :class:`fleet_server.bundle_http.BundleHttpServer` in this
  process, on a registry in a fresh PostgreSQL schema holding ``--devices`` enrolled devices
  (keys and CSRs made as the agent makes them, signed by a fleet CA, fingerprints recorded
  with one-time tokens) and one real signed ``--bundle-bytes`` bundle in their desired state.
- **The clients**: ``--clients`` processes, each downloading in turn as a device does: a new
  TLS connection with that device's certificate, ``GET /bundles/<sha256>.efb``, the body read
  into one reused buffer (the clients do not hash: their CPU is not the question here).
- **The floor** (same run, same clients, same TLS context: server certificate, client
  certificates required): the simplest Python TLS server there is, one thread per
  connection, reading the request line and sending a fixed header and the bundle from
  memory with one ``sendall``: no HTTP parsing, no registry, no file. What the endpoint costs
  above it is its own overhead; the floor itself is TLS and the kernel.
- **nginx** (``--mirror nginx``, when installed): the bundle directory served as an
  untrusted mirror over plain HTTP with ``sendfile`` as a CDN would, its CPU counted.

Phases, one line each: ``authorize`` (the endpoint's authorization of one download, called
in-process for every device: its registry reads), ``endpoint HEAD, new session`` (a new
connection per device: handshake, authorization, HTTP), ``endpoint HEAD, resumed`` (the
same, resuming each device's TLS session), ``endpoint GET`` (``--downloads`` whole
downloads), the floor's ``HEAD`` and ``GET``, nginx's ``GET``. Server CPU is this process's
(the endpoint's threads) plus the PostgreSQL backends serving it; per GB divides all of a
phase's CPU by the body bytes. Then ``handshake`` lines: the server side's CPU per TLS
handshake over memory buffers, with the endpoint's settings and with one changed (session
tickets 2 / 1 / 0, no client certificate), full and resumed.

Run (load average printed; the machine has 2 cores)::

    PYTHONPATH=. .venv/bin/python benchmarks/bundle_serve_bench.py
    PYTHONPATH=. .venv/bin/python benchmarks/bundle_serve_bench.py --devices 300 \
        --downloads 300 --mirror nginx

``PYTHONPATH=/path/to/other/checkout`` measures another version of the endpoint with the
same clients (the figures in docs/benchmarks.md "before" come from that).
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import secrets
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import psycopg
from fleet_sim.fixtures import issue_device, make_bundle, work_dir
from scale_bench import nginx_binary, start_nginx  # one mirror recipe for both

from fleet_server.bundle_http import BundleHttpServer, bundle_path
from fleet_server.ca import FleetCA
from fleet_server.registry import Registry, open_registry
from transport.mqtt import TLSIdentity

PG_URL = os.environ.get("EDGEFLEET_TEST_POSTGRES_URL",
                        "postgresql://postgres@127.0.0.1:5432/test")
_READ = 1 << 20


# --- the clients (child processes) ------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One client's share of a phase: ``method`` on ``path`` once per identity, over TLS
    (``tls``) or plain HTTP, resuming each identity's previous TLS session if ``resume``."""

    port: int
    path: str
    method: str
    identities: tuple[TLSIdentity, ...]
    tls: bool
    resume: bool


class _Client:
    """A client process's state across phases: one TLS context and session per device."""

    def __init__(self) -> None:
        self.contexts: dict[Path, ssl.SSLContext] = {}
        self.sessions: dict[Path, ssl.SSLSession] = {}
        self.buffer = bytearray(_READ)

    def context(self, identity: TLSIdentity) -> ssl.SSLContext:
        context = self.contexts.get(identity.cert_file)
        if context is None:
            context = ssl.create_default_context(cafile=str(identity.ca_file))
            context.load_cert_chain(identity.cert_file, identity.key_file)
            self.contexts[identity.cert_file] = context
        return context

    def run(self, job: Job) -> tuple[int, int, int]:
        """(requests answered 200, body bytes, TLS sessions resumed)."""
        ok = received = resumed = 0
        for identity in job.identities:
            if job.tls:
                connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                    "127.0.0.1", job.port, context=self.context(identity), timeout=60)
            else:
                connection = http.client.HTTPConnection("127.0.0.1", job.port, timeout=60)
            try:
                if job.resume and identity.cert_file in self.sessions:
                    # http.client has no session parameter: connect the socket ourselves.
                    raw = socket.create_connection(("127.0.0.1", job.port), timeout=60)
                    connection.sock = self.context(identity).wrap_socket(
                        raw, server_hostname="127.0.0.1",
                        session=self.sessions[identity.cert_file])
                else:
                    connection.connect()
                connection.request(job.method, job.path)
                sock: Any = connection.sock  # getresponse() drops it on "Connection: close"
                response = connection.getresponse()
                view = memoryview(self.buffer)
                while n := response.readinto(view):
                    received += n
                ok += response.status == 200
                if job.tls:
                    resumed += bool(sock.session_reused)
                    if sock.session is not None:
                        self.sessions[identity.cert_file] = sock.session
            finally:
                connection.close()
        return ok, received, resumed


def _client_main(pipe: Connection) -> None:
    client = _Client()
    while (job := pipe.recv()) is not None:
        started = time.process_time()
        ok, received, resumed = client.run(job)
        pipe.send((ok, received, resumed, time.process_time() - started))


class Clients:
    """``count`` client processes that run a phase's jobs in parallel."""

    def __init__(self, count: int) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes = []
        for _ in range(count):
            ours, theirs = spawn.Pipe()
            process = spawn.Process(target=_client_main, args=(theirs,), daemon=True)
            process.start()
            self.pipes.append(ours)
            self.processes.append(process)

    def run(self, port: int, path: str, method: str, identities: Sequence[TLSIdentity], *,
            tls: bool = True, resume: bool = False) -> tuple[int, int, int, float]:
        """Split ``identities`` over the clients; (200s, bytes, resumed, client CPU s)."""
        n = len(self.pipes)
        for i, pipe in enumerate(self.pipes):
            pipe.send(Job(port, path, method, tuple(identities[i::n]), tls, resume))
        results = [pipe.recv() for pipe in self.pipes]
        return (sum(r[0] for r in results), sum(r[1] for r in results),
                sum(r[2] for r in results), sum(r[3] for r in results))

    def stop(self) -> None:
        for pipe in self.pipes:
            with suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(10)


# --- the servers --------------------------------------------------------------------------------

class FloorServer:
    """The cheapest Python HTTPS server for these bytes: a thread per connection, the request
    read to its blank line, a fixed header and the body from memory in one ``sendall``."""

    def __init__(self, context: ssl.SSLContext, body: bytes) -> None:
        self._context, self._body = context, body
        self._header = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n").encode()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        with suppress(OSError), self._context.wrap_socket(raw, server_side=True) as sock:
            request = b""
            while b"\r\n\r\n" not in request:
                data = sock.recv(4096)
                if not data:
                    return
                request += data
            if request.startswith(b"HEAD"):
                sock.sendall(self._header)
            else:
                sock.sendall(self._header + self._body)

    def stop(self) -> None:
        self._listener.close()


# --- TLS handshakes, in memory ---------------------------------------------------------------

def _handshake(server: ssl.SSLContext, client: ssl.SSLContext,
               session: ssl.SSLSession | None) -> tuple[float, ssl.SSLSession | None, bool]:
    """One TLS handshake over memory buffers, then one application byte (which carries the
    server's tickets): (the server side's CPU seconds, the client's session, resumed)."""
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    side = server.wrap_bio(server_in, server_out, server_side=True)
    peer = client.wrap_bio(client_in, client_out, server_hostname="127.0.0.1",
                           session=session)
    cpu = 0.0
    server_done = client_done = False
    while not (server_done and client_done):
        if not client_done:
            with suppress(ssl.SSLWantReadError):
                peer.do_handshake()
                client_done = True
        server_in.write(client_out.read())
        started = time.thread_time()
        if not server_done:
            with suppress(ssl.SSLWantReadError):
                side.do_handshake()
                server_done = True
        cpu += time.thread_time() - started
        client_in.write(server_out.read())
    started = time.thread_time()
    side.write(b"x")  # TLS 1.3 tickets go out with the first application data
    cpu += time.thread_time() - started
    client_in.write(server_out.read())
    peer.read(1)
    return cpu, peer.session, bool(side.session_reused)


def handshake_costs(tls: TLSIdentity, device: TLSIdentity, count: int) -> list[str]:
    """The server's CPU per TLS handshake, in this thread, as the endpoint's context is set
    up (TLS 1.3, P-256 keys, client certificate required) and with one thing changed."""
    def server(tickets: int, verify: ssl.VerifyMode = ssl.CERT_REQUIRED) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        context.load_verify_locations(tls.ca_file)
        context.verify_mode = verify
        context.num_tickets = tickets
        return context

    client = ssl.create_default_context(cafile=str(device.ca_file))
    client.load_cert_chain(device.cert_file, device.key_file)
    variants = {"2 tickets (OpenSSL's default)": server(2), "1 ticket (the endpoint)": server(1),
                "no ticket": server(0),
                "1 ticket, no client certificate": server(1, ssl.CERT_NONE)}
    full: dict[str, list[float]] = {label: [] for label in variants}
    resumed: dict[str, list[float]] = {label: [] for label in variants}
    reused = dict.fromkeys(variants, 0)
    # Rounds of every variant in turn: the machine's load drifts, and the median of three
    # interleaved rounds compares like with like.
    for _ in range(3):
        for label, context in variants.items():
            session = None
            cpu = 0.0
            for _ in range(count):
                spent, session, _ = _handshake(context, client, None)
                cpu += spent
            full[label].append(cpu / count)
            cpu = 0.0
            for _ in range(count):
                spent, _, was = _handshake(context, client, session)
                cpu += spent
                reused[label] += was
            resumed[label].append(cpu / count)
    return [f"handshake, {label:<32} full {statistics.median(full[label]) * 1e3:5.2f} ms, "
            f"resumed {statistics.median(resumed[label]) * 1e3:5.2f} ms "
            f"({reused[label]}/{3 * count} resumed; server CPU, median of 3 rounds)"
            for label in variants]


# --- measuring ----------------------------------------------------------------------------------

def postgres_backends(db_url: str) -> list[psutil.Process]:
    """The PostgreSQL backends of this process's connections."""
    ports = [c.laddr.port for c in psutil.Process().net_connections("tcp")
             if c.raddr and c.raddr.port == 5432]
    with psycopg.connect(PG_URL, autocommit=True) as db:
        rows = db.execute("SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)",
                          (ports,)).fetchall()
    found = []
    for (pid,) in rows:
        with suppress(psutil.NoSuchProcess):
            found.append(psutil.Process(pid))
    return found


def cpu_of(processes: Sequence[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


@dataclass
class Phase:
    """One measured phase."""

    name: str
    requests: int
    ok: int
    body_bytes: int
    resumed: int
    server_cpu: float
    db_cpu: float
    client_cpu: float
    wall: float

    def line(self) -> str:
        per_gb = (self.server_cpu + self.db_cpu) / (self.body_bytes / 1e9) \
            if self.body_bytes else float("nan")
        per_request = (self.server_cpu + self.db_cpu) / max(1, self.requests) * 1e3
        return (f"{self.name:<28} {self.ok:>5}/{self.requests:<5} {self.body_bytes / 1e9:6.2f} GB "
                f"server {self.server_cpu:6.2f} s + db {self.db_cpu:5.2f} s = "
                f"{per_gb:5.2f} s/GB, {per_request:6.3f} ms/request; clients "
                f"{self.client_cpu:6.2f} s; wall {self.wall:6.2f} s; resumed {self.resumed}")


def measure(name: str, run: Any, servers: Sequence[psutil.Process],
            db: Sequence[psutil.Process], requests: int) -> Phase:
    """Run ``run()`` (returning the clients' totals) and what it cost."""
    server_before, db_before = cpu_of(servers), cpu_of(db)
    started = time.perf_counter()
    ok, received, resumed, client_cpu = run()
    wall = time.perf_counter() - started
    return Phase(name, requests, ok, received, resumed, cpu_of(servers) - server_before,
                 cpu_of(db) - db_before, client_cpu, wall)


# --- set-up -------------------------------------------------------------------------------------

def enroll(registry: Registry, ca: FleetCA, home: Path, count: int) -> list[TLSIdentity]:
    """``count`` devices with certificates signed by ``ca``, recorded in ``registry``."""
    identities = []
    for i in range(count):
        device = f"dev-{i:05d}"
        identity, fingerprint = issue_device(ca, home / "devices", device)
        registry.enroll_device(registry.issue_token("bench", 3600), device, profile="bench",
                               cert_fingerprint=fingerprint)
        identities.append(identity)
    return identities


@contextmanager
def fresh_schema() -> Iterator[str]:
    schema = f"bytes_{secrets.token_hex(4)}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{PG_URL}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200, help="enrolled devices")
    parser.add_argument("--downloads", type=int, default=200,
                        help="whole downloads in the bytes phase (devices in turn)")
    parser.add_argument("--bundle-bytes", type=int, default=5 * 2**20)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--handshakes", type=int, default=200,
                        help="in-memory TLS handshakes per variant and round")
    parser.add_argument("--mirror", choices=("nginx",), help="also measure an nginx mirror")
    parser.add_argument("--keep", type=Path, metavar="DIR")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import fleet_server

    print(f"fleet_server from {Path(fleet_server.__file__).parent}; load average "
          f"{os.getloadavg()[0]:.2f}; {args.devices} devices, {args.downloads} downloads of "
          f"{args.bundle_bytes / 2**20:.1f} MiB, {args.clients} client processes")
    clients = Clients(args.clients)
    with work_dir(args.keep) as home, fresh_schema() as db_url:
        ca = FleetCA.create(home / "ca", "bench")
        registry = open_registry(db_url, blob_dir=home / "bundles")
        try:
            record = registry.put_bundle(make_bundle(home / "keys", args.bundle_bytes),
                                         "bench", 1)
            identities = enroll(registry, ca, home, args.devices)
            registry.set_desired(record.sha256, group="bench")
            downloads = [identities[i % len(identities)] for i in range(args.downloads)]
            tls = ca.write_identity(ca.issue_server_cert(common_name="edgefleet-bundles"),
                                    home / "server-tls", "bundles")
            handshakes = handshake_costs(tls, identities[0], args.handshakes)
            phases = run_phases(args, registry, tls, record.sha256, identities=identities,
                                downloads=downloads, clients=clients, db_url=db_url,
                                home=home)
        finally:
            registry.close()
            clients.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for phase in phases:
        print(phase.line())
    for line in handshakes:
        print(line)
    return 0 if all(p.ok == p.requests for p in phases if p.requests) else 1


def run_phases(args: argparse.Namespace, registry: Registry, tls: TLSIdentity, sha: str, *,
               identities: list[TLSIdentity], downloads: list[TLSIdentity], clients: Clients,
               db_url: str, home: Path) -> list[Phase]:
    me = [psutil.Process()]
    path = f"/bundles/{bundle_path(sha)}"
    phases = []
    with BundleHttpServer(registry, tls, host="127.0.0.1") as endpoint:
        db = postgres_backends(db_url)
        certs = [(i.cert_file.parent.name, ssl.PEM_cert_to_DER_cert(i.cert_file.read_text()))
                 for i in identities]
        phases.append(measure("authorize (in-process)", lambda: _authorize_all(
            endpoint, certs, sha), me, db, len(identities)))
        port = endpoint.port
        phases.append(measure("endpoint HEAD, new session", lambda: clients.run(
            port, path, "HEAD", identities), me, db, len(identities)))
        phases.append(measure("endpoint HEAD, resumed", lambda: clients.run(
            port, path, "HEAD", identities, resume=True), me, db, len(identities)))
        phases.append(measure("endpoint GET", lambda: clients.run(
            port, path, "GET", downloads), me, db, len(downloads)))
    blob = (registry.blob_dir or home) / bundle_path(sha)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    context.load_verify_locations(tls.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    floor = FloorServer(context, blob.read_bytes())
    try:
        phases.append(measure("floor HEAD (TLS only)", lambda: clients.run(
            floor.port, path, "HEAD", identities), me, [], len(identities)))
        phases.append(measure("floor GET (TLS only)", lambda: clients.run(
            floor.port, path, "GET", downloads), me, [], len(downloads)))
    finally:
        floor.stop()
    if args.mirror == "nginx":
        if nginx_binary() is None:
            print("--mirror nginx: nginx is not installed here (apt-get install nginx-light); "
                  "skipped")
        else:
            with start_nginx(blob.parent, home / "nginx") as (port, master):
                workers = [master, *master.children()]
                phases.append(measure("nginx GET (plain HTTP)", lambda: clients.run(
                    port, f"/{bundle_path(sha)}", "GET", downloads, tls=False), workers, [],
                    len(downloads)))
    return phases


def _authorize_all(endpoint: BundleHttpServer, certs: Sequence[tuple[str, bytes]],
                   sha: str) -> tuple[int, int, int, float]:
    """Authorize one download per device, as the request threads do."""
    ok = sum(endpoint.authorize(device, der, sha) is not None for device, der in certs)
    return ok, 0, 0, 0.0


if __name__ == "__main__":
    raise SystemExit(main())
