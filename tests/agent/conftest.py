"""Shared agent fixtures: a signing repository, a device state dir trusting it, a profile."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.trust_store import TrustStore
from bundle.trust import TrustedState
from firmware_profiles import load_profiles
from firmware_profiles.model import Profile
from tests.agent.bundles import PROFILE
from tests.bundle.repo import Repo


@pytest.fixture
def repo() -> Repo:
    return Repo()


@pytest.fixture
def state_dir(tmp_path: Path, repo: Repo) -> Path:
    """A device state directory that pins ``repo``'s root."""
    state = tmp_path / "state"
    TrustStore(state / "trust").save(TrustedState(root=repo.root))
    return state


def profile(name: str = PROFILE) -> Profile:
    return {p.name: p for p in load_profiles()}[name]


@pytest.fixture
def x86() -> Profile:
    return profile()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MB tmpfs: a disk that really fills up (the tests run as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_state_dir(small_disk: Path, repo: Repo) -> Path:
    """A device state directory on ``small_disk`` that pins ``repo``'s root."""
    state = small_disk / "state"
    TrustStore(state / "trust").save(TrustedState(root=repo.root))
    return state


def fill_disk(disk: Path, leave: int) -> Path:
    """Fill the file system of ``disk`` until at most ``leave`` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):  # full: as intended
        f.write(bytes(max(0, shutil.disk_usage(disk).free - leave)))
    return filler
