"""Stages: rate limits, plans and quotas.

Limits keyed by what is known before authentication (client IP, a header, a
query parameter) run before the auth stage, so a flood of bad tokens is
answered with a cheap 429 instead of a signature check each; limits keyed by
the consumer or API key, the consumer's plan and its quotas run after it.

A refused request gets 429 with Retry-After and the IETF RateLimit-Limit,
-Remaining, -Reset and -Policy headers; allowed responses carry them too
(for the tightest limit) unless `response_headers = false`. A request whose
key is missing (no such header, no consumer) is limited by its client IP
under that limit, so leaving the key out is no way around it.

Limits with `scope = "cluster"` (and plan rates and quotas when
[proxy.quotas] scope = "cluster") are counted in Redis by every node
(proxy/cluster_counters.py); a route that has any makes its stage wait for
Redis, the others keep the synchronous local path. While Redis is away they
fall back as [cluster] on_redis_down says: "local" counts here against the
limit divided by expected_nodes, "open" lets requests through, "closed"
refuses them with 503.
"""

from __future__ import annotations

import math
import time
import zoneinfo
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp.web_request import BaseRequest

from stockade.proxy.cluster_counters import ClusterCounters
from stockade.proxy.context import RequestContext
from stockade.proxy.errors import Refusal
from stockade.proxy.pipeline_types import Stage
from stockade.proxy.quota import DAY, MONTH, QuotaCounters, consumer_id, period
from stockade.proxy.rate_maps import RateMap
from stockade.proxy.ratelimit_settings import LimitRule, Plan, Rate
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.shared_table import WindowCounters, digest

Now = Callable[[], float]


@dataclass(slots=True)
class Tightest:
    """The limit closest to refusing, for the RateLimit-* headers."""

    rate: Rate
    remaining: int
    reset: float


def _headers(rate: Rate, remaining: int, reset: float) -> list[tuple[str, str]]:
    return [
        ("RateLimit-Limit", str(rate.count)),
        ("RateLimit-Remaining", str(max(0, remaining))),
        ("RateLimit-Reset", str(max(0, math.ceil(reset)))),
        ("RateLimit-Policy", rate.policy),
    ]


def _names(rules: tuple[LimitRule, ...]) -> set[str]:
    return {rule.name for rule in rules}


def _unavailable() -> Refusal:
    """on_redis_down = "closed": a cluster-scoped limit cannot be counted, so refuse."""
    refusal = Refusal(503, "ratelimit", "cluster_unavailable", "limits cannot be checked now")
    refusal.headers["Retry-After"] = "1"
    return refusal


def _refusal(reason: str, message: str, rate: Rate, wait: float) -> Refusal:
    refusal = Refusal(429, "ratelimit" if reason.startswith("limit") else "quota", reason, message)
    seconds = str(max(1, math.ceil(wait)))
    refusal.headers["Retry-After"] = seconds
    refusal.headers.update(_headers(rate, 0, wait))
    return refusal


