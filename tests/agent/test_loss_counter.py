"""The loss counter: totals that survive reopening and a torn write, written in place."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.loss_counter import LossCounter, Tally


def test_counts_add_up_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "outbox.lost"
    counter = LossCounter(path)
    assert counter.value == Tally()
    assert counter.add(Tally(2, 0)) == Tally(2, 0)
    assert counter.add(Tally(1, 5)) == Tally(3, 5)
    counter.close()
    reopened = LossCounter(path)
    assert reopened.value == Tally(3, 5)
    reopened.close()


def test_the_file_is_allocated_once_and_then_only_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "outbox.lost"
    counter = LossCounter(path)
    size, inode = path.stat().st_size, path.stat().st_ino
    for _ in range(5):
        counter.add(Tally(1, 1))
    assert (path.stat().st_size, path.stat().st_ino) == (size, inode) == (64, inode)
    counter.close()


@settings(max_examples=30, deadline=None)
@given(adds=st.integers(1, 6), torn=st.integers(0, 27))  # a slot's bytes but its padding
def test_a_torn_write_loses_at_most_the_last_addition(
        tmp_path_factory: pytest.TempPathFactory, adds: int, torn: int) -> None:
    directory = tmp_path_factory.mktemp("lost")
    path = directory / "outbox.lost"
    counter = LossCounter(path)
    for _ in range(adds):
        counter.add(Tally(1, 0))
    counter.close()
    # Damage one byte of the slot written last (generation ``adds``).
    data = bytearray(path.read_bytes())
    data[32 * (adds % 2) + torn] ^= 0xFF
    path.write_bytes(bytes(data))
    reopened = LossCounter(path)
    assert reopened.value == Tally(adds - 1, 0)
    assert reopened.add(Tally(1, 0)) == Tally(adds, 0)
    reopened.close()
    final = LossCounter(path)
    assert final.value == Tally(adds, 0)
    final.close()


def test_a_file_with_no_valid_slot_counts_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "outbox.lost"
    path.write_bytes(b"garbage")
    counter = LossCounter(path)
    assert counter.value == Tally()
    counter.add(Tally(0, 1))
    counter.close()
    reopened = LossCounter(path)
    assert reopened.value == Tally(0, 1)
    reopened.close()
