"""The proxy's Prometheus metrics, counted in every worker and added up at scrape time.

prometheus-client's multiprocess mode: each worker writes its values to
files of its own in one directory (a memory-mapped dict per process), and
the admin listener in the master reads them all at scrape time, so a
counter counts every worker's requests once and a dead worker's counts
are kept. Gauges say how to combine workers (`multiprocess_mode`), and the
master removes a dead worker's live gauges (`mark_process_dead`).

Label values come from the config or fixed sets only (route and pool
names, method and status classes, decisions, reasons, rule ids): never a
client address, a path or a token.

Per request, a worker only adds to plain dicts (`observe`, `count`); the
worker moves them into the metric files once a second (`flush`). Each
update of a multiprocess value takes a lock and checks the pid: about ten of
them per request cost ~8% of a worker's time, one batch a second costs
nothing measurable. A scrape therefore sees a request within a second, and
a worker killed by SIGKILL loses at most its last second of counts.
"""

from __future__ import annotations

import logging
import os
import shutil
from bisect import bisect_left
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from stockade.proxy.context import CLIENT_ABORT, UPSTREAM_ERROR, RequestContext

log = logging.getLogger("stockade.proxy")

# Suited to an API gateway: 1 ms .. 30 s.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
QUEUE_REFUSALS = frozenset(("queue_full", "queue_timeout"))


def enable_multiprocess(directory: Path) -> None:
    """Values go to files in `directory` from now on (the master, before any metric exists).

    The directory is emptied: counts of a previous run's processes would
    otherwise be added to this run's (counters start at zero with the proxy).
    """
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, mode=0o755)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    # prometheus-client picks the value class when it is imported: pick again
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def check_writable(directory: Path) -> bool:
    """In a worker, after dropping privileges: can it write its metric files?

    If not, it counts in memory only (its metrics are not exported) and
    says so once: a proxy never stops serving for its metrics.
    """
    probe = directory / f".probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        log.error(
            "cannot write metric files in %s (%s): this worker's metrics are not exported",
            directory,
            exc.strerror,
        )
        values.ValueClass = values.MutexValue
        return False
    return True


def method_class(method: str) -> str:
    return method if method in METHODS else "other"


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class InFlight:
    """Requests being handled now, as a plain count (the gauge is set from it on flush)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class _Observed:
    """A histogram child's observations since the last flush: per bucket, and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0


