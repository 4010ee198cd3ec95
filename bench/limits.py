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
import http.client
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import l7, report
from bench.common import BenchError, machine, now_iso, save_results, source_revision
from bench.report import LIMITS_HAPROXY, LIMITS_HAPROXY_THREE, LIMITS_NONE, LIMITS_THREE

HOST = l7.HOST
TENANT_HEADER = "X-Tenant"
TENANT = "t1"
QUERY_KEY = "key"
KEY = "k1"
OPEN_PATH = "/open"
LIMITED_PATH = "/limited"
QUERY = f"?{QUERY_KEY}={KEY}"
LIMIT_PER_MIN = 100_000_000  # never reached: counted on every request, refuses nothing
DURATION_S = 5
ROUNDS = 10
WARMUP_S = 2
COMMAND = ".venv/bin/python -m bench.limits"
LIMIT_NAMES = ("per_ip", "per_tenant", "per_key")
HAPROXY_TABLES = ("st_src", "st_tenant", "st_key")

STOCKADE_TOML = """\
[proxy]
workers = {workers}
status_dir = "{state}/status"
metrics_dir = "{state}/metrics"
access_log = "/dev/null"
drain_timeout = "5s"

# metrics are counted as in production; served on a free port
[proxy.admin]
port = 0

[[proxy.listeners]]
address = "{host}"
port = {port}

[proxy.pools.upstream]
servers = ["{host}:{upstream_port}"]

[proxy.pools.upstream.health]
enabled = false

[proxy.rate_limiting.limits.per_ip]
rate = "{limit}/min"
key = "ip"

[proxy.rate_limiting.limits.per_tenant]
rate = "{limit}/min"
key = "header:{header}"

[proxy.rate_limiting.limits.per_key]
rate = "{limit}/min"
key = "query:{query}"

[[proxy.routes]]
name = "open"
pool = "upstream"

[[proxy.routes]]
name = "limited"
pool = "upstream"
path_prefix = "{limited_path}"
rate_limits = ["per_ip", "per_tenant", "per_key"]
"""

# l7's plain proxy; {tables} adds three stick tables (HAProxy keeps one per
# section, so each lives in an otherwise empty backend) and their rules.
HAPROXY_CFG = """\
global
    nbthread {threads}
    maxconn 4096
    stats socket {stats_socket} mode 600 level admin
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend proxy
    bind {host}:{port}
{rules}    default_backend upstream
backend upstream
    http-reuse always
    server upstream {host}:{upstream_port}
{tables}"""

HAPROXY_RULES = """\
    http-request track-sc0 src table st_src
    http-request track-sc1 req.hdr({header}) table st_tenant
    http-request track-sc2 url_param({query}) table st_key
    http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt {limit} }}
    http-request deny deny_status 429 if {{ sc_http_req_rate(1) gt {limit} }}
    http-request deny deny_status 429 if {{ sc_http_req_rate(2) gt {limit} }}
"""

HAPROXY_TABLES_CFG = """\
backend st_src
    stick-table type ip size 100k expire 60s store http_req_rate(60s)
backend st_tenant
    stick-table type string len 64 size 100k expire 60s store http_req_rate(60s)
backend st_key
    stick-table type string len 64 size 100k expire 60s store http_req_rate(60s)
"""


def get_headers(port: int, path: str) -> tuple[int, dict[str, str]]:
    """The benchmark's request, once; its status and response headers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path + QUERY, headers={TENANT_HEADER: TENANT})
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def check_stockade(port: int) -> None:
    """On /limited RateLimit-Remaining goes down by one per request; /open has none."""
    for path, limited in ((OPEN_PATH, False), (LIMITED_PATH, True)):
        seen = []
        for _ in range(2):
            status, headers = get_headers(port, path)
            if status != 200:
                raise BenchError(f"stockade: GET {path}{QUERY} answered {status}")
            seen.append(headers.get("ratelimit-remaining"))
        if not limited:
            if seen != [None, None]:
                raise BenchError(
                    f"stockade: RateLimit-Remaining {seen} on {path}, a route without limits"
                )
        elif None in seen or int(seen[0] or 0) - int(seen[1] or 0) != 1:
            raise BenchError(
                f"stockade: RateLimit-Remaining on {path} went {seen}, expected down by one"
            )


def haproxy_command(stats_socket: Path, command: str) -> str:
    """One command on HAProxy's stats socket; its whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(str(stats_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            raise BenchError(f"HAProxy's stats socket {stats_socket}: {exc}") from None
    return b"".join(chunks).decode(errors="replace")


