"""``edge-agent``: the on-device command line.

Exit codes: 0 success, 1 the command failed (one line on stderr says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bundle.archive import Limits
from bundle.errors import BundleError
from bundle.trust import verify_bundle
from common.background import DETACH_FLAG, start_detached, stop_pid, without_detach
from common.cli import new_parser, run
from firmware_profiles import ProfileError, load_profiles, match_profiles, probe_host
from firmware_profiles.describe import host_summary, host_to_json, match_to_json, matches_table
from protocol.defaults import SERVER_API_PORT

from . import __version__
from .config import DEFAULT_API_HOST, ApiConfig, ApiLimits, FleetSettings, option_type
from .errors import AgentError, BundleRejectedError, TrustStoreError
from .trust_store import TrustStore, resolve_root

__all__ = ["DEFAULT_STATE_DIR", "build_parser", "main"]

log = logging.getLogger(__name__)

#: Where the agent keeps its state unless told otherwise (or EDGEFLEET_STATE_DIR).
DEFAULT_STATE_DIR = Path(os.environ.get("EDGEFLEET_STATE_DIR", "/var/lib/edgefleet/agent"))
#: How long ``--detach`` waits for the agent to serve: loading and self-testing its models.
_DETACH_TIMEOUT_S = 120.0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``edge-agent`` and all its subcommands."""
    parser, subparsers = new_parser(
        "edge-agent", "On-device daemon: verify and install model bundles, serve inference "
        "locally (offline-capable), report to the fleet server.", __version__)
    _add_enroll(subparsers)
    _add_run(subparsers)
    _add_serve(subparsers)
    _add_install(subparsers)
    _add_status(subparsers)
    _add_stop(subparsers)
    _add_predict(subparsers)
    _add_verify(subparsers)
    _add_probe(subparsers)
    _add_config(subparsers)
    _add_doctor(subparsers)
    _add_service(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``edge-agent``; returns the process exit code."""
    return run(build_parser(), argv, expected=(AgentError, ProfileError))


def _state_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"agent state directory (default {DEFAULT_STATE_DIR}, or "
                   "$EDGEFLEET_STATE_DIR)")


def _add_enroll(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "enroll", help="join a fleet with a one-time token",
        description="Create this device's key pair, get its certificate from the fleet "
        "server with TOKEN (from `fleet enroll-token`), pin the fleet's root of trust and "
        "write DIR/agent.toml for `edge-agent run`.")
    p.add_argument("--server", required=True, metavar="URL",
                   help=f"the fleet server's API, e.g. https://fleet.example:{SERVER_API_PORT} "
                   "(the token pins its CA)")
    p.add_argument("--token", required=True, metavar="TOKEN",
                   help="the one-time token from `fleet enroll-token` (eft1....; "
                   "--token=TOKEN works too)")
    p.add_argument("--device-id", metavar="ID",
                   help="this device's id in the fleet (default: the host name)")
    _state_dir_option(p)
    p.add_argument("--profile", metavar="NAME",
                   help="this device's firmware profile (default: probe the host)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG",
                   help="a tag for fleet targeting (repeatable)")
    _option(p, "--port", ApiConfig, "port")
    _option(p, "--probation", ApiConfig, "probation_s", metavar="SECONDS")
    _option(p, "--telemetry-interval", FleetSettings, "telemetry_interval_s",
            metavar="SECONDS")
    p.set_defaults(handler=_enroll)


def _option(p: argparse.ArgumentParser, flag: str, table: type[Any], key: str,
            metavar: str | None = None) -> None:
    """A flag for config key ``key`` of ``table``: its default, bounds and meaning."""
    kind, default, meaning = option_type(table, key)
    p.add_argument(flag, type=kind, default=default, metavar=metavar,
                   help=f"{meaning} (default {default})")


def _enroll(args: argparse.Namespace) -> int:
    from .daemon import resolve_profile
    from .enroll import CONFIG_NAME, EnrollRequest, default_device_id, enroll
    from .startup import usable_state_dir

    state_dir = usable_state_dir(args.state_dir)
    profile = resolve_profile(args.profile)
    config = enroll(EnrollRequest(
        server_url=args.server, token=args.token,
        device_id=args.device_id or default_device_id(), state_dir=state_dir,
        profile=profile.name if profile else None, tags=tuple(args.tag),
        api_port=args.port, probation_s=args.probation,
        telemetry_interval_s=args.telemetry_interval))
    assert config.fleet is not None
    print(f"enrolled {config.fleet.device_id} in fleet {config.fleet.name} "
          f"(broker {config.fleet.broker_url}, profile {config.profile or 'generic CPU'}); "
          f"start it with: edge-agent run --config {args.state_dir / CONFIG_NAME}")
    return 0


def _add_run(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "run", help="the agent daemon: serve models and follow the fleet",
        description="Serve the installed models on the local API and keep them as the fleet "
        "server wants them: fetch, verify and hot-swap new bundles, report every change, "
        "send telemetry (buffered on disk while the broker is unreachable).")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"agent config (default {DEFAULT_STATE_DIR / 'agent.toml'})")
    _detach_option(p)
    p.set_defaults(handler=_run)


def _detach_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(DETACH_FLAG, action="store_true",
                   help="run in the background (output to DIR/agent.log) and return once "
                   "the API answers, or fail with the reason")


def _detach(args: argparse.Namespace, state_dir: Path) -> int:
    """Re-run this command in the background and wait until it serves (common.background)."""
    from .daemon import find_running

    def ready(pid: int) -> bool:
        running = find_running(state_dir)
        return running is not None and running.pid == pid

    log_file = state_dir / "agent.log"
    started = start_detached("agent", without_detach(args.argv), log_file, ready,
                             timeout_s=_DETACH_TIMEOUT_S)
    problem = started.failure("the agent")
    if problem is not None:
        raise AgentError(problem)
    print(f"edge-agent started in the background (pid {started.pid}, log {log_file}); "
          f"`edge-agent stop --state-dir {state_dir}` stops it")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .daemon import AgentProcess, resolve_profile
    from .fleet_link import FleetLink
    from .http_api import ApiSettings
    from .probation import ProbationPolicy
    from .runtime import Runtime
    from .startup import check_fleet_files, lock_state_dir, usable_state_dir
    from .telemetry import TelemetryCollector

    config = load_config(args.config or DEFAULT_STATE_DIR / "agent.toml")
    usable_state_dir(config.state_dir)
    if config.fleet is not None:
        check_fleet_files(config.fleet)
    if args.detach:
        return _detach(args, config.state_dir)
    _lock = lock_state_dir(config.state_dir)  # held while this process serves
    profile = resolve_profile(config.profile)
    api = config.api
    runtime = Runtime(config.state_dir, profile,
                      policy=ProbationPolicy(window_s=api.probation_s), threads=api.threads,
                      monitoring=config.monitor)
    for problem in runtime.problems:
        print(f"warning: {problem}", file=sys.stderr)
    token, token_file = AgentProcess.token(config.state_dir, None)
    process = AgentProcess(runtime, ApiSettings(host=api.host, port=api.port,
                                                unix_socket=api.unix_socket, token=token,
                                                limits=api.limits,
                                                cors_origins=api.cors_origins,
                                                grpc_port=api.grpc_port,
                                                prometheus=config.monitor.prometheus),
                           config.state_dir,
                           device=config.fleet.device_id if config.fleet else "local")
    process.start(token_file)
    link = None
    if config.fleet is not None:
        link = FleetLink(runtime, config.fleet, telemetry=TelemetryCollector(
            runtime, experiments=process.experiments))
        link.start()
    # Serving already; interrupted installs resume behind it, reported through the link.
    runtime.resume_installs(wait=False)
    models = ", ".join(f"{m.name} v{m.version}" for m in runtime.models())
    fleet = (f"fleet {config.fleet.name} as {config.fleet.device_id} via "
             f"{config.fleet.broker_url}" if config.fleet else "no fleet (offline)")
    print(f"edge-agent running: {models or 'no models yet'} on "
          f"{process.server.url or api.unix_socket}; {fleet}", flush=True)
    try:
        process.wait()
    finally:
        if link is not None:
            link.stop()
    return 0


def _add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve", help="serve models over the local inference API (offline, no fleet)",
        description="Serve the models installed in the state directory, plus any --model "
        "given: a model file (.onnx, .tflite; served as is, not persisted) or a signed "
        "bundle (verified and installed into the state directory first). The API speaks the "
        "Open Inference Protocol v2 on localhost; its bearer token is in DIR/api-token.")
    p.add_argument("--model", action="append", default=[], type=Path, metavar="PATH",
                   help="model file or bundle to serve (repeatable)")
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="name for the matching --model file (default: the file's stem)")
    _state_dir_option(p)
    p.add_argument("--root", type=Path, metavar="ROOT.json",
                   help="the fleet's root.json, pinned if DIR trusts nothing yet")
    p.add_argument("--profile", metavar="NAME",
                   help="this device's firmware profile (default: probe the host)")
    p.add_argument("--host", default=DEFAULT_API_HOST, help="address to listen on (default "
                   f"{DEFAULT_API_HOST}: the API is for apps on this device)")
    _option(p, "--port", ApiConfig, "port")
    p.add_argument("--unix-socket", type=Path, metavar="PATH", help="also listen here")
    _option(p, "--grpc-port", ApiConfig, "grpc_port", metavar="PORT")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="API token file, created 0600 if missing (default DIR/api-token)")
    p.add_argument("--no-auth", action="store_true",
                   help="accept requests without a token (throwaway tests only)")
    _option(p, "--threads", ApiConfig, "threads")
    _option(p, "--probation", ApiConfig, "probation_s", metavar="SECONDS")
    _option(p, "--max-batch", ApiLimits, "max_batch", metavar="N")
    p.add_argument("--cors-origin", action="append", default=[], type=_origin,
                   metavar="ORIGIN", help="a web origin (http://localhost:3000) whose pages may "
                   "call the API from a browser (repeatable; default none)")
    _detach_option(p)
    p.set_defaults(handler=_serve)


def _origin(text: str) -> str:
    from .cors import check_origin

    try:
        check_origin(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _serve(args: argparse.Namespace) -> int:
    from .daemon import AgentProcess, resolve_profile
    from .http_api import ApiSettings
    from .probation import ProbationPolicy
    from .runtime import Runtime
    from .startup import lock_state_dir, usable_state_dir

    if len(args.name) > len(args.model):
        raise AgentError("more --name than --model options; give one name per model file")
    for model in args.model:
        if not model.is_file():
            raise AgentError(f"{model}: no such model or bundle file")
    _pin_root(args.state_dir, args.root)
    state_dir = usable_state_dir(args.state_dir)
    if args.detach:
        return _detach(args, state_dir)
    _lock = lock_state_dir(state_dir)  # held while this process serves
    profile = resolve_profile(args.profile)
    runtime = Runtime(state_dir, profile, policy=ProbationPolicy(window_s=args.probation),
                      threads=args.threads)
    for problem in runtime.problems:
        print(f"warning: {problem}", file=sys.stderr)
    for index, model in enumerate(args.model):
        name = args.name[index] if index < len(args.name) else None
        if model.suffix.lower() in (".onnx", ".tflite"):
            runtime.load_file(model, name)
        else:
            record = runtime.install(model)
            if record.reason is not None:
                raise AgentError(f"{model}: install failed: {record.reason}: {record.detail}")
    token, token_file = (None, None) if args.no_auth else AgentProcess.token(state_dir,
                                                                             args.token_file)
    settings = ApiSettings(host=args.host, port=args.port, unix_socket=args.unix_socket,
                           token=token, limits=ApiLimits(max_batch=args.max_batch),
                           cors_origins=tuple(args.cors_origin), grpc_port=args.grpc_port)
    process = AgentProcess(runtime, settings, state_dir)
    process.start(token_file)
    runtime.resume_installs(wait=False)  # behind the models already served
    models = ", ".join(f"{m.name} v{m.version or '-'} ({m.backend})" for m in runtime.models())
    grpc = "" if process.grpc is None else f" and gRPC port {process.grpc.port}"
    print(f"edge-agent serving {models or 'no models yet'} on "
          f"{process.server.url or settings.unix_socket}{grpc}"
          f"{f'; token in {token_file}' if token_file else ' without authentication'}"
          f"; profile {profile.name if profile else 'generic CPU'}", flush=True)
    process.wait()
    return 0


def _add_install(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "install", help="install a bundle into the running agent or its state directory",
        description="Verify and install BUNDLE. With an agent running from DIR, it is sent "
        "to that agent, which hot-swaps it in; otherwise it is installed into DIR and "
        "served the next time the agent starts.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    _state_dir_option(p)
    p.add_argument("--root", type=Path, metavar="ROOT.json",
                   help="the fleet's root.json, pinned if DIR trusts nothing yet")
    p.add_argument("--profile", metavar="NAME",
                   help="this device's firmware profile (default: probe the host)")
    p.add_argument("--json", action="store_true", help="print the install record as JSON")
    p.set_defaults(handler=_install)


def _install(args: argparse.Namespace) -> int:
    from .daemon import find_running, resolve_profile
    from .runtime import Runtime
    from .startup import lock_state_dir, usable_state_dir

    if not args.bundle.is_file():
        raise AgentError(f"{args.bundle}: no such bundle file")
    _pin_root(args.state_dir, args.root)
    running = find_running(args.state_dir)
    if running is not None:
        with running.client(timeout=600) as client:
            record = client.install(args.bundle)
    else:
        _lock = lock_state_dir(usable_state_dir(args.state_dir))  # no agent may start meanwhile
        runtime = Runtime(args.state_dir, resolve_profile(args.profile))
        try:
            runtime.resume_installs()  # an earlier one a stop interrupted goes first
            record = runtime.install(args.bundle).summary()
        finally:
            runtime.close()
    if args.json:
        print(json.dumps(record, indent=2))
    elif record["reason"] is None:
        where = "the running agent" if running else f"{args.state_dir} (served at next start)"
        print(f"installed {record['model']} v{record['version']} into {where}: "
              f"{record['state']}")
    else:
        print(f"edge-agent: install failed: {record['reason']}: {record['detail']}",
              file=sys.stderr)
    return 0 if record["reason"] is None else 1


def _add_status(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "status", help="models served, their figures, recent installs",
        description="Ask the agent running from DIR, or read DIR when none is running.")
    _state_dir_option(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    from .daemon import find_running
    from .status import offline_status, status_table

    running = find_running(args.state_dir)
    if running is not None:
        with running.client() as client:
            status = {"running": True, **client.status()}
    elif args.state_dir.exists() and not args.state_dir.is_dir():
        raise AgentError(f"{args.state_dir} is not a directory; pass the agent's --state-dir")
    else:
        status = {"running": False, **offline_status(args.state_dir)}
    print(json.dumps(status, indent=2) if args.json else status_table(status))
    return 0


def _add_stop(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "stop", help="stop the agent running from the state directory",
        description="Send SIGTERM to the agent serving from DIR and wait until it has "
        "stopped (it finishes the requests under way and keeps every install record).")
    _state_dir_option(p)
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait (default 30)")
    p.set_defaults(handler=_stop)


def _stop(args: argparse.Namespace) -> int:
    from .daemon import find_running

    running = find_running(args.state_dir)
    if running is None:
        print(f"no agent runs from {args.state_dir}")
        return 0
    if not stop_pid(running.pid, args.timeout):
        raise AgentError(f"the agent (pid {running.pid}) is still running after "
                         f"{args.timeout:g} s; kill -9 {running.pid} ends it (its installs "
                         "resume at the next start)")
    print(f"stopped the agent (pid {running.pid})")
    return 0


def _add_predict(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "predict", help="run one inference through the running agent's API",
        description="Send the arrays in .npy files to model NAME of the running agent and "
        "print the outputs (or save them with --output).")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--input", action="append", required=True, metavar="[TENSOR=]FILE.npy",
                   help="an input array; TENSOR defaults to the model's first input")
    p.add_argument("--output", type=Path, metavar="FILE.npz", help="save outputs here")
    _state_dir_option(p)
    p.add_argument("--json", action="store_true", help="print outputs as JSON")
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from .daemon import find_running

    running = find_running(args.state_dir)
    if running is None:
        raise AgentError(f"no agent is running from {args.state_dir}; start one with "
                         "`edge-agent serve` (or pass its --state-dir)")
    with running.client() as client:
        metadata = client.model_metadata(args.name)
        inputs = {}
        for spec in args.input:
            tensor, sep, file = spec.rpartition("=")
            tensor = tensor if sep else metadata["inputs"][0]["name"]
            try:
                inputs[tensor] = np.load(file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise AgentError(f"cannot read {file} as a .npy array ({exc})") from exc
        outputs = client.infer(args.name, inputs)
    if args.output is not None:
        np.savez(args.output, **outputs)  # type: ignore[arg-type]  # numpy stub: allow_pickle
    if args.json:
        print(json.dumps({k: v.tolist() for k, v in outputs.items()}))
    else:
        for name, value in outputs.items():
            top = (f"  argmax per row: {value.argmax(axis=-1).tolist()}"
                   if value.ndim >= 1 and value.dtype.kind == "f" else "")
            print(f"{name}: {value.dtype}{list(value.shape)}{top}")
            print(np.array2string(value, precision=4, threshold=40))
    return 0


def _add_verify(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "verify", help="verify a bundle against this device's trusted state",
        description="Verify BUNDLE with the trusted TUF metadata and installed versions in "
        "the state directory, and remember the newer metadata. Installs nothing.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    _state_dir_option(p)
    p.add_argument("--root", type=Path, metavar="ROOT.json",
                   help="the fleet's root.json to pin; used only when DIR has no trusted "
                   "state yet")
    p.add_argument("--profile", metavar="NAME",
                   help="this device's firmware profile; the bundle must target it")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_verify)


def _pin_root(state_dir: Path, root: Path | None) -> None:
    """Pin ``root`` if the device trusts nothing yet; refuse one that differs from the pin.

    Once a root is pinned, newer roots arrive only inside bundles, signed by the old one.
    """
    from .startup import usable_state_dir

    store = TrustStore(state_dir / "trust")
    trusted = resolve_root(store, root)  # checks ``root`` before anything is written
    if trusted is not None and not store.exists():
        usable_state_dir(state_dir)
        store.save(trusted)


def _verify(args: argparse.Namespace) -> int:
    store = TrustStore(args.state_dir / "trust")
    # Verify only: nothing is pinned or saved, so checking a bundle (even a newer one) never
    # changes what the device will install later.
    trusted = resolve_root(store, args.root)
    if trusted is None:
        raise TrustStoreError(f"no trusted state in {args.state_dir}; pass --root ROOT.json "
                              "once to pin the fleet's root")
    data = _read(args.bundle, Limits().max_bundle_bytes)
    try:
        verified = verify_bundle(data, trusted, now=datetime.now(timezone.utc),
                                 profile=args.profile)
    except BundleError as exc:
        raise BundleRejectedError(type(exc).__name__, str(exc)) from exc
    print(json.dumps(verified.summary(), indent=2) if args.json else verified.describe())
    return 0


def _read(path: Path, limit: int) -> bytes:
    """Read ``path`` after checking its size, so a huge file is refused unread."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise BundleRejectedError("OversizeError", f"{path} is {size} bytes, over the "
                                      f"limit of {limit}; refusing to read it")
        return path.read_bytes()
    except OSError as exc:
        raise AgentError(f"cannot read {path} ({exc.strerror})") from exc


