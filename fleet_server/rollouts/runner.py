"""The rollout controller's adapter: reads observations from the registry, applies actions.

:class:`RolloutRunner` starts rollouts (:meth:`~RolloutRunner.create`), takes operator
commands, and every ``tick_s`` ticks each running or paused rollout (:meth:`tick_all`,
on its own thread once :meth:`start`-ed), **on the leader only** (``is_leader``,
:mod:`fleet_server.leadership`): with several server processes on one PostgreSQL one
controller acts, not one per process racing for each revision. Commands and new rollouts
are taken by every process (they write the registry; the leader's next tick acts on them;
one that finds the rollout saved by the leader since it read it is applied again to that),
and a process that becomes leader finds the running rollouts in the registry at its next
tick, reading their telemetry afresh from the rollout's start.

A tick reads what the registry holds of the rollout's devices (reported state, last install,
telemetry samples), calls the pure controller, and then, in **one registry transaction**,
saves the new state (by revision: a second server cannot move the same rollout), writes its
events and audit entries and changes the desired state. Only after that commit are the
changed devices' desired states published over MQTT (``publish``); a server killed before
that publishes every device's desired state when it connects again, so a rollout resumes on
restart exactly where its last committed state left it.

After a halt or abort the runner goes on ticking the rollout while devices it sent back
have not shown their previous version (:func:`~.controller.restore`); a device that refused
it as a downgrade (its agent restarted since, so it no longer held it loaded) gets a
re-release of it, signed here with ``rerelease`` as ``fleet rollback`` does.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fleet_server.errors import RegistryError, ReleaseError, RolloutError
from fleet_server.registry import BundleRecord, Device, Registry
from fleet_server.registry.rollouts import RolloutRecord
from protocol.messages import Telemetry

from . import controller
from .gates import merge_gates
from .model import (
    Emit,
    Observation,
    Rerelease,
    RolloutSpec,
    RolloutState,
    SetDesired,
    state_from_json,
    state_to_json,
)
from .plan import Target, check_steps

__all__ = ["RolloutOptions", "RolloutRunner", "Selection"]

log = logging.getLogger(__name__)

#: How far before a rollout's start samples are read for the baseline latency.
_BASELINE_S = 900.0
#: Samples re-read behind the newest one seen: device clocks differ and samples arrive
#: late (buffered while offline).
_SLACK_S = 300.0
#: Samples kept per device and rollout (the newest): bounds memory on long rollouts.
_MAX_SAMPLES = 2000
_ACTIVE = ("running", "paused")
_STOPPED = ("halted", "aborted")
#: Halted or aborted rollouts looked at for devices still to restore, newest first.
_RESTORE_SCAN = 20
#: Tries of an operator's command that finds the rollout saved meanwhile by another
#: process's tick (a tick saves at most once per ``tick_s``).
_COMMAND_TRIES = 3
#: Bounds on options: a rollout of a week at most per step.
_MAX_DURATION_S = 7 * 86400.0


@dataclass(frozen=True)
class Selection:
    """Which devices a rollout targets: exactly one of the four."""

    group: str | None = None
    devices: tuple[str, ...] = ()
    tag: str | None = None
    profile: str | None = None

    def describe(self) -> str:
        """``group:G``, ``devices:a,b``, ``tag:T`` or ``profile:P``."""
        if self.group is not None:
            return f"group:{self.group}"
        if self.devices:
            return "devices:" + ",".join(self.devices[:10]) + (
                f",... ({len(self.devices)})" if len(self.devices) > 10 else "")
        if self.tag is not None:
            return f"tag:{self.tag}"
        return f"profile:{self.profile}"


@dataclass(frozen=True)
class RolloutOptions:
    """The operator's options; defaults are a cautious operator's."""

    steps: tuple[float, ...] = (5.0, 25.0, 100.0)
    bake_s: float = 600.0
    shadow_s: float = 0.0
    gates: tuple[str, ...] = ()
    shadow_rate: float = 0.1
    compare_share: float = 0.1
    min_reporting: float = 0.8


class RolloutRunner:
    """Runs the rollouts stored in ``registry``. ``publish(device_ids)`` sends those
    devices' desired state; ``online(device)`` says whether a device counts as online."""

    def __init__(self, registry: Registry, *, publish: Callable[[Sequence[str]], object],
                 online: Callable[[Device, float], bool], tick_s: float = 5.0,
                 clock: Callable[[], float] = time.time,
                 check: Callable[[str, Sequence[Device]], None] | None = None,
                 rerelease: Callable[[BundleRecord], BundleRecord] | None = None,
                 experiments: Callable[[str, Sequence[str]], Mapping[str, str]] | None = None,
                 is_leader: Callable[[], bool] = lambda: True) -> None:
        """``check(bundle_sha256, devices)`` raises if the devices would refuse the bundle
        (the publish check); ``experiments(model, device_ids)`` names the running
        experiment each of those devices serves ``model`` in (a rollout would change an
        arm under it); ``clock`` gives the time; ``rerelease(bundle)`` signs and
        stores a re-release of a stored bundle as the next version (ReleaseError if this
        server cannot sign; without it devices that refuse their previous version stay
        where they are); ``is_leader()`` says whether this process's thread ticks."""
        self.registry = registry
        self._publish = publish
        self._online = online
        self._check = check
        self._rerelease = rerelease
        self._experiments = experiments
        self._is_leader = is_leader
        self.tick_s = tick_s
        self._clock = clock
        self._samples: dict[str, dict[str, dict[int, Telemetry]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One tick or command at a time in this process (across processes: revisions).
        self._lock = threading.Lock()

    # --- life cycle ---

    def start(self) -> None:
        """Tick every ``tick_s`` on a thread until :meth:`stop`, while leader."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop ticking (waits for a tick under way)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            if not self._is_leader():
                with self._lock:
                    # Samples read while leading would have a gap once this process leads
                    # again: it reads them afresh from each rollout's start then.
                    self._samples.clear()
                continue
            try:
                self.tick_all()
            except Exception:
                # A database outage must not end the loop: the next tick tries again.
                log.exception("rollout tick failed")

    # --- operations ---

    def create(self, bundle_sha256: str, selection: Selection, options: RolloutOptions,
               actor: str) -> RolloutState:
        """Start a rollout of a stored bundle to the selected devices. RolloutError for
        bad options or a selection that matches nothing or overlaps a running rollout or
        experiment on the same model; RegistryError for an unknown bundle."""
        record, devices = self.precheck(bundle_sha256, selection, options)
        running = self._experiments(record.name, [d.id for d in devices]) \
            if self._experiments is not None else {}
        if running:
            device, name = sorted(running.items())[0]
            raise RolloutError(f"{', '.join(sorted(running)[:5])} serve {record.name} in "
                               f"running experiment {name}; a rollout would change an arm "
                               f"under it: `fleet experiment promote {name} ARM` rolls out "
                               f"its winner, or stop it first ({device} is one)")
        spec = RolloutSpec(
            id=f"r-{secrets.token_hex(4)}", model=record.name, candidate=record.desired,
            targets=tuple(Target(d.id, d.profile) for d in devices),
            previous={d.id: d.desired.get(record.name) for d in devices},
            steps=check_steps(options.steps), bake_s=options.bake_s,
            shadow_s=options.shadow_s, shadow_rate=options.shadow_rate,
            compare_share=options.compare_share, min_reporting=options.min_reporting,
            gates=merge_gates(options.gates), selector=selection.describe(), actor=actor)
        with self._lock:
            state, actions = controller.start(spec, self._clock())
            self._commit(state, actions, actor, "rollout.start",
                         f"{record.name} v{record.version} to {spec.selector}")
        log.info("rollout %s started: %s v%d to %d device(s) (%s)", spec.id, record.name,
                 record.version, len(devices), spec.selector)
        return state

    def command(self, rollout_id: str, action: str, actor: str,
                reason: str = "") -> RolloutState:
        """The operator's pause, resume, abort or promote."""
        for attempt in range(1, _COMMAND_TRIES + 1):
            with self._lock:
                state = self.get(rollout_id)
                new, actions = controller.command(state, action, self._clock(), actor)
                try:
                    self._commit(new, actions, actor, f"rollout.{action}", reason or action)
                except RegistryError as exc:
                    # The leader's tick (another process) saved the rollout since it was
                    # read: apply the command again to what it saved; nothing was written.
                    if attempt == _COMMAND_TRIES:
                        raise
                    log.info("rollout %s: %s tried again: %s", rollout_id, action, exc)
                    continue
            break
        log.info("rollout %s: %s by %s", rollout_id, action, actor)
        return new

    def get(self, rollout_id: str) -> RolloutState:
        """The stored state; RolloutError if there is no such rollout."""
        record = self.registry.get_rollout(rollout_id)
        if record is None:
            raise RolloutError(f"no rollout {rollout_id!r}; `fleet rollout list` shows them")
        return _state(record)

    def all(self, *, active: bool = False, limit: int = 100) -> list[RolloutState]:
        """Rollouts, newest first."""
        return [_state(r) for r in self.registry.list_rollouts(
            statuses=_ACTIVE if active else None, limit=limit)]

    def tick_all(self) -> int:
        """Tick every running or paused rollout once; returns how many moved."""
        moved = 0
        for record in self.registry.list_rollouts(statuses=_ACTIVE):
            with self._lock:
                try:
                    moved += self._tick(record)
                except RegistryError as exc:
                    # Another server saved first (or a device vanished): next tick.
                    log.info("rollout %s not ticked: %s", record.id, exc)
        for record in self.registry.list_rollouts(statuses=_STOPPED, limit=_RESTORE_SCAN):
            state = _state(record)
            if not state.restoring:
                continue
            with self._lock:
                try:
                    moved += self._restore(state)
                except RegistryError as exc:
                    log.info("rollout %s: restoring not ticked: %s", record.id, exc)
        return moved

    # --- internals ---

    def _tick(self, record: RolloutRecord) -> int:
        state = _state(record)
        now = self._clock()
        new, actions = controller.tick(state, self._observe(state, now), now)
        if actions:
            self._commit(new, actions, "controller", "rollout.tick", "")
            return 1
        if new.results != state.results or new.status != state.status:
            # Only the judgement changed: save it for `fleet rollout status`.
            self._commit(new, [], "", "", "")
        return 0

    def _restore(self, state: RolloutState) -> int:
        """One look at the devices a halt or abort sent back; re-releases what they
        refused."""
        now = self._clock()
        observed = self._observe(state, now, devices=tuple(state.restoring), samples=False)
        new, wanted = controller.restore(state, observed, now)
        actions: list[SetDesired | Emit] = []
        for action in wanted:
            if isinstance(action, Rerelease):
                new, more = self._rereleased(new, action)
                actions += more
            else:
                actions.append(action)
        if new == state and not actions:
            return 0
        self._commit(new, actions, "controller", "rollout.restore", "")
        return 1 if actions else 0

    def _rereleased(self, state: RolloutState,
                    action: Rerelease) -> tuple[RolloutState, list[SetDesired | Emit]]:
        """Sign the re-release ``action`` asks for; the state and actions that follow."""
        source = self.registry.get_bundle(action.source.bundle_sha256)
        try:
            if self._rerelease is None:
                raise ReleaseError("this server signs no re-releases")
            if source is None:
                raise ReleaseError(f"bundle {action.source.bundle_sha256} is not stored")
            release = self._rerelease(source)
        except ReleaseError as exc:
            # Nothing more this server can do for them: they stay on the candidate, with a
            # failed install of the previous version, which `fleet devices` shows.
            log.warning("rollout %s: %s refused v%d as a downgrade and cannot get a "
                        "re-release (%s); `fleet rollback` them once the server can sign",
                        state.spec.id, ", ".join(action.devices), action.source.version, exc)
            left = {d: how for d, how in state.restoring.items() if d not in action.devices}
            return replace(state, restoring=left), []
        log.info("rollout %s: v%d re-released as v%d for %s (refused as a downgrade)",
                 state.spec.id, action.source.version, release.version,
                 ", ".join(action.devices))
        return controller.rereleased(state, action.source.bundle_sha256, release.desired,
                                     action.devices)

    def _commit(self, state: RolloutState, actions: list[SetDesired | Emit], actor: str,
                action: str, reason: str) -> None:
        """Save ``state`` and perform ``actions`` in one transaction, then publish."""
        state = replace(state, revision=state.revision + 1)
        changed: set[str] = set()
        with self.registry.batch():
            self.registry.save_rollout(RolloutRecord(
                state.spec.id, state.spec.model, state.status, state.created_at,
                state.updated_at, state.revision, state_to_json(state)))
            for a in actions:
                if isinstance(a, SetDesired):
                    changes = self.registry.set_desired_models(a.model, a.targets)
                    changed |= {c.device for c in changes}
                else:
                    self.registry.add_event(a.kind, detail=a.detail)
                    self._audit_event(a, actor, action, reason)
        if state.final:
            self._samples.pop(state.spec.id, None)
        if changed:
            self._publish(sorted(changed))

    def _audit_event(self, event: Emit, actor: str, action: str, reason: str) -> None:
        """Rollout events go to the audit log too (who did what, and why)."""
        detail = dict(event.detail)
        rollout = str(detail.get("rollout", ""))
        if event.kind == "rollout.halted":
            who, why = "controller", str(detail.get("reason", ""))
        elif event.kind == "rollout.rereleased":
            who, why = "controller", "devices refused their previous version as a downgrade"
        elif event.kind in ("rollout.step", "rollout.succeeded"):
            who, why = "controller", "gates passed"
        else:
            who, why = actor or "controller", reason or action
        self.registry.append_audit(who, event.kind, f"rollout:{rollout}", why, detail)

    def _select(self, selection: Selection) -> list[Device]:
        chosen = [s for s in (selection.group, selection.tag, selection.profile) if s]
        if len(chosen) + bool(selection.devices) != 1:
            raise RolloutError("select devices with exactly one of --group, --device, --tag "
                               "or --profile")
        if selection.devices:
            found = [self.registry.get_device(d) for d in sorted(set(selection.devices))]
            missing = [d for d, f in zip(sorted(set(selection.devices)), found, strict=True)
                       if f is None]
            if missing:
                raise RolloutError(f"unknown device(s): {', '.join(missing[:5])}")
            return [d for d in found if d is not None]
        if selection.group is not None:
            devices = self.registry.list_devices(group=selection.group)
        elif selection.tag is not None:
            devices = self.registry.list_devices(tag=selection.tag)
        else:
            devices = [d for d in self.registry.list_devices()
                       if d.profile == selection.profile]
        if not devices:
            raise RolloutError(f"{selection.describe()} matches no device; check the name "
                               "(`fleet devices` lists them)")
        return devices

    def precheck(self, bundle_sha256: str, selection: Selection,
                 options: RolloutOptions) -> tuple[BundleRecord, list[Device]]:
        """What create() checks before it starts anything but the experiments: the bundle,
        the options, the selection, running rollouts of its model and whether the devices
        would take it. Raises as create() does; a promotion checks this before it ends
        its experiment, so that a refused rollout leaves the experiment running."""
        record = self.registry.get_bundle(bundle_sha256)
        if record is None:
            raise RegistryError(f"no stored bundle has sha256 {bundle_sha256!r}; upload it "
                                "first")
        _check_options(options)
        check_steps(options.steps)
        merge_gates(options.gates)
        devices = self._select(selection)
        busy = self.busy(record.name)
        clash = sorted(d.id for d in devices if d.id in busy)
        if clash:
            raise RolloutError(f"{', '.join(clash[:5])} already take part in rollout "
                               f"{busy[clash[0]]} of {record.name}; wait for it to end, or "
                               "pause and abort it")
        if self._check is not None:
            self._check(bundle_sha256, devices)
        return record, list(devices)

    def busy(self, model: str) -> dict[str, str]:
        """Devices in a running or paused rollout of ``model``, and its id."""
        return {t.device: r.id for r in self.registry.list_rollouts(statuses=_ACTIVE)
                if r.model == model for t in _state(r).spec.targets}

    def _observe(self, state: RolloutState, now: float, *,
                 devices: Sequence[str] | None = None,
                 samples: bool = True) -> dict[str, Observation]:
        """What the registry holds of the current phase's devices (or ``devices``), with
        their telemetry unless ``samples`` is False."""
        devices = controller.phase_devices(state) if devices is None else devices
        read = self._read_samples(state, devices) if samples else {}
        model = state.spec.model
        # The phase's devices only, a few queries per 500: at 10,000 devices a canary
        # step's tick read every device of the fleet otherwise.
        known = {d.id: d for d in self.registry.get_devices(devices)}
        observations = {}
        for device_id in devices:
            device = known.get(device_id)
            if device is None:
                continue
            running = device.running.get(model)
            install = _install(device.reported, model)
            observations[device_id] = controller.observe(
                state, device_id, online=self._online(device, now),
                version=None if running is None else running.version,
                install_version=install[0], install_state=install[1],
                samples=read.get(device_id, {}).values())
        return observations

    def _read_samples(self, state: RolloutState,
                      devices: Sequence[str]) -> dict[str, dict[int, Telemetry]]:
        """The rollout's devices' samples from before its start on, read incrementally."""
        cache = self._samples.setdefault(state.spec.id, {})
        newest = max((s.at for by_seq in cache.values() for s in by_seq.values()),
                     default=None)
        since = state.created_at - _BASELINE_S if newest is None else newest - _SLACK_S
        for record in self.registry.telemetry_since(devices, since):
            by_seq = cache.setdefault(record.device, {})
            by_seq[record.sample.seq] = record.sample
            if len(by_seq) > _MAX_SAMPLES:
                del by_seq[min(by_seq)]
        return cache


def _state(record: RolloutRecord) -> RolloutState:
    try:
        return replace(state_from_json(record.state), revision=record.revision)
    except (KeyError, ValueError, TypeError) as exc:
        raise RolloutError(f"rollout {record.id} is stored in a form this edgefleet cannot "
                           f"read ({exc!r}); upgrade edgefleet") from None


def _install(reported: Mapping[str, Any], model: str) -> tuple[int | None, str | None]:
    """The (version, state) of the device's last install of ``model``, from its report."""
    installs = reported.get("installs")
    entry = installs.get(model) if isinstance(installs, dict) else None
    if not isinstance(entry, dict):
        return None, None
    version, state = entry.get("version"), entry.get("state")
    return (version if isinstance(version, int) else None,
            state if isinstance(state, str) else None)


def _check_options(options: RolloutOptions) -> None:
    for what, value in (("--bake", options.bake_s), ("--shadow", options.shadow_s)):
        if not 0.0 <= value <= _MAX_DURATION_S:
            raise RolloutError(f"{what} must be between 0 and 7 days, not {value:g} s")
    for what, share in (("shadow sample rate", options.shadow_rate),
                        ("compare share", options.compare_share),
                        ("minimum reporting share", options.min_reporting)):
        if not 0.0 < share <= 1.0:
            raise RolloutError(f"{what} must be above 0 and at most 1, not {share:g}")