def check_haproxy_tables(stats_socket: Path) -> dict[str, str]:
    """Each table holds the request's key with a request rate; the entries, by table."""
    entries = {}
    for table, key in zip(HAPROXY_TABLES, ("127.0.0.1", TENANT, KEY), strict=True):
        answer = haproxy_command(stats_socket, f"show table {table}")
        found = [line for line in answer.splitlines() if f"key={key} " in line]
        if not found or "http_req_rate(60000)=0" in found[0]:
            raise BenchError(f"HAProxy's table {table} does not count key {key}:\n{answer}")
        entries[table] = found[0].strip()
    return entries


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
        upstream_port = l7.free_port()
        ports = {name: l7.free_port() for name in (LIMITS_NONE, LIMITS_HAPROXY)}
        ports[LIMITS_HAPROXY_THREE] = l7.free_port()

        def config(name: str, text: str) -> Path:
            path = tmp / name
            path.write_text(text)
            return path

        upstream_cfg = config(
            "upstream.cfg",
            l7.UPSTREAM_CFG.format(host=HOST, port=upstream_port, body=l7.BODY.decode()),
        )
        upstream = stack.enter_context(
            l7.serving(
                "upstream",
                ["haproxy", "-f", str(upstream_cfg), "-db"],
                upstream_port,
                tmp / "upstream.log",
            )
        )
        toml = config(
            "stockade.toml",
            STOCKADE_TOML.format(
                workers=workers,
                host=HOST,
                port=ports[LIMITS_NONE],
                upstream_port=upstream_port,
                limit=LIMIT_PER_MIN,
                header=TENANT_HEADER,
                query=QUERY_KEY,
                limited_path=LIMITED_PATH,
                state=tmp / "state",
            ),
        )
        argv = [*l7.STOCKADE, "--config", str(toml), "proxy", "run"]
        stockade = stack.enter_context(
            l7.serving("stockade", argv, ports[LIMITS_NONE], tmp / "stockade.log")
        )
        check_stockade(ports[LIMITS_NONE])
        targets = {
            name: l7.Target(name, ports[LIMITS_NONE], stockade, processes=1 + workers)
            for name in (LIMITS_NONE, LIMITS_THREE)
        }
        stats_socket = tmp / "haproxy-tables.sock"
        for name, tables in ((LIMITS_HAPROXY, False), (LIMITS_HAPROXY_THREE, True)):
            cfg = config(
                f"haproxy-{int(tables)}.cfg",
                HAPROXY_CFG.format(
                    threads=workers,
                    stats_socket=stats_socket if tables else tmp / "haproxy-plain.sock",
                    host=HOST,
                    port=ports[name],
                    upstream_port=upstream_port,
                    rules=HAPROXY_RULES.format(
                        header=TENANT_HEADER, query=QUERY_KEY, limit=LIMIT_PER_MIN
                    )
                    if tables
                    else "",
                    tables=HAPROXY_TABLES_CFG if tables else "",
                ),
            )
            argv = ["haproxy", "-f", str(cfg), "-db"]
            log = tmp / f"haproxy-{int(tables)}.log"
            pid = stack.enter_context(l7.serving(name, argv, ports[name], log))
            targets[name] = l7.Target(name, ports[name], pid)

        for name, target in targets.items():  # warm up: connections, caches, the pools
            l7.measure(target, upstream, WARMUP_S, loads[name])
        table_entries = check_haproxy_tables(stats_socket)
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        rng = random.Random(5)
        for done in range(rounds):
            order = list(targets)
            rng.shuffle(order)
            for name in order:
                samples[name].append(l7.measure(targets[name], upstream, duration, loads[name]))
            line = ", ".join(f"{name} {samples[name][-1]['rps']:.0f}" for name in targets)
            print(f"limits: round {done + 1}/{rounds}: requests/s {line}", file=sys.stderr)
        check_stockade(ports[LIMITS_NONE])  # still counting, not refusing
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
            {"name": "per_ip", "key": "ip", "haproxy": "src"},
            {"name": "per_tenant", "key": f"header:{TENANT_HEADER}", "haproxy": "req.hdr"},
            {"name": "per_key", "key": f"query:{QUERY_KEY}", "haproxy": "url_param"},
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
    path = save_results("limits", results)
    print(report.render_limits(results))
    print(f"limits: results in {path}; README in {report.write_readme()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
