"""Requests/s, p99 and CPU per request of the L7 gateway, side by side with HAProxy.

Everything runs on 127.0.0.1 for the whole bench: one upstream (HAProxy with
one thread, answering every request itself with an 11-byte JSON body) and
three proxies in front of it. wrk, with the same settings for every variant,
measures:

  direct               wrk -> upstream
  stockade, 1 worker   wrk -> `stockade proxy run` (workers = 1) -> upstream
  stockade, N workers  the same with workers = N, the number of CPUs
  HAProxy              wrk -> haproxy (nbthread N, http-reuse always) -> upstream

Each round runs every variant once, in a shuffled order; the README shows
medians over the rounds. A proxy's CPU per request is the growth of utime +
stime (/proc/<pid>/stat) of all its processes - stockade's master and
workers, haproxy's one process - divided by the requests wrk completed.
After the rounds, py-spy samples one stockade worker's Python code during
one more run (not counted) for the profile in bench/README.md.

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
from bench.common import BENCH_DIR, BenchError, machine, now_iso, save_results, source_revision
from bench.report import DIRECT, HAPROXY, STOCKADE_1, STOCKADE_N

HOST = gateways.HOST
PATH = "/"
BODY = b'{"ok":true}'
THREADS = 1
CONNECTIONS = 32
DURATION_S = 5
ROUNDS = 10
WARMUP_S = 2
PROFILE_S = 10
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


def run(rounds: int, duration: int, profile: bool) -> dict[str, Any]:
    started = time.monotonic()
    workers = os.cpu_count() or 1
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stockade-bench-")))
        upstream_port, upstream = start_upstream(stack, tmp)
        targets = [Target(DIRECT, upstream_port, None)]
        for name, count in ((STOCKADE_1, 1), (STOCKADE_N, workers)):
            port = free_port()
            toml = gateways.stockade_toml(
                workers=count, port=port, upstream_port=upstream_port, state=tmp / f"state-{count}"
            )
            pid = start_stockade(stack, tmp, name, toml, port)
            targets.append(Target(name, port, pid, processes=1 + count))
        port = free_port()
        cfg = gateways.haproxy_cfg(threads=workers, port=port, upstream_port=upstream_port)
        targets.append(Target(HAPROXY, port, start_haproxy(stack, tmp, HAPROXY, cfg, port)))

        for target in targets:  # warm up: connections, caches, the upstream pools
            measure(target, upstream, WARMUP_S)
        samples: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        rng = random.Random(3)
        for done in range(rounds):
            order = targets[:]
            rng.shuffle(order)
            for target in order:
                samples[target.name].append(measure(target, upstream, duration))
            line = ", ".join(f"{t.name} {samples[t.name][-1]['rps']:.0f}" for t in targets)
            print(f"l7: round {done + 1}/{rounds}: requests/s {line}", file=sys.stderr)

        profiled: dict[str, Any] | None = None
        if profile:
            try:
                profiled = profile_worker(targets[2], PROFILE_S, tmp)
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
        "path": PATH,
        "body_bytes": len(BODY),
        "wrk": {"threads": THREADS, "connections": CONNECTIONS, "duration_s": duration},
        "workers": workers,
        "rounds": rounds,
        "warmup_s": WARMUP_S,
        "user_hz": USER_HZ,
        "total_s": round(time.monotonic() - started, 1),
        "variants": [{"name": name, "samples": values} for name, values in samples.items()],
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
    path = save_results("l7", results)
    print(report.render_l7(results))
    print(f"l7: results in {path}; README in {report.write_readme()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
