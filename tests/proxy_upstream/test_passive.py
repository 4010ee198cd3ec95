"""Passive checks: consecutive failed requests eject a server for a cool-down."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from upstream_harness import make_state, picks, server, usable

from stockade.proxy.settings import PassiveCheck
from stockade.proxy.upstream import PoolState, ServerState

PASSIVE = PassiveCheck(max_failures=3, cooldown=10)


def _fail(state: PoolState, s: ServerState, times: int = 1) -> None:
    for _ in range(times):
        state.begin(s)
        state.finish(s, ok=False)


def _succeed(state: PoolState, s: ServerState) -> None:
    state.begin(s)
    state.finish(s, ok=True)


def test_max_failures_in_a_row_eject_for_the_cooldown(caplog: pytest.LogCaptureFixture) -> None:
    state, clock = make_state(1, 1, passive=PASSIVE)
    a = server(state, "a")
    _fail(state, a, 2)
    assert usable(state) == "ab"
    with caplog.at_level(logging.INFO, logger="stockade.proxy.upstream"):
        _fail(state, a)
        assert usable(state) == "b"
        assert picks(state, 4) == "bbbb"
        assert state.snapshot()[0]["ejected"] == 10.0
        clock.advance(9.9)
        assert usable(state) == "b"
        assert state.snapshot()[0]["ejected"] == 0.1
        clock.advance(0.1)
        assert usable(state) == "ab"
        assert state.snapshot()[0]["ejected"] == 0.0
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "pool api: server 127.0.0.1:9001 ejected for 10s after 3 failed requests in a row",
        ),
        (logging.INFO, "pool api: server 127.0.0.1:9001 back in rotation"),
    ]


def test_a_success_resets_the_count() -> None:
    state, _ = make_state(1, 1, passive=PASSIVE)
    a = server(state, "a")
    _fail(state, a, 2)
    _succeed(state, a)
    _fail(state, a, 2)
    assert usable(state) == "ab"
    _fail(state, a)
    assert usable(state) == "b"
    assert (a.requests, a.failures) == (6, 5)


def test_after_the_cooldown_it_takes_max_failures_again() -> None:
    state, clock = make_state(1, 1, passive=PASSIVE)
    a = server(state, "a")
    _fail(state, a, 3)
    clock.advance(10)
    _fail(state, a, 2)
    assert usable(state) == "ab"
    _fail(state, a)
    assert usable(state) == "b"


def test_failures_finishing_while_ejected_do_not_extend_the_ejection() -> None:
    state, clock = make_state(1, 1, passive=PASSIVE)
    a = server(state, "a")
    for _ in range(6):  # six requests in flight when a breaks
        state.begin(a)
    for _ in range(6):
        state.finish(a, ok=False)
    assert (a.failures, a.outstanding) == (6, 0)
    clock.advance(10)
    assert usable(state) == "ab"
    assert a.consecutive_failures == 0


def test_every_server_ejected_gives_none() -> None:
    state, clock = make_state(1, 1, passive=PassiveCheck(max_failures=1, cooldown=5))
    for s in state.servers:
        _fail(state, s)
    assert state.pick() is None
    clock.advance(5)
    assert usable(state) == "ab"


def test_a_server_back_from_ejection_slow_starts() -> None:
    state, clock = make_state(1, 1, slow_start=20, passive=PASSIVE)
    a = server(state, "a")
    _fail(state, a, 3)
    clock.advance(15)  # back since 5 s: weight 0.1 + 0.9 * 5/20
    assert state.effective_weight(a) == pytest.approx(0.325)
    assert Counter(picks(state, 1325))["a"] == pytest.approx(325, abs=2)
    clock.advance(15)
    assert state.effective_weight(a) == 1.0


def test_passive_and_active_verdicts_are_independent() -> None:
    state, clock = make_state(1, 1, passive=PASSIVE)
    a = server(state, "a")
    _fail(state, a, 3)
    state.set_health(a, False)
    clock.advance(10)
    assert usable(state) == "b"  # cool-down over, but the active checks say down
    state.set_health(a, True)
    assert usable(state) == "ab"
