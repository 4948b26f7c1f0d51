"""Faults injected into a live fleet (:mod:`tests.fleet_server.live_fleet`), and the checks
every fault test ends with: the fleet converged, nothing was lost, nothing leaked on disk.

- *Nothing lost, events*: for every install record a device keeps, the server holds exactly
  one ``agent.install.<state>`` event per transition in the record's history (none missing,
  none twice), in order.
- *Nothing lost, telemetry*: every sample slot of a run is either stored at the server or
  counted in a later sample's ``dropped``.
- *Nothing leaked*: ``incoming/`` is empty and the model store holds only the active and
  previous slots, once no install is pending.

The faults are real: ``kill -9`` of real processes (:func:`kill_9`), a small tmpfs that
really fills up (:func:`small_disk`, the tests run as root), SIGSTOP of the broker as a
half-open link for every client (:func:`frozen`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.client import AgentClient
from agent.daemon import find_running
from tests.fleet_server.live_fleet import GROUP, LiveFleet

MODEL = "digits"
#: Set to run the long series (every state several times, many random kills).
LONG_ENV = "EDGEFLEET_FAULTS_LONG"


def long_run() -> bool:
    """Whether the long fault series was asked for (``EDGEFLEET_FAULTS_LONG=1``)."""
    return os.environ.get(LONG_ENV, "") not in ("", "0")


def join(fleet: LiveFleet, device: str, state: Path | None = None) -> Path:
    """Enroll ``device`` into the test group and start its agent; its state directory."""
    state = state or fleet.state(device)
    fleet.enroll(device, fleet.token("--group", GROUP), state=state)
    fleet.run_agent(device, state)
    return state


def publish(fleet: LiveFleet, bundle: Path, *, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
    """``fleet publish BUNDLE --group lab``."""
    return fleet.fleet("publish", bundle, "--group", GROUP, "--data", fleet.data, check=check)


def kill_9(fleet: LiveFleet, name: str) -> None:
    """SIGKILL the process ``name`` of ``fleet`` (if it still runs) and reap it."""
    process = fleet.processes.pop(name)
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def wait_exited(fleet: LiveFleet, name: str, timeout: float = 120.0) -> int:
    """Wait for ``name`` to exit by itself (a fault-injection hook killed it); its code."""
    process = fleet.processes[name]
    fleet.wait(lambda: process.poll() is not None, f"{name} to exit", timeout)
    del fleet.processes[name]
    return process.wait()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def broker_pid(fleet: LiveFleet) -> int | None:
    """The embedded Mosquitto's pid, from its pid file (None while it is being written)."""
    for pid_file in fleet.data.glob("**/mosquitto.pid"):
        text = pid_file.read_text().strip()
        return int(text) if text.isdigit() else None
    return None


def running_broker(fleet: LiveFleet) -> int:
    """Wait for the embedded Mosquitto to run; its pid."""
    found: list[int] = []

    def running() -> bool:
        pid = broker_pid(fleet)
        if pid is not None and pid_alive(pid):
            found.append(pid)
        return bool(found)

    fleet.wait(running, "the broker to run")
    return found[-1]


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block: its TCP connections stay up and nothing answers (a
    half-open link for every client of a broker)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# -- a device behind its own link ------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A network namespace joined to the host by a veth pair: a device's own link."""

    namespace: str
    host_side: str
    device_side: str
    host_ip: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """The command line prefix that runs a command inside the namespace."""
        return ("ip", "netns", "exec", self.namespace)

    def _sides(self) -> list[tuple[tuple[str, ...], str]]:
        return [((), self.host_side), (self.prefix, self.device_side)]

    def limit(self, rate: str) -> None:
        """Limit both directions of the link to ``rate`` (``"256kbit"``; ``tc tbf``)."""
        for where, side in self._sides():
            _ip(*where, "tc", "qdisc", "replace", "dev", side, "root", "tbf", "rate", rate,
                "burst", "16kbit", "latency", "400ms")

    @contextlib.contextmanager
    def cut(self) -> Iterator[None]:
        """Both ends of the link down for the block: every packet is lost and nobody says
        so (no RST, no FIN), the TCP connections stay established: a half-open link."""
        for where, side in self._sides():
            _ip(*where, "ip", "link", "set", side, "down")
        try:
            yield
        finally:
            for where, side in self._sides():
                _ip(*where, "ip", "link", "set", side, "up")


