"""The real probe against aiohttp servers on 127.0.0.1: down after `fall`, up after `rise`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from upstream_harness import HealthServer, wait_for

from stockade.clock import FakeClock, SystemClock
from stockade.proxy.health import HealthChecker, HttpProbe
from stockade.proxy.settings import HealthCheck, Pool
from stockade.proxy.upstream import PoolState

CHECK = HealthCheck(path="/health", interval=1.0, timeout=1.0, rise=2, fall=3)


def _run(test: Callable[[HealthServer, HealthServer], Awaitable[None]]) -> None:
    """Run `test` with two live servers, stopped afterwards whatever happens."""

    async def main() -> None:
        one, two = HealthServer(), HealthServer()
        await one.start()
        await two.start()
        try:
            async with asyncio.timeout(60):
                await test(one, two)
        finally:
            await one.stop()
            await two.stop()

    asyncio.run(main())


def _state(one: HealthServer, two: HealthServer, check: HealthCheck = CHECK) -> PoolState:
    pool = Pool(name="api", servers=(one.server, two.server), health=check)
    return PoolState(pool, FakeClock())


def test_a_stopped_server_goes_down_after_fall_and_back_up_after_rise() -> None:
    async def test(one: HealthServer, two: HealthServer) -> None:
        state = _state(one, two)
        probe = HttpProbe()
        await probe.open()
        try:
            checker = HealthChecker(state, FakeClock(), probe)
            await checker.check_once()
            assert [s.last_check for s in state.servers] == ["HTTP 200", "HTTP 200"]

            await one.stop()
            for _ in range(CHECK.fall - 1):
                await checker.check_once()
            assert state.servers[0].healthy
            await checker.check_once()
            assert not state.servers[0].healthy
            assert state.servers[0].last_check == "connect failed: Connection refused"
            assert state.pick(exclude={two.server.address}) is None

            await one.start()  # same port again
            for _ in range(CHECK.rise - 1):
                await checker.check_once()
            assert not state.servers[0].healthy
            await checker.check_once()
            assert state.servers[0].healthy
            assert state.servers[1].healthy  # the other one never moved
        finally:
            await probe.close()

    _run(test)


def test_a_server_answering_500_is_down() -> None:
    async def test(one: HealthServer, two: HealthServer) -> None:
        one.status = 500
        state = _state(one, two, HealthCheck(fall=1))
        probe = HttpProbe()
        await probe.open()
        try:
            await HealthChecker(state, FakeClock(), probe).check_once()
        finally:
            await probe.close()
        assert [s.healthy for s in state.servers] == [False, True]
        assert state.servers[0].last_check == "HTTP 500"

    _run(test)


def test_the_probe_says_who_it_is_and_keeps_no_connection() -> None:
    async def test(one: HealthServer, two: HealthServer) -> None:
        probe = HttpProbe()
        await probe.open()
        try:
            assert await probe(one.server, CHECK) == 200
            assert await probe(one.server, HealthCheck(path="/nope")) == 404
        finally:
            await probe.close()
        headers = one.requests[0]
        assert headers["User-Agent"] == "stockade-health/1"
        assert headers["Connection"] == "close"
        assert "Cookie" not in headers

    _run(test)


def test_a_slow_server_times_out() -> None:
    async def test(one: HealthServer, two: HealthServer) -> None:
        one.delay = 1.0
        state = _state(one, two, HealthCheck(timeout=0.2, fall=1))
        probe = HttpProbe()
        await probe.open()
        try:
            async with asyncio.timeout(2):
                await HealthChecker(state, FakeClock(), probe).check_once()
        finally:
            await probe.close()
        assert [s.healthy for s in state.servers] == [False, True]
        assert state.servers[0].last_check == "timeout after 0.2s"

    _run(test)


def test_started_checker_follows_a_server_down_and_up_on_its_own() -> None:
    """start() runs the loop with its own session; stop() closes it (warnings are errors)."""

    async def test(one: HealthServer, two: HealthServer) -> None:
        check = HealthCheck(interval=0.05, timeout=1.0, rise=2, fall=2)
        state = _state(one, two, check)
        checker = HealthChecker(state, SystemClock())
        await checker.start()
        try:
            await wait_for(lambda: len(one.requests) >= 2)
            await one.stop()
            await wait_for(lambda: not state.servers[0].healthy)
            await one.start()
            await wait_for(lambda: state.servers[0].healthy)
            assert state.servers[1].healthy
        finally:
            await checker.stop()
        served = len(two.requests)
        await asyncio.sleep(0.2)
        assert len(two.requests) == served  # no check after stop()

    _run(test)
