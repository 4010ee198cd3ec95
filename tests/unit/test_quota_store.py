"""Quota periods in a time zone, counting across processes, and persistence."""

from __future__ import annotations

import asyncio
import datetime
import os
import zoneinfo
from pathlib import Path

from stockade.proxy.quota import (
    DAY,
    MONTH,
    QuotaCounters,
    UsageWriter,
    consumer_id,
    period,
    prepare_database,
    read_usage,
)

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def _at(text: str, zone: zoneinfo.ZoneInfo) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def test_days_and_months_begin_in_the_configured_zone() -> None:
    # 23:30 UTC on Nov 24 is already Nov 25 in Berlin
    now = _at("2026-11-24T23:30:00", zoneinfo.ZoneInfo("UTC"))
    day = period(DAY, now, BERLIN)
    assert day.label == "2026-11-25"
    assert day.ends == _at("2026-11-26T00:00:00", BERLIN)
    month = period(MONTH, _at("2026-12-31T23:59:00", BERLIN), BERLIN)
    assert month.label == "2026-12" and month.ends == _at("2027-01-01T00:00:00", BERLIN)
    # the day the clocks go back is 25 hours long
    autumn = period(DAY, _at("2026-10-25T12:00:00", BERLIN), BERLIN)
    assert autumn.ends - _at("2026-10-25T00:00:00", BERLIN) == 25 * 3600


def test_quota_counts_up_to_the_limit_and_resets_with_the_period() -> None:
    counters = QuotaCounters(64, BERLIN)
    now = _at("2026-11-24T10:00:00", BERLIN)
    today = period(DAY, now, BERLIN)
    results = [counters.consume("acme", "free", today, 3, now, 100.0) for _ in range(4)]
    assert results == [(True, 1), (True, 2), (True, 3), (False, 3)]
    tomorrow = period(DAY, today.ends + 1, BERLIN)
    assert counters.consume("acme", "free", tomorrow, 3, today.ends + 1, 200.0) == (True, 1)


def test_forked_workers_never_exceed_a_quota() -> None:
    counters = QuotaCounters(64, BERLIN)
    now = _at("2026-11-24T10:00:00", BERLIN)
    today = period(DAY, now, BERLIN)
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - in the child
            for _ in range(300):
                counters.consume("acme", "free", today, 1000, now, 100.0)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    assert counters.consume("acme", "free", today, 1000, now, 100.0) == (False, 1000)


def test_usage_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "state" / "usage.db"
    prepare_database(db)
    now = _at("2026-11-24T10:00:00", BERLIN)
    today = period(DAY, now, BERLIN)
    month = period(MONTH, now, BERLIN)
    first = QuotaCounters(64, BERLIN)
    for _ in range(7):
        first.consume("acme", "pro", today, 100, now, 100.0)
        first.consume("acme", "pro", month, 1000, now, 100.0)
    asyncio.run(UsageWriter(db, first).flush())
    stored = {(u.consumer, u.period): u.count for u in read_usage(db)}
    assert stored == {("acme", "2026-11-24"): 7, ("acme", "2026-11"): 7}

    second = QuotaCounters(64, BERLIN)  # a new process after a restart
    assert second.load(read_usage(db), now, 100.0) == 2
    assert second.consume("acme", "pro", today, 100, now, 100.0) == (True, 8)
    # yesterday's rows are not loaded as today's
    assert QuotaCounters(64, BERLIN).load(read_usage(db), today.ends + 5, 100.0) == 1


def test_a_lower_count_never_overwrites_a_higher_one(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    prepare_database(db)
    writer = UsageWriter(db, QuotaCounters(64, BERLIN))
    writer.write([("acme", "2026-11-24", "free", 10)])
    writer.write([("acme", "2026-11-24", "free", 4)])  # a worker that saw less
    assert read_usage(db)[0].count == 10


def test_long_consumer_ids_are_hashed() -> None:
    assert consumer_id("short") == "short"
    long_id = consumer_id("x" * 500)
    assert long_id.startswith("sha256:") and len(long_id) < 64


def test_the_gateways_quota_resets_at_local_midnight() -> None:
    """Through the post-auth stage, with the wall clock injected (no day-long sleep)."""
    from dataclasses import replace

    from stockade.proxy.context import RequestContext
    from stockade.proxy.errors import Refusal
    from stockade.proxy.ratelimit import RateLimiter
    from stockade.proxy.ratelimit_settings import Plan, QuotaConfig
    from stockade.proxy.settings import ProxyConfig, Route
    from stockade.proxy.shared_table import WindowCounters

    route = Route(name="api", pool="api")
    quotas = QuotaConfig(plans=(Plan("free", per_day=2),), timezone="Europe/Berlin")
    config = replace(ProxyConfig(), routes=(route,), quotas=quotas)
    wall = [_at("2026-11-24T23:59:00", BERLIN)]
    limiter = RateLimiter(
        config,
        WindowCounters(1024),
        QuotaCounters(64, BERLIN),
        monotonic=lambda: 1000.0,
        wall=lambda: wall[0],
    )
    stage = limiter.post_auth_stage()

    def call() -> Refusal | None:
        ctx = RequestContext("r", "198.18.0.10", "198.18.0.10", False, "http", route=route)
        ctx.consumer, ctx.plan = "acme", "free"
        try:
            stage(None, ctx)  # type: ignore[arg-type]  # the plan path never reads the request
        except Refusal as refusal:
            return refusal
        return None

    assert call() is None and call() is None
    refused = call()
    assert refused is not None and refused.status == 429 and refused.reason == "quota:day"
    assert refused.headers["Retry-After"] == "60"  # a minute to midnight in Berlin
    wall[0] += 61  # 00:00:01 on the 25th, Berlin time
    assert call() is None
