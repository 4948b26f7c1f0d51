"""Helpers of the registry tests: a settable clock, enrollments, bundles, reports."""

from __future__ import annotations

from fleet_server.registry import Registry
from protocol.install_states import InstallState
from protocol.messages import ModelReport, Reported, encode

FINGERPRINT = "ab" * 32
DAY = 86400.0


class Clock:
    """A settable clock: the registry's only source of time in these tests."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def enroll(reg: Registry, device_id: str, group: str = "lab",
           tags: tuple[str, ...] = ()) -> None:
    reg.upsert_device(device_id, group=group, profile="x86_64-avx2",
                      cert_fingerprint=FINGERPRINT, tags=tags)


def bundle(reg: Registry, name: str = "digits", version: int = 1) -> str:
    """Store a small bundle; returns its sha256."""
    return reg.put_bundle(f"{name} v{version}".encode(), name, version).sha256


def kinds(reg: Registry, device: str | None = None) -> list[str]:
    return [e.kind for e in reg.events(device=device)]


def report(version: int, sha: str | None = None,
           state: InstallState = InstallState.COMMITTED, model: str = "digits") -> bytes:
    """A device's ``reported`` message: it runs ``model`` at ``version``."""
    return encode(Reported(profile="x86_64-avx2", agent_version="0.1.0",
                           models={model: ModelReport(version, sha, state.value)}, at=1.0))
