"""Publishing desired states to a group: ``Publisher.publish`` and ``republish_all`` on the
local PostgreSQL and a real (embedded) Mosquitto, at 1,000 and 10,000 devices.

The question it answers (docs/benchmarks.md, "Publishing desired states in batches (issue
16)"): what a ``fleet publish --group`` to every device of a large group costs the server
process, and the broker, and what the re-publish of every desired state on each connection
to the broker costs. The fleet is ``--devices`` devices written straight into the registry
(no certificates: nobody connects), each running v1 of a model and desired v1; the
measured publish makes v2 desired for the group ``fleet`` (the first ``--group`` devices),
then every device's desired state is re-published (``republish_all``).

Printed per operation: wall seconds until the call returned and until the broker had
acknowledged every message (a sentinel published after them is), CPU seconds of this
process (``time.process_time``: the publish and paho's network thread), of the broker
(psutil, counted until it has been idle for a second, so the messages it routed after the
call returned are in), and of the PostgreSQL backends serving this process.

``--code DIR`` runs another checkout's ``fleet_server`` (the baseline: ``git archive`` of
main into DIR), with this script and the test helpers of that checkout::

    .venv/bin/python benchmarks/publish_bench.py --devices 10000 --group 10000
    .venv/bin/python benchmarks/publish_bench.py --devices 1000 --group 1000 --code /tmp/base
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000, help="devices in the registry")
    parser.add_argument("--group", type=int, default=10_000,
                        help="how many of them are in the published group")
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="checkout whose fleet_server runs (default: this one)")
    return parser.parse_args(argv)


def _cpu(processes: list[Any]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def _settled(broker: Any) -> None:
    """Wait until the broker has used no CPU for a second (it has routed everything)."""
    last = _cpu([broker])
    while True:
        time.sleep(1.0)
        now = _cpu([broker])
        if now - last < 0.01:
            return
        last = now


def _populate(service: Any, v1: bytes, devices: int, group: int) -> None:
    """``devices`` devices, the first ``group`` in group ``fleet``, desired and running v1."""
    from protocol import messages

    registry = service.registry
    first = service.add_bundle(v1)
    ids = [f"gw-{i:05}" for i in range(devices)]
    for start in range(0, len(ids), 1000):
        with registry.batch():
            for i, device in enumerate(ids[start:start + 1000], start):
                registry.upsert_device(device, group="fleet" if i < group else "rest",
                                       profile="x86_64-avx2", cert_fingerprint="ab" * 32,
                                       tags=["eu"])
    registry.set_desired(first.sha256, group="fleet")
    report = messages.encode(messages.Reported(
        "x86_64-avx2", "0.1.0", {"digits": messages.ModelReport(1, first.sha256, "committed")},
        {}, time.time()))
    for start in range(0, len(ids), 1000):
        with registry.batch():
            for device in ids[start:start + 1000]:
                registry.set_reported(device, report)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    sys.path.insert(0, str(args.code.resolve()))
    import psutil

    from fleet_server.service import FleetService
    from protocol.topics import device_topic
    from tests.bundle.repo import Repo, spec
    from tests.fleet_server.server_env import service_config, write_keys
    from tests.postgres import postgres_schema

    print(f"code: {args.code}; {args.devices} devices, group of {args.group}")
    repo = Repo()
    v1, v2 = repo.build(spec("digits", 1)), repo.build(spec("digits", 2))
    with tempfile.TemporaryDirectory() as tmp, postgres_schema() as (url, admin):
        keys = write_keys(Path(tmp) / "keys", repo)
        service: Any = FleetService(service_config(Path(tmp) / "server", keys, url))
        service.start()
        try:
            _populate(service, v1, args.devices, args.group)
            second = service.add_bundle(v2)
            me = psutil.Process()
            broker = next(p for p in me.children(recursive=True) if "mosquitto" in p.name())
            ports = [c.laddr.port for c in me.net_connections(kind="tcp")
                     if c.raddr and c.raddr.port == 5432]
            backends = [psutil.Process(row[0]) for row in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)",
                (ports,)).fetchall()]
            print(f"PostgreSQL backends of this process: {len(backends)}")
            _settled(broker)
            load = psutil.getloadavg()
            print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
            operations: list[tuple[str, Callable[[], object]]] = [
                ("publish --group fleet", lambda: service.publish(second.sha256, group="fleet")),
                ("republish_all", service.republish_all)]
            for name, operation in operations:
                cpu0, broker0, pg0 = time.process_time(), _cpu([broker]), _cpu(backends)
                wall0 = time.perf_counter()
                operation()
                wall = time.perf_counter() - wall0
                # paho sends queued messages in order as PUBACKs free its in-flight window:
                # once a sentinel published now is acknowledged, the broker has them all.
                client = service._link._client
                client.publish(device_topic(service.fleet, "sentinel", "desired"), b"",
                               qos=1).wait_for_publish(600)
                sent = time.perf_counter() - wall0
                _settled(broker)
                print(f"{name}: returned after {wall:.2f} s, all at the broker after "
                      f"{sent:.2f} s (wall); CPU s: server "
                      f"{time.process_time() - cpu0:.2f}, broker "
                      f"{_cpu([broker]) - broker0:.2f}, PostgreSQL {_cpu(backends) - pg0:.2f}")
        finally:
            service.stop()
    load = psutil.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
