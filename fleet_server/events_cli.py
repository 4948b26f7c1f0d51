"""``fleet events`` and ``fleet metrics``: the event log, and the fleet's telemetry summed
with the alerts firing, over the operator API. Registered by
:func:`fleet_server.server_cli.add_server_commands`."""

from __future__ import annotations

import argparse
import json
import time

from .api_client import locate
from .cli_text import event_line, print_json, table
from .monitoring.text import METRICS_HEADERS, alert_lines, metrics_rows

__all__ = ["add_event_commands"]

#: Seconds between polls of ``fleet events --follow``.
_FOLLOW_POLL_S = 1.0


def add_event_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                       parents: list[argparse.ArgumentParser]) -> None:
    """Add ``events`` and ``metrics`` (``parents``: the server location and ``--json``)."""
    events = subparsers.add_parser(
        "events", parents=parents, help="the event log",
        description="The newest events, oldest of them first: enrollments, desired-state "
        "changes, devices' install transitions and errors. --since ID shows the events "
        "after ID instead; --follow keeps printing new ones until Ctrl-C.")
    events.add_argument("--since", type=int, metavar="ID",
                        help="the events after this id (oldest first) instead of the newest")
    events.add_argument("--device", metavar="ID", help="only this device's events")
    events.add_argument("--limit", type=int, default=50, metavar="N",
                        help="at most N events (default 50, at most 10000)")
    events.add_argument("--follow", "-f", action="store_true",
                        help="then wait for new events and print them as they come")
    events.set_defaults(handler=_events)

    metrics = subparsers.add_parser(
        "metrics", parents=parents, help="requests, errors, latency and drift per "
        "group, model and version, and the firing alerts",
        description="Telemetry of the last --window seconds summed per group, model and "
        "version: devices reporting, requests, errors (rate), latency p50/p99 from the "
        "devices' histograms, the largest drift PSI and KS any device reported; then the "
        "alerts firing. docs/monitoring.md.")
    metrics.add_argument("--group", help="only this group")
    metrics.add_argument("--model", help="only this model")
    metrics.add_argument("--window", type=int, default=3600, metavar="SECONDS",
                         help="how far back (default 3600)")
    metrics.set_defaults(handler=_metrics)


def _events(args: argparse.Namespace) -> int:
    client = locate(args.server, args.data)
    query = {"device": args.device, "limit": args.limit}
    if args.since is None:
        events = client.get("/api/events", {**query, "order": "newest"})["events"]
    else:
        events = client.get("/api/events", {**query, "since": args.since})["events"]
    if args.json and not args.follow:
        print_json(events)
        return 0
    last = args.since or 0
    while True:  # --follow prints JSON Lines with --json: one event per line
        for event in events:
            print(json.dumps(event, sort_keys=True) if args.json else event_line(event),
                  flush=True)
            last = event["id"]
        if not args.follow:
            return 0
        time.sleep(_FOLLOW_POLL_S)
        events = client.get("/api/events", {**query, "since": last})["events"]


def _metrics(args: argparse.Namespace) -> int:
    client = locate(args.server, args.data)
    answer = client.get("/api/metrics", {"group": args.group, "model": args.model,
                                         "window": args.window})
    alerts = client.get("/api/alerts")["alerts"]
    if args.json:
        print_json({**answer, "alerts": alerts})
        return 0
    table(METRICS_HEADERS, metrics_rows(answer["totals"]),
           f"no telemetry in the last {args.window} s" + (
               f" for group {args.group!r}" if args.group else "")
           + (f" for model {args.model!r}" if args.model else ""))
    print("\n".join(alert_lines(alerts)))
    return 0

