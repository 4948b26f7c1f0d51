"""Rollout benchmark: the controller and its gates on a simulated fleet (no broker).

Issue 14's targets, on ``--devices`` simulated devices (three firmware profiles) driven by
:class:`fleet_server.rollouts.simulator.SimFleet` with its fake clock (telemetry every 30 s,
installs take 20 s, the controller ticks every 30 s of simulated time):

- a bad model (answers that agree with the previous version's on 85% of inputs: a model
  with classes swapped or a broken export) rolled out at a 5% canary with the default gates:
  the simulated time from start to halt, and the share of the fleet that ever served it
  (target: at most the canary's share);
- a good model over ``--runs`` runs (different seeds and rollout ids) with the default
  gates: false halts (target 0), and the simulated time to success;
- the wall-clock cost of one controller tick over the whole fleet (the controller is pure;
  the simulator's observations are built outside the timed part);
- the cost of one tick of the server's runner on a SQLite registry holding the fleet (every
  device with a report and a few telemetry samples): reading devices and telemetry,
  judging, saving; the first tick reads every sample, later ones only the new.

The exposed share is printed as a ratio against the canary share the plan allows in the
same run. Run::

    nice .venv/bin/python benchmarks/rollout_bench.py --devices 1000 --runs 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fleet_server.registry import open_registry
from fleet_server.rollouts.controller import start, tick
from fleet_server.rollouts.plan import allowed
from fleet_server.rollouts.runner import RolloutOptions, RolloutRunner, Selection
from fleet_server.rollouts.simulator import Behaviour, SimFleet, make_spec
from protocol.messages import DesiredModel, ModelReport, Reported, Telemetry, encode

V1 = DesiredModel(1, "a" * 64, 1_000_000)
V2 = DesiredModel(2, "b" * 64, 1_000_000)
PROFILES = ("x86-64-avx2", "x86-64-vnni", "arm64-neon")


def _fleet(devices: int, seed: int, bad: Behaviour | None) -> SimFleet:
    profiles = {f"dev{i:05d}": PROFILES[i % len(PROFILES)] for i in range(devices)}
    return SimFleet("digits", V1, profiles, seed=seed,
                    behaviour=lambda d, v: bad if (v == 2 and bad is not None) else Behaviour())


def _run(devices: int, seed: int, bad: Behaviour | None) -> tuple[str, float, int, float]:
    """(final state, simulated seconds to it, devices that served v2, seconds per tick)."""
    fleet = _fleet(devices, seed, bad)
    state, actions = start(make_spec(fleet, V2, id=f"r-bench-{seed}"), fleet.now)
    fleet.apply(actions)
    began = fleet.now
    tick_s: list[float] = []
    while not state.final and fleet.now - began < 86_400:
        observations = fleet.observations(state)
        t0 = time.perf_counter()
        state, actions = tick(state, observations, fleet.now)
        tick_s.append(time.perf_counter() - t0)
        fleet.apply(actions)
        fleet.advance(30.0)
    return state.status, fleet.now - began, len(fleet.exposed_to(2)), statistics.median(tick_s)


def _runner_tick(devices: int, samples: int) -> tuple[float, float]:
    """(first tick, a later tick) of RolloutRunner on a SQLite registry, in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        registry = open_registry(Path(tmp) / "fleet.db", blob_dir=Path(tmp) / "blobs")
        v1 = registry.put_bundle(b"digits v1", "digits", 1)
        v2 = registry.put_bundle(b"digits v2", "digits", 2)
        ids = [f"dev{i:05d}" for i in range(devices)]
        now = time.time()
        with registry.batch():
            for i, device in enumerate(ids):
                registry.upsert_device(device, group="lab", cert_fingerprint="ab" * 32,
                                       profile=PROFILES[i % len(PROFILES)])
        registry.set_desired(v1.sha256, group="lab")
        runner = RolloutRunner(registry, publish=lambda ids: None,
                               online=lambda d, at: True)
        state = runner.create(v2.sha256, Selection(group="lab"),
                              RolloutOptions(steps=(100.0,)), actor="bench")
        with registry.batch():
            for device in ids:
                registry.set_reported(device, encode(Reported(
                    "x86", "bench", {"digits": ModelReport(2, None, "committed")}, at=now)))
                registry.add_telemetry(device, [Telemetry(k + 1, now + k, {
                    "interval_s": 30.0, "models": {"digits": {
                        "version": 2, "requests": 100, "errors": 0, "p99_ms": 2.0}}})
                    for k in range(samples)])
        t0 = time.perf_counter()
        runner.tick_all()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner.tick_all()
        later = time.perf_counter() - t0
        assert runner.get(state.spec.id).status == "running"
        registry.close()
    return first, later


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only-runner", action="store_true",
                        help="measure the runner's tick only")
    args = parser.parse_args()
    if args.only_runner:
        _print_runner(args.devices)
        return

    fleet = _fleet(args.devices, 0, None)
    canary = allowed(fleet.targets(), 5.0)
    print(f"{args.devices} simulated devices, {len(PROFILES)} profiles; a 5% canary takes "
          f"{canary} ({canary / args.devices:.1%})")

    wall = time.perf_counter()
    status, took, exposed, per_tick = _run(args.devices, 1, Behaviour(agreement=0.85))
    print(f"bad model (85% agreement): {status} after {took:.0f} s simulated; exposed "
          f"{exposed} devices = {exposed / args.devices:.2%} of the fleet, "
          f"{exposed / canary:.2f}x the canary (target <= 1.00x); "
          f"wall {time.perf_counter() - wall:.1f} s")

    halts, times, ticks = 0, [], [per_tick]
    wall = time.perf_counter()
    for seed in range(args.runs):
        status, took, exposed, per_tick = _run(args.devices, 100 + seed, None)
        halts += status == "halted"
        times.append(took)
        ticks.append(per_tick)
    print(f"good model, {args.runs} runs, default gates: {halts} false halts (target 0); "
          f"succeeded in {statistics.median(times):.0f} s simulated (median; 3 steps x "
          f"600 s bake); wall {time.perf_counter() - wall:.1f} s")
    print(f"one controller tick over {args.devices} devices: "
          f"{statistics.median(ticks) * 1000:.2f} ms (median over runs)")
    _print_runner(args.devices)


def _print_runner(devices: int) -> None:
    first, later = _runner_tick(devices, 5)
    print(f"runner tick on SQLite, {devices} devices x 5 samples, all in the step: first "
          f"{first * 1000:.0f} ms, later {later * 1000:.0f} ms ({later / first:.2f}x the "
          "first)")


if __name__ == "__main__":
    main()
