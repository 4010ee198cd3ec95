"""Anomaly and bot detection: counters per source, rules over them, and their actions.

After each response the counters of its client IP and consumer are updated
in shared memory (so a scanner spreading requests over workers is seen
whole), and the rules over those counters are checked. A rule that holds
acts once per source (whichever worker sees it first): `log` logs, `deny`
answers 403 for `duration`, `tarpit` holds each answer for `tarpit_delay`
first (at most tarpit_max at once per worker, beyond that it denies), and
`ban` asks the controller to drop the source in the kernel (the controller
lengthens repeat offenders' bans and refuses allowlisted sources) and
denies it here until then. User-Agent rules act on the request itself.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp.web_request import BaseRequest

from stockade.proxy.anomaly_settings import AnomalyRule
from stockade.proxy.ban_client import BanPushError
from stockade.proxy.cluster_anomaly import SharedAnomaly
from stockade.proxy.cluster_counters import ClusterCounters
from stockade.proxy.context import RequestContext
from stockade.proxy.errors import Refusal
from stockade.proxy.pipeline_types import Stage
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.shared_table import PenaltyTable, WindowCounters, digest

log = logging.getLogger("stockade.proxy")

# Penalties, weakest first: a stronger rule replaces a weaker one's penalty.
LOG, TARPIT, DENY, BAN, ALLOWLISTED = range(5)
ACTION_CODES = {"log": LOG, "deny": DENY, "tarpit": TARPIT, "ban": BAN}
DEFAULT_RULES_SOCKET = Path("/run/stockade/rules.sock")  # when no config names one
RECENT = 100  # firings kept for `stockade explain` and status
BAN_RETRY_PAUSES = (0.2, 1.0, 2.0)  # after each attempt that failed but may succeed later
MAX_UA_TERMS = 10_000


class BanPusher(Protocol):
    """The controller's rules socket (proxy/ban_client.py), or a fake in tests."""

    async def rule_ban(
        self,
        target: str,
        ttl: float,
        rule: str,
        reason: str,
        details: dict[str, Any],
        factor: float,
        max_ttl: float,
    ) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class UserAgentListError(ValueError):
    pass


