"""Which events announce an install record's transitions (pure); the announcing itself,
through a real outbox and broker, is tested with the fleet link (test_fleet_link.py)."""

from __future__ import annotations

from agent.install_announcements import install_events
from agent.install_state import InstallRecord, InstallState


def test_install_events_cover_the_history_after_what_was_announced() -> None:
    failed = InstallRecord("a1", "/b.efb", InstallState.FAILED, model="m", version=2,
                           reason="rejected:BadSignature", history=(
                               ("idle", 10.0), ("downloading", 11.0), ("verifying", 12.0),
                               ("failed", 13.0)))
    assert install_events(failed, 0) == install_events(failed, 1)  # idle is not announced
    assert [(kind, at, detail["reason"]) for kind, at, detail in install_events(failed, 2)] == [
        ("install.verifying", 12.0, None), ("install.failed", 13.0, "rejected:BadSignature")]
    assert install_events(failed, 4) == []
    long = InstallRecord("a2", "/b.efb", InstallState.FAILED, reason="load_failed",
                         detail="x" * 100_000, history=(("idle", 1.0), ("failed", 2.0)))
    [(_, _, detail)] = install_events(long, 0)
    assert len(detail["detail"]) < 2100  # an event fits the server's limit whatever it says
