"""What the fleet link fetches next (pure): no broker needed."""

from __future__ import annotations

from agent.fetch_plan import next_fetch, wants_delta
from protocol.messages import DeltaOffer, Desired, DesiredModel


def test_next_fetch_decides_without_a_broker() -> None:
    a, b = ("a" * 64, "b" * 64)
    desired = Desired({"zeta": DesiredModel(2, b, 10), "alpha": DesiredModel(1, a, 10)}, 0.0)
    assert next_fetch(None, {}, {}) is None
    assert next_fetch(desired, {}, {}) == ("alpha", desired.models["alpha"])  # name order
    assert next_fetch(desired, {"alpha": a}, {}) == ("zeta", desired.models["zeta"])
    assert next_fetch(desired, {"alpha": a, "zeta": b}, {}) is None  # in line
    assert next_fetch(desired, {"alpha": a}, {"zeta": b}) is None  # failed: not again
    newer = Desired({"zeta": DesiredModel(3, "c" * 64, 10)}, 1.0)
    assert next_fetch(newer, {}, {"zeta": b}) == ("zeta", newer.models["zeta"])


def test_the_delta_is_fetched_only_from_an_intact_base_and_never_after_it_failed() -> None:
    offer = DeltaOffer("d" * 64, 10, 1)
    want = DesiredModel(2, "f" * 64, 100, delta=offer)
    intact = {1: True}
    assert wants_delta(want, set(), lambda v: intact.get(v, False))
    assert not wants_delta(want, {"d" * 64}, lambda v: True)  # it failed here: the full
    assert not wants_delta(want, set(), lambda v: False)  # the base is damaged or gone
    assert not wants_delta(DesiredModel(2, "f" * 64, 100), set(), lambda v: True)
