"""Per-packet cost of stockade's XDP program, side by side with xdp-filter.

Every number is what BPF_PROG_TEST_RUN reports: the kernel runs the program
`repeat` times on one crafted frame and returns the average time per run in
whole nanoseconds. Each round measures every variant once, in a new shuffled
order, so drift on the shared cores hits all variants alike; the report gives
the median over the rounds and the spread (min-max).

Set-ups (each a separate load of the program over its own maps, sized
1,048,576 entries, so only the number of entries differs):
  exact N    N bans in the exact hash maps (IPv4 and IPv6), prefix tries empty
  prefix N   N prefix bans (/24, /64) in the LPM tries, exact maps empty
  exact 1, trie looked up
             like exact 1, with the config's prefix counts forced to 1 so the
             program looks up the (empty) trie it would otherwise skip
and xdp-filter (native, on the lab's gateway veths) with 1 and 10,000 source
addresses per family (10,000 is its per-map limit), loaded twice: by default
(all features) and with `--features ipv4,ipv6`. Two reference programs from
bench/xdp_ref.c show the test-run loop's own cost and a clock read's.

Ban entries other than the one the banned frame hits are map keys only: the
filler blocks lie around the banned one (every other /32, /128, /24 or /64),
so the passing source, in the next block, walks as deep into a trie as the
banned one. No packet is sent anywhere; frames only go to BPF_PROG_TEST_RUN.

Run: .venv/bin/python -m bench.xdp_cost [--rounds N] [--repeat N]
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import random
import struct
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report, xdpfilter
from bench.common import (
    BenchError,
    machine,
    now_iso,
    pin_root,
    reference_programs,
    source_revision,
    stockade_program,
)
from stockade.controller import libbpf, loader
from stockade.controller.maps import BpfMaps, RuntimeSettings
from stockade.lab import packets
from stockade.lab.topology import running_lab
from stockade.targets import Network

REPEAT = 1_000_000
ROUNDS = 15
COUNTS = (1, 10_000, 1_000_000)
MAP_SIZE = 1_048_576
# SYNs per second per source and bucket size, the largest the config allows:
# one test run sends `repeat` SYNs from one source, fewer than the bucket
# holds, and the rest of a round refills it (the bench checks none dropped).
SYN_RATE = 1_000_000
SYN_BURST = 10_000_000
XDP_DROP = 1
XDP_PASS = 2
COMMAND = ".venv/bin/python -m bench.xdp_cost"

EXACT, PREFIX, LOOKUP = "exact", "prefix", "exact, trie looked up"
XDP_FILTER, XDP_FILTER_IP = "xdp-filter", "xdp-filter ip"
REF_PASS, REF_CLOCK = "return XDP_PASS", "bpf_ktime_get_ns(), XDP_PASS"
TARGETS: dict[tuple[str, int], Network] = {
    (EXACT, 4): ipaddress.IPv4Network("198.18.0.10/32"),
    (EXACT, 6): ipaddress.IPv6Network("fd00:18::10/128"),
    (PREFIX, 4): ipaddress.IPv4Network("198.18.0.0/24"),
    (PREFIX, 6): ipaddress.IPv6Network("fd00:18::/64"),
}
# (banned source, passing source): the passing one is in the next block,
# which the fillers (every other block) leave out.
SOURCES: dict[tuple[str, int], tuple[str, str]] = {
    (EXACT, 4): ("198.18.0.10", "198.18.0.11"),
    (EXACT, 6): ("fd00:18::10", "fd00:18::11"),
    (PREFIX, 4): ("198.18.0.10", "198.18.1.10"),
    (PREFIX, 6): ("fd00:18::10", "fd00:18:0:1::10"),
}
TABLES = {
    (EXACT, 4): "ban_v4",
    (EXACT, 6): "ban_v6",
    (PREFIX, 4): "ban_prefix_v4",
    (PREFIX, 6): "ban_prefix_v6",
}


@dataclass(frozen=True)
class Variant:
    """One measured case: a program, its map contents, and a frame."""

    program: str  # "stockade", XDP_FILTER, XDP_FILTER_IP, REF_PASS or REF_CLOCK
    table: str  # EXACT, PREFIX or LOOKUP ("-" for the reference programs)
    family: int
    entries: int
    packet: str  # "pass", "banned" or "SYN"
    fd: int
    frame: bytes
    expect: int  # XDP_PASS or XDP_DROP
    before: Callable[[], None] | None = None  # puts shared maps in shape

    def describe(self) -> dict[str, Any]:
        return {
            "program": self.program,
            "table": self.table,
            "family": self.family,
            "entries": self.entries,
            "packet": self.packet,
        }


def filler_keys(target: Network, total: int) -> bytes:
    """Packed map keys for total - 1 blocks the size of target, around it.

    Every other block: target +- 2, 4, 6 ... blocks. Exact keys are the
    address bytes; LPM keys are a host-order prefix length, then the address.
    """
    size = target.num_addresses
    base = int(target.network_address)
    width = target.max_prefixlen // 8
    head = b"" if size == 1 else struct.pack("=I", target.prefixlen)
    out = bytearray()
    for j in range(-(total // 2), total - total // 2):
        if j:
            out += head + (base + 2 * j * size).to_bytes(width, "big")
    return bytes(out)


def frame(source: str, packet: str) -> bytes:
    flags = packets.TCP_SYN if packet == "SYN" else packets.TCP_ACK
    if ":" in source:
        return packets.tcp6(source, flags=flags)
    return packets.tcp4(source, flags=flags)


def fill(program: loader.LoadedProgram, kind: str, total: int, trie_lookup: bool) -> BpfMaps:
    """Ban the targets of `kind` through BpfMaps, after total - 1 fillers in one batch."""
    for family in (4, 6):
        if total > 1:
            table = program.table(TABLES[kind, family])
            count = total - 1
            keys = (table.Key * count).from_buffer_copy(filler_keys(TARGETS[kind, family], total))
            table.items_update_batch(keys, (table.Leaf * count)())  # permanent, no hits
    maps = BpfMaps(program)  # counts the tries' entries into the config
    for family in (4, 6):
        maps.put_ban(TARGETS[kind, family], 0)
    maps.apply_settings(RuntimeSettings(syn_rate=SYN_RATE, syn_burst=SYN_BURST))
    if trie_lookup:
        # What the program would cost without its empty-trie skip: the tries
        # stay empty, but the counts say there is something to look up.
        config = program.table("config")
        current = config[ctypes.c_uint32(0)]
        current.ban_prefix_v4_count = current.ban_prefix_v6_count = 1
        config[ctypes.c_uint32(0)] = current
    return maps


def stockade_variants(
    fd: int, kind: str, total: int, table: str, packets_: Sequence[str]
) -> list[Variant]:
    out = []
    for family in (4, 6):
        banned, passing = SOURCES[kind, family]
        for packet in packets_:
            source = banned if packet == "banned" else passing
            expect = XDP_DROP if packet == "banned" else XDP_PASS
            out.append(
                Variant("stockade", table, family, total, packet, fd, frame(source, packet), expect)
            )
    return out


def xdp_filter_variants(xf: xdpfilter.XdpFilter, counts: Sequence[int]) -> list[Variant]:
    out = []
    for prog in xf.programs:
        for total in counts:
            if total > xf.max_entries:
                continue

            def before(total: int = total) -> None:
                xf.set_entries(total)

            for family in (4, 6):
                banned, passing = SOURCES[EXACT, family]
                shapes = [("pass", passing, XDP_PASS), ("banned", banned, XDP_DROP)]
                if total == 1:
                    shapes.append(("SYN", passing, XDP_PASS))
                for packet, source, expect in shapes:
                    out.append(
                        Variant(
                            prog.label,
                            EXACT,
                            family,
                            total,
                            packet,
                            prog.fd,
                            frame(source, packet),
                            expect,
                            before,
                        )
                    )
    return out


def run_variant(variant: Variant, repeat: int) -> int:
    if variant.before is not None:
        variant.before()
    result = libbpf.prog_test_run(variant.fd, variant.frame, repeat)
    if result.retval != variant.expect:
        raise BenchError(
            f"{variant.describe()}: verdict {result.retval}, expected {variant.expect}; "
            "the set-up is wrong, so the numbers would be too"
        )
    return result.duration_ns


def measure(variants: Sequence[Variant], rounds: int, repeat: int) -> list[list[int]]:
    """Samples per variant: `rounds` shuffled passes over all of them."""
    for variant in variants:  # warm up, and check every verdict once
        run_variant(variant, max(1, repeat // 10))
    samples: list[list[int]] = [[] for _ in variants]
    order = list(range(len(variants)))
    rng = random.Random(2544)
    for done in range(rounds):
        rng.shuffle(order)
        for i in order:
            samples[i].append(run_variant(variants[i], repeat))
        print(f"xdp_cost: round {done + 1}/{rounds}", file=sys.stderr)
    return samples


def load_stockade(
    stack: ExitStack, root: Path, counts: Sequence[int]
) -> tuple[list[Variant], list[BpfMaps]]:
    """One load per set-up, each over its own pinned maps under root."""
    variants: list[Variant] = []
    syn_maps: list[BpfMaps] = []
    setups = [(EXACT, n, EXACT) for n in counts] + [(PREFIX, n, PREFIX) for n in counts]
    setups.append((EXACT, 1, LOOKUP))
    for kind, total, table in setups:
        label = f"{table}-{total}".replace(", ", "-").replace(" ", "-")
        settings = loader.ProgramSettings(
            pin_root=root / label,
            max_bans_v4=MAP_SIZE,
            max_bans_v6=MAP_SIZE,
            max_prefix_bans=MAP_SIZE,
        )
        program = stack.enter_context(stockade_program(settings))
        maps = fill(program, kind, total, trie_lookup=table == LOOKUP)
        shapes = ["pass"] if table == LOOKUP else ["pass", "banned"]
        if table == EXACT and total == 1:
            shapes.append("SYN")
            syn_maps.append(maps)
        variants += stockade_variants(program.fd, kind, total, table, shapes)
        print(f"xdp_cost: loaded {label}", file=sys.stderr)
    return variants, syn_maps


def load_xdp_filter(
    stack: ExitStack, counts: Sequence[int]
) -> tuple[list[Variant], dict[str, Any]]:
    """xdp-filter in a throwaway lab, twice: its default load, and only its IP lookups."""
    lab = stack.enter_context(running_lab(start_upstream=False))
    loads = [
        (XDP_FILTER, "all", lab.gateway_if),
        (XDP_FILTER_IP, "ipv4,ipv6", lab.gateway_upstream_if),
    ]
    xf = stack.enter_context(xdpfilter.loaded(lab.gateway_ns, loads))
    for family in (4, 6):
        xf.ban_source(family, SOURCES[EXACT, family][0])
        xf.set_fillers(family, filler_keys(TARGETS[EXACT, family], xf.max_entries))
    described = {
        "max_entries": xf.max_entries,
        "programs": [
            {
                "label": p.label,
                "features": p.features,
                "prog_id": p.prog_id,
                "prog_name": p.name,
                "attach_mode": p.attach_mode,
            }
            for p in xf.programs
        ],
    }
    return xdp_filter_variants(xf, counts), described


def load_references(stack: ExitStack) -> list[Variant]:
    """bench/xdp_ref.c: the test-run loop alone, and with one clock read."""
    fds = stack.enter_context(reference_programs())
    passing = frame(SOURCES[EXACT, 4][1], "pass")
    return [
        Variant(name, "-", 4, 0, "pass", fds[function], passing, XDP_PASS)
        for function, name in (("xdp_ref_pass", REF_PASS), ("xdp_ref_clock", REF_CLOCK))
    ]


def run(rounds: int, repeat: int, counts: Sequence[int]) -> dict[str, Any]:
    started = time.monotonic()
    with ExitStack() as stack:
        root = stack.enter_context(pin_root("cost"))
        variants, syn_maps = load_stockade(stack, root, counts)
        theirs, xdp_filter = load_xdp_filter(stack, counts)
        variants += theirs + load_references(stack)
        setup_s = time.monotonic() - started

        samples = measure(variants, rounds, repeat)
        rate_drops = sum(m.counters()["drop_rate"].packets for m in syn_maps)
        if rate_drops:
            raise BenchError(f"the token bucket dropped {rate_drops} SYNs; lower --repeat")
    return {
        "bench": "xdp_cost",
        "date": now_iso(),
        "command": COMMAND,
        "source": source_revision(),
        "machine": machine(),
        "repeat": repeat,
        "rounds": rounds,
        "counts": list(counts),
        "syn": {"rate": SYN_RATE, "burst": SYN_BURST},
        "xdp_filter": xdp_filter,
        "setup_s": round(setup_s, 1),
        "total_s": round(time.monotonic() - started, 1),
        "variants": [
            v.describe() | {"samples_ns": s} for v, s in zip(variants, samples, strict=True)
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.xdp_cost",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: .venv/bin/python -m bench.xdp_cost --rounds 5 --counts 1,10000",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="default %(default)s")
    parser.add_argument(
        "--repeat", type=int, default=REPEAT, help="runs per measurement, >= 1e6 (%(default)s)"
    )
    parser.add_argument(
        "--counts",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        default=COUNTS,
        help="ban counts, comma-separated (default 1,10000,1000000)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1_000_000 or args.rounds < 1 or min(args.counts) < 1:
        parser.error("--repeat must be >= 1000000, --rounds and every count >= 1")
    if max(args.counts) > MAP_SIZE:
        parser.error(f"counts above the map size {MAP_SIZE} do not fit")
    try:
        results = run(args.rounds, args.repeat, args.counts)
    except BenchError as exc:
        print(f"bench.xdp_cost: {exc}", file=sys.stderr)
        return 1
    report.publish("xdp_cost", results, summary=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
