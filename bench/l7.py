"""Requests/s, p99 and CPU per request of the L7 gateway, side by side with HAProxy.

Everything runs on 127.0.0.1 for the whole bench: one upstream (HAProxy with
one thread, answering every request itself with an 11-byte JSON body) and
three proxies in front of it, each doing the same work per workload where it
can (bench/gateways.py builds both configs):

  workload        stockade (one route each)          HAProxy (rules on the path)
  plain proxy     a route, nothing else              a plain proxy
  RS256 JWT       auth = "jwt"                       jwt_verify and claim checks
  3 rate limits   limits keyed by ip, X-Tenant, key  three stick tables
  WAF sqli_xss    waf = "sqli_xss"                   (none: HAProxy has no WAF)
  all together    JWT + the 3 limits + sqli_xss      JWT + the 3 stick tables

wrk, with the same settings and the same request for every variant (only the
path's first segment differs; every request carries the same RS256 token and
X-Tenant header, so only the gateway's work differs), measures:

  direct               wrk -> upstream
  stockade, 1 worker   wrk -> `stockade proxy run` (workers = 1) -> upstream;
                       the plain proxy
  stockade, N workers  the same with workers = N, the number of CPUs; every
                       workload
  HAProxy              wrk -> haproxy (nbthread N, http-reuse always) ->
                       upstream; every workload but the WAF

Each round runs every variant once, in a shuffled order; the README shows
medians over the rounds. A proxy's CPU per request is the growth of utime +
stime (/proc/<pid>/stat) of all its processes - stockade's master and
workers, haproxy's one process - divided by the requests wrk completed.
After the rounds, py-spy samples one stockade worker's Python code during
one more run of the plain proxy (not counted) for the profile in
bench/README.md.

Run: .venv/bin/python -m bench.l7 [--rounds N] [--duration S] [--no-profile]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import gateways, report
from bench.common import BENCH_DIR, BenchError, machine, now_iso, source_revision
from bench.report import (
    DIRECT,
    HAPROXY,
    L7_ALL,
    L7_JWT,
    L7_LIMITS,
    L7_PLAIN,
    L7_WAF,
    L7_WORKLOADS,
    STOCKADE_1,
    STOCKADE_N,
    l7_variant,
)

HOST = gateways.HOST
PATH = "/"
BODY = b'{"ok":true}'
THREADS = 1
CONNECTIONS = 32
DURATION_S = 5
ROUNDS = 10
WARMUP_S = 2
PROFILE_S = 10
# the workloads' path prefixes; the plain proxy is stockade's catch-all route
PREFIXES = {L7_PLAIN: "", L7_JWT: "/jwt", L7_LIMITS: "/limits", L7_WAF: "/waf", L7_ALL: "/all"}
REQUEST = "/api/items?key=k1&q=hello+world&page=2"  # after the prefix
TENANT = "t1"
KEY = "k1"
LIMIT_PER_MIN = 100_000_000  # never reached: counted on every request, refuses nothing
WAF_MODE = "sqli_xss"
XSS = "/api/items?key=k1&q=%3Cscript%3Ealert(1)%3C/script%3E"
PROFILE_RATE = 200  # py-spy samples per second
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
COMMAND = ".venv/bin/python -m bench.l7"
PACKAGES = ("wrk", "haproxy")
SOURCES = ("proxy", "cli", "stockade")  # what a local change in makes the result "dirty"
WRK_SCRIPT = BENCH_DIR / "wrk_report.lua"
STOCKADE = [sys.executable, "-m", "stockade.cli.main"]
PY_SPY = Path(sys.executable).parent / "py-spy"
USER_HZ = os.sysconf("SC_CLK_TCK")
STDLIB = sysconfig.get_paths()["stdlib"] + "/"


UPSTREAM_CFG = """\
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend upstream
    bind {host}:{port}
    http-request return status 200 content-type application/json string '{body}'