def _ip(*argv: str, check: bool = True) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def can_make_links() -> str | None:
    """Why network namespaces with shaped veth links cannot be made here (None: they
    can)."""
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} (iproute2) not installed" if missing else None


@contextlib.contextmanager
def own_link() -> Iterator[Link]:
    """A namespace and veth pair named after this process (so parallel runs do not meet),
    on 10.213.N.0/30; removed on exit."""
    tag = os.getpid() % 100_000
    subnet = f"10.213.{tag % 250}"
    link = Link(f"effaults{tag}", f"efh{tag}", f"efd{tag}", f"{subnet}.1")
    _ip("ip", "netns", "add", link.namespace)
    try:
        _ip("ip", "link", "add", link.host_side, "type", "veth", "peer", "name",
            link.device_side)
        _ip("ip", "link", "set", link.device_side, "netns", link.namespace)
        _ip("ip", "addr", "add", f"{subnet}.1/30", "dev", link.host_side)
        _ip("ip", "link", "set", link.host_side, "up")
        _ip(*link.prefix, "ip", "addr", "add", f"{subnet}.2/30", "dev", link.device_side)
        _ip(*link.prefix, "ip", "link", "set", link.device_side, "up")
        _ip(*link.prefix, "ip", "link", "set", "lo", "up")
        yield link
    finally:
        _ip("ip", "netns", "del", link.namespace, check=False)  # takes the veth pair along
        _ip("ip", "link", "del", link.host_side, check=False)


def use_broker_at(state: Path, host: str) -> None:
    """Point the enrolled agent in ``state`` at the broker by ``host`` (its config names
    the address the server gave at enrollment)."""
    config = state / "agent.toml"
    config.write_text(re.sub(r'(broker_url = "mqtts://)[^:"]+', rf"\g<1>{host}",
                             config.read_text()))


# -- a small disk --------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB mounted at ``path`` (created): a disk that fills up."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the file system of ``disk`` until at most ``leave`` bytes are free; the filler
    file (delete it to free the space again)."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):  # full: meant
        while (free := shutil.disk_usage(disk).free) > leave:
            f.write(bytes(min(free - leave, 1 << 20)))
    return filler


# -- what the device keeps and the server saw ----------------------------------------------


def histories(state: Path) -> dict[str, list[str]]:
    """Install id -> the states of its record's history after ``idle`` (what is announced),
    for every install record the device keeps."""
    found = {}
    for path in (state / "installs").glob("*.json"):
        record = json.loads(path.read_bytes())
        found[record["install_id"]] = [s for s, _ in record["history"]][1:]
    return found


def pending(state: Path) -> list[str]:
    """Install ids whose records are not in a terminal state."""
    done = {"committed", "rolled_back", "failed"}
    return [i for i, states in histories(state).items() if not states or states[-1] not in done]


def server_installs(fleet: LiveFleet, device: str) -> dict[str, list[str]]:
    """Install id -> the install states the server stored events for, in event order."""
    seen: dict[str, list[str]] = {}
    since = 0
    while events := fleet.api.get(f"/api/events?device={device}&since={since}"
                                  "&limit=1000")["events"]:
        for event in events:
            if event["kind"].startswith("agent.install."):
                seen.setdefault(event["detail"]["install_id"], []).append(
                    event["kind"].removeprefix("agent.install."))
        since = events[-1]["id"]
    return seen


def events_complete(fleet: LiveFleet, device: str, state: Path) -> bool:
    """Whether the server has every transition of every install record the device keeps,
    each once (see :func:`check_events`)."""
    server = server_installs(fleet, device)
    return all(server.get(i) == states for i, states in histories(state).items())


def check_events(fleet: LiveFleet, device: str, state: Path) -> int:
    """Wait until the device's installs are finished (the reported state may say committed
    a moment before the record does) and the server holds every transition its records
    hold, then assert it holds each exactly once and no more (the device keeps every
    record: the tests make fewer installs than it forgets after); returns how many
    transitions that was."""
    fleet.wait(lambda: not pending(state) and events_complete(fleet, device, state),
               f"{device}'s installs to finish and their events to reach the server")
    server, device_side = server_installs(fleet, device), histories(state)
    assert set(server) == set(device_side), (server, device_side)  # no install unannounced
    for install_id, states in device_side.items():
        assert server[install_id] == states, (install_id, server[install_id], states)
    return sum(len(s) for s in device_side.values())


