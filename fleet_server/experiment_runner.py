"""Experiments on the server: start, stop, status, and the fleet's learning loop.

:class:`ExperimentRunner` is the adapter between the pure core (:mod:`experiments`) and
the registry and MQTT:

- :meth:`~ExperimentRunner.start` stores the declaration, makes every arm's bundle a
  desired model of the devices that may serve it (request units: every arm on every
  device; device units: each device its own arm, by ``experiments.assign.device_arm``) and
  publishes their desired states, which now declare the experiment
  (:meth:`~ExperimentRunner.declarations`);
- :meth:`~ExperimentRunner.take` counts the deltas of a telemetry sample (the sample's
  ``metrics.experiments`` list, ``experiments.posterior.encode_delta`` objects) inside the
  ingest batch's transaction, each once; :meth:`~ExperimentRunner.flush`, after the
  commit, pushes the merged posterior (retained, ``inbox/experiments/{experiment}``) to
  every device whose delta was applied, and to every device of the experiment at most
  every ``fleet_push_s`` (a change held back by that interval goes out with the first
  batch after it); :meth:`~ExperimentRunner.push_all` sends them all again on every
  connection to the broker;
- :meth:`~ExperimentRunner.stop` ends it: the declaration leaves the desired states, the
  arms' models other than the public name (and the winner's, when promoted) stop being
  desired, and the retained pushes are cleared.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from experiments.assign import device_arm
from experiments.errors import ExperimentError, InvalidExperimentData
from experiments.posterior import Merged, decode_delta
from experiments.spec import ExperimentSpec, spec_from_json, spec_to_json
from experiments.status import StatusOptions, experiment_status
from protocol import messages
from protocol.experiment_messages import PosteriorPush
from protocol.topics import EXPERIMENT_PUSH_LEAF

from .errors import RegistryError
from .registry import BundleRecord, Device, Registry
from .registry.experiments import ExperimentRecord
from .releases import check_publishable

__all__ = ["MAX_DELTAS_PER_SAMPLE", "ExperimentRequest", "ExperimentRunner", "experiment_json"]

log = logging.getLogger(__name__)

#: Deltas one telemetry sample may carry (one per experiment; more is a corrupt sample).
MAX_DELTAS_PER_SAMPLE = 64


@dataclass(frozen=True)
class ExperimentRequest:
    """What ``fleet experiment start`` asks for. ``bundles``: (arm, bundle sha256) in arm
    order; ``model``: the public name apps call (None: the first arm's bundle's name)."""

    name: str
    bundles: tuple[tuple[str, str], ...]
    split: tuple[float, ...] | None = None
    group: str | None = None
    devices: tuple[str, ...] = ()
    model: str | None = None
    unit: str = "device"
    strategy: str = "split"
    metric: str = "reward"
    low: float = 0.0
    high: float = 1.0
    higher_is_better: bool = True
    family: str = "beta"
    alpha: float = 0.05


class ExperimentRunner:
    """The server's experiments (module docstring). ``publish(devices)`` publishes those
    devices' desired states; ``send(device, leaf, payload, retain)`` publishes one message;
    ``rollouts(model)`` maps the devices in a running rollout of ``model`` to its id (an
    experiment must not start under a rollout that may halt and change an arm)."""

    def __init__(self, registry: Registry, *, publish: Callable[[Sequence[str]], object],
                 send: Callable[[str, str, bytes, bool], None], fleet_push_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 rollouts: Callable[[str], Mapping[str, str]] | None = None) -> None:
        self.registry = registry
        self._publish = publish
        self._send = send
        self._rollouts = rollouts
        self._fleet_push_s = fleet_push_s
        self._clock = clock
        self._lock = threading.Lock()
        self._touched: set[tuple[str, str]] = set()  # (experiment, device) since the flush
        # Only flush() reads and writes these two, one ingest thread at a time (PostgreSQL
        # runs several).
        self._flushing = threading.Lock()
        self._pushed_at: dict[str, float] = {}       # experiment -> last fleet-wide push
        self._unpushed: set[str] = set()             # changed since its fleet-wide push

    # -- operator actions ------------------------------------------------------------------

    def start(self, request: ExperimentRequest, actor: str) -> ExperimentRecord:
        """Start an experiment. InvalidExperimentData for a declaration that does not make
        sense, RegistryError for unknown bundles or devices or a name used before,
        ReleaseError if devices would refuse an arm's bundle. Nothing changes then."""
        arms = [arm for arm, _ in request.bundles]
        twice = sorted({arm for arm in arms if arms.count(arm) > 1})
        if twice:
            raise InvalidExperimentData(f"arm {twice[0]!r} is given twice: name each variant "
                                        "once (--variant a=BUNDLE --variant b=BUNDLE)")
        bundles = {arm: self._bundle(sha) for arm, sha in request.bundles}
        model = request.model or bundles[request.bundles[0][0]].name
        shares = request.split or tuple(1.0 / len(bundles) for _ in bundles)
        if len(shares) != len(bundles):
            raise InvalidExperimentData(f"--split gives {len(shares)} shares for "
                                        f"{len(bundles)} variants: give one per variant")
        total = sum(shares)
        if request.split is not None and not any(math.isclose(total, whole, rel_tol=1e-6)
                                                 for whole in (1.0, 100.0)):
            # Shares that add up to something else are almost always a typo; rescaling
            # them silently would run a split nobody asked for.
            raise InvalidExperimentData(f"--split adds up to {total:g}: give percentages "
                                        "that add up to 100 (or fractions adding up to 1)")
        spec = ExperimentSpec(
            name=request.name, model=model,
            arms=tuple((arm, b.name) for arm, b in bundles.items()),
            split=tuple((arm, s / total) for arm, s in zip(bundles, shares, strict=True)),
            unit=request.unit, strategy=request.strategy,  # type: ignore[arg-type]
            low=request.low, high=request.high, higher_is_better=request.higher_is_better,
            family=request.family)  # type: ignore[arg-type]
        if not 0.0 < request.alpha < 0.5:
            raise InvalidExperimentData(f"alpha must be in (0, 0.5), not {request.alpha}")
        served = [b.name for b in bundles.values()]
        if spec.unit == "request" and len(set(served)) != len(served):
            raise InvalidExperimentData(
                "with --unit request every device loads every variant, so their bundles "
                f"need distinct model names (got {', '.join(served)}); build each variant "
                "under its own name, or use --unit device")
        devices = self._select(request.group, request.devices)
        self._check_free(spec, devices)
        arm_of = {d.id: device_arm(spec.name, d.id, spec.split) for d in devices}
        plan = {arm: [d for d in devices if spec.unit == "request" or arm_of[d.id] == arm]
                for arm in spec.arm_names}
        for arm, chosen in plan.items():
            check_publishable(bundles[arm], chosen, self.registry.get_bundle)
        now = time.time()
        selection = (f"group:{request.group}" if request.group
                     else f"devices:{','.join(request.devices[:10])}")
        record = ExperimentRecord(
            spec.name, spec.model, "running", now, now, 0, spec_to_json(spec),
            {"bundles": {arm: b.sha256 for arm, b in bundles.items()},
             "metric": request.metric, "alpha": request.alpha, "selection": selection,
             "actor": actor, "winner": None})
        self.registry.create_experiment(record, spec.arm_names, [d.id for d in devices])
        for arm, chosen in plan.items():
            if chosen:
                self.registry.set_desired(bundles[arm].sha256, devices=[d.id for d in chosen])
        self.registry.append_audit(actor, "experiment.start", spec.name, "", {
            "model": spec.model, "arms": dict(spec.arms), "unit": spec.unit,
            "strategy": spec.strategy, "selection": selection, "devices": len(devices)})
        self._publish([d.id for d in devices])
        log.info("experiment %s started on %s: %d device(s), arms %s", spec.name, spec.model,
                 len(devices), dict(spec.arms))
        return record

    def stop(self, name: str, actor: str, *, winner: str | None = None,
             reason: str = "") -> ExperimentRecord:
        """End a running experiment (``promoted`` with a winner). InvalidExperimentData if
        it is not running or the winner is not one of its arms."""
        record = self.get(name)
        if record.status != "running":
            raise InvalidExperimentData(f"experiment {name} is {record.status} already")
        spec = spec_from_json(record.spec)
        if winner is not None and winner not in spec.arm_names:
            raise InvalidExperimentData(f"{winner!r} is not an arm of {name} (arms: "
                                        f"{', '.join(spec.arm_names)})")
        devices = self.registry.experiment_devices(name)
        status = "stopped" if winner is None else "promoted"
        self.registry.end_experiment(name, status, {**record.detail, "winner": winner})
        keep = {spec.model} | ({spec.served_model(winner)} if winner else set())
        for model in sorted({m for _, m in spec.arms} - keep):
            self.registry.clear_desired(model, devices=devices)
        self.registry.append_audit(actor, f"experiment.{'promote' if winner else 'stop'}",
                                   name, reason, {"winner": winner})
        self._publish(devices)
        for device in devices:  # an empty retained message clears the last push
            self._send(device, f"{EXPERIMENT_PUSH_LEAF}/{name}", b"", True)
        log.info("experiment %s %s", name, status + (f": {winner} won" if winner else ""))
        return self.get(name)

    def get(self, name: str) -> ExperimentRecord:
        """The experiment; RegistryError if there is none of that name."""
        record = self.registry.get_experiment(name)
        if record is None:
            raise RegistryError(f"no experiment is named {name!r}; `fleet experiment status` "
                                "lists them")
        return record

    def status(self, name: str) -> dict[str, Any]:
        """What ``fleet experiment status`` shows (:func:`experiment_json`)."""
        record = self.get(name)
        return experiment_json(record, self.registry.experiment_arms(name),
                               len(self.registry.experiment_devices(name)))

    def declarations(self, device: str) -> tuple[dict[str, Any], ...]:
        """The experiments ``device``'s desired state declares."""
        return tuple(self.registry.experiment_declarations(device))

    # -- the learning loop -----------------------------------------------------------------

    def take(self, device: str, sample: messages.Telemetry) -> list[Exception]:
        """Count the deltas ``sample`` carries (call inside the transaction storing it);
        the deltas refused, as errors, for the caller to record."""
        raw = sample.metrics.get("experiments")
        if raw is None:
            return []
        if not isinstance(raw, list) or len(raw) > MAX_DELTAS_PER_SAMPLE:
            return [InvalidExperimentData(f"metrics.experiments must be a list of at most "
                                          f"{MAX_DELTAS_PER_SAMPLE} deltas")]
        refused: list[Exception] = []
        for obj in raw:
            try:
                delta = decode_delta(obj, device)
                verdict = self.registry.apply_experiment_delta(delta)
            except (ExperimentError, RegistryError) as exc:
                refused.append(exc)
                continue
            if verdict == "applied":
                with self._lock:
                    self._touched.add((delta.experiment, device))
        return refused

    def flush(self) -> None:
        """Push the merged posteriors the last batch changed (after its commit), and the
        fleet-wide pushes now due."""
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, set()
        self._unpushed |= {e for e, _ in touched}
        now = self._clock()
        for experiment in sorted(self._unpushed):
            if now - self._pushed_at.get(experiment, -self._fleet_push_s) >= self._fleet_push_s:
                self._pushed_at[experiment] = now
                self._unpushed.discard(experiment)
                touched |= {(experiment, d)
                            for d in self.registry.experiment_devices(experiment)}
        for experiment, device in sorted(touched):
            self._push(experiment, device)

    def push_all(self) -> int:
        """Push every running experiment's merged posterior to each of its devices (on
        every connection to the broker, which may have lost retained messages); how many
        pushes were sent."""
        sent = 0
        for record in self.registry.list_experiments(status="running", limit=10_000):
            sent += sum(self._push(record.name, device)
                        for device in self.registry.experiment_devices(record.name))
        return sent

    def _push(self, experiment: str, device: str) -> bool:
        merged = self.registry.experiment_push(experiment, device)
        if merged is not None:
            self._send(device, f"{EXPERIMENT_PUSH_LEAF}/{experiment}",
                       messages.encode(push_message(merged)), True)
        return merged is not None

    # -- helpers ---------------------------------------------------------------------------

    def _bundle(self, sha256: str) -> BundleRecord:
        record = self.registry.get_bundle(sha256)
        if record is None:
            raise RegistryError(f"no stored bundle has sha256 {sha256!r}; upload it first")
        return record

    def _select(self, group: str | None, devices: Sequence[str]) -> list[Device]:
        if bool(group) == bool(devices):
            raise InvalidExperimentData("select devices with exactly one of --group or "
                                        "--devices")
        if group:
            found = self.registry.list_devices(group=group)
            if not found:
                raise RegistryError(f"group {group!r} has no devices")
            return found
        chosen = []
        for device_id in sorted(set(devices)):
            device = self.registry.get_device(device_id)
            if device is None:
                raise RegistryError(f"unknown device {device_id!r}")
            chosen.append(device)
        return chosen

    def _check_free(self, spec: ExperimentSpec, devices: Sequence[Device]) -> None:
        """A model a device serves in one running experiment (its public name or an arm's
        model) is in no other, and in no running rollout: either would change an arm under
        the experiment and mix its data."""
        ids = [d.id for d in devices]
        serving = self._serving(ids)  # one read of the running experiments for all models
        for model in sorted(_models(spec)):
            running = serving.get(model, {})
            if running:
                name = running[min(running)]
                raise InvalidExperimentData(
                    f"{', '.join(sorted(running)[:5])} already serve {model} in experiment "
                    f"{name}; stop it first (`fleet experiment stop {name}`)")
            busy = {d: r for d, r in (self._rollouts(model) if self._rollouts else {}).items()
                    if d in set(ids)}
            if busy:
                rollout = busy[min(busy)]
                raise InvalidExperimentData(
                    f"{', '.join(sorted(busy)[:5])} take part in rollout {rollout} of {model}; "
                    f"wait for it to end (`fleet rollout status {rollout} --wait`) or abort it")

    def running_on(self, model: str, devices: Sequence[str]) -> dict[str, str]:
        """Which of ``devices`` serve ``model`` in a running experiment, and its name."""
        return self._serving(devices).get(model, {})

    def _serving(self, devices: Sequence[str]) -> dict[str, dict[str, str]]:
        """Per model served in a running experiment: which of ``devices`` serve it there,
        and the experiment's name."""
        wanted = set(devices)
        out: dict[str, dict[str, str]] = {}
        for other in self.registry.list_experiments(status="running", limit=10_000):
            taking_part = wanted.intersection(self.registry.experiment_devices(other.name))
            for model in _models(spec_from_json(other.spec)):
                out.setdefault(model, {}).update(dict.fromkeys(taking_part, other.name))
        return out


