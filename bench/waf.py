"""The WAF's cost: microseconds per request per mode, memory over a million
transactions, the gateway's requests/s with each mode next to `off`, and what
each mode refuses of a benign API corpus and of an attack corpus.

1. Per request, in this process: the evaluation a WAF mode runs for one
   request (proxy/waf/firewall.py: Waf.evaluate for sqli_xss and crs, a
   ModSecurity transaction through the ctypes binding; Waf.check_openapi
   for zero_trust), on the same mix of four requests, once clean and once
   attacking (SQLi, XSS, LFI, SQLi in a JSON body). sqli_xss is timed as
   the WAF stage runs it (the fast pass, with nothing remembered between
   requests, then the engine for what it does not pass) and as
   sqli_xss_engine, every request through a transaction. crs is the Core
   Rule Set as it is (waf_profile = "none"), crs_api with the API profile
   (proxy/waf/api_profile.py). Each round times every mode and mix in a
   shuffled order; microseconds per request = the time of `iterations`
   passes over the mix / (iterations x 4).
2. Memory: `transactions` sqli_xss transactions through the binding, half of
   them blocked (their intervention strings freed), resident memory (VmRSS)
   recorded every 100,000.
3. The gateway: the set-up of bench/l7.py (everything on 127.0.0.1, HAProxy
   as the upstream) with one `stockade proxy run` of N workers and a route
   per mode: /off/, /sqli_xss/, /crs/, /crs_api/, /zero_trust/ (whose
   OpenAPI document declares the request). wrk sends clean GETs with a query string and
   browser-like headers to each route, once per round in a shuffled order,
   with a different query value on every request (bench/wrk_lines.lua; so
   no cache holds it); sqli_xss_engine is the sqli_xss route with a query
   value that is not plain ASCII (caf%C3%A9), which the fast pass leaves to
   the engine. Requests/s and the proxy's CPU per request as in case 3.
4. False positives and detection: tests/waf/corpus's benign API requests
   and attacks (provenance in its README.md), each evaluated once per mode
   in this process as the WAF stage would: off, sqli_xss (the fast pass,
   then the engine), crs at paranoia level 1, crs PL1 with the API profile
   (GraphQL requests on a route with waf_graphql_fields = ["query"]), and
   crs PL2. A request is refused when the evaluation's verdict is not a
   pass; the time is the wall-clock microseconds per benign request.

Run: .venv/bin/python -m bench.waf [--rounds N] [--duration S] [--transactions N]
     .venv/bin/python -m bench.waf --leak-only   # part 2 alone, the full million
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from bench import gateways, l7, report
from bench.common import BenchError, machine, now_iso, source_revision
from bench.report import WAF_MIXES, WAF_MODES, WAF_ROWS
from stockade.proxy.settings import Pool, ProxyConfig, Route, Server
from stockade.proxy.waf.fast_pass import FastPass
from stockade.proxy.waf.firewall import PASS, EngineInput, Verdict, Waf, headers_for_rules
from stockade.proxy.waf.modsec import Engine
from stockade.proxy.waf.openapi import RequestFacts
from stockade.proxy.waf.rulesets import RuleSets
from stockade.proxy.waf_settings import CrsConfig, RouteWaf, WafConfig

HOST = l7.HOST
API_HOST = "api.example.com"
ROUNDS = 7
DURATION_S = 4
WARMUP_S = 2
# passes over the mix per round
ITERATIONS = {
    "sqli_xss": 400,
    "sqli_xss_engine": 400,
    "crs": 40,
    "crs_api": 40,
    "zero_trust": 40,
}
CORPUS = Path(__file__).resolve().parents[1] / "tests" / "waf" / "corpus"
# What the accuracy part compares: (name, paranoia level, the WAF route per corpus route)
ACCURACY_MODES = ("off", "sqli_xss", "crs_pl1", "crs_pl1_api", "crs_pl2")
TRANSACTIONS = 1_000_000
CHECKPOINT = 100_000
COMMAND = ".venv/bin/python -m bench.waf"
WRK_LINES = Path(__file__).resolve().parent / "wrk_lines.lua"
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
HEADERS = (
    ("Host", API_HOST),
    ("User-Agent", UA),
    ("Accept", "application/json"),
    ("Accept-Language", "en-US,en;q=0.8"),
    ("Cookie", "session=9f8e7d6c5b4a; theme=dark"),
)
GATEWAY_PATH = "/api/items?q=hello+world&page=2"
# The gateway's load: a different query on every request (words + a number).
GATEWAY_QUERY = "/api/items?q={words}+{n}&page={page}"
GATEWAY_ENGINE_QUERY = "/api/items?q=caf%C3%A9+{words}+{n}&page={page}"  # not plain: the engine
WORDS = ("red", "shoes", "size", "blue", "coat", "winter", "sale", "linen", "shirt", "kids")
GATEWAY_PATHS = 50_000  # per route; more than a run sends at this host's speed

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "bench", "version": "1"},
    "servers": [{"url": "/zero_trust"}, {"url": "/"}],
    "paths": {
        "/api/items": {
            "get": {
                "parameters": [
                    {"name": "q", "in": "query", "schema": {"type": "string", "maxLength": 100}},
                    {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    {"name": "f", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "ok"}},
            },
            "post": {
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "q": {"type": "string"},
                                    "order": {"type": "object"},
                                },
                            }
                        }
                    }
                },
                "responses": {"201": {"description": "created"}},
            },
        },
        "/api/users/{id}": {
            "get": {
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
                ],
                "responses": {"200": {"description": "ok"}},
            }
        },
    },
}


def stockade_config(workers: int, port: int, upstream_port: int, state: Path, openapi: Path) -> str:
    """A route per mode on the one upstream: /off/ (every other path), /sqli_xss/, ...;
    /crs/ is the Core Rule Set as it is, /crs_api/ with the API profile."""
    routes = [gateways.Route(name="off")] + [
        gateways.Route(
            name=mode,
            path_prefix=f"/{mode}/",
            waf=mode,
            openapi=openapi if mode == "zero_trust" else None,
        )
        for mode in WAF_MODES
        if mode != "crs"
    ]
    toml = gateways.stockade_toml(
        workers=workers, port=port, upstream_port=upstream_port, state=state, routes=routes
    )
    for name, profile in (("crs", "none"), ("crs_api", "api")):
        toml += (
            f'\n[[proxy.routes]]\nname = "{name}"\npool = "upstream"\n'
            f'path_prefix = "/{name}/"\nwaf = "crs"\nwaf_profile = "{profile}"\n'
        )
    return toml


def _request(
    method: str, target: str, body: bytes = b"", content_type: str = ""
) -> tuple[str, str, bytes, tuple[tuple[str, str], ...]]:
    headers = HEADERS + ((("Content-Type", content_type),) if content_type else ())
    if body:
        headers += (("Content-Length", str(len(body))),)
    return method, target, body, headers


ORDER = json.dumps({"order": {"items": [{"sku": "A-1", "qty": 2}], "note": "ring twice"}})
MIXES: dict[str, list[tuple[str, str, bytes, tuple[tuple[str, str], ...]]]] = {
    "clean": [
        _request("GET", "/api/items?q=hello+world&page=2"),
        _request("GET", "/api/users/42"),
        _request("POST", "/api/items", ORDER.encode(), "application/json"),
        _request("GET", "/api/items?q=O%27Brien&page=3"),
    ],
    "attack": [
        _request("GET", "/api/items?q=1%27%20OR%20%271%27%3D%271&page=2"),
        _request("GET", "/api/items?q=%3Cscript%3Ealert(1)%3C/script%3E"),
        _request(
            "POST",
            "/api/items",
            json.dumps({"q": "1 UNION SELECT password FROM users--"}).encode(),
            "application/json",
        ),
        _request("GET", "/api/items?f=../../../../etc/passwd"),
    ],
}


def _waf(tmp: Path, paranoia: int = 1) -> Waf:
    """A WAF with a route per mode, named for it (crs_graphql: crs_api for GraphQL)."""
    document = tmp / "openapi.json"
    document.write_text(json.dumps(OPENAPI))
    pool = Pool("p", (Server("127.0.0.1", 9),))
    routes = (
        Route("sqli_xss", "p", path_prefix="/a/", waf=RouteWaf("sqli_xss")),
        Route("crs", "p", path_prefix="/b/", waf=RouteWaf("crs", profile="none")),
        Route("crs_api", "p", path_prefix="/d/", waf=RouteWaf("crs")),
        Route(
            "crs_graphql", "p", path_prefix="/e/", waf=RouteWaf("crs", graphql_fields=("query",))
        ),
        Route("zero_trust", "p", path_prefix="/c/", waf=RouteWaf("zero_trust", openapi=document)),
    )
    waf = WafConfig(crs=CrsConfig(paranoia_level=paranoia))
    return Waf(ProxyConfig(routes=routes, pools=(pool,), waf=waf))


def _staged(
    fast: FastPass, data: EngineInput, engine: Callable[[], Verdict]
) -> Callable[[], Verdict]:
    """sqli_xss as the stage runs it: the fast pass, else the engine."""

    def job() -> Verdict:
        fast.forget()  # nothing remembered from the request before: every string checked
        return PASS if fast.passes(data.uri, data.headers, data.body) else engine()

    return job


def _jobs(waf: Waf, mode: str, mix: str) -> list[Callable[[], Verdict]]:
    """The evaluation of each request of a mix, as the WAF stage would run it."""
    jobs: list[Callable[[], Verdict]] = []
    engine_mode = "sqli_xss" if mode == "sqli_xss_engine" else mode
    for method, target, body, headers in MIXES[mix]:
        if mode == "zero_trust":
            path, _, query = target.partition("?")
            facts = RequestFacts(path, method, query, tuple(headers), "application/json")
            gate = waf.gates[mode]
            jobs.append(partial(waf.check_openapi, gate, facts, body or None, ()))
        else:
            data = EngineInput(
                "198.18.0.1",
                40000,
                "198.18.0.2",
                443,
                target.encode(),
                method,
                "1.1",
                headers_for_rules(
                    tuple((n.encode(), v.encode()) for n, v in headers),
                    waf.headers_read[engine_mode],
                ),
                (),
                body or None,
            )
            rules = waf.rules[engine_mode]
            job: Callable[[], Verdict] = partial(waf.evaluate, rules, data)
            if mode == "sqli_xss":
                assert waf.fast_pass is not None
                job = _staged(waf.fast_pass, data, job)
            jobs.append(job)
    return jobs


def check_verdicts(waf: Waf) -> None:
    """Every mode passes the clean mix; crs refuses every attack, sqli_xss the SQLi and
    XSS ones (not the path traversal, which it does not look for)."""
    sqli_xss = [True, True, True, False]
    expected = {
        "sqli_xss": sqli_xss,
        "sqli_xss_engine": sqli_xss,
        "crs": [True] * 4,
        "crs_api": [True] * 4,
    }
    if waf.fast_pass is None:
        raise BenchError("the sqli_xss fast pass is off: are the shipped rules in place?")
    for mode in WAF_ROWS:
        for job in _jobs(waf, mode, "clean"):
            if job() is not PASS:
                raise BenchError(f"{mode} refused a clean request: {job()}")
        refused = [job() is not PASS for job in _jobs(waf, mode, "attack")]
        if mode in expected and refused != expected[mode]:
            raise BenchError(f"{mode}: attacks refused {refused}, expected {expected[mode]}")


def micro(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="stockade-bench-") as tmp:
        waf = _waf(Path(tmp))
        check_verdicts(waf)
        cells = [(mode, mix) for mode in WAF_ROWS for mix in WAF_MIXES]
        samples: dict[str, dict[str, list[float]]] = {
            m: {x: [] for x in WAF_MIXES} for m in WAF_ROWS
        }
        rng = random.Random(6)
        for done in range(rounds):
            rng.shuffle(cells)
            for mode, mix in cells:
                jobs = _jobs(waf, mode, mix)
                passes = ITERATIONS[mode]
                started = time.perf_counter()
                for _ in range(passes):
                    for job in jobs:
                        job()
                elapsed = time.perf_counter() - started
                samples[mode][mix].append(round(elapsed / (passes * len(jobs)) * 1e6, 2))
            line = ", ".join(f"{m}/{x} {samples[m][x][-1]:.0f}" for m, x in sorted(cells))
            print(f"waf: round {done + 1}/{rounds}: µs per request {line}", file=sys.stderr)
        waf.executor.shutdown()
        waf._release()
    return {"rounds": rounds, "iterations": ITERATIONS, "requests_per_mix": 4, "samples": samples}


def _corpus(name: str) -> list[dict[str, Any]]:
    path = CORPUS / name
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise BenchError(f"cannot read the corpus {path}: {exc}") from None


def _corpus_input(waf: Waf, route: str, request: dict[str, Any]) -> EngineInput:
    body = request["body"].encode()
    headers = [(b"Host", API_HOST.encode()), (b"Accept", b"application/json")]
    headers += [(n.encode(), v.encode()) for n, v in request["headers"]]
    if body or request["method"] in ("POST", "PUT", "PATCH"):
        headers.append((b"Content-Length", str(len(body)).encode()))
    return EngineInput(
        "198.18.0.1",
        40000,
        "198.18.0.2",
        443,
        request["target"].encode(),
        request["method"],
        "1.1",
        headers_for_rules(tuple(headers), waf.headers_read[route]),
        (),
        body or None,
    )


def _refuses(waf: Waf, mode: str, request: dict[str, Any]) -> bool:
    """Whether a mode's evaluation (as the WAF stage runs it) refuses the request."""
    if mode == "off":
        return False
    if mode == "crs_pl1_api":
        route = "crs_graphql" if request["route"] == "graphql" else "crs_api"
    else:
        route = "sqli_xss" if mode == "sqli_xss" else "crs"
    data = _corpus_input(waf, route, request)
    if mode == "sqli_xss":
        assert waf.fast_pass is not None
        waf.fast_pass.forget()
        if waf.fast_pass.passes(data.uri, data.headers, data.body):
            return False
    return waf.evaluate(waf.rules[route], data) is not PASS


