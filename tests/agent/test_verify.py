"""``edge-agent verify`` with the device's persisted trusted state."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.cli import main
from agent.errors import TrustStoreError
from agent.trust_store import TrustStore
from bundle.trust import TrustedState, verify_bundle
from tests.bundle.repo import Repo, spec


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def repo() -> Repo:
    return Repo()


@pytest.fixture
def device(tmp_path: Path, repo: Repo) -> tuple[Path, Path]:
    """(state dir, pinned root.json)."""
    root = tmp_path / "root.json"
    root.write_bytes(repo.root)
    return tmp_path / "state", root


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_first_use_needs_a_pinned_root(tmp_path: Path, repo: Repo,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _write(tmp_path, "b.efb", repo.build())
    code, _, err = _run(capsys, "verify", bundle, "--state-dir", tmp_path / "state")
    assert code == 1
    assert "pass --root ROOT.json" in err


def test_verify_changes_nothing_on_the_device(tmp_path: Path, repo: Repo,
                                             device: tuple[Path, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    state_dir, root = device
    bundle = _write(tmp_path, "b.efb", repo.build())
    code, out, err = _run(capsys, "verify", bundle, "--state-dir", state_dir, "--root", root,
                          "--profile", "x86-avx2")
    assert code == 0, err
    assert out.startswith("OK digits v1")
    assert not TrustStore(state_dir / "trust").exists()  # --root is not pinned by a check
    # Against a pinned state, verifying newer metadata leaves the pinned state as it was:
    # an older bundle still installs afterwards.
    store = TrustStore(state_dir / "trust")
    store.save(TrustedState(root=repo.root))
    before = store.path.read_bytes()
    newer = _write(tmp_path, "new.efb", repo.build(spec(version=5)))
    assert _run(capsys, "verify", newer, "--state-dir", state_dir, "--json")[0] == 0
    assert store.path.read_bytes() == before


@pytest.mark.parametrize(("second", "reason"), [
    ("older_metadata", "FreezeError"),
    ("lower_version", "RollbackError"),
    ("other_profile", "WrongProfileError"),
])
def test_rejections_name_the_reason(tmp_path: Path, repo: Repo, device: tuple[Path, Path],
                                    capsys: pytest.CaptureFixture[str], *, second: str,
                                    reason: str) -> None:
    state_dir, root = device
    old = repo.build(spec(version=1))
    new = repo.build(spec(version=5))
    # What the installer keeps after installing v5: its verified metadata, the version.
    verified = verify_bundle(new, TrustedState(root=root.read_bytes()),
                             now=datetime.now(timezone.utc))
    store = TrustStore(state_dir / "trust")
    store.save(verified.trusted.with_installed("digits", 5, "0" * 64))
    bundle = {"older_metadata": old,
              "lower_version": repo.build(spec(version=4)),
              "other_profile": repo.build(spec(version=6, profiles=("rpi4",)))}[second]
    code, out, err = _run(capsys, "verify", _write(tmp_path, "b.efb", bundle), "--state-dir",
                          state_dir, "--profile", "x86-avx2")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"edge-agent: error: {reason}: ")


def test_a_bad_root_is_refused_before_any_bundle_is_read(tmp_path: Path, repo: Repo,
                                                       device: tuple[Path, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    state_dir, root = device
    bad_root = _write(tmp_path, "bad.json", b"{}")
    bundle = _write(tmp_path, "b.efb", repo.build())
    code, _, err = _run(capsys, "verify", bundle, "--state-dir", state_dir, "--root", bad_root)
    assert code == 1
    assert f"{bad_root} is not TUF metadata" in err  # checked before any bundle is read
    assert not TrustStore(state_dir / "trust").exists()
    assert _run(capsys, "verify", bundle, "--state-dir", state_dir, "--root", root)[0] == 0
    assert not TrustStore(state_dir / "trust").exists()


def test_trust_store_round_trip_and_corruption(tmp_path: Path, repo: Repo) -> None:
    store = TrustStore(tmp_path / "trust")
    state = TrustedState(root=repo.root, timestamp=b"ts").with_installed("m", 3, "ab" * 32)
    store.save(state)
    assert store.load() == state
    assert not list(store.directory.glob(".trust.json.*"))  # no temp file left behind
    raw = json.loads(store.path.read_text())
    raw["root"] = "!!"
    store.path.write_text(json.dumps(raw))
    with pytest.raises(TrustStoreError, match="corrupt"):
        store.load()
    store.path.write_text("{")
    with pytest.raises(TrustStoreError, match="unreadable"):
        store.load()
