"""A rollout's records: what was asked (:class:`RolloutSpec`), where it is
(:class:`RolloutState`), what the controller sees (:class:`Observation`) and what it asks
for (:class:`SetDesired`, :class:`Emit`); and the state's JSON form, as the registry keeps
it (:func:`state_to_json`, :func:`state_from_json`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from protocol.messages import DesiredModel, DesiredShadow

from .evidence import Health
from .gates import DEFAULT_GATES, Gate, GateResult
from .plan import Target

__all__ = ["FINAL", "STATUSES", "Emit", "Observation", "Reason", "Rerelease", "RolloutSpec",
           "RolloutState", "SetDesired", "StepResult", "gate_result_json", "spec_to_json",
           "state_from_json", "state_to_json"]

#: A rollout's states; the last three are final.
STATUSES = ("running", "paused", "halted", "succeeded", "aborted")
FINAL = frozenset({"halted", "succeeded", "aborted"})


@dataclass(frozen=True)
class RolloutSpec:
    """What the operator asked for. ``previous`` holds each target's desired model before
    the rollout (None: it had none), what a halt or abort returns it to."""

    id: str
    model: str
    candidate: DesiredModel
    targets: tuple[Target, ...]
    previous: Mapping[str, DesiredModel | None]
    steps: tuple[float, ...] = (5.0, 25.0, 100.0)
    #: Seconds each step bakes before it may pass; the shadow phase's length (0: none).
    bake_s: float = 600.0
    shadow_s: float = 0.0
    #: Share of requests run on the shadow candidate, and on the kept previous version.
    shadow_rate: float = 0.1
    compare_share: float = 0.1
    #: Share of a step's devices that must report before the step is judged passed.
    min_reporting: float = 0.8
    gates: tuple[Gate, ...] = DEFAULT_GATES
    #: How the targets were chosen (``group:lab``), for display.
    selector: str = ""
    #: Who started it (the operator identity of the API token).
    actor: str = ""


@dataclass(frozen=True)
class StepResult:
    """The latest judgement of a phase: ``name`` is ``shadow`` or the step's share
    (``5%``); ``outcomes`` maps each of its devices to where it is (``pending``,
    ``installing``, ``running``, ``failed``, ``restored``); ``verdict`` is ``baking``,
    ``waiting``, ``passed``, ``failed`` or ``skipped``."""

    name: str
    devices: int
    reporting: int
    required: int
    started_at: float
    verdict: str = "baking"
    ended_at: float | None = None
    gates: tuple[GateResult, ...] = ()
    outcomes: Mapping[str, str] = field(default_factory=dict)
    #: Why it is not passed yet, in words (empty when nothing holds it).
    waiting_for: str = ""


@dataclass(frozen=True)
class Reason:
    """Why a rollout stopped: the gate, its numbers, and words."""

    text: str
    phase: str
    gate: str | None = None
    value: float | None = None
    threshold: float | None = None
    bound: float | None = None
    n: int | None = None

    def detail(self) -> dict[str, Any]:
        """As an event's detail."""
        return {"step": self.phase, "gate": self.gate, "value": self.value,
                "threshold": self.threshold, "bound": self.bound, "n": self.n,
                "reason": self.text}


@dataclass(frozen=True)
class RolloutState:
    """Where a rollout is. ``phase`` is ``shadow`` or ``steps`` (``step`` indexes
    ``spec.steps``); ``exposed`` maps each device whose desired state the rollout changed
    to when; ``results`` has one entry per phase reached. ``revision`` counts saves (the
    registry refuses a save from an older revision: two servers cannot both move it)."""

    spec: RolloutSpec
    status: str
    phase: str
    step: int
    phase_started_at: float
    created_at: float
    updated_at: float
    exposed: Mapping[str, float] = field(default_factory=dict)
    results: tuple[StepResult, ...] = ()
    reason: Reason | None = None
    revision: int = 0
    #: After a halt or abort: devices sent back to their previous version that have not
    #: shown it yet, each ``switching`` (asked for the previous bundle) or ``rereleased``
    #: (asked for its re-release), watched until ``restore_until``.
    restoring: Mapping[str, str] = field(default_factory=dict)
    restore_until: float | None = None
    #: Re-releases made for this rollout's devices: source bundle sha256 -> re-release.
    rereleased: Mapping[str, DesiredModel] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        """Whether the rollout is over (halted, succeeded or aborted)."""
        return self.status in FINAL

    def phase_name(self) -> str:
        """``shadow`` or the current step's share, as in results."""
        return "shadow" if self.phase == "shadow" else f"{self.spec.steps[self.step]:g}%"

    def with_result(self, result: StepResult) -> RolloutState:
        """This state with the current phase's result replaced (or added)."""
        kept = tuple(r for r in self.results if r.name != result.name)
        return replace(self, results=(*kept, result))


