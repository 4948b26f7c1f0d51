"""The agent's systemd unit, rendered from what the agent's config says (pure: text out).

The unit runs ``edge-agent -v run --config FILE`` as ``Type=notify`` (the agent sends
``READY=1`` once its API serves and pings the watchdog while the API answers:
:mod:`.sd_notify`), restarts it on failure, and confines it:

- its own identity: ``DynamicUser=yes`` with the state directory as ``StateDirectory=``
  (under /var/lib; systemd creates it and hands it to the dynamic user), or a named
  ``User=`` with ``ReadWritePaths=`` for a state directory elsewhere;
- the file system read-only but for the state directory (``ProtectSystem=strict``), a private
  /tmp, no home directories unless the agent's own files are there;
- no privileges to gain or hold (``NoNewPrivileges``, an empty capability set), no kernel
  tunables, modules or cgroups, only Unix and IP sockets;
- memory bounded from the firmware profile (:func:`memory_max_mb`);
- devices hidden (``PrivateDevices``) unless the profile names an accelerator, which needs
  its device node.

Logs go to the journal (stdout/stderr); the command line tags each line with its syslog
priority when systemd says the output is the journal (common/cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["UnitSpec", "memory_max_mb", "render_unit"]

_STATE_ROOT = PurePosixPath("/var/lib")
_RUNTIME_ROOT = PurePosixPath("/run")
#: What the agent itself takes beside its models (measured: docs/benchmarks.md, RSS).
_AGENT_BASE_MB = 256


#: Directories PrivateTmp=yes hides from the service.
_PRIVATE_TMP = (PurePosixPath("/tmp"), PurePosixPath("/var/tmp"))


def memory_max_mb(ram_mb: int, model_budget_mb: int) -> int:
    """``MemoryMax`` for a device: the agent itself plus twice the model budget (during a
    hot-swap the old and the new model are loaded together), never more than its RAM."""
    return min(ram_mb, _AGENT_BASE_MB + 2 * model_budget_mb)


@dataclass(frozen=True)
class UnitSpec:
    """What the unit runs and how it is confined."""

    command: tuple[str, ...]  # absolute executable first
    state_dir: Path
    user: str | None = None  # None: DynamicUser (the state directory must be under /var/lib)
    memory_max_mb: int | None = None  # None: unbounded (no profile)
    unix_socket: Path | None = None
    devices: bool = False  # the profile uses an accelerator: keep /dev
    watchdog_s: int = 30
    description: str = "edgefleet agent: serves models, follows the fleet"


def render_unit(spec: UnitSpec) -> str:
    """The unit file's text. Raises ValueError for a spec systemd cannot express."""
    state = PurePosixPath(spec.state_dir)
    if not state.is_absolute():
        raise ValueError(f"state directory {spec.state_dir} must be an absolute path")
    if any(state.is_relative_to(tmp) for tmp in _PRIVATE_TMP):
        raise ValueError(f"state directory {state} is under a temporary directory, which the "
                         "unit replaces with a private empty one (PrivateTmp=yes): the "
                         "agent would not find it; use a state directory under /var/lib")
    in_var_lib = state.is_relative_to(_STATE_ROOT) and state != _STATE_ROOT
    if spec.user is None and not in_var_lib:
        raise ValueError(f"state directory {state} is not under /var/lib, so systemd cannot "
                         "manage it for a dynamic user; pass --user NAME (an existing user "
                         "that owns it) or use a state directory under /var/lib")
    identity = ["DynamicUser=yes"] if spec.user is None else [f"User={spec.user}",
                                                             f"Group={spec.user}"]
    paths = []
    if in_var_lib:
        paths += [f"StateDirectory={state.relative_to(_STATE_ROOT)}", "StateDirectoryMode=0700"]
    else:
        paths.append(f"ReadWritePaths={_quote_path(str(state))}")
    if spec.unix_socket is not None:
        socket_dir = PurePosixPath(spec.unix_socket).parent
        if socket_dir.is_relative_to(_RUNTIME_ROOT) and socket_dir != _RUNTIME_ROOT:
            paths += [f"RuntimeDirectory={socket_dir.relative_to(_RUNTIME_ROOT)}",
                      "RuntimeDirectoryMode=0750"]
        elif not PurePosixPath(socket_dir).is_relative_to(state):
            paths.append(f"ReadWritePaths={_quote_path(str(socket_dir))}")
    executable = PurePosixPath(spec.command[0])
    home = executable.is_relative_to("/home") or executable.is_relative_to("/root")
    memory = ([f"MemoryMax={spec.memory_max_mb}M"] if spec.memory_max_mb is not None
              else ["# MemoryMax: no firmware profile to size it from"])
    devices = (["# PrivateDevices=no: the profile's accelerator needs its device node"]
               if spec.devices else ["PrivateDevices=yes"])
    lines = [
        "# Written by `edge-agent install-service`; remove with `edge-agent "
        "uninstall-service`.",
        "[Unit]",
        f"Description={spec.description}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={' '.join(_quote(arg) for arg in spec.command)}",
        "Restart=on-failure",
        "RestartSec=5",
        f"WatchdogSec={spec.watchdog_s}",
        # Loading and self-testing the models precedes READY=1.
        "TimeoutStartSec=300",
        "TimeoutStopSec=30",
        "Environment=PYTHONUNBUFFERED=1",
        "SyslogIdentifier=edge-agent",
        *identity,
        *paths,
        "UMask=0077",
        *memory,
        "ProtectSystem=strict",
        f"ProtectHome={'read-only' if home else 'yes'}",
        "PrivateTmp=yes",
        *devices,
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    """``text`` with systemd's specifiers (%) escaped; refuses what a unit line cannot hold."""
    if any(c in text for c in "\n\r\0"):
        raise ValueError(f"{text!r} contains a line break or NUL, which a unit file cannot "
                         "express; use another path")
    return text.replace("%", "%%")


def _quote_path(path: str) -> str:
    """A path in a space-separated list setting (ReadWritePaths=): quoted if need be."""
    text = _escape(path)
    if any(c in text for c in " \t\"'\\;"):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _quote(arg: str) -> str:
    """One ExecStart argument: as a path, with variables ($) escaped too."""
    return _quote_path(arg.replace("$", "$$"))
