"""Outcome feedback: parsing with bounds, one report per id, expiry and capacity."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments.errors import InvalidExperimentData, UnknownResponse
from experiments.feedback import (
    Feedback,
    ResponseLog,
    Served,
    new_response_id,
    parse_feedback,
    reward_of,
)


def test_reward_and_label_feedback() -> None:
    log = ResponseLog()
    rid = new_response_id()
    log.record(rid, Served("digits", "b", predicted=7, at=100.0))
    fb = parse_feedback(json.dumps({"id": rid, "label": 7}).encode())
    served = log.take(rid, "digits", now=160.0)
    assert served.arm == "b"
    assert reward_of(fb, served) == 1.0
    assert reward_of(Feedback(rid, None, 3), served) == 0.0
    assert reward_of(parse_feedback(b'{"id": "x", "reward": 0.25}'), served) == 0.25
    with pytest.raises(UnknownResponse, match="take one report"):
        log.take(rid, "digits", now=161.0)


def test_unknown_expired_other_model_and_evicted_ids() -> None:
    log = ResponseLog(capacity=2, ttl_s=10.0)
    log.record("a", Served("m", None, None, at=0.0))
    with pytest.raises(UnknownResponse):
        log.take("a", "other", now=1.0)
    with pytest.raises(UnknownResponse):
        log.take("a", "m", now=11.0)
    assert len(log) == 0
    for rid in ("x", "y", "z"):
        log.record(rid, Served("m", None, None, at=20.0))
    assert len(log) == 2
    with pytest.raises(UnknownResponse):
        log.take("x", "m", now=21.0)
    with pytest.raises(UnknownResponse):
        log.take("never", "m", now=21.0)
    with pytest.raises(InvalidExperimentData, match="'reward' instead"):
        reward_of(Feedback("z", None, 1), log.take("z", "m", now=21.0))


@pytest.mark.parametrize(("body", "fragment"), [
    (b"not json", "JSON object"),
    (b"[1]", "JSON object"),
    (b'{"reward": 1}', "'id'"),
    (b'{"id": "a"}', "exactly one of"),
    (b'{"id": "a", "reward": 1, "label": 2}', "exactly one of"),
    (b'{"id": "a", "reward": true}', "finite number"),
    (b'{"id": "a", "reward": 1e999}', "finite number"),
    (b'{"id": "a", "label": "cat"}', "class index"),
    (b'{"id": "' + b"a" * 65 + b'", "reward": 1}', "at most 64"),
    (b" " * 5000, "at most 4096"),
])
def test_bad_feedback_says_what_is_wrong(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidExperimentData, match=fragment):
        parse_feedback(body)


@given(st.binary(max_size=200) | st.builds(lambda o: json.dumps(o).encode(), st.dictionaries(
    st.sampled_from(["id", "reward", "label", "x"]),
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70))))
def test_parser_raises_only_its_own_error(body: bytes) -> None:
    try:
        fb = parse_feedback(body)
    except InvalidExperimentData:
        return
    assert (fb.reward is None) != (fb.label is None)
