"""Picking a server: smooth weighted round robin, least outstanding, exclude, slow start."""

from __future__ import annotations

from collections import Counter

from upstream_harness import make_state, name_of, picks, server

from stockade.proxy.upstream import PoolState


def test_smooth_round_robin_follows_nginx_sequence_for_1_2_3() -> None:
    state, _ = make_state(1, 2, 3)
    assert picks(state, 12) == "cbacbc" * 2
    assert Counter(picks(state, 600)) == {"a": 100, "b": 200, "c": 300}


def test_smooth_round_robin_interleaves_a_heavy_server() -> None:
    state, _ = make_state(5, 1, 1)
    assert picks(state, 7) == "aabacaa"  # nginx's example, not "aaaaabc"


def test_equal_weights_alternate() -> None:
    state, _ = make_state(1, 1, 1)
    assert picks(state, 6) == "abcabc"


def test_exclude_skips_servers_already_tried() -> None:
    state, _ = make_state(1, 2, 3)
    assert set(picks(state, 60, exclude=("c",))) == {"a", "b"}
    assert Counter(picks(state, 60, exclude=("c",))) == {"a": 20, "b": 40}
    assert picks(state, 3, exclude=("a", "b")) == "ccc"
    assert picks(state, 1, exclude=("a", "b", "c")) == "-"


def test_no_usable_server_gives_none() -> None:
    state, _ = make_state(1, 1)
    for s in state.servers:
        state.set_health(s, False)
    assert state.pick() is None
    state.set_health(server(state, "b"), True)
    assert name_of(state.pick()) == "b"


def test_unhealthy_server_is_skipped_and_the_rest_keep_their_weights() -> None:
    state, _ = make_state(1, 2, 3)
    state.set_health(server(state, "c"), False)
    assert Counter(picks(state, 300)) == {"a": 100, "b": 200}


def _hold(state: PoolState, count: int) -> str:
    """`count` requests that stay in flight; the names of the servers they went to."""
    out = []
    for _ in range(count):
        chosen = state.pick()
        assert chosen is not None
        state.begin(chosen)
        out.append(name_of(chosen))
    return "".join(out)


def test_least_outstanding_prefers_the_idle_server() -> None:
    state, _ = make_state(1, 1, balance="least_outstanding")
    first = state.pick()
    assert first is not None
    state.begin(first)
    second = state.pick()
    assert second is not None and second is not first
    state.begin(second)
    state.finish(first, ok=True)
    assert state.pick() is first  # idle again, the other still busy
    state.finish(second, ok=True)


def test_least_outstanding_weighs_in_flight_requests() -> None:
    state, _ = make_state(1, 3, balance="least_outstanding")
    assert Counter(_hold(state, 4)) == {"a": 1, "b": 3}
    assert Counter(_hold(state, 4)) == {"a": 1, "b": 3}
    assert [s.outstanding for s in state.servers] == [2, 6]
    # a is busy with a slow request: the next ones go to b until it has 3x a's load
    for s in state.servers:
        s.outstanding = 0
    state.begin(server(state, "a"))
    assert _hold(state, 3) == "bbb"


def test_least_outstanding_breaks_ties_by_weight() -> None:
    # sequential requests never overlap, so every pick is a tie: weights decide
    state, _ = make_state(1, 3, balance="least_outstanding")
    assert Counter(picks(state, 400)) == {"a": 100, "b": 300}
    state, _ = make_state(1, 1, 1, balance="least_outstanding")
    assert picks(state, 6) == "abcabc"


def test_outstanding_never_goes_negative() -> None:
    state, _ = make_state(1)
    a = server(state, "a")
    state.finish(a, ok=True)
    assert a.outstanding == 0


def test_fresh_pool_has_full_weights_even_with_slow_start() -> None:
    state, _ = make_state(1, 1, slow_start=60)
    assert [state.effective_weight(s) for s in state.servers] == [1.0, 1.0]


def test_slow_start_ramps_a_recovered_server_linearly() -> None:
    state, clock = make_state(1, 1, slow_start=100)
    b = server(state, "b")
    state.set_health(b, False)
    assert picks(state, 10) == "a" * 10
    state.set_health(b, True)
    assert state.effective_weight(b) == 0.1
    share_now = Counter(picks(state, 1100))["b"]
    clock.advance(50)
    assert state.effective_weight(b) == 0.55
    share_half = Counter(picks(state, 1550))["b"]
    clock.advance(50)
    assert state.effective_weight(b) == 1.0
    share_full = Counter(picks(state, 1000))["b"]
    clock.advance(1000)
    assert state.effective_weight(b) == 1.0
    # b's share of picks: 0.1/1.1, then 0.55/1.55, then 1/2
    assert abs(share_now - 100) <= 2
    assert abs(share_half - 550) <= 2
    assert share_full == 500


def test_slow_start_applies_to_least_outstanding_too() -> None:
    state, clock = make_state(1, 1, balance="least_outstanding", slow_start=10)
    b = server(state, "b")
    state.set_health(b, False)
    state.set_health(b, True)
    # one request on each: a's load 1/1, b's 1/0.1; a takes the next nine
    assert Counter(_hold(state, 2)) == {"a": 1, "b": 1}
    assert _hold(state, 9) == "a" * 9
    clock.advance(10)
    assert _hold(state, 9) == "b" * 9  # full weight: b catches up


def test_snapshot_reports_each_server() -> None:
    state, clock = make_state(2, 1, slow_start=10)
    a, b = state.servers
    state.begin(a)
    state.begin(a)
    state.finish(a, ok=False)
    state.set_health(b, False)
    state.set_health(b, True)
    clock.advance(5)
    assert state.snapshot() == [
        {
            "address": "127.0.0.1:9001",
            "weight": 2,
            "effective_weight": 2.0,
            "healthy": True,
            "ejected": 0.0,
            "outstanding": 1,
            "requests": 2,
            "failures": 1,
            "last_check": None,
        },
        {
            "address": "127.0.0.1:9002",
            "weight": 1,
            "effective_weight": 0.55,
            "healthy": True,
            "ejected": 0.0,
            "outstanding": 0,
            "requests": 0,
            "failures": 0,
            "last_check": None,
        },
    ]
