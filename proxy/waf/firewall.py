"""The per-worker WAF: each route's mode, evaluation off the event loop, counters.

Per request on a route with a WAF mode:

1. The body, if any, is read up to the route's waf_body_limit. A larger one
   is refused (413) or passed uninspected, as the route says (counted). A
   compressed one is refused (415) or decompressed in step 2 with the bomb
   limit decompressed_limit. What was read is forwarded as it came.
2. The evaluation: a ModSecurity transaction (sqli_xss, crs) or the OpenAPI
   check (zero_trust). A crs route with the API profile has two rule sets,
   for a JSON body and for the rest (proxy/waf/rulesets.py, api_profile.py).
   It runs in the worker's thread pool (ctypes lets go of the GIL, so other
   requests go on meanwhile), bounded by `timeout` (503 after it; the engine
   call finishes in its thread and is released there) and by max_pending
   jobs (503 beyond). With inline_max set, a sqli_xss or zero_trust request
   up to that size is evaluated on the loop instead (off by default: under
   load the threads cost less CPU per request, since they keep the engine's
   code and data in their caches). Before that, a sqli_xss request the
   engine would certainly pass (no body or a JSON one, every string the
   rules read plain and clean to libinjection: proxy/waf/fast_pass.py)
   passes without a transaction (fast_pass); one without a body before its
   stage even makes a coroutine.
3. The verdict: a block is 403 with only the request id for the client
   (400 for a body that does not parse, 413 for a decompression bomb),
   logged with the rules, their messages and the matched variables
   (clipped, credentials redacted), counted per (mode, rule id), and
   counted as waf_blocks by the anomaly rules. In detect mode the same is
   logged and counted as a detection, and the request passes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp.web_request import BaseRequest

from stockade.proxy.context import RequestContext
from stockade.proxy.errors import Refusal
from stockade.proxy.limits import BodyError
from stockade.proxy.settings import ProxyConfig, Route
from stockade.proxy.waf.body import BodyDecodeError, decode, encodings, read_body
from stockade.proxy.waf.fast_pass import FastPass, fast_pass_for
from stockade.proxy.waf.findings import (
    MAX_FINDINGS,
    SECRET_HEADERS,
    Finding,
    Matches,
    clip,
    collect,
    matched,
)
from stockade.proxy.waf.modsec import Engine, ModSecurityError
from stockade.proxy.waf.openapi import (
    OpenApiDocument,
    OpenApiError,
    OpenApiGate,
    RequestFacts,
    Violation,
)
from stockade.proxy.waf.openapi_security import Presented, RouteAccess
from stockade.proxy.waf.rulesets import RouteRules, RuleSets
from stockade.proxy.waf_settings import ENGINE_MODES, RouteWaf, WafConfig

log = logging.getLogger("stockade.proxy.waf")

WAF = "waf"  # the decision of a request the WAF refused (the anomaly rules count these)
_DECODE_STATUS = {"decompressed_too_large": 413, "bad_encoding": 400, "unsupported_encoding": 415}


@dataclass
class WafCounters:
    """What the WAF did, per worker; the metrics exporter reads these."""

    blocks: Counter[tuple[str, str]] = field(default_factory=Counter)  # (mode, rule or check)
    detections: Counter[tuple[str, str]] = field(default_factory=Counter)  # detect mode: passed
    inspected: Counter[str] = field(default_factory=Counter)  # by mode
    fast_passed: int = 0  # sqli_xss requests passed without a transaction
    body_over_limit: Counter[str] = field(default_factory=Counter)  # "rejected", "passed"
    # "inspected", "rejected", and the failures: decompressed_too_large (a bomb),
    # bad_encoding, unsupported_encoding
    compressed: Counter[str] = field(default_factory=Counter)
    timeouts: int = 0  # over the time budget: 503
    overloaded: int = 0  # over max_pending: 503
    errors: int = 0  # the engine failed: 503

    def snapshot(self) -> dict[str, object]:
        return {
            "blocks": {f"{m}:{k}": n for (m, k), n in self.blocks.items()},
            "detections": {f"{m}:{k}": n for (m, k), n in self.detections.items()},
            "inspected": dict(self.inspected),
            "fast_passed": self.fast_passed,
            "body_over_limit": dict(self.body_over_limit),
            "compressed": dict(self.compressed),
            "timeouts": self.timeouts,
            "overloaded": self.overloaded,
            "errors": self.errors,
        }


@dataclass(frozen=True)
class Verdict:
    status: int  # 0: the request may pass
    reason: str = ""
    message: str = ""
    keys: tuple[str, ...] = ()  # rule ids, or the zero-trust check: what the counters count
    findings: tuple[Finding, ...] = ()
    detail: str = ""  # zero trust: what failed, for the log
    challenge: str = ""  # zero trust's 401/403 for credentials: WWW-Authenticate
    matched: Matches | None = None  # engine modes: every match, for the access log


PASS = Verdict(0)


@dataclass(frozen=True)
class EngineInput:
    """A request as the engine takes it, copied on the loop for a worker thread."""

    client: str
    client_port: int
    server: str
    server_port: int
    uri: bytes
    method: str
    version: str
    headers: tuple[tuple[bytes, bytes], ...]
    codings: tuple[str, ...]
    body: bytes | None

    @property
    def size(self) -> int:
        return len(self.uri) + sum(len(n) + len(v) for n, v in self.headers) + len(self.body or b"")


def _addresses(request: BaseRequest) -> tuple[int, str, int]:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    local = transport.get_extra_info("sockname") if transport is not None else None
    client_port = peer[1] if isinstance(peer, tuple) and len(peer) >= 2 else 0
    if isinstance(local, tuple) and len(local) >= 2:
        return client_port, str(local[0]), int(local[1])
    return client_port, "0.0.0.0", 0


def _target(request: BaseRequest, ctx: RequestContext) -> str:
    """The target the rules see: origin form as sent, also for an absolute-form request
    (whose authority was routed on, and which the upstream receives in origin form)."""
    return ctx.origin_target or request.raw_path


def headers_for_rules(
    raw: tuple[tuple[bytes, bytes], ...], read: frozenset[bytes] | None
) -> tuple[tuple[bytes, bytes], ...]:
    """The request's headers that the rules can read (see rulesets.headers_read)."""
    if read is None:
        return tuple(raw)
    return tuple(pair for pair in raw if pair[0].lower() in read)


