"""The experiment parts of the protocol: declarations in the desired state, posterior
pushes. Bounded, validated, and absent from the bytes when unused."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments.posterior import FleetPosterior, apply_delta, decode_delta, push_for
from experiments.spec import ExperimentSpec, spec_from_json, spec_to_json
from protocol.errors import ProtocolError
from protocol.experiment_messages import (
    MAX_DESIRED_EXPERIMENTS,
    MAX_EXPERIMENT_BYTES,
    MAX_PUSH_BYTES,
    PosteriorPush,
    decode_posterior_push,
)
from protocol.messages import (
    Desired,
    DesiredModel,
    decode_desired,
    encode,
)
from protocol.names import NAME_PATTERN
from protocol.topics import DEVICE_READS, EXPERIMENT_PUSH_LEAF

SHA = hashlib.sha256(b"bundle").hexdigest()
SPEC = ExperimentSpec("ab1", "digits", (("a", "digits"), ("b", "digits-b")),
                      (("a", 0.5), ("b", 0.5)), unit="request")

names = st.from_regex(NAME_PATTERN, fullmatch=True)
finite = st.floats(-1e12, 1e12, allow_nan=False)


def _desired(experiments: list[Any]) -> bytes:
    return json.dumps({"protocol": 1, "models": {}, "issued_at": 1.0,
                       "experiments": experiments}).encode()


def test_a_desired_state_without_experiments_keeps_its_bytes() -> None:
    plain = Desired({"digits": DesiredModel(2, SHA, 1234)}, issued_at=5.0)
    payload = encode(plain)
    assert b"experiments" not in payload
    assert payload == (b'{"issued_at":5.0,"models":{"digits":{"bundle_sha256":"' + SHA.encode()
                       + b'","size":1234,"version":2}},"protocol":1}')
    assert decode_desired(payload) == plain


def test_declarations_round_trip_and_parse_on_the_device() -> None:
    desired = Desired({"digits": DesiredModel(2, SHA, 1)}, 5.0, (spec_to_json(SPEC),))
    back = decode_desired(encode(desired))
    assert back == desired
    assert spec_from_json(back.experiments[0]) == SPEC


@pytest.mark.parametrize(("experiments", "message"), [
    ({"name": "x"}, "must be a list"),
    ([{"name": "x"}] * (MAX_DESIRED_EXPERIMENTS + 1), "must be a list of at most"),
    (["x"], r"experiments\[0\] must be a JSON object"),
    ([{"name": "a/b", "model": "m"}], "valid 'name' and 'model'"),
    ([{"name": "a"}], "valid 'name' and 'model'"),
    ([{"name": "a", "model": "m"}, {"name": "b", "model": "m"}], "one experiment per"),
    ([{"name": "a", "model": "m"}, {"name": "a", "model": "n"}], "one experiment per"),
    ([{"name": "a", "model": "m", "pad": "x" * MAX_EXPERIMENT_BYTES}], "exceeds"),
])
def test_bad_declarations_are_refused(experiments: Any, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_desired(_desired(experiments))


@given(st.lists(st.tuples(names, names), max_size=MAX_DESIRED_EXPERIMENTS + 2),
       st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=20), max_size=4))
def test_declarations_decode_or_raise_a_protocol_error(pairs: list[tuple[str, str]],
                                                       extra: dict[str, Any]) -> None:
    experiments = [{**extra, "name": n, "model": m} for n, m in pairs]
    try:
        back = decode_desired(_desired(experiments))
    except ProtocolError:
        return
    assert len(back.experiments) <= MAX_DESIRED_EXPERIMENTS
    assert len({e["name"] for e in back.experiments}) == len(back.experiments)
    assert len({e["model"] for e in back.experiments}) == len(back.experiments)


@given(names, st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1),
       st.dictionaries(names, st.tuples(st.integers(0, 2**63 - 1), finite,
                                        st.floats(0, 1e12)), min_size=1, max_size=16))
def test_pushes_round_trip(experiment: str, version: int, applied: int,
                           arms: dict[str, tuple[int, float, float]]) -> None:
    push = PosteriorPush(experiment, version, applied, arms)
    assert decode_posterior_push(encode(push)) == push


@given(st.binary(max_size=300) | st.builds(
    lambda obj: json.dumps(obj).encode(),
    st.fixed_dictionaries({"protocol": st.just(1), "experiment": names | st.integers(),
                           "version": st.integers(-2, 3), "applied_seq": st.integers(-2, 3),
                           "arms": st.dictionaries(st.text(max_size=4), st.lists(
                               st.integers(-2, 3) | finite | st.text(max_size=2),
                               max_size=4), max_size=3)})))
def test_push_decoding_raises_only_protocol_errors(payload: bytes) -> None:
    try:
        push = decode_posterior_push(payload)
    except ProtocolError:
        return
    for n, _, total_sq in push.arms.values():
        assert n >= 0
        assert total_sq >= 0


@pytest.mark.parametrize(("change", "message"), [
    ({"arms": {}}, "1 to 16 arms"),
    ({"arms": {f"a{i}": [1, 1, 1] for i in range(17)}}, "1 to 16 arms"),
    ({"arms": {"a": [1, 1]}}, r"must be \[n, sum, sum_sq\]"),
    ({"arms": {"a": [-1, 1, 1]}}, "'n' must be an integer"),
    ({"arms": {"a": [1, 1, -1]}}, "sum_sq must not be negative"),
    ({"arms": {"a/b": [1, 1, 1]}}, "arm name"),
    ({"experiment": "../x"}, "not a valid name"),
    ({"version": 1.5}, "'version' must be an integer"),
])
def test_bad_pushes_are_refused(change: dict[str, Any], message: str) -> None:
    obj = {"protocol": 1, "experiment": "ab1", "version": 3, "applied_seq": 1,
           "arms": {"a": [1, 1.0, 1.0]}, **change}
    with pytest.raises(ProtocolError, match=message):
        decode_posterior_push(json.dumps(obj).encode())


def test_a_push_has_a_size_limit() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_posterior_push(b" " * (MAX_PUSH_BYTES + 1))


def test_a_merged_posterior_travels_whole() -> None:
    state = FleetPosterior.start("ab1", ("a", "b"))
    state, _ = apply_delta(state, decode_delta(
        {"experiment": "ab1", "seq": 1, "arms": {"a": [3, 2.0, 2.0]}}, "dev-1"))
    merged = push_for(state, "dev-1")
    push = decode_posterior_push(encode(PosteriorPush(
        merged.experiment, merged.version, merged.applied_seq,
        {a: (s.n, s.total, s.total_sq) for a, s in merged.arms.items()})))
    assert (push.version, push.applied_seq, push.arms["a"], push.arms["b"]) == (
        1, 1, (3, 2.0, 2.0), (0, 0.0, 0.0))


def test_the_push_topic_is_one_the_device_may_read() -> None:
    assert "inbox/#" in DEVICE_READS
    assert EXPERIMENT_PUSH_LEAF.startswith("inbox/")
