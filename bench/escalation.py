"""Escalation to the kernel: rule fire -> XDP drop latency, and goodput under a flood.

One throwaway lab (stockade.lab.topology, as root). In the upstream
namespace, HAProxy with one thread answers GET / itself (200, l7's body) and
every other path with 404. In the gateway namespace, for the whole run:
stockade's controller (XDP native on gw0, no SYN rate limit) and `stockade
proxy run` (N workers) on port 8080, with one anomaly rule

    distinct_404_paths > 20 in 10s  ->  ban, 12s (ban_factor 1: no escalation)

and HAProxy 2.6 (nbthread N) on port 8081 in front of the same upstream,
tracking each source in a stick table and denying it once it has more than
20 HTTP errors in 10 s (`sc_http_err_rate(0) gt 20`).

Part a, latency (stockade only): each trial, a client in the client
namespace sends 21 GETs of paths that do not exist on one keep-alive
connection from one of its 8 addresses (IPv4 and IPv6 in turn); the 21st
trips the rule, which pushes a ban to the controller. Right after the 21st
answer the client opens a TCP connection from the same address every
millisecond until one gets no SYN-ACK within 200 ms: the first dropped SYN.
The bench then reads the ban's creation time from the controller, unbans,
and later takes the rule's firing time from the proxy workers' status files.
All three clocks are the host's CLOCK_REALTIME. An address trips again only
after its rule penalty (12 s) has run out; meanwhile the others take turns.

Part b, goodput: a legitimate client (wrk over IPv4 to 198.18.0.1, GET /,
closed loop) measures its requests/s with no attack, then again while an
attacker (wrk over IPv6 from the same namespace, a different path that does
not exist on every request, so it is a scanner's flood) hammers the same
gateway. For stockade the legitimate run starts once the attacker's address
is banned (and at least 1 s into the attack); for HAProxy 1 s into the
attack, when its deny rule has long been answering the attacker. Each round
measures both gateways, in a shuffled order.

Run: .venv/bin/python -m bench.escalation [--trials N] [--rounds N] [--duration S]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench import l7, report
from bench.common import BENCH_DIR, BenchError, machine, now_iso, source_revision
from bench.report import ESC_HAPROXY, ESC_STOCKADE
from stockade.cli.client import ControllerUnavailable, call, wait_until_serving
from stockade.controller import loader
from stockade.lab.netns_exec import nsenter_argv
from stockade.lab.topology import (
    CLIENT_V4,
    CLIENT_V6,
    GATEWAY_IF,
    GATEWAY_V4,
    GATEWAY_V6,
    UPSTREAM_PORT,
    UPSTREAM_V4,
    Lab,
    running_lab,
)
from stockade.protocol import CommandError

REPO = BENCH_DIR.parent
PROXY_PORT = 8080
HAPROXY_PORT = 8081
RULE_NAME = "scanner"
RULE_LIMIT = 20  # distinct 404 paths (stockade) / HTTP errors (HAProxy) in the window
RULE_WINDOW_S = 10
BAN_S = 12  # the rule's duration: its ban's TTL and the proxy's own penalty; covers
# LEAD_S + the longest --duration, so the ban holds for the whole legitimate run
TRIALS = 40
PROBE_INTERVAL_MS = 1.0
PROBE_TIMEOUT_MS = 200.0
PROBE_LIMIT_S = 3.0
MAX_INVALID_SHARE = 0.25
ROUNDS = 8
DURATION_S = 5
LEAD_S = 1.0  # the attack runs this long at least before the legitimate client starts
SETTLE_S = 0.5  # and stockade's ban this long
BAN_WAIT_S = 10.0
LEGIT_CONNECTIONS = 32
ATTACK_CONNECTIONS = 64
WRK_TIMEOUT = "2s"
READY_S = 30.0
STOP_TIMEOUT_S = 20.0
STATUS_INTERVAL_S = 1.0  # proxy/status.py rewrites the workers' files this often
COMMAND = ".venv/bin/python -m bench.escalation"
PACKAGES = ("python3-bpfcc", "wrk", "haproxy")
SOURCES = ("proxy", "controller", "bpf", "cli", "stockade", "lab")
FLOOD_SCRIPT = BENCH_DIR / "wrk_flood.lua"
REPORT_SCRIPT = BENCH_DIR / "wrk_report.lua"

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
    bind {address}:{port}
    http-request return status 200 content-type application/json string '{body}' if {{ path / }}
    http-request return status 404 content-type application/json string '{{"error":"not found"}}'
"""

