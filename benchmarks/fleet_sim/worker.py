"""The device worker processes: each runs its share of the simulated devices in one
``selectors`` loop over non-blocking sockets, driven by the parent through a pipe
(:class:`WorkerPool`)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import selectors
import ssl
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import psutil

from fleet_sim.device import REQUEST_TIMEOUT_S, WINDOW, Device, DeviceSpec
from protocol import messages
from transport.mqtt import tls_context

TICK_S = 0.25
#: Concurrent HTTP downloads per worker process.
HTTP_THREADS = 8


@dataclass
class WorkerConfig:
    host: str
    port: int
    fleet: str
    devices: list[DeviceSpec]
    root_json: bytes
    window: int = WINDOW
    request_timeout: float = REQUEST_TIMEOUT_S
    chatter: bool = True
    verify: bool = False
    connect_concurrency: int = 32
    #: Devices whose id starts with one of these download over HTTP(S) from the desired
    #: state's URLs; the others ignore the URLs and fetch chunks over MQTT.
    http_prefixes: tuple[str, ...] = ()


class Worker:
    """Runs its share of the devices in one selector loop; talks to the parent over a pipe:
    ``go`` -> connect all and answer ``connected``; ``watch PREFIX SHA`` -> ``finished
    PREFIX`` once every device whose id starts with PREFIX has installed SHA; ``telemetry
    COUNT FIRST_SEQ`` -> every connected device sends COUNT samples at once, answer
    ``telemetry SENT``; ``collect`` -> ``results``; ``stop``."""

    def __init__(self, config: WorkerConfig, pipe: Connection) -> None:
        self.host, self.port, self.fleet = config.host, config.port, config.fleet
        self.window, self.request_timeout = config.window, config.request_timeout
        self.chatter, self.verify, self.root_json = (config.chatter, config.verify,
                                                     config.root_json)
        self.concurrency = config.connect_concurrency
        self.http_prefixes = config.http_prefixes
        self.http_pool = concurrent.futures.ThreadPoolExecutor(HTTP_THREADS)
        self.pipe = pipe
        self.selector = selectors.DefaultSelector()
        self.devices = [Device(spec, self) for spec in config.devices]
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.to_connect: list[Device] = []
        self.connecting = 0
        self.ready: list[tuple[str, float]] = []
        self.failed: list[tuple[str, str]] = []
        self.connect_reported = False
        self.stopping = False
        #: device id prefix -> (bundle sha256, devices of the prefix yet to install it)
        self.watching: dict[str, tuple[str, int]] = {}

    def context(self, spec: DeviceSpec) -> ssl.SSLContext:
        return self.contexts[spec.id]

    def prepare(self) -> None:
        """Load every device's TLS identity (the agent's own TLS context, transport.mqtt)."""
        for device in self.devices:
            self.contexts[device.id] = tls_context(device.spec.identity)

    def on_ready(self, device: Device) -> None:
        self.ready.append((device.id, time.time()))
        self.connecting -= 1
        self._start_more()

    def on_failed(self, device: Device) -> None:
        """A device that had not finished connecting gave up (later failures are kept in
        ``device.error``)."""
        if device.state in ("idle", "tcp", "tls", "connack", "suback"):
            self.failed.append((device.id, device.error or "failed"))
            self.connecting -= 1
            self._start_more()

    def on_finished(self, device: Device, sha: str) -> None:
        """Tell the parent when every watched device has finished (and reported)."""
        for prefix, (want, left) in list(self.watching.items()):
            if want == sha and device.id.startswith(prefix):
                self._count_down(prefix, want, left - 1)

    def _count_down(self, prefix: str, sha: str, left: int) -> None:
        if left > 0:
            self.watching[prefix] = (sha, left)
            return
        self.watching.pop(prefix, None)
        self.pipe.send(("finished", prefix))

    def _start_more(self) -> None:
        while self.to_connect and self.connecting < self.concurrency:
            device = self.to_connect.pop()
            self.connecting += 1
            device.start()

    def run(self) -> None:
        self.prepare()
        self.pipe.send(("prepared", len(self.devices)))
        self.selector.register(self.pipe, selectors.EVENT_READ, None)
        next_tick = time.monotonic() + TICK_S
        while not self.stopping:
            timeout = max(0.0, next_tick - time.monotonic())
            for key, mask in self.selector.select(timeout):
                if key.data is None:
                    self._command()
                else:
                    key.data.on_event(mask)
            if (not self.connect_reported and self.to_connect == [] and self.connecting == 0
                    and self.ready_or_failed()):
                self.connect_reported = True
                self.pipe.send(("connected", self.ready, self.failed))
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                for device in self.devices:
                    device.tick(now)

    def ready_or_failed(self) -> bool:
        return len(self.ready) + len(self.failed) >= len(self.devices)

    def _command(self) -> None:
        try:
            command, *args = self.pipe.recv()
        except EOFError:
            self.stopping = True
            return
        if command == "go":
            self.to_connect = list(reversed(self.devices))
            self._start_more()
        elif command == "watch":
            prefix, sha = args
            self._count_down(prefix, sha, sum(
                1 for d in self.devices if d.id.startswith(prefix)
                and not any(r["sha256"] == sha for r in d.results)))
        elif command == "collect":
            results = [r for d in self.devices for r in d.results]
            errors = [(d.id, d.error) for d in self.devices if d.error]
            self.pipe.send(("results", results, errors))
        elif command == "stop":
            for device in self.devices:
                device.disconnect()
            self.pipe.send(("stopped",))
            self.stopping = True
        elif command == "telemetry":
            self.pipe.send(("telemetry", self.send_telemetry(*args)))
        else:
            raise ValueError(f"unknown worker command {command!r}")

    def send_telemetry(self, count: int, first_seq: int) -> int:
        """Every connected device sends ``count`` samples at once; returns how many."""
        sent = 0
        for device in self.devices:
            if device.state != "ready":
                continue
            for seq in range(first_seq, first_seq + count):
                device.publish("telemetry", messages.encode(messages.Telemetry(
                    seq, time.time(), {"cpu_percent": 12.5, "requests": seq})))
                sent += 1
        return sent


def worker_main(config: WorkerConfig, pipe: Connection) -> None:
    """Entry point of a worker process."""
    with suppress(KeyboardInterrupt):
        Worker(config, pipe).run()


class WorkerPool:
    """The device worker processes of a benchmark and the parent's end of their pipes."""

    def __init__(self) -> None:
        self.workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []

    @property
    def pipes(self) -> list[Connection]:
        return [pipe for _, pipe in self.workers]

    def start(self, configs: Sequence[WorkerConfig], name: str) -> None:
        """One worker process per config, named ``name-N``; returns once each has loaded
        its devices' TLS identities."""
        context = multiprocessing.get_context("spawn")
        for w, config in enumerate(configs):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(config, child),
                                      name=f"{name}-{w}", daemon=True)
            process.start()
            child.close()
            self.workers.append((process, parent))
        for pipe in self.pipes:
            reply = pipe.recv()
            assert reply[0] == "prepared", reply

    def processes(self) -> list[psutil.Process]:
        return [psutil.Process(p.pid) for p, _ in self.workers if p.pid is not None]

    def connect(self) -> tuple[float, int, list[tuple[str, str]]]:
        """Connect every device; (seconds until the last SUBACK, devices ready, failures)."""
        started = time.time()
        for pipe in self.pipes:
            pipe.send(("go",))
        last, ready, failed = started, 0, []
        for pipe in self.pipes:
            kind, ready_list, failed_list = pipe.recv()
            assert kind == "connected"
            ready += len(ready_list)
            failed += failed_list
            last = max([last, *(t for _, t in ready_list)])
        return last - started, ready, failed

    def collect(self) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Every device's finished fetches, and the devices' errors."""
        results: list[dict[str, Any]] = []
        errors: list[tuple[str, str]] = []
        for pipe in self.pipes:
            pipe.send(("collect",))
        for pipe in self.pipes:
            reply = pipe.recv()
            while reply[0] == "finished":  # of a watch the parent stopped waiting for
                reply = pipe.recv()
            kind, r, e = reply
            assert kind == "results"
            results += r
            errors += e
        return results, errors

    def stop(self) -> None:
        for process, pipe in self.workers:
            try:
                pipe.send(("stop",))
                pipe.recv()
            except (OSError, EOFError):
                pass
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
        self.workers = []
