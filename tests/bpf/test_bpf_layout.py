"""The ctypes mirrors in controller/layout.py agree with the C in bpf/stockade.h.

bcc builds its own ctypes types for every map's key and value from the
compiled program; each mirror must match it in size, field names, field
offsets and field types (STYLE point 2). Reason codes come from the header.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

import pytest
from xdp_harness import Program

from stockade.controller import layout

pytestmark = pytest.mark.kernel


def shape(ctype: Any) -> object:
    """A comparable description of a ctypes type, down to every scalar."""
    if issubclass(ctype, ctypes.Structure):
        # no alignment: bcc declares its structs packed and spells padding out
        # as fields, so any padding shows up as an extra field name here
        return (
            "struct",
            ctypes.sizeof(ctype),
            tuple(
                (name, getattr(ctype, name).offset, shape(field_type))
                for name, field_type, *_ in ctype._fields_
            ),
        )
    if issubclass(ctype, ctypes.Array):
        return ("array", ctype._length_, shape(ctype._type_))
    # scalars: ctypes' type code says size and signedness ("I" = unsigned int)
    return ("scalar", ctypes.sizeof(ctype), ctype._type_)


def bcc_types(program: Program, name: str) -> tuple[Any, Any]:
    table = program.loaded.table(name)
    # per-CPU tables expose the per-CPU array as Leaf and one CPU's value as sLeaf
    return table.Key, getattr(table, "sLeaf", table.Leaf)


@pytest.mark.parametrize("name", sorted(layout.MAP_MIRRORS))
def test_mirror_matches_bcc(program: Program, name: str) -> None:
    key_mirror, value_mirror = layout.MAP_MIRRORS[name]
    key_bcc, value_bcc = bcc_types(program, name)

    assert ctypes.sizeof(key_mirror) == ctypes.sizeof(key_bcc), f"{name} key size"
    assert ctypes.sizeof(value_mirror) == ctypes.sizeof(value_bcc), f"{name} value size"
    assert shape(key_mirror) == shape(key_bcc), f"{name} key layout"
    assert shape(value_mirror) == shape(value_bcc), f"{name} value layout"


def test_every_map_in_the_header_has_a_mirror() -> None:
    pinned = re.compile(r"^BPF_TABLE_PINNED\(\"\w+\",[^,]+,[^,]+,\s*(\w+),", re.M)
    assert set(pinned.findall(layout.header_text())) == set(layout.MAP_MIRRORS)


# bcc's spelling of the event's field types -> ctypes
BCC_FIELD_TYPES = {"__u8": ctypes.c_uint8, "__u32": ctypes.c_uint32, "__u64": ctypes.c_uint64}


def test_ring_buffer_event_matches_bcc(program: Program) -> None:
    """bcc records the fields of the struct the program reserves in the ring
    buffer ("name#type"); rebuild it in ctypes and compare with the mirror."""
    from bcc import lib  # the system bcc, present when the program loaded

    module, name = program.loaded.bpf.module, program.loaded.table("events")._name
    fields = []
    for index in range(lib.bpf_perf_event_fields(module, name)):
        spec = lib.bpf_perf_event_field(module, name, index).decode()
        match = re.fullmatch(r"(\w+)#(\w+)(?:\[(\d+)\])?", spec)
        assert match is not None, spec
        field_name, type_name, length = match.groups()
        field_type = BCC_FIELD_TYPES[type_name]
        fields.append((field_name, field_type * int(length) if length else field_type))
    assert fields, "bcc recorded no event struct for the ring buffer"
    bcc_event = type("BccRateEvent", (ctypes.Structure,), {"_fields_": fields})

    assert ctypes.sizeof(layout.RateEvent) == ctypes.sizeof(bcc_event)
    assert shape(layout.RateEvent) == shape(bcc_event)


def test_reason_codes_are_dense_and_fill_the_counters_map(program: Program) -> None:
    codes = layout.reasons()
    assert set(codes) == {"pass", "allow", "drop_ban", "drop_rate", "malformed", "non_ip"}
    assert sorted(codes.values()) == list(range(len(codes)))
    # REASON_MAX sizes each interface slot of the counters map: one counter per
    # reason, none missing, in each of IF_SLOTS slots
    assert layout.reason_max() == len(codes)
    assert len(program.loaded.table("counters")) == layout.if_slots() * len(codes)
    assert layout.counters_size() == len(program.loaded.table("counters"))
    slots = layout.if_slots()
    assert slots > 0 and slots & (slots - 1) == 0, "IF_SLOTS must be a power of two"
    assert layout.reason_names() == sorted(codes, key=codes.__getitem__)
