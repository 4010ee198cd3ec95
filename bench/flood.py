"""Receiver softirq CPU under a bounded veth flood: no filter, nftables, XDP.

One lab (stockade.lab.topology, without the upstream). trafgen in the
client namespace sends PACKETS identical UDP frames from the banned address
198.18.0.10 to a closed port on the gateway, once per variant per round:

  no filter            the stack delivers, finds no socket, drops
  nft inet input       nftables set lookup + drop at the input hook
  nft netdev ingress   the same at gw0's ingress hook
  XDP generic          stockade's program, source banned, generic mode
  XDP native           the same in native (veth driver) mode

Each flood is bounded by trafgen's packet count and a timeout. Receiving a
veth packet runs in the NET_RX softirq of the sending CPU, so the cost is
the growth of /proc/stat's softirq time (all CPUs) per packet that crossed
the veth; see bench/README.md for the method and what veth hides.

Run: .venv/bin/python -m bench.flood [--rounds N] [--packets N]
"""

from __future__ import annotations

import argparse
import gzip
import ipaddress
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report
from bench.common import (
    BenchError,
    machine,
    now_iso,
    pin_root,
    reference_programs,
    source_revision,
    stockade_program,
)
from stockade.controller import loader
from stockade.controller.maps import BpfMaps
from stockade.controller.xdp_attach import Mode, attach, detach, query
from stockade.lab.netns_exec import popen_in_netns, run_in_netns
from stockade.lab.topology import CLIENT_IF, GATEWAY_V4, Lab, running_lab

PACKETS = 1_500_000
ROUNDS = 9
TIMEOUT_S = 60.0
BANNED = "198.18.0.10"
DPORT = 9  # discard: nothing listens on the gateway
FRAME_BYTES = 60
NFT_TABLE = "stockade_bench"
COMMAND = ".venv/bin/python -m bench.flood"
USER_HZ = os.sysconf("SC_CLK_TCK")

NFT_RULESET = """\
table {family} {table} {{
    set banned {{ type ipv4_addr; elements = {{ {banned} }}; }}
    chain filter {{
        type filter hook {hook} priority {priority}; policy accept;
        ip saddr @banned counter drop
    }}
}}
"""

DropCounter = Callable[[], int | None]


def ipv4_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: bytes, src_mac: bytes) -> bytes:
    """A FRAME_BYTES-byte UDP frame with a valid IPv4 header checksum (UDP checksum 0)."""
    payload = b"stockade-bench".ljust(FRAME_BYTES - 14 - 20 - 8, b".")
    udp = struct.pack("!HHHH", 40000, DPORT, 8 + len(payload), 0) + payload
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            1,
            0,
            64,
            17,
            0,
            ipaddress.IPv4Address(BANNED).packed,
            ipaddress.IPv4Address(GATEWAY_V4).packed,
        )
    )
    ip[10:12] = struct.pack("!H", ipv4_checksum(bytes(ip)))
    return dst_mac + src_mac + struct.pack("!H", 0x0800) + bytes(ip) + udp


def trafgen_config(frame: bytes) -> str:
    return "{ " + ", ".join(f"0x{byte:02x}" for byte in frame) + " }\n"


@dataclass(frozen=True)
class CpuTimes:
    """One CPU's cumulative time from /proc/stat, in USER_HZ ticks."""

    system: int
    softirq: int
    busy: int

    @classmethod
    def read_all(cls) -> dict[int, CpuTimes]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if not re.fullmatch(r"cpu\d+", name):
                    continue
                # user nice system idle iowait irq softirq steal
                fields = [int(x) for x in values[:8]]
                out[int(name[3:])] = cls(
                    system=fields[2], softirq=fields[6], busy=sum(fields) - fields[3] - fields[4]
                )
        return out


def tick_hz() -> int | None:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith("CONFIG_HZ="):
                    return int(line.split("=")[1])
    except OSError:
        pass
    return None


def link(netns: str, ifname: str) -> dict[str, Any]:
    from pyroute2 import IPRoute

    with IPRoute(netns=netns, flags=0) as ipr:
        (msg,) = ipr.link("get", ifname=ifname)
    return {
        "mac": bytes.fromhex(str(msg.get("IFLA_ADDRESS")).replace(":", "")),
        "stats": dict(msg.get("IFLA_STATS64")),
    }


