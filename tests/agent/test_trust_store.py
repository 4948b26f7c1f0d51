"""``--root ROOT.json`` against the device's trusted state (agent/trust_store.py).

Regression for issue 10, item 7: ``edge-agent serve --root garbage`` pinned the garbage,
and a later, correct ``--root`` was ignored with a log line at INFO while every install was
rejected.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from agent.errors import TrustStoreError
from agent.trust_store import TrustStore, resolve_root
from bundle.trust import TrustedState
from tests.bundle.repo import Repo


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _refused(store: TrustStore, root: Path) -> str:
    with pytest.raises(TrustStoreError) as refused:
        resolve_root(store, root)
    return str(refused.value)


def test_an_empty_store_takes_a_valid_root_unsaved(tmp_path: Path) -> None:
    repo = Repo()
    store = TrustStore(tmp_path / "trust")
    assert resolve_root(store, _file(tmp_path, "root.json", repo.root)) == TrustedState(
        root=repo.root)
    assert not store.exists()  # the caller decides when to pin
    assert resolve_root(store, None) is None


def test_what_is_not_a_root_is_refused_and_nothing_is_pinned(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust")
    garbage = _file(tmp_path, "garbage.json", b"garbage\n")
    assert f"{garbage} is not TUF metadata" in _refused(store, garbage)
    md = Metadata.from_bytes(Repo().root)
    md.signed.version = 7  # changed after signing
    forged = _file(tmp_path, "forged.json", md.to_bytes())
    assert f"{forged} is not signed by its own root keys (0 valid of threshold 1)" in \
        _refused(store, forged)
    assert "cannot read root metadata" in _refused(store, tmp_path / "missing.json")
    big = _file(tmp_path, "big.json", b" " * (2 << 20))
    assert "it is not a root.json" in _refused(store, big)
    assert not store.exists()


def test_the_pinned_root_is_kept_when_root_is_it_or_older(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = Repo()
    v1 = _file(tmp_path, "v1.json", repo.root)
    repo.rotate("root")
    store = TrustStore(tmp_path / "trust")
    store.save(TrustedState(root=repo.root_chain[-1]))
    with caplog.at_level(logging.INFO, "agent.trust_store"):
        assert resolve_root(store, v1) == store.load()  # rotated since: fine
    assert "pins root v2, newer than" in caplog.text
    assert resolve_root(store, _file(tmp_path, "v2.json", repo.root_chain[-1])) == store.load()


def test_another_root_is_refused_saying_how_to_re_pin(tmp_path: Path) -> None:
    pinned, other = Repo(), Repo()
    store = TrustStore(tmp_path / "trust")
    store.save(TrustedState(root=pinned.root))
    given = _file(tmp_path, "other.json", other.root)
    message = _refused(store, given)
    assert message.startswith(f"{store.path} pins another root (v1, keys ")
    assert f"than {given} (v1, keys " in message
    assert f"move {store.directory} away" in message
    assert store.load().root == pinned.root


def test_the_next_root_of_the_same_fleet_comes_with_the_next_bundle(tmp_path: Path) -> None:
    repo = Repo()
    store = TrustStore(tmp_path / "trust")
    store.save(TrustedState(root=repo.root))
    repo.rotate("root")
    given = _file(tmp_path, "v2.json", repo.root_chain[-1])
    assert _refused(store, given) == (
        f"{given} is the next root (v2) of the fleet {store.path} trusts (v1); the device "
        "takes it from the next bundle, signed by the fleet: leave out --root")
