"""``edge-agent``: the on-device command line.

Exit codes: 0 success, 1 the command failed (one line on stderr says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from bundle.archive import Limits
from bundle.errors import BundleError
from bundle.trust import TrustedState, verify_bundle
from firmware_profiles import ProfileError, load_profiles, match_profiles, probe_host
from firmware_profiles.describe import host_summary, host_to_json, match_to_json, matches_table

from . import __version__
from .errors import AgentError, BundleRejectedError, TrustStoreError
from .trust_store import TrustStore

__all__ = ["DEFAULT_STATE_DIR", "build_parser", "main"]

log = logging.getLogger(__name__)

#: Where the agent keeps its state unless told otherwise.
DEFAULT_STATE_DIR = Path("/var/lib/edgefleet/agent")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``edge-agent`` and all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="On-device daemon: verify and install model bundles, serve inference "
        "locally (offline-capable), report to the fleet server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_verify(subparsers)
    _add_probe(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``edge-agent``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=_log_level(args.verbose),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except (AgentError, ProfileError) as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 1


def _log_level(verbosity: int) -> int:
    return {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)


def _add_verify(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "verify", help="verify a bundle against this device's trusted state",
        description="Verify BUNDLE with the trusted TUF metadata and installed versions in "
        "the state directory, and remember the newer metadata. Installs nothing.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"agent state directory (default {DEFAULT_STATE_DIR})")
    p.add_argument("--root", type=Path, metavar="ROOT.json",
                   help="the fleet's root.json to pin; used only when DIR has no trusted "
                   "state yet")
    p.add_argument("--profile", metavar="NAME",
                   help="this device's firmware profile; the bundle must target it")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    store = TrustStore(args.state_dir / "trust")
    if store.exists():
        if args.root is not None:
            log.info("%s already holds trusted state; ignoring --root", store.path)
        trusted = store.load()
    elif args.root is not None:
        # Pinned on disk only once a bundle verified against it, so a wrong file given
        # here does not leave the device trusting it.
        trusted = TrustedState(root=_read(args.root, Limits().max_bundle_bytes))
    else:
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
