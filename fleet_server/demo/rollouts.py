"""The rollout acts: roll the group back to v2 (a re-release, v4); a rollout of a
class-swapped v5 that the agreement gate halts at the canary; a rollout of v6 through
shadow, canary and 100% that succeeds; the audit log verified (:func:`rollouts`)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fleet_server.api_client import ServerClient

from .harness import (
    GROUP,
    Agent,
    Demo,
    DemoError,
    converged,
    group_devices,
    install_of,
    tool,
    write_samples,
)
from .traffic import Load

__all__ = ["rollouts"]


# The digits model with output classes 0 and 1 swapped, in every ONNX artifact of an
# edge-compress output directory, and in its golden self-test outputs: a model that passes
# its own self-test and answers differently. Run as a process (the server imports no onnx).
_SWAP_SCRIPT = """
import base64, json, pathlib, shutil, sys
import numpy, onnx
from onnx import helper, numpy_helper
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
shutil.copytree(src, dst)
report = json.loads((dst / "report.json").read_text())
perm = numpy.arange(10, dtype=numpy.int64)
perm[[0, 1]] = perm[[1, 0]]
for variant in report["variants"]:
    if variant["format"] != "onnx":
        continue
    path = dst / variant["file"]
    model = onnx.load(path)
    graph = model.graph
    for out in graph.output:
        raw = out.name + "_unswapped"
        for node in graph.node:
            node.output[:] = [raw if o == out.name else o for o in node.output]
        graph.initializer.append(numpy_helper.from_array(perm, out.name + "_perm"))
        graph.node.append(helper.make_node("Gather", [raw, out.name + "_perm"], [out.name],
                                           axis=1))
    onnx.save(model, path)
for case in report.get("self_test", []):
    for tensor in case["expected_outputs"].values():
        a = numpy.frombuffer(base64.b64decode(tensor["data"]), dtype=tensor["dtype"])
        a = a.reshape(tensor["shape"])[:, perm]
        tensor["data"] = base64.b64encode(numpy.ascontiguousarray(a).tobytes()).decode()
