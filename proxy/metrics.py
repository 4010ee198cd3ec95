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
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from stockade.proxy.context import RequestContext

log = logging.getLogger("stockade.proxy")

# Suited to an API gateway: 1 ms .. 30 s.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


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
        self.in_flight = Gauge(
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
        self._requests: dict[tuple[str, str, str, str], Callable[[], None]] = {}

    def observe(self, ctx: RequestContext, method: str, elapsed: float) -> None:
        """One finished request (called from the access-log hook)."""
        route = ctx.route.name if ctx.route is not None else "none"
        key = (route, method_class(method), status_class(ctx.status), ctx.decision)
        inc = self._requests.get(key)
        if inc is None:  # the labelled child, looked up once per label set
            inc = self._requests[key] = self.requests.labels(*key).inc
        inc()
        self.duration.labels(route).observe(elapsed)
        if ctx.upstream_time is not None:
            self.upstream_duration.labels(route).observe(ctx.upstream_time)
        if ctx.bytes_out:
            self.bytes_out.labels(route).inc(ctx.bytes_out)
        decision = ctx.decision
        if decision == "auth":
            self.auth_failures.labels(ctx.reason).inc()
        elif decision in ("ratelimit", "quota"):
            self.rate_limited.labels(ctx.reason.removeprefix("limit:")).inc()


def record_build_info(version: str, python: str) -> None:
    """stockade_build_info, set once in the master (so it is in the files every scrape reads)."""
    Gauge(
        "stockade_build_info",
        "Always 1; the labels say which stockade is running.",
        ["version", "python"],
        registry=CollectorRegistry(),
        multiprocess_mode="max",
    ).labels(version, python).set(1)