class Waf:
    """One worker's WAF. Loads every rule set and document the routes use, or raises."""

    def __init__(self, config: ProxyConfig) -> None:
        self.settings: WafConfig = config.waf
        self.body_idle_timeout = config.body_idle_timeout
        self.counters = WafCounters()
        self.secret_headers = SECRET_HEADERS | {config.auth.api_key_header.lower()}
        routes = [route for route in config.routes if route.waf.mode != "off"]
        self.engine: Engine | None = None
        self.rule_sets: RuleSets | None = None
        self.rules: dict[str, RouteRules] = {}  # by route name: the engine modes' rule sets
        # by route name: the headers its rules read (lowercase), None for all
        self.headers_read: dict[str, frozenset[bytes] | None] = {}
        self.gates: dict[str, OpenApiGate] = {}  # by route name: zero trust's documents
        self.api_key_header = config.auth.api_key_header  # what zero trust's apiKey maps to
        self.fast_pass: FastPass | None = None  # sqli_xss routes' check without the engine
        try:
            self._load(routes)
        except BaseException:
            self._release()
            raise
        self.executor = ThreadPoolExecutor(self.settings.threads, thread_name_prefix="waf")
        self._pending = 0
        self._pending_lock = threading.Lock()
        # Transaction ids for the engine's log lines: unguessable, so a client
        # cannot write a line that looks like another transaction's.
        self._id_prefix = secrets.token_hex(6)
        self._next_id = itertools.count(1).__next__

    def _load(self, routes: list[Route]) -> None:
        engine_routes = [r for r in routes if r.waf.mode in ENGINE_MODES]
        if engine_routes:
            self.engine = Engine(self.settings.library)
            largest = max(
                max(r.waf.body_limit for r in engine_routes), self.settings.decompressed_limit
            )
            self.rule_sets = RuleSets(self.engine, self.settings, largest)
            for route in engine_routes:
                self.rules[route.name] = self.rule_sets.for_route(route.name, route.waf)
                for exclusion in route.waf.exclusions:
                    log.info(
                        "waf: route %s: rules %s off for %s: %s",
                        route.name,
                        ", ".join(exclusion.rules),
                        ", ".join(exclusion.arguments) or "the route",
                        exclusion.reason,
                    )
                read = self.rule_sets.headers_read(route.waf.mode)
                self.headers_read[route.name] = (
                    None if read is None else frozenset(name.encode() for name in read)
                )
            if self.settings.fast_pass and any(r.waf.mode == "sqli_xss" for r in engine_routes):
                self.fast_pass = fast_pass_for(self.settings.sqli_xss_rules, self.settings.library)
        documents: dict[tuple[Path, str | None], OpenApiDocument] = {}
        for route in routes:
            path = route.waf.openapi
            if route.waf.mode == "zero_trust" and path is not None:
                key = (path, route.waf.openapi_base_path)
                if key not in documents:
                    documents[key] = OpenApiDocument(*key)
                access = RouteAccess(route.name, route.auth.mode, self.api_key_header)
                self.gates[route.name] = OpenApiGate(documents[key], access)

    @property
    def active(self) -> bool:
        return bool(self.rules or self.gates)

    def passes_fast(self, request: BaseRequest, ctx: RequestContext, route: Route) -> bool:
        """A sqli_xss request without a body that the fast pass passes (no coroutine,
        no transaction); False: inspect() it."""
        if request.body_exists or not self._fast_passed(request, ctx, route, None):
            return False
        self.counters.inspected["sqli_xss"] += 1
        return True

    def _fast_passed(
        self, request: BaseRequest, ctx: RequestContext, route: Route, body: bytes | None
    ) -> bool:
        """The fast pass passes this sqli_xss request (counted); False: the engine decides."""
        fast = self.fast_pass
        if fast is None or route.waf.mode != "sqli_xss":
            return False
        uri = _target(request, ctx).encode("utf-8", "surrogateescape")
        if not fast.passes(uri, request.raw_headers, body):
            return False
        self.counters.fast_passed += 1
        return True

    async def inspect(self, request: BaseRequest, ctx: RequestContext, route: Route) -> None:
        """Pass the request on (return) or refuse it; the stage in proxy/stages/waf.py."""
        policy = route.waf
        self.counters.inspected[policy.mode] += 1
        body = await self._read(request, ctx, route)
        codings = tuple(encodings(request.headers.get("Content-Encoding"))) if body else ()
        if codings:
            self.counters.compressed["inspected"] += 1
        gate = self.gates.get(route.name)
        if gate is not None:
            job, size = self._openapi_job(gate, request, ctx, body, codings)
        elif request.body_exists and not codings and self._fast_passed(request, ctx, route, body):
            return  # (without a body, passes_fast tried it already)
        else:
            data = self._engine_input(request, ctx, route, body, codings)
            rules = self.rules[route.name]
            job, size = (lambda: self.evaluate(rules, data)), data.size
        offload = policy.mode == "crs" or bool(codings) or size > self.settings.inline_max
        try:
            verdict = await self._offloaded(job) if offload else job()
        except ModSecurityError:
            self.counters.errors += 1
            log.exception("waf: request %s: the engine failed", ctx.request_id)
            if policy.action == "detect":
                return
            raise Refusal(503, WAF, "waf_error", "request could not be inspected") from None
        if verdict.status:
            if verdict.reason in _DECODE_STATUS:
                self.counters.compressed[verdict.reason] += 1
            self._act(verdict, ctx, request, policy)

    async def _read(self, request: BaseRequest, ctx: RequestContext, route: Route) -> bytes | None:
        """The body to inspect; None when there is none or it goes uninspected."""
        if not request.body_exists:
            return None
        policy = route.waf
        try:
            read = await read_body(
                request, policy.body_limit, route.max_body_size, self.body_idle_timeout
            )
        except BodyError as exc:
            raise Refusal(exc.status, "limit", exc.reason, str(exc)) from None
        ctx.body_read = read.data  # forwarded first, then the rest of the stream
        if not read.complete:
            if policy.body_over_limit == "reject" and policy.action == "block":
                self.counters.body_over_limit["rejected"] += 1
                raise Refusal(413, WAF, "body_too_large", "request body too large to inspect")
            self.counters.body_over_limit["passed"] += 1
            log.info(
                "waf: request %s on route %s: body over %d bytes passed uninspected",
                ctx.request_id,
                route.name,
                policy.body_limit,
            )
            return None
        if self.settings.compressed == "reject" and encodings(
            request.headers.get("Content-Encoding")
        ):
            self.counters.compressed["rejected"] += 1
            if policy.action == "block":
                raise Refusal(415, WAF, "compressed_body", "compressed request bodies not accepted")
            return None
        return read.data

    def _openapi_job(
        self,
        gate: OpenApiGate,
        request: BaseRequest,
        ctx: RequestContext,
        body: bytes | None,
        codings: tuple[str, ...],
    ) -> tuple[Callable[[], Verdict], int]:
        """Zero trust's check as a function of copied data (it may run on another thread)."""
        facts = RequestFacts(
            path=ctx.path,
            method=request.method,
            raw_query=request.rel_url.raw_query_string,  # what the forwarder sends
            headers=tuple(request.headers.items()),
            content_type=request.headers.get("Content-Type", ""),
            presented=Presented(api_key=ctx.api_key_id is not None, scopes=ctx.scopes),
        )
        size = len(_target(request, ctx)) + len(body or b"")
        return (lambda: self.check_openapi(gate, facts, body, codings)), size

    def _engine_input(
        self,
        request: BaseRequest,
        ctx: RequestContext,
        route: Route,
        body: bytes | None,
        codings: tuple[str, ...],
    ) -> EngineInput:
        """The request as the engine takes it, copied (it may run on another thread)."""
        client_port, server, server_port = _addresses(request)
        version = request.version
        return EngineInput(
            client=ctx.client_ip,
            client_port=client_port,
            server=server,
            server_port=server_port,
            uri=_target(request, ctx).encode("utf-8", "surrogateescape"),
            method=request.method,
            version=f"{version.major}.{version.minor}",
            headers=headers_for_rules(request.raw_headers, self.headers_read[route.name]),
            codings=codings,
            body=body,
        )

    async def _offloaded(self, job: Callable[[], Verdict]) -> Verdict:
        with self._pending_lock:
            if self._pending >= self.settings.max_pending:
                self.counters.overloaded += 1
                refusal = Refusal(503, WAF, "waf_busy", "too many requests being inspected")
                refusal.headers["Retry-After"] = "1"
                raise refusal
            self._pending += 1
        future = self.executor.submit(job)
        future.add_done_callback(self._finished)  # also when it outlives its request
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            self.counters.timeouts += 1
            raise Refusal(503, WAF, "waf_timeout", "request inspection took too long") from None

    def _finished(self, _: Future[Verdict]) -> None:
        with self._pending_lock:
            self._pending -= 1

    # -- evaluation (any thread) ------------------------------------------------
    def _decoded(self, body: bytes, codings: tuple[str, ...]) -> bytes | Verdict:
        try:
            return decode(body, list(codings), self.settings.decompressed_limit)
        except BodyDecodeError as exc:
            status = _DECODE_STATUS.get(exc.reason, 400)
            return Verdict(status, exc.reason, "request body could not be decoded", (exc.reason,))

    def evaluate(self, rules: RouteRules, data: EngineInput) -> Verdict:
        body = data.body
        if body and data.codings:
            decoded = self._decoded(body, data.codings)
            if isinstance(decoded, Verdict):
                return decoded
            body = decoded
        assert self.engine is not None
        transaction_id = f"{self._id_prefix}{self._next_id():x}"
        with self.engine.transaction(rules.for_request(data.headers), transaction_id) as tx:
            tx.connection(data.client, data.client_port, data.server, data.server_port)
            tx.uri(data.uri, data.method, data.version)
            tx.add_headers(data.headers)
            tx.process_headers()
            found = tx.intervention()
            if found is None:
                if body:
                    tx.append_body(body)
                tx.process_body()
                found = tx.intervention()
            if found is None:
                return PASS
            lines = [*tx.messages, found.log]
        assert self.rule_sets is not None
        findings = collect(lines, self.rule_sets.known_ids, self.secret_headers)[:MAX_FINDINGS]
        keys = tuple(f.rule_id for f in findings) or ("unknown",)
        every = matched(lines, self.rule_sets.known_ids)  # what `stockade waf tune` reads
        if found.status == 400:  # REQBODY_ERROR: the body does not parse as its type
            return Verdict(
                400,
                "bad_body",
                "request body could not be parsed",
                keys,
                tuple(findings),
                matched=every,
            )
        return Verdict(403, "blocked", "request blocked", keys, tuple(findings), matched=every)

    def check_openapi(
        self,
        gate: OpenApiGate,
        facts: RequestFacts,
        body: bytes | None,
        codings: tuple[str, ...],
    ) -> Verdict:
        if body and codings:
            decoded = self._decoded(body, codings)
            if isinstance(decoded, Verdict):
                return decoded
            body = decoded
        violation: Violation | None = gate.check(facts, body)
        if violation is None:
            return PASS
        return Verdict(
            violation.status,
            violation.reason,
            violation.message,
            (violation.reason,),
            detail=violation.detail,
            challenge=violation.challenge,
        )

    # -- the verdict ---------------------------------------------------------------
    def _act(
        self, verdict: Verdict, ctx: RequestContext, request: BaseRequest, policy: RouteWaf
    ) -> None:
        detect = policy.action == "detect"
        counts = self.counters.detections if detect else self.counters.blocks
        for key in verdict.keys:
            counts[(policy.mode, key)] += 1
        what = "; ".join(map(str, verdict.findings)) or verdict.detail or verdict.reason
        route = ctx.route.name if ctx.route is not None else "-"
        if verdict.matched is not None:
            ctx.waf_record = verdict.matched.as_json(policy.mode)
        path = clip(ctx.path, 128)
        log.warning(
            "waf %s: request %s %s %s from %s on route %s (%s): %s",
            "detected" if detect else "blocked",
            ctx.request_id,
            request.method,
            path,
            ctx.client_ip,
            route,
            policy.mode,
            what,
            extra={  # named as in the access log, for the JSON lines
                "request_id": ctx.request_id,
                "client_ip": ctx.client_ip,
                "method": request.method,
                "path": path,
                "route": route,
                "waf_mode": policy.mode,
                "waf_action": policy.action,
                "rules": list(verdict.keys),
            },
        )
        if detect:
            ctx.reason = f"waf_detect:{verdict.reason}"
            return
        refusal = Refusal(verdict.status, WAF, verdict.reason, verdict.message)
        if verdict.challenge:
            refusal.headers["WWW-Authenticate"] = verdict.challenge
        raise refusal

    # -- lifetime ----------------------------------------------------------------
    async def close(self) -> None:
        """Stop the threads (a running evaluation finishes), then release the engine."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.executor.shutdown, True)
        self._release()

    def _release(self) -> None:
        if self.rule_sets is not None:
            self.rule_sets.close()
            self.rule_sets = None
        self.rules.clear()
        if self.engine is not None:
            self.engine.close()
            self.engine = None


class WafLoadError(RuntimeError):
    """The engine, a rule set or an OpenAPI document did not load; the message says which."""


def check_waf(config: ProxyConfig) -> None:
    """Load every engine rule set and OpenAPI document the routes use, then release them."""
    if not any(route.waf.mode != "off" for route in config.routes):
        return
    try:
        waf = Waf(config)
    except (ModSecurityError, OpenApiError) as exc:
        raise WafLoadError(f"waf: {exc}") from None
    waf.executor.shutdown(wait=False)
    waf._release()
