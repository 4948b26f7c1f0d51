"""The audit log's hash chain, pure: how an entry is hashed, and how a log is verified.

Every entry holds the hash of the one before it (``prev_hash``; the first holds
:data:`GENESIS`) and its own ``hash``: SHA-256 over its sequence number, time, actor,
action, target, reason, detail and ``prev_hash``, as canonical JSON. So changing an entry
breaks its hash, removing or reordering entries breaks a link or the sequence, and removing
the newest ones shows against the head (count and last hash) the registry keeps apart.
:func:`verify_chain` names the first entry that breaks it. Storage is
:mod:`fleet_server.registry.audit`.

The chain proves the log was not edited by someone without the database's write access to
*both* tables and the wit to recompute every hash after the edit; anchoring the head
elsewhere (printing it, sending it off-host) makes even that detectable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GENESIS", "AuditEntry", "entry_hash", "verify_chain"]

#: ``prev_hash`` of the first entry.
GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    """One entry: ``actor`` did ``action`` to ``target`` at ``at``, because ``reason``."""

    seq: int
    at: float
    actor: str
    action: str
    target: str
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    prev_hash: str = GENESIS
    hash: str = ""


def entry_hash(entry: AuditEntry) -> str:
    """The hash ``entry`` must carry (over everything but its own ``hash``)."""
    body = json.dumps([entry.seq, repr(float(entry.at)), entry.actor, entry.action,
                       entry.target, entry.reason, entry.detail, entry.prev_hash],
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode("ascii")).hexdigest()


def verify_chain(entries: Iterable[AuditEntry], head: tuple[int, str]) -> list[str]:
    """What is wrong with ``entries`` (in stored order) against the ``head`` (count, last
    hash): one line per problem found, the first break first; empty if the log verifies."""
    problems: list[str] = []
    prev, expected_seq = GENESIS, 1
    for entry in entries:
        if entry.seq != expected_seq:
            problems.append(f"entry {entry.seq}: expected entry {expected_seq} here: entries "
                            "were removed or reordered")
        if entry.prev_hash != prev:
            problems.append(f"entry {entry.seq}: does not follow the entry before it "
                            "(prev_hash differs): an entry before it was changed, removed "
                            "or reordered")
        if entry_hash(entry) != entry.hash:
            problems.append(f"entry {entry.seq}: its contents do not match its hash: it was "
                            "changed")
        prev, expected_seq = entry.hash, entry.seq + 1
    count, last = head
    if expected_seq - 1 != count or prev != (last if count else GENESIS):
        problems.append(f"the log ends at entry {expected_seq - 1} but its head records "
                        f"{count} entries ending in {last[:12]}: newest entries were removed "
                        "or the head was changed")
    return problems
