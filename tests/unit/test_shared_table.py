"""The shared-memory tables: window semantics, eviction, and exactness across processes."""

from __future__ import annotations

import os

import pytest

from stockade.proxy.shared_table import GROUP, PenaltyTable, WindowCounters, digest


def test_a_limit_is_never_exceeded_in_any_rolling_window() -> None:
    counters = WindowCounters(1024)
    key = digest("k")
    admitted: list[float] = []
    t = 1000.0
    while t < 1000.0 + 300.0:  # a client hammering a 100/min limit every 50 ms for 5 min
        if counters.update(key, 60.0, t, 1, 100)[0]:
            admitted.append(t)
        t += 0.05
    for i, start in enumerate(admitted):
        in_window = sum(1 for x in admitted[i:] if x < start + 60.0)
        assert in_window <= 100
    # and it is not starved: at least 95% of the limit per window in the long run
    assert len(admitted) >= 0.95 * 100 * 5


def test_a_refusal_says_when_to_retry_and_counts_nothing() -> None:
    counters = WindowCounters(1024)
    key = digest("k")
    for _ in range(10):
        assert counters.update(key, 10.0, 50.0, 1, 10)[0]
    allowed, total, wait = counters.update(key, 10.0, 51.0, 1, 10)
    assert not allowed and total == 10
    assert 9.0 <= wait <= 10.5  # the burst at t=50 leaves the window at about t=60.5
    assert counters.total(key, 10.0, 51.0) == 10
    assert not counters.update(key, 10.0, 51.0 + wait - 0.1, 1, 10)[0]
    assert counters.update(key, 10.0, 51.0 + wait + 0.01, 1, 10)[0]


def test_a_cleared_key_counts_from_zero() -> None:
    counters = WindowCounters(1024)
    key = digest("k")
    counters.update(key, 60.0, 10.0, 5)
    counters.clear(key)
    assert counters.total(key, 60.0, 10.5) == 0
    assert counters.update(key, 60.0, 11.0, 1, 1)[0]


def test_keys_and_windows_are_independent_and_expire() -> None:
    counters = WindowCounters(1024)
    a, b = digest("a"), digest("b")
    counters.update(a, 1.0, 10.0, 5)
    counters.update(b, 1.0, 10.0, 2)
    assert counters.total(a, 1.0, 10.0) == 5
    assert counters.total(b, 1.0, 10.0) == 2
    assert counters.total(a, 1.0, 11.2) == 0  # a whole window (plus a bucket) later


def test_a_full_group_evicts_the_slot_closest_to_expiring() -> None:
    counters = WindowCounters(GROUP)  # one group: every key competes for 8 slots
    keys = [digest(f"k{i}") for i in range(GROUP + 1)]
    for i, key in enumerate(keys[:GROUP]):
        counters.update(key, 60.0, 100.0 + i, 1)
    counters.update(keys[GROUP], 60.0, 110.0, 1)
    assert counters.table.evictions == 1
    assert counters.total(keys[0], 60.0, 110.0) == 0  # the oldest went
    assert counters.total(keys[GROUP], 60.0, 110.0) == 1


def test_forked_workers_share_one_exact_count() -> None:
    counters = WindowCounters(4096)
    key = digest("shared")
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - in the child
            admitted = sum(counters.update(key, 60.0, 500.0, 1, 1000)[0] for _ in range(500))
            os._exit(min(admitted, 255) if admitted < 500 else 0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    # 2000 attempts against a limit of 1000: exactly 1000 counted, none lost to a race
    assert counters.total(key, 60.0, 500.0) == 1000


def test_penalties_are_set_once_only_raised_and_expire() -> None:
    table = PenaltyTable(1024)
    key = digest("ip\x00198.18.0.10")
    assert table.raise_to(key, 2, 7, until=20.0, now=10.0)
    assert not table.raise_to(key, 2, 8, until=30.0, now=11.0)  # acted on already
    assert not table.raise_to(key, 1, 9, until=30.0, now=11.0)  # a weaker one never masks it
    assert table.get(key, 15.0) == (2, 7)
    assert table.raise_to(key, 3, 5, until=25.0, now=12.0)  # a stronger one replaces it
    assert table.get(key, 15.0) == (3, 5)
    assert table.get(key, 25.5) is None
    assert table.raise_to(key, 1, 2, until=40.0, now=26.0)
    table.replace(key, 0, 2, until=50.0)
    assert table.get(key, 45.0) == (0, 2)


def test_tiny_tables_are_refused() -> None:
    with pytest.raises(ValueError):
        WindowCounters(GROUP - 1)
