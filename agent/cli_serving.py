"""The long-running ``edge-agent`` commands: ``serve`` (models, offline), ``run`` (the
daemon, with its fleet), either ``--detach``-ed into the background, and ``stop``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.background import DETACH_FLAG, start_detached, stop_pid, without_detach
from common.cli import Subcommands

from .cli_options import DEFAULT_STATE_DIR, option, pin_root, state_dir_option
from .config import DEFAULT_API_HOST, ApiConfig, ApiLimits
from .errors import AgentError

__all__ = ["register"]

#: How long ``--detach`` waits for the agent to serve: loading and self-testing its models.
_DETACH_TIMEOUT_S = 120.0


def register(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
    """Add ``run``, ``serve`` and ``stop`` to ``subparsers``."""
    _add_run(subparsers)
    _add_serve(subparsers)
    _add_stop(subparsers)


def _add_run(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
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
    from .config_load import load_config
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
                           config.state_dir)
    process.start(token_file)
    link = None
    if config.fleet is not None:
        link = FleetLink(runtime, config.fleet, telemetry=TelemetryCollector(runtime))
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


def _add_serve(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
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
    state_dir_option(p)
    p.add_argument("--root", type=Path, metavar="ROOT.json",
                   help="the fleet's root.json, pinned if DIR trusts nothing yet")
    p.add_argument("--profile", metavar="NAME",
                   help="this device's firmware profile (default: probe the host)")
    p.add_argument("--host", default=DEFAULT_API_HOST, help="address to listen on (default "
                   f"{DEFAULT_API_HOST}: the API is for apps on this device)")
    option(p, "--port", ApiConfig, "port")
    p.add_argument("--unix-socket", type=Path, metavar="PATH", help="also listen here")
    option(p, "--grpc-port", ApiConfig, "grpc_port", metavar="PORT")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="API token file, created 0600 if missing (default DIR/api-token)")
    p.add_argument("--no-auth", action="store_true",
                   help="accept requests without a token (throwaway tests only)")
    option(p, "--threads", ApiConfig, "threads")
    option(p, "--probation", ApiConfig, "probation_s", metavar="SECONDS")
    option(p, "--max-batch", ApiLimits, "max_batch", metavar="N")
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
    pin_root(args.state_dir, args.root)
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


def _add_stop(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "stop", help="stop the agent running from the state directory",
        description="Send SIGTERM to the agent serving from DIR and wait until it has "
        "stopped (it finishes the requests under way and keeps every install record).")
    state_dir_option(p)
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