@dataclass(frozen=True)
class Observation:
    """What the server knows of one target device now: whether it is online, the version of
    the rollout's model it runs (and its install state), its last install of the model,
    and the evidence of its telemetry since it was exposed."""

    device: str
    online: bool = True
    version: int | None = None
    install_version: int | None = None
    install_state: str | None = None
    health: Health = field(default_factory=Health)


@dataclass(frozen=True)
class SetDesired:
    """Set the desired state of ``model`` on each device (None: not desired)."""

    model: str
    targets: Mapping[str, DesiredModel | None]
    why: str


@dataclass(frozen=True)
class Rerelease:
    """Re-release ``source`` (a previous version devices refused as a downgrade) as the
    next version of ``model``, and ask ``devices`` for it (the runner signs it, then asks
    :func:`~.controller.rereleased` for the actions)."""

    model: str
    source: DesiredModel
    devices: tuple[str, ...]


@dataclass(frozen=True)
class Emit:
    """Write an event of ``kind`` (``rollout.halted``, ...) with ``detail``."""

    kind: str
    detail: Mapping[str, Any]


# --- JSON form ---------------------------------------------------------------------------

def _desired_to(d: DesiredModel | None) -> dict[str, Any] | None:
    if d is None:
        return None
    out: dict[str, Any] = {"version": d.version, "bundle_sha256": d.bundle_sha256,
                           "size": d.size, "compare_previous": d.compare_previous}
    if d.shadow is not None:
        out["shadow"] = {"version": d.shadow.version, "bundle_sha256": d.shadow.bundle_sha256,
                         "size": d.shadow.size, "sample_rate": d.shadow.sample_rate}
    return out


def _desired_from(obj: Mapping[str, Any] | None) -> DesiredModel | None:
    if obj is None:
        return None
    s = obj.get("shadow")
    shadow = None if s is None else DesiredShadow(int(s["version"]), str(s["bundle_sha256"]),
                                                  int(s["size"]), float(s["sample_rate"]))
    return DesiredModel(int(obj["version"]), str(obj["bundle_sha256"]), int(obj["size"]),
                        shadow, float(obj.get("compare_previous", 0.0)))


def _gate_to(g: Gate) -> dict[str, Any]:
    return {"metric": g.metric, "op": g.op, "threshold": g.threshold, "min_n": g.min_n}


def _gate_from(obj: Mapping[str, Any]) -> Gate:
    return Gate(str(obj["metric"]), str(obj["op"]), float(obj["threshold"]), int(obj["min_n"]))


def gate_result_json(r: GateResult) -> dict[str, Any]:
    """A judged gate as JSON (the status's ``gates`` entries)."""
    return {"gate": str(r.gate), **_gate_to(r.gate), "value": r.value, "bound": r.bound,
            "n": r.n, "status": r.status}


def _result_to(r: StepResult) -> dict[str, Any]:
    return {"name": r.name, "devices": r.devices, "reporting": r.reporting,
            "required": r.required, "started_at": r.started_at, "ended_at": r.ended_at,
            "verdict": r.verdict, "waiting_for": r.waiting_for,
            "gates": [gate_result_json(g) for g in r.gates], "outcomes": dict(r.outcomes)}


