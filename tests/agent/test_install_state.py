"""The install state machine, driven directly: its table, resumes, and property tests."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.install_state import (
    MAX_RESTARTS,
    TABLE,
    TERMINAL,
    Action,
    InstallEvent,
    InstallRecord,
    InstallState,
    InvalidTransition,
    Trigger,
    new_install,
    step,
)

S, T, A = InstallState, Trigger, Action
HAPPY = [(T.START, S.DOWNLOADING, (A.FETCH,)), (T.FETCHED, S.VERIFYING, (A.VERIFY,)),
         (T.VERIFIED, S.STAGED, (A.PREPARE,)), (T.PREPARED, S.ACTIVATING, (A.ACTIVATE,)),
         (T.ACTIVATED, S.PROBATION, (A.WATCH,)), (T.HEALTHY, S.COMMITTED, (A.COMMIT,))]


def _event(trigger: Trigger) -> InstallEvent:
    return InstallEvent(trigger, model="m", version=2, previous_version=1, reason="why",
                        detail="because")


def _at(state: InstallState) -> InstallRecord:
    """A record that reached ``state`` along the happy path (or failed from verifying, or
    rolled back from probation)."""
    if state is S.FAILED:
        return step(_at(S.VERIFYING), _event(T.FAILED), 1.0)[0]
    if state is S.ROLLED_BACK:
        return step(_at(S.PROBATION), _event(T.UNHEALTHY), 1.0)[0]
    record = new_install("id", "/b.efb", 0.0)
    for number, (trigger, _, _) in enumerate(HAPPY, 1):
        if record.state is state:
            break
        record, _ = step(record, _event(trigger), float(number))
    return record


def test_happy_path_records_every_state_and_its_actions() -> None:
    record = new_install("id", "/b.efb", 0.0)
    for number, (trigger, to, actions) in enumerate(HAPPY, 1):
        record, done = step(record, _event(trigger), float(number))
        assert (record.state, done) == (to, actions)
    assert [h[0] for h in record.history] == ["idle", *(to.value for _, to, _ in HAPPY)]
    assert record.done
    assert (record.model, record.version, record.previous_version) == ("m", 2, 1)


@pytest.mark.parametrize(("state", "trigger", "to", "actions"), [
    (S.IDLE, T.FAILED, S.FAILED, (A.RECLAIM,)),
    (S.DOWNLOADING, T.FAILED, S.FAILED, (A.RECLAIM,)),
    (S.VERIFYING, T.FAILED, S.FAILED, (A.RECLAIM,)),
    (S.STAGED, T.FAILED, S.FAILED, (A.RECLAIM,)),
    # The pointer may have flipped: go back, then clean up.
    (S.ACTIVATING, T.FAILED, S.FAILED, (A.RESTORE_PREVIOUS, A.RECLAIM)),
    (S.PROBATION, T.FAILED, S.ROLLED_BACK, (A.RESTORE_PREVIOUS, A.RECLAIM)),
    (S.PROBATION, T.UNHEALTHY, S.ROLLED_BACK, (A.RESTORE_PREVIOUS, A.RECLAIM)),
])
def test_failures_and_roll_backs(state: InstallState, trigger: Trigger, to: InstallState,
                                 actions: tuple[Action, ...]) -> None:
    record, done = step(_at(state), _event(trigger), 9.0)
    assert (record.state, done, record.reason) == (to, actions, "why")


@pytest.mark.parametrize(("state", "trigger"), [
    (S.IDLE, T.VERIFIED), (S.DOWNLOADING, T.ACTIVATED), (S.VERIFYING, T.PREPARED),
    (S.STAGED, T.HEALTHY), (S.ACTIVATING, T.HEALTHY), (S.PROBATION, T.FETCHED),
    (S.COMMITTED, T.UNHEALTHY), (S.FAILED, T.START), (S.ROLLED_BACK, T.HEALTHY),
])
def test_events_outside_the_table_are_refused(state: InstallState, trigger: Trigger) -> None:
    with pytest.raises(InvalidTransition, match=f"from {state.value} on {trigger.value}"):
        step(_at(state), _event(trigger), 9.0)


def test_failure_and_rollback_need_a_reason_and_verified_a_model() -> None:
    with pytest.raises(InvalidTransition, match="needs a reason"):
        step(_at(S.VERIFYING), InstallEvent(T.FAILED), 1.0)
    with pytest.raises(InvalidTransition, match="needs a reason"):
        step(_at(S.PROBATION), InstallEvent(T.UNHEALTHY), 1.0)
    with pytest.raises(InvalidTransition, match="needs the model"):
        step(_at(S.VERIFYING), InstallEvent(T.VERIFIED), 1.0)


@pytest.mark.parametrize(("state", "actions"), [
    (S.IDLE, (A.FETCH,)), (S.DOWNLOADING, (A.FETCH,)), (S.VERIFYING, (A.VERIFY,)),
    (S.STAGED, (A.PREPARE,)), (S.ACTIVATING, (A.ACTIVATE,)), (S.PROBATION, (A.WATCH,)),
    (S.COMMITTED, ()), (S.FAILED, ()), (S.ROLLED_BACK, ()),
])
def test_resume_action_for_each_state(state: InstallState, actions: tuple[Action, ...]) -> None:
    record = _at(state)
    resumed, done = step(record, InstallEvent(T.RESTARTED), 5.0)
    assert (resumed.state, done) == (state, actions)
    assert resumed.history == record.history  # a restart is not a state


@pytest.mark.parametrize(("state", "final", "reason"), [
    (S.VERIFYING, S.FAILED, "crash_loop"), (S.STAGED, S.FAILED, "crash_loop"),
    (S.ACTIVATING, S.FAILED, "crash_loop"), (S.PROBATION, S.ROLLED_BACK, "probation_failed"),
])
def test_an_install_that_keeps_the_agent_from_starting_is_given_up(
        state: InstallState, final: InstallState, reason: str) -> None:
    record = _at(state)
    for restart in range(1, MAX_RESTARTS + 1):
        record, actions = step(record, InstallEvent(T.RESTARTED), float(restart))
        assert (record.state, record.restarts) == (state, restart)
    record, actions = step(record, InstallEvent(T.RESTARTED), 99.0)
    assert (record.state, record.reason) == (final, reason)
    assert A.RECLAIM in actions
    assert "crashed 3 times" in (record.detail or "")


@pytest.mark.parametrize("state", [S.VERIFYING, S.STAGED, S.ACTIVATING, S.PROBATION])
def test_clean_stops_never_count_against_an_install(state: InstallState) -> None:
    record = _at(state)
    crashed, _ = step(record, InstallEvent(T.RESTARTED), 1.0)
    for start in range(10 * MAX_RESTARTS):
        crashed, actions = step(crashed, InstallEvent(T.RESUMED), 2.0 + start)
        assert (crashed.state, crashed.restarts) == (state, 1)
        assert actions == step(record, InstallEvent(T.RESTARTED), 1.0)[1]


def test_downloading_survives_any_number_of_restarts() -> None:
    record = _at(S.DOWNLOADING)
    for restart in range(20):
        record, actions = step(record, InstallEvent(T.RESTARTED), float(restart))
        assert (record.state, actions) == (S.DOWNLOADING, (A.FETCH,))


def test_a_record_without_history_is_readable() -> None:
    # issue 10 item 8: ``"history": []`` crashed every reader of the record.
    record = replace(_at(S.VERIFYING), history=())
    assert record.at == 0.0
    assert record.summary()["at"] == 0.0


_triggers = st.sampled_from(list(T))


@given(st.lists(_triggers, max_size=30))
def test_any_event_sequence_follows_the_table(triggers: list[Trigger]) -> None:
    record = new_install("id", "/b.efb", 0.0)
    for number, trigger in enumerate(triggers, 1):
        try:
            moved, actions = step(record, _event(trigger), float(number))
        except InvalidTransition:
            assert trigger not in (T.RESTARTED, T.RESUMED)
            assert (record.state, trigger) not in TABLE
            continue
        if trigger not in (T.RESTARTED, T.RESUMED):
            to, expected = TABLE[(record.state, trigger)]
            assert (moved.state, actions) == (to, expected)
            assert moved.history == (*record.history, (to.value, float(number)))
        elif moved.state is record.state:
            assert moved.history == record.history
        record = moved
    # Nothing leaves a terminal state; every other state has a way forward and a way out.
    rows = {t for (s, t) in TABLE if s is record.state}
    assert (not rows) == (record.state in TERMINAL)
    assert record.state in TERMINAL or rows & {T.FAILED, T.UNHEALTHY}


@given(st.sampled_from([s for s in S if s not in TERMINAL]), st.integers(0, 5))
def test_resuming_never_loops_forever(state: InstallState, restarts: int) -> None:
    record = replace(_at(state), restarts=restarts)
    # The agent dies again at once after every resume: downloading may wait for ever (a
    # fetch spans power cuts), every other state ends within MAX_RESTARTS + 1 restarts.
    for number in range(MAX_RESTARTS + 2):
        record, _ = step(record, InstallEvent(T.RESTARTED), float(number))
    assert record.done or record.state in (S.IDLE, S.DOWNLOADING)
