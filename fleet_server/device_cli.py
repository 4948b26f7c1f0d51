"""``fleet status``, ``fleet enroll-token``, ``fleet devices`` and ``fleet device
show|reset``: the server process and its devices, over the operator API. Registered by
:func:`fleet_server.server_cli.add_server_commands`."""

from __future__ import annotations

import argparse
import sys
import time

from .api_client import locate
from .cli_text import (
    ago,
    desired_text,
    event_line,
    install_text,
    print_json,
    reported_text,
    table,
)
from .errors import ApiError
from .monitoring.text import device_lines

__all__ = ["add_device_commands"]

#: The telemetry ``fleet device show`` sums: the last hour.
_DEVICE_WINDOW_S = 3600


def add_device_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                        parents: list[argparse.ArgumentParser]) -> None:
    """Add ``status``, ``enroll-token``, ``devices`` and ``device`` (``parents``: the
    server location and ``--json``)."""
    status = subparsers.add_parser(
        "status", parents=parents, help="the server process: broker, leadership, ingest",
        description="What the server process answering the API sees: its broker connection, "
        "whether it is the leader of several processes (docs/scale.md), its ingest queue, "
        "the messages it dropped over devices' rate limits, and whether its database is "
        "reachable.")
    status.set_defaults(handler=_status)
    token = subparsers.add_parser(
        "enroll-token", parents=parents, help="issue a one-time enrollment token",
        description="Issue a one-time enrollment token for a group and print it (alone, so "
        "TOKEN=$(fleet enroll-token --group lab) works). Give it to the installer: "
        "edge-agent enroll --server URL --token TOKEN.")
    token.add_argument("--group", help="group the device joins (default: with --device, "
                       "the device's group; else default)")
    token.add_argument("--device", metavar="ID", help="only for this device id, which it may "
                       "take even if it is enrolled: how a re-imaged device enrolls again "
                       "(a token for a group cannot take an enrolled id)")
    token.add_argument("--ttl", type=float, default=24 * 3600.0, metavar="SECONDS",
                       help="how long the token is valid (default 86400)")
    token.set_defaults(handler=_enroll_token)

    devices = subparsers.add_parser(
        "devices", parents=parents, help="list devices and their convergence",
        description="One line per device: group, profile, online, desired and reported "
        "versions, install state, whether it converged, when it was last seen.")
    devices.add_argument("--group", help="only this group")
    devices.add_argument("--tag", help="only devices with this tag")
    devices.set_defaults(handler=_devices)

    device = subparsers.add_parser("device", help="one device in detail")
    actions = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", parents=parents,
                              help="a device's state, installs and recent events")
    show.add_argument("device_id", metavar="ID")
    show.set_defaults(handler=_device_show)
    reset = actions.add_parser(
        "reset", parents=parents,
        help="revoke a device's certificate; any token may then enroll its id",
        description="Revoke the device's certificate (the broker refuses it from now on; an "
        "embedded broker restarts to drop its connection, every device reconnects) and free "
        "its id, so the next `edge-agent enroll` with that id needs no token issued for it. "
        "Its group, tags and desired state stay for the device that enrolls next.")
    reset.add_argument("device_id", metavar="ID")
    reset.set_defaults(handler=_device_reset)


def _status(args: argparse.Namespace) -> int:
    status = locate(args.server, args.data).get("/api/status")
    if args.json:
        print_json(status)
        return 0
    now = time.time()
    broker = ("connected" if status["mqtt_connected"] else
              f"disconnected since {ago(status.get('disconnected_since'), now)}")
    ingest = status.get("ingest", {})
    name = status.get("instance")
    print(f"fleet {status['fleet']}: server {status['version']}"
          + (f", instance {name}" if name else "")
          + f", {'leader' if status.get('leader') else 'follower (not the leader)'}")
    print(f"broker {status['broker_url']}: {broker}")
    print(f"ingest: {ingest.get('queued', 0)} queued, {ingest.get('rate_limited', 0)} "
          "dropped over rate limits"
          + ("; DATABASE UNAVAILABLE (messages held)" if ingest.get("database_unavailable")
             else ""))
    print(f"devices: {status['devices']}")
    return 0