def nft(netns: str, *args: str, stdin: str | None = None) -> str:
    result = run_in_netns(
        netns, ["nft", *args], input=stdin, capture_output=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise BenchError(f"nft {' '.join(args)} in {netns}: {result.stderr.strip()}")
    return result.stdout


def nft_drops(netns: str, family: str) -> int:
    listing = json.loads(nft(netns, "-j", "list", "table", family, NFT_TABLE))
    for item in listing["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise BenchError(f"no counter in nft table {family} {NFT_TABLE}")


@dataclass(frozen=True)
class Rig:
    """What the variants act on: the lab and the two XDP programs."""

    lab: Lab
    maps: BpfMaps  # stockade's, with BANNED banned
    stockade_fd: int
    drop_all_fd: int  # bench/xdp_ref.c: XDP's own cost on a veth


@contextmanager
def no_filter(rig: Rig) -> Iterator[DropCounter]:
    yield lambda: None


@contextmanager
def nft_filter(rig: Rig, family: str, hook: str, priority: str) -> Iterator[DropCounter]:
    netns = rig.lab.gateway_ns
    ruleset = NFT_RULESET.format(
        family=family, table=NFT_TABLE, banned=BANNED, hook=hook, priority=priority
    )
    nft(netns, "-f", "-", stdin=ruleset)
    try:
        yield lambda: nft_drops(netns, family)
    finally:
        nft(netns, "delete", "table", family, NFT_TABLE)


@contextmanager
def xdp(rig: Rig, fd: int, mode: Mode, drops: DropCounter) -> Iterator[DropCounter]:
    ifname, netns = rig.lab.gateway_if, rig.lab.gateway_ns
    state = attach(ifname, fd, mode=mode, netns=netns)
    try:
        if state.mode != mode.value:
            raise BenchError(f"asked for {mode.value} XDP on {ifname}, got {state.mode}")
        yield drops
    finally:
        detach(ifname, netns)
        if query(ifname, netns).prog_id:
            raise BenchError(f"an XDP program is still attached to {ifname} after detach")


def stockade_drops(rig: Rig) -> DropCounter:
    return lambda: rig.maps.counters()["drop_ban"].packets


VARIANTS: dict[str, Callable[[Rig], AbstractContextManager[DropCounter]]] = {
    "no filter": no_filter,
    "nft inet input": lambda rig: nft_filter(rig, "inet", "input", "filter"),
    "nft netdev ingress": lambda rig: nft_filter(
        rig, "netdev", f'ingress device "{rig.lab.gateway_if}"', "-500"
    ),
    "XDP generic": lambda rig: xdp(rig, rig.stockade_fd, Mode.GENERIC, stockade_drops(rig)),
    "XDP native": lambda rig: xdp(rig, rig.stockade_fd, Mode.NATIVE, stockade_drops(rig)),
    "XDP generic, drop-all": lambda rig: xdp(rig, rig.drop_all_fd, Mode.GENERIC, lambda: None),
    "XDP native, drop-all": lambda rig: xdp(rig, rig.drop_all_fd, Mode.NATIVE, lambda: None),
}


def send(lab: Lab, config: Path, packets: int) -> tuple[int, int]:
    """Run one bounded trafgen flood from the client; returns packets sent and its CPU."""
    argv = [
        "trafgen",
        "--dev",
        CLIENT_IF,
        "--in",
        str(config),
        "--num",
        str(packets),
        "--cpus",
        "1",
        "--no-sock-mem",  # leave the host's socket-memory sysctls alone
        "--notouch-irq",  # and its IRQ affinities
    ]
    proc = popen_in_netns(
        lab.client_ns,
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: trafgen and its worker
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except BaseException as exc:  # the timeout, or Ctrl-C: stop the flood before the lab goes
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise BenchError(
                f"trafgen did not send {packets:,} packets in {TIMEOUT_S:.0f}s"
            ) from None
        raise
    if proc.returncode != 0:
        raise BenchError(f"trafgen failed ({proc.returncode}): {err.strip()[-300:]}")
    sent = re.search(r"(\d+) packets outgoing", out + err)
    cpu = re.search(r"on CPU(\d+)", out + err)
    if sent is None or cpu is None:
        raise BenchError(f"trafgen did not report what it sent: {(out + err).strip()[-300:]}")
    return int(sent.group(1)), int(cpu.group(1))


def flood_once(lab: Lab, config: Path, packets: int, drops: DropCounter) -> dict[str, Any]:
    drops_before = drops()
    tx_before = link(lab.client_ns, CLIENT_IF)["stats"]
    rx_before = link(lab.gateway_ns, lab.gateway_if)["stats"]
    cpu_before = CpuTimes.read_all()
    started = time.monotonic()
    sent, cpu = send(lab, config, packets)
    elapsed = time.monotonic() - started
    cpu_after = CpuTimes.read_all()
    tx_after = link(lab.client_ns, CLIENT_IF)["stats"]
    rx_after = link(lab.gateway_ns, lab.gateway_if)["stats"]
    drops_after = drops()
    # veth counts a packet it could not hand to the peer as dropped on the sender
    veth_drops = tx_after["tx_dropped"] - tx_before["tx_dropped"]
    filter_drops = None
    if drops_before is not None and drops_after is not None:
        filter_drops = drops_after - drops_before
    return {
        "sent": sent,
        "delivered": sent - veth_drops,
        "veth_drops": veth_drops,
        "rx_packets": rx_after["rx_packets"] - rx_before["rx_packets"],
        "filter_drops": filter_drops,
        "elapsed_s": round(elapsed, 4),
        "cpu": cpu,
        # the sending CPU, where the receive softirq runs too
        "softirq_s": (cpu_after[cpu].softirq - cpu_before[cpu].softirq) / USER_HZ,
        "system_s": (cpu_after[cpu].system - cpu_before[cpu].system) / USER_HZ,
        "busy_s": (cpu_after[cpu].busy - cpu_before[cpu].busy) / USER_HZ,
        # every CPU, in case some of the work ran elsewhere
        "softirq_all_s": sum(
            after.softirq - cpu_before[n].softirq for n, after in cpu_after.items()
        )
        / USER_HZ,
    }


def run(rounds: int, packets: int) -> dict[str, Any]:
    started = time.monotonic()
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with ExitStack() as stack:
        root = stack.enter_context(pin_root("flood"))
        program = stack.enter_context(stockade_program(loader.ProgramSettings(pin_root=root)))
        maps = BpfMaps(program)
        maps.put_ban(ipaddress.IPv4Network(f"{BANNED}/32"), 0)
        drop_all_fd = stack.enter_context(reference_programs())["xdp_ref_drop"]
        lab = stack.enter_context(running_lab(start_upstream=False))
        rig = Rig(lab, maps, program.fd, drop_all_fd)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stockade-bench-")))
        config = tmp / "flood.trafgen"
        frame = udp_frame(
            dst_mac=link(lab.gateway_ns, lab.gateway_if)["mac"],
            src_mac=link(lab.client_ns, CLIENT_IF)["mac"],
        )
        config.write_text(trafgen_config(frame))
        send(lab, config, 10_000)  # warm up: ARP/neighbour state, page cache, trafgen
        names = list(VARIANTS)
        rng = random.Random(2544)
        for done in range(rounds):
            rng.shuffle(names)
            for name in names:
                with VARIANTS[name](rig) as drops:
                    samples[name].append(flood_once(lab, config, packets, drops))
            print(f"flood: round {done + 1}/{rounds}", file=sys.stderr)
    return {
        "bench": "flood",
        "date": now_iso(),
        "command": COMMAND,
        "source": source_revision(),
        "machine": machine(),
        "packets": packets,
        "rounds": rounds,
        "frame_bytes": FRAME_BYTES,
        "timeout_s": TIMEOUT_S,
        "tick_hz": tick_hz() or "kernel",
        "total_s": round(time.monotonic() - started, 1),
        "variants": [{"name": name, "samples": samples[name]} for name in VARIANTS],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flood",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: .venv/bin/python -m bench.flood --rounds 3 --packets 500000",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="default %(default)s")
    parser.add_argument(
        "--packets", type=int, default=PACKETS, help="per flood, at most 2e6 (%(default)s)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.packets <= 2_000_000:
        parser.error("--rounds must be >= 1 and --packets between 1 and 2000000")
    try:
        results = run(args.rounds, args.packets)
    except BenchError as exc:
        print(f"bench.flood: {exc}", file=sys.stderr)
        return 1
    report.publish("flood", results, summary=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
