"""The rollout controller, pure: ``(state, observations, now) -> (state, actions)``.

No I/O and no clock of its own: :func:`start`, :func:`tick` and :func:`command` take the
time and what the devices showed, and return the next state with the actions to take
(:class:`~.model.SetDesired`, :class:`~.model.Emit`). The adapter
(:mod:`fleet_server.rollouts.runner`) saves the state first, then performs them, so a
server killed in between performs them again at restart (each is idempotent).

The life of a rollout::

    start ─► shadow (optional: first step's devices run the candidate beside their model)
               │ bake over, enough devices report, every gate passes
               ▼
             step 0 (e.g. 5%) ─► step 1 (25%) ─► ... ─► last step (100%) ─► succeeded
               │ any gate fails (at any tick)             │
               ▼                                          ▼
             halted: every exposed device back to its previous version

    pause / resume: a paused rollout does not advance (a failing gate still halts it);
    abort: back to the previous version, like a halt, by the operator;
    promote: every target gets the candidate now; succeeded.

After a halt or abort :func:`restore` watches the devices sent back until they run their
previous version: one whose agent no longer had it loaded (restarted since) refuses it as
a downgrade, and gets a re-release of it instead (:class:`~.model.Rerelease`, the next
version with the same contents, as ``fleet rollback`` does).

While steps run, the candidate is desired with ``compare_previous`` so each device keeps its
previous version loaded, compares answers, and switches back at once on a halt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace

from fleet_server.errors import RolloutError
from protocol.install_states import InstallState
from protocol.messages import DesiredModel, DesiredShadow, Telemetry

from .evidence import Health, summarize
from .gates import METRICS, Gate, GateResult, judge
from .model import (
    Emit,
    Observation,
    Reason,
    Rerelease,
    RolloutSpec,
    RolloutState,
    SetDesired,
    StepResult,
)
from .plan import plan_steps

__all__ = ["COMMANDS", "RESTORE_WATCH_S", "Actions", "command", "observe", "phase_devices",
           "rereleased", "restore", "start", "tick"]

Actions = list[SetDesired | Emit]
#: How long after a halt or abort the devices sent back are watched (offline ones return).
RESTORE_WATCH_S = 86400.0
COMMANDS = ("pause", "resume", "abort", "promote")
_FAILED = {InstallState.FAILED.value, InstallState.ROLLED_BACK.value}


def start(spec: RolloutSpec, now: float) -> tuple[RolloutState, Actions]:
    """A new rollout: its first phase begins at ``now``. RolloutError if it cannot run."""
    if not spec.targets:
        raise RolloutError("the selection matched no devices; check the group, tag, profile "
                           "or device ids")
    first = plan_steps(spec.id, spec.targets, spec.steps)[0]
    if spec.shadow_s > 0:
        missing = [d for d in first if spec.previous.get(d) is None]
        if missing:
            raise RolloutError(f"a shadow phase needs a served version of {spec.model} to "
                               f"compare with; {', '.join(missing[:5])} run none: start "
                               "without --shadow or publish a first version")
    state = RolloutState(spec=spec, status="running",
                         phase="shadow" if spec.shadow_s > 0 else "steps", step=0,
                         phase_started_at=now, created_at=now, updated_at=now)
    actions: Actions = [Emit("rollout.started", {
        "rollout": spec.id, "model": spec.model, "version": spec.candidate.version,
        "bundle_sha256": spec.candidate.bundle_sha256, "targets": len(spec.targets),
        "steps": list(spec.steps), "shadow_s": spec.shadow_s, "bake_s": spec.bake_s,
        "gates": [str(g) for g in spec.gates], "selector": spec.selector,
        "actor": spec.actor})]
    state, exposing = _expose(state, first, now)
    return state, [*actions, *exposing]


def phase_devices(state: RolloutState) -> tuple[str, ...]:
    """The devices the current phase covers (shadow: the first step's; a step: all devices
    of the steps up to it)."""
    plan = plan_steps(state.spec.id, state.spec.targets, state.spec.steps)
    upto = 0 if state.phase == "shadow" else state.step
    return tuple(sorted(d for added in plan[:upto + 1] for d in added))


def tick(state: RolloutState, observations: Mapping[str, Observation],
         now: float) -> tuple[RolloutState, Actions]:
    """Judge the current phase on ``observations`` (by device id) and move on: halt on a
    failing gate, advance when the bake is over and every gate passes."""
    if state.final:
        return state, []
    result = _judge(state, observations, now)
    state = replace(state.with_result(result), updated_at=now)
    failing = [g for g in result.gates if g.status == "fail"]
    if failing:
        return _stop(state, "halted", _halt_reason(state, failing[0]), now,
                     verdict="failed", actor="controller")
    if state.status == "paused" or result.verdict != "passed":
        return state, []
    return _advance(state, now)


def command(state: RolloutState, action: str, now: float,
            actor: str = "") -> tuple[RolloutState, Actions]:
    """The operator's ``pause``, ``resume``, ``abort`` or ``promote``. RolloutError when
    the rollout's state does not allow it (a final rollout accepts none)."""
    if action not in COMMANDS:
        raise RolloutError(f"unknown rollout command {action!r}; use {', '.join(COMMANDS)}")
    if state.final:
        raise RolloutError(f"rollout {state.spec.id} is {state.status}; start a new rollout "
                           "instead")
    who = {"rollout": state.spec.id, "actor": actor}
    if action == "pause":
        if state.status == "paused":
            raise RolloutError(f"rollout {state.spec.id} is paused already")
        return replace(state, status="paused", updated_at=now), [
            Emit("rollout.paused", {**who, "step": state.phase_name()})]
    if action == "resume":
        if state.status != "paused":
            raise RolloutError(f"rollout {state.spec.id} is not paused")
        return replace(state, status="running", updated_at=now), [
            Emit("rollout.resumed", {**who, "step": state.phase_name()})]
    if action == "abort":
        reason = Reason(f"aborted by {actor or 'the operator'}", state.phase_name())
        return _stop(state, "aborted", reason, now, verdict="skipped", actor=actor)
    return _promote(state, now, who)


