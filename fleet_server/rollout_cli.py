"""``fleet rollout ...`` and ``fleet audit``: the operator's rollout and audit commands,
over the operator API (:mod:`fleet_server.api_rollouts`, :mod:`fleet_server.api_audit`).
Registered by :func:`fleet_server.server_cli.add_server_commands`."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from .api_client import ServerClient, locate
from .audit import AuditEntry, verify_chain
from .errors import AuditError, BundleInputError
from .rollouts.gates import DEFAULT_GATES, METRICS
from .rollouts.views import rollout_text

__all__ = ["add_rollout_commands", "parse_duration"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_WAIT_POLL_S = 2.0
_FINAL = ("halted", "succeeded", "aborted")
_AUDIT_PAGE = 1000


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d`` as seconds (argparse's type)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 10m, 2h")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _steps(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of percentages such as "
                                         "5,25,100") from None


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share above 0 and at most 1")
    return value


def add_rollout_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                         parents: list[argparse.ArgumentParser]) -> None:
    """Add ``rollout`` and ``audit`` (``parents``: the server location and ``--json``)."""
    rollout = subparsers.add_parser("rollout", help="take a version to devices step by step, "
                                    "halted automatically by health gates")
    actions = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    gates = ", ".join(str(g) for g in DEFAULT_GATES)
    start = actions.add_parser(
        "start", parents=parents, help="upload a bundle and start a rollout; prints its id",
        description="Upload BUNDLE_FILE and roll it out: an optional shadow phase (the "
        "first step's devices run it beside their model, never serving it), then steps "
        "(percentages of the selected devices, every firmware profile in the first), each "
        f"baking for --bake and judged by gates (default: {gates}). A failing gate halts "
        "the rollout and puts every device it reached back on its previous version. "
        f"Metrics: {', '.join(METRICS)}.")
    start.add_argument("bundle_file", type=Path, metavar="BUNDLE_FILE")
    target = start.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", help="every device of this group")
    target.add_argument("--device", action="append", metavar="ID", dest="devices",
                        help="this device (repeatable)")
    target.add_argument("--tag", help="every device with this tag")
    target.add_argument("--profile", help="every device of this firmware profile")
    start.add_argument("--shadow", type=parse_duration, default=0.0, metavar="DURATION",
                       help="run a shadow phase this long first (e.g. 10m; default none)")
    start.add_argument("--steps", type=_steps, default=[5.0, 25.0, 100.0], metavar="P,P,..",
                       help="step percentages ending at 100 (default 5,25,100)")
    start.add_argument("--bake", type=parse_duration, default=600.0, metavar="DURATION",
                       help="how long each step bakes before it may pass (default 10m)")
    start.add_argument("--gate", action="append", default=[], metavar="EXPR", dest="gates",
                       help="a gate, e.g. agreement>=0.99 (replaces that metric's default) "
                       "or drift=off (drops it); repeatable")
    start.add_argument("--shadow-rate", type=_share, default=0.1, metavar="SHARE",
                       help="share of requests the shadow candidate runs on (default 0.1)")
    start.add_argument("--compare-share", type=_share, default=0.1, metavar="SHARE",
                       help="share of requests the kept previous version runs on, for the "
                       "agreement gate (default 0.1)")
    start.add_argument("--min-reporting", type=_share, default=0.8, metavar="SHARE",
                       help="share of a step's devices that must report before it may pass "
                       "(default 0.8)")
    start.set_defaults(handler=_start)

    status = actions.add_parser("status", parents=parents, help="where a rollout is",
                                description="State, current step, per step the devices and "
                                "their results, every gate with its measured value, "
                                "threshold and sample size. Without ID: the newest rollout.")
    status.add_argument("rollout_id", nargs="?", metavar="ID")
    status.add_argument("--wait", action="store_true", help="block until the rollout ends; "
                        "exit 0 if it succeeded, 1 if it halted or was aborted")
    status.set_defaults(handler=_status)

    listing = actions.add_parser("list", parents=parents, help="rollouts, newest first")
    listing.set_defaults(handler=_list)
    for action, text in (("pause", "stop advancing (gates still halt it)"),
                         ("resume", "advance again"),
                         ("abort", "stop and put every device reached back on its previous "
                          "version"),
                         ("promote", "skip the remaining steps: every device gets it now")):
        command = actions.add_parser(action, parents=parents, help=text)
        command.add_argument("rollout_id", metavar="ID")
        command.add_argument("--reason", default="", help="why (kept in the audit log)")
        command.set_defaults(handler=_command, action=action)

    audit = subparsers.add_parser(
        "audit", parents=parents, help="the hash-chained audit log",
        description="Who did what, when and why: publishes, rollbacks, rollout actions, "
        "automatic halts, enrollments, resets, key rotations. `fleet audit verify` checks "
        "the hash chain and finds any changed, removed or reordered entry.")
    audit.add_argument("audit_command", nargs="?", choices=["verify"], metavar="verify",
                       help="check the chain (exit 1 if it is broken)")
    audit.set_defaults(handler=_audit)


def _client(args: argparse.Namespace) -> ServerClient:
    return locate(args.server, args.data)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _start(args: argparse.Namespace) -> int:
    try:
        data = args.bundle_file.read_bytes()
    except OSError as exc:
        raise BundleInputError(f"cannot read {args.bundle_file} ({exc.strerror})") from exc
    client = _client(args)
    bundle = client.post("/api/bundles", data=data)
    selection = ({"group": args.group} if args.group else {"devices": args.devices}
                 if args.devices else {"tag": args.tag} if args.tag
                 else {"profile": args.profile})
    view = client.post("/api/rollouts", {
        "bundle_sha256": bundle["sha256"], **selection, "steps": args.steps,
        "bake_s": args.bake, "shadow_s": args.shadow, "gates": args.gates,
        "shadow_rate": args.shadow_rate, "compare_share": args.compare_share,
        "min_reporting": args.min_reporting})
    if args.json:
        _print_json(view)
    else:
        print(view["id"])
    return 0


def _status(args: argparse.Namespace) -> int:
    client = _client(args)
    rollout_id = args.rollout_id
    if rollout_id is None:
        found = client.get("/api/rollouts")["rollouts"]
        if not found:
            print("no rollouts yet; start one with `fleet rollout start`")
            return 0
        rollout_id = found[0]["id"]
    view = client.get(f"/api/rollouts/{rollout_id}")
    last = None
    while args.wait and view["state"] not in _FINAL:
        line = f"{view['state']} at {view['step']}"
        if line != last and not args.json:
            print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr)
            last = line
        time.sleep(_WAIT_POLL_S)
        view = client.get(f"/api/rollouts/{rollout_id}")
    if args.json:
        _print_json(view)
    else:
        print(rollout_text(view))
    return 1 if args.wait and view["state"] in ("halted", "aborted") else 0


def _list(args: argparse.Namespace) -> int:
    found = _client(args).get("/api/rollouts")["rollouts"]
    if args.json:
        _print_json(found)
        return 0
    if not found:
        print("no rollouts yet; start one with `fleet rollout start`")
    for r in found:
        print(f"{r['id']}  {r['model']} v{r['version']}  {r['state']:<9} at {r['step']:<6} "
              f"{r['exposed']}/{r['targets']} devices  {r['selector']}  "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(r['created_at']))}Z")
    return 0


def _command(args: argparse.Namespace) -> int:
    view = _client(args).post(f"/api/rollouts/{args.rollout_id}/{args.action}",
                              {"reason": args.reason})
    if args.json:
        _print_json(view)
    else:
        print(rollout_text(view))
    return 0


def _audit(args: argparse.Namespace) -> int:
    client = _client(args)
    entries: list[dict[str, Any]] = []
    head: dict[str, Any] = {}
    while True:
        page = client.get("/api/audit", {"since": entries[-1]["seq"] if entries else 0,
                                         "limit": _AUDIT_PAGE})
        head = page["head"]
        entries += page["entries"]
        if len(page["entries"]) < _AUDIT_PAGE:
            break
    if args.audit_command != "verify":
        if args.json:
            _print_json({"entries": entries, "head": head})
            return 0
        for e in entries:
            print(f"{e['seq']:6d} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(e['at']))}Z "
                  f"{e['actor']:<22} {e['action']:<18} {e['target']}"
                  + (f"  ({e['reason']})" if e["reason"] else ""))
        return 0
    chain = [AuditEntry(int(e["seq"]), float(e["at"]), e["actor"], e["action"], e["target"],
                        e["reason"], e["detail"], e["prev_hash"], e["hash"]) for e in entries]
    problems = verify_chain(chain, (int(head["seq"]), str(head["hash"])))
    if args.json:
        _print_json({"ok": not problems, "entries": len(chain), "problems": problems,
                     "head": head})
    if problems:
        raise AuditError(f"the audit log does not verify: {problems[0]}"
                         + (f" (and {len(problems) - 1} more problems)"
                            if len(problems) > 1 else ""))
    if not args.json:
        print(f"audit log verified: {len(chain)} entries, head {head['hash'][:16]}")
    return 0
