"""Which configured interface each slot of the XDP counters map counts for.

The program counts a packet in slot `ingress_ifindex % IF_SLOTS`
(bpf/stockade.h), an array index instead of a per-packet hash lookup. Here
the controller maps each configured interface's ifindex to its slot. Two
interfaces whose ifindexes share a slot share its counters: they are
reported together under one label, their names joined by "+" (e.g.
"eth0+eth1"), and a warning says so. Counts in a slot of no configured
interface (one removed from the config, or not resolvable) are reported as
"other".
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from stockade.controller import layout
from stockade.controller.maps import Hits, by_reason

log = logging.getLogger("stockade.controller")

OTHER = "other"


def group_by_slot(ifindexes: Mapping[str, int]) -> dict[int, list[str]]:
    """Slot -> the interfaces counted in it (sorted by name)."""
    slots: dict[int, list[str]] = {}
    for name, ifindex in ifindexes.items():
        slots.setdefault(layout.if_slot(ifindex), []).append(name)
    return {slot: sorted(names) for slot, names in slots.items()}


def slot_labels(ifindexes: Mapping[str, int]) -> dict[int, str]:
    """Slot -> the `interface` label of its counters: a name, or names joined by "+"."""
    return {slot: "+".join(names) for slot, names in group_by_slot(ifindexes).items()}


def by_interface(
    slots: Mapping[int, dict[str, Hits]], labels: Mapping[int, str]
) -> dict[str, dict[str, Hits]]:
    """Counters by interface label, then reason, every reason and label there.

    OTHER (the slots of no configured interface) is always there, zeros
    included, so the series exist even before the first interface is set.
    """
    out = {
        label: by_reason({slot: slots[slot]} if slot in slots else {})
        for slot, label in labels.items()
    }
    out[OTHER] = by_reason({slot: row for slot, row in slots.items() if slot not in labels})
    return out


def stats_rows(counters: Mapping[str, dict[str, Hits]]) -> dict[str, dict[str, Any]]:
    """The `by_interface` field of `stockade stats --json`: each like the totals."""
    return {
        label: {
            "reasons": {name: {"packets": h.packets, "bytes": h.bytes} for name, h in row.items()},
            "total_packets": sum(h.packets for h in row.values()),
        }
        for label, row in sorted(counters.items())
    }


class InterfaceSlots:
    """Resolves the configured interfaces to slots, warning once per new collision.

    Resolved on every call (cheap: one ioctl per name), so an interface that
    was recreated with another ifindex is followed.
    """

    def __init__(self, resolve: Callable[[str], int] = socket.if_nametoindex) -> None:
        self._resolve = resolve
        self._warned: frozenset[tuple[str, ...]] = frozenset()

    def labels(self, names: Iterable[str]) -> dict[int, str]:
        ifindexes: dict[str, int] = {}
        for name in names:
            try:
                ifindexes[name] = self._resolve(name)
            except OSError:
                continue  # not there (now): its slot, if it counted, shows as "other"
        grouped = group_by_slot(ifindexes)
        shared = frozenset(tuple(names) for names in grouped.values() if len(names) > 1)
        for names in sorted(shared - self._warned):
            slot = layout.if_slot(ifindexes[names[0]])
            log.warning(
                "interfaces %s share XDP counters slot %d (ifindex %% %d): their packet and "
                "byte counters are merged, labelled interface=%r",
                ", ".join(f"{n} (ifindex {ifindexes[n]})" for n in names),
                slot,
                layout.if_slots(),
                "+".join(names),
            )
        self._warned = shared
        return {slot: "+".join(names) for slot, names in grouped.items()}
