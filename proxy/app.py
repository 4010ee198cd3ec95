"""One worker's aiohttp application: the pipeline in front of the forwarder."""

from __future__ import annotations

import asyncio
import contextlib
import time

from prometheus_client import Counter

from stockade.clock import Clock
from stockade.proxy.access_log import AccessLog
from stockade.proxy.anomaly import DEFAULT_RULES_SOCKET, AnomalyDetector
from stockade.proxy.auth_setup import build_authenticator
from stockade.proxy.ban_client import BanClient
from stockade.proxy.cluster_counters import ClusterCounters, cluster_scoped
from stockade.proxy.context import RequestContext
from stockade.proxy.forward import Forwarder, Upstreams
from stockade.proxy.health import HealthChecker
from stockade.proxy.limits import GuardedServer, LimitCounters, handler_kwargs
from stockade.proxy.metrics import ProxyMetrics
from stockade.proxy.pipeline import PolicyStages, pipeline
from stockade.proxy.quota import UsageWriter
from stockade.proxy.ratelimit import RateLimiter
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.shared_state import SharedState
from stockade.proxy.stages.context import Draining
from stockade.proxy.stages.waf import waf_stage
from stockade.proxy.tls import HANDSHAKES
from stockade.proxy.upstream import PoolState
from stockade.proxy.waf.firewall import Waf

METRICS_SYNC_INTERVAL = 1.0