def _add_probe(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "probe", help="show this device's capabilities and its best firmware profile",
        description="Probe CPU features, memory, onnxruntime execution providers and "
        "loadable LiteRT delegates, and rank the firmware profiles against them.")
    p.add_argument("--profiles-dir", type=Path, metavar="DIR",
                   help="profiles to match against (default: the packaged profiles)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_probe)


def _probe(args: argparse.Namespace) -> int:
    profiles = load_profiles(args.profiles_dir)
    host = probe_host(profiles)
    matches = match_profiles(host, profiles)
    best = matches[0].profile.name if matches[0].fits else None
    if args.json:
        print(json.dumps({"host": host_to_json(host), "best_profile": best,
                          "matches": [match_to_json(m) for m in matches]}, indent=2))
        return 0
    print(host_summary(host))
    print(f"best profile: {best or 'none fits (see the FITS column)'}\n")
    print(matches_table(matches))
    return 0


def _add_config(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "config", help="check an agent config file, or print the reference of its keys",
        description="Check FILE as `edge-agent run` would and print its values with every "
        "default filled in; with --doc, print the reference of every key instead (the "
        "source of docs/agent-config.md).")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"agent config (default {DEFAULT_STATE_DIR / 'agent.toml'})")
    p.add_argument("--doc", action="store_true", help="print the reference (Markdown)")
    p.set_defaults(handler=_config)


