"""Telemetry benchmark: what sampling on its own thread and the outbox cost an idle agent.

In one run, against a baseline measured side by side in the same run:

1. **CPU and RSS of an idle connected agent**, with and without telemetry. Each agent is a
   child process as ``edge-agent run`` builds it (a ``Runtime`` serving the digits model
   after 200 requests, a ``FleetLink`` with mutual TLS to a real embedded Mosquitto, its
   outbox in its own state directory), the baseline with ``telemetry=None``. Both run at
   the same time for the same window; the difference is the sampler, the outbox writes and
   the publishing of samples. First at one sample a second (to measure the cost of one
   sample), then at the default interval (30 s). Target: the agent's idle CPU < 1%.
2. **The outbox's write latency**: ``add_sample`` of a real sample (committed with a full
   fsync) and ``ack`` of one, on this machine's disk.

Run::

    .venv/bin/python benchmarks/telemetry_bench.py [--window 30] [--default-window 120]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_DATA = ROOT / "models" / "digits_data.npz"
FLEET = "bench"


@dataclass(frozen=True)
class Fleet:
    """A fleet CA and its embedded broker, in a temporary directory."""

    directory: Path
    broker_url: str

    def device(self, device_id: str) -> list[str]:
        """Identity files for ``device_id`` (made as enrollment makes them)."""
        from common.atomic import write_atomic
        from fleet_server.ca import FleetCA
        from transport.x509 import make_device_key_and_csr

        ca = FleetCA.load(self.directory / "ca")
        key_pem, csr_pem = make_device_key_and_csr(device_id)
        folder = self.directory / "devices" / device_id
        write_atomic(folder / "device.key", key_pem, 0o600)
        write_atomic(folder / "device.crt", ca.sign_device_csr(csr_pem, device_id))
        write_atomic(folder / "ca.crt", ca.cert_pem)
        return [str(folder / name) for name in ("ca.crt", "device.crt", "device.key")]


@contextmanager
def fleet(directory: Path) -> Iterator[Fleet]:
    from fleet_server.broker import Broker, BrokerConfig
    from fleet_server.ca import FleetCA

    ca = FleetCA.create(directory / "ca", FLEET)
    tls = ca.write_identity(ca.issue_server_cert(), directory / "broker-tls", "broker")
    with Broker.embedded(BrokerConfig(FLEET, directory / "broker", tls,
                                      bind_address="127.0.0.1")) as broker:
        yield Fleet(directory, broker.address.url)


@dataclass
class Child:
    """An agent in a child process, and its CPU time at the start of the window."""

    name: str
    process: psutil.Popen
    cpu_start: float = 0.0

    def cpu(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)


def start_agent(fleet: Fleet, name: str, interval: float, state: Path) -> Child:
    """An agent as ``edge-agent run`` builds it; interval 0: no telemetry."""
    ca_file, cert_file, key_file = fleet.device(name)
    process = psutil.Popen([sys.executable, __file__, "--child", str(state), fleet.broker_url,
                            name, ca_file, cert_file, key_file, str(interval)],
                           cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    line = process.stdout.readline().strip()
    if line != "ready":
        raise SystemExit(f"agent {name} did not start: {line!r}")
    return Child(name, process)


def child(arguments: list[str]) -> None:
    """The agent process: serve digits, follow the fleet, sample; until stdin closes.
    ``arguments``: state dir, broker URL, device id, CA, certificate and key files,
    telemetry interval (0: none)."""
    from agent.config import FleetSettings
    from agent.fleet_link import FleetLink
    from agent.runtime import Runtime
    from agent.telemetry import TelemetryCollector

    state, broker_url, device, ca_file, cert_file, key_file, every = arguments
    interval = float(every)
    runtime = Runtime(Path(state))
    runtime.load_file(DIGITS, "digits")
    x = np.load(DIGITS_DATA)["eval_x"][:1]
    for _ in range(200):
        runtime.infer("digits", {"input": x})
    settings = FleetSettings(FLEET, device, broker_url, Path(ca_file), Path(cert_file),
                             Path(key_file), telemetry_interval_s=interval or 30.0)
    link = FleetLink(runtime, settings,
                     telemetry=TelemetryCollector(runtime) if interval else None)
    link.start()
    deadline = time.monotonic() + 30
    while not link.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    print("ready" if link.connected else "not connected", flush=True)
    sys.stdin.read()
    link.stop()
    runtime.close()
    waiting = len(link.outbox)
    print(f"outbox {waiting}", flush=True)


def _kill(process: psutil.Popen) -> None:
    if process.poll() is None:
        process.kill()


def measure(fleet: Fleet, tmp: Path, interval: float, window: float) -> None:
    with ExitStack() as stack:
        agents = []
        for name, every in ((f"base-{interval:g}", 0.0), (f"tele-{interval:g}", interval)):
            agent = start_agent(fleet, name, every, tmp / name)
            stack.callback(_kill, agent.process)
            agents.append(agent)
        time.sleep(2.0)  # past start-up: the first sample, connecting, the first report
        for agent in agents:
            agent.cpu_start = agent.cpu()
        started = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - started
        used = {a.name: a.cpu() - a.cpu_start for a in agents}
        rss = {a.name: a.process.memory_info().rss / 2**20 for a in agents}
        for agent in agents:
            assert agent.process.stdin is not None
            agent.process.stdin.close()
            tail = agent.process.stdout.read().strip()
            agent.process.wait(30)
            print(f"    {agent.name}: stopped cleanly, {tail} message(s) left unsent")
    base, tele = agents[0].name, agents[1].name
    samples = elapsed / interval
    extra = used[tele] - used[base]
    print(f"  interval {interval:g} s over {elapsed:.1f} s (~{samples:.0f} samples):")
    print(f"    CPU without telemetry {used[base]:.3f} s = {100 * used[base] / elapsed:.3f}%; "
          f"with telemetry {used[tele]:.3f} s = {100 * used[tele] / elapsed:.3f}% "
          f"(target < 1%)")
    print(f"    difference {extra * 1e3:.1f} ms CPU = {extra * 1e3 / samples:.2f} ms per sample"
          f" (sampled, stored with fsync, published, acknowledged)")
    print(f"    RSS without telemetry {rss[base]:.1f} MB, with {rss[tele]:.1f} MB")


def bench_outbox(tmp: Path) -> None:
    from agent.outbox import Outbox
    from agent.runtime import Runtime
    from agent.telemetry import TelemetryCollector

    runtime = Runtime()
    runtime.load_file(DIGITS, "digits")
    metrics = TelemetryCollector(runtime).collect()
    with Outbox(tmp / "outbox.db") as outbox:
        adds, acks = [], []
        for _ in range(300):
            started = time.perf_counter()
            sample = outbox.add_sample(time.time(), metrics)
            adds.append(time.perf_counter() - started)
            started = time.perf_counter()
            outbox.ack([sample.seq])
            acks.append(time.perf_counter() - started)
    runtime.close()
    for label, values in (("add_sample", adds), ("ack", acks)):
        p50, p99 = np.percentile(values, [50, 99]) * 1e3
        print(f"  {label}: p50 {p50:.2f} ms, p99 {p99:.2f} ms (300, one sample of "
              f"{len(str(metrics))} characters, on {tmp})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=30.0,
                        help="seconds measured at one sample a second")
    parser.add_argument("--default-window", type=float, default=120.0,
                        help="seconds measured at the default interval (30 s)")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="telemetry-bench-") as tmp_name:
        tmp = Path(tmp_name)
        print("outbox writes:")
        bench_outbox(tmp)
        with fleet(tmp / "fleet") as running:
            print("idle agents, side by side:")
            measure(running, tmp, 1.0, args.window)
            measure(running, tmp, 30.0, args.default_window)


if __name__ == "__main__":
    main()
