"""How the ``fleet`` commands of a running fleet show the operator API's answers on a
terminal: tables, times, and a device's desired and reported state in one line each.
Shared by :mod:`fleet_server.device_cli`, :mod:`fleet_server.publish_cli` and
:mod:`fleet_server.events_cli`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ago", "desired_text", "event_line", "install_text", "print_json", "reported_text",
           "table", "utc"]


def print_json(obj: Any) -> None:
    """``--json`` output: indented, keys sorted."""
    print(json.dumps(obj, indent=2, sort_keys=True))


def desired_text(desired: Mapping[str, Any], *, sha: bool = False) -> str:
    return ", ".join(f"{name} v{want['version']}"
                     + (f" (bundle {want['bundle_sha256'][:12]})" if sha else "")
                     for name, want in sorted(desired.items()))


def reported_text(reported: Mapping[str, Any], *, sha: bool = False) -> str:
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
            text += f" [{install_text(install)}]"
        parts.append(text)
    return ", ".join(parts)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def install_text(install: Any) -> str:
    if not isinstance(install, dict):
        return "?"
    version = install.get("version")
    text = f"{'' if version is None else f'v{version} '}{install.get('state')}"
    if isinstance(install.get("progress"), (int, float)):
        text += f" {install['progress'] * 100:.0f}%"
    if install.get("reason"):
        text += f": {install['reason']}"
    return text


def event_line(event: Mapping[str, Any]) -> str:
    detail = json.dumps(event["detail"], sort_keys=True, separators=(",", ":"))
    return (f"{event['id']:>6}  {utc(event['at'])}  {event['device'] or '-':<16}  "
            f"{event['kind']:<20}  {detail}")


def utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def ago(at: float | None, now: float) -> str:
    if at is None:
        return "never"
    seconds = max(0.0, now - at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> None:
    if not rows:
        print(empty, file=sys.stderr)
        return
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True))
              .rstrip())

