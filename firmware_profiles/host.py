"""Probe the current host: CPU architecture and ISA features, memory, runtimes, delegates,
and the devices the execution providers reach (:mod:`.devices`).

:class:`HostCapabilities` is a plain record so the matcher can be tested with hand-built
hosts; :func:`probe_host` is the thin adapter that reads this machine.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .devices import probe_devices
from .model import FEATURES, Profile
from .runtimes import delegate_loadable, import_litert, is_android, onnxruntime_providers

__all__ = ["HostCapabilities", "normalise_arch", "parse_cpu_features", "probe_host"]

_ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64",
                 "aarch64": "aarch64", "armv7l": "armv7", "armv7": "armv7"}
# ARM kernels name features differently from the canonical names profiles use.
_ARM_FEATURES = {"asimd": "neon", "neon": "neon", "asimddp": "dotprod", "asimdhp": "fp16",
                 "i8mm": "i8mm", "bf16": "bf16", "sve": "sve"}


@dataclass(frozen=True)
class HostCapabilities:
    """What this host can run, as far as probing can tell."""

    arch: str
    features: frozenset[str]
    memory_mb: int
    onnxruntime_providers: tuple[str, ...]
    litert_runtime: str | None  # the distribution that provided LiteRT, if any
    litert_delegates: tuple[str, ...]  # loadable delegate names (xnnpack is built in)
    #: Devices each device-choosing execution provider reaches (devices.probe_devices);
    #: a provider missing here was not probed.
    devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def normalise_arch(machine: str) -> str:
    """Map ``platform.machine()`` spellings onto the profile schema's arch names."""
    return _ARCH_ALIASES.get(machine.lower(), machine.lower())


def parse_cpu_features(cpuinfo: str) -> frozenset[str]:
    """Canonical ISA feature names from the text of Linux's /proc/cpuinfo (x86 or ARM)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "flags":
            return frozenset(flag for flag in value.split() if flag in FEATURES)
        if key == "features":
            return frozenset(_ARM_FEATURES[f] for f in value.split() if f in _ARM_FEATURES)
    return frozenset()


def probe_host(profiles: list[Profile]) -> HostCapabilities:
    """Probe this machine; ``profiles`` name the LiteRT delegate libraries worth trying."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""  # not Linux: features unknown, so only feature-free profiles match
    litert = import_litert()
    delegates: list[str] = []
    if litert is not None:
        delegates.append("xnnpack")  # LiteRT's default CPU delegate, always compiled in
        if is_android():
            delegates.append("nnapi")
        libraries = {a.provider: a.library for p in profiles for a in p.accelerators
                     if a.runtime == "litert" and a.library}
        delegates += sorted(name for name, library in libraries.items()
                            if delegate_loadable(litert, library))
    providers = onnxruntime_providers()
    return HostCapabilities(
        arch=normalise_arch(platform.machine()),
        features=parse_cpu_features(cpuinfo),
        memory_mb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20,
        onnxruntime_providers=providers,
        litert_runtime=litert.distribution if litert else None,
        litert_delegates=tuple(delegates),
        devices=probe_devices(providers),
    )
