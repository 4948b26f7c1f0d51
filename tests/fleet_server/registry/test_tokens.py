"""Enrollment tokens: hashed at rest, redeemed exactly once, on both databases."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import pytest

from fleet_server.errors import RegistryError
from fleet_server.registry import Registry
from tests.fleet_server.registry.helpers import DAY, Clock, kinds


def test_token_issue_and_redeem(reg: Registry) -> None:
    token = reg.issue_token("lab", ttl=DAY)
    assert len(token) >= 40
    assert reg.redeem_token(token, "gw-1") == "lab"
    with reg._tx() as tx:  # white-box: only the hash is stored
        rows = tx.all("SELECT token_sha256, used_by FROM enrollment_tokens")
    assert rows == [(hashlib.sha256(token.encode()).hexdigest(), "gw-1")]
    assert all(token not in repr(e.detail) for e in reg.events())
    assert kinds(reg) == ["token.issued", "token.redeemed"]


def test_token_refusals(reg: Registry, clock: Clock) -> None:
    token = reg.issue_token("lab", ttl=DAY)
    reg.redeem_token(token, "gw-1")
    with pytest.raises(RegistryError, match=r"already used by device 'gw-1' at .*new one"):
        reg.redeem_token(token, "gw-2")
    with pytest.raises(RegistryError, match="already used"):
        reg.redeem_token(token, "gw-1")  # not even by the same device: one token, one cert
    with pytest.raises(RegistryError, match="unknown enrollment token; check for typos"):
        reg.redeem_token("not-a-token", "gw-2")
    late = reg.issue_token("field", ttl=60)
    clock.now += 60
    with pytest.raises(RegistryError, match=r"token for group 'field' expired at .*new one"):
        reg.redeem_token(late, "gw-2")
    with pytest.raises(RegistryError, match="token lifetime must be positive"):
        reg.issue_token("lab", ttl=0)
    with pytest.raises(RegistryError, match="invalid device id"):
        reg.redeem_token(reg.issue_token("lab", ttl=60), "a b")
    assert kinds(reg).count("token.redeemed") == 1  # the refusals changed nothing


@pytest.mark.parametrize("shared", [True, False], ids=["one-registry", "one-per-thread"])
def test_concurrent_redeem_has_exactly_one_winner(opener: Callable[[], Registry],
                                                  shared: bool) -> None:
    """Threads on one Registry (its pool) and on separate registries (as processes)."""
    threads = 8
    first = opener()
    registries = [first] * threads if shared else [first, *(opener() for _ in range(threads - 1))]
    token = first.issue_token("lab", ttl=DAY)
    barrier = threading.Barrier(threads)
    results: list[str] = []

    def redeem(i: int) -> None:
        barrier.wait()
        try:
            results.append(f"won {registries[i].redeem_token(token, f'gw-{i}')}")
        except RegistryError as exc:
            results.append(str(exc))

    workers = [threading.Thread(target=redeem, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert results.count("won lab") == 1
    assert sum("already used by device" in r for r in results) == threads - 1
    assert kinds(first).count("token.redeemed") == 1
