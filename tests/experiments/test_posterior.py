"""The fleet's merged posterior counts every observation once, whatever the network does."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.errors import InvalidExperimentData, OutOfOrderDelta
from experiments.posterior import (
    Delta,
    DeviceLearner,
    FleetPosterior,
    apply_delta,
    close_interval,
    decode_delta,
    encode_delta,
    local_posterior,
    observe,
    push_for,
    receive,
    take_resend,
    total,
)
from stats.bandit import ArmStats

ARMS = ("a", "b", "c")
DEVICES = ("d0", "d1", "d2")

# One step of a fleet: a device observes a reward, closes an interval (the delta goes on the
# uplink), the uplink delivers, duplicates or loses a delta (picked by index, so out of
# order), the device resends what is pending, the server pushes to a device, or a push is
# delivered (possibly an old one, possibly twice).
_step = st.one_of(
    st.tuples(st.just("observe"), st.sampled_from(DEVICES), st.sampled_from(ARMS),
              st.integers(0, 3)),
    st.tuples(st.just("close"), st.sampled_from(DEVICES)),
    st.tuples(st.just("deliver"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("lose"), st.integers(0, 50)),
    st.tuples(st.just("resend"), st.sampled_from(DEVICES)),
    st.tuples(st.just("push"), st.sampled_from(DEVICES)),
    st.tuples(st.just("receive"), st.integers(0, 50), st.booleans()),
)


class Fleet:
    """Three learners, one server, and lossy, reordering, duplicating links between them."""

    def __init__(self) -> None:
        self.learners = {d: DeviceLearner.start("exp", ARMS) for d in DEVICES}
        self.server = FleetPosterior.start("exp", ARMS)
        self.uplink: list[Delta] = []
        self.downlink: list[tuple[str, object]] = []
        self.observed: dict[str, ArmStats] = {}     # every reward any device saw
        self.closed: dict[tuple[str, int], Delta] = {}  # every delta ever made

    def run(self, step: tuple[Any, ...]) -> None:
        kind = step[0]
        if kind == "observe":
            _, device, arm, reward = step
            self.learners[device] = observe(self.learners[device], arm, reward)
            self.observed = total(self.observed, {arm: ArmStats(1, reward, reward * reward)})
        elif kind == "close":
            self.learners[step[1]], delta = close_interval(self.learners[step[1]], step[1])
            if delta is not None:
                self.closed[(delta.device, delta.seq)] = delta
                self.uplink.append(delta)
        elif kind == "deliver" and self.uplink:
            index = step[1] % len(self.uplink)
            delta = self.uplink[index] if step[2] else self.uplink.pop(index)
            # A refused gap changes nothing; the device resends from it.
            with contextlib.suppress(OutOfOrderDelta):
                self.server, _ = apply_delta(self.server, delta)
        elif kind == "lose" and self.uplink:
            self.uplink.pop(step[1] % len(self.uplink))
        elif kind == "resend":
            self.uplink.extend(self.learners[step[1]].pending)
        elif kind == "push":
            self.downlink.append((step[1], push_for(self.server, step[1])))
        elif kind == "receive" and self.downlink:
            index = step[1] % len(self.downlink)
            device, merged = self.downlink[index] if step[2] else self.downlink.pop(index)
            self.learners[device] = receive(self.learners[device], merged)  # type: ignore[arg-type]

    def check(self) -> None:
        # The server holds exactly the deltas it says it applied: nothing twice, nothing else.
        applied = [d.arms for (device, seq), d in self.closed.items()
                   if seq <= self.server.applied.get(device, 0)]
        assert _counts(self.server.arms) == _counts(total({a: ArmStats() for a in ARMS},
                                                          *applied))
        for device, learner in self.learners.items():
            mine = [d.arms for (dev, _), d in self.closed.items() if dev == device]
            own = _counts(total(*mine, learner.current))
            seen = _counts(local_posterior(learner))
            everything = _counts(self.observed)
            for arm in ARMS:
                # Never less than what this device saw itself, never more than the fleet saw.
                assert own.get(arm, (0, 0))[0] <= seen.get(arm, (0, 0))[0] \
                    <= everything.get(arm, (0, 0))[0]

    def settle(self) -> None:
        """Reconnect everyone: resend in order, apply, push the latest to every device."""
        for device in DEVICES:
            self.run(("close", device))
            for delta in self.learners[device].pending:
                self.server, _ = apply_delta(self.server, delta)
        for device in DEVICES:
            self.learners[device] = receive(self.learners[device],
                                            push_for(self.server, device))


def _counts(arms: Mapping[str, ArmStats]) -> dict[str, tuple[int, float]]:
    return {a: (s.n, s.total) for a, s in arms.items() if s.n}


@settings(max_examples=300, deadline=None)
@given(st.lists(_step, max_size=80))
def test_every_observation_counted_once(steps: list[tuple[Any, ...]]) -> None:
    fleet = Fleet()
    for step in steps:
        fleet.run(step)
        fleet.check()
    fleet.settle()
    # After reconnection every device and the server hold the fleet's observations exactly.
    expected = _counts(fleet.observed)
    assert _counts(dict(fleet.server.arms)) == expected
    for learner in fleet.learners.values():
        assert _counts(local_posterior(learner)) == expected
        assert learner.pending == ()


def test_offline_device_keeps_learning_and_is_counted_once_on_return() -> None:
    server = FleetPosterior.start("exp", ("a", "b"))
    online, offline = (DeviceLearner.start("exp", ("a", "b")) for _ in range(2))
    for _ in range(5):
        offline = observe(offline, "a", 1.0)
    offline, delta = close_interval(offline, "off")
    offline = observe(offline, "b", 0.0)
    assert local_posterior(offline)["a"].n == 5
    assert local_posterior(offline)["b"].n == 1
    online = observe(online, "b", 1.0)
    online, other = close_interval(online, "on")
    assert delta is not None
    assert other is not None
    server, _ = apply_delta(server, other)
    server, _ = apply_delta(server, delta)
    server, again = apply_delta(server, delta)
    assert again == "duplicate"
    offline = receive(offline, push_for(server, "off"))
    assert local_posterior(offline)["a"] == ArmStats(5, 5.0, 5.0)
    assert local_posterior(offline)["b"] == ArmStats(2, 1.0, 1.0)  # the fleet's + its open one
    assert offline.pending == ()


def test_gap_is_refused_and_stale_push_ignored() -> None:
    server = FleetPosterior.start("exp", ("a",))
    later = Delta("exp", "d", 2, {"a": ArmStats(1, 1.0, 1.0)})
    with pytest.raises(OutOfOrderDelta, match="resend from 1") as info:
        apply_delta(server, later)
    assert info.value.transient
    learner = DeviceLearner.start("exp", ("a",))
    first = Delta("exp", "d", 1, {"a": ArmStats(2, 1.0, 1.0)})
    server, _ = apply_delta(server, first)
    newer = push_for(server, "d")
    learner = receive(learner, newer)
    older = push_for(FleetPosterior.start("exp", ("a",)), "d")
    assert receive(learner, older) == learner


def test_device_that_lost_its_state_continues_after_the_servers_number() -> None:
    server = FleetPosterior.start("exp", ("a",))
    for seq in (1, 2, 3):
        server, _ = apply_delta(server, Delta("exp", "d", seq, {"a": ArmStats(1, 0.0, 0.0)}))
    fresh = receive(DeviceLearner.start("exp", ("a",)), push_for(server, "d"))
    fresh, delta = close_interval(observe(fresh, "a", 1.0), "d")
    assert delta is not None
    assert delta.seq == 4
    assert apply_delta(server, delta)[1] == "applied"


def test_unknown_arm_is_refused() -> None:
    server = FleetPosterior.start("exp", ("a",))
    with pytest.raises(InvalidExperimentData, match="not in 'exp'"):
        apply_delta(server, Delta("exp", "d", 1, {"zz": ArmStats(1, 1.0, 1.0)}))
    with pytest.raises(InvalidExperimentData, match="arm 'zz'"):
        observe(DeviceLearner.start("exp", ("a",)), "zz", 1.0)


def test_wire_form_round_trips() -> None:
    delta = Delta("exp", "d", 7, {"a": ArmStats(3, 2.0, 2.0), "b": ArmStats(1, 0.5, 0.25)})
    assert decode_delta(encode_delta(delta), "d") == delta


@given(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers()),
                 st.dictionaries(st.sampled_from(["experiment", "seq", "arms"]),
                                 st.one_of(st.integers(-5, 5), st.text(max_size=3),
                                           st.floats(), st.dictionaries(
                                               st.text(max_size=3),
                                               st.lists(st.one_of(st.integers(-3, 3),
                                                                  st.floats()),
                                                        max_size=4), max_size=3)))))
def test_decode_refuses_garbage_with_its_own_error(obj: object) -> None:
    try:
        delta = decode_delta(obj, "d")
    except InvalidExperimentData:
        return
    assert delta.seq > 0
    assert all(s.n >= 0 for s in delta.arms.values())


def test_a_lost_delta_is_sent_again_after_a_push_and_the_gap_fills() -> None:
    """The uplink loses delta 1 (a sample the outbox dropped): the server refuses 2 and 3
    as a gap; the next push shows it lacks them, and take_resend sends them again, oldest
    first and a bounded number at a time, until the server holds everything."""
    learner = DeviceLearner.start("exp", ARMS)
    server = FleetPosterior.start("exp", ARMS)
    sent: list[Delta] = []
    for seq in range(1, 6):
        learner = observe(learner, "a", 1.0)
        learner, delta = close_interval(learner, "d0")
        assert delta is not None
        assert delta.seq == seq
        sent.append(delta)
    for delta in sent[1:]:  # delta 1 never arrives
        with pytest.raises(OutOfOrderDelta):
            server, _ = apply_delta(server, delta)
    assert take_resend(learner, 2) == (learner, ())  # nothing said yet: nothing resent
    learner = receive(learner, push_for(server, "d0"))  # applied_seq 0: all five lacking
    rounds = 0
    while learner.resend_from:
        learner, again = take_resend(learner, 2)
        assert 0 < len(again) <= 2
        assert [d.seq for d in again] == sorted(d.seq for d in again)
        for delta in again:
            server, _ = apply_delta(server, delta)
        rounds += 1
    assert rounds == 3
    assert server.applied["d0"] == 5
    assert server.arms["a"].n == 5
    learner = receive(learner, push_for(server, "d0"))
    assert learner.pending == ()
    assert learner.resend_from == 0
    assert local_posterior(learner)["a"].n == 5


def test_a_push_that_includes_everything_asks_for_nothing_again() -> None:
    learner = observe(DeviceLearner.start("exp", ARMS), "b", 0.5)
    learner, delta = close_interval(learner, "d0")
    assert delta is not None
    server, _ = apply_delta(FleetPosterior.start("exp", ARMS), delta)
    learner = receive(learner, push_for(server, "d0"))
    assert take_resend(learner, 3) == (learner, ())