def check_nothing_leaked(state: Path, model: str = MODEL) -> None:
    """No bundle file in ``incoming/``; slots only for the active and previous version."""
    assert pending(state) == [], histories(state)
    incoming = state / "incoming"
    assert not (incoming.is_dir() and list(incoming.iterdir())), list(incoming.iterdir())
    pointer = json.loads((state / "models" / model / "active.json").read_bytes())
    slots = sorted(p.name for p in (state / "models" / model).iterdir() if p.is_dir())
    assert slots == sorted(str(v) for v in {pointer["version"], pointer["previous"]}
                           if v is not None), slots


_BANNER = re.compile(r"edge-agent running: .* on (http://[0-9.:]+);")


def run_agent_without_run_file(fleet: LiveFleet, name: str, state: Path) -> AgentClient:
    """Start ``edge-agent run`` from ``state`` where it cannot write its run file (a full
    disk): ready once its banner is logged; a client for the API the banner names."""
    before = len(_BANNER.findall(fleet.log(name)))
    fleet.run_agent(name, state, ready=lambda: len(_BANNER.findall(fleet.log(name))) > before)
    url = _BANNER.findall(fleet.log(name))[-1]
    return AgentClient(url, token_file=state / "api-token", timeout=10)


def serving(state: Path, client: AgentClient | None = None) -> int | None:
    """The version of ``digits`` the agent running from ``state`` serves (None: none), asked
    through its run file or ``client``."""
    if client is None:
        running = find_running(state)
        if running is None:
            return None
        client = running.client(timeout=10)
    with client:
        models = {m["name"]: m for m in client.status()["models"]}
    return models[MODEL]["version"] if MODEL in models else None


@dataclass(frozen=True)
class Sample:
    """One telemetry sample as the server stored it."""

    at: float
    dropped: int
    interval_s: float


def telemetry(fleet: LiveFleet, device: str) -> list[Sample]:
    """``device``'s samples stored at the server (read from ``fleet.db``), oldest first."""
    with contextlib.closing(sqlite3.connect(f"file:{fleet.data / 'fleet.db'}?mode=ro",
                                            uri=True, timeout=30)) as db:
        rows = db.execute("SELECT at, payload FROM telemetry WHERE device_id = ? "
                          "ORDER BY at", (device,)).fetchall()
    samples = []
    for at, payload in rows:
        metrics: dict[str, Any] = json.loads(payload)
        samples.append(Sample(float(at), int(metrics.get("dropped", 0)),
                              float(metrics.get("interval_s") or 0.0)))
    return samples


def unaccounted_slots(samples: list[Sample], start: float, end: float,
                      restarts: Collection[float] = ()) -> int:
    """How many sample slots between ``start`` and ``end`` are neither stored nor counted
    as dropped: the slots the stored samples' spacing says were missed, less what the
    samples after them announce as dropped (never below 0). A gap with an agent start
    (``restarts``) in it is no loss: no agent ran to take the samples."""
    inside = [s for s in samples if start <= s.at <= end]
    missed = dropped = 0
    for a, b in itertools.pairwise(inside):
        if b.interval_s > 0 and not any(a.at < r < b.at for r in restarts):
            missed += max(0, round((b.at - a.at) / b.interval_s) - 1)
            dropped += b.dropped
    return max(0, missed - dropped)


def check_telemetry(fleet: LiveFleet, device: str, since: float) -> int:
    """Wait for a sample ``device`` took after now to be stored, then assert every slot
    from ``since`` to now is stored or counted as dropped; returns how many are stored."""
    now = time.time()
    fleet.wait(lambda: any(s.at >= now for s in telemetry(fleet, device)),
               f"{device}'s telemetry after the fault")
    samples = telemetry(fleet, device)
    assert unaccounted_slots(samples, since, now, fleet.started.get(device, ())) == 0, samples
    return sum(1 for s in samples if since <= s.at <= now)
