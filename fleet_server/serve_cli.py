"""``fleet serve`` and ``fleet stop``: run the fleet server (broker, fleet service and
operator API) in the foreground or in the background, and stop it. Registered by
:func:`fleet_server.server_cli.add_server_commands`; docs/fleet-server.md."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from paho.mqtt.enums import MQTTProtocolVersion

from common.atomic import write_atomic
from common.background import DETACH_FLAG, start_detached, stop_pid, without_detach
from protocol.defaults import MQTTS_PORT, SERVER_API_PORT

from .api import ApiServer, load_admin_token
from .api_client import ADMIN_TOKEN_FILE, SERVER_FILE, default_data_dir, read_server_file
from .errors import ApiError, ServiceError
from .monitoring.config import MonitoringConfig, load_config, scrape_token
from .service import FleetService, ServiceConfig

__all__ = ["add_serve_commands"]

#: The server config read by ``fleet serve`` when present (``--config`` names another).
_SERVER_CONFIG = "server.toml"
#: How long ``fleet serve --detach`` waits for the API: migrations, CA, broker start.
_DETACH_TIMEOUT_S = 120.0


def add_serve_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and ``stop``."""
    _add_serve(subparsers)
    _add_stop(subparsers)


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
                       help="the fleet's keys directory: KEYS/root.json (what uploads are "
                       "verified against) and, when present, the online keys in "
                       "KEYS/online, with which the server signs re-releases (rollback, "
                       "encryption at publish); default DIR/keys")
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
    limits = serve.add_argument_group(
        "device message limits (docs/scale.md, \"Rate limits\"): beyond them a device's "
        "messages are acknowledged and dropped, counted in a rate_limited event a minute")
    defaults = ServiceConfig(Path(), Path())
    for name, what in (("telemetry", "telemetry samples"),
                       ("message", "other messages (events, reports)")):
        rate, burst = (getattr(defaults, f"{name}_{k}") for k in ("rate", "burst"))
        limits.add_argument(f"--{name}-rate", type=_positive, default=rate, metavar="N",
                            help=f"{what} one device may send per second, sustained (default "
                            f"{rate:g})")
        limits.add_argument(f"--{name}-burst", type=_positive, default=burst, metavar="N",
                            help=f"... and at once, before that rate applies (default "
                            f"{burst:g})")
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


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


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
        telemetry_rate=args.telemetry_rate, telemetry_burst=max(1.0, args.telemetry_burst),
        message_rate=args.message_rate, message_burst=max(1.0, args.message_burst),
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

