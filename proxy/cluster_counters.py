"""Counters shared by every node of a cluster, in Redis: limits, quotas and anomaly rules
with `scope = "cluster"`.

Each check-and-count is one Lua script, so it is atomic across all nodes and
workers. Rate windows work as the local shared-memory ones (WindowCounters):
a window is cut into BUCKETS sub-windows in one hash, every bucket that
overlaps the last window is counted, so a limit is never exceeded in any
rolling window and a client hammering it gets 95..100% of it. Time is
Redis's own (TIME), so the nodes' clocks do not matter.

Keys ({prefix} from [cluster] key_prefix):
    {prefix}rl:{digest}                HASH  bucket number -> count (limits, plan rates)
    {prefix}an:{digest}                HASH  the same, for anomaly counters
    {prefix}quota:{consumer}:{period}  STRING the period's count, expiring a week after it

Redis away: every call is bounded by [cluster] timeout; a failed call marks
the worker degraded for retry_interval (calls in between go straight to the
fallback, so a dead Redis costs no time per request), logs once, and the
caller falls back (`on_redis_down`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from stockade.cluster_settings import ClusterConfig
from stockade.proxy.settings import ProxyConfig
from stockade.redis_conn import RedisError, connect, describe_error

log = logging.getLogger("stockade.proxy")

BUCKETS = 20  # as WindowCounters: a window is cut into 20, and 21 are kept
QUOTA_KEEP = 7 * 86400  # seconds a period's count stays after the period ends

# Shared by both window scripts: count `amount` in KEYS[k] (window in ms) unless
# the total would pass `limit` (< 0: no limit). Returns allowed (1/0), the total
# afterwards, and microseconds until (refused) enough has left the window for
# `amount` to fit, or (allowed) the oldest counted event leaves it.
_WINDOW = f"local BUCKETS, RING = {BUCKETS}, {BUCKETS + 1}\n" + """
local function window(key, window_ms, amount, limit, now_us)
  local width = window_ms * 1000 / BUCKETS
  local current = math.floor(now_us / width)
  local oldest = current - BUCKETS
  local fields = redis.call('HGETALL', key)
  local total, buckets = 0, {}
  for i = 1, #fields, 2 do
    local b, c = tonumber(fields[i]), tonumber(fields[i + 1])
    if b < oldest then
      redis.call('HDEL', key, fields[i])
    else
      total = total + c
      buckets[#buckets + 1] = {b, c}
    end
  end
  table.sort(buckets, function(x, y) return x[1] < y[1] end)
  if limit >= 0 and total + amount > limit then
    local need, released = total + amount - limit, 0
    for _, bc in ipairs(buckets) do
      released = released + bc[2]
      if released >= need then
        return {0, total, math.floor((bc[1] + RING) * width - now_us)}
      end
    end
    return {0, total, math.floor(RING * width)}
  end
  if amount > 0 then
    redis.call('HINCRBY', key, current, amount)
    redis.call('PEXPIRE', key, math.ceil(RING * width / 1000))
    total = total + amount
    if #buckets == 0 then buckets[1] = {current, amount} end
  end
  local first = current
  if #buckets > 0 then first = buckets[1][1] end
  return {1, total, math.floor((first + RING) * width - now_us)}
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

LIMIT_SCRIPT = (
    _WINDOW
    + """
return window(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), now_us)
"""
)

# Several counters in one round trip (an anomaly rule's metrics). ARGV holds
# (window_ms, amount, depends) per key: with depends = j > 0 the amount counts
# only if key j was counted and its total is now 1 (a path seen for the first
# time makes a distinct path). Returns each key's total.
MULTI_SCRIPT = (
    _WINDOW
    + """
local totals, counted = {}, {}
for i = 1, #KEYS do
  local window_ms = tonumber(ARGV[3 * i - 2])
  local amount = tonumber(ARGV[3 * i - 1])
  local depends = tonumber(ARGV[3 * i])
  if depends > 0 and not (counted[depends] and totals[depends] == 1) then
    amount = 0
  end
  local result = window(KEYS[i], window_ms, amount, -1, now_us)
  totals[i] = result[2]
  counted[i] = amount > 0
end
return totals
"""
)

QUOTA_SCRIPT = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then
  return {0, used}
end
used = redis.call('INCR', KEYS[1])
if used == 1 then
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
return {1, used}
"""

def cluster_scoped(config: ProxyConfig) -> bool:
    """Whether anything in the proxy counts in the cluster (else no Redis client at all)."""
    if not config.cluster.enabled:
        return False
    return (
        any(rule.scope == "cluster" for rule in config.rate_limiting.limits)
        or config.quotas.scope == "cluster"
        or any(rule.scope == "cluster" for rule in config.anomaly.rules)
    )


SCRIPTS = {"limit": LIMIT_SCRIPT, "multi": MULTI_SCRIPT, "quota": QUOTA_SCRIPT}

Op = tuple[str, float, int, int]  # key, window seconds, amount, depends (1-based, 0 = none)


Call = tuple[str, list[str], list[Any], "asyncio.Future[Any]"]  # script, keys, args, answer


class ClusterCounters:
    """One worker's client for the cluster's counters (made in the worker's event loop)."""

    def __init__(self, config: ClusterConfig, monotonic: Callable[[], float] = time.monotonic):
        self.config = config
        self.prefix = config.key_prefix
        self.monotonic = monotonic
        self.degraded = False
        self.fallbacks = 0  # calls answered by the fallback, for status and metrics
        self.on_state: Callable[[bool], None] | None = None  # degraded? (metrics)
        self._retry_at = 0.0
        self._client: aioredis.Redis | None = None
        self._shas: dict[str, str] = {}  # script name -> SHA1 once loaded
        self._pending: list[Call] = []  # calls waiting for the next batch
        self._sending = False  # a batch is on its way
        self._tasks: set[asyncio.Task[None]] = set()

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            self._client = connect(self.config)
        return self._client

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """The script's result, or None when Redis is unavailable (the caller falls back).

        Calls made while a batch is on its way wait and go together in the next
        one (a pipeline: one round trip), so under load a worker pays one round
        trip for many requests instead of one each.
        """
        if self.degraded and self.monotonic() < self._retry_at:
            self.fallbacks += 1
            return None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((script, keys, args, future))
        if not self._sending:
            self._sending = True
            asyncio.get_running_loop().call_soon(self._send_pending)
        return await future

    def _send_pending(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[Call]) -> None:
        try:
            async with asyncio.timeout(self.config.timeout):
                results = await self._execute(batch)
        except (RedisError, OSError, TimeoutError) as exc:
            self._down(exc)
            results = [None] * len(batch)
            self.fallbacks += len(batch)
        else:
            self._up()
        finally:
            if self._pending:
                self._send_pending()
            else:
                self._sending = False
        for (*_, future), result in zip(batch, results, strict=True):
            if not future.done():  # its request may be gone (the client hung up)
                future.set_result(result)

    async def _execute(self, batch: list[Call], reload: bool = True) -> list[Any]:
        client = self._redis()
        if not self._shas:
            for name, text in SCRIPTS.items():
                self._shas[name] = await client.script_load(text)
        pipe = client.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(self._shas[script], len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        if reload and any(isinstance(r, NoScriptError) for r in results):
            self._shas.clear()  # a restarted Redis forgot the scripts: load them again
            return await self._execute(batch, reload=False)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def _up(self) -> None:
        if self.degraded:
            self.degraded = False
            log.warning("cluster: Redis at %s is back; counting there again", self._where())
            if self.on_state is not None:
                self.on_state(False)

    def available(self) -> bool:
        """False while degraded and before the next retry (callers fall back at once)."""
        return not self.degraded or self.monotonic() >= self._retry_at

    def _where(self) -> str:
        return self.config.shown_url()

    def _down(self, exc: BaseException) -> None:
        self._retry_at = self.monotonic() + self.config.retry_interval
        if not self.degraded:
            self.degraded = True
            log.warning(
                "cluster: Redis at %s unreachable (%s): degraded; cluster-scoped limits, "
                "quotas and anomaly counters fall back (%s) until it answers again",
                self._where(),
                describe_error(exc),
                self.config.on_redis_down,
            )
            if self.on_state is not None:
                self.on_state(True)

    async def limit(
        self, key: str, window: float, amount: int, limit: int | None
    ) -> tuple[bool, int, float] | None:
        """As WindowCounters.update, counted in Redis; None when Redis is unavailable."""
        result = await self._run(
            "limit",
            [f"{self.prefix}rl:{key}"],
            [int(window * 1000), amount, -1 if limit is None else limit],
        )
        if result is None:
            return None
        allowed, total, wait_us = result
        return bool(allowed), int(total), max(0.0, int(wait_us) / 1e6)

    async def add_many(self, ops: list[Op]) -> list[int] | None:
        """Count several anomaly counters at once; their totals (None: unavailable)."""
        keys = [f"{self.prefix}an:{key}" for key, _, _, _ in ops]
        args: list[Any] = []
        for _, window, amount, depends in ops:
            args += [int(window * 1000), amount, depends]
        result = await self._run("multi", keys, args)
        return None if result is None else [int(v) for v in result]

    async def clear(self, keys: list[str]) -> None:
        """Forget anomaly counters (after a rule acted on them)."""
        if not keys or (self.degraded and self.monotonic() < self._retry_at):
            return
        try:
            async with asyncio.timeout(self.config.timeout):
                await self._redis().delete(*(f"{self.prefix}an:{k}" for k in keys))
        except (RedisError, OSError, TimeoutError) as exc:
            self._down(exc)

    async def quota(
        self, consumer: str, period: str, quota: int, ends: float
    ) -> tuple[bool, int] | None:
        """Count one request against a quota unless it is used up: (allowed, used)."""
        expires_ms = int((ends + QUOTA_KEEP) * 1000)
        result = await self._run(
            "quota", [f"{self.prefix}quota:{consumer}:{period}"], [quota, expires_ms]
        )
        if result is None:
            return None
        allowed, used = result
        return bool(allowed), int(used)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            try:
                async with asyncio.timeout(self.config.timeout):
                    await self._client.aclose()
            except (RedisError, OSError, TimeoutError):
                pass
            self._client = None
