"""Active checks with a scripted probe and a fake clock: rise, fall, statuses, timeouts."""

from __future__ import annotations

import asyncio
import logging

import pytest
from upstream_harness import ScriptedProbe, make_state, server, usable

from stockade.proxy.health import HealthChecker
from stockade.proxy.settings import HealthCheck

CHECK = HealthCheck(path="/healthz", interval=2.0, timeout=1.0, rise=2, fall=3)


def _checker(
    check: HealthCheck = CHECK, **answers: int | BaseException | str | None
) -> tuple[HealthChecker, ScriptedProbe]:
    state, clock = make_state(1, 1, health=check)
    probe = ScriptedProbe(**answers)
    return HealthChecker(state, clock, probe), probe


def _rounds(checker: HealthChecker, count: int) -> None:
    async def run() -> None:
        for _ in range(count):
            await checker.check_once()

    asyncio.run(run())


def test_fall_failures_in_a_row_take_a_server_down(caplog: pytest.LogCaptureFixture) -> None:
    checker, probe = _checker(a=503)
    a = server(checker.state, "a")
    with caplog.at_level(logging.INFO, logger="stockade.proxy.health"):
        _rounds(checker, 2)
        assert a.healthy and usable(checker.state) == "ab"
        _rounds(checker, 1)
        assert not a.healthy and usable(checker.state) == "b"
        _rounds(checker, 5)  # still down: no more log lines
    assert probe.calls[:2] == [("a", "/healthz"), ("b", "/healthz")]
    assert len(probe.calls) == 16
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "pool api: server 127.0.0.1:9001 is DOWN after 3 failed checks "
            "(last: HTTP 503, check took 0 ms)",
        )
    ]
    assert checker.state.snapshot()[0]["last_check"] == "HTTP 503"
    assert checker.state.snapshot()[1]["last_check"] == "HTTP 200"


def test_rise_passes_in_a_row_bring_it_back(caplog: pytest.LogCaptureFixture) -> None:
    checker, probe = _checker(a=None)
    a = server(checker.state, "a")
    _rounds(checker, 3)
    assert not a.healthy
    probe.answers["a"] = 200
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stockade.proxy.health"):
        _rounds(checker, 1)
        assert not a.healthy
        _rounds(checker, 1)
        assert a.healthy and usable(checker.state) == "ab"
        _rounds(checker, 3)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.INFO,
            "pool api: server 127.0.0.1:9001 is UP after 2 passed checks (check took 0 ms)",
        )
    ]


def test_a_pass_breaks_a_run_of_failures_and_the_other_way_round() -> None:
    checker, probe = _checker()
    a = server(checker.state, "a")
    for answer in (500, 500, 200, 500, 500):
        probe.answers["a"] = answer
        _rounds(checker, 1)
    assert a.healthy  # never three in a row
    probe.answers["a"] = 500
    _rounds(checker, 1)
    assert not a.healthy
    for answer in (200, 500, 200):
        probe.answers["a"] = answer
        _rounds(checker, 1)
    assert not a.healthy  # never two in a row
    probe.answers["a"] = 200
    _rounds(checker, 1)
    assert a.healthy


def test_only_the_expected_status_passes() -> None:
    check = HealthCheck(expect_status=204, rise=1, fall=1)
    checker, probe = _checker(check, a=200, b=204)
    _rounds(checker, 1)
    assert usable(checker.state) == "b"
    assert checker.state.snapshot()[0]["last_check"] == "HTTP 200"
    probe.answers["a"] = 301  # redirects are not followed
    _rounds(checker, 1)
    assert usable(checker.state) == "b"
    probe.answers["a"] = 204
    _rounds(checker, 1)
    assert usable(checker.state) == "ab"


@pytest.mark.parametrize(
    ("answer", "last_check"),
    [
        (None, "no response"),
        (ConnectionRefusedError(111, "refused"), "connect failed: Connection refused"),
        (RuntimeError("boom"), "RuntimeError: boom"),
        ("hang", "timeout after 0.05s"),
    ],
)
def test_no_response_is_a_failure(answer: BaseException | str | None, last_check: str) -> None:
    check = HealthCheck(timeout=0.05, fall=1)
    checker, _ = _checker(check, a=answer)
    _rounds(checker, 1)
    assert usable(checker.state) == "b"
    assert checker.state.snapshot()[0]["last_check"] == last_check


def test_a_hanging_server_does_not_hold_up_the_others() -> None:
    checker, probe = _checker(HealthCheck(timeout=0.05, fall=1), a="hang")

    async def run() -> None:
        async with asyncio.timeout(5):
            await checker.check_once()

    asyncio.run(run())
    assert sorted(name for name, _ in probe.calls) == ["a", "b"]
    assert usable(checker.state) == "b"


def test_coming_back_starts_slow_start() -> None:
    state, clock = make_state(1, 1, health=HealthCheck(rise=1, fall=1), slow_start=30)
    probe = ScriptedProbe(a=500)
    checker = HealthChecker(state, clock, probe)
    a = server(state, "a")
    _rounds(checker, 1)
    probe.answers["a"] = 200
    _rounds(checker, 1)
    assert state.effective_weight(a) == 0.1
    clock.advance(30)
    assert state.effective_weight(a) == 1.0


def test_disabled_checks_do_nothing() -> None:
    checker, probe = _checker(HealthCheck(enabled=False), a=500)

    async def run() -> None:
        await checker.start()
        await checker.check_once()
        await checker.stop()

    asyncio.run(run())
    assert probe.calls == []
    assert usable(checker.state) == "ab"


def test_check_once_without_start_or_probe_is_an_error() -> None:
    state, clock = make_state(1)
    checker = HealthChecker(state, clock)
    with pytest.raises(RuntimeError, match="start"):
        asyncio.run(checker.check_once())


def test_waits_are_the_interval_give_or_take_ten_percent() -> None:
    checker, _ = _checker()
    delays = [checker.next_delay() for _ in range(1000)]
    assert 1.8 <= min(delays) < 1.9
    assert 2.1 < max(delays) <= 2.2


def test_start_checks_at_once_and_stop_cancels_cleanly() -> None:
    checker, probe = _checker(HealthCheck(interval=3600, rise=1, fall=1), a=500)

    async def run() -> None:
        await checker.start()
        await checker.start()  # idempotent: still one loop
        async with asyncio.timeout(5):
            while len(probe.calls) < 2:
                await asyncio.sleep(0.01)
        await checker.stop()
        await checker.stop()

    asyncio.run(run())
    assert len(probe.calls) == 2  # one round, then a wait of an hour that stop() cut short
    assert usable(checker.state) == "b"
