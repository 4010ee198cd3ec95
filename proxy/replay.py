"""`stockade replay`: recorded requests through the policy stages of another config.

Each line of a JSON access log is rebuilt into a request (method, host,
normalized path, client address, at its recorded time) and run through the
new config's checks - routing, penalties and bot rules, rate limits, body
limit, authentication, consumer limits and quotas, the WAF - without
anything being sent upstream, and its outcome compared with what was
recorded. The counters (rate limits, anomaly rules) run on the log's own
clock, so a burst in the log is a burst in the replay.

What the log does not hold cannot be replayed: headers, query strings and
bodies are never logged (they carry secrets), so header/query-keyed limits
see the key as missing, and a route that requires authentication accepts a
request only if the log shows who it was (its consumer); tokens are not
re-verified. The WAF cannot re-read a body either: a request the WAF
flagged is logged with its matches (rule, variable, points), and on a route
of the same engine mode the replay decides from those under the new
config's exclusions, anomaly threshold and action (proxy/waf/tuning.py,
recorded_flagged); other requests go through the WAF as rebuilt. Anomaly
rules see the recorded status of each request as the upstream's answer.
Nothing is banned: a ban rule that fires is reported.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_request import BaseRequest

from stockade.clock import SystemClock
from stockade.proxy.app import Gateway
from stockade.proxy.context import ALLOWED, CLIENT_ABORT, UPSTREAM_ERROR, RequestContext
from stockade.proxy.errors import Refusal
from stockade.proxy.pipeline import checks
from stockade.proxy.pipeline_types import Stage
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.waf.firewall import WAF
from stockade.proxy.waf.tuning import (
    RecordedWaf,
    TuneRecord,
    flagged_reason,
    parse_recorded_waf,
    recorded_flagged,
)

MAX_LINE = 64 * 1024


class ReplayError(ValueError):
    pass


@dataclass(frozen=True)
class Recorded:
    line: int
    time: float
    client_ip: str
    method: str
    host: str
    path: str
    status: int
    decision: str
    reason: str | None
    bytes_in: int
    consumer: str | None
    request_id: str = ""
    route: str | None = None
    waf: RecordedWaf | None = None  # what the WAF matched, when it flagged the request

    def for_tuning(self) -> TuneRecord:
        return TuneRecord(
            self.request_id, self.client_ip, self.route, self.decision, self.reason, self.waf
        )


@dataclass(frozen=True)
class Outcome:
    decision: str
    reason: str | None
    status: int | None  # None: it would have gone upstream


@dataclass
class Report:
    total: int = 0
    skipped: int = 0  # lines that are not request records
    changed: list[dict[str, Any]] = field(default_factory=list)
    by_change: Counter[str] = field(default_factory=Counter)
    bans: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self, limit: int) -> dict[str, Any]:
        return {
            "requests": self.total,
            "skipped_lines": self.skipped,
            "changed": len(self.changed),
            "by_change": dict(self.by_change.most_common()),
            "examples": self.changed[:limit],
            "would_ban": self.bans,
        }


def _when(value: Any) -> float:
    """A line's time: RFC 3339 as the access log writes it, or the Unix time older
    versions wrote (ValueError for anything else, a time without a zone included)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    when = datetime.fromisoformat(str(value))
    if when.tzinfo is None:
        raise ValueError("a time without a zone")
    return when.timestamp()


def read_log(lines: Iterable[str]) -> Iterator[Recorded | None]:
    """Each line as a record, or None for a line that is not one (kept count of)."""
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE or not line.strip():
            yield None
            continue
        try:
            raw = json.loads(line)
            yield Recorded(
                line=number,
                time=_when(raw["time"]),
                client_ip=str(raw["client_ip"]),
                method=str(raw["method"]),
                host=str(raw.get("host") or ""),
                path=str(raw["path"]),
                status=int(raw["status"]),
                decision=str(raw["decision"]),
                reason=raw.get("reason"),
                bytes_in=int(raw.get("bytes_in") or 0),
                consumer=raw.get("consumer"),
                request_id=str(raw.get("request_id") or ""),
                route=None if raw.get("route") is None else str(raw["route"]),
                waf=parse_recorded_waf(raw.get("waf")),
            )
        except (ValueError, KeyError, TypeError):
            yield None


class _Pushes:
    """Stands in for the controller: ban rules that fire are reported, nothing is banned."""

    def __init__(self) -> None:
        self.bans: list[dict[str, Any]] = []

    async def rule_ban(
        self,
        target: str,
        ttl: float,
        rule: str,
        reason: str,
        details: dict[str, Any],
        factor: float,
        max_ttl: float,
    ) -> dict[str, Any]:
        self.bans.append({"target": target, "rule": rule, "reason": reason})
        return {"status": "added"}

    async def close(self) -> None:
        pass


class _RecordedAuth:
    """Authentication from the log: who the request was, if anyone (no token to check)."""

    def __init__(self) -> None:
        self.consumer: str | None = None  # the request being replayed

    def stage(self, request: BaseRequest, ctx: RequestContext) -> None:
        route = ctx.route
        assert route is not None
        if route.auth.mode == "none":
            return
        if not self.consumer:
            raise Refusal(401, "auth", "missing", "authentication required (none recorded)")
        ctx.consumer = self.consumer


