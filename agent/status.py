"""Agent status without a running agent, and the table ``edge-agent status`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .installer import Installer, StateDirs
from .model_store import ModelStore

__all__ = ["offline_status", "status_table"]


def offline_status(state_dir: Path) -> dict[str, Any]:
    """What the state directory says: active versions and recent installs (nothing loaded)."""
    dirs = StateDirs(state_dir)
    store = ModelStore(dirs.models)
    models = []
    for name in store.names():
        pointer = store.active(name)
        assert pointer is not None
        slot = store.slot(name, pointer.version)
        models.append({"name": name, "version": pointer.version, "state": "installed",
                       "previous": pointer.previous, "format": slot.format,
                       "dtype": slot.dtype})
    installer = Installer(dirs, None, ())
    installs = [r.summary() for r in installer.records()[:10]]
    return {"models": models, "installs": installs, "problems": []}


def status_table(status: dict[str, Any]) -> str:
    """A human-readable summary of a status dict (running or offline)."""
    lines = [f"agent: {'running' if status.get('running') else 'not running'}"
             + (f", profile {status['profile']}" if status.get("profile") else "")]
    lines.append(f"{'MODEL':16} {'VERSION':>7}  {'STATE':10} {'REQUESTS':>8} {'ERRORS':>6} "
                 f"{'P50 MS':>7} {'P99 MS':>7}  BACKEND")
    for m in status["models"]:
        def ms(key: str, model: dict[str, Any] = m) -> str:
            value = model.get(key)
            return "-" if value is None else f"{value:.3f}"

        lines.append(f"{m['name']:16} {m.get('version') or '-':>7}  {m['state']:10} "
                     f"{m.get('requests', '-'):>8} {m.get('errors', '-'):>6} {ms('p50_ms'):>7} "
                     f"{ms('p99_ms'):>7}  {m.get('backend') or m.get('format', '')}"
                     + (f" on {m['device']}" if m.get("device") else "")
                     + (f"  (fallback: {m['fallback']})" if m.get("fallback") else ""))
    if not status["models"]:
        lines.append("(no models)")
    if status["installs"]:
        lines.append("\nrecent installs:")
        for r in status["installs"]:
            outcome = f"  {r['reason']}: {r['detail']}" if r["reason"] else ""
            lines.append(f"  {r['id']}  {r['model'] or '?'} v{r['version'] or '?'}  "
                         f"{r['state']}{outcome}")
    lines += [f"problem: {p}" for p in status.get("problems", [])]
    return "\n".join(lines)
