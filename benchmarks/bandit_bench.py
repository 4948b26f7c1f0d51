"""Bandit benchmark: regret of Thompson sampling against a uniform split and epsilon-greedy,
and of a fleet that shares its posterior against devices that learn alone.

Simulated arms with known Bernoulli reward rates (no model runs; what is measured is the
decision code: ``stats.bandit`` and ``experiments.posterior``). Regret is the expected
reward lost against always serving the best arm, summed over requests (pseudo-regret:
``best rate - chosen arm's rate`` per request, so the figure does not depend on the coin
flips of the rewards), averaged over ``--runs`` seeds (``--seed`` the first), with the mean's
standard error: one run's regret varies a lot (a run that trusts the second-best arm for
long costs several times the mean), so a ratio from 20 runs is uncertain by about 0.02.

1. **One device, 10,000 requests**: Thompson (Beta posterior as served: Jeffreys' prior,
   optimistic draws; plain draws; plain draws with the uniform prior, the earlier policy;
   Normal posterior), a uniform split
   (the A/B test's allocation), epsilon-greedy (10% exploration). Ratios against the uniform
   split measured in the same run; the target is Thompson at most 0.30.
2. **100 devices** (100 requests each, interleaved, 10,000 in all): every device runs
   Thompson on its own ``DeviceLearner``; *shared* closes an interval every N of its requests,
   the server applies the delta (``apply_delta``) and pushes the merged posterior back
   (``receive``); *isolated* never merges. Ratio shared / isolated.

Run::

    .venv/bin/python benchmarks/bandit_bench.py [--runs 20] [--seed 0] [--requests 10000]
        [--part one|fleet|all] [--scenario close|wide|all]
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
from stats.bandit import BETA_PRIOR, ArmStats, Family, thompson_choose  # noqa: E402

SCENARIOS = {
    "wide": ("3 arms 0.10/0.20/0.30", (0.10, 0.20, 0.30)),
    "close": ("4 arms 0.04/0.05/0.06/0.07 (click rates)", (0.04, 0.05, 0.06, 0.07)),
}

Policy = Callable[[dict[str, ArmStats], np.random.Generator], str]


def thompson(family: Family, beta_prior: float = BETA_PRIOR, optimistic: bool = True,
             ) -> Policy:
    """Thompson sampling on the given posterior family (Beta prior, optimistic or plain)."""
    return lambda arms, rng: thompson_choose(arms, rng, family, beta_prior=beta_prior,
                                             optimistic=optimistic)


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


def _mean(regrets: list[float]) -> tuple[float, float]:
    """The mean and its standard error."""
    values = np.asarray(regrets)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def main() -> None:
    """Run the parts asked for and print regrets and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the first run's seed")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--part", choices=["one", "fleet", "all"], default="all")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    args = parser.parse_args()
    started = time.monotonic()
    seeds = range(args.seed, args.seed + args.runs)
    print(f"cumulative regret at {args.requests:,} requests, mean ± standard error of "
          f"{args.runs} runs (seeds {seeds.start}..{seeds.stop - 1})")
    policies: dict[str, Policy] = {"uniform split": uniform,
                                   "epsilon-greedy (0.1)": epsilon_greedy,
                                   "Thompson (Beta)": thompson("beta"),
                                   "Thompson, plain": thompson("beta", optimistic=False),
                                   "Thompson, plain 1,1": thompson("beta", 1.0, False),
                                   "Thompson (Normal)": thompson("normal")}
    chosen = SCENARIOS.values() if args.scenario == "all" else [SCENARIOS[args.scenario]]
    for title, rates in chosen:
        if args.part in ("one", "all"):
            print(f"\n1. one device, {title}")
            results = {name: _mean([one_device(rates, p, args.requests, seed)
                                    for seed in seeds]) for name, p in policies.items()}
            base = results["uniform split"][0]
            for name, (regret, error) in results.items():
                print(f"   {name:22} regret {regret:8.1f} ± {error:5.1f}   vs uniform "
                      f"{regret / base:.3f} ± {error / base:.3f}")
        if args.part in ("fleet", "all"):
            print(f"\n2. {args.devices} devices, {args.requests // args.devices} requests "
                  f"each, {title}")
            isolated, error = _mean([fleet(rates, args.devices, args.requests, None, seed)
                                     for seed in seeds])
            print(f"   {'isolated':22} regret {isolated:8.1f} ± {error:5.1f}   vs isolated "
                  "1.000")
            for every in (1, 10, 50):
                shared, error = _mean([fleet(rates, args.devices, args.requests, every, seed)
                                       for seed in seeds])
                print(f"   {f'shared, merge every {every}':22} regret {shared:8.1f} ± "
                      f"{error:5.1f}   vs isolated {shared / isolated:.3f}")
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