# --- phases ------------------------------------------------------------------------------

def _desired_for(state: RolloutState, device: str) -> DesiredModel | None:
    """What ``device`` should be asked to run in the current phase."""
    spec = state.spec
    previous = spec.previous.get(device)
    if state.phase == "shadow":
        assert previous is not None  # start() refuses a shadow phase otherwise
        c = spec.candidate
        return replace(previous, shadow=DesiredShadow(c.version, c.bundle_sha256, c.size,
                                                      spec.shadow_rate), compare_previous=0.0)
    # Keep the previous version loaded (and compared) only if there is one.
    share = spec.compare_share if previous is not None else 0.0
    return replace(spec.candidate, shadow=None, compare_previous=share)


def _expose(state: RolloutState, devices: tuple[str, ...] | list[str],
            now: float) -> tuple[RolloutState, Actions]:
    """Ask ``devices`` to run the current phase's desired model, from ``now``."""
    if not devices:
        return state, []
    exposed = {**state.exposed, **dict.fromkeys(devices, now)}
    targets = {d: _desired_for(state, d) for d in sorted(devices)}
    return replace(state, exposed=exposed), [SetDesired(state.spec.model, targets,
                                                        state.phase_name())]


def _advance(state: RolloutState, now: float) -> tuple[RolloutState, Actions]:
    spec = state.spec
    plan = plan_steps(spec.id, spec.targets, spec.steps)
    if state.phase == "shadow":
        state = replace(state, phase="steps", step=0, phase_started_at=now)
        # The shadow's devices are step 0's: they switch to the candidate now.
        state, actions = _expose(state, plan[0], now)
    elif state.step + 1 < len(spec.steps):
        state = replace(state, step=state.step + 1, phase_started_at=now)
        state, actions = _expose(state, plan[state.step], now)
    else:
        return _succeed(state, now)
    return state, [*actions, Emit("rollout.step", {
        "rollout": spec.id, "step": state.phase_name(), "devices": len(phase_devices(state))})]


def _succeed(state: RolloutState, now: float) -> tuple[RolloutState, Actions]:
    """Every target runs the candidate; the previous version need not stay loaded."""
    spec = state.spec
    targets = {t.device: spec.candidate for t in spec.targets}
    done = replace(state, status="succeeded", updated_at=now,
                   exposed={**dict.fromkeys(targets, now), **state.exposed})
    return done, [SetDesired(spec.model, targets, "succeeded"),
                  Emit("rollout.succeeded", {"rollout": spec.id, "devices": len(targets),
                                             "version": spec.candidate.version})]


