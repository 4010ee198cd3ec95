"""One upstream pool as one worker sees it: which servers are in rotation, and which is next.

A server is in rotation when the active checks say it is healthy and the passive checks
have not ejected it. Each worker keeps its own state and runs its own checks, as HAProxy
processes do without a shared table.

- Servers start healthy, so a fresh gateway serves at once (HAProxy's default); the
  active checks (proxy/health.py) take a dead one out after `fall` failed checks.
- Passive checks: `passive.max_failures` consecutive failed requests (a connection error
  or a 5xx) eject a server for `passive.cooldown` seconds; a success resets the count.
- Slow start: a server that comes back (healthy again, or its ejection over) has its
  weight ramped linearly from 10% to 100% over `pool.slow_start` seconds. Servers in
  rotation when the gateway starts get their full weight at once.
- Balancing: "round_robin" is nginx's smooth weighted round robin; "least_outstanding"
  takes the fewest in-flight requests per unit of weight, and breaks ties with the same
  smooth round robin among the tied servers (nginx's least_conn), so an idle pool still
  follows the weights.
- Connection limits: a server takes at most `pool.maxconn` requests at once (per
  worker); a request that finds every server in rotation full waits in the pool's
  queue (HAProxy's maxconn and `timeout queue`), first come first served, and takes
  the first slot that frees on a server it may use. At most `pool.max_queue` wait, each
  for at most `pool.queue_timeout`; past either it is refused (NoSlot), which no
  server is blamed for. A queue whose pool has no server left in rotation is emptied
  at once (no_healthy_server), not left to time out.
- Only a server's own failures count against it: a request that ends because the
  client left or broke a limit finishes with ok=None, which changes no count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from stockade.clock import Clock
from stockade.proxy.settings import Pool, Server

log = logging.getLogger(__name__)

SLOW_START_FLOOR = 0.1  # share of its weight a server gets the moment it comes back


@dataclass(eq=False)
class ServerState:
    """One server of a pool, in one worker. Times are monotonic seconds."""

    server: Server
    healthy: bool = True  # the active checks' verdict
    ejected_until: float | None = None  # passive checks: out of rotation until then
    consecutive_failures: int = 0  # failed requests in a row (passive)
    outstanding: int = 0  # requests in flight
    recovered_at: float | None = None  # back in rotation at; None: full weight
    requests: int = 0
    failures: int = 0
    check_successes: int = 0  # active checks passed in a row
    check_failures: int = 0  # active checks failed in a row
    last_check: str | None = None  # "HTTP 200", "timeout", ...; None: never checked
    current_weight: float = 0.0  # smooth weighted round robin's running score

    @property
    def address(self) -> str:
        return self.server.address


class NoSlot(Exception):
    """No server had a free slot in time: `reason` is queue_full or queue_timeout."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class _Waiter:
    """A request in the queue: resolved with its server (begun), or None (no server left)."""

    future: asyncio.Future[ServerState | None]
    exclude: Collection[str]