def load_user_agents(path: Path) -> re.Pattern[str]:
    """The scanner list (the Core Rule Set's format: one substring per line, # comments).

    Matched case-insensitively anywhere in the User-Agent, as CRS's @pmFromFile does.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserAgentListError(f"cannot read the User-Agent list {path}: {exc}") from None
    terms = [line.strip().lower() for line in lines if line.strip() and not line.startswith("#")]
    if not terms:
        raise UserAgentListError(f"the User-Agent list {path} has no entries")
    if len(terms) > MAX_UA_TERMS:
        raise UserAgentListError(f"the User-Agent list {path} has over {MAX_UA_TERMS} entries")
    # longest first, so the reported match is the most specific one
    ordered = sorted(set(terms), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered)), re.IGNORECASE)


@dataclass(frozen=True)
class Firing:
    rule: str
    action: str
    subject: str
    at: float
    until: float
    counters: dict[str, float]

    def as_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "action": self.action,
            "subject": self.subject,
            "at": round(self.at, 3),
            "until": round(self.until, 3),
            "counters": self.counters,
        }


class AnomalyDetector:
    def __init__(
        self,
        config: ProxyConfig,
        counters: WindowCounters,
        penalties: PenaltyTable,
        bans: BanPusher | None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        cluster: ClusterCounters | None = None,
    ) -> None:
        self.settings = config.anomaly
        self.rules = config.anomaly.rules
        self.counters = counters
        self.penalties = penalties
        self.bans = bans
        self.monotonic = monotonic
        self.wall = wall
        self.counter_rules = [r for r in self.rules if r.condition is not None]
        self.agent_rules = [r for r in self.rules if r.user_agents]
        self.agents = (
            load_user_agents(config.anomaly.user_agents_file) if self.agent_rules else None
        )
        # rules with scope = "cluster" count in Redis (proxy/cluster_anomaly.py)
        self.shared = SharedAnomaly(self, cluster) if cluster is not None else None
        if self.shared is not None and not self.shared.indexes:
            self.shared = None
        # (key kind, window) -> metrics the rules need there
        self.needed: dict[tuple[str, float], set[str]] = collections.defaultdict(set)
        for index, rule in enumerate(self.rules):
            if rule.condition is None or (self.shared is not None and self.shared.owns(index)):
                continue
            self.needed[(rule.key, rule.condition.window)].update(rule.metrics)
        self.count_connections = any("new_connections" in m for m in self.needed.values())
        self.fired: Counter[str] = Counter()  # by rule, for status and metrics
        self.recent: collections.deque[Firing] = collections.deque(maxlen=RECENT)
        self.tarpitted = 0
        self.connections_refused = 0  # closed at once: the source is denied or banned
        self.on_action: Callable[[str, str], None] | None = None  # (rule, action): metrics
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> bool:
        return bool(self.rules)

    # -- counting -------------------------------------------------------------
    @staticmethod
    def _key(who: str, metric: str, window: float) -> bytes:
        return digest(f"a\0{metric}\0{window:g}\0{who}")

    def _add(self, who: str, metric: str, window: float, now: float, amount: int = 1) -> int:
        return self.counters.update(self._key(who, metric, window), window, now, amount)[1]

    def _reset(self, rule: AnomalyRule, who: str, path: str) -> None:
        """After a rule stopped a source: the counts it looked at start afresh (as
        fail2ban forgets the failures behind a ban), so an expired ban is not
        re-imposed at once by the counts that caused it. A `log` rule resets nothing."""
        assert rule.condition is not None
        window = rule.condition.window
        for metric in rule.metrics:
            names = {
                "err_ratio": ("requests", "errors"),
                "auth_failures_same_path": ("f\0" + path,),
            }.get(metric, (metric,))
            for name in names:
                self.counters.clear(self._key(who, name, window))

    def _first_seen(self, who: str, tag: str, path: str, window: float, now: float) -> bool:
        return self._add(who, tag + path, window, now) == 1

    def on_connection(self, peer: str) -> bool:
        """A new TCP connection from `peer`; False if it must be closed at once."""
        now = self.monotonic()
        penalty = self.penalties.get(digest(f"ip\0{peer}"), now)
        if penalty is not None and penalty[0] in (DENY, BAN):
            self.connections_refused += 1
            return False
        if self.count_connections:
            for (kind, window), metrics in self.needed.items():
                if kind == "ip" and "new_connections" in metrics:
                    self._add(f"ip\0{peer}", "new_connections", window, now)
        return True

    def observe(self, ctx: RequestContext) -> None:
        """After a response: count it against its sources and check the rules."""
        if not self.counter_rules:
            return
        now = self.monotonic()
        values: dict[tuple[str, float], dict[str, float]] = {}
        for (kind, window), metrics in self.needed.items():
            subject = ctx.client_ip if kind == "ip" else ctx.consumer
            if subject is None:
                continue
            values[(kind, window)] = self._count(f"{kind}\0{subject}", metrics, window, ctx, now)
        for index, rule in enumerate(self.rules):
            condition = rule.condition
            if condition is None or (self.shared is not None and self.shared.owns(index)):
                continue
            observed = values.get((rule.key, condition.window))
            if observed is None:
                continue
            if all(term.holds(observed[term.metric]) for term in condition.terms):
                subject = ctx.client_ip if rule.key == "ip" else ctx.consumer
                assert subject is not None
                wanted = {t.metric: observed[t.metric] for t in condition.terms}
                if self.fire(index, subject, wanted, now) and rule.action != "log":
                    self._reset(rule, f"{rule.key}\0{subject}", ctx.path)
        if self.shared is not None:
            self.shared.observe(ctx, now)

    def _count(
        self, who: str, metrics: set[str], window: float, ctx: RequestContext, now: float
    ) -> dict[str, float]:
        status = ctx.status
        error = status >= 400
        out: dict[str, float] = {}

        def count(metric: str, happened: bool, amount: int = 1) -> None:
            if metric in metrics or (metric in ("requests", "errors") and "err_ratio" in metrics):
                out[metric] = self._add(who, metric, window, now, amount if happened else 0)

        count("requests", True)
        count("status_4xx", 400 <= status < 500)
        count("status_5xx", status >= 500)
        count("errors", error)
        count("auth_failures", status in (401, 403))
        count("rate_limited", status == 429)
        count("waf_blocks", ctx.decision == "waf" and 400 <= status < 500)  # WAF refusals
        count("bytes_out", ctx.bytes_out > 0, ctx.bytes_out)
        if "err_ratio" in metrics:
            out["err_ratio"] = out["errors"] / out["requests"] if out["requests"] else 0.0
        if "distinct_paths" in metrics:
            first = self._first_seen(who, "p\0", ctx.path, window, now)
            out["distinct_paths"] = self._add(who, "distinct_paths", window, now, int(first))
        if "distinct_404_paths" in metrics:
            first = status == 404 and self._first_seen(who, "n\0", ctx.path, window, now)
            out["distinct_404_paths"] = self._add(
                who, "distinct_404_paths", window, now, int(first)
            )
        if "auth_failures_same_path" in metrics:
            failed = status in (401, 403)
            out["auth_failures_same_path"] = self._add(
                who, "f\0" + ctx.path, window, now, int(failed)
            )
        if "new_connections" in metrics:
            out["new_connections"] = self._add(who, "new_connections", window, now, 0)
        return out

    # -- acting ---------------------------------------------------------------
    def fire(self, index: int, subject: str, observed: dict[str, float], now: float) -> bool:
        """Act on a rule for a source, unless it was already acted on; True if this did."""
        rule = self.rules[index]
        code = ACTION_CODES[rule.action]
        key = digest(f"{rule.key}\0{subject}")
        until = now + rule.duration
        if not self.penalties.raise_to(key, code, index, until, now):
            return False  # acted on already (here or by another worker), or by a stronger rule
        self.fired[rule.name] += 1
        if self.on_action is not None:
            self.on_action(rule.name, rule.action)
        wall = self.wall()
        self.recent.append(
            Firing(rule.name, rule.action, subject, wall, wall + rule.duration, observed)
        )
        shown = ", ".join(f"{k}={v:g}" for k, v in observed.items())
        log.warning(
            "rule %s: %s %s (%s); action %s",
            rule.name,
            rule.key,
            subject,
            shown,
            rule.action,
            extra={"rule": rule.name, "key": rule.key, "subject": subject, "action": rule.action},
        )
        if code == BAN:
            task = asyncio.get_running_loop().create_task(self._ban(rule, subject, observed, key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _ban(
        self, rule: AnomalyRule, subject: str, observed: dict[str, float], key: bytes
    ) -> None:
        if self.bans is None:
            log.error("rule %s: no controller to ban %s; denying it here", rule.name, subject)
            return
        reason = f"rule {rule.name}: " + ", ".join(f"{k}={v:g}" for k, v in observed.items())
        details = {"counters": observed, "condition": str(rule.condition or "user_agent")}
        result = None
        for pause in BAN_RETRY_PAUSES:
            try:
                result = await self.bans.rule_ban(
                    target=subject,
                    ttl=rule.duration,
                    rule=rule.name,
                    reason=reason[:200],
                    details=details,
                    factor=rule.ban_factor,
                    max_ttl=rule.ban_max,
                )
                break
            except BanPushError as exc:
                failure = exc
                if not exc.retryable:
                    break
                await asyncio.sleep(pause)  # the controller may be restarting
        if result is None:
            log.error(
                "rule %s: ban of %s not pushed (%s); denying it here", rule.name, subject, failure
            )
            return
        if result.get("status") == "allowlisted":
            # The allowlist always wins: stop denying it here too, but remember
            # for the rule's duration so every request does not ask again.
            now = self.monotonic()
            self.penalties.replace(key, ALLOWLISTED, self.rules.index(rule), now + rule.duration)
            log.warning("rule %s: %s is allowlisted; not banned", rule.name, subject)

    def _penalty(self, request: BaseRequest, kind: str, subject: str) -> Awaitable[None] | None:
        now = self.monotonic()
        found = self.penalties.get(digest(f"{kind}\0{subject}"), now)
        if found is None or found[0] in (LOG, ALLOWLISTED):
            return None
        action, index = found
        name = self.rules[index].name if index < len(self.rules) else "?"
        if action == TARPIT:
            return self._tarpit(self.rules[index].tarpit_delay, name)
        raise self._refusal(name, close=action == BAN)

    @staticmethod
    def _refusal(name: str, close: bool) -> Refusal:
        refusal = Refusal(403, "anomaly", f"rule:{name}", "request refused")
        refusal.close_connection = close
        return refusal

    async def _tarpit(self, delay: float, name: str) -> None:
        if self.tarpitted >= self.settings.tarpit_max:
            raise self._refusal(name, close=True)  # never let tarpits pile up
        self.tarpitted += 1
        try:
            await asyncio.sleep(delay)
        finally:
            self.tarpitted -= 1
        raise self._refusal(name, close=True)

    def _user_agent(self, request: BaseRequest, ctx: RequestContext) -> Awaitable[None] | None:
        assert self.agents is not None
        agent = request.headers.get("User-Agent", "")
        match = self.agents.search(agent) if agent else None
        if match is None:
            return None
        now = self.monotonic()
        for rule in self.agent_rules:
            index = self.rules.index(rule)
            subject = ctx.client_ip if rule.key == "ip" else ctx.consumer
            if subject is None:
                continue
            self.fire(index, subject, {"user_agent_match": 1.0}, now)
            log.info("request %s: scanner User-Agent %r", ctx.request_id, match.group(0))
            if rule.action in ("deny", "ban"):
                raise self._refusal(rule.name, close=rule.action == "ban")
            if rule.action == "tarpit":
                return self._tarpit(rule.tarpit_delay, rule.name)
        return None

    # -- stages ---------------------------------------------------------------
    def ip_stage(self) -> Stage:
        def anomaly_stage(request: BaseRequest, ctx: RequestContext) -> Awaitable[None] | None:
            waiting = self._penalty(request, "ip", ctx.client_ip)
            if waiting is None and self.agents is not None:
                waiting = self._user_agent(request, ctx)
            return waiting

        return anomaly_stage

    def consumer_stage(self) -> Stage:
        def consumer_anomaly_stage(
            request: BaseRequest, ctx: RequestContext
        ) -> Awaitable[None] | None:
            if ctx.consumer is None:
                return None
            return self._penalty(request, "consumer", ctx.consumer)

        return consumer_anomaly_stage

    def snapshot(self) -> dict[str, Any]:
        return {
            "fired": dict(self.fired),
            "recent": [f.as_json() for f in self.recent],
            "tarpitted": self.tarpitted,
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.shared is not None:
            await self.shared.close()
        if self.bans is not None:
            await self.bans.close()
