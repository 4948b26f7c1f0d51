"""A simulated fleet that drives the rollout controller with a fake clock, no broker.

Each :class:`SimDevice` follows its desired state as an agent does (an install takes a
while, then commits or fails; a kept previous version is switched back to at once;
a shadow candidate runs beside the served model) and every ``interval_s`` sends a telemetry
sample in the format agents use (docs/telemetry.md and the monitoring contract): requests,
errors, p99, ``previous``/``shadow`` comparisons, drift. What a version does on a device is
its :class:`Behaviour`, so tests and benchmarks give a version failure modes: installs that
fail, crashes, a slow model, a model that disagrees, drift; devices can go offline.

:meth:`SimFleet.run` loops ``tick`` -> apply actions -> advance time, the way the server's
runner does, and records which devices ever served which version.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from protocol.install_states import InstallState
from protocol.messages import DesiredModel, Telemetry

from .controller import Actions, observe, tick
from .model import Emit, Observation, RolloutSpec, RolloutState, SetDesired
from .plan import Target

__all__ = ["Behaviour", "SimDevice", "SimFleet", "make_spec"]


@dataclass(frozen=True)
class Behaviour:
    """How one version behaves on one device."""

    install_fails: bool = False
    #: Chance per sample that the agent crashed (the sample after a restart).
    crash_rate: float = 0.0
    p99_ms: float = 2.0
    error_rate: float = 0.0
    #: Chance that its answer agrees with the other version's on the same input.
    agreement: float = 0.998
    confidence: float = 0.95
    drift_psi: float = 0.02


@dataclass
class SimDevice:
    """One simulated agent."""

    id: str
    profile: str
    version: int | None = None
    #: The version kept loaded beside the served one (compare_previous), if any.
    kept: int | None = None
    desired: DesiredModel | None = None
    install_version: int | None = None
    install_state: str | None = None
    install_done_at: float | None = None
    online: bool = True
    samples: list[Telemetry] = field(default_factory=list)
    served: set[int] = field(default_factory=set)
    seq: int = 0


class SimFleet:
    """Devices of ``profiles`` (device id -> profile) all running ``version`` of ``model``.

    ``behaviour(device, version)`` says how a version behaves on a device; ``offline``
    maps devices to the time (s after start) they go offline (and ``back`` to when they
    return, if ever). ``install_s``: time from a new desired state to the end of the
    install.
    """

    def __init__(self, model: str, version: DesiredModel, profiles: Mapping[str, str], *,
                 behaviour: Callable[[str, int], Behaviour], seed: int = 0,
                 interval_s: float = 30.0, requests: int = 200, compared: float = 0.1,
                 install_s: float = 20.0, offline: Mapping[str, float] | None = None,
                 back: Mapping[str, float] | None = None, start: float = 1_000_000.0) -> None:
        self.model = model
        self.behaviour = behaviour
        self.random = random.Random(seed)
        self.interval_s = interval_s
        self.requests = requests
        self.compared = compared
        self.install_s = install_s
        self.offline = dict(offline or {})
        self.back = dict(back or {})
        self.start = start
        self.now = start
        self.devices = {d: SimDevice(d, p, version=version.version, desired=version,
                                     served={version.version})
                        for d, p in sorted(profiles.items())}
        self.events: list[Emit] = []
        # One sample before the rollout starts: the baseline latency.
        self._sample_all(self.now - self.interval_s)

    def targets(self) -> tuple[Target, ...]:
        """Every device as a rollout target."""
        return tuple(Target(d.id, d.profile) for d in self.devices.values())

    def previous(self) -> dict[str, DesiredModel | None]:
        """Every device's desired model now (a spec's ``previous``)."""
        return {d.id: d.desired for d in self.devices.values()}

    def apply(self, actions: Actions) -> None:
        """Perform the controller's actions on the simulated fleet."""
        for action in actions:
            if isinstance(action, Emit):
                self.events.append(action)
                continue
            assert isinstance(action, SetDesired)
            assert action.model == self.model
            for device_id, target in action.targets.items():
                self._desire(self.devices[device_id], target)

    def apply_desired(self, device_id: str, target: DesiredModel | None) -> None:
        """Give one device a new desired model (as a ``desired`` message would)."""
        self._desire(self.devices[device_id], target)

    def _desire(self, device: SimDevice, target: DesiredModel | None) -> None:
        device.desired = target
        if target is None or target.version == device.version:
            return
        if target.version == device.kept:  # blue-green: back at once, no install
            device.version, device.kept = device.kept, None
            device.install_version, device.install_state = target.version, "committed"
            return
        device.install_version, device.install_state = target.version, "downloading"
        device.install_done_at = None

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: installs progress, devices sample telemetry."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + min(seconds, self.interval_s))
            for device in self.devices.values():
                self._connectivity(device)
                if device.online:
                    self._install(device)
            self._sample_all(self.now)

    def _connectivity(self, device: SimDevice) -> None:
        elapsed = self.now - self.start
        gone = self.offline.get(device.id)
        returns = self.back.get(device.id)
        device.online = not (gone is not None and elapsed >= gone
                             and (returns is None or elapsed < returns))

    def _install(self, device: SimDevice) -> None:
        want = device.desired
        if want is None or device.install_state != "downloading":
            return
        if device.install_done_at is None:
            device.install_done_at = self.now + self.install_s
        if self.now < device.install_done_at:
            return
        if self.behaviour(device.id, want.version).install_fails:
            device.install_state = InstallState.FAILED.value
            return
        device.kept = device.version if want.compare_previous > 0 else None
        device.version = want.version
        device.served.add(want.version)
        device.install_state = InstallState.COMMITTED.value

    def _sample_all(self, at: float) -> None:
        for device in self.devices.values():
            if device.online and device.version is not None:
                device.samples.append(self._sample(device, at))

    def _sample(self, device: SimDevice, at: float) -> Telemetry:
        rnd = self.random
        served = self.behaviour(device.id, device.version or 0)
        n = self.requests
        entry: dict[str, Any] = {
            "version": device.version, "state": "serving", "requests": n,
            "errors": sum(1 for _ in range(n) if rnd.random() < served.error_rate),
            "p99_ms": round(served.p99_ms * rnd.uniform(0.9, 1.1), 3),
            "monitor": {"version": device.version, "sampled": n,
                        "drift": {"psi": served.drift_psi, "ks": 0.0, "worst": "input:x"}}}
        desired = device.desired
        if device.kept is not None and desired is not None and desired.compare_previous > 0:
            entry["previous"] = self._compare(device.kept, device, served)
        if desired is not None and desired.shadow is not None:
            entry["shadow"] = self._compare(desired.shadow.version, device, served)
        crashed = rnd.random() < served.crash_rate
        device.seq += 1
        metrics = {"interval_s": None if crashed else self.interval_s,
                   "models": {self.model: entry}}
        return Telemetry(device.seq, at, metrics)

    def _compare(self, version: int, device: SimDevice, served: Behaviour) -> dict[str, Any]:
        """The off-path run of ``version`` beside the served one, as the agent reports it."""
        rnd = self.random
        other = self.behaviour(device.id, version)
        n = max(1, int(self.requests * self.compared))
        # The pair agrees when both versions give the right answer (or the same wrong one).
        agreement = min(served.agreement, other.agreement)
        agree = sum(1 for _ in range(n) if rnd.random() < agreement)
        return {"version": version, "requests": n,
                "errors": sum(1 for _ in range(n) if rnd.random() < other.error_rate),
                "dropped": 0, "p50_ms": other.p99_ms / 2,
                "p99_ms": round(other.p99_ms * rnd.uniform(0.9, 1.1), 3),
                "agreement": {"metric": "top1", "n": n, "agree": agree, "mean": agree / n},
                "confidence_shift": round(other.confidence - served.confidence, 4)}

    def observations(self, state: RolloutState) -> dict[str, Observation]:
        """What the server would observe of every device now."""
        return {d.id: observe(state, d.id, online=d.online, version=d.version,
                              install_version=d.install_version,
                              install_state=d.install_state, samples=d.samples)
                for d in self.devices.values()}

    def run(self, state: RolloutState, *, step_s: float = 30.0,
            limit_s: float = 86_400.0) -> RolloutState:
        """Tick the controller every ``step_s`` until the rollout is final or ``limit_s``
        passed; returns the last state."""
        end = self.now + limit_s
        while not state.final and self.now < end:
            state, actions = tick(state, self.observations(state), self.now)
            self.apply(actions)
            self.advance(step_s)
        return state

    def exposed_to(self, version: int) -> set[str]:
        """Devices that ever served ``version``."""
        return {d.id for d in self.devices.values() if version in d.served}


def make_spec(fleet: SimFleet, candidate: DesiredModel, **options: Any) -> RolloutSpec:
    """A rollout of ``candidate`` to every device of ``fleet``; ``options`` override the
    spec's defaults (steps, bake_s, gates, ...)."""
    spec = RolloutSpec(id=options.pop("id", "r-sim"), model=fleet.model, candidate=candidate,
                       targets=fleet.targets(), previous=fleet.previous())
    return replace(spec, **options)
