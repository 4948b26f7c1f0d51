"""What the desired state asks of the models run beside the served ones: a pure decision.

Besides the version to serve, a desired model may name a **shadow** candidate (load it
beside the served model, run it on a share of the requests, never serve it) and a share
of requests to compare with the **previous** version (keep the version an install
replaces loaded: blue-green). :func:`watch_actions` compares that with what the device
has (:class:`Watched`, per model) and returns what to do, in order; the fleet link
(:mod:`agent.fleet_link`) performs them with the runtime. A desired version that is the
one still loaded beside the served one is a switch back: one swap, no fetch, no load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protocol.messages import Desired, DesiredShadow

__all__ = ["WatchAction", "Watched", "watch_actions"]


@dataclass(frozen=True)
class Watched:
    """What the device has for one model name."""

    served: int | None  # the version serving, None when nothing is
    previous: int | None = None  # a version loaded beside it that could serve again
    compare_previous: float = 0.0  # the share of requests run on the previous version
    shadow_sha256: str | None = None  # the shadow candidate loaded or being loaded
    shadow_rate: float = 0.0


@dataclass(frozen=True)
class WatchAction:
    """One thing to do: ``kind`` is ``keep_previous`` (set the share ``rate``),
    ``switch_back`` (serve the loaded ``version`` again), ``unload_shadow``,
    ``shadow_rate`` (run the loaded shadow on ``rate``) or ``load_shadow`` (fetch, verify,
    self-test and load ``shadow``)."""

    kind: str
    model: str
    rate: float = 0.0
    version: int | None = None
    shadow: DesiredShadow | None = None


def watch_actions(desired: Desired | None, watched: Mapping[str, Watched],
                  given_up: Mapping[str, str]) -> list[WatchAction]:
    """The actions that bring the watched models in line with ``desired``.

    Models the desired state does not name are left as they are. ``given_up`` maps a model
    to a shadow bundle that failed to load, not tried again until another one is named.
    Switching back and the share of requests come first; loading a shadow last (it fetches).
    """
    if desired is None:
        return []
    actions: list[WatchAction] = []
    loads: list[WatchAction] = []
    for name, want in sorted(desired.models.items()):
        have = watched.get(name, Watched(served=None))
        # Switch back before the share changes: a halted rollout names the previous version
        # and no comparison at once, and releasing the kept version first would leave
        # nothing to switch back to (an install then, which the trust rules refuse).
        if have.served != want.version and have.previous == want.version:
            actions.append(WatchAction("switch_back", name, version=want.version))
        if have.compare_previous != want.compare_previous:
            actions.append(WatchAction("keep_previous", name, rate=want.compare_previous))
        shadow = want.shadow
        if shadow is None:
            if have.shadow_sha256 is not None:
                actions.append(WatchAction("unload_shadow", name))
        elif have.shadow_sha256 == shadow.bundle_sha256:
            if have.shadow_rate != shadow.sample_rate:
                actions.append(WatchAction("shadow_rate", name, rate=shadow.sample_rate))
        elif given_up.get(name) != shadow.bundle_sha256:
            loads.append(WatchAction("load_shadow", name, rate=shadow.sample_rate,
                                     version=shadow.version, shadow=shadow))
    return actions + loads
