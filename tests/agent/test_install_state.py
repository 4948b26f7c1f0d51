"""The install state machine, driven directly: table of transitions and property tests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.install_state import (
    MAX_RESTARTS,
    TERMINAL,
    TRANSITIONS,
    InstallRecord,
    InstallState,
    Step,
    advance,
    new_install,
    plan_resume,
)

S = InstallState
HAPPY_PATH = (S.DOWNLOADING, S.VERIFYING, S.STAGED, S.ACTIVATING, S.PROBATION, S.COMMITTED)


def _at(state: InstallState) -> InstallRecord:
    """A record that reached ``state`` along the happy path (or failed from its parent)."""
    record = new_install("id", "/b.efb", 0.0)
    for step, to in enumerate(HAPPY_PATH, 1):
        if record.state is state:
            break
        if to is not state and state in TRANSITIONS[record.state] and state in (
                S.FAILED, S.ROLLED_BACK):
            return advance(record, state, float(step), reason="why")
        record = advance(record, to, float(step), model="m", version=2, previous_version=1)
    return record


def test_happy_path_records_every_state_in_order() -> None:
    record = _at(S.COMMITTED)
    assert [h[0] for h in record.history] == ["idle", *(s.value for s in HAPPY_PATH)]
    assert record.done
    assert (record.model, record.version, record.previous_version) == ("m", 2, 1)


@pytest.mark.parametrize(("state", "to"), [
    (S.IDLE, S.STAGED), (S.DOWNLOADING, S.PROBATION), (S.VERIFYING, S.ACTIVATING),
    (S.STAGED, S.COMMITTED), (S.ACTIVATING, S.COMMITTED), (S.PROBATION, S.FAILED),
    (S.COMMITTED, S.ROLLED_BACK), (S.FAILED, S.DOWNLOADING), (S.ROLLED_BACK, S.COMMITTED),
])
def test_transitions_outside_the_table_are_refused(state: InstallState, to: InstallState) -> None:
    with pytest.raises(ValueError, match=f"{state.value} -> {to.value}"):
        advance(_at(state), to, 9.0, reason="x")


def test_failure_and_rollback_need_a_reason() -> None:
    with pytest.raises(ValueError, match="needs a reason"):
        advance(_at(S.VERIFYING), S.FAILED, 1.0)
    with pytest.raises(ValueError, match="needs a reason"):
        advance(_at(S.PROBATION), S.ROLLED_BACK, 1.0)


@pytest.mark.parametrize(("state", "step"), [
    (S.IDLE, Step.DOWNLOAD), (S.DOWNLOADING, Step.DOWNLOAD), (S.VERIFYING, Step.VERIFY),
    (S.STAGED, Step.ACTIVATE), (S.ACTIVATING, Step.ACTIVATE), (S.PROBATION, Step.PROBATION),
    (S.COMMITTED, Step.NOTHING), (S.FAILED, Step.NOTHING), (S.ROLLED_BACK, Step.NOTHING),
])
def test_resume_step_for_each_state(state: InstallState, step: Step) -> None:
    record = _at(state)
    assert record.state is state
    assert plan_resume(record)[1] is step


@pytest.mark.parametrize(("state", "final"), [(S.ACTIVATING, Step.FAIL),
                                              (S.PROBATION, Step.ROLL_BACK)])
def test_a_model_that_keeps_crashing_the_agent_is_given_up(state: InstallState,
                                                           final: Step) -> None:
    record = _at(state)
    steps = []
    for _ in range(MAX_RESTARTS + 1):
        record, step = plan_resume(record)
        steps.append(step)
    assert steps[:-1] == [plan_resume(_at(state))[1]] * MAX_RESTARTS
    assert steps[-1] is final


_states = st.sampled_from(list(S))


@given(st.lists(_states, max_size=12))
def test_any_sequence_follows_the_table(targets: list[InstallState]) -> None:
    record = new_install("id", "/b.efb", 0.0)
    for number, to in enumerate(targets, 1):
        allowed = to in TRANSITIONS[record.state]
        try:
            moved = advance(record, to, float(number), reason="r")
        except ValueError:
            assert not allowed
            continue
        assert allowed
        assert moved.history[:-1] == record.history
        assert moved.history[-1] == (to.value, float(number))
        record = moved
    # Nothing leaves a terminal state; every non-terminal state has a way forward.
    assert (not TRANSITIONS[record.state]) == (record.state in TERMINAL)


@given(st.sampled_from([s for s in S if s is not S.IDLE]), st.integers(0, 5))
def test_resuming_never_loops_forever(state: InstallState, restarts: int) -> None:
    from dataclasses import replace

    record = replace(_at(state), restarts=restarts)
    # The agent crashes again at once after every resume; activating a staged record
    # persists ``activating`` before anything can crash.
    for _ in range(MAX_RESTARTS + 3):
        record, step = plan_resume(record)
        if step in (Step.NOTHING, Step.DOWNLOAD, Step.VERIFY, Step.FAIL, Step.ROLL_BACK):
            break
        if record.state is S.STAGED:
            record = advance(record, S.ACTIVATING, 1.0)
    else:
        pytest.fail(f"{state.value} resumed {MAX_RESTARTS + 2} times without giving up")
