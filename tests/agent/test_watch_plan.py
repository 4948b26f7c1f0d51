"""agent.watch_plan: what the desired state asks of shadow and previous versions (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.watch_plan import WatchAction, Watched, watch_actions
from protocol.messages import Desired, DesiredModel, DesiredShadow

A, B = "a" * 64, "b" * 64


def _desired(version: int = 2, *, shadow: DesiredShadow | None = None,
             compare: float = 0.0) -> Desired:
    return Desired({"digits": DesiredModel(version, A, 10, shadow, compare)}, 0.0)


SHADOW = DesiredShadow(3, B, 20, 0.1)


@pytest.mark.parametrize(("desired", "have", "given_up", "expected"), [
    # In line: nothing to do.
    (_desired(), Watched(2), {}, []),
    # Blue-green asked for: keep the previous version at that share.
    (_desired(compare=0.2), Watched(2), {},
     [WatchAction("keep_previous", "digits", rate=0.2)]),
    # The desired version is the one loaded beside: switch back, nothing fetched.
    (_desired(1, compare=0.2), Watched(2, previous=1, compare_previous=0.2), {},
     [WatchAction("switch_back", "digits", version=1)]),
    # A halted rollout: the previous version and no comparison at once. Switch back first,
    # then release the one it replaces (releasing first would leave nothing to switch to).
    (_desired(1), Watched(2, previous=1, compare_previous=0.1), {},
     [WatchAction("switch_back", "digits", version=1),
      WatchAction("keep_previous", "digits", rate=0.0)]),
    # The desired version is not loaded: no switch (the install path fetches it).
    (_desired(1), Watched(2, previous=None), {}, []),
    # A shadow to load; once loading or loaded, nothing more.
    (_desired(shadow=SHADOW), Watched(2), {},
     [WatchAction("load_shadow", "digits", rate=0.1, version=3, shadow=SHADOW)]),
    (_desired(shadow=SHADOW), Watched(2, shadow_sha256=B, shadow_rate=0.1), {}, []),
    # Another rate for the same candidate: no reload.
    (_desired(shadow=SHADOW), Watched(2, shadow_sha256=B, shadow_rate=1.0), {},
     [WatchAction("shadow_rate", "digits", rate=0.1)]),
    # A shadow that failed is not tried again until another one is named.
    (_desired(shadow=SHADOW), Watched(2), {"digits": B}, []),
    # The shadow removed from the desired state: unload it.
    (_desired(), Watched(2, shadow_sha256=B, shadow_rate=0.1), {},
     [WatchAction("unload_shadow", "digits")]),
    # Blue-green turned off releases the previous version.
    (_desired(), Watched(2, previous=1, compare_previous=0.5), {},
     [WatchAction("keep_previous", "digits", rate=0.0)]),
    (None, Watched(2, shadow_sha256=B), {}, []),
])
def test_actions(desired: Desired | None, have: Watched, given_up: dict[str, str],
                 expected: list[WatchAction]) -> None:
    assert watch_actions(desired, {"digits": have}, given_up) == expected


_shadows = st.none() | st.builds(DesiredShadow, st.integers(1, 4), st.sampled_from([A, B]),
                                 st.just(10), st.sampled_from([0.1, 1.0]))
_models = st.builds(DesiredModel, st.integers(1, 4), st.just(A), st.just(10), _shadows,
                    st.sampled_from([0.0, 0.5]))
_watched = st.builds(Watched, st.none() | st.integers(1, 4), st.none() | st.integers(1, 4),
                     st.sampled_from([0.0, 0.5]), st.none() | st.sampled_from([A, B]),
                     st.sampled_from([0.0, 0.1, 1.0]))


def _apply(action: WatchAction, have: Watched, want: DesiredModel) -> Watched:
    """What the device has after doing ``action`` (the fleet link's effect, modelled)."""
    if action.kind == "keep_previous":
        return Watched(have.served, have.previous if action.rate else None, action.rate,
                       have.shadow_sha256, have.shadow_rate)
    if action.kind == "switch_back":
        return Watched(action.version, have.served, have.compare_previous,
                       have.shadow_sha256, have.shadow_rate)
    if action.kind == "unload_shadow":
        return Watched(have.served, have.previous, have.compare_previous)
    assert want.shadow is not None
    return Watched(have.served, have.previous, have.compare_previous,
                   want.shadow.bundle_sha256, action.rate)


@given(_models, _watched)
def test_doing_the_actions_brings_the_device_in_line(want: DesiredModel,
                                                     have: Watched) -> None:
    desired = Desired({"digits": want}, 0.0)
    could_switch = have.previous == want.version and have.served != want.version
    first = watch_actions(desired, {"digits": have}, {})
    assert len({a.kind for a in first}) == len(first)  # each kind at most once
    assert [a.kind for a in first if a.kind == "load_shadow"] == \
        [a.kind for a in first[-1:] if a.kind == "load_shadow"]  # a fetch comes last
    for action in first:
        have = _apply(action, have, want)
    # A version loaded beside is switched to, whatever else changes at the same time.
    assert not could_switch or have.served == want.version
    # Done once, nothing is left to do.
    again = watch_actions(desired, {"digits": have}, {})
    assert again == []
