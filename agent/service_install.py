"""``edge-agent install-service`` / ``uninstall-service``: the unit file on disk and systemctl.

The unit's text comes from :mod:`.systemd_unit` (pure); this module decides nothing but
where it goes, and runs ``systemctl`` when systemd is the init system here. Without
systemd (a container, a chroot) the unit is still written and the commands that would
start it are printed, so an image can be prepared offline.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.atomic import write_atomic
from firmware_profiles.model import Profile

from .config_load import load_config
from .errors import AgentError
from .systemd_unit import UnitSpec, memory_max_mb, render_unit

__all__ = ["DEFAULT_UNIT_DIR", "ServiceRequest", "install_service", "uninstall_service"]

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
_SYSTEMD_RUNNING = Path("/run/systemd/system")
_UNIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._-]{0,63}")


@dataclass(frozen=True)
class ServiceRequest:
    """What ``install-service`` was asked for."""

    config: Path
    name: str = "edge-agent"
    user: str | None = None  # None: DynamicUser
    unit_dir: Path = DEFAULT_UNIT_DIR
    start: bool = True


def unit_for(request: ServiceRequest, profile: Profile | None) -> str:
    """The unit text for ``request``; AgentError for a config or user that cannot work."""
    _check_name(request.name)
    config_path = request.config.absolute()
    config = load_config(config_path)
    state_dir = config.state_dir.absolute()  # not resolved: a DynamicUser's is a symlink
    if request.user is not None:
        _check_owner(request.user, state_dir)
    spec = UnitSpec(
        command=(sys.executable, "-m", "agent", "-v", "run", "--config", str(config_path)),
        state_dir=state_dir, user=request.user,
        memory_max_mb=None if profile is None else memory_max_mb(profile.ram_mb,
                                                                 profile.model_budget_mb),
        unix_socket=config.api.unix_socket,
        devices=profile is not None and bool(profile.accelerators))
    try:
        return render_unit(spec)
    except ValueError as exc:
        raise AgentError(str(exc)) from exc


def install_service(request: ServiceRequest, profile: Profile | None) -> str:
    """Write the unit and, under systemd, enable and start it; what was done, in a line."""
    text = unit_for(request, profile)
    path = request.unit_dir / f"{request.name}.service"
    try:
        write_atomic(path, text.encode(), mode=0o644)
    except OSError as exc:
        raise AgentError(f"cannot write {path} ({exc.strerror}); run as root or pass "
                         "--unit-dir") from exc
    start = f"systemctl daemon-reload && systemctl enable --now {path.name}"
    if not request.start:
        return f"wrote {path}; start it with: {start}"
    if not _systemd_here():
        return (f"wrote {path}; systemd is not the init system here, so nothing was started "
                f"(on the device: {start})")
    unit = path.name
    _systemctl("daemon-reload")
    _systemctl("enable", "--now", unit)
    return f"installed and started {unit} ({path}); follow it with: journalctl -u {unit} -f"


def _check_name(name: str) -> None:
    """A unit name systemd accepts, and never a path: ``--name ../x`` must not write outside
    the unit directory."""
    if not _UNIT_NAME.fullmatch(name):
        raise AgentError(f"--name {name[:64]!r} is not a unit name: use 1 to 64 letters, "
                         "digits, '-', '_', '.' or '@', starting with a letter or digit")


def uninstall_service(unit_dir: Path, name: str, state_dir: Path) -> str:
    """Stop and disable the unit (under systemd) and remove its file; the state directory
    (models, keys, trust) is left, and the message says how to delete it."""
    _check_name(name)
    path = unit_dir / f"{name}.service"
    if not path.exists():
        raise AgentError(f"no unit {path}; pass the --name or --unit-dir it was installed "
                         "with")
    if _systemd_here():
        _systemctl("disable", "--now", path.name)
    try:
        path.unlink()
    except OSError as exc:
        raise AgentError(f"cannot remove {path} ({exc.strerror}); run as root") from exc
    if _systemd_here():
        _systemctl("daemon-reload")
    private = (f" and /var/lib/private/{state_dir.relative_to('/var/lib')} (a dynamic user's)"
               if state_dir.is_relative_to("/var/lib") else "")
    return (f"removed {path}; the state directory {state_dir} (models, keys, trust) is kept: "
            f"delete it{private} to forget this device")


def _check_owner(user: str, state_dir: Path) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise AgentError(f"no user {user!r} on this system; create it (useradd --system "
                         f"--home {state_dir} {user}) or leave out --user for a dynamic "
                         "user") from None
    try:
        owner = state_dir.stat().st_uid
    except FileNotFoundError:
        raise AgentError(f"state directory {state_dir} does not exist; create it owned by "
                         f"{user} (install -d -o {user} -m 700 {state_dir})") from None
    if owner != entry.pw_uid:
        raise AgentError(f"state directory {state_dir} is not owned by {user}; "
                         f"chown -R {user}: {state_dir}")


def _systemd_here() -> bool:
    """Whether systemd is this system's init (sd_booted(3)) and systemctl exists."""
    return _SYSTEMD_RUNNING.is_dir() and shutil.which("systemctl") is not None


def _systemctl(*args: str) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True,
                            check=False, env={**os.environ, "SYSTEMD_PAGER": ""})
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise AgentError(f"systemctl {' '.join(args)} failed ({reason})")
