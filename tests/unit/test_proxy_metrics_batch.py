"""The proxy's metrics are counted in plain dicts per request and flushed once a second.

What a flush writes must be exactly what prometheus-client's own calls, one per
request, would have written: compared here on random requests, bucket bounds included.
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import cast

import pytest
from prometheus_client import CollectorRegistry, Histogram

from stockade.proxy.context import RequestContext
from stockade.proxy.metrics import (
    DURATION_BUCKETS,
    ProxyMetrics,
    add_observations,
    method_class,
    status_class,
)
from stockade.proxy.settings import Route

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(registry: CollectorRegistry) -> Samples:
    """Every sample but the creation timestamps (they differ between registries)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def durations(rng: random.Random) -> list[float]:
    """Random durations, with every bucket bound itself and values past the last."""
    values = [rng.choice((rng.uniform(0, 0.05), rng.uniform(0, 40))) for _ in range(500)]
    return [*values, *DURATION_BUCKETS, 0.0, 1e6]


def test_added_observations_equal_observing_one_by_one() -> None:
    rng = random.Random(7)
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    make = lambda registry: Histogram(  # noqa: E731
        "h", "h", ["route"], buckets=DURATION_BUCKETS, registry=registry
    )
    reference, histogram = make(one_by_one), make(batched)
    values = durations(rng)
    counts = [0] * (len(DURATION_BUCKETS) + 1)
    for value in values:
        reference.labels("r").observe(value)
        counts[next((i for i, b in enumerate(DURATION_BUCKETS) if value <= b), -1)] += 1
    add_observations(histogram.labels("r"), counts, sum(values))
    assert samples(batched) == pytest.approx(samples(one_by_one), rel=1e-12)
    assert samples(batched)[("h_count", (("route", "r"),))] == len(values)


def random_request(rng: random.Random) -> tuple[RequestContext, str, float]:
    ctx = RequestContext("id", "198.18.0.1", "198.18.0.1", False, "http")
    name = rng.choice(("api", "admin", None))
    ctx.route = cast(Route, SimpleNamespace(name=name)) if name is not None else None
    ctx.status = rng.choice((200, 201, 304, 403, 429, 502, 99))
    ctx.decision, ctx.reason = rng.choice(
        (
            ("allowed", ""),
            ("auth", "expired"),
            ("auth", "bad_signature"),
            ("ratelimit", "limit:per_ip"),
            ("quota", "quota:day"),
            ("waf", "waf"),
        )
    )
    if ctx.decision == "allowed" and rng.random() < 0.9:
        ctx.upstream_time = rng.choice(durations(rng))
        ctx.bytes_out = rng.randrange(0, 5000)
    method = rng.choice(("GET", "POST", "BREW", "DELETE"))
    return ctx, method, rng.choice(durations(rng))


def observe_directly(metrics: ProxyMetrics, ctx: RequestContext, method: str, took: float) -> None:
    """The per-request prometheus-client calls the batch replaces."""
    route = ctx.route.name if ctx.route is not None else "none"
    labels = (route, method_class(method), status_class(ctx.status), ctx.decision)
    metrics.requests.labels(*labels).inc()
    metrics.duration.labels(route).observe(took)
    if ctx.upstream_time is not None:
        metrics.upstream_duration.labels(route).observe(ctx.upstream_time)
    if ctx.bytes_out:
        metrics.bytes_out.labels(route).inc(ctx.bytes_out)
    if ctx.decision == "auth":
        metrics.auth_failures.labels(ctx.reason).inc()
    elif ctx.decision in ("ratelimit", "quota"):
        metrics.rate_limited.labels(ctx.reason.removeprefix("limit:")).inc()


def test_a_flush_writes_what_a_call_per_request_would_have() -> None:
    rng = random.Random(11)
    batched, reference = ProxyMetrics(), ProxyMetrics()
    empty = samples(batched.registry)
    for round_ in range(3):  # several flushes add up
        for _ in range(400):
            ctx, method, took = random_request(rng)
            batched.observe(ctx, method, took)
            observe_directly(reference, ctx, method, took)
        batched.count(batched.quota_requests, "gold", "day", amount=3)
        reference.quota_requests.labels("gold", "day").inc(3)
        batched.count(batched.tls_handshake_failures, amount=2)  # a counter without labels
        reference.tls_handshake_failures.inc(2)
        if round_ == 0:  # nothing reaches the registry before the flush
            assert samples(batched.registry) == empty
        batched.flush()
        # exact but for the sums' float rounding (added in another order)
        assert samples(batched.registry) == pytest.approx(samples(reference.registry), rel=1e-12)
    requests = samples(batched.registry)
    assert sum(v for (n, _), v in requests.items() if n == "stockade_proxy_requests_total") == 1200


def test_in_flight_reaches_the_gauge_on_flush() -> None:
    metrics = ProxyMetrics()
    gauge = ("stockade_proxy_requests_in_flight", ())
    for _ in range(3):
        metrics.in_flight.inc()
    metrics.in_flight.dec()
    assert samples(metrics.registry)[gauge] == 0
    metrics.flush()
    assert samples(metrics.registry)[gauge] == 2
    metrics.in_flight.dec()
    metrics.in_flight.dec()
    metrics.flush()
    assert samples(metrics.registry)[gauge] == 0