def accuracy() -> dict[str, Any]:
    """What each mode refuses of the benign corpus and of the attack corpus."""
    benign, attacks = _corpus("benign_api.jsonl"), _corpus("attacks.jsonl")
    out: dict[str, Any] = {"benign": len(benign), "attacks": len(attacks), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="stockade-bench-") as tmp:
        wafs = {1: _waf(Path(tmp)), 2: _waf(Path(tmp), paranoia=2)}
        try:
            for mode in ACCURACY_MODES:
                waf = wafs[2 if mode == "crs_pl2" else 1]
                started = time.perf_counter()
                refused = [r["id"] for r in benign if _refuses(waf, mode, r)]
                seconds = time.perf_counter() - started
                kinds: dict[str, list[int]] = {}
                for r in benign:
                    counts = kinds.setdefault(r["kind"], [0, 0])
                    counts[0] += r["id"] in refused
                    counts[1] += 1
                detected = [r["id"] for r in attacks if _refuses(waf, mode, r)]
                out["modes"][mode] = {
                    "benign_refused": len(refused),
                    "attacks_refused": len(detected),
                    "us_per_benign": round(seconds / len(benign) * 1e6, 1),
                    "by_kind": kinds,
                    "refused": refused if len(refused) <= 20 else refused[:20],
                }
                line = out["modes"][mode]
                print(
                    f"waf: {mode}: benign refused {line['benign_refused']}/{len(benign)}, "
                    f"attacks {line['attacks_refused']}/{len(attacks)}, "
                    f"{line['us_per_benign']:.0f} µs per benign request",
                    file=sys.stderr,
                )
        finally:
            for waf in wafs.values():
                waf.executor.shutdown()
                waf._release()
    return out


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError("no VmRSS in /proc/self/status")


