"""Anomaly rules with `scope = "cluster"`: their counters live in Redis, so a scanner
spreading its requests over every node is counted whole.

After each response the rule's counters for its source are counted in one
round trip (ClusterCounters.add_many), off the request's path, and the rule
is checked against the cluster-wide totals; when it holds, the detector acts
as for a local rule (a `ban` goes to this node's controller, whose cluster
sync bans the source on every node) and the counters it used start afresh.

While Redis is away (on_redis_down = "local") the rule counts on this node
and counts (not ratios) are scaled by expected_nodes before the check, so a
source is judged by an estimate of its cluster-wide behaviour.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stockade.proxy.anomaly_settings import AnomalyRule
from stockade.proxy.cluster_counters import ClusterCounters, Op
from stockade.proxy.context import RequestContext

if TYPE_CHECKING:
    from stockade.proxy.anomaly import AnomalyDetector

log = logging.getLogger("stockade.proxy")

MAX_PENDING = 1000  # counting tasks at once per worker; beyond, responses go uncounted
# Counted per response, as AnomalyDetector._count does: (metric, happened(status, ctx)).
_SIMPLE = ("requests", "status_4xx", "status_5xx", "errors", "auth_failures", "rate_limited")


@dataclass(frozen=True)
class Seen:
    """What one response adds to the counters (the context itself is not kept)."""

    client_ip: str
    consumer: str | None
    status: int
    path: str
    bytes_out: int
    decision: str

    @classmethod
    def of(cls, ctx: RequestContext) -> Seen:
        return cls(ctx.client_ip, ctx.consumer, ctx.status, ctx.path, ctx.bytes_out, ctx.decision)

    def amount(self, metric: str) -> int:
        status = self.status
        return int(
            {
                "requests": True,
                "status_4xx": 400 <= status < 500,
                "status_5xx": status >= 500,
                "errors": status >= 400,
                "auth_failures": status in (401, 403),
                "rate_limited": status == 429,
                "waf_blocks": self.decision == "waf" and 400 <= status < 500,
            }.get(metric, False)
        )


class SharedAnomaly:
    def __init__(self, detector: AnomalyDetector, cluster: ClusterCounters) -> None:
        self.detector = detector
        self.cluster = cluster
        self.indexes = {
            i
            for i, rule in enumerate(detector.rules)
            if rule.condition is not None and rule.scope == "cluster"
        }
        self.needed: dict[tuple[str, float], set[str]] = defaultdict(set)
        for i in self.indexes:
            rule = detector.rules[i]
            assert rule.condition is not None
            self.needed[(rule.key, rule.condition.window)].update(rule.metrics)
        self._tasks: set[asyncio.Task[None]] = set()
        self._skipped = 0

    def owns(self, index: int) -> bool:
        return index in self.indexes

    def observe(self, ctx: RequestContext, now: float) -> None:
        """After a response: count it in Redis (a task), or here while Redis is away."""
        if not self.cluster.available():
            self._fallback(ctx, now)
            return
        if len(self._tasks) >= MAX_PENDING:
            self._skipped += 1
            if self._skipped == 1:
                log.warning("cluster: anomaly counting cannot keep up; responses go uncounted")
            return
        task = asyncio.get_running_loop().create_task(self._count(Seen.of(ctx), ctx, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _key(self, who: str, metric: str, window: float) -> str:
        return self.detector._key(who, metric, window).hex()

    def _ops(self, seen: Seen) -> tuple[list[Op], dict[tuple[str, float], dict[str, int]]]:
        """The counters to add for one response, and where each metric's total comes back."""
        ops: list[Op] = []
        where: dict[tuple[str, float], dict[str, int]] = {}

        def add(key: str, window: float, amount: int, depends: int = 0) -> int:
            ops.append((key, window, amount, depends))
            return len(ops)  # 1-based, as the script counts

        for (kind, window), metrics in self.needed.items():
            subject = seen.client_ip if kind == "ip" else seen.consumer
            if subject is None:
                continue
            who = f"{kind}\0{subject}"
            slots: dict[str, int] = {}
            wanted = set(metrics)
            if "err_ratio" in metrics:
                wanted |= {"requests", "errors"}
            for metric in (*_SIMPLE, "waf_blocks"):
                if metric in wanted:
                    slots[metric] = add(self._key(who, metric, window), window, seen.amount(metric))
            if "bytes_out" in wanted:
                key = self._key(who, "bytes_out", window)
                slots["bytes_out"] = add(key, window, seen.bytes_out)
            if "distinct_paths" in wanted:
                marker = add(self._key(who, "p\0" + seen.path, window), window, 1)
                key = self._key(who, "distinct_paths", window)
                slots["distinct_paths"] = add(key, window, 1, marker)
            if "distinct_404_paths" in wanted:
                first = int(seen.status == 404)
                marker = add(self._key(who, "n\0" + seen.path, window), window, first)
                key = self._key(who, "distinct_404_paths", window)
                slots["distinct_404_paths"] = add(key, window, 1, marker)
            if "auth_failures_same_path" in wanted:
                failed = int(seen.status in (401, 403))
                key = self._key(who, "f\0" + seen.path, window)
                slots["auth_failures_same_path"] = add(key, window, failed)
            where[(kind, window)] = slots
        return ops, where

    async def _count(self, seen: Seen, ctx: RequestContext, now: float) -> None:
        ops, where = self._ops(seen)
        if not ops:
            return
        totals = await self.cluster.add_many(ops)
        if totals is None:  # Redis failed just now: this response counts here
            self._fallback(ctx, now)
            return
        values: dict[tuple[str, float], dict[str, float]] = {}
        for place, slots in where.items():
            out = {metric: float(totals[slot - 1]) for metric, slot in slots.items()}
            if "requests" in out and "errors" in out:
                out["err_ratio"] = out["errors"] / out["requests"] if out["requests"] else 0.0
            values[place] = out
        for index in sorted(self.indexes):
            rule = self.detector.rules[index]
            fired = self._check(index, rule, values, seen, now)
            if fired and rule.action != "log":
                await self.cluster.clear(self._reset_keys(rule, seen))

    def _check(
        self,
        index: int,
        rule: AnomalyRule,
        values: dict[tuple[str, float], dict[str, float]],
        seen: Seen,
        now: float,
    ) -> bool:
        condition = rule.condition
        assert condition is not None
        observed = values.get((rule.key, condition.window))
        subject = seen.client_ip if rule.key == "ip" else seen.consumer
        if observed is None or subject is None:
            return False
        if not all(term.holds(observed[term.metric]) for term in condition.terms):
            return False
        wanted = {t.metric: observed[t.metric] for t in condition.terms}
        return self.detector.fire(index, subject, wanted, now)

    def _reset_keys(self, rule: AnomalyRule, seen: Seen) -> list[str]:
        """The counters a rule that acted looked at (as AnomalyDetector._reset)."""
        assert rule.condition is not None
        window = rule.condition.window
        subject = seen.client_ip if rule.key == "ip" else seen.consumer
        who = f"{rule.key}\0{subject}"
        keys = []
        for metric in rule.metrics:
            names = {
                "err_ratio": ("requests", "errors"),
                "auth_failures_same_path": ("f\0" + seen.path,),
            }.get(metric, (metric,))
            keys += [self._key(who, name, window) for name in names]
        return keys

    def _fallback(self, ctx: RequestContext, now: float) -> None:
        """Redis away: "local" counts here and judges by counts x expected_nodes."""
        config = self.cluster.config
        if config.on_redis_down != "local":
            return
        scale = float(config.expected_nodes)
        for index in sorted(self.indexes):
            rule = self.detector.rules[index]
            condition = rule.condition
            assert condition is not None
            subject = ctx.client_ip if rule.key == "ip" else ctx.consumer
            if subject is None:
                continue
            # keys of their own, so local rules over the same window count nothing twice
            who = f"fallback\0{rule.key}\0{subject}"
            observed = self.detector._count(who, rule.metrics, condition.window, ctx, now)
            scaled = {m: v if m == "err_ratio" else v * scale for m, v in observed.items()}
            if all(term.holds(scaled[term.metric]) for term in condition.terms):
                wanted = {t.metric: scaled[t.metric] for t in condition.terms}
                if self.detector.fire(index, subject, wanted, now) and rule.action != "log":
                    self.detector._reset(rule, who, ctx.path)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
