"""Requests/s, p99 and CPU per request with three rate limits on a route, vs none.

The set-up of bench/l7.py (everything on 127.0.0.1; one upstream, HAProxy
with one thread answering every request itself), with one stockade proxy and
two HAProxies in front of it, all running for the whole bench:

  stockade, no limits        `stockade proxy run` (N workers): GET /open, a
                             route without limits
  stockade, 3 limits         the same proxy: GET /limited, a route with three
                             limits keyed by ip, header:X-Tenant and query:key
  HAProxy, plain             l7's plain proxy (nbthread N)
  HAProxy, 3 stick tables    the same with three stick tables tracking src,
                             req.hdr(X-Tenant) and url_param(key), each with
                             an http_req_rate deny rule

Every limit is set far above the load (100,000,000 a minute), so nothing is
refused and every request pays three counter updates. wrk sends the same
kind of request to every variant: GET /open?key=k1 (or /limited?key=k1) with
`X-Tenant: t1`, so all requests hit the same three counters (the hottest
case for the locks between stockade's workers). Before the rounds the bench
checks that the limits count: stockade's RateLimit-Remaining goes down by one
per request on /limited (and is absent on /open), and each of HAProxy's
tables holds the key with a request rate.

Each round runs every variant once, in a shuffled order; the README shows
medians. CPU per request as in l7: utime + stime of the proxy's processes
over the run, divided by the requests wrk completed.

Run: .venv/bin/python -m bench.limits [--rounds N] [--duration S]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import gateways, l7, report
from bench.common import BenchError, machine, now_iso, source_revision
from bench.report import LIMITS_HAPROXY, LIMITS_HAPROXY_THREE, LIMITS_NONE, LIMITS_THREE

HOST = l7.HOST
TENANT_HEADER = gateways.TENANT_HEADER
TENANT = "t1"
QUERY_KEY = gateways.QUERY_KEY
KEY = "k1"
OPEN_PATH = "/open"
LIMITED_PATH = "/limited"
QUERY = f"?{QUERY_KEY}={KEY}"
LIMIT_PER_MIN = 100_000_000  # never reached: counted on every request, refuses nothing
DURATION_S = 5
ROUNDS = 10
WARMUP_S = 2
COMMAND = ".venv/bin/python -m bench.limits"
LIMIT_NAMES = tuple(limit.name for limit in gateways.THREE_LIMITS)


def run(rounds: int, duration: int) -> dict[str, Any]:
    started = time.monotonic()
    workers = os.cpu_count() or 1
    header = (f"{TENANT_HEADER}: {TENANT}",)
    loads = {
        name: l7.Load((LIMITED_PATH if limited else OPEN_PATH) + QUERY, header)
        for name, limited in (
            (LIMITS_NONE, False),
            (LIMITS_THREE, True),
            (LIMITS_HAPROXY, False),
            (LIMITS_HAPROXY_THREE, True),
        )
    }
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stockade-bench-")))
        upstream_port, upstream = l7.start_upstream(stack, tmp)
        ports = {name: l7.free_port() for name in (LIMITS_NONE, LIMITS_HAPROXY)}
        ports[LIMITS_HAPROXY_THREE] = l7.free_port()
        toml = gateways.stockade_toml(
            workers=workers,
            port=ports[LIMITS_NONE],
            upstream_port=upstream_port,
            state=tmp / "state",
            routes=(
                gateways.Route("open"),
                gateways.Route("limited", path_prefix=LIMITED_PATH, rate_limits=LIMIT_NAMES),
            ),
            limits=gateways.THREE_LIMITS,
            limit_per_min=LIMIT_PER_MIN,
        )
        stockade = l7.start_stockade(stack, tmp, "stockade", toml, ports[LIMITS_NONE])
        request = {TENANT_HEADER: TENANT}
        for path, limited in ((OPEN_PATH, False), (LIMITED_PATH, True)):
            gateways.check_rate_headers(
                "stockade", ports[LIMITS_NONE], path + QUERY, limited, request
            )
        targets = {
            name: l7.Target(name, ports[LIMITS_NONE], stockade, processes=1 + workers)
            for name in (LIMITS_NONE, LIMITS_THREE)
        }
        stats_socket = tmp / "haproxy-tables.sock"
        for name, tables in ((LIMITS_HAPROXY, False), (LIMITS_HAPROXY_THREE, True)):
            rules, sections = gateways.haproxy_limits(gateways.THREE_LIMITS, LIMIT_PER_MIN)
            cfg = gateways.haproxy_cfg(
                threads=workers,
                port=ports[name],
                upstream_port=upstream_port,
                frontend=rules if tables else "",
                tables=sections if tables else "",
                stats_socket=stats_socket if tables else None,
            )
            pid = l7.start_haproxy(stack, tmp, name, cfg, ports[name])
            targets[name] = l7.Target(name, ports[name], pid)

        for name, target in targets.items():  # warm up: connections, caches, the pools
            l7.measure(target, upstream, WARMUP_S, loads[name])
        table_entries = gateways.check_haproxy_tables(
            stats_socket, gateways.THREE_LIMITS, ("127.0.0.1", TENANT, KEY)
        )
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        rng = random.Random(5)
        for done in range(rounds):
            order = list(targets)
            rng.shuffle(order)
            for name in order:
                samples[name].append(l7.measure(targets[name], upstream, duration, loads[name]))
            line = ", ".join(f"{name} {samples[name][-1]['rps']:.0f}" for name in targets)
            print(f"limits: round {done + 1}/{rounds}: requests/s {line}", file=sys.stderr)
        # still counting, not refusing
        gateways.check_rate_headers(
            "stockade", ports[LIMITS_NONE], LIMITED_PATH + QUERY, True, request
        )
    return {
        "bench": "limits",
        "date": now_iso(),
        "command": COMMAND,
        "source": source_revision(l7.SOURCES),
        "machine": machine(l7.PACKAGES),
        "host": HOST,
        "paths": {"open": OPEN_PATH + QUERY, "limited": LIMITED_PATH + QUERY},
        "header": f"{TENANT_HEADER}: {TENANT}",
        "limit_per_min": LIMIT_PER_MIN,
        "limits": [
            {"name": limit.name, "key": limit.key, "haproxy": limit.fetch}
            for limit in gateways.THREE_LIMITS
        ],
        "haproxy_tables": table_entries,
        "body_bytes": len(l7.BODY),
        "wrk": {"threads": l7.THREADS, "connections": l7.CONNECTIONS, "duration_s": duration},
        "workers": workers,
        "rounds": rounds,
        "warmup_s": WARMUP_S,
        "user_hz": l7.USER_HZ,
        "total_s": round(time.monotonic() - started, 1),
        "variants": [{"name": name, "samples": values} for name, values in samples.items()],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.limits",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: .venv/bin/python -m bench.limits --rounds 2 --duration 3",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="default %(default)s")
    parser.add_argument(
        "--duration", type=int, default=DURATION_S, help="seconds per wrk run, 1-60 (%(default)s)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.duration <= 60:
        parser.error("--rounds must be >= 1 and --duration between 1 and 60")
    try:
        results = run(args.rounds, args.duration)
    except BenchError as exc:
        print(f"bench.limits: {exc}", file=sys.stderr)
        return 1
    report.publish("limits", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