CONTROLLER_TOML = """\
[controller]
socket = "{socket}"
state_dir = "{state_dir}"
pin_root = "{pin_root}"
netns = "{netns}"
sweep_interval = "1s"

[xdp]
interfaces = ["{ifname}"]
mode = "native"
syn_rate = 0
max_bans_v4 = 4096
max_bans_v6 = 4096
max_rate_sources = 4096
"""

PROXY_TOML = """\
[controller]
socket = "{control_socket}"

[proxy]
workers = {workers}
access_log = "/dev/null"
drain_timeout = "5s"
status_dir = "{status_dir}"
metrics_dir = "{metrics_dir}"

# metrics are counted as in production; served on a free port
[proxy.admin]
port = 0

[proxy.anomaly]
rules_socket = "{rules_socket}"

[[proxy.anomaly.rules]]
name = "{rule}"
when = "distinct_404_paths > {limit} in {window}s"
action = "ban"
duration = "{ban}s"
ban_factor = 1.0
ban_max = "{ban}s"

[[proxy.listeners]]
address = "{gw4}"
port = {port}

[[proxy.listeners]]
address = "{gw6}"
port = {port}

[proxy.pools.api]
servers = ["{upstream}:{upstream_port}"]

[proxy.pools.api.health]
enabled = false

[[proxy.routes]]
pool = "api"
"""

# l7's plain proxy, plus the usual HAProxy answer to a flooding source: a
# stick table per source and a deny rule over its HTTP error rate (404s
# from the upstream count as errors).
HAPROXY_CFG = """\
global
    nbthread {threads}
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend gateway
    bind {gw4}:{port}
    bind {gw6}:{port}
    stick-table type ipv6 size 100k expire 60s store http_err_rate({window}s)
    http-request track-sc0 src
    http-request deny deny_status 403 if {{ sc_http_err_rate(0) gt {limit} }}
    default_backend upstream
backend upstream
    http-reuse always
    server upstream {upstream}:{upstream_port}
"""


def _tail(path: Path, chars: int = 800) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-chars:] or "(no output)"


