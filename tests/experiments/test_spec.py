"""The experiment declaration: round trip and refusals."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments.errors import InvalidExperimentData
from experiments.spec import ExperimentSpec, spec_from_json, spec_to_json

AB = ExperimentSpec("exp1", "digits", (("a", "digits-a"), ("b", "digits-b")),
                    (("a", 0.5), ("b", 0.5)))


def test_round_trip() -> None:
    bandit = ExperimentSpec("exp2", "digits", (("a", "m1"), ("b", "m2"), ("c", "m3")),
                            (("a", 1.0), ("b", 1.0), ("c", 1.0)), unit="request",
                            strategy="thompson", low=-100.0, high=0.0, family="normal")
    for spec in (AB, bandit):
        assert spec_from_json(spec_to_json(spec)) == spec
    assert AB.served_model("b") == "digits-b"


@pytest.mark.parametrize(("change", "fragment"), [
    ({"strategy": "thompson"}, "--unit request"),
    ({"unit": "fleet"}, "device or request"),
    ({"low": 1.0}, "finite low < high"),
    ({"name": "../x"}, "not valid"),
    ({"arms": [{"arm": "a", "model": "m"}]}, "2 to 16 arms"),
    ({"arms": [{"arm": "a", "model": "m", "share": -1}, {"arm": "b", "model": "n"}]},
     "non-negative"),
    ({"arms": "a,b"}, "must list"),
    ({"higher_is_better": "yes"}, "true or false"),
])
def test_refusals_name_the_problem(change: dict[str, Any], fragment: str) -> None:
    obj = {**spec_to_json(AB), **change}
    with pytest.raises(InvalidExperimentData, match=fragment):
        spec_from_json(obj)


@given(st.dictionaries(st.sampled_from(["name", "model", "arms", "unit", "strategy", "low",
                                        "high", "higher_is_better", "family"]),
                       st.none() | st.booleans() | st.integers() | st.floats()
                       | st.text(max_size=5) | st.lists(st.dictionaries(
                           st.sampled_from(["arm", "model", "share"]),
                           st.text(max_size=4) | st.floats()), max_size=3)))
def test_parser_raises_only_its_own_error(obj: dict[str, Any]) -> None:
    try:
        spec = spec_from_json(obj)
    except InvalidExperimentData:
        return
    assert len(spec.arms) >= 2