class Replayer:
    def __init__(self, config: ProxyConfig) -> None:
        # never write the live access log, never reach the controller or a database
        quiet = replace(config, access_log="/dev/null")
        self.clock = {"now": time.time()}
        self.gateway = Gateway(quiet, SystemClock())
        self.pushes = _Pushes()
        self.gateway.anomaly.bans = self.pushes
        self.gateway.anomaly.monotonic = lambda: self.clock["now"]
        self.gateway.anomaly.wall = lambda: self.clock["now"]
        self.gateway.limiter.monotonic = lambda: self.clock["now"]
        self.gateway.limiter.wall = lambda: self.clock["now"]
        self.auth = _RecordedAuth()
        self.record: Recorded | None = None  # the request being replayed
        self.anomaly_threshold = config.waf.crs.anomaly_threshold
        policy = replace(self.gateway.policy(), auth=self.auth.stage)
        if policy.waf is not None:
            policy = replace(policy, waf=self._recorded_waf(policy.waf))
        self.checks = checks(quiet, policy)

    def _recorded_waf(self, engine: Stage) -> Stage:
        """The WAF from the recorded matches where there are some (the body is not in
        the log); the WAF itself for everything else."""

        def stage(request: BaseRequest, ctx: RequestContext) -> Awaitable[None] | None:
            record, route = self.record, ctx.route
            recorded = record.waf if record is not None else None
            if record is None or recorded is None or route is None:
                return engine(request, ctx)
            policy = route.waf
            if policy.mode != recorded.mode:
                return engine(request, ctx)
            verdict = flagged_reason(record.decision, record.reason) or "blocked"
            if verdict == "blocked" and not recorded_flagged(
                recorded, policy, self.anomaly_threshold
            ):
                return None
            if policy.action == "detect":
                ctx.reason = f"waf_detect:{verdict}"
                return None
            status = 400 if verdict == "bad_body" else 403
            raise Refusal(status, WAF, verdict, "request refused by the WAF (recorded matches)")

        return stage

    async def outcome(self, record: Recorded) -> Outcome:
        self.clock["now"] = record.time
        self.record = record
        headers = {"Host": record.host or "replay.invalid"}
        if record.bytes_in:
            headers["Content-Length"] = str(record.bytes_in)
        request = make_mocked_request(
            record.method, record.path, headers=headers, payload=EMPTY_PAYLOAD
        )
        self.auth.consumer = record.consumer
        ctx = RequestContext(
            request_id=f"replay-{record.line}",
            client_ip=record.client_ip,
            peer_ip=record.client_ip,
            peer_trusted=False,
            scheme="https",
        )
        try:
            for check in self.checks:
                waiting = check(request, ctx)
                if waiting is not None:
                    await waiting
        except Refusal as refusal:
            outcome = Outcome(refusal.decision, refusal.reason, refusal.status)
            ctx.status = refusal.status
        else:
            outcome = Outcome(ALLOWED, None, None)
            ctx.status = record.status  # the upstream's answer, as recorded
        ctx.decision = outcome.decision
        self.gateway.anomaly.observe(ctx)
        await asyncio.sleep(0)  # let a fired ban rule report itself
        return outcome


# Decisions recorded for requests that every check let through (what happened after is the
# upstream's or the client's doing, not the policy's).
_PASSED_POLICY = frozenset({ALLOWED, UPSTREAM_ERROR, CLIENT_ABORT})


def _was(record: Recorded) -> str:
    return "allowed" if record.decision == ALLOWED else f"{record.decision}:{record.reason}"


async def replay(config: ProxyConfig, records: Iterable[Recorded | None]) -> Report:
    with tempfile.TemporaryDirectory(prefix="stockade-replay-") as scratch:
        # quotas count from zero in a database of the replay's own, never the live one
        quotas = replace(config.quotas, database=Path(scratch) / "usage.db")
        return await _replay(replace(config, quotas=quotas), records)


async def _replay(config: ProxyConfig, records: Iterable[Recorded | None]) -> Report:
    replayer = Replayer(config)
    report = Report()
    for record in records:
        if record is None:
            report.skipped += 1
            continue
        report.total += 1
        outcome = await replayer.outcome(record)
        was = _was(record)
        now = "allowed" if outcome.decision == ALLOWED else f"{outcome.decision}:{outcome.reason}"
        # a recorded upstream error, a client that hung up after the checks, or an allowed
        # request that the new config also lets through are the same policy outcome: only
        # policy changes are reported
        recorded_policy = "allowed" if record.decision in _PASSED_POLICY else was
        if now != recorded_policy:
            report.by_change[f"{recorded_policy} -> {now}"] += 1
            report.changed.append(
                {
                    "line": record.line,
                    "time": record.time,
                    "client_ip": record.client_ip,
                    "method": record.method,
                    "path": record.path,
                    "was": recorded_policy,
                    "now": now,
                    "status": outcome.status,
                }
            )
    report.bans = replayer.pushes.bans
    await replayer.gateway.close()
    return report


def replay_file(config: ProxyConfig, path: Path) -> Report:
    try:
        with path.open(encoding="utf-8", errors="replace") as lines:
            return asyncio.run(replay(config, read_log(lines)))
    except OSError as exc:
        raise ReplayError(f"cannot read {path}: {exc.strerror}") from None
