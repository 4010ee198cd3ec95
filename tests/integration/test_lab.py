"""The lab itself: reachability across the gateway, and a clean `down` in every case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from click.testing import CliRunner
from pyroute2 import IPRoute, netns

from stockade.cli.lab import lab_group
from stockade.lab import probe, topology
from stockade.lab.netns_exec import popen_in_netns, python_argv, run_in_netns
from stockade.lab.topology import Lab

pytestmark = pytest.mark.netns

LISTEN_PORT = 9000


def _leftovers(prefix: str) -> list[str]:
    """Everything on the host still named with the lab prefix."""
    found = [f"netns {n}" for n in netns.listnetns() if n.startswith(f"{prefix}-")]
    with IPRoute() as ipr:
        for link in ipr.link("dump"):
            name = link.get("IFLA_IFNAME")
            if name.startswith(f"{prefix}-"):
                found.append(f"link {name}")
    if topology.state_path(prefix).exists():
        found.append(f"state {topology.state_path(prefix)}")
    return found


def _addresses(ns: str) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    with IPRoute(netns=ns, flags=0) as ipr:
        names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.link("dump")}
        for addr in ipr.addr("dump"):
            result.setdefault(names[addr["index"]], set()).add(
                f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}"
            )
    return result


# --- the topology ------------------------------------------------------------


def test_namespaces_interfaces_and_addresses(lab: Lab) -> None:
    assert set(lab.namespaces) <= set(netns.listnetns())
    client = _addresses(lab.client_ns)
    assert {f"{a}/24" for a in topology.CLIENT_V4} <= client["c0"]
    assert {f"{a}/64" for a in topology.CLIENT_V6} <= client["c0"]
    gateway = _addresses(lab.gateway_ns)
    assert {"198.18.0.1/24", "fd00:18::1/64"} <= gateway[lab.gateway_if]
    assert {"198.18.1.1/24", "fd00:19::1/64"} <= gateway["gw1"]
    upstream = _addresses(lab.upstream_ns)
    assert {"198.18.1.10/24", "fd00:19::10/64"} <= upstream["u0"]
    assert "127.0.0.1/8" in upstream["lo"]


def test_gateway_forwards_and_the_root_namespace_is_untouched(lab: Lab) -> None:
    keys = ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"]
    done = run_in_netns(lab.gateway_ns, ["cat", *keys], capture_output=True, timeout=5)
    assert done.stdout.split() == ["1", "1"]
    done = run_in_netns(lab.client_ns, ["cat", *keys], capture_output=True, timeout=5)
    assert done.stdout.split() == ["0", "0"]


# --- reachability from several client source addresses ----------------------

SOURCES = [
    ("198.18.0.10", "198.18.0.1", "198.18.1.10"),
    ("198.18.0.12", "198.18.0.1", "198.18.1.10"),
    ("fd00:18::10", "fd00:18::1", "fd00:19::10"),
    ("fd00:18::13", "fd00:18::1", "fd00:19::10"),
]


@pytest.mark.parametrize(("src", "gateway", "upstream"), SOURCES)
def test_ping_gateway_and_upstream(lab: Lab, src: str, gateway: str, upstream: str) -> None:
    for dst in (gateway, upstream):
        result = probe.in_netns(lab.client_ns, "ping", "--dst", dst, "--src", src)
        assert result["ok"], f"ping {src} -> {dst}: {result}"


@pytest.mark.parametrize(("src", "gateway", "upstream"), SOURCES)
def test_http_to_upstream_over_the_gateway(lab: Lab, src: str, gateway: str, upstream: str) -> None:
    host = f"[{upstream}]" if ":" in upstream else upstream
    health = probe.in_netns(
        lab.client_ns, "http", "--url", f"http://{host}:8080/health", "--src", src
    )
    assert health["ok"], health
    assert health["body"] == {"ok": True}
    hello = probe.in_netns(
        lab.client_ns, "http", "--url", f"http://{host}:8080/api/hello", "--src", src
    )
    # the upstream sees the client's own address: routed, not NATed
    assert hello["body"] == {"hello": "world", "client": src}
    missing = probe.in_netns(lab.client_ns, "http", "--url", f"http://{host}:8080/nope")
    assert missing["status"] == 404
    assert missing["body"]["error"] == "not found"


def test_tcp_to_the_gateway(lab: Lab) -> None:
    listener = popen_in_netns(
        lab.gateway_ns,
        python_argv("-m", "stockade.lab.probe", "listen", "--port", str(LISTEN_PORT)),
        stdout=subprocess.PIPE,
    )
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().startswith("ready")
        for src, dst in [
            ("198.18.0.10", "198.18.0.1"),
            ("198.18.0.11", "198.18.0.1"),
            ("fd00:18::11", "fd00:18::1"),
            ("fd00:18::12", "fd00:18::1"),
        ]:
            result = probe.in_netns(
                lab.client_ns, "tcp", "--dst", dst, "--port", str(LISTEN_PORT), "--src", src
            )
            assert result["ok"], f"tcp {src} -> {dst}: {result}"
            assert result["local"] == src
        # the other leg too: the upstream namespace reaches the gateway
        result = probe.in_netns(
            lab.upstream_ns, "tcp", "--dst", "198.18.1.1", "--port", str(LISTEN_PORT)
        )
        assert result["ok"], result
    finally:
        listener.terminate()
        listener.wait(timeout=5)
        assert listener.stdout is not None
        listener.stdout.close()


def test_probes_are_bounded_in_time(lab: Lab) -> None:
    # nothing listens on this port of the upstream: refused at once, not hanging
    started = time.monotonic()
    result = probe.in_netns(lab.client_ns, "tcp", "--dst", "198.18.1.10", "--port", "9")
    assert result["result"] == "refused"
    assert time.monotonic() - started < 5


def test_ping_probe_needs_the_reply_from_the_right_address() -> None:
    # raw ICMP sockets see every echo reply on the host: the probe must match its own
    assert probe.icmp_echo("127.0.0.1", src="127.0.0.1", timeout=1)["ok"]
    assert probe.icmp_echo("::1", timeout=1)["ok"]


def test_find_returns_the_running_lab(lab: Lab) -> None:
    assert topology.find(lab.prefix) == lab
    assert any(s.prefix == lab.prefix and s.upstream_running for s in topology.status())


# --- down: complete, idempotent, safe after a crash --------------------------


def _pid_alive(pid: int) -> bool:
    """Running, not a zombie waiting for init (or whoever adopted it) to collect it."""
    stat = topology._proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def test_down_removes_everything_and_is_idempotent(lab_prefixes: Callable[[], str]) -> None:
    prefix = lab_prefixes()
    lab = topology.up(prefix)
    try:
        assert lab.upstream_pid is not None
        assert _leftovers(prefix)
        done = topology.down(prefix)
        assert f"stopped upstream pid {lab.upstream_pid}" in done
        assert _leftovers(prefix) == []
        assert not _pid_alive(lab.upstream_pid)
        assert topology.down(prefix) == []
        assert topology.down(prefix) == []
    finally:
        topology.down(prefix)


def test_down_after_a_crash(lab_prefixes: Callable[[], str]) -> None:
    """State file left behind, upstream dead, a stray veth in the root namespace."""
    prefix = lab_prefixes()
    lab = topology.up(prefix)
    try:
        assert lab.upstream_pid is not None
        os.kill(lab.upstream_pid, signal.SIGKILL)
        os.waitpid(lab.upstream_pid, 0)
        with IPRoute() as ipr:  # as if `up` died between creating and moving a veth
            ipr.link("add", ifname=f"{prefix}-c0", kind="veth", peer={"ifname": f"{prefix}-g0"})
        assert topology.state_path(prefix).exists()

        done = topology.down(prefix)
        assert _leftovers(prefix) == []
        # deleting either end of the pair removes both
        assert any(line.startswith(f"removed interface {prefix}-") for line in done)
        assert any("left alone" in line for line in done)
    finally:
        topology.down(prefix)


def test_down_never_signals_a_pid_that_is_not_the_upstream(
    lab_prefixes: Callable[[], str],
) -> None:
    prefix = lab_prefixes()
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        lab = topology.up(prefix, start_upstream=False)
        assert lab.upstream_pid is None
        # the recorded PID now belongs to another program (PID reuse after a crash)
        topology._update_state(
            prefix, upstream={"pid": stranger.pid, "netns": lab.upstream_ns, "start_time": None}
        )
        topology.down(prefix)
        assert stranger.poll() is None, "down signalled a process that is not the upstream"
        assert _leftovers(prefix) == []
    finally:
        topology.down(prefix)
        stranger.terminate()
        stranger.wait(timeout=5)


def test_a_prefix_in_use_is_refused_and_left_intact(lab: Lab) -> None:
    with pytest.raises(topology.LabExistsError, match="in use"):
        topology.up(lab.prefix)
    assert set(lab.namespaces) <= set(netns.listnetns())
    assert topology.state_path(lab.prefix).exists()


def test_a_failed_up_removes_what_it_built(
    monkeypatch: pytest.MonkeyPatch, lab_prefixes: Callable[[], str]
) -> None:
    prefix = lab_prefixes()

    def broken(lab: Lab) -> int:
        raise topology.LabError("upstream exploded")

    monkeypatch.setattr(topology, "_start_upstream", broken)
    try:
        with pytest.raises(topology.LabError, match="exploded"):
            topology.up(prefix)
        assert _leftovers(prefix) == []
    finally:
        topology.down(prefix)


def test_an_upstream_that_cannot_start_is_reported_and_cleaned_up(
    monkeypatch: pytest.MonkeyPatch, lab_prefixes: Callable[[], str]
) -> None:
    prefix = lab_prefixes()
    monkeypatch.setattr(topology, "UPSTREAM_MODULE", "stockade.lab.no_such_module")
    try:
        with pytest.raises(topology.LabError, match=r"did not start.*no_such_module"):
            topology.up(prefix)
        assert _leftovers(prefix) == []
        assert not topology.upstream_log_path(prefix).exists()
    finally:
        topology.down(prefix)


def test_running_lab_removes_the_lab_when_the_block_fails(
    lab_prefixes: Callable[[], str],
) -> None:
    prefix = lab_prefixes()
    with pytest.raises(RuntimeError, match="boom"), topology.running_lab(prefix):
        assert _leftovers(prefix)
        raise RuntimeError("boom")
    assert _leftovers(prefix) == []


# --- the CLI ------------------------------------------------------------------


def test_cli_up_status_down(lab_prefixes: Callable[[], str]) -> None:
    prefix = lab_prefixes()
    runner = CliRunner()
    try:
        result = runner.invoke(lab_group, ["up", "--prefix", prefix, "--json", "--no-upstream"])
        assert result.exit_code == 0, result.output
        shown = json.loads(result.stdout)
        assert shown["prefix"] == prefix
        assert shown["namespaces"]["gateway"] == f"{prefix}-gw"
        assert shown["upstream"]["pid"] is None

        result = runner.invoke(lab_group, ["up", "--prefix", prefix])
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1

        result = runner.invoke(lab_group, ["status", "--json"])
        assert result.exit_code == 0
        assert prefix in [s["prefix"] for s in json.loads(result.stdout)]

        result = runner.invoke(lab_group, ["down", "--prefix", prefix])
        assert result.exit_code == 0
        assert f"removed network namespace {prefix}-gw" in result.stdout
        assert _leftovers(prefix) == []

        result = runner.invoke(lab_group, ["down", "--prefix", prefix])
        assert result.exit_code == 0
        assert result.stdout.strip() == "nothing to remove"
    finally:
        topology.down(prefix)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`stockade lab ...` in a process of its own, as an operator runs it."""
    code = "from stockade.cli.lab import lab_group; lab_group(prog_name='stockade lab')"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def test_the_upstream_outlives_lab_up_and_another_process_takes_it_down(
    lab_prefixes: Callable[[], str],
) -> None:
    prefix = lab_prefixes()
    try:
        done = _cli("up", "--prefix", prefix, "--json")
        assert done.returncode == 0, done.stderr
        pid = json.loads(done.stdout)["upstream"]["pid"]
        # `lab up` has exited; its upstream still serves, from its own session
        assert _pid_alive(pid)
        assert os.getsid(pid) == pid
        health = probe.in_netns(f"{prefix}-cli", "http", "--url", "http://198.18.1.10:8080/health")
        assert health["ok"], health

        done = _cli("down", "--prefix", prefix)
        assert done.returncode == 0, done.stderr
        assert f"stopped upstream pid {pid}" in done.stdout
        assert _leftovers(prefix) == []
        assert not _pid_alive(pid)
    finally:
        topology.down(prefix)
