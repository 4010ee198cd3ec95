"""Helpers for the upstream pool and health check tests (no sockets except HealthServer)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from stockade.clock import FakeClock
from stockade.proxy.settings import HealthCheck, PassiveCheck, Pool, Server
from stockade.proxy.upstream import PoolState, ServerState

NAMES = "abcdef"


def make_pool(
    *weights: int,
    balance: str = "round_robin",
    slow_start: float = 0.0,
    health: HealthCheck | None = None,
    passive: PassiveCheck | None = None,
) -> Pool:
    """Servers a, b, c, ... on 127.0.0.1:9001, 9002, ... with the given weights."""
    servers = tuple(Server("127.0.0.1", 9001 + i, w) for i, w in enumerate(weights))
    return Pool(
        name="api",
        servers=servers,
        balance=balance,
        health=health or HealthCheck(),
        passive=passive or PassiveCheck(),
        slow_start=slow_start,
    )


def make_state(
    *weights: int,
    balance: str = "round_robin",
    slow_start: float = 0.0,
    health: HealthCheck | None = None,
    passive: PassiveCheck | None = None,
) -> tuple[PoolState, FakeClock]:
    clock = FakeClock()
    pool = make_pool(
        *weights, balance=balance, slow_start=slow_start, health=health, passive=passive
    )
    return PoolState(pool, clock), clock


def name_of(server: ServerState | None) -> str:
    return "-" if server is None else NAMES[server.server.port - 9001]


def address_of(name: str) -> str:
    return f"127.0.0.1:{9001 + NAMES.index(name)}"


def server(state: PoolState, name: str) -> ServerState:
    return state.servers[NAMES.index(name)]


def picks(state: PoolState, count: int, *, exclude: tuple[str, ...] = ()) -> str:
    """The names of `count` sequential requests (each finished before the next)."""
    out = []
    for _ in range(count):
        chosen = state.pick(exclude={address_of(n) for n in exclude})
        if chosen is not None:
            state.begin(chosen)
            state.finish(chosen, ok=True)
        out.append(name_of(chosen))
    return "".join(out)


def usable(state: PoolState) -> str:
    """The names of the servers pick() can return now, without sending a request."""
    found: list[str] = []
    while (chosen := state.pick(exclude={address_of(n) for n in found})) is not None:
        found.append(name_of(chosen))
    return "".join(sorted(found))


class ScriptedProbe:
    """A fake probe: each server answers what `answers` holds for its name right now.

    An int is a status, None is no response, an exception is raised, and "hang" never
    answers (the checker's timeout has to cut it off).
    """

    def __init__(self, **answers: int | BaseException | str | None) -> None:
        self.answers: dict[str, int | BaseException | str | None] = dict(answers)
        self.calls: list[tuple[str, str]] = []  # (server name, path)

    async def __call__(self, server: Server, check: HealthCheck) -> int | None:
        name = NAMES[server.port - 9001]
        self.calls.append((name, check.path))
        answer = self.answers.get(name, 200)
        if isinstance(answer, BaseException):
            raise answer
        if answer == "hang":
            await asyncio.Event().wait()
        assert not isinstance(answer, str)
        return answer


class HealthServer:
    """A real aiohttp server on 127.0.0.1 whose /health answers `status`.

    stop() and start() again keep the port, as a restarted upstream would.
    """

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.delay = 0.0  # seconds before answering
        self.port = 0
        self.requests: list[dict[str, str]] = []  # headers of each /health request
        self._runner: web.AppRunner | None = None

    @property
    def server(self) -> Server:
        return Server("127.0.0.1", self.port)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.headers))
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.json_response({"ok": self.status == 200}, status=self.status)


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until `condition` holds (an event to wait for, not a window to sit out)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