(dst / "self_test.npz").unlink(missing_ok=True)
(dst / "report.json").write_text(json.dumps(report))
"""


def rollouts(demo: Demo, api: ServerClient, fleet: list[str], agents: list[Agent], *,
              bundles: dict[int, Path], data: Path) -> None:
    """Steps 9-11 (module docstring): a halted and a successful rollout."""
    workdir = demo.workdir
    keys = ["--keys", str(workdir / "keys"), *fleet]
    demo.title("Roll the group back to v2 (re-released by the server as v4)")
    demo.run([tool("fleet"), "rollback", "--group", GROUP, *fleet])
    converged(demo, api, 4)
    demo.title("Build v5: the same model with classes 0 and 1 swapped (its self-test "
               "passes), and v6: the good model again")
    subprocess.run([sys.executable, "-c", _SWAP_SCRIPT, str(workdir / "artifacts"),
                    str(workdir / "artifacts-swapped")], check=True)
    for version, artifacts in ((5, "artifacts-swapped"), (6, "artifacts")):
        bundles[version] = workdir / f"digits-{version}.efb"
        demo.run([tool("fleet"), "bundle", "build", "--name", "digits", "--version",
                  str(version), "--artifacts", str(workdir / artifacts), "--out",
                  str(bundles[version]), *keys])
    x = workdir / "digits-stream.npy"
    write_samples(data, x, 540)
    # Every agent answers a stream of app requests (a few hundred a second, leaving the
    # two cores room for installs): the compared requests the agreement gate counts.
    loads = [Load(demo, agent, x, pause_s=0.004) for agent in agents]
    try:
        # A few telemetry samples under load first: each device's latency before the
        # rollout, which the p99_ratio gate compares the new version's with.
        time.sleep(6)
        demo.title("Roll out v5 (canary 34% -> 100%): the agreement gate halts it at the "
                   "canary and the canary goes back to v4")
        rollout = demo.run([tool("fleet"), "rollout", "start", str(bundles[5]), "--group",
                            GROUP, "--steps", "34,100", "--bake", "20s", *fleet],
                           show=False).stdout.strip()
        print(f"    rollout {rollout} started")
        view = _rollout_end(demo, api, rollout)
        if view is None:
            _skip(demo, rollout, fleet)
            return
        _halted_at_canary(demo, api, view, agents)
        demo.title("Roll out v6: shadow on the canary, then canary, then 100%")
        # The latency gate is off for this act: the digits model answers in ~25 us, so its
        # p99 on a machine running three agents, their traffic and the server is scheduling
        # noise: an identical model read 0.16x and 1.95x in two runs (docs/rollouts.md,
        # "Limits").
        rollout = demo.run([tool("fleet"), "rollout", "start", str(bundles[6]), "--group",
                            GROUP, "--shadow", "10s", "--steps", "34,100", "--bake", "8s",
                            "--gate", "p99_ratio=off", *fleet], show=False).stdout.strip()
        view = _rollout_end(demo, api, rollout)
        if view is None or view["state"] != "succeeded":
            raise DemoError(f"rollout {rollout} of a good version did not succeed: "
                            f"{view and view['reason']}")
        converged(demo, api, 6)
    finally:
        for load in loads:
            load.finish()
    demo.run([tool("fleet"), "rollout", "status", rollout, *fleet])
    demo.title("The audit log: who did what, when and why; its hash chain verified")
    demo.run([tool("fleet"), "audit", "verify", *fleet])


def _halted_at_canary(demo: Demo, api: ServerClient, view: dict[str, Any],
                      agents: list[Agent]) -> None:
    reason = view["reason"] or {}
    print(f"    {view['state']}: {reason.get('text')}")
    if view["state"] != "halted" or view["step"] != "34%":
        raise DemoError(f"rollout {view['id']} ended {view['state']} at {view['step']}, "
                        "not halted at the canary")
    if reason.get("gate") != "agreement>=0.98":
        # A canary can also roll the model back itself (its probation) before enough
        # answers were compared; the halt is then the install gate's. Still a halt.
        print("    (the canary's own probation rolled v5 back before the agreement gate "
              "had its evidence)")
    canary = set(view["steps"][0]["devices"])
    converged(demo, api, 4)
    never = [a.device for a in agents if a.device not in canary]
    for device in group_devices(api):
        if device["id"] in never and install_of(device).get("version") == 5:
            raise DemoError(f"{device['id']} was outside the canary and still got v5")
    print(f"    canary {', '.join(sorted(canary))} back on v4; "
          f"{', '.join(never)} never received v5")


def _skip(demo: Demo, rollout: str, fleet: list[str]) -> None:
    """The agents do not report comparisons: say so, abort, and end the demo there."""
    print("    the agents report no `previous` comparisons (models.digits.previous in "
          "their telemetry; docs/rollouts.md), so the agreement gate cannot judge: this "
          "agent predates the monitoring contract. Aborting the rollout; the model-aware "
          "rollout steps are skipped.")
    demo.run([tool("fleet"), "rollout", "abort", rollout, "--reason",
              "agents report no comparisons", *fleet])
    demo.title("The audit log: who did what, when and why; its hash chain verified")
    demo.run([tool("fleet"), "audit", "verify", *fleet])


def _rollout_end(demo: Demo, api: ServerClient, rollout: str) -> dict[str, Any] | None:
    """Wait until the rollout is final, or None when its step waits for agreement data that
    the agents never send (every device reporting, the bake over, no pairs compared)."""
    views: list[dict[str, Any]] = []

    def final() -> bool:
        views.append(api.get(f"/api/rollouts/{rollout}"))
        view = views[-1]
        step: dict[str, Any] = next(
            (s for s in view["steps"] if s["name"] == view["step"]), {})
        agreement = next((g for g in view["gates"] if g["metric"] == "agreement"), None)
        stuck = (step.get("verdict") == "waiting" and agreement is not None
                 and agreement["n"] == 0 and step.get("reporting") == step.get("required"))
        return stuck or view["state"] in ("halted", "succeeded", "aborted")

    demo.wait(final, f"rollout {rollout} to end", lambda: (
        f"it is {views[-1]['state']} at {views[-1]['step']}, waiting for: "
        f"{[s.get('waiting_for') for s in views[-1]['steps']]}"), timeout=120)
    return views[-1] if views[-1]["state"] in ("halted", "succeeded", "aborted") else None