def _models(spec: ExperimentSpec) -> set[str]:
    """Every model name an experiment serves on its devices."""
    return {spec.model, *(m for _, m in spec.arms)}


def push_message(merged: Merged) -> PosteriorPush:
    """The wire form of a merged posterior."""
    return PosteriorPush(merged.experiment, merged.version, merged.applied_seq,
                                  {arm: (s.n, s.total, s.total_sq)
                                   for arm, s in merged.arms.items()})


def experiment_json(record: ExperimentRecord, arms: Mapping[str, Any],
                    devices: int) -> dict[str, Any]:
    """An experiment as the API and ``--json`` show it: the declaration, where it stands,
    and per arm n, mean, always-valid interval and probability of being best with the
    verdict (``experiments.status.experiment_status``)."""
    spec = spec_from_json(record.spec)
    status = experiment_status(record.name, arms, StatusOptions(
        low=spec.low, high=spec.high, higher_is_better=spec.higher_is_better,
        alpha=float(record.detail.get("alpha", 0.05)), family=spec.family))
    served = dict(spec.arms)
    bundles = record.detail.get("bundles", {})
    for arm in status["arms"]:
        arm["model"] = served[arm["arm"]]
        arm["bundle_sha256"] = bundles.get(arm["arm"])
    if record.status != "running" and status["verdict"] == "running":
        status["verdict"] = "undecided"  # it ended before any arm's interval cleared
    return {**status, "status": record.status, "model": record.model, "unit": spec.unit,
            "strategy": spec.strategy, "metric": record.detail.get("metric", "reward"),
            "selection": record.detail.get("selection"), "devices": devices,
            "created_at": record.created_at, "updated_at": record.updated_at,
            "version": record.version, "promoted": record.detail.get("winner"),
            "spec": dict(record.spec)}