def leak(transactions: int) -> dict[str, Any]:
    """sqli_xss transactions, half blocked; RSS every CHECKPOINT transactions."""
    engine = Engine()
    rule_sets = RuleSets(engine, WafConfig(), 1 << 20)
    rules = rule_sets.get("sqli_xss")
    headers = tuple((n.encode(), v.encode()) for n, v in HEADERS)
    clean = b"/api/items?q=hello+world&page=2"
    attack = b"/api/items?q=1%27%20OR%20%271%27%3D%271"
    points: list[list[int]] = [[0, _rss_kib()]]
    blocked = 0
    started = time.monotonic()
    for i in range(1, transactions + 1):
        with engine.transaction(rules, f"t{i}") as tx:
            tx.connection("198.18.0.1", 40000, "198.18.0.2", 443)
            tx.uri(attack if i % 2 else clean, "GET", "1.1")
            for name, value in headers:
                tx.add_header(name, value)
            tx.process_headers()
            tx.process_body()
            blocked += tx.intervention() is not None
        if i % CHECKPOINT == 0:
            points.append([i, _rss_kib()])
    seconds = time.monotonic() - started
    rule_sets.close()
    engine.close()
    if blocked != transactions // 2 + transactions % 2:
        raise BenchError(f"leak: {blocked} of {transactions} blocked, expected half")
    print(f"waf: {transactions:,} transactions in {seconds:.0f} s; RSS {points}", file=sys.stderr)
    return {
        "transactions": transactions,
        "blocked": blocked,
        "seconds": round(seconds, 1),
        "rss_kib": points,
    }


