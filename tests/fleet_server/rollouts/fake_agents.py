"""Devices that speak the fleet protocol over real MQTT the way agents do, without a
runtime: they follow their desired state (install = report the version; a failing version
reports an install failure) and send telemetry in the format of docs/telemetry.md and the
monitoring contract (``previous``/``shadow`` comparisons with agreement), so the server's
rollout machinery can be tested end to end before the agent reports those fields."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import write_atomic
from fleet_server.api_client import ServerClient
from protocol import messages
from protocol.topics import device_topic
from tests.mqtt_broker import Recorder
from transport.mqtt import BrokerAddress, ClientSettings, TLSIdentity, create_client
from transport.x509 import make_device_key_and_csr

#: How a version behaves: (install fails, share of compared answers that agree).
Behaviour = Callable[[int], tuple[bool, float]]


def good(_version: int) -> tuple[bool, float]:
    return False, 1.0


@dataclass
class FakeAgent:
    """One enrolled device."""

    id: str
    fleet: str
    broker_url: str
    identity: TLSIdentity
    behaviour: Behaviour = good
    recorder: Recorder | None = None
    version: int | None = None
    kept: int | None = None
    install: tuple[int, str] | None = None
    seq: int = 0
    served: set[int] = field(default_factory=set)
    desired_seen: list[int] = field(default_factory=list)

    def connect(self) -> None:
        self.recorder = Recorder(create_client(ClientSettings(
            BrokerAddress.from_url(self.broker_url), self.identity)))
        self.recorder.connect()
        self.recorder.subscribe(self.topic("desired"))

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    def topic(self, leaf: str) -> str:
        return device_topic(self.fleet, self.id, leaf)

    def desired(self) -> messages.DesiredModel | None:
        recorder = self.recorder
        if recorder is None:
            return None
        with recorder._changed:
            payloads = [m.payload for m in recorder.messages if m.topic == self.topic("desired")]
        if not payloads:
            return None
        return messages.decode_desired(bytes(payloads[-1])).models.get("digits")

    def step(self) -> None:
        """Follow the desired state, then report and send one telemetry sample."""
        recorder = self.recorder
        want = self.desired()
        if recorder is None or not recorder.client.is_connected():
            return
        if want is not None and self.desired_seen[-1:] != [want.version]:
            self.desired_seen.append(want.version)
        if want is not None and want.version != self.version:
            fails, _ = self.behaviour(want.version)
            if want.version == self.kept:          # blue-green: switch back at once
                self.version, self.kept = self.kept, None
                self.install = (want.version, "committed")
            elif fails:
                self.install = (want.version, "failed")
            else:
                self.kept = self.version if want.compare_previous > 0 else None
                self.version = want.version
                self.served.add(want.version)
                self.install = (want.version, "committed")
        installs = {} if self.install is None else {"digits": messages.InstallReport(
            self.install[0], None, self.install[1])}
        models = {} if self.version is None else {"digits": messages.ModelReport(
            self.version, None, "committed")}
        recorder.client.publish(self.topic("reported"), messages.encode(messages.Reported(
            "x86-avx2", "fake", models, installs, at=time.time())), qos=1)
        if self.version is not None:
            self.seq += 1
            recorder.client.publish(self.topic("telemetry"), messages.encode(
                messages.Telemetry(self.seq, time.time(), self._metrics(want))), qos=1)

    def _metrics(self, want: messages.DesiredModel | None) -> dict[str, Any]:
        assert self.version is not None
        entry: dict[str, Any] = {"version": self.version, "state": "serving",
                                 "requests": 100, "errors": 0, "p50_ms": 1.0, "p99_ms": 2.0}
        compared = (self.kept if want is not None and want.compare_previous > 0 else None)
        if compared is not None:
            entry["previous"] = _comparison(compared, self.behaviour(self.version)[1])
        if want is not None and want.shadow is not None:
            entry["shadow"] = _comparison(want.shadow.version,
                                          self.behaviour(want.shadow.version)[1])
        return {"interval_s": 1.0, "models": {"digits": entry}}


def _comparison(version: int, agreement: float) -> dict[str, Any]:
    n = 60
    agree = round(n * agreement)
    return {"version": version, "requests": n, "errors": 0, "dropped": 0, "p50_ms": 1.0,
            "p99_ms": 2.0, "agreement": {"metric": "top1", "n": n, "agree": agree,
                                         "mean": agree / n},
            "confidence_shift": 0.0}


def enroll_agent(api_url: str, ca_file: Path, token: str, device_id: str, *, home: Path,
                 profile: str, behaviour: Behaviour = good) -> FakeAgent:
    """Enroll over the API as edge-agent does; the agent is not connected yet."""
    key, csr = make_device_key_and_csr(device_id)
    answer = ServerClient(api_url, "", ca_file).post("/api/enroll", {
        "token": token, "device_id": device_id, "csr": csr.decode(), "profile": profile})
    write_atomic(home / "device.key", key, 0o600)
    write_atomic(home / "device.crt", answer["certificate"].encode())
    write_atomic(home / "ca.crt", answer["ca_certificate"].encode())
    return FakeAgent(device_id, answer["fleet"], answer["broker_url"],
                     TLSIdentity(home / "ca.crt", home / "device.crt", home / "device.key"),
                     behaviour)


class AgentLoop:
    """Steps every agent every ``period`` s on a thread, until closed."""

    def __init__(self, agents: list[FakeAgent], period: float = 0.3) -> None:
        self.agents = agents
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._period = period
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            for agent in self.agents:
                try:
                    agent.step()
                except Exception:  # a broker going away mid-publish: next round
                    continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def server_info(data: Path) -> dict[str, Any]:
    """DATA/server.json of a running ``fleet serve``."""
    return dict(json.loads((data / "server.json").read_text()))
