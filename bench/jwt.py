"""Requests/s, p99 and CPU per request of stockade's JWT auth, side by side with HAProxy.

The set-up of bench/l7.py (everything on 127.0.0.1; one upstream, HAProxy
with one thread answering every request itself) with one stockade and one
HAProxy in front of it, and an RSA-2048 key pair made for the run. wrk, with
l7's settings, measures four variants:

  stockade, no auth           GET /open: a route with auth = "none"
  stockade, JWT, one token    GET /jwt: auth = "jwt" (RS256), the same token on
                              every request (the verified-token cache answers)
  stockade, JWT, new tokens   GET /jwt with a different token on every request
  HAProxy, jwt_verify         GET /jwt, `http-request` rules checking alg, iss,
                              aud and exp and `jwt_verify` RS256 against the
                              same public key, with the different tokens

Every variant sends an Authorization header (the no-auth route too, so only
the checking differs), and both gateways count every request against a per-IP
limit (stockade's shared-memory counters, HAProxy's stick table) set too high
to refuse anything: the limit's cost is in every variant. The different tokens
are made up front with PyJWT and taken in turn by bench/wrk_lines.lua, each
run starting where the last run of its variant stopped: a token comes back
only after --tokens other requests, more than a worker's cache holds, so each
of them pays the signature check.

Each round runs every variant once, in a shuffled order; the README shows
medians. CPU per request as in l7: utime + stime of the proxy's processes over
the run, divided by the requests wrk completed. After the rounds, py-spy samples
one stockade worker during one more run of the different tokens (not counted).

Run: .venv/bin/python -m bench.jwt [--rounds N] [--duration S] [--tokens N] [--no-profile]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import gateways, l7, report
from bench.common import BENCH_DIR, BenchError, machine, now_iso, source_revision
from bench.report import JWT_DISTINCT, JWT_HAPROXY, JWT_NONE, JWT_REPEATED

HOST = l7.HOST
OPEN_PATH = "/open"
JWT_PATH = "/jwt"
TOKENS = 50_000
CACHE_SIZE = 10_000  # proxy/jwt_auth.py JwtVerifier's default, per worker
DURATION_S = 4
ROUNDS = 6
WARMUP_S = 2
PROFILE_S = 8
COMMAND = ".venv/bin/python -m bench.jwt"
TOKENS_SCRIPT = BENCH_DIR / "wrk_lines.lua"
PER_IP_LIMIT = 100_000_000  # per minute: counted on every request, never reached


def make_tokens(private: bytes, count: int) -> list[str]:
    """`count` different RS256 tokens, signed on every CPU (about 0.3 ms each here)."""
    exp = gateways.token_expiry()
    jobs = os.cpu_count() or 1
    chunk = -(-count // jobs)
    with ProcessPoolExecutor(jobs) as pool:
        parts = [
            pool.submit(gateways.sign, private, first, min(chunk, count - first), exp)
            for first in range(0, count, chunk)
        ]
        return [token for part in parts for token in part.result()]


def run(rounds: int, duration: int, token_count: int, profile: bool) -> dict[str, Any]:
    started = time.monotonic()
    workers = os.cpu_count() or 1
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stockade-bench-")))
        private_pem, public_file = gateways.make_keys(tmp)
        issuer = gateways.Issuer(public_file)
        signing = time.monotonic()
        tokens = make_tokens(private_pem, token_count + 1)
        signing_s = time.monotonic() - signing
        repeated, distinct = tokens[0], tokens[1:]
        token_file = tmp / "tokens.txt"
        token_file.write_text("".join(f"Bearer {token}\n" for token in distinct))
        forged = gateways.sign(gateways.other_key(), 0, 1, gateways.token_expiry())[0]

        upstream_port, upstream = l7.start_upstream(stack, tmp)
        stockade_port, haproxy_port = l7.free_port(), l7.free_port()
        # a per-IP limit on every route of both gateways, high enough that it never
        # refuses here: both count every request and pass it
        per_ip = (gateways.PER_IP,)
        toml = gateways.stockade_toml(
            workers=workers,
            port=stockade_port,
            upstream_port=upstream_port,
            state=tmp / "state",
            routes=(
                gateways.Route("open", auth="none"),
                gateways.Route("jwt", path_prefix=JWT_PATH, auth="jwt"),
            ),
            limits=per_ip,
            limit_per_min=PER_IP_LIMIT,
            all_routes=True,
            issuer=issuer,
        )
        stockade_pid = l7.start_stockade(stack, tmp, "stockade", toml, stockade_port)
        rules, tables = gateways.haproxy_limits(per_ip, PER_IP_LIMIT)
        haproxy_cfg = gateways.haproxy_cfg(
            threads=workers,
            port=haproxy_port,
            upstream_port=upstream_port,
            frontend=rules + gateways.haproxy_jwt(issuer, (JWT_PATH,)),
            tables=tables,
        )
        haproxy_pid = l7.start_haproxy(stack, tmp, "HAProxy", haproxy_cfg, haproxy_port)
        for name, port in (("stockade", stockade_port), ("HAProxy", haproxy_port)):
            gateways.check_jwt(name, port, JWT_PATH, repeated, forged)

        stockade = l7.Target("stockade", stockade_port, stockade_pid, processes=1 + workers)
        haproxy = l7.Target("HAProxy", haproxy_port, haproxy_pid)
        header = (f"Authorization: Bearer {repeated}",)
        targets = {
            JWT_NONE: stockade,
            JWT_REPEATED: stockade,
            JWT_DISTINCT: stockade,
            JWT_HAPROXY: haproxy,
        }
        fixed = {JWT_NONE: l7.Load(OPEN_PATH, header), JWT_REPEATED: l7.Load(JWT_PATH, header)}
        positions = {JWT_DISTINCT: 0, JWT_HAPROXY: 0}  # the next token of each variant

        def load(name: str) -> l7.Load:
            if name in fixed:
                return fixed[name]
            script_args = (str(token_file), str(positions[name]), "Authorization")
            return l7.Load(JWT_PATH, (), TOKENS_SCRIPT, script_args)

        def measure(name: str, seconds: int) -> dict[str, Any]:
            sample = l7.measure(targets[name], upstream, seconds, load(name))
            if name in positions:  # requests in flight at the end took a token too
                positions[name] += sample["requests"] + l7.CONNECTIONS
            return sample

        for name in targets:  # warm up: connections, caches, the upstream pools
            measure(name, WARMUP_S)
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        rng = random.Random(4)
        for done in range(rounds):
            order = list(targets)
            rng.shuffle(order)
            for name in order:
                samples[name].append(measure(name, duration))
            line = ", ".join(f"{name} {samples[name][-1]['rps']:.0f}" for name in targets)
            print(f"jwt: round {done + 1}/{rounds}: requests/s {line}", file=sys.stderr)

        profiled: dict[str, Any] | None = None
        if profile:
            try:
                profiled = l7.profile_worker(stockade, PROFILE_S, tmp, load(JWT_DISTINCT))
                profiled["variant"] = JWT_DISTINCT
            except BenchError as exc:
                print(f"jwt: no profile: {exc}", file=sys.stderr)
                profiled = {"error": str(exc)}
    return {
        "bench": "jwt",
        "date": now_iso(),
        "command": COMMAND,
        "source": source_revision(l7.SOURCES),
        "machine": machine(l7.PACKAGES),
        "host": HOST,
        "paths": {"open": OPEN_PATH, "jwt": JWT_PATH},
        "body_bytes": len(l7.BODY),
        "token_bytes": len(repeated),
        "tokens": token_count,
        "signing_s": round(signing_s, 1),
        "cache_size": CACHE_SIZE,
        "wrk": {"threads": l7.THREADS, "connections": l7.CONNECTIONS, "duration_s": duration},
        "workers": workers,
        "rounds": rounds,
        "warmup_s": WARMUP_S,
        "user_hz": l7.USER_HZ,
        "total_s": round(time.monotonic() - started, 1),
        "variants": [{"name": name, "samples": values} for name, values in samples.items()],
        "profile": profiled,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.jwt",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: .venv/bin/python -m bench.jwt --rounds 2 --duration 3 --no-profile",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="default %(default)s")
    parser.add_argument(
        "--duration", type=int, default=DURATION_S, help="seconds per wrk run, 1-60 (%(default)s)"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=TOKENS,
        help=f"different tokens, >= 2 x {CACHE_SIZE:,} x CPUs, so none stays cached (%(default)s)",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the py-spy run after the rounds"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.duration <= 60:
        parser.error("--rounds must be >= 1 and --duration between 1 and 60")
    if args.tokens < 2 * CACHE_SIZE * (os.cpu_count() or 1):
        parser.error(f"--tokens must be at least 2 x {CACHE_SIZE:,} x the number of CPUs")
    try:
        results = run(args.rounds, args.duration, args.tokens, not args.no_profile)
    except BenchError as exc:
        print(f"bench.jwt: {exc}", file=sys.stderr)
        return 1
    report.publish("jwt", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
