"""The ``edge-agent`` commands that do one job and return: ``enroll``, ``install``,
``status``, ``predict``, ``verify``, ``probe``, ``config``, ``doctor`` and
``install-service``/``uninstall-service``. ``install``, ``status`` and ``predict`` use the
running agent if there is one (its API), the state directory otherwise."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from bundle.archive import Limits
from bundle.errors import BundleError
from bundle.trust import verify_bundle
from common.cli import Subcommands
from firmware_profiles import load_profiles, match_profiles, probe_host
from firmware_profiles.describe import host_summary, host_to_json, match_to_json, matches_table
from protocol.defaults import SERVER_API_PORT

from .cli_options import DEFAULT_STATE_DIR, option, pin_root, state_dir_option
from .config import ApiConfig, FleetSettings
from .errors import AgentError, BundleRejectedError, TrustStoreError
from .trust_store import TrustStore, resolve_root

__all__ = ["register"]


def register(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
    """Add the one-shot commands to ``subparsers``."""
    _add_enroll(subparsers)
    _add_install(subparsers)
    _add_status(subparsers)
    _add_predict(subparsers)
    _add_verify(subparsers)
    _add_probe(subparsers)
    _add_config(subparsers)
    _add_doctor(subparsers)
    _add_service(subparsers)


def _add_enroll(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
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
    state_dir_option(p)
    p.add_argument("--profile", metavar="NAME",
                   help="this device's firmware profile (default: probe the host)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG",
                   help="a tag for fleet targeting (repeatable)")
    option(p, "--port", ApiConfig, "port")
    option(p, "--probation", ApiConfig, "probation_s", metavar="SECONDS")
    option(p, "--telemetry-interval", FleetSettings, "telemetry_interval_s",
            metavar="SECONDS")
    p.set_defaults(handler=_enroll)


def _enroll(args: argparse.Namespace) -> int:
    from .daemon import resolve_profile
    from .enroll import CONFIG_NAME, EnrollRequest, default_device_id, enroll
    from .startup import usable_state_dir

    created = not args.state_dir.exists()
    try:
        state_dir = usable_state_dir(args.state_dir)
        profile = resolve_profile(args.profile)
        config = enroll(EnrollRequest(
            server_url=args.server, token=args.token,
            device_id=args.device_id or default_device_id(), state_dir=state_dir,
            profile=profile.name if profile else None, tags=tuple(args.tag),
            api_port=args.port, probation_s=args.probation,
            telemetry_interval_s=args.telemetry_interval))
    except BaseException:
        # A refused enrollment writes nothing; the directory made for it goes too, so a
        # retry (or `doctor`) does not find an empty state directory that looks provisioned.
        if created:
            with contextlib.suppress(OSError):
                args.state_dir.rmdir()
        raise
    assert config.fleet is not None
    print(f"enrolled {config.fleet.device_id} in fleet {config.fleet.name} "
          f"(broker {config.fleet.broker_url}, profile {config.profile or 'generic CPU'}); "
          f"start it with: edge-agent run --config {args.state_dir / CONFIG_NAME}")
    return 0


def _add_install(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "install", help="install a bundle into the running agent or its state directory",
        description="Verify and install BUNDLE. With an agent running from DIR, it is sent "
        "to that agent, which hot-swaps it in; otherwise it is installed into DIR and "
        "served the next time the agent starts.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    state_dir_option(p)
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
    pin_root(args.state_dir, args.root)
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


def _add_status(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "status", help="models served, their figures, recent installs",
        description="Ask the agent running from DIR, or read DIR when none is running.")
    state_dir_option(p)
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


def _add_predict(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "predict", help="run one inference through the running agent's API",
        description="Send the arrays in .npy files to model NAME of the running agent and "
        "print the outputs (or save them with --output).")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--input", action="append", required=True, metavar="[TENSOR=]FILE.npy",
                   help="an input array; TENSOR defaults to the model's first input")
    p.add_argument("--output", type=Path, metavar="FILE.npz", help="save outputs here")
    state_dir_option(p)
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


def _add_verify(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "verify", help="verify a bundle against this device's trusted state",
        description="Verify BUNDLE with the trusted TUF metadata and installed versions in "
        "the state directory, and remember the newer metadata. Installs nothing.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    state_dir_option(p)
    p.add_argument("--root", type=Path, metavar="ROOT.json",
                   help="the fleet's root.json to pin; used only when DIR has no trusted "
                   "state yet")
    p.add_argument("--profile", metavar="NAME",
                   help="this device's firmware profile; the bundle must target it")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_verify)


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


def _add_probe(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
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


def _add_config(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
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
    from .config_load import load_config
    from .config_write import config_reference, config_to_toml

    if args.doc:
        print(config_reference(), end="")
        return 0
    print(config_to_toml(load_config(args.config or DEFAULT_STATE_DIR / "agent.toml")), end="")
    return 0


def _add_doctor(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
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
    state_dir_option(p)
    p.add_argument("--profile", metavar="NAME",
                   help="firmware profile to check (default: the config's, else the best "
                   "for this host)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from .config import AgentConfig
    from .config_load import load_config
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


def _add_service(subparsers: Subcommands[argparse.ArgumentParser]) -> None:
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
    state_dir_option(p)
    p.set_defaults(handler=_uninstall_service)


def _install_service(args: argparse.Namespace) -> int:
    from .config_load import load_config
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
