"""``fleet``: the operator command line.

Exit codes: 0 success, 1 the command failed (one line on stderr says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from bundle.errors import BundleError
from bundle.trust import TrustedState, verify_bundle
from common.cli import new_parser, run

from . import __version__
from .api_client import locate
from .bundle_builder import BuildRequest, build
from .demo import run_demo
from .errors import BundleInputError, FleetError
from .keys import ROLES, KeyStore, init_keys, rotate_keys
from .server_cli import add_server_commands

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``fleet`` and all its subcommands."""
    parser, subparsers = new_parser(
        "fleet", "Operator tools: keys and signed bundles, device registry, publishing "
        "and rollouts to a fleet of edge devices.", __version__)
    _add_keys(subparsers)
    _add_bundle(subparsers)
    _add_demo(subparsers)
    add_server_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fleet``; returns the process exit code."""
    return run(build_parser(), argv, expected=(FleetError, BundleError), describe=_describe)


def _valid_days(text: str) -> int:
    # Checked by argparse, before a build could use up the model's version number.
    try:
        days = int(text)
    except ValueError:
        days = 0
    if not 1 <= days <= 3650:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days from 1 to 3650")
    return days


def _describe(exc: BaseException) -> str:
    # A bundle error's class name is the machine-readable reason (e.g. ExpiredError).
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, BundleError) else str(exc)


# --- fleet keys ---------------------------------------------------------------------------

def _add_keys(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="create and rotate the fleet's signing keys")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    init = actions.add_parser("init", help="create an offline root key, online keys and "
                              "root.json v1 (the file devices pin)")
    init.add_argument("--dir", type=Path, required=True, metavar="KEYS")
    init.add_argument("--root-keys", type=int, default=1, metavar="N",
                      help="number of root keys (default 1)")
    init.add_argument("--root-threshold", type=int, default=1, metavar="T",
                      help="root signatures required (default 1)")
    init.add_argument("--expires-days", type=int, default=365, metavar="DAYS",
                      help="root validity (default 365)")
    init.set_defaults(handler=_keys_init)

    rotate = actions.add_parser("rotate", help="replace a role's keys via a new root version")
    rotate.add_argument("--dir", type=Path, required=True, metavar="KEYS")
    rotate.add_argument("--role", choices=ROLES, required=True)
    rotate.add_argument("--offline-dir", type=Path, metavar="DIR",
                        help="where the offline root keys are (default KEYS/offline)")
    rotate.add_argument("--keys", type=int, metavar="N", help="number of new keys "
                        "(default: as many as now)")
    rotate.add_argument("--threshold", type=int, metavar="T",
                        help="new threshold (default: unchanged)")
    rotate.add_argument("--expires-days", type=int, default=365, metavar="DAYS")
    rotate.set_defaults(handler=_keys_rotate)


def _keys_init(args: argparse.Namespace) -> int:
    store = KeyStore.at(args.dir)
    root = init_keys(store, root_keys=args.root_keys, root_threshold=args.root_threshold,
                     expires_days=args.expires_days)
    print(f"created root v{root.version} ({root.roles['root'].threshold} of "
          f"{len(root.roles['root'].keyids)} root keys) and online keys for targets, "
          f"snapshot, timestamp\n"
          f"  pin on devices: {store.root_path}\n"
          f"  OFFLINE root keys: {store.offline_dir} (move to offline storage)")
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    store = KeyStore.at(args.dir, args.offline_dir)
    root = rotate_keys(store, args.role, count=args.keys, threshold=args.threshold,
                       expires_days=args.expires_days)
    print(f"rotated {args.role} keys: root is now v{root.version}; old {args.role} keys "
          f"moved to retired/ and no longer trusted\n"
          f"  new bundles carry root v{root.version}; devices adopt it on their next verify")
    return 0


# --- fleet bundle -------------------------------------------------------------------------

def _add_bundle(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bundle = subparsers.add_parser("bundle", help="build and verify signed model bundles")
    actions = bundle.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")

    b = actions.add_parser("build", help="build and sign a bundle")
    b.add_argument("--name", required=True)
    b.add_argument("--version", type=int, required=True, metavar="N",
                   help="model version; must exceed every earlier build of NAME")
    source = b.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifacts", type=Path, metavar="DIR",
                        help="edge-compress output directory")
    source.add_argument("--model", type=Path, metavar="FILE", help="a single model file")
    b.add_argument("--keys", type=Path, required=True, metavar="KEYS")
    b.add_argument("--out", type=Path, required=True, metavar="FILE")
    b.add_argument("--profile", action="append", default=[], metavar="NAME",
                   help="target firmware profile (repeatable)")
    b.add_argument("--encrypt-for", action="append", default=[],
                   metavar="RECIPIENTS", help="who may decrypt the artifacts (repeatable): "
                   "device:ID, group:G or profile:P (their keys from the server: needs "
                   "--data or --server), or an X25519 public key file (PEM)")
    where = b.add_argument_group("the fleet server, for its versions and devices' keys")
    where.add_argument("--server", metavar="URL", help="the operator API (as for `fleet "
                       "devices`)")
    where.add_argument("--data", type=Path, metavar="DIR",
                       help="the server's data directory: its versions are counted too, so "
                       "this build is above any re-release the server signed")
    b.add_argument("--delta-from", action="append", default=[], type=Path, metavar="OLD",
                   help="an earlier bundle of the model (repeatable): also write the delta "
                   "bundle from it, OUT's name with .from-vN, which devices running that "
                   "version fetch instead (`fleet publish` uploads it)")
    b.add_argument("--composite", type=Path, metavar="DECL.json",
                   help="serve the model as an ensemble or cascade of the artifacts: the "
                   "declaration `edge-compress composite ... --declare` prints (members are "
                   "artifacts/<file name>)")
    b.add_argument("--valid-days", type=_valid_days, default=30, metavar="DAYS",
                   help="metadata validity, 1 to 3650 days; devices refuse the bundle after "
                   "it (default 30)")
    b.set_defaults(handler=_bundle_build)

    v = actions.add_parser("verify", help="verify a bundle against a root.json")
    v.add_argument("file", type=Path, metavar="FILE")
    v.add_argument("--root", type=Path, required=True, metavar="ROOT.json")
    v.add_argument("--profile", metavar="NAME", help="also require this target profile")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.set_defaults(handler=_bundle_verify)


def _bundle_build(args: argparse.Namespace) -> int:
    server = locate(args.server, args.data) if args.server or args.data else None
    built = build(BuildRequest(
        name=args.name, version=args.version, keys_dir=args.keys, out=args.out,
        artifacts_dir=args.artifacts, model=args.model, profiles=tuple(args.profile),
        encrypt_for=tuple(args.encrypt_for), valid_days=args.valid_days, server=server,
        delta_from=tuple(args.delta_from), composite=args.composite))
    spec = built.spec
    print(f"built {args.out}: {spec.name} v{spec.version}, {len(spec.artifacts)} artifact(s) "
          f"for {', '.join(spec.profiles)}"
          f"{', encrypted' if args.encrypt_for else ''}, {built.size} bytes")
    for base, (path, size) in sorted(built.deltas.items()):
        print(f"built {path}: the delta bundle from v{base}, {size} bytes "
              f"({100 * size / built.size:.1f}% of the full bundle)")
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    root = _read(args.root)
    try:
        # From the path: the size is checked first and the file read in bounded blocks.
        verified = verify_bundle(Path(args.file), TrustedState(root=root),
                                 now=datetime.now(timezone.utc), profile=args.profile)
    except OSError as exc:
        raise BundleInputError(f"cannot read {args.file} ({exc.strerror})") from exc
    print(json.dumps(verified.summary(), indent=2) if args.json else verified.describe())
    return 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleInputError(f"cannot read {path} ({exc.strerror})") from exc


# --- fleet demo ---------------------------------------------------------------------------

def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the product's main job end to end on this machine",
        description="Probe this host and pick its profile, compress the reference model for "
        "it, build and sign a bundle from the result, verify it on the device side, and "
        "show a tampered copy rejected.")
    demo.add_argument("--workdir", type=Path, metavar="DIR",
                      help="keep the demo's files here (default: a temporary directory)")
    demo.add_argument("--drift", action="store_true",
                      help="then show monitoring: one device receives inverted images and "
                      "a drift alert reaches a webhook, `fleet metrics` and the dashboard")
    demo.set_defaults(handler=lambda args: run_demo(args.workdir, drift=args.drift))