def _paths(mode: str, count: int) -> list[str]:
    """The gateway's request paths for a route: a different query each."""
    rng = random.Random(mode)
    template = GATEWAY_ENGINE_QUERY if mode == "sqli_xss_engine" else GATEWAY_QUERY
    route = "sqli_xss" if mode == "sqli_xss_engine" else mode
    return [
        f"/{route}"
        + template.format(words="+".join(rng.sample(WORDS, 3)), n=n, page=rng.randint(1, 50))
        for n in range(count)
    ]


def _path_file(tmp: Path, mode: str) -> Path:
    path = tmp / f"paths-{mode}.txt"
    path.write_text("\n".join(_paths(mode, GATEWAY_PATHS)) + "\n")
    return path


def gateway(rounds: int, duration: int) -> dict[str, Any]:
    workers = os.cpu_count() or 1
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stockade-bench-")))
        document = tmp / "openapi.json"
        document.write_text(json.dumps(OPENAPI))
        upstream_port, port = l7.free_port(), l7.free_port()
        upstream_cfg = tmp / "upstream.cfg"
        upstream_cfg.write_text(
            l7.UPSTREAM_CFG.format(host=HOST, port=upstream_port, body=l7.BODY.decode())
        )
        upstream = stack.enter_context(
            l7.serving(
                "upstream",
                ["haproxy", "-f", str(upstream_cfg), "-db"],
                upstream_port,
                tmp / "upstream.log",
            )
        )
        toml = tmp / "stockade.toml"
        toml.write_text(stockade_config(workers, port, upstream_port, tmp, document))
        argv = [*l7.STOCKADE, "--config", str(toml), "proxy", "run"]
        pid = stack.enter_context(l7.serving("stockade", argv, port, tmp / "stockade.log"))
        headers = {name: value for name, value in HEADERS}
        for mode in ("off", *WAF_MODES, "crs_api"):
            clean, _ = l7.get(port, f"/{mode}{GATEWAY_PATH}", headers)
            attack, _ = l7.get(
                port, f"/{mode}/api/items?q=%3Cscript%3Ealert(1)%3C/script%3E&evil=1", headers
            )
            if clean != 200 or (attack == 200) != (mode == "off"):
                raise BenchError(f"/{mode}/: clean answered {clean}, attack {attack}")
        target = l7.Target("stockade", port, pid, processes=1 + workers)
        wrk_headers = tuple(f"{name}: {value}" for name, value in HEADERS)
        variants = ("off", *WAF_ROWS)
        path_files = {mode: _path_file(tmp, mode) for mode in variants}
        status, _ = l7.get(port, _paths("sqli_xss_engine", 1)[0], headers)
        if status != 200:
            raise BenchError(f"sqli_xss refused its engine request: {status}")

        def load(mode: str) -> l7.Load:
            return l7.Load(
                f"/{mode}{GATEWAY_PATH}",
                wrk_headers,
                WRK_LINES,
                (str(path_files[mode]), "0", "path"),
            )

        for mode in variants:
            l7.measure(target, upstream, WARMUP_S, load(mode))
        samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in variants}
        rng = random.Random(7)
        for done in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for mode in order:
                samples[mode].append(l7.measure(target, upstream, duration, load(mode)))
            line = ", ".join(f"{m} {samples[m][-1]['rps']:.0f}" for m in variants)
            print(f"waf: round {done + 1}/{rounds}: requests/s {line}", file=sys.stderr)
    return {
        "workers": workers,
        "rounds": rounds,
        "warmup_s": WARMUP_S,
        "path": GATEWAY_QUERY.format(words="<words>", n="<n>", page="<page>"),
        "engine_path": GATEWAY_ENGINE_QUERY.format(words="<words>", n="<n>", page="<page>"),
        "wrk": {"threads": l7.THREADS, "connections": l7.CONNECTIONS, "duration_s": duration},
        "user_hz": l7.USER_HZ,
        "variants": [{"name": name, "samples": values} for name, values in samples.items()],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.waf",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: .venv/bin/python -m bench.waf --rounds 2 --duration 2 "
        "--transactions 200000",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="default %(default)s")
    parser.add_argument(
        "--duration", type=int, default=DURATION_S, help="seconds per wrk run, 1-60 (%(default)s)"
    )
    parser.add_argument(
        "--transactions", type=int, default=TRANSACTIONS, help="for the memory part (%(default)s)"
    )
    parser.add_argument("--leak-only", action="store_true", help="only the memory part")
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.duration <= 60 or args.transactions < CHECKPOINT:
        parser.error(f"--rounds >= 1, --duration 1-60, --transactions >= {CHECKPOINT:,}")
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        memory = leak(args.transactions)
        if args.leak_only:
            return 0
        per_request = micro(args.rounds)
        refusals = accuracy()
        served = gateway(args.rounds, args.duration)
    except BenchError as exc:
        print(f"bench.waf: {exc}", file=sys.stderr)
        return 1
    results = {
        "bench": "waf",
        "date": now_iso(),
        "command": COMMAND,
        "source": source_revision(l7.SOURCES),
        "machine": machine(("libmodsecurity3", "modsecurity-crs", *l7.PACKAGES)),
        "total_s": round(time.monotonic() - started, 1),
        "host_load": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-minute average
        "micro": per_request,
        "memory": memory,
        "gateway": served,
        "accuracy": refusals,
    }
    report.publish("waf", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
