"""``fleet bundles``, ``fleet publish`` and ``fleet rollback``: the bundles stored on the
server, and changing devices' desired state, over the operator API. Registered by
:func:`fleet_server.server_cli.add_server_commands`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .api_client import locate
from .cli_text import print_json, table, utc
from .errors import BundleInputError

__all__ = ["add_publish_commands"]


def add_publish_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                         parents: list[argparse.ArgumentParser]) -> None:
    """Add ``bundles``, ``publish`` and ``rollback`` (``parents``: the server location and
    ``--json``)."""
    bundles = subparsers.add_parser("bundles", parents=parents,
                                    help="list the bundles stored on the server")
    bundles.set_defaults(handler=_bundles)

    publish = subparsers.add_parser(
        "publish", parents=parents, help="upload a bundle and make it desired",
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
        "rollback", parents=parents, help="undo the last desired-state change",
        description="Give each selected device back the desired state it had before the "
        "last change (of MODEL only, with --model). Twice undoes two changes. Devices refuse "
        "versions lower than they have, so the server re-releases each earlier bundle as the "
        "next version of its model (signed with the online keys of `fleet serve --keys`) and "
        "that is what devices install.")
    _add_selection(rollback)
    rollback.add_argument("--model", help="only changes of this model")
    rollback.set_defaults(handler=_rollback)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", help="every device of this group")
    target.add_argument("--device", action="append", metavar="ID", dest="devices",
                        help="this device (repeatable)")


def _selection_body(args: argparse.Namespace) -> dict[str, Any]:
    return {"group": args.group} if args.group else {"devices": list(args.devices)}


def _bundles(args: argparse.Namespace) -> int:
    bundles = locate(args.server, args.data).get("/api/bundles")["bundles"]
    if args.json:
        print_json(bundles)
        return 0
    rows = [[b["name"], str(b["version"]), _size(b["size"]), b["sha256"][:16],
             utc(b["created_at"]),
             f"re-release of v{b['rollback_of']}" if b.get("rollback_of") else ""]
            for b in bundles]
    table(["NAME", "VERSION", "SIZE", "SHA256", "STORED", "NOTE"], rows,
           "no bundles stored yet; `fleet publish BUNDLE_FILE --group G` uploads one")
    return 0


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _publish(args: argparse.Namespace) -> int:
    data = _read_file(args.bundle_file)
    client = locate(args.server, args.data)
    bundle = client.post("/api/bundles", data=data)
    deltas = [client.post("/api/bundles", data=_read_file(path))
              for path in _delta_files(args.bundle_file)]
    result = client.post("/api/publish", {"bundle_sha256": bundle["sha256"],
                                          **_selection_body(args),
                                          **({"encrypt_for": args.encrypt_for}
                                             if args.encrypt_for else {})})
    if args.json:
        print_json({"bundle": bundle, "deltas": deltas, **result})
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
    result = locate(args.server, args.data).post("/api/rollback", body)
    if args.json:
        print_json(result)
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


def _version(value: Mapping[str, Any] | None) -> str:
    return "nothing" if value is None else f"v{value['version']}"


def _delivery(result: Mapping[str, Any]) -> int:
    """Exit code 1, with why, when the desired state is stored but could not be sent."""
    if result.get("delivered", True):
        return 0
    print("fleet: error: the desired state is stored but not delivered: the server has no "
          "broker connection (see `fleet devices`, the server's log); it is sent to the "
          "devices when the connection returns", file=sys.stderr)
    return 1

