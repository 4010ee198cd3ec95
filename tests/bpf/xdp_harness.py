"""Helpers for the BPF unit tests: run frames, read and reset the program's state.

Kept out of conftest.py so test modules can import them by a name no other
test directory uses.
"""

from __future__ import annotations

import ctypes
import ipaddress
import time
from typing import Any

from stockade.controller import layout, libbpf, loader
from stockade.controller.maps import BpfMaps, Hits, RuntimeSettings

XDP_DROP = 1
XDP_PASS = 2

MAP_SIZE = 4096  # max_entries of every sized map in the test program

# Maps emptied before every test (config and counters are rewritten instead).
STATE_MAPS = (
    "ban_v4",
    "ban_v6",
    "ban_prefix_v4",
    "ban_prefix_v6",
    "allow_v4",
    "allow_v6",
    "syn_buckets",
)


class Program:
    """The session's loaded program and the ring-buffer events it emitted."""

    def __init__(self, loaded: loader.LoadedProgram) -> None:
        self.loaded = loaded
        self.raw_events: list[bytes] = []
        loaded.table("events").open_ring_buffer(self._on_event)

    def _on_event(self, _ctx: Any, data: Any, size: int) -> int:
        self.raw_events.append(ctypes.string_at(data, size))
        return 0

    def drain_events(self) -> list[bytes]:
        self.loaded.bpf.ring_buffer_consume()
        out, self.raw_events = self.raw_events, []
        return out


def rate_key(source: str, v6_rate_prefix: int = 64) -> layout.RateKey:
    """The syn_buckets key the program derives for a source address."""
    addr = ipaddress.ip_address(source)
    key = layout.RateKey()
    if addr.version == 4:
        key.family = layout.AF_INET
        packed = addr.packed
    else:
        key.family = layout.AF_INET6
        packed = ipaddress.ip_network((source, v6_rate_prefix), strict=False).network_address.packed
    ctypes.memmove(ctypes.addressof(key.addr), packed, len(packed))
    return key


class Xdp:
    """One test's view of the program: run frames, read and write its state.

    Starts from empty maps, zeroed counters and default settings. Every
    frame run is recorded, so the counters can be checked against the number
    of frames and their total length.
    """

    def __init__(self, program: Program) -> None:
        self.program = program
        self.fd = program.loaded.fd
        self.frames = 0
        self.bytes = 0
        self.zero_counters()
        self.maps = self.clear_state()

    def table(self, name: str) -> Any:
        return self.program.loaded.table(name)

    def clear_state(self) -> BpfMaps:
        """Empty bans, allows and SYN buckets; default settings; drop pending events."""
        for name in STATE_MAPS:
            self.table(name).clear()
        self.program.drain_events()
        self.maps = BpfMaps(self.program.loaded)  # counts the (now empty) tries afresh
        self.maps.apply_settings(RuntimeSettings())
        return self.maps

    def zero_counters(self) -> None:
        for name in ("counters", "events_lost"):
            table = self.table(name)
            for index in range(len(table)):
                table[ctypes.c_uint32(index)] = table.Leaf()  # zeros for every CPU
        self.frames = 0
        self.bytes = 0

    # -- running frames -----------------------------------------------------
    def run(self, frame: bytes, ingress_ifindex: int | None = None) -> int:
        """Run one frame through the program; returns the XDP verdict.

        It arrives on loopback unless ingress_ifindex names another interface.
        """
        result = libbpf.prog_test_run(self.fd, frame, ingress_ifindex=ingress_ifindex)
        self.frames += 1
        self.bytes += len(frame)
        return result.retval

    def run_many(self, frames: list[bytes]) -> list[int]:
        return [self.run(frame) for frame in frames]

    # -- reading and writing state ------------------------------------------
    def counters(self) -> dict[str, Hits]:
        return self.maps.counters()

    def counter_at(self, slot: int, code: int) -> Hits:
        """One (interface slot, reason) of the counters map read by index, summed over CPUs."""
        per_cpu = self.table("counters")[ctypes.c_uint32(layout.counter_index(slot, code))]
        return Hits(sum(int(c.packets) for c in per_cpu), sum(int(c.bytes) for c in per_cpu))

    def reason_at(self, code: int) -> Hits:
        """One reason summed over every interface slot, read by index."""
        hits = [self.counter_at(slot, code) for slot in range(layout.if_slots())]
        return Hits(sum(h.packets for h in hits), sum(h.bytes for h in hits))

    def all_counters(self) -> list[Hits]:
        """Every reason, by code, summed over the interface slots."""
        return [self.reason_at(code) for code in range(layout.reason_max())]

    def slot_counters(self) -> dict[int, dict[str, Hits]]:
        """The interface slots that counted something (as the controller reads them)."""
        return self.maps.counter_slots()

    def config(self) -> layout.StockadeConfig:
        raw = self.table("config")[ctypes.c_uint32(0)]
        return layout.StockadeConfig.from_buffer_copy(raw)

    def entries(self, name: str) -> int:
        return len(list(self.table(name).keys()))

    def bucket(self, source: str, v6_rate_prefix: int = 64) -> layout.RateBucket | None:
        try:
            raw = self.table("syn_buckets")[rate_key(source, v6_rate_prefix)]
        except KeyError:
            return None
        return layout.RateBucket.from_buffer_copy(raw)

    def set_bucket(self, source: str, bucket: layout.RateBucket, v6_rate_prefix: int = 64) -> None:
        self.table("syn_buckets")[rate_key(source, v6_rate_prefix)] = bucket

    def exhaust_bucket(self, source: str, v6_rate_prefix: int = 64) -> None:
        """Give a source an empty SYN bucket, last refilled now."""
        empty = layout.RateBucket(tokens_nano=0, last_ns=time.monotonic_ns())
        self.set_bucket(source, empty, v6_rate_prefix)

    def events(self) -> list[layout.RateEvent]:
        """Ring-buffer events emitted since the last call."""
        out = []
        for raw in self.program.drain_events():
            assert len(raw) == ctypes.sizeof(layout.RateEvent), "event size differs from mirror"
            out.append(layout.RateEvent.from_buffer_copy(raw))
        return out

    def events_lost(self) -> int:
        return self.maps.events_lost()

    def assert_counters_add_up(self) -> None:
        """All reasons together count every frame run and every byte of them."""
        counters = self.all_counters()
        assert sum(h.packets for h in counters) == self.frames, counters
        assert sum(h.bytes for h in counters) == self.bytes, counters
