"""Sign the compressor's output into a bundle with the real `fleet` commands, and verify it."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from bundle.trust import TrustedState, VerifiedBundle, verify_bundle
from fleet_server.cli import main as fleet


def sign_and_verify(artifacts: Path, workdir: Path, profile: str) -> VerifiedBundle:
    """``fleet keys init`` + ``fleet bundle build --artifacts``, then verify for ``profile``."""
    keys, bundle = workdir / "keys", workdir / "b.efb"
    assert fleet(["keys", "init", "--dir", str(keys)]) == 0
    assert fleet(["bundle", "build", "--name", "digits", "--version", "1", "--artifacts",
                  str(artifacts), "--keys", str(keys), "--out", str(bundle)]) == 0
    return verify_bundle(bundle.read_bytes(), TrustedState(root=(keys / "root.json").read_bytes()),
                         now=datetime.now(timezone.utc), profile=profile)