class PoolState:
    """The balancer, the passive checks and the queue of one pool, driven by the forwarder."""

    def __init__(self, pool: Pool, clock: Clock) -> None:
        self.pool = pool
        self.clock = clock
        self.servers = [ServerState(server) for server in pool.servers]
        self.cap = pool.maxconn or sys.maxsize  # requests in flight per server
        self.queue: deque[_Waiter] = deque()  # oldest on the left
        self.queued = 0  # requests that had to wait for a slot
        self.queue_full = 0  # refused: max_queue were waiting already
        self.queue_timeouts = 0  # refused: no slot within queue_timeout

    @property
    def name(self) -> str:
        return self.pool.name

    def now(self) -> float:
        return self.clock.monotonic_ns() / 1e9

    def pick(self, exclude: Collection[str] = ()) -> ServerState | None:
        """The server for the next request, or None when no server is usable.

        Usable: in rotation, not excluded, and below maxconn. When None, a
        request may still wait for a slot (wait_for_server).
        """
        now = self.now()
        cap = self.cap
        candidates = [
            s
            for s in self.servers
            if self._in_rotation(s, now) and s.outstanding < cap and s.address not in exclude
        ]
        if not candidates:
            return None
        if self.pool.balance == "least_outstanding":
            load = {s: s.outstanding / self.effective_weight(s, now) for s in candidates}
            lowest = min(load.values())
            candidates = [s for s in candidates if load[s] == lowest]
        return self._smooth_round_robin(candidates, now)

    def begin(self, server: ServerState) -> None:
        server.outstanding += 1
        server.requests += 1

    async def wait_for_server(self, exclude: Collection[str] = ()) -> ServerState | None:
        """When pick() found no free slot, or others are queued: a server, begun.

        None when no server in rotation is left to wait for; raises NoSlot
        when the queue is full or no slot frees within queue_timeout.
        """
        self._serve_queue()  # those already waiting go first
        server = self.pick(exclude)
        if server is not None:
            self.begin(server)
            return server
        now = self.now()
        if not any(self._in_rotation(s, now) and s.address not in exclude for s in self.servers):
            return None
        if len(self.queue) >= self.pool.max_queue:
            self.queue_full += 1
            raise NoSlot("queue_full")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), exclude)
        self.queue.append(waiter)
        self.queued += 1
        try:
            async with asyncio.timeout(self.pool.queue_timeout):
                return await waiter.future
        except TimeoutError:
            served = self._served(waiter)
            if served is not None:  # a slot came with the timer: take it
                return served
            self.queue_timeouts += 1
            raise NoSlot("queue_timeout") from None
        except BaseException:  # cancelled (the client left): a slot handed over goes on
            served = self._served(waiter)
            if served is not None:
                self.finish(served, ok=None)
            raise
        finally:
            with contextlib.suppress(ValueError):  # not there: served, or dropped
                self.queue.remove(waiter)

    def finish(self, server: ServerState, *, ok: bool | None) -> None:
        """A request ended and its slot frees (for the oldest request waiting, if any).

        ok=False: the server failed it (a connection error, a timeout, a 5xx);
        True: it answered; None: the outcome says nothing about the server
        (the client left, or its body broke a limit), so no count changes.
        """
        server.outstanding = max(0, server.outstanding - 1)
        if ok is not None:
            self._judge(server, ok)
        if self.queue:
            self._serve_queue()

    def _judge(self, server: ServerState, ok: bool) -> None:
        """The passive checks' part of finish()."""
        if ok:
            server.consecutive_failures = 0
            return
        server.failures += 1
        now = self.now()
        self._end_ejection_if_over(server, now)
        if server.ejected_until is not None:
            return  # already out; requests sent before the ejection do not extend it
        server.consecutive_failures += 1
        passive = self.pool.passive
        if server.consecutive_failures >= passive.max_failures:
            server.ejected_until = now + passive.cooldown
            server.consecutive_failures = 0
            log.warning(
                "pool %s: server %s ejected for %gs after %d failed requests in a row",
                self.name,
                server.address,
                passive.cooldown,
                passive.max_failures,
            )

    def set_health(self, server: ServerState, healthy: bool) -> None:
        """The active checks' verdict; coming back starts slow start."""
        if healthy and not server.healthy:
            server.recovered_at = self.now()
        server.healthy = healthy
        if self.queue:
            self._serve_queue()  # new room, or none left to wait for

    @staticmethod
    def _served(waiter: _Waiter) -> ServerState | None:
        future = waiter.future
        if future.done() and not future.cancelled():
            return future.result()
        return None

    def _serve_queue(self) -> None:
        """Give free slots to waiting requests, oldest first; drop them all if no server
        is in rotation any more (each answers no_healthy_server at once)."""
        queue = self.queue
        now = self.now()
        rotation = [s for s in self.servers if self._in_rotation(s, now)]
        if not rotation:
            while queue:
                waiter = queue.popleft()
                if not waiter.future.done():
                    waiter.future.set_result(None)
            return
        cap = self.cap
        skipped: list[_Waiter] = []
        while queue and any(s.outstanding < cap for s in rotation):
            waiter = queue.popleft()
            if waiter.future.done():
                continue  # cancelled: its request is gone
            server = self.pick(waiter.exclude)
            if server is None:
                skipped.append(waiter)  # the free slots are on servers it excludes
                continue
            self.begin(server)
            waiter.future.set_result(server)
        queue.extendleft(reversed(skipped))

    def effective_weight(self, server: ServerState, now: float | None = None) -> float:
        """The weight, ramped from 10% to 100% during slow start."""
        now = self.now() if now is None else now
        self._end_ejection_if_over(server, now)
        weight = float(server.server.weight)
        ramp = self.pool.slow_start
        if server.recovered_at is None or ramp <= 0:
            return weight
        elapsed = now - server.recovered_at
        if elapsed >= ramp:
            return weight
        share = SLOW_START_FLOOR + (1 - SLOW_START_FLOOR) * max(0.0, elapsed) / ramp
        return weight * share

    def snapshot(self) -> list[dict[str, object]]:
        """Per server, for `stockade status` and metrics."""
        now = self.now()
        rows: list[dict[str, object]] = []
        for s in self.servers:
            self._end_ejection_if_over(s, now)
            left = 0.0 if s.ejected_until is None else s.ejected_until - now
            rows.append(
                {
                    "address": s.address,
                    "weight": s.server.weight,
                    "effective_weight": round(self.effective_weight(s, now), 3),
                    "healthy": s.healthy,
                    "ejected": round(left, 1),
                    "outstanding": s.outstanding,
                    "requests": s.requests,
                    "failures": s.failures,
                    "last_check": s.last_check,
                }
            )
        return rows

    def _in_rotation(self, server: ServerState, now: float) -> bool:
        self._end_ejection_if_over(server, now)
        return server.healthy and server.ejected_until is None

    def _end_ejection_if_over(self, server: ServerState, now: float) -> None:
        """Ejections end lazily, on the first look after the cool-down."""
        if server.ejected_until is not None and now >= server.ejected_until:
            server.recovered_at = server.ejected_until  # slow start counts from then
            server.ejected_until = None
            log.info("pool %s: server %s back in rotation", self.name, server.address)

    def _smooth_round_robin(self, candidates: list[ServerState], now: float) -> ServerState:
        """nginx's algorithm: every candidate gains its weight, the leader pays the total.

        Weights 5:1:1 give a a b a c a a, not a a a a a b c.
        """
        total = 0.0
        best = candidates[0]
        for s in candidates:
            weight = self.effective_weight(s, now)
            s.current_weight += weight
            total += weight
            if s.current_weight > best.current_weight:
                best = s
        best.current_weight -= total
        return best
