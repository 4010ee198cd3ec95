"""`stockade top`'s arithmetic: rates between samples, latency quantiles from histogram
deltas (as Prometheus's histogram_quantile), counter resets."""

from __future__ import annotations

import math

import pytest

from stockade.stats_view import (
    KernelSample,
    ProxySample,
    Sample,
    bucket_deltas,
    build,
    parse_proxy,
    quantile,
)

INF = math.inf


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {0.1: 50, 0.5: 90, 1.0: 100, INF: 100}, 0.1),
        (0.99, {0.1: 50, 0.5: 90, 1.0: 100, INF: 100}, 0.95),  # 0.5 + 0.5 * 9/10
        (0.5, {0.01: 0, 0.1: 10, INF: 10}, 0.055),  # halfway through (0.01, 0.1]
        (0.5, {0.1: 0, 1.0: 0, INF: 10}, 1.0),  # past the last bound: the last bound
        (0.5, {0.1: 0, INF: 0}, None),  # nothing observed
        (0.5, {}, None),
    ],
)
def test_quantile_matches_histogram_quantile(
    q: float, buckets: dict[float, float], expected: float | None
) -> None:
    got = quantile(q, buckets)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_bucket_deltas_and_a_reset() -> None:
    before = {0.1: 5.0, INF: 8.0}
    assert bucket_deltas({0.1: 7.0, INF: 12.0}, before) == {0.1: 2.0, INF: 4.0}
    assert bucket_deltas({0.1: 1.0, INF: 1.0}, before) == {0.1: 1.0, INF: 1.0}  # restarted


EXPOSITION = """\
# TYPE stockade_proxy_requests_total counter
stockade_proxy_requests_total{route="api",method="GET",status="2xx",decision="allowed"} {ok}
stockade_proxy_requests_total{route="api",method="POST",status="2xx",decision="allowed"} 1.0
stockade_proxy_requests_total{route="api",method="GET",status="4xx",decision="ratelimit"} 3.0
# TYPE stockade_proxy_request_duration_seconds histogram
stockade_proxy_request_duration_seconds_bucket{route="api",le="0.01"} {fast}
stockade_proxy_request_duration_seconds_bucket{route="api",le="0.1"} {total}
stockade_proxy_request_duration_seconds_bucket{route="api",le="+Inf"} {total}
stockade_proxy_request_duration_seconds_count{route="api"} {total}
stockade_proxy_request_duration_seconds_sum{route="api"} 1.0
# TYPE stockade_proxy_upstream_up gauge
stockade_proxy_upstream_up{pool="api",server="127.0.0.1:1"} 1.0
stockade_proxy_upstream_up{pool="api",server="127.0.0.1:2"} 0.0
# TYPE stockade_proxy_upstream_in_flight gauge
stockade_proxy_upstream_in_flight{pool="api",server="127.0.0.1:1"} 2.0
"""


def proxy(ok: int, fast: int, total: int) -> ProxySample:
    return parse_proxy(
        EXPOSITION.replace("{ok}", f"{ok}.0")
        .replace("{fast}", f"{fast}.0")
        .replace("{total}", f"{total}.0")
    )


def ban(target: str, source: str, packets: int, ttl: float | None) -> dict[str, object]:
    return {
        "target": target,
        "source": source,
        "reason": "r",
        "packets": packets,
        "ttl_remaining": ttl,
    }


def kernel(drops: int, hits: int) -> KernelSample:
    return KernelSample(
        {"pass": (100, 6400), "drop_ban": (drops, drops * 64)},
        [ban("198.18.0.7", "cli", hits, 30.0), ban("198.18.0.8", "rule", 0, None)],
        {"pid": 1, "version": "t", "monitor": False, "interfaces": [], "bans": {"total": 2}},
    )


def test_a_frame_has_rates_over_the_interval() -> None:
    first = Sample(10.0, kernel(10, 4), None, proxy(ok=5, fast=4, total=9), "running")
    second = Sample(12.0, kernel(30, 10), None, proxy(ok=15, fast=14, total=29), "running")
    frame = build(second, first)
    assert frame.interval == 2.0
    drop = next(r for r in frame.reasons if r.reason == "drop_ban")
    assert (drop.verdict, drop.packets, drop.packets_per_second) == ("drop", 30, 10.0)
    assert [b.target for b in frame.top_bans] == ["198.18.0.7", "198.18.0.8"]
    assert frame.top_bans[0].packets_per_second == 3.0
    assert [b.target for b in frame.expiring] == ["198.18.0.7"]  # the permanent one never
    assert frame.proxy is not None
    (api,) = frame.proxy.routes
    assert api.requests == 19 and api.requests_per_second == 5.0  # methods added up
    assert api.statuses == {"2xx": 16, "3xx": 0, "4xx": 3, "5xx": 0}
    # 20 requests in the interval, 10 of them under 10 ms: p50 at the 10 ms bound
    assert api.p50 == pytest.approx(0.01)
    assert api.p99 == pytest.approx(0.01 + 0.09 * (19.8 - 10) / 10)
    assert {d.decision: d.requests for d in frame.proxy.decisions} == {
        "allowed": 16,
        "ratelimit": 3,
    }
    assert [(u.server, u.up, u.in_flight) for u in frame.proxy.upstreams] == [
        ("127.0.0.1:1", True, 2),
        ("127.0.0.1:2", False, 0),
    ]


def test_the_first_frame_has_totals_but_no_rates() -> None:
    frame = build(Sample(1.0, kernel(3, 1), None, proxy(1, 1, 1), "running"))
    assert frame.interval is None
    assert all(r.packets_per_second is None for r in frame.reasons)
    assert frame.proxy is not None and frame.proxy.routes[0].p50 is None


def test_a_restarted_proxy_counts_from_zero() -> None:
    first = Sample(0.0, None, "down", proxy(ok=50, fast=50, total=53), "running")
    second = Sample(1.0, None, "down", proxy(ok=2, fast=2, total=5), "running")
    frame = build(second, first)
    assert frame.controller is None and frame.controller_error == "down"
    assert frame.proxy is not None
    assert frame.proxy.routes[0].requests_per_second == 6.0  # 2 + 1 + 3 since the restart
