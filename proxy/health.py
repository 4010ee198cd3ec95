"""Active HTTP health checks of one pool's servers (HAProxy's "Health Checks").

Every `health.interval` seconds (give or take 10%, so workers drift apart) each server
gets `GET health.path`. A response with `health.expect_status` passes; any other status,
a timeout or a connection error fails. `fall` failures in a row take a healthy server
out of rotation, `rise` passes in a row bring it back (with slow start). Each
transition is logged once: WARNING for down, INFO for up.

A probe is any `async (server, check) -> status`; it answers None or raises when there
was no response. Every probe is cut off at `health.timeout`, so a check never hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import aiohttp
from yarl import URL

from stockade.clock import Clock
from stockade.proxy.settings import HealthCheck, Server
from stockade.proxy.upstream import PoolState, ServerState

log = logging.getLogger(__name__)

Probe = Callable[[Server, HealthCheck], Awaitable[int | None]]

USER_AGENT = "stockade-health/1"
JITTER = 0.1  # each wait is the interval +- 10%


class CheckResult(NamedTuple):
    passed: bool
    text: str  # "HTTP 200", "timeout after 1s", "connect failed: Connection refused"
    millis: int  # how long the probe took


class HttpProbe:
    """The default probe: one GET per check on a fresh connection, body unread."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            headers={"User-Agent": USER_AGENT, "Connection": "close"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, server: Server, check: HealthCheck) -> int | None:
        if self._session is None:
            raise RuntimeError("HttpProbe.open() was not called")
        url = URL(f"http://{server.address}{check.path}", encoded=True)
        async with self._session.get(
            url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=check.timeout)
        ) as response:
            return response.status


class HealthChecker:
    """Checks one pool's servers and tells the pool's state what it found."""

    def __init__(self, state: PoolState, clock: Clock, probe: Probe | None = None) -> None:
        self.state = state
        self.clock = clock
        self.check = state.pool.health
        self._probe = probe
        self._http: HttpProbe | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Check at once, then every interval, until stop(). Nothing when disabled."""
        if not self.check.enabled or self._task is not None:
            return
        if self._probe is None:
            self._http = HttpProbe()
            await self._http.open()
        self._task = asyncio.create_task(self._run(), name=f"health-{self.state.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    def next_delay(self) -> float:
        return self.check.interval * random.uniform(1 - JITTER, 1 + JITTER)

    async def check_once(self) -> None:
        """Probe every server once, concurrently, and apply rise/fall."""
        if not self.check.enabled:
            return
        results = await asyncio.gather(*(self._probe_one(s) for s in self.state.servers))
        for server, result in zip(self.state.servers, results, strict=True):
            self._record(server, result)

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:
                log.exception("pool %s: health check round failed", self.state.name)
            await asyncio.sleep(self.next_delay())

    async def _probe_one(self, server: ServerState) -> CheckResult:
        probe = self._probe or self._http
        if probe is None:
            raise RuntimeError("HealthChecker.start() was not called and no probe was given")
        started = self.clock.monotonic_ns()
        try:
            async with asyncio.timeout(self.check.timeout):
                status = await probe(server.server, self.check)
        except Exception as exc:
            passed, text = False, _describe(exc, self.check.timeout)
        else:
            passed = status == self.check.expect_status
            text = "no response" if status is None else f"HTTP {status}"
        return CheckResult(passed, text, (self.clock.monotonic_ns() - started) // 1_000_000)

    def _record(self, server: ServerState, result: CheckResult) -> None:
        server.last_check = result.text
        if result.passed:
            server.check_successes += 1
            server.check_failures = 0
        else:
            server.check_failures += 1
            server.check_successes = 0
        where = f"pool {self.state.name}: server {server.address}"
        if server.healthy and server.check_failures >= self.check.fall:
            self.state.set_health(server, False)
            log.warning(
                "%s is DOWN after %d failed checks (last: %s, check took %d ms)",
                where,
                server.check_failures,
                result.text,
                result.millis,
            )
        elif not server.healthy and server.check_successes >= self.check.rise:
            self.state.set_health(server, True)
            log.info(
                "%s is UP after %d passed checks (check took %d ms)",
                where,
                server.check_successes,
                result.millis,
            )


def _describe(exc: BaseException, timeout: float) -> str:
    """One short phrase for why a check got no usable response."""
    if isinstance(exc, TimeoutError):
        return f"timeout after {timeout:g}s"
    if isinstance(exc, OSError) and exc.errno:  # aiohttp's connector errors included
        return f"connect failed: {os.strerror(exc.errno)}"
    return f"{type(exc).__name__}: {exc}"[:200]
