"""Suite-wide settings."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Hypothesis's default deadline (200 ms per example) and its too_slow health check time the
# machine, not the code: on a loaded CI machine, with a test of pytest-xdist's beside it on
# each core, they failed examples that pass. Speed is measured in benchmarks/. Tests that
# bound a parser's time on hostile input set their own deadline, which this leaves alone.
settings.register_profile("edgefleet", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("edgefleet")
