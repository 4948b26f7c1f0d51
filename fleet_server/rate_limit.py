"""Per-key token buckets: how much each device may take from the server per second.

Pure bookkeeping with the clock passed in, so the service's policy (what to do with a
request over budget) stays in the service and tests need no sleeping.
:class:`TokenBuckets` is one allowance per key (the chunk server's bytes per device);
:class:`MessageLimits` is the ingest's: one allowance per kind of device message, and the
count of what each device had refused, closed once a window.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Allowance", "Dropped", "MessageLimits", "TokenBuckets"]


@dataclass
class TokenBuckets:
    """One bucket per key holding up to ``burst`` tokens, refilled at ``rate`` per second.

    A key's first request finds its bucket full, so a bucket that has refilled holds
    nothing a new one would not: :meth:`prune` forgets those, bounding the memory by the
    keys active within the last ``burst / rate`` seconds.
    """

    rate: float
    burst: float
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def take(self, key: str, amount: float, now: float) -> bool:
        """Take ``amount`` tokens from ``key``'s bucket if it holds them; False if not (the
        bucket is then left as it was, so a refused request costs nothing)."""
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        if tokens < amount:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - amount, now)
        return True

    def prune(self, now: float) -> None:
        """Forget the buckets that are full again by ``now``."""
        self._buckets = {key: (tokens, then) for key, (tokens, then) in self._buckets.items()
                         if tokens + (now - then) * self.rate < self.burst}

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class Allowance:
    """Messages of one kind a device may send: ``rate`` per second sustained, after a
    burst of ``burst``."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1):
            raise ValueError(f"a message allowance needs a rate above 0 and a burst of at "
                             f"least 1, not rate={self.rate} burst={self.burst}")


@dataclass(frozen=True)
class Dropped:
    """What one device had refused in one window: messages per kind."""

    device: str
    counts: dict[str, int]
    #: When the window started (the clock of :meth:`MessageLimits.admit`).
    since: float


class MessageLimits:
    """Token buckets per device and kind of message, and the count of refused messages per
    device, in windows of ``window_s`` seconds starting with a device's first refusal.

    :meth:`admit` runs on the MQTT network thread for every device message: O(1), plus a
    pass over the buckets once a window to forget the devices that went quiet, so memory is
    bounded by the devices active in the last few minutes. :meth:`closed` is called by the
    thread that records the windows; the two share a lock.
    """

    def __init__(self, allowances: Mapping[str, Allowance], window_s: float = 60.0) -> None:
        self._buckets = {kind: TokenBuckets(a.rate, a.burst) for kind, a in allowances.items()}
        self.window_s = window_s
        self._lock = threading.Lock()
        self._dropped: dict[str, Dropped] = {}
        self._pruned = 0.0

    def admit(self, device: str, kind: str, now: float) -> bool:
        """Whether ``device`` may send one more message of ``kind`` (a kind without an
        allowance always may); a refusal is counted in the device's window."""
        buckets = self._buckets.get(kind)
        if buckets is None:
            return True
        with self._lock:
            if now - self._pruned >= self.window_s:
                self._pruned = now
                for each in self._buckets.values():
                    each.prune(now)
            if buckets.take(device, 1.0, now):
                return True
            window = self._dropped.get(device)
            if window is None:
                window = self._dropped[device] = Dropped(device, {}, now)
            window.counts[kind] = window.counts.get(kind, 0) + 1
            return False

    def closed(self, now: float, *, every: bool = False) -> list[Dropped]:
        """The windows that ended by ``now`` (``every``: all of them, at a stop), forgotten
        here: each is returned once."""
        with self._lock:
            done = [w for w in self._dropped.values()
                    if every or now - w.since >= self.window_s]
            for window in done:
                del self._dropped[window.device]
            return done

    def tracked(self) -> int:
        """Buckets held (every kind): what the pruning bounds."""
        with self._lock:
            return sum(len(b) for b in self._buckets.values())
