"""``fleet demo``: the product's main job, end to end, on this machine.

The demo drives the real command-line tools as separate processes, exactly as an operator
and devices would run them, so it exercises the installed product rather than library
internals (and keeps ``fleet_server`` free of imports of the agent or the compressor):

1. probe this host, pick its firmware profile and a second one;
2. compress the reference model for both profiles (measured, accuracy-gated);
3. create the fleet's keys and sign bundles v1 and v2 from the compressor's output;
4. start ``fleet serve`` (embedded Mosquitto with mutual TLS and per-device ACLs);
5. enroll three agents with one-time tokens and start them (separate processes, state
   directories and API ports; the third on the other profile, so it runs another variant);
6. publish v1 to the group, wait until every device reports it committed, and serve
   inferences through each agent's local API;
7. publish v2: every agent fetches, verifies, self-tests and hot-swaps it;
8. a v3 tampered after signing, planted in the server's bundle store as a compromised
   server would: every agent fetches it, rejects it with the reason, and keeps serving v2;
9. roll the desired state back (a server-signed re-release of v2's contents, v4);
10. a rollout of v5, the same model with two output classes swapped (it passes its own
    self-test: its golden outputs are swapped too), while every agent serves a stream of
    requests: the canary keeps v4 loaded and compares answers, the agreement gate halts the
    rollout, the canary is back on v4 at once, and the other devices never received v5;
11. a rollout of v6 (v2's artifacts again): shadow on the canary, then canary, then 100%,
    succeeded; the audit log verified.

Steps 10 and 11 need agents that report ``previous`` and ``shadow`` comparisons in their
telemetry (docs/rollouts.md, "What the agent reports"): when the canary runs v5, its bake is
over and no comparison has arrived, the demo says so, aborts the rollout, verifies the audit
log and ends there.

With ``--drift`` (docs/monitoring.md, "The drift demo"), after step 6:

- steady traffic of the digits evaluation images on every agent: ``fleet metrics`` shows
  requests, latency and a low drift PSI, and no alert fires;
- gw-1 starts receiving inverted images (``1 - x``): its agent's monitor reports the
  input drift, the server's drift rule fires, and the alert reaches a webhook (a local
  receiver the demo runs) within :data:`DRIFT_ALERT_S` seconds of the first shifted
  request, shows in ``fleet metrics`` and in what the dashboard reads.

The fleet table is printed after each step. Exit 0 when every expectation held.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .drift import DriftWatch, watch_drift
from .harness import Demo, DemoError, write_samples
from .prepare import prepare, start_fleet
from .publishing import hot_swap, publish_first, tampered
from .rollouts import rollouts

__all__ = ["DemoError", "run_demo"]

REPO_MODELS = Path(__file__).resolve().parent.parent.parent / "models"


def run_demo(workdir: Path | None = None, models: Path = REPO_MODELS, *,
             drift: bool = False) -> int:
    """Run the demo in ``workdir`` (a fresh temporary directory by default); 0 on success.
    ``drift`` adds the monitoring steps (module docstring)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
            return run_demo(Path(tmp), models, drift=drift)
    workdir.mkdir(parents=True, exist_ok=True)
    model, data = models / "digits_cnn.onnx", models / "digits_data.npz"
    for needed in (model, data):
        if not needed.is_file():
            raise DemoError(f"{needed} is missing; run the demo from a full checkout of the "
                            "repository (the reference models are committed there).")
    demo = Demo(workdir, models)
    watch = DriftWatch() if drift else None
    try:
        if watch is not None:
            watch.start()
            watch.write_config(workdir / "server")
        _main(demo, model, data, watch)
    finally:
        demo.stop_all()
        if watch is not None:
            watch.stop()
    print(f"\ndemo passed: {demo.step} steps in {time.monotonic() - demo.started:.1f} s")
    return 0


def _main(demo: Demo, model: Path, data: Path, watch: DriftWatch | None) -> None:
    """The acts in order (module docstring)."""
    profile, other, bundles = prepare(demo, model, data)
    api, fleet, agents = start_fleet(demo, profile, other)
    x = demo.workdir / "digits.npy"
    write_samples(data, x)
    publish_first(demo, api, fleet, agents, bundle=bundles[1], x=x)
    if watch is not None:
        # Before the next step's load, which repeats one image: drift by design.
        watch_drift(demo, api, fleet, agents, data, watch=watch)
    hot_swap(demo, api, fleet, agents, bundle=bundles[2], x=x)
    tampered(demo, api, fleet, agents, bundle=bundles[3], x=x)
    rollouts(demo, api, fleet, agents, bundles=bundles, data=data)
