"""Shared agent fixtures: a signing repository, a device state dir trusting it, a profile."""

from __future__ import annotations

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
