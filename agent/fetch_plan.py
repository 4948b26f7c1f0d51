"""What the fleet link fetches next, decided from the desired state and what the device
serves (*pure*; :mod:`agent.fleet_link` does the fetching), as :mod:`agent.watch_plan`
decides what happens beside the served models."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from protocol.messages import Desired, DesiredModel

__all__ = ["next_fetch", "wants_delta"]


def next_fetch(desired: Desired | None, served: Mapping[str, str | None],
               given_up: Mapping[str, str],
               busy: Collection[str] = ()) -> tuple[str, DesiredModel] | None:
    """The model whose desired bundle to fetch next, or None when the device is in line.

    ``served`` maps model names to the bundle sha256 serving now (None: not from the fleet
    or not served); ``given_up`` maps them to a bundle that failed, which is not fetched
    again until the desired state names another one; ``busy`` models have an install being
    verified or activated, to be finished first. Models in name order, one at a time.
    """
    if desired is None:
        return None
    for name, want in sorted(desired.models.items()):
        if name not in busy and want.bundle_sha256 not in (served.get(name),
                                                            given_up.get(name)):
            return name, want
    return None


def wants_delta(want: DesiredModel, failed: Collection[str],
                base_intact: Callable[[int], bool]) -> bool:
    """Whether to fetch the delta bundle ``want`` offers rather than the full bundle: only
    if there is one, it has not failed here before (a damaged base, a rebuild that did not
    match: the full bundle then) and the stored base version is intact."""
    delta = want.delta
    return (delta is not None and delta.bundle_sha256 not in failed
            and base_intact(delta.base_version))