class RateLimiter:
    def __init__(
        self,
        config: ProxyConfig,
        counters: WindowCounters,
        quotas: QuotaCounters | None,
        monotonic: Now = time.monotonic,
        wall: Now = time.time,
        cluster: ClusterCounters | None = None,
    ) -> None:
        self.config = config
        self.counters = counters
        self.quotas = quotas
        self.cluster = cluster  # None: every limit counts on this node
        self.monotonic = monotonic
        self.wall = wall
        self.zone = zoneinfo.ZoneInfo(config.quotas.timezone)
        self.refused: Counter[str] = Counter()  # by limit name / quota, for status and metrics
        self.maps = {
            rule.name: RateMap(rule.map_file, rule.rate)
            for rule in config.rate_limiting.limits
            if rule.map_file is not None
        }
        everywhere = [r for r in config.rate_limiting.limits if r.all_routes]
        self.pre: dict[str, tuple[LimitRule, ...]] = {}
        self.post: dict[str, tuple[LimitRule, ...]] = {}
        for route in config.routes:
            named = [config.rate_limiting.limit(name) for name in route.rate_limits]
            rules = list(dict.fromkeys(everywhere + named))
            self.pre[route.name] = tuple(r for r in rules if r.pre_auth)
            self.post[route.name] = tuple(r for r in rules if not r.pre_auth)
        self.plans_used = bool(config.quotas.plans)
        self.plans_clustered = cluster is not None and config.quotas.scope == "cluster"
        # routes whose limits wait for Redis (the others stay synchronous)
        clustered = {r.name for r in config.rate_limiting.limits if r.scope == "cluster"}
        if cluster is None:
            clustered = set()
        self.pre_clustered = {n for n, rules in self.pre.items() if clustered & _names(rules)}
        self.post_clustered = {n for n, rules in self.post.items() if clustered & _names(rules)}
        self.on_quota: Callable[[str, str], None] | None = None  # (plan, period): metrics

    # -- one limit ------------------------------------------------------------
    def _subject(self, rule: LimitRule, request: BaseRequest, ctx: RequestContext) -> str:
        value: str | None
        if rule.key == "ip":
            return ctx.client_ip
        if rule.key == "header":
            value = request.headers.get(rule.field)
        elif rule.key == "query":
            values = request.query.getall(rule.field, ())
            if len(values) > 1:
                # the limit would count one value while the upstream may read another
                message = f"query parameter {rule.field} repeated"
                raise Refusal(400, "ratelimit", "repeated_key_parameter", message)
            value = values[0] if values else None
        elif rule.key == "consumer":
            value = ctx.consumer
        else:
            value = ctx.api_key_id
        return f"={value}" if value else f"ip:{ctx.client_ip}"

    def _subject_rate(
        self, rule: LimitRule, request: BaseRequest, ctx: RequestContext
    ) -> tuple[str, Rate]:
        """Who the request counts against, and at what rate (the map file's, if any)."""
        subject = self._subject(rule, request, ctx)
        if rule.map_file is None:
            return subject, rule.rate
        return subject, self.maps[rule.name].rate(subject.removeprefix("="))

    def _apply(
        self, name: str, rate: Rate, subject: str, now: float, tightest: Tightest | None
    ) -> Tightest | None:
        key = digest(f"{name}\0{rate.window:g}\0{subject}")
        allowed, total, seconds = self.counters.update(key, rate.window, now, 1, rate.count)
        return self._settle(name, rate, allowed, total, seconds, tightest)

    def _settle(
        self,
        name: str,
        rate: Rate,
        allowed: bool,
        total: int,
        seconds: float,
        tightest: Tightest | None,
    ) -> Tightest | None:
        """A counted request, locally or in the cluster: refuse it, or keep the tightest."""
        if not allowed:
            self.refused[name] += 1
            raise _refusal(f"limit:{name}", f"rate limit {rate.text} exceeded", rate, seconds)
        remaining = rate.count - total
        if tightest is None or remaining < tightest.remaining:
            return Tightest(rate, remaining, seconds)
        return tightest

    def _run(
        self,
        rules: tuple[LimitRule, ...],
        request: BaseRequest,
        ctx: RequestContext,
        tightest: Tightest | None,
    ) -> Tightest | None:
        now = self.monotonic()
        for rule in rules:
            subject, rate = self._subject_rate(rule, request, ctx)
            tightest = self._apply(rule.name, rate, subject, now, tightest)
        return tightest

    # -- the cluster path (scope = "cluster") -----------------------------------
    async def _apply_cluster(
        self, name: str, rate: Rate, subject: str, now: float, tightest: Tightest | None
    ) -> Tightest | None:
        assert self.cluster is not None
        key = digest(f"{name}\0{rate.window:g}\0{subject}").hex()
        result = await self.cluster.limit(key, rate.window, 1, rate.count)
        if result is None:  # Redis unavailable
            fallback = self.config.cluster.on_redis_down
            if fallback == "open":
                return tightest
            if fallback == "closed":
                raise _unavailable()
            share = max(1, rate.count // self.config.cluster.expected_nodes)
            return self._apply(name, Rate(share, rate.window, rate.text), subject, now, tightest)
        allowed, total, seconds = result
        return self._settle(name, rate, allowed, total, seconds, tightest)

    async def _run_cluster(
        self,
        rules: tuple[LimitRule, ...],
        request: BaseRequest,
        ctx: RequestContext,
        tightest: Tightest | None,
    ) -> Tightest | None:
        now = self.monotonic()
        for rule in rules:
            subject, rate = self._subject_rate(rule, request, ctx)
            if rule.scope == "cluster":
                tightest = await self._apply_cluster(rule.name, rate, subject, now, tightest)
            else:
                tightest = self._apply(rule.name, rate, subject, now, tightest)
        return tightest

    async def _pre_cluster(self, request: BaseRequest, ctx: RequestContext) -> None:
        assert ctx.route is not None
        ctx.tightest = await self._run_cluster(self.pre[ctx.route.name], request, ctx, None)
        self._publish(ctx, ctx.tightest)

    async def _post_cluster(
        self, request: BaseRequest, ctx: RequestContext, plan: Plan | None
    ) -> None:
        assert ctx.route is not None
        tightest = ctx.tightest
        rules = self.post[ctx.route.name]
        if rules:
            tightest = await self._run_cluster(rules, request, ctx, tightest)
        if plan is not None and ctx.consumer is not None:
            now = self.monotonic()
            subject = f"={consumer_id(ctx.consumer)}"
            for i, rate in enumerate(plan.rates):
                name = f"plan:{plan.name}:{i}"
                tightest = await self._apply_cluster(name, rate, subject, now, tightest)
            await self._quota_cluster(ctx.consumer, plan)
        ctx.tightest = tightest
        self._publish(ctx, tightest)

    async def _quota_cluster(self, consumer: str, plan: Plan) -> None:
        assert self.cluster is not None
        wall, mono = self.wall(), self.monotonic()
        who = consumer_id(consumer)
        for kind, quota in ((DAY, plan.per_day), (MONTH, plan.per_month)):
            if not quota:
                continue
            p = period(kind, wall, self.zone)
            result = await self.cluster.quota(who, p.label, quota, p.ends)
            if result is None:  # Redis unavailable: as on_redis_down says
                fallback = self.config.cluster.on_redis_down
                if fallback == "closed":
                    raise _unavailable()
                if fallback == "open" or self.quotas is None:
                    continue
                # go on from the last cluster count this node saw (kept in its table)
                allowed, _used = self.quotas.consume(who, plan.name, p, quota, wall, mono)
            else:
                allowed, used = result
                if self.quotas is not None:  # so `stockade usage` shows the cluster's count
                    self.quotas.observe(who, plan.name, p, used, wall, mono)
            self._counted_quota(allowed, plan, kind, quota, p.ends - wall)

    def _counted_quota(self, allowed: bool, plan: Plan, kind: str, quota: int, left: float) -> None:
        if allowed and self.on_quota is not None:
            self.on_quota(plan.name, kind)
        if not allowed:
            self.refused[f"quota:{kind}"] += 1
            window = 86400.0 if kind == DAY else 30 * 86400.0
            raise _refusal(
                f"quota:{kind}",
                f"{kind}ly quota of {quota} requests used up ({plan.name} plan)",
                Rate(quota, window, f"{quota}/{kind}"),
                left,
            )

    def _publish(self, ctx: RequestContext, tightest: Tightest | None) -> None:
        if tightest is not None and self.config.rate_limiting.response_headers:
            ctx.response_headers = [
                h for h in ctx.response_headers if not h[0].startswith("RateLimit-")
            ] + _headers(tightest.rate, tightest.remaining, tightest.reset)

    # -- stages -----------------------------------------------------------------
    def pre_auth_stage(self) -> Stage:
        def rate_limit_stage(request: BaseRequest, ctx: RequestContext) -> Awaitable[None] | None:
            assert ctx.route is not None, "the path stage runs first"
            if ctx.route.name in self.pre_clustered:
                return self._pre_cluster(request, ctx)
            rules = self.pre[ctx.route.name]
            if rules:
                ctx.tightest = self._run(rules, request, ctx, None)
                self._publish(ctx, ctx.tightest)
            return None

        return rate_limit_stage

    def post_auth_stage(self) -> Stage:
        def consumer_limit_stage(
            request: BaseRequest, ctx: RequestContext
        ) -> Awaitable[None] | None:
            assert ctx.route is not None, "the path stage runs first"
            rules = self.post[ctx.route.name]
            plan = self._plan(ctx)
            if not rules and plan is None:
                return None
            if ctx.route.name in self.post_clustered or (plan is not None and self.plans_clustered):
                return self._post_cluster(request, ctx, plan)
            tightest = ctx.tightest
            if rules:
                tightest = self._run(rules, request, ctx, tightest)
            if plan is not None and ctx.consumer is not None:
                now = self.monotonic()
                subject = f"={consumer_id(ctx.consumer)}"
                for i, rate in enumerate(plan.rates):
                    tightest = self._apply(f"plan:{plan.name}:{i}", rate, subject, now, tightest)
                self._quota(ctx.consumer, plan)
            ctx.tightest = tightest
            self._publish(ctx, tightest)
            return None

        return consumer_limit_stage

    def _plan(self, ctx: RequestContext) -> Plan | None:
        if not self.plans_used or ctx.consumer is None:
            return None
        return self.config.quotas.plan(ctx.plan)

    def _quota(self, consumer: str, plan: Plan) -> None:
        if self.quotas is None:
            return
        wall, mono = self.wall(), self.monotonic()
        who = consumer_id(consumer)
        for kind, quota in ((DAY, plan.per_day), (MONTH, plan.per_month)):
            if not quota:
                continue
            p = period(kind, wall, self.zone)
            allowed, _used = self.quotas.consume(who, plan.name, p, quota, wall, mono)
            if allowed and self.on_quota is not None:
                self.on_quota(plan.name, kind)
            if not allowed:
                self.refused[f"quota:{kind}"] += 1
                window = 86400.0 if kind == DAY else 30 * 86400.0
                raise _refusal(
                    f"quota:{kind}",
                    f"{kind}ly quota of {quota} requests used up ({plan.name} plan)",
                    Rate(quota, window, f"{quota}/{kind}"),
                    p.ends - wall,
                )
