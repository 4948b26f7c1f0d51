"""The ``fleet`` commands of a running fleet: ``serve`` and the operator's commands that talk
to it over the operator API (``enroll-token``, ``devices``, ``device show``, ``bundles``,
``publish``, ``rollback``, ``events``). :mod:`fleet_server.cli` registers them.

Every command but ``serve`` finds the server with ``--server URL`` or ``--data DIR``
(default ``$EDGEFLEET_SERVER_DIR`` or ``~/.local/share/edgefleet/server``), see
:mod:`fleet_server.api_client`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from paho.mqtt.enums import MQTTProtocolVersion

from common.atomic import write_atomic
from common.background import DETACH_FLAG, start_detached, stop_pid, without_detach
from protocol.defaults import MQTTS_PORT, SERVER_API_PORT

from .api import ApiServer, load_admin_token
from .api_client import (
    ADMIN_TOKEN_FILE,
    SERVER_FILE,
    ServerClient,
    default_data_dir,
    locate,
    read_server_file,
)
from .errors import ApiError, BundleInputError, ServiceError
from .experiment_cli import add_experiment_commands
from .monitoring.config import MonitoringConfig, load_config, scrape_token
from .monitoring.text import METRICS_HEADERS, alert_lines, device_lines, metrics_rows
from .rollout_cli import add_rollout_commands
from .service import FleetService, ServiceConfig

__all__ = ["add_server_commands"]

#: Seconds between polls of ``fleet events --follow``.
_FOLLOW_POLL_S = 1.0
#: The telemetry ``fleet device show`` sums: the last hour.
_DEVICE_WINDOW_S = 3600
#: The server config read by ``fleet serve`` when present (``--config`` names another).
_SERVER_CONFIG = "server.toml"
#: How long ``fleet serve --detach`` waits for the API: migrations, CA, broker start.
_DETACH_TIMEOUT_S = 120.0


def add_server_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and the operator commands to ``fleet``'s subparsers."""
    _add_serve(subparsers)
    _add_stop(subparsers)
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_argument_group("which server")
    group.add_argument("--server", metavar="URL",
                       help=f"the operator API, e.g. https://127.0.0.1:{SERVER_API_PORT} "
                       "(admin token from $EDGEFLEET_ADMIN_TOKEN or DIR/admin.token; its "
                       "certificate checked against $EDGEFLEET_SERVER_CA or DIR/ca/ca.crt)")
    group.add_argument("--data", type=Path, metavar="DIR",
                       help="the server's data directory, to find it through DIR/server.json "
                       "(default $EDGEFLEET_SERVER_DIR or ~/.local/share/edgefleet/server)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for scripts")

    token = subparsers.add_parser(
        "enroll-token", parents=[where, as_json], help="issue a one-time enrollment token",
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
        "devices", parents=[where, as_json], help="list devices and their convergence",
        description="One line per device: group, profile, online, desired and reported "
        "versions, install state, whether it converged, when it was last seen.")
    devices.add_argument("--group", help="only this group")
    devices.add_argument("--tag", help="only devices with this tag")
    devices.set_defaults(handler=_devices)

    device = subparsers.add_parser("device", help="one device in detail")
    actions = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", parents=[where, as_json],
                              help="a device's state, installs and recent events")
    show.add_argument("device_id", metavar="ID")
    show.set_defaults(handler=_device_show)
    reset = actions.add_parser(
        "reset", parents=[where, as_json],
        help="revoke a device's certificate; any token may then enroll its id",
        description="Revoke the device's certificate (the broker refuses it from now on; an "
        "embedded broker restarts to drop its connection, every device reconnects) and free "
        "its id, so the next `edge-agent enroll` with that id needs no token issued for it. "
        "Its group, tags and desired state stay for the device that enrolls next.")
    reset.add_argument("device_id", metavar="ID")
    reset.set_defaults(handler=_device_reset)

    bundles = subparsers.add_parser("bundles", parents=[where, as_json],
                                    help="list the bundles stored on the server")
    bundles.set_defaults(handler=_bundles)

    publish = subparsers.add_parser(
        "publish", parents=[where, as_json], help="upload a bundle and make it desired",
        description="Upload BUNDLE_FILE (the server verifies it against the fleet's "
        "root.json; the same file again is fine) and make it the desired version of its "
        "model for a group or for devices. Devices pick it up at once (retained MQTT "
        "message) or when they next connect. Delta bundles written beside it by `fleet "
        "bundle build --delta-from` (BUNDLE_FILE's name with .from-vN) are uploaded too; "
        "devices running such a version fetch the delta, and the bytes saved are shown.")
    _add_selection(publish)
    publish.add_argument("bundle_file", type=Path, metavar="BUNDLE_FILE")
    publish.add_argument("--encrypt-for", action="append", default=[], metavar="SELECTOR",
                         help="encrypt the artifacts for these devices (device:ID, group:G, "
                         "profile:P; repeatable): the server re-releases the bundle as the "
                         "next version, encrypted, and publishes that")
    publish.set_defaults(handler=_publish)

    rollback = subparsers.add_parser(
        "rollback", parents=[where, as_json], help="undo the last desired-state change",
        description="Give each selected device back the desired state it had before the "
        "last change (of MODEL only, with --model). Twice undoes two changes. Devices refuse "
        "versions lower than they have, so the server re-releases each earlier bundle as the "
        "next version of its model (signed with the online keys of `fleet serve --keys`) and "
        "that is what devices install.")
    _add_selection(rollback)
    rollback.add_argument("--model", help="only changes of this model")
    rollback.set_defaults(handler=_rollback)

    events = subparsers.add_parser(
        "events", parents=[where, as_json], help="the event log",
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
    add_rollout_commands(subparsers, [where, as_json])
    add_experiment_commands(subparsers, [where, as_json])

    metrics = subparsers.add_parser(
        "metrics", parents=[where, as_json], help="requests, errors, latency and drift per "
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


def _add_selection(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", help="every device of this group")
    target.add_argument("--device", action="append", metavar="ID", dest="devices",
                        help="this device (repeatable)")


def _client(args: argparse.Namespace) -> ServerClient:
    return locate(args.server, args.data)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# --- fleet serve --------------------------------------------------------------------------

def _add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the fleet server: broker, MQTT service and operator API",
        description="Start the embedded Mosquitto (or use --broker-url), the fleet service "
        "and the operator API; run until SIGINT or SIGTERM, then stop them all. Writes "
        "DIR/server.json so the other fleet commands find the server. docs/fleet-server.md "
        "has the details.")
    serve.add_argument("--data", type=Path, metavar="DIR",
                       help="data directory (default $EDGEFLEET_SERVER_DIR or "
                       "~/.local/share/edgefleet/server)")
    serve.add_argument("--keys", type=Path, metavar="KEYS",
                       help="the fleet's keys directory; only KEYS/root.json is read "
                       "(default DIR/keys)")
    serve.add_argument("--db", metavar="URL", help="registry database: a SQLite path or "
                       "postgresql://... (default DIR/fleet.db)")
    serve.add_argument("--fleet", metavar="NAME", help="fleet name, fixed when the data "
                       "directory is first used (default: default)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address of the operator API (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=SERVER_API_PORT, metavar="P",
                       help=f"port of the operator API (default {SERVER_API_PORT}; 0 picks "
                       "a free one)")
    serve.add_argument("--api-host", action="append", default=[], metavar="HOST",
                       help="name or address devices use to reach the operator API "
                       "(repeatable; it goes into the API's TLS certificate; default: the "
                       "--broker-host names)")
    broker = serve.add_argument_group("broker")
    broker.add_argument("--broker-url", metavar="mqtts://HOST[:PORT]",
                        help="use this external broker instead of the embedded Mosquitto")
    broker.add_argument("--mqtt-version", choices=("5", "3.1.1"), default="5",
                        help="MQTT version towards the broker (3.1.1 for an external broker "
                        "without MQTT 5, e.g. NATS; docs/scale.md)")
    broker.add_argument("--mqtt-port", type=int, default=MQTTS_PORT, metavar="P",
                        help=f"port of the embedded broker (default {MQTTS_PORT}; 0 "
                        "picks a free one and keeps it)")
    broker.add_argument("--mqtt-bind", default="", metavar="ADDRESS",
                        help="address the embedded broker listens on (default: all)")
    broker.add_argument("--broker-host", action="append", default=[], metavar="HOST",
                        help="name or address devices use to reach the embedded broker "
                        "(repeatable; the first is handed out at enrollment; default "
                        "127.0.0.1, for devices on this machine only)")
    bundles = serve.add_argument_group("bundle downloads (docs/scale.md)")
    bundles.add_argument("--bundle-port", type=int, metavar="P",
                         help="serve bundles over HTTPS with range requests on this port "
                         "(device certificates; 0 picks a free one); devices fall back to "
                         "MQTT chunks. Default: MQTT chunks only")
    bundles.add_argument("--bundle-mirror", action="append", default=[], metavar="URL/",
                         help="URL prefix of a mirror, CDN or bucket holding the files of "
                         "DATA/bundles (<sha256>.efb), offered to devices first (repeatable)")
    scale = serve.add_argument_group("several server processes (docs/scale.md)")
    scale.add_argument("--instance", metavar="NAME",
                       help="this process's name among the fleet's server processes on one "
                       "PostgreSQL; its MQTT identity is fleet-server-NAME")
    scale.add_argument("--shared-subscriptions", action="store_true",
                       help="take device messages through an MQTT 5 shared subscription, "
                       "split between the server processes")
    scale.add_argument("--telemetry-retention-days", type=float, metavar="DAYS",
                       help="delete telemetry older than this (the leader does, hourly; "
                       "default: keep all)")
    serve.add_argument("--offline-after", type=_seconds, default=180.0, metavar="SECONDS",
                       help="a device not heard from for this long shows offline (default "
                       "180; agents send telemetry every 30 s by default)")
    serve.add_argument("--config", type=Path, metavar="FILE",
                       help="server config (TOML): monitoring's alert rules, webhooks, "
                       f"retention, scrape token (docs/monitoring.md; default DIR/"
                       f"{_SERVER_CONFIG} if it exists)")
    serve.add_argument("--rollout-tick", type=float, default=5.0, metavar="SECONDS",
                       help="seconds between two judgements of each running "
                       "rollout (default 5)")
    serve.add_argument(DETACH_FLAG, action="store_true",
                       help="run in the background (output to DIR/server.log) and return "
                       "once the API answers, or fail with the reason")
    serve.set_defaults(handler=_serve)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 10 <= value <= 7 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 10 to "
                                         "604800 (a week)")
    return value


def _serve(args: argparse.Namespace) -> int:
    data: Path = (args.data or default_data_dir()).absolute()
    if args.detach:
        return _detach(args, data)
    config = ServiceConfig(
        data_dir=data, keys_dir=(args.keys or data / "keys").absolute(), fleet=args.fleet,
        db_url=args.db, broker_url=args.broker_url, mqtt_port=args.mqtt_port,
        mqtt_bind=args.mqtt_bind, broker_hosts=tuple(args.broker_host),
        offline_after_s=args.offline_after, monitoring=_monitoring(args.config, data),
        rollout_tick_s=max(0.2, args.rollout_tick), bundle_port=args.bundle_port,
        bundle_mirrors=tuple(m if m.endswith("/") else m + "/" for m in args.bundle_mirror),
        mqtt_protocol=MQTTProtocolVersion.MQTTv5 if args.mqtt_version == "5"
        else MQTTProtocolVersion.MQTTv311,
        instance=args.instance, shared_subscriptions=args.shared_subscriptions,
        telemetry_retention_s=None if args.telemetry_retention_days is None
        else args.telemetry_retention_days * 86400)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    service = FleetService(config)
    api: ApiServer | None = None
    server_file = data / SERVER_FILE
    announced = False  # server.json is this server's to remove only once it wrote it
    try:
        service.start()
        token_file = data / ADMIN_TOKEN_FILE
        hosts = [*(args.api_host or args.broker_host),
                 *([args.host] if args.host not in ("", "0.0.0.0", "::") else [])]
        api = ApiServer(service, load_admin_token(token_file), service.api_identity(hosts),
                        host=args.host, port=args.port,
                        scrape_token=scrape_token(config.monitoring))
        api.start()
        write_atomic(server_file, json.dumps({
            "api_url": api.url, "pid": os.getpid(), "admin_token_file": str(token_file),
            "ca_file": str(service.ca.cert_path), "broker_url": service.broker_url,
            "fleet": service.fleet, "data_dir": str(data)}, indent=2).encode("utf-8"))
        announced = True
        print(f"fleet {service.fleet}: API {api.url} (admin token {token_file}), MQTT "
              f"{service.broker_url}, data {data}; Ctrl-C stops", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        if announced:
            server_file.unlink(missing_ok=True)
        if api is not None:
            api.stop()
        service.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("fleet server stopped", flush=True)
    return 0


def _monitoring(path: Path | None, data: Path) -> MonitoringConfig:
    if path is None and (data / _SERVER_CONFIG).is_file():
        path = data / _SERVER_CONFIG
    return MonitoringConfig() if path is None else load_config(path)
def _detach(args: argparse.Namespace, data: Path) -> int:
    """Re-run ``fleet serve`` in the background and wait until its API is up."""

    def ready(pid: int) -> bool:
        try:
            return int(read_server_file(data)["pid"]) == pid
        except (ApiError, ValueError, KeyError):
            return False

    log_file = data / "server.log"
    started = start_detached("fleet_server", without_detach(args.argv), log_file, ready,
                             timeout_s=_DETACH_TIMEOUT_S)
    problem = started.failure("the fleet server")
    if problem is not None:
        raise ServiceError(problem)
    print(f"fleet server started in the background (pid {started.pid}, log {log_file}); "
          f"`fleet stop --data {data}` stops it")
    return 0


def _add_stop(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stop = subparsers.add_parser(
        "stop", help="stop the fleet server running on a data directory",
        description="Send SIGTERM to the `fleet serve` recorded in DIR/server.json and wait "
        "until it has stopped (with its embedded broker).")
    stop.add_argument("--data", type=Path, metavar="DIR",
                      help="the server's data directory (default $EDGEFLEET_SERVER_DIR or "
                      "~/.local/share/edgefleet/server)")
    stop.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                      help="how long to wait (default 30)")
    stop.set_defaults(handler=_stop)


def _stop(args: argparse.Namespace) -> int:
    data: Path = args.data or default_data_dir()
    try:
        pid = int(read_server_file(data)["pid"])
    except ApiError:
        print(f"no fleet server runs on {data}")
        return 0
    if not stop_pid(pid, args.timeout):
        raise ServiceError(f"the fleet server (pid {pid}) is still running after "
                           f"{args.timeout:g} s; kill -9 {pid} ends it (its broker stops "
                           "with it)")
    print(f"stopped the fleet server (pid {pid})")
    return 0


# --- operator commands --------------------------------------------------------------------

def _enroll_token(args: argparse.Namespace) -> int:
    body = {"ttl_s": args.ttl, **({"group": args.group} if args.group else {}),
            **({"device": args.device} if args.device else {})}
    answer = _client(args).post("/api/enroll-tokens", body)
    if args.json:
        _print_json(answer)
    else:
        print(answer["token"])
    return 0


def _devices(args: argparse.Namespace) -> int:
    devices = _client(args).get("/api/devices", {"group": args.group, "tag": args.tag})
    if args.json:
        _print_json(devices["devices"])
        return 0
    now = time.time()
    if not devices.get("broker_connected", True):
        since = devices.get("disconnected_since")
        print("fleet: warning: the server has no broker connection"
              + (f" (lost {_ago(since, now)})" if since else "")
              + ": ONLINE is unknown and states are as last reported", file=sys.stderr)
    rows = [[d["id"], d["group"], d["profile"], _online_text(d["online"]),
             _desired_text(d["desired"]) or "-", _reported_text(d["reported"]) or "-",
             "yes" if d["converged"] else "no", _ago(d["last_seen"], now)]
            for d in devices["devices"]]
    _table(["DEVICE", "GROUP", "PROFILE", "ONLINE", "DESIRED", "REPORTED", "CONVERGED",
            "LAST SEEN"], rows, _no_devices(args))
    return 0


def _no_devices(args: argparse.Namespace) -> str:
    """Why the device list is empty: nothing enrolled, or a filter that matches nothing."""
    if args.group is None and args.tag is None:
        return ("no devices enrolled yet; issue a token with `fleet enroll-token` and run "
                "`edge-agent enroll` on the device")
    everything = _client(args).get("/api/devices")["devices"]
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
    client = _client(args)
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
        _print_json({**device, "events": events[-20:], "metrics": metrics})
        return 0
    now = time.time()
    lines = [
        f"device     {device['id']}",
        f"group      {device['group']}" + (f"   tags {', '.join(device['tags'])}"
                                           if device["tags"] else ""),
        f"profile    {device['profile']}",
        f"online     {_online_text(device['online'])}, last seen "
        f"{_ago(device['last_seen'], now)}, enrolled {_ago(device['enrolled_at'], now)}",
        f"cert       sha256 {device['cert_fingerprint']}",
        f"desired    {_desired_text(device['desired'], sha=True) or 'nothing'}",
        f"reported   {_reported_text(device['reported'], sha=True) or 'nothing yet'}",
        f"converged  {'yes' if device['converged'] else 'no'}",
    ]
    installs = device["reported"].get("installs") or {}
    for name, install in sorted(installs.items()) if isinstance(installs, dict) else ():
        lines.append(f"install    {name} {_install_text(install)}")
    lines += device_lines(metrics, _DEVICE_WINDOW_S)
    if events:
        lines.append("events (latest last):")
        lines += [f"  {_event_line(e)}" for e in events[-10:]]
    print("\n".join(lines))
    return 0


def _device_reset(args: argparse.Namespace) -> int:
    device = _client(args).post(f"/api/devices/{args.device_id}/reset")
    if args.json:
        _print_json(device)
        return 0
    print(f"reset {device['id']}: certificate {device['cert_fingerprint'][:16]} revoked; "
          f"enroll it again with any token of group {device['group']} (`fleet enroll-token "
          f"--group {device['group']}`)")
    return 0


def _bundles(args: argparse.Namespace) -> int:
    bundles = _client(args).get("/api/bundles")["bundles"]
    if args.json:
        _print_json(bundles)
        return 0
    rows = [[b["name"], str(b["version"]), _size(b["size"]), b["sha256"][:16],
             _utc(b["created_at"]),
             f"re-release of v{b['rollback_of']}" if b.get("rollback_of") else ""]
            for b in bundles]
    _table(["NAME", "VERSION", "SIZE", "SHA256", "STORED", "NOTE"], rows,
           "no bundles stored yet; `fleet publish BUNDLE_FILE --group G` uploads one")
    return 0


def _publish(args: argparse.Namespace) -> int:
    data = _read_file(args.bundle_file)
    client = _client(args)
    bundle = client.post("/api/bundles", data=data)
    deltas = [client.post("/api/bundles", data=_read_file(path))
              for path in _delta_files(args.bundle_file)]
    result = client.post("/api/publish", {"bundle_sha256": bundle["sha256"],
                                          **_selection_body(args),
                                          **({"encrypt_for": args.encrypt_for}
                                             if args.encrypt_for else {})})
    if args.json:
        _print_json({"bundle": bundle, "deltas": deltas, **result})
        return _delivery(result)
    target = f"group {args.group}" if args.group else "the given devices"
    for delta in deltas:
        print(f"uploaded the delta bundle from v{delta['base_version']} ({delta['size']} "
              f"bytes, sha256 {delta['sha256'][:16]})")
    published = bundle
    for released in result.get("released", []):
        published = released
        print(f"re-released {bundle['name']} v{bundle['version']} as v{released['version']} "
              f"(sha256 {released['sha256'][:16]}), its artifacts encrypted for "
              f"{', '.join(args.encrypt_for)}")
    devices, changed = len(result["devices"]), len(result["changes"])
    unchanged = devices - changed
    print(f"published {published['name']} v{published['version']} (sha256 "
          f"{published['sha256'][:16]}) to {devices} device(s) of {target}; {changed} "
          f"changed{f', {unchanged} had it already' if unchanged else ''}")
    _print_transfer(result.get("transfer"))
    return _delivery(result)


def _delta_files(bundle_file: Path) -> list[Path]:
    """The delta bundles ``fleet bundle build --delta-from`` wrote beside ``bundle_file``."""
    pattern = f"{bundle_file.stem}.from-v*{bundle_file.suffix}"
    return sorted(bundle_file.parent.glob(pattern))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleInputError(f"cannot read {path} ({exc.strerror})") from exc


def _print_transfer(transfer: dict[str, Any] | None) -> None:
    """One line per delta used, and the bytes saved (see fleet_server.deltas)."""
    if not transfer or not transfer["full_bytes"]:
        return
    for base, devices in transfer["delta_devices"].items():
        print(f"{len(devices)} device(s) running v{base} fetch the delta bundle")
    full, wire = transfer["full_bytes"], transfer["wire_bytes"]
    print(f"to send: {wire} bytes instead of {full} ({transfer['saved_bytes']} saved, "
          f"{100 * (full - wire) / full:.1f}%)")


def _rollback(args: argparse.Namespace) -> int:
    body = {**_selection_body(args), **({"model": args.model} if args.model else {})}
    result = _client(args).post("/api/rollback", body)
    if args.json:
        _print_json(result)
        return _delivery(result)
    for released in result.get("released", []):
        print(f"re-released {released['name']} v{released['rollback_of']} as "
              f"v{released['version']} (devices refuse lower versions; sha256 "
              f"{released['sha256'][:16]})")
    print(f"rolled back {len(result['changes'])} device(s):")
    restored = {r["sha256"]: r["rollback_of"] for r in result.get("released", [])}
    for change in result["changes"]:
        after = change["after"]
        note = (f" (v{restored[after['bundle_sha256']]} re-released)"
                if after is not None and after["bundle_sha256"] in restored else "")
        print(f"  {change['device']}: {change['model']} {_version(change['before'])} -> "
              f"{_version(after)}{note}")
    return _delivery(result)


def _delivery(result: Mapping[str, Any]) -> int:
    """Exit code 1, with why, when the desired state is stored but could not be sent."""
    if result.get("delivered", True):
        return 0
    print("fleet: error: the desired state is stored but not delivered: the server has no "
          "broker connection (see `fleet devices`, the server's log); it is sent to the "
          "devices when the connection returns", file=sys.stderr)
    return 1


def _online_text(online: bool | None) -> str:
    return "?" if online is None else "yes" if online else "no"


def _events(args: argparse.Namespace) -> int:
    client = _client(args)
    query = {"device": args.device, "limit": args.limit}
    if args.since is None:
        events = client.get("/api/events", {**query, "order": "newest"})["events"]
    else:
        events = client.get("/api/events", {**query, "since": args.since})["events"]
    if args.json and not args.follow:
        _print_json(events)
        return 0
    last = args.since or 0
    while True:  # --follow prints JSON Lines with --json: one event per line
        for event in events:
            print(json.dumps(event, sort_keys=True) if args.json else _event_line(event),
                  flush=True)
            last = event["id"]
        if not args.follow:
            return 0
        time.sleep(_FOLLOW_POLL_S)
        events = client.get("/api/events", {**query, "since": last})["events"]


def _metrics(args: argparse.Namespace) -> int:
    client = _client(args)
    answer = client.get("/api/metrics", {"group": args.group, "model": args.model,
                                         "window": args.window})
    alerts = client.get("/api/alerts")["alerts"]
    if args.json:
        _print_json({**answer, "alerts": alerts})
        return 0
    _table(METRICS_HEADERS, metrics_rows(answer["totals"]),
           f"no telemetry in the last {args.window} s" + (
               f" for group {args.group!r}" if args.group else "")
           + (f" for model {args.model!r}" if args.model else ""))
    print("\n".join(alert_lines(alerts)))
    return 0


def _selection_body(args: argparse.Namespace) -> dict[str, Any]:
    return {"group": args.group} if args.group else {"devices": list(args.devices)}


# --- formatting ---------------------------------------------------------------------------

def _desired_text(desired: Mapping[str, Any], *, sha: bool = False) -> str:
    return ", ".join(f"{name} v{want['version']}"
                     + (f" (bundle {want['bundle_sha256'][:12]})" if sha else "")
                     for name, want in sorted(desired.items()))


def _reported_text(reported: Mapping[str, Any], *, sha: bool = False) -> str:
    """Models served with their state, and installs in progress or failed beside them."""
    models = _object(reported.get("models"))
    installs = _object(reported.get("installs"))
    parts = []
    for name in sorted({*models, *installs}):
        model, install = models.get(name), installs.get(name)
        text = name
        if isinstance(model, dict):
            text += f" v{model.get('version')} {model.get('state', '')}".rstrip()
            if sha and model.get("bundle_sha256"):
                text += f" (bundle {str(model['bundle_sha256'])[:12]})"
        if isinstance(install, dict) and not (
                isinstance(model, dict) and install.get("version") == model.get("version")
                and install.get("state") == model.get("state")):
            text += f" [{_install_text(install)}]"
        parts.append(text)
    return ", ".join(parts)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _install_text(install: Any) -> str:
    if not isinstance(install, dict):
        return "?"
    version = install.get("version")
    text = f"{'' if version is None else f'v{version} '}{install.get('state')}"
    if isinstance(install.get("progress"), (int, float)):
        text += f" {install['progress'] * 100:.0f}%"
    if install.get("reason"):
        text += f": {install['reason']}"
    return text


def _version(value: Mapping[str, Any] | None) -> str:
    return "nothing" if value is None else f"v{value['version']}"


def _event_line(event: Mapping[str, Any]) -> str:
    detail = json.dumps(event["detail"], sort_keys=True, separators=(",", ":"))
    return (f"{event['id']:>6}  {_utc(event['at'])}  {event['device'] or '-':<16}  "
            f"{event['kind']:<20}  {detail}")


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def _ago(at: float | None, now: float) -> str:
    if at is None:
        return "never"
    seconds = max(0.0, now - at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> None:
    if not rows:
        print(empty, file=sys.stderr)
        return
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True))
              .rstrip())
