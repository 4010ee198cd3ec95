"""ctypes mirrors of the structs in bpf/stockade.h, and its reason codes.

tests/bpf/test_layout.py checks every size and offset here against bcc's
view of the header, so a change on one side that is not made on the other
fails the build. Reason codes are parsed from the header, never retyped.
"""

from __future__ import annotations

import ctypes
import re
from functools import cache
from typing import Any

from stockade.bpf import HEADER

LAYOUT_VERSION_NAME = "STOCKADE_LAYOUT_VERSION"
CONFIG_F_MONITOR = 1
EVENT_SYN_RATE = 1
AF_INET = 4
AF_INET6 = 6
NS_PER_SEC = 1_000_000_000


class StockadeConfig(ctypes.Structure):
    _fields_ = (
        ("syn_rate", ctypes.c_uint64),
        ("syn_burst", ctypes.c_uint64),
        ("v6_rate_prefix", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ban_prefix_v4_count", ctypes.c_uint32),
        ("ban_prefix_v6_count", ctypes.c_uint32),
        ("allow_v4_count", ctypes.c_uint32),
        ("allow_v6_count", ctypes.c_uint32),
    )


class LpmV4Key(ctypes.Structure):
    _fields_ = (("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 4))


class LpmV6Key(ctypes.Structure):
    _fields_ = (("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16))


class AddrV4(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint8 * 4),)


class AddrV6(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint8 * 16),)


class BanValue(ctypes.Structure):
    _fields_ = (
        ("expires_ns", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    )


class AllowValue(ctypes.Structure):
    _fields_ = (("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64))


class RateKey(ctypes.Structure):
    _fields_ = (("family", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16))


class RateBucket(ctypes.Structure):
    _fields_ = (
        ("tokens_nano", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
        ("last_report_ns", ctypes.c_uint64),
        ("dropped", ctypes.c_uint64),
    )


class Counter(ctypes.Structure):
    _fields_ = (("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64))


class RateEvent(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
        ("dropped", ctypes.c_uint64),
        ("ts_ns", ctypes.c_uint64),
    )


# map name -> (key mirror, value mirror); the layout test walks this table.
MAP_MIRRORS: dict[str, tuple[type[Any], type[Any]]] = {
    "config": (ctypes.c_uint32, StockadeConfig),
    "counters": (ctypes.c_uint32, Counter),
    "events_lost": (ctypes.c_uint32, ctypes.c_uint64),
    "ban_v4": (AddrV4, BanValue),
    "ban_v6": (AddrV6, BanValue),
    "ban_prefix_v4": (LpmV4Key, BanValue),
    "ban_prefix_v6": (LpmV6Key, BanValue),
    "allow_v4": (LpmV4Key, AllowValue),
    "allow_v6": (LpmV6Key, AllowValue),
    "syn_buckets": (RateKey, RateBucket),
}

PINNED_MAPS = tuple(MAP_MIRRORS)


@cache
def header_text() -> str:
    text: str = HEADER.read_text()
    return text


@cache
def reasons() -> dict[str, int]:
    """Reason names (lower case, without REASON_) to codes, from the header."""
    found = {
        name.lower(): int(value)
        for name, value in re.findall(r"^\s*REASON_([A-Z_]+)\s*=\s*(\d+)\s*,", header_text(), re.M)
    }
    found.pop("max", None)
    if not found:
        raise RuntimeError(f"no REASON_* codes found in {HEADER}")
    return found


@cache
def layout_version() -> int:
    match = re.search(rf"#define\s+{LAYOUT_VERSION_NAME}\s+(\d+)", header_text())
    if match is None:
        raise RuntimeError(f"{LAYOUT_VERSION_NAME} not found in {HEADER}")
    return int(match.group(1))


@cache
def if_slots() -> int:
    """IF_SLOTS: the interface slots of the counters map, from the header."""
    match = re.search(r"#define\s+IF_SLOTS\s+(\d+)", header_text())
    if match is None:
        raise RuntimeError(f"IF_SLOTS not found in {HEADER}")
    return int(match.group(1))


@cache
def reason_max() -> int:
    """REASON_MAX: the counters of one interface slot, from the header."""
    match = re.search(r"^\s*REASON_MAX\s*=\s*(\d+)\s*,", header_text(), re.M)
    if match is None:
        raise RuntimeError(f"REASON_MAX not found in {HEADER}")
    return int(match.group(1))


def if_slot(ifindex: int) -> int:
    """The counters slot the program uses for packets arriving on ifindex."""
    return ifindex % if_slots()


def counter_index(slot: int, reason: int) -> int:
    """The counters map index of one (interface slot, reason code)."""
    return slot * reason_max() + reason


def counters_size() -> int:
    """max_entries of the counters map."""
    return if_slots() * reason_max()


def reason_names() -> list[str]:
    """Reason names ordered by code, so index i is reason code i."""
    table = reasons()
    return sorted(table, key=table.__getitem__)
