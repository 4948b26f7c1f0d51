"""Per-key token buckets: how much each device may take from the server per second.

Pure bookkeeping with the clock passed in, so the service's policy (what to do with a
request over budget) stays in the service and tests need no sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TokenBuckets"]


@dataclass
class TokenBuckets:
    """One bucket per key holding up to ``burst`` tokens, refilled at ``rate`` per second.

    A key's first request finds its bucket full. Keys are devices, whose number the
    registry bounds, so buckets are never evicted.
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