def _result_from(obj: Mapping[str, Any]) -> StepResult:
    gates = tuple(GateResult(_gate_from(g), g["value"], g["bound"], int(g["n"]),
                             str(g["status"])) for g in obj["gates"])
    return StepResult(str(obj["name"]), int(obj["devices"]), int(obj["reporting"]),
                      int(obj["required"]), float(obj["started_at"]), str(obj["verdict"]),
                      obj["ended_at"], gates, dict(obj["outcomes"]), str(obj["waiting_for"]))


def spec_to_json(spec: RolloutSpec) -> dict[str, Any]:
    """The spec as JSON."""
    return {"id": spec.id, "model": spec.model, "candidate": _desired_to(spec.candidate),
            "targets": [[t.device, t.profile] for t in spec.targets],
            "previous": {d: _desired_to(p) for d, p in spec.previous.items()},
            "steps": list(spec.steps), "bake_s": spec.bake_s, "shadow_s": spec.shadow_s,
            "shadow_rate": spec.shadow_rate, "compare_share": spec.compare_share,
            "min_reporting": spec.min_reporting, "gates": [_gate_to(g) for g in spec.gates],
            "selector": spec.selector, "actor": spec.actor}


def _spec_from(obj: Mapping[str, Any]) -> RolloutSpec:
    candidate = _desired_from(obj["candidate"])
    assert candidate is not None
    return RolloutSpec(
        id=str(obj["id"]), model=str(obj["model"]), candidate=candidate,
        targets=tuple(Target(str(d), str(p)) for d, p in obj["targets"]),
        previous={str(d): _desired_from(p) for d, p in obj["previous"].items()},
        steps=tuple(float(s) for s in obj["steps"]), bake_s=float(obj["bake_s"]),
        shadow_s=float(obj["shadow_s"]), shadow_rate=float(obj["shadow_rate"]),
        compare_share=float(obj["compare_share"]), min_reporting=float(obj["min_reporting"]),
        gates=tuple(_gate_from(g) for g in obj["gates"]), selector=str(obj["selector"]),
        actor=str(obj["actor"]))


def state_to_json(state: RolloutState) -> dict[str, Any]:
    """The whole state as JSON (what the registry stores)."""
    r = state.reason
    return {"spec": spec_to_json(state.spec), "status": state.status, "phase": state.phase,
            "step": state.step, "phase_started_at": state.phase_started_at,
            "created_at": state.created_at, "updated_at": state.updated_at,
            "exposed": dict(state.exposed), "results": [_result_to(x) for x in state.results],
            "reason": None if r is None else {"text": r.text, **r.detail(), "phase": r.phase},
            "revision": state.revision, "restoring": dict(state.restoring),
            "restore_until": state.restore_until,
            "rereleased": {sha: _desired_to(d) for sha, d in state.rereleased.items()}}


def state_from_json(obj: Mapping[str, Any]) -> RolloutState:
    """Read what :func:`state_to_json` wrote (KeyError/ValueError/TypeError if it is not)."""
    r = obj["reason"]
    reason = None if r is None else Reason(str(r["text"]), str(r["phase"]), r["gate"],
                                           r["value"], r["threshold"], r["bound"], r["n"])
    return RolloutState(
        spec=_spec_from(obj["spec"]), status=str(obj["status"]), phase=str(obj["phase"]),
        step=int(obj["step"]), phase_started_at=float(obj["phase_started_at"]),
        created_at=float(obj["created_at"]), updated_at=float(obj["updated_at"]),
        exposed={str(d): float(t) for d, t in obj["exposed"].items()},
        results=tuple(_result_from(x) for x in obj["results"]), reason=reason,
        revision=int(obj["revision"]),
        # States stored before re-releases existed have none of these.
        restoring={str(d): str(how) for d, how in obj.get("restoring", {}).items()},
        restore_until=(None if obj.get("restore_until") is None
                       else float(obj["restore_until"])),
        rereleased={str(sha): d for sha, x in obj.get("rereleased", {}).items()
                    if (d := _desired_from(x)) is not None})