def _stop(name: str, proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then the process group killed; what is left of the group killed by pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"escalation: {name} did not stop on SIGTERM; killing it", file=sys.stderr)
            os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the group is ours
            proc.wait()
    for pid in l7.group_members(proc.pid):  # e.g. workers of a master that crashed
        print(f"escalation: {name} left process {pid} behind; killing it", file=sys.stderr)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def started(name: str, argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running process in its own process group, logging to `log`; stopped after."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        _stop(name, proc)


def client(ns: str, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """bench.lab_client in a namespace; its JSON answer."""
    argv = nsenter_argv(ns, [sys.executable, "-m", "bench.lab_client", *args])
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"lab_client {' '.join(args)} took over {timeout:.0f}s") from None
    try:
        answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BenchError(
            f"lab_client {' '.join(args)} failed ({result.returncode}): "
            f"{result.stderr.strip()[-400:]}"
        ) from None
    return answer


def wait_serving(name: str, ns: str, proc: subprocess.Popen[bytes], log: Path, *dst: str) -> None:
    for address, port in (d.rsplit(" ", 1) for d in dst):
        answer = client(ns, "wait", "--dst", address, "--port", port, "--seconds", str(READY_S))
        if proc.poll() is not None:
            raise BenchError(f"{name} exited ({proc.returncode}) while starting:\n{_tail(log)}")
        if not answer.get("ok"):
            raise BenchError(
                f"{name} did not answer 200 on {address} port {port} within {READY_S:.0f}s "
                f"({answer.get('error')}):\n{_tail(log)}"
            )


@dataclass
class Controller:
    config: Path
    socket: Path
    log: Path

    def api(self, command: str, **args: Any) -> Any:
        try:
            return call(self.socket, command, **args)
        except CommandError as exc:
            raise BenchError(f"controller {command}: {exc.message}\n{_tail(self.log)}") from None

    def bans(self) -> list[dict[str, Any]]:
        bans: list[dict[str, Any]] = self.api("bans")
        return bans

    def ban_of(self, target: str) -> dict[str, Any] | None:
        return next((ban for ban in self.bans() if ban["target"] == target), None)

    def drops(self) -> int:
        packets: int = self.api("stats")["reasons"]["drop_ban"]["packets"]
        return packets


@contextmanager
def controller(tmp: Path, lab: Lab) -> Iterator[Controller]:
    """`stockade controller run` for the gateway's gw0; detached, maps removed after."""
    pin_root = loader.BPFFS / f"stockade-bench-escalation-{os.getpid()}"
    if pin_root.exists():
        raise BenchError(f"{pin_root} exists; remove it (a bench run that died?)")
    config = tmp / "controller.toml"
    config.write_text(
        CONTROLLER_TOML.format(
            socket=tmp / "control.sock",
            state_dir=tmp / "state",
            pin_root=pin_root,
            netns=lab.gateway_ns,
            ifname=GATEWAY_IF,
        )
    )
    log = tmp / "controller.log"
    ctl = Controller(config, tmp / "control.sock", log)
    try:
        with started(
            "controller", [*l7.STOCKADE, "--config", str(config), "controller", "run"], log
        ) as proc:
            try:
                wait_until_serving(ctl.socket, proc, timeout=READY_S)
            except ControllerUnavailable as exc:
                raise BenchError(f"controller: {exc.message}:\n{_tail(log)}") from None
            yield ctl
    finally:
        result = subprocess.run(
            [*l7.STOCKADE, "--config", str(config), "detach", "--all", "--remove-maps"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            print(f"escalation: detach failed: {result.stderr.strip()}", file=sys.stderr)
        shutil.rmtree(pin_root, ignore_errors=True)


# --- part a: rule fire -> first dropped SYN -------------------------------------


def firings(status_dir: Path) -> set[tuple[str, float]]:
    """(subject, time) of the rule's recent firings in every worker's status file
    (each keeps its last 100, rewritten every second)."""
    found = set()
    for path in sorted(status_dir.glob("worker-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced: the next read gets it
        for f in data.get("anomaly", {}).get("recent", []):
            if f["rule"] == RULE_NAME:
                found.add((f["subject"], f["at"]))
    return found


def one_trial(lab: Lab, ctl: Controller, src: str) -> dict[str, Any]:
    gateway = GATEWAY_V6 if ":" in src else GATEWAY_V4
    drops_before = ctl.drops()
    started_at = time.time()
    trip = client(
        lab.client_ns,
        "trip",
        "--src",
        src,
        "--dst",
        gateway,
        "--port",
        str(PROXY_PORT),
        "--paths",
        str(RULE_LIMIT + 1),
        "--interval",
        str(PROBE_INTERVAL_MS),
        "--timeout",
        str(PROBE_TIMEOUT_MS),
        "--limit",
        str(PROBE_LIMIT_S),
    )
    ban = ctl.ban_of(src)
    if ban is not None:
        ctl.api("unban", target=src)
    return {
        "source": src,
        "family": 6 if ":" in src else 4,
        "started": started_at,
        "ended": time.time(),
        **trip,
        "ban_created": None if ban is None else ban["created"],
        "ban_source": None if ban is None else ban["source"],
        "xdp_drops": ctl.drops() - drops_before,
    }


def check_trial(trial: dict[str, Any]) -> str | None:
    """Why a trial cannot be counted, or None."""
    if trial["statuses"] != [404] * (RULE_LIMIT + 1):
        return f"the scan was answered {trial['statuses']}"
    if trial["first_drop"] is None:
        return f"no SYN was dropped ({trial['outcome']})"
    if trial["ban_created"] is None or trial["ban_source"] != "rule":
        return "the controller had no rule ban for the source"
    if trial["fired_at"] is None:
        return "no firing of the rule in the workers' status files"
    if trial["first_drop"] < trial["ban_created"]:
        return "a SYN went unanswered before the ban existed"
    if trial["xdp_drops"] < 1:
        return "XDP counted no drop"
    return None


def latency(lab: Lab, ctl: Controller, status_dir: Path, trials: int) -> dict[str, Any]:
    sources = [a for pair in zip(CLIENT_V4, CLIENT_V6, strict=True) for a in pair]
    free_at = dict.fromkeys(sources, 0.0)
    records = []
    fired: set[tuple[str, float]] = set()
    for n in range(trials):
        src = sources[n % len(sources)]
        pause = free_at[src] - time.time()
        if pause > 0:
            time.sleep(pause)
        trial = one_trial(lab, ctl, src)
        free_at[src] = trial["answered"] + BAN_S + 0.5  # the proxy's penalty has run out
        records.append(trial)
        fired |= firings(status_dir)
        if (n + 1) % 8 == 0 or n + 1 == trials:
            print(f"escalation: latency trial {n + 1}/{trials}", file=sys.stderr)
    time.sleep(STATUS_INTERVAL_S + 0.5)  # the workers have written their last firings
    fired |= firings(status_dir)
    invalid = []
    for trial in records:
        match = [
            at
            for subject, at in fired
            if subject == trial["source"] and trial["started"] - 0.01 <= at <= trial["ended"]
        ]
        trial["fired_at"] = min(match) if match else None
        trial["invalid"] = check_trial(trial)
        if trial["invalid"]:
            invalid.append(f"{trial['source']}: {trial['invalid']}")
    if len(invalid) > MAX_INVALID_SHARE * trials:
        raise BenchError(f"{len(invalid)} of {trials} latency trials failed: " + "; ".join(invalid))
    # every source is free again before part b
    pause = max(free_at.values()) - time.time()
    if pause > 0:
        time.sleep(pause)
    return {
        "trials": records,
        "probe_interval_ms": PROBE_INTERVAL_MS,
        "probe_timeout_ms": PROBE_TIMEOUT_MS,
    }


# --- part b: a legitimate client's goodput under a flood ------------------------


def host_softirq() -> float:
    """Softirq seconds of the whole host, all CPUs: the veths' packet work, which no
    process is charged for."""
    with open("/proc/stat") as f:
        fields = f.readline().split()  # cpu user nice system idle iowait irq softirq ...
    return int(fields[7]) / l7.USER_HZ


@dataclass(frozen=True)
class Gateway:
    name: str
    port: int
    pid: int
    processes: int


def wrk_in(
    ns: str, url: str, connections: int, duration: float, script: Path
) -> subprocess.Popen[str]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    argv += ["--timeout", WRK_TIMEOUT, "-s", str(script), url]
    return subprocess.Popen(
        nsenter_argv(ns, argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wrk_result(name: str, proc: subprocess.Popen[str], duration: float) -> dict[str, Any]:
    """Wait for a wrk run (bounded by its -d) and parse wrk_report.lua's summary line."""
    try:
        out, err = proc.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own wrk, in its own group
        proc.wait()
        raise BenchError(f"{name} wrk did not stop {duration + 30:.0f}s after starting") from None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"{name} wrk failed ({proc.returncode}): {err.strip()[-300:]}")
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


def legit_run(
    lab: Lab,
    ctl: Controller,
    gateway: Gateway,
    upstream_pid: int,
    duration: int,
    attacker: subprocess.Popen[str] | None,
) -> dict[str, Any]:
    pids = l7.process_tree(gateway.pid)
    if len(pids) != gateway.processes:
        raise BenchError(f"{gateway.name}: {len(pids)} processes, expected {gateway.processes}")
    others = [upstream_pid] + ([attacker.pid] if attacker is not None else [])
    gw_before, (up_before, *att_before) = (
        l7.cpu_seconds(pids),
        [sum(l7.cpu_seconds([pid])) for pid in others],
    )
    (busy_before, _), wrk_before, drops_before = l7.host_cpu(), l7.children_cpu(), ctl.drops()
    softirq_before = host_softirq()
    url = f"http://{GATEWAY_V4}:{gateway.port}/"
    wrk = wrk_result(
        "legitimate",
        wrk_in(lab.client_ns, url, LEGIT_CONNECTIONS, duration, REPORT_SCRIPT),
        duration,
    )
    (busy_after, _), wrk_after, drops_after = l7.host_cpu(), l7.children_cpu(), ctl.drops()
    softirq_after = host_softirq()
    gw_after, (up_after, *att_after) = (
        l7.cpu_seconds(pids),
        [sum(l7.cpu_seconds([pid])) for pid in others],
    )
    if attacker is not None and attacker.poll() is not None:
        raise BenchError("the attacker's wrk ended before the legitimate client's run")
    elapsed = wrk["duration_us"] / 1e6
    errors = wrk["errors"]
    ok = wrk["requests"] - errors["status"]
    return {
        "requests": wrk["requests"],
        "ok": ok,
        "non_2xx": errors["status"],
        "elapsed_s": round(elapsed, 3),
        "rps": round(ok / elapsed, 1),
        "latency_us": wrk["latency_us"],
        "socket_errors": errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        "gateway_cpu_s": round(sum(gw_after) - sum(gw_before), 2),
        "upstream_cpu_s": round(up_after - up_before, 2),
        "attacker_cpu_s": round(att_after[0] - att_before[0], 2) if att_after else None,
        "wrk_cpu_s": round(wrk_after - wrk_before, 3),
        "host_busy_s": round(busy_after - busy_before, 2),
        "host_softirq_s": round(softirq_after - softirq_before, 2),
        "xdp_drops": drops_after - drops_before,
    }


def wait_for_ban(ctl: Controller, deadline: float) -> dict[str, Any]:
    while time.monotonic() < deadline:
        bans = [ban for ban in ctl.bans() if ban["source"] == "rule"]
        if bans:
            return bans[0]
        time.sleep(0.02)
    raise BenchError(f"the attacker was not banned within {BAN_WAIT_S:.0f}s of the flood's start")


def attack_run(
    lab: Lab,
    ctl: Controller,
    gateway: Gateway,
    upstream_pid: int,
    duration: int,
) -> dict[str, Any]:
    if ctl.bans():
        raise BenchError(f"{gateway.name}: bans left over before the attack: {ctl.bans()}")
    attack_s = LEAD_S + BAN_WAIT_S + duration + 2
    url = f"http://[{GATEWAY_V6}]:{gateway.port}/"
    flood_started = time.time()
    t0 = time.monotonic()
    attacker = wrk_in(lab.client_ns, url, ATTACK_CONNECTIONS, attack_s, FLOOD_SCRIPT)
    try:
        ban: dict[str, Any] | None = None
        ready = t0 + LEAD_S
        if gateway.name == ESC_STOCKADE:
            ban = wait_for_ban(ctl, t0 + BAN_WAIT_S)
            ready = max(ready, time.monotonic() + SETTLE_S)
        time.sleep(max(0.0, ready - time.monotonic()))
        if attacker.poll() is not None:
            why = attacker.stderr.read() if attacker.stderr else ""
            raise BenchError(f"the attacker's wrk exited early: {why.strip()[-300:]}")
        sample = legit_run(lab, ctl, gateway, upstream_pid, duration, attacker)
        bans = ctl.bans()  # still in force at the end of the legitimate run?
        attacker.send_signal(signal.SIGINT)  # wrk stops and prints its summary
        attack = wrk_result("attacker", attacker, attack_s)
    finally:
        if attacker.poll() is None:
            os.killpg(attacker.pid, signal.SIGKILL)  # our own wrk, in its own group
            attacker.wait()
    if gateway.name == ESC_STOCKADE:
        assert ban is not None
        if [b["target"] for b in bans] != [ban["target"]] or ban["target"] not in CLIENT_V6:
            raise BenchError(f"expected one ban, on the attacker's IPv6 address; bans: {bans}")
        ctl.api("unban", target=ban["target"])
    elif bans:
        raise BenchError(f"{gateway.name}: the controller banned {bans} during its attack")
    return {
        **sample,
        "attacker": {
            "source": None if ban is None else ban["target"],
            "banned_after_s": None if ban is None else round(ban["created"] - flood_started, 3),
            "requests": attack["requests"],
            "non_2xx": attack["errors"]["status"],
            "elapsed_s": round(attack["duration_us"] / 1e6, 3),
            "errors": attack["errors"],
        },
    }


def goodput(
    lab: Lab,
    ctl: Controller,
    gateways: list[Gateway],
    upstream_pid: int,
    rounds: int,
    duration: int,
) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {g.name: [] for g in gateways}
    stockade_free_at = 0.0  # wall clock when the attacker's penalty in the proxy has run out
    rng = random.Random(6)
    for done in range(rounds):
        order = gateways[:]
        rng.shuffle(order)
        for gateway in order:
            if gateway.name == ESC_STOCKADE:
                time.sleep(max(0.0, stockade_free_at - time.time()))
            base = legit_run(lab, ctl, gateway, upstream_pid, duration, None)
            attack = attack_run(lab, ctl, gateway, upstream_pid, duration)
            if gateway.name == ESC_STOCKADE:  # the ban fired within the attack, just ended
                stockade_free_at = time.time() + BAN_S + 0.5
            samples[gateway.name].append({"baseline": base, "attack": attack})
        line = ", ".join(
            f"{name} {s[-1]['baseline']['rps']:.0f} -> {s[-1]['attack']['rps']:.0f}"
            for name, s in samples.items()
        )
        print(
            f"escalation: goodput round {done + 1}/{rounds}: legit requests/s {line}",
            file=sys.stderr,
        )
    return {
        "rounds": rounds,
        "duration_s": duration,
        "lead_s": LEAD_S,
        "settle_s": SETTLE_S,
        "legit_connections": LEGIT_CONNECTIONS,
        "attack_connections": ATTACK_CONNECTIONS,
        "variants": [{"name": name, "samples": values} for name, values in samples.items()],
    }


# --- the run ------------------------------------------------------------------


def run(trials: int, rounds: int, duration: int) -> dict[str, Any]:
    started_at = time.monotonic()
    workers = os.cpu_count() or 1
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stockade-bench-")))
        lab = stack.enter_context(running_lab(start_upstream=False))
        print(f"escalation: lab {lab.prefix} is up", file=sys.stderr)

        def config(name: str, text: str) -> Path:
            path = tmp / name
            path.write_text(text)
            return path

        upstream_cfg = config(
            "upstream.cfg",
            UPSTREAM_CFG.format(address=UPSTREAM_V4, port=UPSTREAM_PORT, body=l7.BODY.decode()),
        )
        log = tmp / "upstream.log"
        upstream = stack.enter_context(
            started(
                "upstream",
                nsenter_argv(lab.upstream_ns, ["haproxy", "-f", str(upstream_cfg), "-db"]),
                log,
            )
        )
        wait_serving("upstream", lab.gateway_ns, upstream, log, f"{UPSTREAM_V4} {UPSTREAM_PORT}")
        ctl = stack.enter_context(controller(tmp, lab))

        status_dir = tmp / "status"
        proxy_cfg = config(
            "proxy.toml",
            PROXY_TOML.format(
                control_socket=ctl.socket,
                rules_socket=tmp / "rules.sock",
                workers=workers,
                status_dir=status_dir,
                metrics_dir=tmp / "metrics",
                rule=RULE_NAME,
                limit=RULE_LIMIT,
                window=RULE_WINDOW_S,
                ban=BAN_S,
                gw4=GATEWAY_V4,
                gw6=GATEWAY_V6,
                port=PROXY_PORT,
                upstream=UPSTREAM_V4,
                upstream_port=UPSTREAM_PORT,
            ),
        )
        log = tmp / "proxy.log"
        argv = [*l7.STOCKADE, "--config", str(proxy_cfg), "proxy", "run"]
        proxy = stack.enter_context(
            started("stockade proxy", nsenter_argv(lab.gateway_ns, argv), log)
        )
        wait_serving(
            "stockade proxy",
            lab.client_ns,
            proxy,
            log,
            f"{GATEWAY_V4} {PROXY_PORT}",
            f"{GATEWAY_V6} {PROXY_PORT}",
        )
        haproxy_cfg = config(
            "haproxy.cfg",
            HAPROXY_CFG.format(
                threads=workers,
                gw4=GATEWAY_V4,
                gw6=GATEWAY_V6,
                port=HAPROXY_PORT,
                window=RULE_WINDOW_S,
                limit=RULE_LIMIT,
                upstream=UPSTREAM_V4,
                upstream_port=UPSTREAM_PORT,
            ),
        )
        log = tmp / "haproxy.log"
        argv = ["haproxy", "-f", str(haproxy_cfg), "-db"]
        haproxy = stack.enter_context(started("HAProxy", nsenter_argv(lab.gateway_ns, argv), log))
        wait_serving(
            "HAProxy",
            lab.client_ns,
            haproxy,
            log,
            f"{GATEWAY_V4} {HAPROXY_PORT}",
            f"{GATEWAY_V6} {HAPROXY_PORT}",
        )

        latencies = latency(lab, ctl, status_dir, trials)
        gateways = [
            Gateway(ESC_STOCKADE, PROXY_PORT, proxy.pid, 1 + workers),
            Gateway(ESC_HAPROXY, HAPROXY_PORT, haproxy.pid, 1),
        ]
        goodputs = goodput(lab, ctl, gateways, upstream.pid, rounds, duration)
    return {
        "bench": "escalation",
        "date": now_iso(),
        "command": COMMAND,
        "source": source_revision(SOURCES),
        "machine": machine(PACKAGES),
        "workers": workers,
        "rule": {
            "name": RULE_NAME,
            "when": f"distinct_404_paths > {RULE_LIMIT} in {RULE_WINDOW_S}s",
            "duration_s": BAN_S,
            "limit": RULE_LIMIT,
            "window_s": RULE_WINDOW_S,
            "haproxy": f"sc_http_err_rate(0) gt {RULE_LIMIT}, http_err_rate({RULE_WINDOW_S}s)",
        },
        "user_hz": l7.USER_HZ,
        "total_s": round(time.monotonic() - started_at, 1),
        "latency": latencies,
        "goodput": goodputs,
    }


MAIN_PID = os.getpid()


def _terminate(signum: int, _frame: FrameType | None) -> None:
    if os.getpid() != MAIN_PID:  # a child forked by pyroute2 (netns work): die as by default
        os._exit(128 + signum)
    raise SystemExit(128 + signum)  # unwinds: processes stopped, XDP detached, lab removed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.escalation",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: .venv/bin/python -m bench.escalation --trials 8 --rounds 1 --duration 3",
    )
    parser.add_argument("--trials", type=int, default=TRIALS, help="latency trials (%(default)s)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="goodput rounds (%(default)s)")
    parser.add_argument(
        "--duration", type=int, default=DURATION_S, help="seconds per wrk run, 1-8 (%(default)s)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.trials <= 200 or args.rounds < 1 or not 1 <= args.duration <= 8:
        parser.error("--trials must be 1-200, --rounds >= 1 and --duration 1-8")
    if os.geteuid() != 0:
        print("bench.escalation: run it as root (network namespaces, XDP)", file=sys.stderr)
        return 1
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        results = run(args.trials, args.rounds, args.duration)
    except BenchError as exc:
        print(f"bench.escalation: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    report.publish("escalation", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