"""


@dataclass(frozen=True)
class Target:
    """What wrk is pointed at in one variant."""

    name: str
    port: int
    pid: int | None  # the proxy's (master) process; None: wrk hits the upstream itself
    processes: int = 1  # how many processes the proxy should have, master included


@dataclass(frozen=True)
class Load:
    """What wrk sends: the path, extra headers, and its Lua script with its arguments."""

    path: str = PATH
    headers: tuple[str, ...] = ()  # "Name: value", passed with -H
    script: Path = WRK_SCRIPT
    script_args: tuple[str, ...] = ()  # after "--", for the script's init(args)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def get(port: int, path: str = PATH, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _tail(path: Path, chars: int = 600) -> str:
    text = path.read_text(errors="replace").strip()
    return text[-chars:] or "(no output)"


@contextmanager
def serving(name: str, argv: list[str], port: int, log: Path) -> Iterator[int]:
    """Start a server in its own process group, wait until it answers BODY; yield its pid.

    Stopped with SIGTERM afterwards (stockade's master drains and reaps its
    workers); if it is still running after STOP_TIMEOUT_S its process group
    is killed, and any process of that group left behind is killed by pid.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while True:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited ({proc.returncode}) before serving:\n{_tail(log)}")
            try:
                status, body = get(port)
            except OSError as exc:
                last = str(exc)
            else:
                if status == 200 and body == BODY:
                    break
                last = f"status {status}, body {body[:100]!r}"
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{name} did not answer {BODY!r} on {HOST}:{port} within "
                    f"{READY_TIMEOUT_S:.0f}s ({last}):\n{_tail(log)}"
                )
            time.sleep(0.2)
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"l7: {name} did not stop on SIGTERM; killing it", file=sys.stderr)
                os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the group is ours
                proc.wait()
        for pid in group_members(proc.pid):  # e.g. workers of a master that crashed
            print(f"l7: {name} left process {pid} behind; killing it", file=sys.stderr)
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_upstream(stack: ExitStack, tmp: Path) -> tuple[int, int]:
    """The upstream (UPSTREAM_CFG) on a free port for as long as stack; its port and pid."""
    port = free_port()
    cfg = tmp / "upstream.cfg"
    cfg.write_text(UPSTREAM_CFG.format(host=HOST, port=port, body=BODY.decode()))
    argv = ["haproxy", "-f", str(cfg), "-db"]
    return port, stack.enter_context(serving("upstream", argv, port, tmp / "upstream.log"))


def start_stockade(stack: ExitStack, tmp: Path, name: str, toml: str, port: int) -> int:
    """`stockade proxy run` with this config, serving on port for as long as stack; its
    master's pid."""
    slug = "".join(c if c.isalnum() else "-" for c in name)
    config = tmp / f"{slug}.toml"
    config.write_text(toml)
    argv = [*STOCKADE, "--config", str(config), "proxy", "run"]
    return stack.enter_context(serving(name, argv, port, tmp / f"{slug}.log"))