def _promote(state: RolloutState, now: float,
             who: Mapping[str, str]) -> tuple[RolloutState, Actions]:
    if state.results:
        last = state.results[-1]
        state = state.with_result(replace(last, verdict="skipped", ended_at=now))
    state, actions = _succeed(state, now)
    return state, [Emit("rollout.promoted", {**who, "step": state.phase_name()}), *actions]


def _stop(state: RolloutState, status: str, reason: Reason, now: float, *,
          verdict: str, actor: str) -> tuple[RolloutState, Actions]:
    """Halt or abort: every exposed device back to its previous desired model."""
    spec = state.spec
    restore = {d: spec.previous.get(d) for d in sorted(state.exposed)}
    if state.results:
        last = state.results[-1]
        outcomes = dict.fromkeys(last.outcomes, "restored")
        state = state.with_result(replace(last, verdict=verdict, ended_at=now,
                                          outcomes=outcomes))
    stopped = replace(state, status=status, reason=reason, updated_at=now,
                      restoring={d: "switching" for d, p in restore.items() if p is not None},
                      restore_until=now + RESTORE_WATCH_S)
    kind = "rollout.halted" if status == "halted" else "rollout.aborted"
    actions: Actions = []
    if restore:
        actions.append(SetDesired(spec.model, restore, status))
    actions.append(Emit(kind, {"rollout": spec.id, **reason.detail(),
                               "devices": len(restore), "actor": actor}))
    return stopped, actions


def _halt_reason(state: RolloutState, failed: GateResult) -> Reason:
    gate = failed.gate
    median = " (median over devices)" if METRICS[gate.metric].kind == "median" else ""
    text = (f"gate {gate} failed at {state.phase_name()}: {gate.metric} = "
            f"{failed.value:.4g}{median} over n={failed.n} {METRICS[gate.metric].unit}, "
            f"one-sided 95% bound {failed.bound:.4g}")
    return Reason(text, state.phase_name(), str(gate), failed.value, gate.threshold,
                  failed.bound, failed.n)


# --- after a halt or abort -----------------------------------------------------------------

def restore(state: RolloutState, observations: Mapping[str, Observation],
            now: float) -> tuple[RolloutState, list[SetDesired | Emit | Rerelease]]:
    """Watch the devices a halt or abort sent back (``state.restoring``). A device is done
    once it runs its previous version (or its re-release) or anything but the candidate.
    One that refused its previous version (a failed install of that version: devices
    refuse older versions unless they still hold them loaded) gets the re-release already
    made for that bundle, or a :class:`~.model.Rerelease` asks the runner to make one.
    Devices are let go at ``restore_until`` (still on the candidate: `fleet devices`
    shows them)."""
    spec = state.spec
    if not state.restoring:
        return state, []
    if state.restore_until is not None and now >= state.restore_until:
        return replace(state, restoring={}), []
    left: dict[str, str] = {}
    refused: dict[str, list[str]] = {}  # source sha256 -> devices
    for device, how in sorted(state.restoring.items()):
        previous = spec.previous.get(device)
        obs = observations.get(device)
        if previous is None or obs is None:
            left[device] = how if previous is not None else ""
            continue
        again = state.rereleased.get(previous.bundle_sha256)
        if obs.version is not None and obs.version != spec.candidate.version:
            continue  # back on the previous version, its re-release, or moved on since
        failed = obs.install_state in _FAILED
        if how == "switching" and failed and obs.install_version == previous.version:
            refused.setdefault(previous.bundle_sha256, []).append(device)
            left[device] = how  # "rereleased" once the runner made it
        elif how == "rereleased" and failed and again is not None and (
                obs.install_version == again.version):
            continue  # refused its re-release too: nothing more to try
        else:
            left[device] = how
    state = replace(state, restoring={d: how for d, how in left.items() if how})
    actions: list[SetDesired | Emit | Rerelease] = []
    for sha, devices in sorted(refused.items()):
        again = state.rereleased.get(sha)
        if again is None:
            source = spec.previous[devices[0]]
            assert source is not None  # only devices with a previous version are restoring
            actions.append(Rerelease(spec.model, source, tuple(devices)))
        else:
            state, more = rereleased(state, sha, again, devices)
            actions += more
    return state, actions