def _config(args: argparse.Namespace) -> int:
    from .config import config_reference, config_to_toml, load_config

    if args.doc:
        print(config_reference(), end="")
        return 0
    print(config_to_toml(load_config(args.config or DEFAULT_STATE_DIR / "agent.toml")), end="")
    return 0


def _add_doctor(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "doctor", help="check this device: broker, certificate, clock, disk, runtimes",
        description="Check what the agent needs, one line per check with the fix: the "
        "config, free space in the state directory, the API token's and device key's "
        "permissions, the device certificate (issued by the fleet CA, not expired, not "
        "expiring within 30 days), a TLS connection to the broker with it, the clock against "
        "the fleet server's, the runtimes and the profile's accelerators. Exit code 1 if any "
        "check fails.")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="agent config (default DIR/agent.toml; without one, the offline "
                   "checks of DIR)")
    _state_dir_option(p)
    p.add_argument("--profile", metavar="NAME",
                   help="firmware profile to check (default: the config's, else the best "
                   "for this host)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from .config import AgentConfig, load_config
    from .daemon import resolve_profile
    from .doctor import Check, Verdict, exit_code, render
    from .doctor_probes import run_checks

    path = args.config or args.state_dir / "agent.toml"
    checks = []
    config: AgentConfig | None = AgentConfig(args.state_dir)
    if args.config is not None or path.exists():
        try:
            config = load_config(path)
        except AgentError as exc:
            config = None
            checks.append(Check("config", Verdict.FAIL, str(exc),
                                "correct it (docs/agent-config.md lists every key)"))
        else:
            checks.append(Check("config", Verdict.OK, f"{path}"))
    if config is None:
        # Checking defaults instead would report on a state directory and a fleet that are
        # not this agent's.
        checks.append(Check("others", Verdict.SKIP, "the state directory, fleet, certificate, "
                            "broker, clock and runtime checks need the config: fix it first"))
    else:
        checks += run_checks(config, resolve_profile(args.profile or config.profile))
    if args.json:
        print(json.dumps([{"check": c.name, "verdict": c.verdict.value, "detail": c.detail,
                           "fix": c.fix} for c in checks], indent=2))
    else:
        print(render(checks))
    return exit_code(checks)


def _add_service(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .service_install import DEFAULT_UNIT_DIR

    p = subparsers.add_parser(
        "install-service", help="run the agent as a systemd service",
        description="Write a hardened systemd unit that runs `edge-agent run --config FILE` "
        "(Type=notify with a watchdog, restarted on failure, its own user, the file system "
        "read-only but for the state directory, memory bounded from the firmware profile) "
        "and, where systemd runs, enable and start it. docs/agent.md describes the unit.")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"agent config (default {DEFAULT_STATE_DIR / 'agent.toml'})")
    p.add_argument("--user", metavar="NAME", help="run as this existing user, which owns "
                   "the state directory (default: a dynamic user; needs a state directory "
                   "under /var/lib)")
    p.add_argument("--profile", metavar="NAME", help="firmware profile that sizes MemoryMax "
                   "(default: the config's, else the best for this host)")
    p.add_argument("--name", default="edge-agent", help="unit name (default edge-agent)")
    p.add_argument("--unit-dir", type=Path, default=DEFAULT_UNIT_DIR, metavar="DIR",
                   help=f"where to write the unit (default {DEFAULT_UNIT_DIR})")
    p.add_argument("--no-start", action="store_true", help="write the unit only")
    p.add_argument("--print", action="store_true", help="print the unit instead of writing it")
    p.set_defaults(handler=_install_service)
    p = subparsers.add_parser(
        "uninstall-service", help="stop the systemd service and remove its unit",
        description="Stop and disable the unit (where systemd runs) and remove its file. The "
        "state directory (models, keys, trusted metadata) is kept.")
    p.add_argument("--name", default="edge-agent", help="unit name (default edge-agent)")
    p.add_argument("--unit-dir", type=Path, default=DEFAULT_UNIT_DIR, metavar="DIR",
                   help=f"where the unit is (default {DEFAULT_UNIT_DIR})")
    _state_dir_option(p)
    p.set_defaults(handler=_uninstall_service)


def _install_service(args: argparse.Namespace) -> int:
    from .config import load_config
    from .daemon import resolve_profile
    from .service_install import ServiceRequest, install_service, unit_for

    config_path = args.config or DEFAULT_STATE_DIR / "agent.toml"
    request = ServiceRequest(config_path, args.name, args.user, args.unit_dir,
                             not args.no_start)
    profile = resolve_profile(args.profile or load_config(config_path).profile)
    if args.print:
        print(unit_for(request, profile), end="")
    else:
        print(install_service(request, profile))
    return 0


def _uninstall_service(args: argparse.Namespace) -> int:
    from .service_install import uninstall_service

    print(uninstall_service(args.unit_dir, args.name, args.state_dir.absolute()))
    return 0
