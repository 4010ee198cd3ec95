"""Cluster mode: ban propagation latency between nodes, and the cost of cluster-scoped limits.

Part a, propagation: three throwaway labs (stockade.lab.topology, as root),
one gateway each with its own controller (XDP native on gw0, SYN rate limit
off) in cluster mode, all sharing one redis-server (Debian's, on a unix
socket, with a password). Each trial bans one client address through the
control API of one node (what `stockade ban` sends) while, in the two other
labs, a client opens a TCP connection through its gateway from that address
every 2 ms (50 ms connect timeout). The latency is from the moment the ban
was asked on the first node to the first attempt on the other node that gets
no SYN-ACK: the kernel there drops the source. Both sides read the host's
CLOCK_MONOTONIC. Then the address is unbanned and the next trial waits until
every node has lifted it. Trials rotate the banning node and the address.

Cluster authentication is measured on and off in the same run, on the same
three controllers: between trials every node's [cluster.auth] is switched (a
signed HMAC key, or insecure_unauthenticated) and applied with `stockade
reload`, in the order on, off, off, on, ... so drift on the host hits both
alike; --trials is the total, half each. One untimed ban and unban from each
node warms the path first. The CPU that authentication adds per event is
also timed on its own (signing as a publisher does; parsing and checking the
signature as a receiver does).

Part b, throughput: the set-up of bench/l7.py (loopback, HAProxy with one
thread as the upstream answering itself), with three `stockade proxy run`
(N workers each): no limit; one limit keyed by ip with scope = "local"; the
same with scope = "cluster" on a redis-server over loopback TCP. The limits
are far above the load (1,000,000,000 a minute), so every request is counted
and none refused. wrk (l7's load) measures requests/s, p99 and CPU per
request; each round runs the three in a shuffled order.

Run: .venv/bin/python -m bench.cluster [--trials N] [--rounds N] [--duration S]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from bench import gateways, l7
from bench.common import BenchError, machine, now_iso, save_results, source_revision
from stockade.cli.client import ControllerUnavailable, call, wait_until_serving
from stockade.lab import topology
from stockade.lab.netns_exec import popen_in_netns, python_argv
from stockade.lab.redis_server import RedisServer, running_redis

COMMAND = ".venv/bin/python -m bench.cluster"
PACKAGES = ("redis-server", "wrk", "haproxy")
SOURCES = ("controller", "proxy", "stockade", "lab")
STOCKADE = [sys.executable, "-m", "stockade.cli.main"]
PASSWORD = "bench-cluster"
NODES = ("a", "b", "c")
PROBE_INTERVAL_S = 0.002
PROBE_TIMEOUT_S = 0.05
WATCH_S = 2.0  # each watcher's run; the ban comes BAN_AFTER_S into it
BAN_AFTER_S = 0.8
SETTLE_TIMEOUT_S = 5.0
HUGE_RATE = "1000000000/min"
VARIANTS = ("no limit", "limit, scope local", "limit, scope cluster")
AUTH_MODES = ("on", "off")  # cluster authentication: an HMAC key, or none
AUTH_ORDER = ("on", "off", "off", "on")  # trial by trial, repeated
WARM_TARGET = "198.51.100.7"  # banned and lifted once from each node before timing
COST_LOOPS = 20_000

CONTROLLER_TOML = """\
[controller]
socket = "{home}/control.sock"
state_dir = "{home}/state"
pin_root = "{pin_root}"
netns = "{netns}"
[controller.admin]
enabled = false
[xdp]
interfaces = ["{ifname}"]
mode = "native"
syn_rate = 0
max_bans_v4 = 4096
max_bans_v6 = 4096
max_rate_sources = 4096
[cluster]
backend = "redis"
url = "{url}"
node = "{node}"
heartbeat = "250ms"
retry_interval = "250ms"
[cluster.auth]
"""
AUTH_TOML = {
    "on": 'key_file = "{key}"\n',
    "off": "insecure_unauthenticated = true\n",
}

LIMIT_TOML = """
[proxy.rate_limiting.limits.per_ip]
rate = "{rate}"
key = "ip"
all_routes = true
scope = "{scope}"
"""


# --- part a: propagation ------------------------------------------------------


def write_key(path: Path) -> Path:
    """The cluster key, as an operator makes it: 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    return path