def add_observations(child: Histogram, counts: list[int], total: float) -> None:
    """What `child.observe` would have done for each observation, in one step per bucket.

    prometheus-client has no public call for this; its Histogram child keeps
    one value per bucket (not cumulative) and one for the sum. A test checks
    that this equals observing one by one, so an upgrade that changes it fails.
    """
    child._sum.inc(total)
    for bucket, count in zip(child._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


class ProxyMetrics:
    """One worker's metrics (or one in-process gateway's, in its own registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.requests = Counter(
            "stockade_proxy_requests",
            "Requests answered, by route, method, status class and decision.",
            ["route", "method", "status", "decision"],
            registry=r,
        )
        self.duration = Histogram(
            "stockade_proxy_request_duration_seconds",
            "Time from the request head to the response, by route.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "stockade_proxy_upstream_duration_seconds",
            "Time from sending to the upstream to its response head, by route.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.bytes_out = Counter(
            "stockade_proxy_response_body_bytes",
            "Response body bytes sent to clients, by route.",
            ["route"],
            registry=r,
        )
        self.in_flight = InFlight()  # the pipeline counts here; flush sets the gauge
        self.in_flight_gauge = Gauge(
            "stockade_proxy_requests_in_flight",
            "Requests being handled now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_up = Gauge(
            "stockade_proxy_upstream_up",
            "1 if the server is in rotation (every worker agrees), else 0.",
            ["pool", "server"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.upstream_outstanding = Gauge(
            "stockade_proxy_upstream_in_flight",
            "Requests waiting for each upstream server now.",
            ["pool", "server"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.auth_failures = Counter(
            "stockade_proxy_auth_failures",
            "Authentication refusals, by reason (expired, bad_signature, ...).",
            ["reason"],
            registry=r,
        )
        self.jwks_fetch_failures = Counter(
            "stockade_proxy_jwks_fetch_failures",
            "JWKS or OpenID discovery fetches that failed (the known keys stay), by issuer.",
            ["issuer"],
            registry=r,
        )
        self.rate_limited = Counter(
            "stockade_proxy_rate_limited",
            "Requests refused by a rate limit or a quota, by limit (plan:NAME:i, quota:day).",
            ["limit"],
            registry=r,
        )
        self.quota_requests = Counter(
            "stockade_proxy_quota_requests",
            "Requests counted against quotas, by plan and period (day, month).",
            ["plan", "period"],
            registry=r,
        )
        self.anomaly_actions = Counter(
            "stockade_proxy_anomaly_actions",
            "Anomaly and bot rules that acted on a source, by rule and action.",
            ["rule", "action"],
            registry=r,
        )
        self.waf_blocks = Counter(
            "stockade_proxy_waf_blocks",
            "Requests the WAF blocked (or, in detect mode, would have), by mode and rule id.",
            ["mode", "rule", "action"],
            registry=r,
        )
        self.waf_fast_passed = Counter(
            "stockade_proxy_waf_fast_passed",
            "sqli_xss requests passed by the fast pass, without a ModSecurity transaction.",
            registry=r,
        )
        self.cluster_degraded = Gauge(
            "stockade_proxy_cluster_degraded",
            "1 while a worker cannot reach Redis: cluster-scoped limits, quotas and anomaly "
            "counters fall back as [cluster] on_redis_down says.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cluster_fallbacks = Counter(
            "stockade_proxy_cluster_fallbacks",
            "Cluster-scoped checks answered by the fallback because Redis was unreachable.",
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "stockade_proxy_tls_handshake_failures",
            "TLS handshakes that began (a ClientHello was read) and did not complete.",
            registry=r,
        )
        self.connections_refused = Counter(
            "stockade_proxy_connections_refused",
            "Connections closed at once: over max_connections, or from a denied source.",
            ["reason"],
            registry=r,
        )
        self.client_aborts = Counter(
            "stockade_proxy_client_aborts",
            "Requests whose client hung up first (logged as 499), by when: "
            "during_request_body, before_response, during_response.",
            ["phase"],
            registry=r,
        )
        self.upstream_queue_refused = Counter(
            "stockade_proxy_upstream_queue_refused",
            "Requests refused (503) because every server of the pool was at maxconn: "
            "queue_full or queue_timeout.",
            ["pool", "reason"],
            registry=r,
        )
        self._counts: dict[tuple[Counter, tuple[str, ...]], float] = {}
        self._observed: dict[tuple[Histogram, str], _Observed] = {}

    def count(self, counter: Counter, *labels: str, amount: float = 1) -> None:
        """Add to a counter, with its labels if it has any (in memory until the next flush)."""
        key = (counter, labels)
        counts = self._counts
        counts[key] = counts.get(key, 0) + amount

    def _observe(self, histogram: Histogram, route: str, value: float) -> None:
        key = (histogram, route)
        observed = self._observed.get(key)
        if observed is None:
            observed = self._observed[key] = _Observed(len(DURATION_BUCKETS) + 1)  # and +Inf
        # prometheus' bucket: the first upper bound >= value (+Inf: past the last)
        observed.counts[bisect_left(DURATION_BUCKETS, value)] += 1
        observed.total += value

    def observe(self, ctx: RequestContext, method: str, elapsed: float) -> None:
        """One finished request (called from the access-log hook)."""
        route = ctx.route.name if ctx.route is not None else "none"
        self.count(
            self.requests, route, method_class(method), status_class(ctx.status), ctx.decision
        )
        self._observe(self.duration, route, elapsed)
        if ctx.upstream_time is not None:
            self._observe(self.upstream_duration, route, ctx.upstream_time)
        if ctx.bytes_out:
            self.count(self.bytes_out, route, amount=ctx.bytes_out)
        decision = ctx.decision
        if decision == "auth":
            self.count(self.auth_failures, ctx.reason)
        elif decision in ("ratelimit", "quota"):
            self.count(self.rate_limited, ctx.reason.removeprefix("limit:"))
        elif decision == CLIENT_ABORT:
            self.count(self.client_aborts, ctx.reason)
        elif decision == UPSTREAM_ERROR and ctx.reason in QUEUE_REFUSALS and ctx.route:
            self.count(self.upstream_queue_refused, ctx.route.pool, ctx.reason)

    def flush(self) -> None:
        """Everything counted since the last flush, into the metrics (once a second)."""
        counts, self._counts = self._counts, {}
        for (counter, labels), amount in counts.items():
            (counter.labels(*labels) if labels else counter).inc(amount)
        observed, self._observed = self._observed, {}
        for (histogram, route), pending in observed.items():
            add_observations(histogram.labels(route), pending.counts, pending.total)
        self.in_flight_gauge.set(self.in_flight.value)


def record_build_info(version: str, python: str) -> None:
    """stockade_build_info, set once in the master (so it is in the files every scrape reads)."""
    Gauge(
        "stockade_build_info",
        "Always 1; the labels say which stockade is running.",
        ["version", "python"],
        registry=CollectorRegistry(),
        multiprocess_mode="max",
    ).labels(version, python).set(1)
