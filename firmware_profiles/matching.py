"""Match a host against profiles: which device kinds it can act as, best first. Pure.

A profile fits when the host has its CPU architecture, every required ISA feature (an entry
``"a|b"`` needs either), at least its model memory budget, and, for a profile that
``requires_accelerator``, at least one of its accelerators with the runtime provider that
accelerator needs. Among fitting profiles the more specific one wins: each available
accelerator scores 100 and each required ISA feature 1, so an AVX-512 VNNI gateway is an
``x86-64-vnni`` (3 features) before an ``x86-64-avx2`` (2), and a board whose Edge TPU
delegate loads is a ``coral-edgetpu`` before a plain ARM profile. Ties break by name, so the
result never depends on file order.
"""

from __future__ import annotations

from dataclasses import dataclass

from .devices import device_present
from .host import HostCapabilities
from .model import Accelerator, Profile

__all__ = ["ProfileMatch", "accelerator_available", "best_profile", "match_profiles"]


@dataclass(frozen=True)
class ProfileMatch:
    """How one profile relates to a host: whether it fits, its rank score, and why."""

    profile: Profile
    fits: bool
    score: int
    reasons: tuple[str, ...]  # what fits, or what is missing
    available_accelerators: tuple[str, ...]


def accelerator_available(accelerator: Accelerator, host: HostCapabilities) -> bool:
    """Whether the host offers the runtime provider ``accelerator`` needs and, where the
    provider chooses among devices, the device itself (an OpenVINO install is no NPU)."""
    if accelerator.runtime == "onnxruntime":
        return (accelerator.provider in host.onnxruntime_providers
                and device_present(accelerator, host.devices)[0])
    return accelerator.provider in host.litert_delegates


def _match(profile: Profile, host: HostCapabilities) -> ProfileMatch:
    missing: list[str] = []
    if profile.cpu.arch != host.arch:
        missing.append(f"needs a {profile.cpu.arch} CPU, host is {host.arch}")
    for feature in profile.cpu.features:
        if not set(feature.split("|")) & host.features:
            missing.append(f"needs ISA feature {feature.replace('|', ' or ')}")
    if host.memory_mb < profile.model_budget_mb:
        missing.append(f"budgets {profile.model_budget_mb} MB for models, host has "
                       f"{host.memory_mb} MB in all")
    available = tuple(a.name for a in profile.accelerators if accelerator_available(a, host))
    if profile.requires_accelerator and not available:
        wanted = ", ".join(f"{a.name} ({a.runtime} {a.provider})" for a in profile.accelerators)
        missing.append(f"needs one of its accelerators: {wanted}")
    if missing:
        return ProfileMatch(profile, False, 0, tuple(missing), available)
    reasons = [f"{profile.cpu.arch} with {', '.join(profile.cpu.features) or 'no extra ISA'}"]
    reasons += [f"accelerator {name} available" for name in available]
    score = 100 * len(available) + len(profile.cpu.features)
    return ProfileMatch(profile, True, score, tuple(reasons), available)


def match_profiles(host: HostCapabilities, profiles: list[Profile]) -> list[ProfileMatch]:
    """Every profile's match against ``host``: fitting ones first, best first, then by name."""
    matches = [_match(profile, host) for profile in profiles]
    return sorted(matches, key=lambda m: (not m.fits, -m.score, m.profile.name))


def best_profile(host: HostCapabilities, profiles: list[Profile]) -> Profile | None:
    """The best-fitting profile for ``host``, or None when no profile fits."""
    ranked = match_profiles(host, profiles)
    return ranked[0].profile if ranked and ranked[0].fits else None