class Gateway:
    """What one worker shares across its listeners: upstream pools, checks, the log."""

    def __init__(
        self, config: ProxyConfig, clock: Clock, shared: SharedState | None = None
    ) -> None:
        """`shared`: the tables the master made before forking (a fresh set when alone)."""
        self.config = config
        states = {pool.name: PoolState(pool, clock) for pool in config.pools}
        self.upstreams = Upstreams(config.pools, states)
        self.checkers = [HealthChecker(states[pool.name], clock) for pool in config.pools]
        self.access_log = AccessLog(config.access_log)
        self.forwarder = Forwarder(config, self.upstreams)
        self.auth = build_authenticator(config.auth, clock)
        self.auth.plan_claim = config.quotas.plan_claim
        self.shared = shared if shared is not None else SharedState.create(config)
        # Redis, for what is counted by every node (None unless something has scope = "cluster")
        self.cluster = ClusterCounters(config.cluster) if cluster_scoped(config) else None
        self.limiter = RateLimiter(
            config, self.shared.counters, self.shared.quotas, cluster=self.cluster
        )
        ban_rules = any(rule.action == "ban" for rule in config.anomaly.rules)
        socket = config.anomaly.rules_socket or DEFAULT_RULES_SOCKET
        bans = BanClient(socket) if ban_rules else None
        self.anomaly = AnomalyDetector(
            config, self.shared.behaviour, self.shared.penalties, bans, cluster=self.cluster
        )
        self.usage = (
            UsageWriter(config.quotas.database, self.shared.quotas)
            if self.shared.quotas is not None
            else None
        )
        self.waf = Waf(config)  # loads the routes' rule sets and OpenAPI documents
        self.metrics = ProxyMetrics()
        self.draining = Draining()  # set when the worker stops: answers close connections
        m = self.metrics
        self.anomaly.on_action = lambda rule, action: m.count(m.anomaly_actions, rule, action)
        self.limiter.on_quota = lambda plan, period: m.count(m.quota_requests, plan, period)
        if self.cluster is not None:
            self.cluster.on_state = lambda down: self.metrics.cluster_degraded.set(int(down))
        self._limit_counters: list[LimitCounters] = []
        self._synced: dict[tuple[Counter, tuple[str, ...]], int] = {}
        self._sync_task: asyncio.Task[None] | None = None

    def observe(self, ctx: RequestContext, method: str) -> None:
        self.access_log.write(ctx, method)
        self.anomaly.observe(ctx)
        self.metrics.observe(ctx, method, time.monotonic() - ctx.started)

    def sync_metrics(self) -> None:
        """What is kept as plain state elsewhere, into the metrics (once a second)."""
        m = self.metrics
        for name, state in self.upstreams.states.items():
            for row in state.snapshot():
                server = str(row["address"])
                up = bool(row["healthy"]) and not row["ejected"]
                m.upstream_up.labels(name, server).set(1 if up else 0)
                m.upstream_outstanding.labels(name, server).set(float(str(row["outstanding"])))
        totals: dict[tuple[Counter, tuple[str, ...]], int] = {
            (m.connections_refused, ("max_connections",)): sum(
                c.connections_refused for c in self._limit_counters
            ),
            (m.connections_refused, ("denied_source",)): self.anomaly.connections_refused,
            (m.tls_handshake_failures, ()): HANDSHAKES.failures,
            (m.cluster_fallbacks, ()): self.cluster.fallbacks if self.cluster is not None else 0,
            (m.waf_fast_passed, ()): self.waf.counters.fast_passed,
        }
        waf = self.waf.counters
        for action, counts in (("block", waf.blocks), ("detect", waf.detections)):
            for (mode, rule), count in list(counts.items()):
                totals[(m.waf_blocks, (mode, rule, action))] = count
        if self.auth.verifier is not None:
            for issuer, count in self.auth.verifier.fetch_failures.items():
                totals[(m.jwks_fetch_failures, (issuer,))] = count
        for key, total in totals.items():  # counted here as the difference since last time
            delta = total - self._synced.get(key, 0)
            if delta > 0:
                counter, labels = key
                m.count(counter, *labels, amount=delta)
            self._synced[key] = total
        m.flush()

    async def _sync_forever(self) -> None:
        while True:
            self.sync_metrics()
            await asyncio.sleep(METRICS_SYNC_INTERVAL)

    def policy(self) -> PolicyStages:
        limiter, anomaly = self.limiter, self.anomaly
        return PolicyStages(
            auth=self.auth.stage(),
            ip_penalties=anomaly.ip_stage() if anomaly.active else None,
            pre_auth_limits=limiter.pre_auth_stage() if any(limiter.pre.values()) else None,
            consumer_penalties=anomaly.consumer_stage() if anomaly.active else None,
            post_auth_limits=limiter.post_auth_stage()
            if any(limiter.post.values()) or limiter.plans_used
            else None,
            waf=waf_stage(self.waf) if self.waf.active else None,
        )

    async def start(self) -> None:
        if self.auth.verifier is not None:
            await self.auth.verifier.start()
        self.access_log.start()  # upstream connections are made on first use
        if self.usage is not None:
            self.usage.start()
        for checker in self.checkers:
            await checker.start()
        self._sync_task = asyncio.create_task(self._sync_forever())

    async def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self.sync_metrics()
        for checker in self.checkers:
            await checker.stop()
        await self.upstreams.close()
        if self.auth.verifier is not None:
            await self.auth.verifier.close()
        if self.usage is not None:
            await self.usage.stop()
        await self.anomaly.close()
        if self.cluster is not None:
            await self.cluster.close()
        await self.waf.close()
        await self.access_log.close()

    def server(self, scheme: str, counters: LimitCounters | None = None) -> GuardedServer:
        """aiohttp's low-level server for one listener: no router, no application.

        Every request runs the same pipeline, so the router and the app's
        handler machinery would only cost time. The scheme goes into
        X-Forwarded-Proto.
        """
        handler = pipeline(
            self.config,
            scheme,
            self.observe,
            self.forwarder.handle,
            self.policy(),
            self.metrics.in_flight,
            self.draining,
        )
        if counters is not None and counters not in self._limit_counters:
            self._limit_counters.append(counters)
        return GuardedServer(
            handler,
            self.config,
            counters,
            self.anomaly.on_connection if self.anomaly.active else None,
            access_log=None,  # our access log, not aiohttp's (it costs per request too)
            **handler_kwargs(self.config),
        )
