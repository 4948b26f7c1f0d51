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
    _add_predict(subparsers)
    _add_verify(subparsers)
    _add_probe(subparsers)
    _add_config(subparsers)
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
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .daemon import AgentProcess, resolve_profile
    from .fleet_link import FleetLink
    from .http_api import ApiSettings
    from .probation import ProbationPolicy
    from .runtime import Runtime
    from .startup import check_fleet_files, usable_state_dir
    from .telemetry import TelemetryCollector

    config = load_config(args.config or DEFAULT_STATE_DIR / "agent.toml")
    usable_state_dir(config.state_dir)
    if config.fleet is not None:
        check_fleet_files(config.fleet)
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
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="API token file, created 0600 if missing (default DIR/api-token)")
    p.add_argument("--no-auth", action="store_true",
                   help="accept requests without a token (throwaway tests only)")
    _option(p, "--threads", ApiConfig, "threads")
    _option(p, "--probation", ApiConfig, "probation_s", metavar="SECONDS")
    _option(p, "--max-batch", ApiLimits, "max_batch", metavar="N")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from .daemon import AgentProcess, resolve_profile
    from .http_api import ApiSettings
    from .probation import ProbationPolicy
    from .runtime import Runtime
    from .startup import usable_state_dir

    if len(args.name) > len(args.model):
        raise AgentError("more --name than --model options; give one name per model file")
    for model in args.model:
        if not model.is_file():
            raise AgentError(f"{model}: no such model or bundle file")
    _pin_root(args.state_dir, args.root)
    state_dir = usable_state_dir(args.state_dir)
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
                           token=token, limits=ApiLimits(max_batch=args.max_batch))
    process = AgentProcess(runtime, settings, state_dir)
    process.start(token_file)
    runtime.resume_installs(wait=False)  # behind the models already served
    models = ", ".join(f"{m.name} v{m.version or '-'} ({m.backend})" for m in runtime.models())
    print(f"edge-agent serving {models or 'no models yet'} on "
          f"{process.server.url or settings.unix_socket}"
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
    from .startup import usable_state_dir

    if not args.bundle.is_file():
        raise AgentError(f"{args.bundle}: no such bundle file")
    _pin_root(args.state_dir, args.root)
    running = find_running(args.state_dir)
    if running is not None:
        with running.client(timeout=600) as client:
            record = client.install(args.bundle)
    else:
        runtime = Runtime(usable_state_dir(args.state_dir), resolve_profile(args.profile))
        runtime.resume_installs()  # an earlier one a stop interrupted goes first
        record = runtime.install(args.bundle).summary()
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
    # Pinned on disk only once a bundle verified against it, so a wrong file given here does
    # not leave the device trusting it.
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
    # Newer verified metadata raises the floor for replay and rollback of later bundles.
    store.save(verified.trusted)
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
