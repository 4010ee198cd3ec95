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
"""

from __future__ import annotations

import logging
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


class PoolState:
    """The balancer and the passive checks of one pool, driven by the forwarder."""

    def __init__(self, pool: Pool, clock: Clock) -> None:
        self.pool = pool
        self.clock = clock
        self.servers = [ServerState(server) for server in pool.servers]

    @property
    def name(self) -> str:
        return self.pool.name

    def now(self) -> float:
        return self.clock.monotonic_ns() / 1e9

    def pick(self, exclude: Collection[str] = ()) -> ServerState | None:
        """The server for the next request, or None when no server is usable."""
        now = self.now()
        candidates = [
            s for s in self.servers if self._in_rotation(s, now) and s.address not in exclude
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

    def finish(self, server: ServerState, *, ok: bool) -> None:
        """A request ended; ok=False for a connection error, a timeout or a 5xx."""
        server.outstanding = max(0, server.outstanding - 1)
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
