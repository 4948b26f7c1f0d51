"""Bandit benchmark: regret of Thompson sampling against a uniform split and epsilon-greedy,
and of a fleet that shares its posterior against devices that learn alone.

Simulated arms with known Bernoulli reward rates (no model runs; what is measured is the
decision code: ``stats.bandit`` and ``experiments.posterior``). Regret is the expected
reward lost against always serving the best arm, summed over requests (pseudo-regret:
``best rate - chosen arm's rate`` per request, so the figure does not depend on the coin
flips of the rewards), averaged over ``--runs`` seeds.

1. **One device, 10,000 requests**: Thompson (Beta and Normal posteriors), a uniform split
   (the A/B test's allocation), epsilon-greedy (10% exploration). Ratios against the uniform
   split measured in the same run; the target is Thompson at most 0.30.
2. **100 devices** (100 requests each, interleaved, 10,000 in all): every device runs
   Thompson on its own ``DeviceLearner``; *shared* closes an interval every N of its requests,
   the server applies the delta (``apply_delta``) and pushes the merged posterior back
   (``receive``); *isolated* never merges. Ratio shared / isolated.

Run::

    .venv/bin/python benchmarks/bandit_bench.py [--runs 20] [--requests 10000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.posterior import (  # noqa: E402
    DeviceLearner,
    FleetPosterior,
    apply_delta,
    close_interval,
    local_posterior,
    observe,
    push_for,
    receive,
)
from stats.bandit import ArmStats, Family, thompson_choose  # noqa: E402

SCENARIOS = {
    "3 arms 0.10/0.20/0.30": (0.10, 0.20, 0.30),
    "4 arms 0.04/0.05/0.06/0.07 (click rates)": (0.04, 0.05, 0.06, 0.07),
}

Policy = Callable[[dict[str, ArmStats], np.random.Generator], str]


def thompson(family: Family) -> Policy:
    """Thompson sampling on the given posterior family."""
    return lambda arms, rng: thompson_choose(arms, rng, family)


def uniform(arms: dict[str, ArmStats], rng: np.random.Generator) -> str:
    """An even split: what an A/B test serves until it stops."""
    names = sorted(arms)
    return names[int(rng.integers(len(names)))]


def epsilon_greedy(arms: dict[str, ArmStats], rng: np.random.Generator) -> str:
    """10% of requests at random, the rest to the best mean so far (untried arms first)."""
    names = sorted(arms)
    if rng.random() < 0.1:
        return names[int(rng.integers(len(names)))]
    return max(names, key=lambda n: (arms[n].n == 0, arms[n].mean))


def one_device(rates: tuple[float, ...], policy: Policy, requests: int, seed: int) -> float:
    """Cumulative regret of one device serving ``requests`` with ``policy``."""
    rng = np.random.default_rng(seed)
    names = [f"arm{i}" for i in range(len(rates))]
    rate = dict(zip(names, rates, strict=True))
    arms = {n: ArmStats() for n in names}
    regret = 0.0
    for _ in range(requests):
        arm = policy(arms, rng)
        arms[arm] = arms[arm].add(float(rng.random() < rate[arm]))
        regret += max(rates) - rate[arm]
    return regret


def fleet(rates: tuple[float, ...], devices: int, requests: int, merge_every: int | None,
          seed: int) -> float:
    """Cumulative regret of ``devices`` Thompson learners serving ``requests`` in turn;
    ``merge_every`` requests per device they exchange deltas with the server (None: never)."""
    rng = np.random.default_rng(seed)
    names = tuple(f"arm{i}" for i in range(len(rates)))
    rate = dict(zip(names, rates, strict=True))
    server = FleetPosterior.start("bench", names)
    ids = [f"dev{i}" for i in range(devices)]
    learners = {d: DeviceLearner.start("bench", names) for d in ids}
    regret = 0.0
    for request in range(requests):
        device = ids[request % devices]
        learner = learners[device]
        arm = thompson_choose(local_posterior(learner), rng, "beta")
        learner = observe(learner, arm, float(rng.random() < rate[arm]))
        regret += max(rates) - rate[arm]
        served = request // devices + 1
        if merge_every is not None and served % merge_every == 0:
            learner, delta = close_interval(learner, device)
            if delta is not None:
                server, _ = apply_delta(server, delta)
            learner = receive(learner, push_for(server, device))
        learners[device] = learner
    return regret


def main() -> None:
    """Run both parts and print regrets and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=100)
    args = parser.parse_args()
    started = time.monotonic()
    print(f"cumulative regret at {args.requests:,} requests, mean of {args.runs} runs")
    policies: dict[str, Policy] = {"uniform split": uniform,
                                   "epsilon-greedy (0.1)": epsilon_greedy,
                                   "Thompson (Beta)": thompson("beta"),
                                   "Thompson (Normal)": thompson("normal")}
    for title, rates in SCENARIOS.items():
        print(f"\n1. one device, {title}")
        results = {name: float(np.mean([one_device(rates, p, args.requests, seed)
                                        for seed in range(args.runs)]))
                   for name, p in policies.items()}
        for name, regret in results.items():
            print(f"   {name:22} regret {regret:8.1f}   vs uniform "
                  f"{regret / results['uniform split']:.3f}")
        print(f"\n2. {args.devices} devices, {args.requests // args.devices} requests each, "
              f"{title}")
        isolated = float(np.mean([fleet(rates, args.devices, args.requests, None, seed)
                                  for seed in range(args.runs)]))
        print(f"   {'isolated':22} regret {isolated:8.1f}   vs isolated 1.000")
        for every in (1, 10, 50):
            shared = float(np.mean([fleet(rates, args.devices, args.requests, every, seed)
                                    for seed in range(args.runs)]))
            print(f"   {f'shared, merge every {every}':22} regret {shared:8.1f}   vs isolated "
                  f"{shared / isolated:.3f}")
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
