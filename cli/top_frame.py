"""One frame of `stockade top`: totals from the last sample, rates against the one before.

Rates and latency percentiles are over the refresh interval: counter
deltas divided by the time between the two samples, and quantiles of the
request-duration histogram's bucket deltas, estimated as Prometheus's
histogram_quantile does (linear within a bucket). A counter that went
down was reset (a restarted proxy): its delta is its new value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from stockade.cli.top_sources import ProxySample, Sample
from stockade.controller.layout import reason_names
from stockade.controller.metrics import VERDICTS

TOP_BANS = 10
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")


@dataclass
class ReasonRow:
    reason: str
    verdict: str
    packets: int
    bytes: int
    packets_per_second: float | None


@dataclass
class BanRow:
    target: str
    source: str
    reason: str
    packets: int
    packets_per_second: float | None
    expires_in: float | None  # seconds; None = permanent


@dataclass
class RouteRow:
    route: str
    requests: int
    requests_per_second: float | None
    statuses: dict[str, int]  # status class -> total
    p50: float | None  # seconds, over the interval; None when it saw no request
    p99: float | None


@dataclass
class DecisionRow:
    decision: str
    requests: int
    requests_per_second: float | None


@dataclass
class UpstreamRow:
    pool: str
    server: str
    up: bool
    in_flight: int


@dataclass
class ProxyFrame:
    routes: list[RouteRow]
    overall: RouteRow
    decisions: list[DecisionRow]
    upstreams: list[UpstreamRow]
    in_flight: int


@dataclass
class Frame:
    interval: float | None  # seconds the rates are over; None in the first frame
    controller: dict[str, Any] | None  # pid, version, monitor, interfaces, bans
    controller_error: str | None
    reasons: list[ReasonRow] = field(default_factory=list)
    top_bans: list[BanRow] = field(default_factory=list)  # most packets first
    expiring: list[BanRow] = field(default_factory=list)  # soonest first
    proxy_state: str = ""
    proxy: ProxyFrame | None = None


def delta(now: float, before: float | None) -> float:
    if before is None or now < before:  # new, or reset
        return now
    return now - before


def rate(now: float, before: float | None, interval: float | None) -> float | None:
    if interval is None or interval <= 0:
        return None
    return delta(now, before) / interval


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile over cumulative bucket counts (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank and count > below:
            if math.isinf(upper):  # past the last finite bucket: all it can say
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def bucket_deltas(now: dict[float, float], before: dict[float, float] | None) -> dict[float, float]:
    if before is None or any(now[le] < before.get(le, 0.0) for le in now):
        return dict(now)  # new, or the proxy restarted
    return {le: now[le] - before.get(le, 0.0) for le in now}


def _kernel(frame: Frame, cur: Sample, prev: Sample | None, interval: float | None) -> None:
    kernel = cur.kernel
    if kernel is None:
        return
    before = prev.kernel if prev is not None else None
    order = [name for name in reason_names() if name in kernel.reasons]
    order += sorted(set(kernel.reasons) - set(order))
    for name in order:
        packets, octets = kernel.reasons[name]
        old = before.reasons.get(name) if before is not None else None
        frame.reasons.append(
            ReasonRow(
                name,
                VERDICTS.get(name, "pass"),
                packets,
                octets,
                rate(packets, old[0] if old is not None else None, interval),
            )
        )
    old_hits = {b["target"]: b["packets"] for b in before.bans} if before is not None else {}
    rows = [
        BanRow(
            b["target"],
            b["source"],
            b["reason"],
            b["packets"],
            rate(b["packets"], old_hits.get(b["target"]), interval),
            b["ttl_remaining"],
        )
        for b in kernel.bans
    ]
    frame.top_bans = sorted(rows, key=lambda r: (-r.packets, r.target))[:TOP_BANS]
    timed = [r for r in rows if r.expires_in is not None]
    frame.expiring = sorted(timed, key=lambda r: (r.expires_in or 0.0, r.target))[:TOP_BANS]
    s = kernel.status
    frame.controller = {
        "pid": s["pid"],
        "version": s["version"],
        "monitor": s["monitor"],
        "interfaces": [
            {
                "name": i["name"],
                "mode": i.get("mode"),
                "ours": i.get("ours", False),
                "error": i.get("error"),  # the interface could not be queried
            }
            for i in s["interfaces"]
        ],
        "bans": s["bans"]["total"],
    }


def _route_row(
    route: str,
    totals: dict[str, float],
    old_totals: dict[str, float] | None,
    buckets: dict[float, float],
    old_buckets: dict[float, float] | None,
    interval: float | None,
) -> RouteRow:
    now = sum(totals.values())
    before = sum(old_totals.values()) if old_totals is not None else None
    window = bucket_deltas(buckets, old_buckets) if interval is not None else {}
    statuses = {cls: int(totals.get(cls, 0)) for cls in STATUS_CLASSES}
    if "other" in totals:
        statuses["other"] = int(totals["other"])
    return RouteRow(
        route,
        int(now),
        rate(now, before, interval),
        statuses,
        quantile(0.5, window),
        quantile(0.99, window),
    )


def _by(sample: ProxySample, index: int) -> dict[str, dict[str, float]]:
    """Request totals grouped by key `index` of (route, status, decision), then by status."""
    out: dict[str, dict[str, float]] = {}
    for key, value in sample.requests.items():
        inner = out.setdefault(key[index], {})
        inner[key[1]] = inner.get(key[1], 0.0) + value
    return out


def _sum_buckets(per_route: dict[str, dict[float, float]]) -> dict[float, float]:
    out: dict[float, float] = {}
    for buckets in per_route.values():
        for le, count in buckets.items():
            out[le] = out.get(le, 0.0) + count
    return out


def _proxy(cur: ProxySample, prev: ProxySample | None, interval: float | None) -> ProxyFrame:
    routes, old_routes = _by(cur, 0), _by(prev, 0) if prev is not None else None
    old_buckets = prev.buckets if prev is not None else None
    rows = [
        _route_row(
            name,
            totals,
            old_routes.get(name) if old_routes is not None else None,
            cur.buckets.get(name, {}),
            old_buckets.get(name) if old_buckets is not None else None,
            interval,
        )
        for name, totals in routes.items()
    ]
    rows.sort(key=lambda r: (-(r.requests_per_second or 0.0), -r.requests, r.route))

    def overall(routes: dict[str, dict[str, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for totals in routes.values():
            for cls, value in totals.items():
                out[cls] = out.get(cls, 0.0) + value
        return out

    everything = _route_row(
        "(all)",
        overall(routes),
        overall(old_routes) if old_routes is not None else None,
        _sum_buckets(cur.buckets),
        _sum_buckets(old_buckets) if old_buckets is not None else None,
        interval,
    )
    decisions, old_decisions = _by(cur, 2), _by(prev, 2) if prev is not None else None
    decision_rows = []
    for name, totals in sorted(decisions.items()):
        now = sum(totals.values())
        old = old_decisions.get(name) if old_decisions is not None else None
        before = sum(old.values()) if old is not None else None
        decision_rows.append(DecisionRow(name, int(now), rate(now, before, interval)))
    upstreams = [
        UpstreamRow(pool, server, up >= 1, int(in_flight))
        for (pool, server), (up, in_flight) in sorted(cur.upstreams.items())
    ]
    return ProxyFrame(rows, everything, decision_rows, upstreams, int(cur.in_flight))


def build(cur: Sample, prev: Sample | None = None) -> Frame:
    interval = cur.at - prev.at if prev is not None else None
    frame = Frame(interval, None, cur.kernel_error, proxy_state=cur.proxy_state)
    _kernel(frame, cur, prev, interval)
    if cur.proxy is not None:
        before = prev.proxy if prev is not None else None
        frame.proxy = _proxy(cur.proxy, before, interval)
    return frame