def start_haproxy(stack: ExitStack, tmp: Path, name: str, cfg: str, port: int) -> int:
    """haproxy with this config, serving on port for as long as stack; its pid."""
    slug = "".join(c if c.isalnum() else "-" for c in name)
    config = tmp / f"{slug}.cfg"
    config.write_text(cfg)
    argv = ["haproxy", "-f", str(config), "-db"]
    return stack.enter_context(serving(name, argv, port, tmp / f"{slug}.log"))


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [0] is field 3 (state)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def _processes(field: int, value: int) -> list[int]:
    """Pids whose /proc/<pid>/stat field (index as in _stat_fields) equals value."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[field]) == value:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return sorted(found)


def process_tree(pid: int) -> list[int]:
    """pid and its direct children (stockade's master and its workers)."""
    return [pid, *_processes(1, pid)]  # field 4: ppid


def group_members(pgid: int) -> list[int]:
    return _processes(2, pgid)  # field 5: pgrp


def cpu_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """utime and stime of the processes (all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            raise BenchError(f"process {pid} went away during the run") from None
        user += int(fields[11])  # field 14
        system += int(fields[12])  # field 15
    return user / USER_HZ, system / USER_HZ


def host_cpu() -> tuple[float, float]:
    """Busy (not idle or iowait) and steal seconds of the whole host, all CPUs."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:9]]
    # user nice system idle iowait irq softirq steal
    return (sum(values) - values[3] - values[4]) / USER_HZ, values[7] / USER_HZ


def children_cpu() -> float:
    """CPU of this process's reaped children: wrk, once subprocess.run has waited for it."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk_argv(port: int, duration: int, load: Load = Load()) -> list[str]:
    argv = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{duration}s", "--latency"]
    for header in load.headers:
        argv += ["-H", header]
    argv += ["-s", str(load.script), f"http://{HOST}:{port}{load.path}"]
    return [*argv, "--", *load.script_args] if load.script_args else argv


def run_wrk(port: int, duration: int, load: Load = Load()) -> dict[str, Any]:
    """One bounded wrk run (-d); its summary from bench/wrk_report.lua."""
    result = subprocess.run(
        wrk_argv(port, duration, load),
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


def measure(
    target: Target, upstream_pid: int, duration: int, load: Load = Load()
) -> dict[str, Any]:
    pids = process_tree(target.pid) if target.pid is not None else []
    if target.pid is not None and len(pids) != target.processes:
        raise BenchError(f"{target.name}: {len(pids)} processes, expected {target.processes}")
    proxy_before, upstream_before = cpu_seconds(pids), sum(cpu_seconds([upstream_pid]))
    (busy_before, steal_before), wrk_before = host_cpu(), children_cpu()
    wrk = run_wrk(target.port, duration, load)
    (busy_after, steal_after), wrk_after = host_cpu(), children_cpu()
    proxy_after, upstream_after = cpu_seconds(pids), sum(cpu_seconds([upstream_pid]))
    if target.pid is not None and process_tree(target.pid) != pids:
        raise BenchError(f"{target.name}: its processes changed during the run (a restart?)")
    errors = wrk["errors"]
    if errors["status"]:
        raise BenchError(f"{target.name}: {errors['status']} answers were not 2xx or 3xx")
    elapsed = wrk["duration_us"] / 1e6
    return {
        "requests": wrk["requests"],
        "elapsed_s": round(elapsed, 3),
        "rps": round(wrk["requests"] / elapsed, 1),
        "latency_us": wrk["latency_us"],
        "socket_errors": sum(errors.values()),
        "proxy_cpu_s": round(sum(proxy_after) - sum(proxy_before), 2) if pids else None,
        # the kernel's part of it: system calls, and the loopback TCP work they do
        "proxy_system_s": round(proxy_after[1] - proxy_before[1], 2) if pids else None,
        "upstream_cpu_s": round(upstream_after - upstream_before, 2),
        "wrk_cpu_s": round(wrk_after - wrk_before, 3),
        "host_busy_s": round(busy_after - busy_before, 2),
        "host_steal_s": round(steal_after - steal_before, 2),
    }


# --- the profile ------------------------------------------------------------


def _frame(frame: str) -> tuple[str, bool]:
    """'name (/path/site-packages/aiohttp/web.py)' -> ('name (aiohttp/web.py)', False);
    the flag is True for the standard library (asyncio, selectors, ...)."""
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame, False
    path = where.rstrip(")")
    stdlib = path.startswith(STDLIB)
    for marker in ("site-packages/", "dist-packages/", STDLIB, str(BENCH_DIR.parent) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})", stdlib


def summarize_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """Shares of the samples per function and file, from py-spy's raw output (collapsed
    stacks: one 'frame;frame;...;leaf count' line per distinct stack).

    self: the function was running its own code (or C code or a system call it
    made); inclusive: it was on the stack - only functions outside the standard
    library, and not those on (nearly) every stack such as the worker's entry.
    """
    self_count: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_file: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(frame) for frame in stack.split(";")]
        total += count
        leaf = frames[-1][0]
        self_count[leaf] += count
        by_file[leaf.rpartition(" (")[2].rstrip(")")] += count
        for name in {name for name, stdlib in frames if not stdlib}:
            inclusive[name] += count
    if not total:
        raise BenchError("py-spy recorded no samples")

    def shares(counter: collections.Counter[str], below: float = 1.0) -> list[list[Any]]:
        ranked = [(name, n / total) for name, n in counter.most_common() if n / total < below]
        return [[name, round(share, 4)] for name, share in ranked[:top]]

    return {
        "samples": total,
        "self": shares(self_count),
        "inclusive": shares(inclusive, below=0.98),
        "self_by_file": shares(by_file),
    }


def profile_worker(target: Target, seconds: int, tmp: Path, load: Load = Load()) -> dict[str, Any]:
    """py-spy on one stockade worker while wrk loads all of them; not a measurement."""
    if not PY_SPY.exists():
        raise BenchError(f"{PY_SPY} is missing; bench/bootstrap installs it")
    assert target.pid is not None
    worker = process_tree(target.pid)[1]
    out = tmp / "profile.txt"
    wrk = subprocess.Popen(
        wrk_argv(target.port, seconds + 3, load),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)
        # --gil: only samples where the worker runs Python (or C holding the GIL).
        # Wall-clock samples of a worker in send() mostly show it preempted by
        # the peer it just woke on two busy CPUs, not the syscall's cost; the
        # kernel's share is measured from stime instead.
        argv = [str(PY_SPY), "record", "-p", str(worker), "-d", str(seconds), "--gil"]
        argv += ["-r", str(PROFILE_RATE), "-f", "raw", "--nolineno", "--full-filenames"]
        argv += ["-o", str(out)]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    finally:
        wrk.wait(timeout=seconds + 30)  # it stops by itself (-d)
    if result.returncode != 0 or not out.exists():
        raise BenchError(f"py-spy failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    summary = summarize_profile(out.read_text())
    return {"seconds": seconds, "rate": PROFILE_RATE, "variant": target.name, **summary}


# --- the run ----------------------------------------------------------------

# which gateway does which workload (HAProxy has no WAF)
MEASURED = (
    (DIRECT, (L7_PLAIN,)),
    (STOCKADE_1, (L7_PLAIN,)),
    (STOCKADE_N, L7_WORKLOADS),
    (HAPROXY, tuple(w for w in L7_WORKLOADS if w != L7_WAF)),
)
LIMITED = (L7_LIMITS, L7_ALL)
CHECKED_JWT = (L7_JWT, L7_ALL)
INSPECTED = (L7_WAF, L7_ALL)


@dataclass(frozen=True)
class Variant:
    """One gateway doing one workload: what wrk is pointed at and what it sends."""

    name: str
    gateway: str
    workload: str
    target: Target
    load: Load


def _under(workloads: Sequence[str]) -> tuple[str, ...]:
    return tuple(PREFIXES[w] + "/" for w in workloads)


def stockade_routes() -> tuple[gateways.Route, ...]:
    names = tuple(limit.name for limit in gateways.THREE_LIMITS)
    routes = [gateways.Route("plain")]  # every path no other route takes
    for workload, name in (
        (L7_JWT, "jwt"),
        (L7_LIMITS, "limits"),
        (L7_WAF, "waf"),
        (L7_ALL, "all"),
    ):
        routes.append(
            gateways.Route(
                name,
                path_prefix=PREFIXES[workload] + "/",
                auth="jwt" if workload in CHECKED_JWT else None,
                rate_limits=names if workload in LIMITED else (),
                waf=WAF_MODE if workload in INSPECTED else None,
            )
        )
    return tuple(routes)


def haproxy_config(port: int, upstream_port: int, issuer: gateways.Issuer, stats: Path) -> str:
    rules, tables = gateways.haproxy_limits(gateways.THREE_LIMITS, LIMIT_PER_MIN, _under(LIMITED))
    return gateways.haproxy_cfg(
        threads=os.cpu_count() or 1,
        port=port,
        upstream_port=upstream_port,
        frontend=rules + gateways.haproxy_jwt(issuer, _under(CHECKED_JWT)),
        tables=tables,
        stats_socket=stats,
    )


def check_gateway(
    name: str, port: int, workloads: Sequence[str], token: str, forged: str, headers: dict[str, str]
) -> None:
    """Each workload does its work: the JWT routes refuse a missing or forged token, the
    limited ones count (stockade's RateLimit-Remaining goes down), the WAF ones refuse
    an XSS query that the others pass."""
    stockade = name.startswith("stockade")
    for workload in workloads:
        path = PREFIXES[workload] + REQUEST
        if workload in CHECKED_JWT:
            gateways.check_jwt(name, port, path, token, forged, headers)
        if stockade:
            gateways.check_rate_headers(name, port, path, workload in LIMITED, headers)
            status, _ = gateways.request(port, PREFIXES[workload] + XSS, headers)
            if (status == 403) != (workload in INSPECTED) or status not in (200, 403):
                raise BenchError(f"{name}: an XSS query to {workload} answered {status}")
        else:
            status, _ = gateways.request(port, path, headers)
            if status != 200:
                raise BenchError(f"{name}: GET {path} answered {status}")


def run(rounds: int, duration: int, profile: bool) -> dict[str, Any]:
    started = time.monotonic()
    workers = os.cpu_count() or 1
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stockade-bench-")))
        private, public = gateways.make_keys(tmp)
        issuer = gateways.Issuer(public)
        token = gateways.sign(private, 0, 1, gateways.token_expiry())[0]
        forged = gateways.sign(gateways.other_key(), 0, 1, gateways.token_expiry())[0]
        headers = {"Authorization": f"Bearer {token}", gateways.TENANT_HEADER: TENANT}

        upstream_port, upstream = start_upstream(stack, tmp)
        targets = {DIRECT: Target(DIRECT, upstream_port, None)}
        for name, count in ((STOCKADE_1, 1), (STOCKADE_N, workers)):
            port = free_port()
            toml = gateways.stockade_toml(
                workers=count,
                port=port,
                upstream_port=upstream_port,
                state=tmp / f"state-{count}",
                routes=stockade_routes(),
                limits=gateways.THREE_LIMITS,
                limit_per_min=LIMIT_PER_MIN,
                issuer=issuer,
            )
            targets[name] = Target(
                name, port, start_stockade(stack, tmp, name, toml, port), 1 + count
            )
        port, stats = free_port(), tmp / "haproxy.sock"
        cfg = haproxy_config(port, upstream_port, issuer, stats)
        targets[HAPROXY] = Target(HAPROXY, port, start_haproxy(stack, tmp, HAPROXY, cfg, port))
        for name, workloads in MEASURED[1:]:
            check_gateway(name, targets[name].port, workloads, token, forged, headers)

        sent = tuple(f"{k}: {v}" for k, v in headers.items())
        variants = [
            Variant(
                l7_variant(gateway, w),
                gateway,
                w,
                targets[gateway],
                Load(PREFIXES[w] + REQUEST, sent),
            )
            for gateway, workloads in MEASURED
            for w in workloads
        ]
        for v in variants:  # warm up: connections, caches, the upstream pools
            measure(v.target, upstream, WARMUP_S, v.load)
        tables = gateways.check_haproxy_tables(stats, gateways.THREE_LIMITS, (HOST, TENANT, KEY))
        samples: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        rng = random.Random(3)
        for done in range(rounds):
            order = variants[:]
            rng.shuffle(order)
            for v in order:
                samples[v.name].append(measure(v.target, upstream, duration, v.load))
            line = ", ".join(f"{v.name} {samples[v.name][-1]['rps']:.0f}" for v in variants)
            print(f"l7: round {done + 1}/{rounds}: requests/s {line}", file=sys.stderr)

        profiled: dict[str, Any] | None = None
        if profile:
            plain = next(v for v in variants if v.name == STOCKADE_N)
            try:
                profiled = profile_worker(plain.target, PROFILE_S, tmp, plain.load)
                profiled["variant"] = plain.name
            except BenchError as exc:
                print(f"l7: no profile: {exc}", file=sys.stderr)
                profiled = {"error": str(exc)}
    return {
        "bench": "l7",
        "date": now_iso(),
        "command": COMMAND,
        "source": source_revision(SOURCES),
        "machine": machine(PACKAGES),
        "host": HOST,
        "path": REQUEST,
        "workloads": {w: PREFIXES[w] + REQUEST for w in L7_WORKLOADS},
        "headers": [f"Authorization: Bearer <RS256, {len(token)} bytes>", sent[1]],
        "limit_per_min": LIMIT_PER_MIN,
        "limits": [
            {"name": limit.name, "key": limit.key, "haproxy": limit.fetch}
            for limit in gateways.THREE_LIMITS
        ],
        "waf": WAF_MODE,
        "haproxy_tables": tables,
        "body_bytes": len(BODY),
        "wrk": {"threads": THREADS, "connections": CONNECTIONS, "duration_s": duration},
        "workers": workers,
        "rounds": rounds,
        "warmup_s": WARMUP_S,
        "user_hz": USER_HZ,
        "total_s": round(time.monotonic() - started, 1),
        "variants": [
            {
                "name": v.name,
                "gateway": v.gateway,
                "workload": v.workload,
                "samples": samples[v.name],
            }
            for v in variants
        ],
        "profile": profiled,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.l7",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: .venv/bin/python -m bench.l7 --rounds 3 --duration 5 --no-profile",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="default %(default)s")
    parser.add_argument(
        "--duration", type=int, default=DURATION_S, help="seconds per wrk run, 1-60 (%(default)s)"
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the py-spy run after the rounds"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.duration <= 60:
        parser.error("--rounds must be >= 1 and --duration between 1 and 60")
    try:
        results = run(args.rounds, args.duration, not args.no_profile)
    except BenchError as exc:
        print(f"bench.l7: {exc}", file=sys.stderr)
        return 1
    report.publish("l7", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
