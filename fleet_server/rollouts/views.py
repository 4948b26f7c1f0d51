"""A rollout as the operator sees it: the JSON of ``fleet rollout status --json`` and the
API (schema ``Rollout``), and its text form."""

from __future__ import annotations

from typing import Any

from .controller import phase_devices
from .model import RolloutState, StepResult, gate_result_json
from .plan import plan_steps

__all__ = ["rollout_json", "rollout_text"]


def rollout_json(state: RolloutState, *, devices: bool = True) -> dict[str, Any]:
    """The rollout: ``state`` (running, paused, halted, succeeded, aborted), the current
    ``step``, per step its devices and results, and every gate of the current step with
    measured value, threshold and sample size. ``devices=False`` leaves out per-device
    outcomes (for lists)."""
    spec = state.spec
    plan = plan_steps(spec.id, spec.targets, spec.steps)
    results = {r.name: r for r in state.results}
    phases: list[dict[str, Any]] = []
    if spec.shadow_s > 0:
        phases.append(_phase("shadow", None, plan[0], results.get("shadow"), devices))
    reached: list[str] = []
    for share, added in zip(spec.steps, plan, strict=True):
        reached += added
        phases.append(_phase(f"{share:g}%", share, tuple(reached), results.get(f"{share:g}%"),
                             devices))
    current = results.get(state.phase_name())
    out: dict[str, Any] = {
        "id": spec.id, "model": spec.model, "version": spec.candidate.version,
        "bundle_sha256": spec.candidate.bundle_sha256, "state": state.status,
        "phase": state.phase, "step": state.phase_name(),
        "step_index": -1 if state.phase == "shadow" else state.step,
        "selector": spec.selector, "actor": spec.actor, "targets": len(spec.targets),
        "exposed": len(state.exposed), "created_at": state.created_at,
        "updated_at": state.updated_at, "bake_s": spec.bake_s, "shadow_s": spec.shadow_s,
        "gates": [] if current is None else [gate_result_json(g) for g in current.gates],
        "steps": phases,
        "reason": None if state.reason is None else {
            "text": state.reason.text, **state.reason.detail()},
    }
    if devices:
        out["devices_in_step"] = list(phase_devices(state))
    return out


def _phase(name: str, share: float | None, members: tuple[str, ...],
           result: StepResult | None, devices: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "share": share, "count": len(members),
                           "verdict": "pending" if result is None else result.verdict}
    if result is not None:
        out.update(reporting=result.reporting, required=result.required,
                   started_at=result.started_at, ended_at=result.ended_at,
                   waiting_for=result.waiting_for,
                   gates=[gate_result_json(g) for g in result.gates])
    if devices:
        outcomes = {} if result is None else dict(result.outcomes)
        out["devices"] = {d: outcomes.get(d, "pending") for d in members}
    return out


def rollout_text(view: dict[str, Any]) -> str:
    """The human form of :func:`rollout_json`'s output."""
    lines = [f"rollout {view['id']}: {view['model']} v{view['version']} to {view['selector']} "
             f"({view['targets']} devices): {view['state'].upper()} at {view['step']}"]
    if view.get("reason"):
        lines.append(f"  reason: {view['reason']['text']}")
    for phase in view["steps"]:
        counts: dict[str, int] = {}
        for outcome in phase.get("devices", {}).values():
            counts[outcome] = counts.get(outcome, 0) + 1
        summary = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
        line = f"  {phase['name']:>7}  {phase['count']:5d} devices  {phase['verdict']:<8}"
        if "reporting" in phase:
            line += f"  {phase['reporting']}/{phase['required']} reporting"
        lines.append(line + (f"  ({summary})" if summary else ""))
        if phase.get("waiting_for") and phase["verdict"] in ("baking", "waiting"):
            lines.append(f"           waiting: {phase['waiting_for']}")
    if view["gates"]:
        lines.append("  gates (current step):")
        for g in view["gates"]:
            value = "no data" if g["value"] is None else f"{g['value']:.4g}"
            bound = "" if g["bound"] is None else f", bound {g['bound']:.4g}"
            lines.append(f"    {g['status']:<7} {g['gate']:<24} measured {value}{bound}, "
                         f"n={g['n']}")
    return "\n".join(lines)
