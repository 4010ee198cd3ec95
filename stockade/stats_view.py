"""What `stockade top` and the proxy's status page show: samples of the gateway's numbers,
and frames computed from two of them.

A sample is the kernel's counters and bans (over the control socket) and the
proxy's request metrics (the exposition its admin listener serves, already
added up across workers). A frame holds totals from the last sample and
rates against the one before: counter deltas divided by the time between
the two samples, and quantiles of the request-duration histogram's bucket
deltas, estimated as Prometheus's histogram_quantile does (linear within a
bucket). A counter that went down was reset (a restarted proxy): its delta
is its new value.

Neither the CLI nor the proxy: both import this, so the arithmetic exists
once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from stockade.control_client import TIMEOUT, call
from stockade.controller.layout import reason_names
from stockade.controller.metrics import VERDICTS
from stockade.durations import format_duration

REQUESTS = "stockade_proxy_requests_total"
DURATION_BUCKET = "stockade_proxy_request_duration_seconds_bucket"
UPSTREAM_UP = "stockade_proxy_upstream_up"
UPSTREAM_IN_FLIGHT = "stockade_proxy_upstream_in_flight"
IN_FLIGHT = "stockade_proxy_requests_in_flight"


# -- samples ------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelSample:
    reasons: dict[str, tuple[int, int]]  # reason -> (packets, bytes)
    bans: list[dict[str, Any]]  # as `stockade bans --json`
    status: dict[str, Any]  # as `stockade status --json` (controller part)


@dataclass(frozen=True)
class ProxySample:
    requests: dict[tuple[str, str, str], float]  # (route, status class, decision) -> total
    buckets: dict[str, dict[float, float]]  # route -> upper bound -> cumulative count
    upstreams: dict[tuple[str, str], tuple[float, float]]  # (pool, server) -> (up, in flight)
    in_flight: float


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    kernel: KernelSample | None
    kernel_error: str | None  # why there is no kernel sample
    proxy: ProxySample | None
    proxy_state: str  # "running", or why not


def kernel_sample(socket_path: Path, timeout: float = TIMEOUT) -> KernelSample:
    """Raises CommandError (ControllerUnavailable when it is down)."""
    stats = call(socket_path, "stats", timeout=timeout)
    reasons = {
        name: (int(value["packets"]), int(value["bytes"]))
        for name, value in stats["reasons"].items()
    }
    bans = list(call(socket_path, "bans", timeout=timeout))
    return KernelSample(reasons, bans, call(socket_path, "status", timeout=timeout))


def parse_proxy(text: str) -> ProxySample:
    """The proxy's exposition (ValueError when it is not one)."""
    requests: dict[tuple[str, str, str], float] = {}
    buckets: dict[str, dict[float, float]] = {}
    up: dict[tuple[str, str], float] = {}
    in_flight: dict[tuple[str, str], float] = {}
    total_in_flight = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == REQUESTS:  # methods added up
                key = (labels["route"], labels["status"], labels["decision"])
                requests[key] = requests.get(key, 0.0) + s.value
            elif s.name == DURATION_BUCKET:
                buckets.setdefault(labels["route"], {})[float(labels["le"])] = s.value
            elif s.name == UPSTREAM_UP:
                up[(labels["pool"], labels["server"])] = s.value
            elif s.name == UPSTREAM_IN_FLIGHT:
                in_flight[(labels["pool"], labels["server"])] = s.value
            elif s.name == IN_FLIGHT:
                total_in_flight = s.value
    upstreams = {key: (value, in_flight.get(key, 0.0)) for key, value in up.items()}
    return ProxySample(requests, buckets, upstreams, total_in_flight)


# -- frames ---------------------------------------------------------------------------
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
    since_start: bool,
) -> RouteRow:
    now = sum(totals.values())
    before = sum(old_totals.values()) if old_totals is not None else None
    if interval is not None:
        window = bucket_deltas(buckets, old_buckets)
    else:  # one sample: the whole histogram, or nothing to say
        window = dict(buckets) if since_start else {}
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


def _proxy(
    cur: ProxySample, prev: ProxySample | None, interval: float | None, since_start: bool
) -> ProxyFrame:
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
            since_start,
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
        since_start,
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


def build(cur: Sample, prev: Sample | None = None, *, since_start: bool = False) -> Frame:
    """A frame of `cur`, with rates and latency over the time since `prev`.

    Without `prev` there are no rates, and latency is `None` unless
    `since_start`: then it is the quantiles of the whole histogram (the
    status page's first view, which has nothing to compare with).
    """
    interval = cur.at - prev.at if prev is not None else None
    frame = Frame(interval, None, cur.kernel_error, proxy_state=cur.proxy_state)
    _kernel(frame, cur, prev, interval)
    if cur.proxy is not None:
        before = prev.proxy if prev is not None else None
        frame.proxy = _proxy(cur.proxy, before, interval, since_start)
    return frame


# -- how both show a number ------------------------------------------------------------
def per_second(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def expires(seconds: float | None) -> str:
    return "never" if seconds is None else f"in {format_duration(seconds)}"


def interface(i: dict[str, Any]) -> str:
    if i["error"] is not None:
        return f"{i['name']} (error: {i['error']})"
    return f"{i['name']} ({i['mode']}{'' if i['ours'] else ', NOT ours'})"
