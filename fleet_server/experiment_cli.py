"""``fleet experiment ...``: A/B tests and bandits over the operator API
(:mod:`fleet_server.api_experiments`). Registered by
:func:`fleet_server.server_cli.add_server_commands`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from .api_client import ServerClient
from .errors import BundleInputError
from .rollout_cli import _client, _print_json, parse_duration

__all__ = ["add_experiment_commands", "experiment_text"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _variant(text: str) -> tuple[str, str]:
    arm, sep, bundle = text.partition("=")
    if not sep or not arm or not bundle:
        raise argparse.ArgumentTypeError(f"{text!r} is not ARM=BUNDLE (a bundle file or the "
                                         "sha256 of a stored bundle)")
    return arm, bundle


def _numbers(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers such as "
                                         "50,50") from None


def _range(text: str) -> tuple[float, float]:
    values = _numbers(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH")
    return values[0], values[1]


def add_experiment_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                            parents: list[argparse.ArgumentParser]) -> None:
    """Add ``experiment`` (``parents``: the server location and ``--json``)."""
    experiment = subparsers.add_parser(
        "experiment", help="A/B tests and bandits: several versions served under one name, "
        "judged on the outcomes apps report")
    actions = experiment.add_subparsers(dest="experiment_command", required=True,
                                        metavar="ACTION")
    start = actions.add_parser(
        "start", parents=parents, help="start an A/B test or a bandit",
        description="Serve the variants under one model name on the selected devices. "
        "Each variant's bundle becomes a desired model of the devices that may serve it "
        "(--unit device: each device serves one arm, chosen by hash, and installs only it; "
        "--unit request: every device installs every variant and picks per request, sticky "
        "per client key). --strategy thompson (with --unit request) is a bandit: arms are "
        "chosen by Thompson sampling on the posterior the fleet learns together. Apps "
        "report outcomes with POST /v2/models/{name}/feedback; see docs/experiments.md.")
    start.add_argument("--name", required=True, help="the experiment's name (never reused)")
    target = start.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", help="every device of this group")
    target.add_argument("--devices", nargs="+", metavar="ID", help="these devices")
    start.add_argument("--variant", type=_variant, action="append", required=True,
                       metavar="ARM=BUNDLE", dest="variants",
                       help="an arm and its bundle (a .efb file, uploaded, or the sha256 of "
                       "a stored bundle); two to sixteen")
    start.add_argument("--split", type=_numbers, metavar="P,P,..",
                       help="shares of the arms, in --variant order (default: equal)")
    start.add_argument("--unit", choices=["device", "request"], default="device",
                       help="what gets an arm: a device, or each request (default device)")
    start.add_argument("--strategy", choices=["split", "thompson"], default="split",
                       help="a fixed split (A/B test) or a Thompson bandit (default split)")
    start.add_argument("--metric", default="reward",
                       help="what the reward apps report measures, shown in the status "
                       "(default reward)")
    start.add_argument("--model", help="the name apps call (default: the first variant's "
                       "model)")
    start.add_argument("--range", type=_range, default=(0.0, 1.0), metavar="LOW,HIGH",
                       help="rewards are clipped to this range (default 0,1)")
    start.add_argument("--lower-is-better", action="store_true",
                       help="the best arm has the lowest mean (a latency, a cost)")
    start.add_argument("--family", choices=["beta", "normal"], default="beta",
                       help="the bandit's posterior (default beta: 0/1-like rewards)")
    start.add_argument("--alpha", type=float, default=0.05,
                       help="error level of the always-valid decision (default 0.05)")
    start.set_defaults(handler=_start)

    status = actions.add_parser(
        "status", parents=parents, help="per arm n, mean, interval, and the verdict",
        description="Per arm: outcomes reported, mean reward, its always-valid interval "
        "(valid however often you look), and the probability of being best; the verdict "
        "names a winner once its interval clears every other arm's. Without NAME: every "
        "experiment, newest first.")
    status.add_argument("name", nargs="?", metavar="NAME")
    status.set_defaults(handler=_status)

    stop = actions.add_parser("stop", parents=parents,
                              help="end it: devices serve the model name directly again")
    stop.add_argument("name", metavar="NAME")
    stop.add_argument("--reason", default="", help="why (kept in the audit log)")
    stop.set_defaults(handler=_stop)

    promote = actions.add_parser(
        "promote", parents=parents, help="end it and roll the winner out (a rollout)",
        description="End the experiment and start a rollout of the winning arm's bundle to "
        "its devices, through the rollout controller (health gates, steps; see `fleet "
        "rollout status`).")
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("winner", metavar="WINNER", help="the arm to promote")
    promote.add_argument("--steps", type=_numbers, default=[100.0], metavar="P,P,..",
                         help="the rollout's step percentages (default 100)")
    promote.add_argument("--bake", type=parse_duration, default=600.0, metavar="DURATION",
                         help="how long each step bakes (default 10m)")
    promote.add_argument("--gate", action="append", default=[], metavar="EXPR", dest="gates",
                         help="a rollout gate, e.g. agreement>=0.99 or agreement=off, as for "
                         "`fleet rollout start`; repeatable")
    promote.add_argument("--reason", default="", help="why (kept in the audit log)")
    promote.set_defaults(handler=_promote)


def _bundle_sha(client: ServerClient, bundle: str) -> str:
    """A stored bundle's sha256, or a bundle file's after uploading it."""
    if _SHA256.fullmatch(bundle):
        return bundle
    try:
        data = Path(bundle).read_bytes()
    except OSError as exc:
        raise BundleInputError(f"cannot read bundle {bundle} ({exc.strerror}); give a .efb "
                               "file or the sha256 of a stored bundle") from exc
    return str(client.post("/api/bundles", data=data)["sha256"])


def _start(args: argparse.Namespace) -> int:
    client = _client(args)
    variants = [{"arm": arm, "bundle_sha256": _bundle_sha(client, bundle)}
                for arm, bundle in args.variants]
    body: dict[str, Any] = {
        "name": args.name, "variants": variants, "unit": args.unit,
        "strategy": args.strategy, "metric": args.metric, "low": args.range[0],
        "high": args.range[1], "higher_is_better": not args.lower_is_better,
        "family": args.family, "alpha": args.alpha,
        **({"group": args.group} if args.group else {"devices": args.devices})}
    if args.split is not None:
        body["split"] = args.split
    if args.model is not None:
        body["model"] = args.model
    view = client.post("/api/experiments", body)
    if args.json:
        _print_json(view)
    else:
        print(experiment_text(view))
    return 0


def _status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.name is not None:
        view = client.get(f"/api/experiments/{args.name}")
        _print_json(view) if args.json else print(experiment_text(view))
        return 0
    found = client.get("/api/experiments")["experiments"]
    if args.json:
        _print_json(found)
    elif not found:
        print("no experiments yet; start one with `fleet experiment start`")
    else:
        print("\n\n".join(experiment_text(view) for view in found))
    return 0


def _stop(args: argparse.Namespace) -> int:
    view = _client(args).post(f"/api/experiments/{args.name}/stop", {"reason": args.reason})
    _print_json(view) if args.json else print(experiment_text(view))
    return 0


def _promote(args: argparse.Namespace) -> int:
    answer = _client(args).post(f"/api/experiments/{args.name}/promote", {
        "winner": args.winner, "steps": args.steps, "bake_s": args.bake,
        "gates": args.gates, "reason": args.reason})
    if args.json:
        _print_json(answer)
    else:
        print(experiment_text(answer["experiment"]))
        print(f"rollout {answer['rollout']['id']} started; follow it with `fleet rollout "
              f"status {answer['rollout']['id']}`")
    return 0


def experiment_text(view: dict[str, Any]) -> str:
    """An experiment's status as the terminal shows it."""
    lines = [f"experiment {view['experiment']} on {view['model']}: {view['status']} "
             f"({view['unit']} units, {view['strategy']}), {view['devices']} device(s), "
             f"metric {view['metric']}, alpha {view['alpha']}"]
    rows = [("arm", "model", "n", "mean", "interval", "P(best)")]
    for arm in view["arms"]:
        mean = f"{arm['mean']:.4f}" if arm["n"] else "-"
        interval = ("-" if not arm["n"]
                    else f"[{arm['lower']:.4f}, {arm['upper']:.4f}]")
        rows.append((arm["arm"], arm["model"], str(arm["n"]), mean, interval,
                     f"{arm['probability_best']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    verdict = (f"winner: {view['winner']} (its interval clears every other arm's)"
               if view["verdict"] == "winner"
               else "running: no arm's interval clears the others yet"
               if view["verdict"] == "running"
               else f"undecided: it was {view['status']} before any arm's interval cleared "
                    "the others")
    lines.append(f"verdict: {verdict}")
    if view.get("promoted"):
        lines.append(f"promoted: {view['promoted']}")
    return "\n".join(lines)