def rereleased(state: RolloutState, source_sha256: str, release: DesiredModel,
               devices: Iterable[str]) -> tuple[RolloutState, Actions]:
    """The state and actions once ``release`` re-releases the bundle ``source_sha256`` for
    ``devices`` (the runner's answer to a :class:`~.model.Rerelease`)."""
    devices = sorted(devices)
    state = replace(state, rereleased={**state.rereleased, source_sha256: release},
                    restoring={**state.restoring, **dict.fromkeys(devices, "rereleased")})
    return state, [SetDesired(state.spec.model, dict.fromkeys(devices, release), "rerelease"),
                   Emit("rollout.rereleased", {"rollout": state.spec.id,
                                               "devices": devices,
                                               "version": release.version,
                                               "bundle_sha256": release.bundle_sha256,
                                               "source_sha256": source_sha256})]


# --- judging -----------------------------------------------------------------------------

def _outcome(state: RolloutState, obs: Observation | None) -> str:
    if obs is None:
        return "pending"
    candidate = state.spec.candidate.version
    if obs.install_version == candidate and obs.install_state in _FAILED:
        return "failed"
    if state.phase == "shadow":
        return "running" if obs.health.samples else ("waiting" if obs.online else "offline")
    if obs.version == candidate:
        return "running"
    return "installing" if obs.online else "offline"


def _judge_gate(gate: Gate, failed: int, healths: list[Health],
                present: list[Health]) -> GateResult:
    """Judge one gate: ``failed`` devices failed the install, ``healths`` are those running
    the candidate, ``present`` every observed device of the phase."""
    m = gate.metric
    if m == "install_failures":
        return judge(gate, events=failed, trials=failed + len(healths))
    if m == "error_rate":
        return judge(gate, events=sum(h.errors for h in healths),
                     trials=sum(h.requests for h in healths))
    if m == "crash_rate":
        alive = [h for h in present if h.samples or h.restarts]
        return judge(gate, events=sum(1 for h in alive if h.restarts), trials=len(alive))
    if m == "agreement":
        return judge(gate, events=sum(h.agree for h in healths),
                     trials=sum(h.pairs for h in healths))
    values = {"p99_ratio": [h.p99_ratio for h in healths],
              "confidence_shift": [h.confidence_shift for h in healths],
              "drift": [h.drift_psi for h in healths]}[m]
    return judge(gate, values=[v for v in values if v is not None])


def _judge(state: RolloutState, observations: Mapping[str, Observation],
           now: float) -> StepResult:
    spec = state.spec
    devices = phase_devices(state)
    seen = [observations.get(d) for d in devices]
    outcomes = {d: _outcome(state, o) for d, o in zip(devices, seen, strict=False)}
    failed = sum(1 for s in outcomes.values() if s == "failed")
    running = [o for o, d in zip(seen, devices, strict=True)
               if o is not None and outcomes[d] == "running"]
    reporting = failed + sum(1 for o in running if o.health.samples)
    required = max(1, math.ceil(spec.min_reporting * len(devices) - 1e-9))
    present = [o.health for o in seen if o is not None]
    results = [_judge_gate(gate, failed, [o.health for o in running], present)
               for gate in spec.gates]
    waiting = []
    remaining = state.phase_started_at + (spec.shadow_s if state.phase == "shadow"
                                          else spec.bake_s) - now
    if remaining > 0:
        waiting.append(f"baking {remaining:.0f} s more")
    if reporting < required:
        waiting.append(f"{reporting} of {required} devices reporting")
    waiting += [f"{r.gate.metric}: {r.n} of {r.gate.min_n} samples" for r in results
                if r.status == "waiting"]
    verdict = ("failed" if any(r.status == "fail" for r in results)
               else "waiting" if waiting and remaining <= 0
               else "baking" if waiting else "passed")
    return StepResult(state.phase_name(), len(devices), reporting, required,
                      state.phase_started_at, verdict,
                      now if verdict == "passed" else None, tuple(results), outcomes,
                      "; ".join(waiting))


def observe(state: RolloutState, device: str, *, online: bool, version: int | None,
            install_version: int | None, install_state: str | None,
            samples: Iterable[Telemetry]) -> Observation:
    """An :class:`~.model.Observation` of ``device`` from what the server holds of it: its
    online state, reported version and last install of the rollout's model, and its
    telemetry ``samples`` (from before the rollout started on, for the baseline)."""
    spec = state.spec
    previous = spec.previous.get(device)
    health = summarize(samples, model=spec.model, candidate=spec.candidate.version,
                       previous=None if previous is None else previous.version,
                       phase=state.phase, exposed_at=state.exposed.get(device, math.inf),
                       started_at=state.created_at)
    return Observation(device, online, version, install_version, install_state, health)