def _enroll_token(args: argparse.Namespace) -> int:
    body = {"ttl_s": args.ttl, **({"group": args.group} if args.group else {}),
            **({"device": args.device} if args.device else {})}
    answer = locate(args.server, args.data).post("/api/enroll-tokens", body)
    if args.json:
        print_json(answer)
    else:
        print(answer["token"])
    return 0


def _devices(args: argparse.Namespace) -> int:
    devices = locate(args.server, args.data).get("/api/devices",
                                                 {"group": args.group, "tag": args.tag})
    if args.json:
        print_json(devices["devices"])
        return 0
    now = time.time()
    if not devices.get("broker_connected", True):
        since = devices.get("disconnected_since")
        print("fleet: warning: the server has no broker connection"
              + (f" (lost {ago(since, now)})" if since else "")
              + ": ONLINE is unknown and states are as last reported", file=sys.stderr)
    rows = [[d["id"], d["group"], d["profile"], _online_text(d["online"]),
             desired_text(d["desired"]) or "-", reported_text(d["reported"]) or "-",
             "yes" if d["converged"] else "no", ago(d["last_seen"], now)]
            for d in devices["devices"]]
    table(["DEVICE", "GROUP", "PROFILE", "ONLINE", "DESIRED", "REPORTED", "CONVERGED",
            "LAST SEEN"], rows, _no_devices(args))
    return 0


def _no_devices(args: argparse.Namespace) -> str:
    """Why the device list is empty: nothing enrolled, or a filter that matches nothing."""
    if args.group is None and args.tag is None:
        return ("no devices enrolled yet; issue a token with `fleet enroll-token` and run "
                "`edge-agent enroll` on the device")
    everything = locate(args.server, args.data).get("/api/devices")["devices"]
    wanted = f"group {args.group!r}" if args.group is not None else f"tag {args.tag!r}"
    if args.group is not None:
        known = sorted({d["group"] for d in everything})
        kinds = "groups"
    else:
        known = sorted({t for d in everything for t in d["tags"]})
        kinds = "tags"
    return (f"no devices with {wanted}; the {kinds} in use are: "
            f"{', '.join(known) or 'none'}")


def _device_show(args: argparse.Namespace) -> int:
    client = locate(args.server, args.data)
    try:
        device = client.get(f"/api/devices/{args.device_id}")
    except ApiError as exc:
        if exc.status != 404:
            raise
        raise ApiError(f"no device {args.device_id!r} is enrolled; `fleet devices` lists "
                       "them", 404) from None
    events = client.get("/api/events", {"device": args.device_id, "limit": 20,
                                        "order": "newest"})["events"]
    metrics = client.get("/api/metrics", {"device": args.device_id, "by": "model,version",
                                          "window": _DEVICE_WINDOW_S})["totals"]
    if args.json:
        print_json({**device, "events": events[-20:], "metrics": metrics})
        return 0
    now = time.time()
    lines = [
        f"device     {device['id']}",
        f"group      {device['group']}" + (f"   tags {', '.join(device['tags'])}"
                                           if device["tags"] else ""),
        f"profile    {device['profile']}",
        f"online     {_online_text(device['online'])}, last seen "
        f"{ago(device['last_seen'], now)}, enrolled {ago(device['enrolled_at'], now)}",
        f"cert       sha256 {device['cert_fingerprint']}",
        f"desired    {desired_text(device['desired'], sha=True) or 'nothing'}",
        f"reported   {reported_text(device['reported'], sha=True) or 'nothing yet'}",
        f"converged  {'yes' if device['converged'] else 'no'}",
    ]
    installs = device["reported"].get("installs") or {}
    for name, install in sorted(installs.items()) if isinstance(installs, dict) else ():
        lines.append(f"install    {name} {install_text(install)}")
    lines += device_lines(metrics, _DEVICE_WINDOW_S)
    if events:
        lines.append("events (latest last):")
        lines += [f"  {event_line(e)}" for e in events[-10:]]
    print("\n".join(lines))
    return 0


def _device_reset(args: argparse.Namespace) -> int:
    device = locate(args.server, args.data).post(f"/api/devices/{args.device_id}/reset")
    if args.json:
        print_json(device)
        return 0
    print(f"reset {device['id']}: certificate {device['cert_fingerprint'][:16]} revoked; "
          f"enroll it again with any token of group {device['group']} (`fleet enroll-token "
          f"--group {device['group']}`)")
    return 0


def _online_text(online: bool | None) -> str:
    return "?" if online is None else "yes" if online else "no"

