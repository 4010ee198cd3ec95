"""xdp-filter (Debian's xdp-tools) as the reference program for bench.xdp_cost.

xdp-filter needs an interface to load on, so it goes on the gateway veth of
a throwaway lab. Its maps are pinned system-wide under /sys/fs/bpf/xdp-filter
and shared by every interface it is loaded on, so the bench refuses to run
when another xdp-filter is loaded, and unloads its own afterwards.

Source addresses are added with `xdp-filter ip ADDR --mode src`; the filler
entries that bring a map to 10,000 are written with one BPF batch update
carrying byte for byte the value the CLI wrote for the real entry (one CLI
call per address would take about a minute for 20,000 entries).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from bench.common import BenchError
from stockade.controller import libbpf, xdp_attach
from stockade.lab.netns_exec import run_in_netns

PIN_DIR = Path("/sys/fs/bpf/xdp-filter")
LIBXDP_DIR = Path("/sys/fs/bpf/xdp")  # libxdp creates it for dispatchers
MAPS = {4: "filter_ipv4", 6: "filter_ipv6"}
KEY_SIZES = {4: 4, 6: 16}
VALUE_SIZE = 8  # __u64 per CPU: MAP_FLAG_* bits, and hits << COUNTER_SHIFT
CLI_TIMEOUT_S = 30.0


@cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    count_p = ctypes.POINTER(ctypes.c_uint32)
    lib.bpf_map_update_batch.argtypes = (
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        count_p,
        ctypes.c_void_p,
    )
    lib.bpf_map_delete_batch.argtypes = (ctypes.c_int, ctypes.c_void_p, count_p, ctypes.c_void_p)
    lib.bpf_map_lookup_elem.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    lib.libbpf_num_possible_cpus.argtypes = ()
    return lib


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno() or -ret
        raise BenchError(f"{what}: {os.strerror(err)}")


def _cli(netns: str, *args: str) -> str:
    result = run_in_netns(
        netns, ["xdp-filter", *args], capture_output=True, timeout=CLI_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        raise BenchError(f"xdp-filter {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


@dataclass(frozen=True)
class Program:
    """One xdp-filter program as it runs on its interface."""

    label: str  # how the report names it
    features: str  # `xdp-filter load --features`
    ifname: str
    fd: int
    prog_id: int
    name: str
    attach_mode: str


@dataclass
class XdpFilter:
    """The loaded xdp-filter programs and the source-address maps they share."""

    netns: str
    programs: list[Program]
    max_entries: int
    map_fds: dict[int, int]
    fillers: dict[int, bytes] = field(default_factory=dict)  # family -> packed keys
    per_cpu_value: dict[int, bytes] = field(default_factory=dict)
    entries: int = 0

    def ban_source(self, family: int, address: str) -> None:
        """Add one source through the CLI and remember the value it wrote."""
        _cli(self.netns, "ip", address, "--mode", "src")
        key = ipaddress.ip_address(address).packed
        ncpu = _lib().libbpf_num_possible_cpus()
        value = ctypes.create_string_buffer(VALUE_SIZE * ncpu)
        _check(
            _lib().bpf_map_lookup_elem(self.map_fds[family], key, value),
            f"look up {address} in {MAPS[family]}",
        )
        self.per_cpu_value[family] = value.raw
        self.entries = 1

    def set_fillers(self, family: int, keys: bytes) -> None:
        if len(keys) % KEY_SIZES[family]:
            raise ValueError("filler keys are not whole keys")
        self.fillers[family] = keys

    def set_entries(self, total: int) -> None:
        """Bring every family's map to `total` entries (the CLI entry plus fillers)."""
        if total == self.entries:
            return
        for family, keys in self.fillers.items():
            width = KEY_SIZES[family]
            want, have = total - 1, self.entries - 1
            if want > len(keys) // width:
                raise BenchError(f"only {len(keys) // width} filler keys for {want} entries")
            if want > have:
                self._update(family, keys[have * width : want * width])
            elif want < have:
                self._delete(family, keys[want * width : have * width])
        self.entries = total

    def _update(self, family: int, keys: bytes) -> None:
        count = len(keys) // KEY_SIZES[family]
        values = self.per_cpu_value[family] * count
        n = ctypes.c_uint32(count)
        ret = _lib().bpf_map_update_batch(self.map_fds[family], keys, values, ctypes.byref(n), None)
        _check(ret, f"batch update of {count} entries in {MAPS[family]}")

    def _delete(self, family: int, keys: bytes) -> None:
        count = len(keys) // KEY_SIZES[family]
        n = ctypes.c_uint32(count)
        ret = _lib().bpf_map_delete_batch(self.map_fds[family], keys, ctypes.byref(n), None)
        _check(ret, f"batch delete of {count} entries in {MAPS[family]}")


def _prog_name(prog_id: int) -> str:
    result = subprocess.run(
        ["bpftool", "-j", "prog", "show", "id", str(prog_id)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=True,
    )
    return str(json.loads(result.stdout).get("name", "?"))


@contextmanager
def loaded(netns: str, loads: list[tuple[str, str, str]]) -> Iterator[XdpFilter]:
    """`xdp-filter load --mode native --features F IFNAME` for each (label, features,
    ifname) inside netns; every program is unloaded afterwards."""
    if PIN_DIR.exists():
        raise BenchError(
            f"{PIN_DIR} exists: another xdp-filter is loaded on this host and its maps are "
            "shared by every interface; unload it first (`xdp-filter unload --all`)"
        )
    had_libxdp_dir = LIBXDP_DIR.exists()
    fds: list[int] = []
    loaded_on: list[str] = []
    try:
        programs = []
        for label, features, ifname in loads:
            _cli(netns, "load", "--mode", "native", "--features", features, ifname)
            loaded_on.append(ifname)
            state = xdp_attach.query(ifname, netns)
            if not state.prog_id:
                raise BenchError(f"xdp-filter loaded but no XDP program is on {ifname}")
            fds.append(libbpf.prog_fd_by_id(state.prog_id))
            programs.append(
                Program(
                    label,
                    features,
                    ifname,
                    fds[-1],
                    state.prog_id,
                    _prog_name(state.prog_id),
                    state.mode,
                )
            )
        map_fds = {}
        for family, name in MAPS.items():
            map_fds[family] = libbpf.pinned_fd(str(PIN_DIR / name))
            fds.append(map_fds[family])
        yield XdpFilter(
            netns=netns,
            programs=programs,
            max_entries=min(libbpf.map_info(fd).max_entries for fd in map_fds.values()),
            map_fds=map_fds,
        )
    finally:
        for fd in fds:
            os.close(fd)
        for ifname in reversed(loaded_on):
            _cli(netns, "unload", ifname)
        if not had_libxdp_dir:
            # absent, or in use by someone else's dispatcher: leave it
            with contextlib.suppress(OSError):
                LIBXDP_DIR.rmdir()
