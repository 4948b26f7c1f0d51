"""Shared agent fixtures: a signing repository, a device state dir trusting it, a profile."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.probation import ProbationPolicy
from agent.runtime import Runtime
from agent.trust_store import TrustStore
from bundle.trust import TrustedState
from firmware_profiles import load_profiles
from firmware_profiles.model import Profile
from tests.agent.bundles import PROFILE, digits_spec, write_bundle
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
def serving_v1(state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile) -> Runtime:
    """A runtime serving digits v1, committed (probation of 0 s)."""
    runtime = Runtime(state_dir, x86, policy=ProbationPolicy(window_s=0.0))
    runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
    runtime.check_probation()
    return runtime


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


def fill_disk(disk: Path, leave: int) -> Path:
    """Fill the file system of ``disk`` until at most ``leave`` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):  # full: as intended
        f.write(bytes(max(0, shutil.disk_usage(disk).free - leave)))
    return filler