def config_text(home: Path, lab: topology.Lab, node: str, url: str, auth: str) -> str:
    pin_root = Path(f"/sys/fs/bpf/stockade-bench-{lab.prefix}")
    text = CONTROLLER_TOML.format(
        home=home,
        pin_root=pin_root,
        netns=lab.gateway_ns,
        ifname=lab.gateway_if,
        url=url,
        node=node,
    )
    return text + auth


@contextmanager
def controller(home: Path, lab: topology.Lab, node: str, url: str, auth: str) -> Iterator[Path]:
    """A cluster-mode controller on the lab's gateway; yields its control socket."""
    home.mkdir(parents=True)
    pin_root = Path(f"/sys/fs/bpf/stockade-bench-{lab.prefix}")
    config = home / "stockade.toml"
    config.write_text(config_text(home, lab, node, url, auth))
    log = home / "controller.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*STOCKADE, "--config", str(config), "controller", "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_until_serving(home / "control.sock", proc, timeout=60)
        except ControllerUnavailable as exc:
            tail = log.read_text()[-800:]
            raise BenchError(f"controller {node}: {exc.message}\n{tail}") from None
        yield home / "control.sock"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        subprocess.run(
            [*STOCKADE, "--config", str(config), "detach", "--all", "--remove-maps"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        with suppress(OSError):  # --remove-maps leaves the (empty) pin root itself
            pin_root.rmdir()


def watcher(lab: topology.Lab, source: str) -> subprocess.Popen[str]:
    args = [
        "--src", source, "--dst", topology.UPSTREAM_V4, "--port", str(topology.UPSTREAM_PORT),
        "--duration", str(WATCH_S), "--interval", str(PROBE_INTERVAL_S),
        "--timeout", str(PROBE_TIMEOUT_S),
    ]  # fmt: skip
    argv = python_argv("-m", "stockade.lab.probe", "watch", *args)
    return popen_in_netns(lab.client_ns, argv, stdout=subprocess.PIPE)


def first_drop(proc: subprocess.Popen[str], asked: float) -> float | None:
    out, _ = proc.communicate(timeout=WATCH_S + 30)
    attempts = [(float(at), bool(ok)) for at, ok in json.loads(out)["attempts"]]
    if not any(ok for at, ok in attempts if at < asked):
        raise BenchError("the client never got through before the ban")
    dropped = [at for at, ok in attempts if at >= asked and not ok]
    return min(dropped) - asked if dropped else None


def banned(sock: Path) -> set[str]:
    return {entry["target"] for entry in call(sock, "bans")}


def settle(sockets: list[Path], source: str) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while any(source in banned(s) for s in sockets):
        if time.monotonic() > deadline:
            raise BenchError(f"{source} still banned on some node {SETTLE_TIMEOUT_S}s after unban")
        time.sleep(0.01)


def free_prefix(index: int) -> str:
    for tail in range(10):
        prefix = f"bc{os.getpid() % 10000:04d}{index}{tail}"
        if topology.prefix_in_use(prefix) is None:
            return prefix
    raise BenchError("no free lab prefix")


def auth_mode(trial: int) -> str:
    """Trials in the order on, off, off, on, ...: half of them each."""
    return AUTH_ORDER[trial % len(AUTH_ORDER)]


def auth_cost(key_path: Path) -> dict[str, float]:
    """Microseconds of CPU per event that authentication adds: a publisher signing a
    ban (and writing its envelope), a receiver parsing and checking one."""
    from stockade.controller.cluster_auth import Keyring, load_key, new_nonce, sign, verify
    from stockade.controller.cluster_records import Change, change_from_entry, encode_ban
    from stockade.controller.store import Ban
    from stockade.targets import parse_target

    key = load_key(key_path, "bench")
    ring = Keyring(key, {key.kid: key})
    now = time.time()
    record = encode_ban(Ban(parse_target("198.18.0.10"), "bench", "cli", now, now + 60), "a")

    def signed() -> Change:
        made = Change("a", "ban", "198.18.0.10", f"{time.time():.6f}", new_nonce(), record, None)
        made = Change(**{**made.__dict__, "signature": sign(key, made.signed("stockade:"))})
        made.stored_value()
        return made

    start = time.process_time()
    for _ in range(COST_LOOPS):
        made = signed()
    sign_us = (time.process_time() - start) / COST_LOOPS * 1e6
    fields = {"a": made.action, "t": made.target, "n": made.node, "r": made.record}
    fields.update({"at": made.at, "nc": made.nonce, "sig": made.signature or ""})
    start = time.process_time()
    for _ in range(COST_LOOPS):
        got = change_from_entry(fields)
        if verify(ring, got.signed("stockade:"), got.signature or "") is not None:
            raise BenchError("the bench's own signature does not verify")
    verify_us = (time.process_time() - start) / COST_LOOPS * 1e6
    return {"sign_us": round(sign_us, 2), "verify_us": round(verify_us, 2)}


def warm_up(sockets: list[Path]) -> None:
    for sock in sockets:
        call(sock, "ban", target=WARM_TARGET, reason="warm-up")
        call(sock, "unban", target=WARM_TARGET)
        settle(sockets, WARM_TARGET)


def switch_auth(
    mode: str, tmp: Path, labs: list[topology.Lab], sockets: list[Path], url: str, key: Path
) -> None:
    """Every node to `mode` with `stockade reload` (what an operator does), checked."""
    for node, lab, sock in zip(NODES, labs, sockets, strict=True):
        home = tmp / node
        text = config_text(home, lab, node, url, AUTH_TOML[mode].format(key=key))
        (home / "stockade.toml").write_text(text)
        reply = call(sock, "reload")
        if reply["needs_restart"]:
            raise BenchError(f"switching auth on {node} needs a restart: {reply['needs_restart']}")
        shown = call(sock, "status")["cluster"]["auth"]["mode"]
        if shown != mode:
            raise BenchError(f"node {node}: cluster auth is {shown!r} after the reload, not {mode}")


def propagation(trials: int, tmp: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(tmp / "redis", PASSWORD))
        labs = [
            stack.enter_context(topology.running_lab(free_prefix(i))) for i in range(len(NODES))
        ]
        tmp.mkdir(parents=True, exist_ok=True)
        key = write_key(tmp / "cluster.key")
        mode = auth_mode(0)
        auth = AUTH_TOML[mode].format(key=key)
        sockets = [
            stack.enter_context(controller(tmp / node, lab, node, redis.url(), auth))
            for node, lab in zip(NODES, labs, strict=True)
        ]
        warm_up(sockets)
        samples: list[dict[str, Any]] = []
        for trial in range(trials):
            if auth_mode(trial) != mode:
                mode = auth_mode(trial)
                switch_auth(mode, tmp, labs, sockets, redis.url(), key)
            # shifted every cycle of AUTH_ORDER, so that both modes use every address alike
            shift = trial // len(AUTH_ORDER)
            source = topology.CLIENT_V4[(trial + shift) % len(topology.CLIENT_V4)]
            at = trial % len(NODES)
            others = [i for i in range(len(NODES)) if i != at]
            watchers = {i: watcher(labs[i], source) for i in others}
            time.sleep(BAN_AFTER_S)
            asked = time.monotonic()
            call(sockets[at], "ban", target=source, reason="bench")
            acked = time.monotonic()
            for i, proc in watchers.items():
                latency = first_drop(proc, asked)
                samples.append(
                    {
                        "trial": trial,
                        "auth": mode,
                        "from": NODES[at],
                        "to": NODES[i],
                        "source": source,
                        "ack_ms": round((acked - asked) * 1000, 3),
                        "drop_ms": None if latency is None else round(latency * 1000, 3),
                    }
                )
            call(sockets[at], "unban", target=source)
            settle(sockets, source)
            shown = [s["drop_ms"] for s in samples[-len(others) :]]
            print(
                f"cluster: trial {trial + 1}/{trials} (auth {mode}): dropped after {shown} ms",
                file=sys.stderr,
            )
        # No ban or unban may have been refused (heartbeats between two nodes' reloads are)
        refused = {
            node: {
                kind: reasons
                for kind, reasons in call(sock, "status")["cluster"]["refused"].items()
                if kind != "heartbeat"
            }
            for node, sock in zip(NODES, sockets, strict=True)
        }
        if any(refused.values()):
            raise BenchError(f"nodes refused bans or unbans during the bench: {refused}")
        return {
            "trials": trials,
            "auth_modes": list(AUTH_MODES),
            "auth_cost": auth_cost(key),
            "probe_interval_ms": PROBE_INTERVAL_S * 1000,
            "probe_timeout_ms": PROBE_TIMEOUT_S * 1000,
            "samples": samples,
            "redis": redis_version(),
        }


def redis_version() -> str:
    done = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    return done.stdout.strip()


# --- part b: throughput ---------------------------------------------------------


def throughput(rounds: int, duration: int, tmp: Path) -> dict[str, Any]:
    workers = os.cpu_count() or 1
    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(tmp / "redis-tcp", PASSWORD, tcp=True))
        upstream_port, upstream = l7.start_upstream(stack, tmp)
        targets = []
        for index, name in enumerate(VARIANTS):
            port = l7.free_port()
            text = gateways.stockade_toml(
                workers=workers,
                port=port,
                upstream_port=upstream_port,
                state=tmp / f"state-{index}",
            )
            if index:
                scope = "cluster" if index == 2 else "local"
                text += LIMIT_TOML.format(rate=HUGE_RATE, scope=scope)
                text += f'[cluster]\nbackend = "redis"\nurl = "{redis.url(tcp=True)}"\n'
                # the proxy never reads the key (no ban events): any path names it
                text += f'[cluster.auth]\nkey_file = "{tmp / "cluster.key"}"\n'
            pid = l7.start_stockade(stack, tmp, f"proxy-{index}", text, port)
            targets.append(l7.Target(name, port, pid, processes=1 + workers))
        check_counted(targets[2].port, redis)
        for target in targets:
            l7.measure(target, upstream, l7.WARMUP_S)
        samples: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        rng = random.Random(8)
        for done in range(rounds):
            order = targets[:]
            rng.shuffle(order)
            for target in order:
                samples[target.name].append(l7.measure(target, upstream, duration))
            line = ", ".join(f"{t.name} {samples[t.name][-1]['rps']:.0f}" for t in targets)
            print(f"cluster: round {done + 1}/{rounds}: requests/s {line}", file=sys.stderr)
    return {
        "workers": workers,
        "rounds": rounds,
        "wrk": {"threads": l7.THREADS, "connections": l7.CONNECTIONS, "duration_s": duration},
        "redis_transport": "loopback TCP",
        "variants": [{"name": name, "samples": values} for name, values in samples.items()],
    }


def check_counted(port: int, redis: RedisServer) -> None:
    """The cluster variant really counts in Redis: a request adds a key there."""
    import redis as redis_client

    client = redis_client.Redis(unix_socket_path=str(redis.socket_path), password=PASSWORD)
    try:
        client.flushdb()
        before = len(client.keys("stockade:rl:*"))
        status, _ = l7.get(port)
        after = len(client.keys("stockade:rl:*"))
    finally:
        client.close()
    if status != 200 or after <= before:
        raise BenchError(f"the cluster-scoped limit counted nothing in Redis (status {status})")


# --- main -----------------------------------------------------------------------


def run(trials: int, rounds: int, duration: int) -> dict[str, Any]:
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="stockade-bench-cluster-") as tmp:
        part_a = propagation(trials, Path(tmp) / "a")
        part_b = throughput(rounds, duration, Path(tmp) / "b")
    return {
        "host_load": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-minute average
        "bench": "cluster",
        "date": now_iso(),
        "command": COMMAND,
        "source": source_revision(SOURCES),
        "machine": machine(PACKAGES),
        "total_s": round(time.monotonic() - started, 1),
        "propagation": part_a,
        "throughput": part_b,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--trials", type=int, default=30, help="bans timed, half with auth on (default 30)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (default 3)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run (8)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.cluster: run as root (network namespaces, XDP)", file=sys.stderr)
        return 1
    try:
        results = run(args.trials, args.rounds, args.duration)
    except BenchError as exc:
        print(f"bench.cluster: {exc}", file=sys.stderr)
        return 1
    path = save_results("cluster", results)
    print(f"bench.cluster: results in {path}", file=sys.stderr)
    with suppress(Exception):
        from bench import report

        print(report.render_cluster(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
