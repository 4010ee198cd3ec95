"""Interface -> counters slot: labels, collisions and the metrics they give."""

from __future__ import annotations

import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stockade.controller import ifslots, layout, metrics
from stockade.controller.maps import DryRunMaps, Hits, by_reason

SLOTS = layout.if_slots()


def row(**hits: Hits) -> dict[str, Hits]:
    return {name: hits.get(name, Hits()) for name in layout.reasons()}


def test_slot_is_the_ifindex_modulo_if_slots() -> None:
    assert layout.if_slot(3) == 3
    assert layout.if_slot(3 + SLOTS) == 3
    assert layout.counter_index(2, 1) == 2 * layout.reason_max() + 1
    assert layout.counters_size() == SLOTS * layout.reason_max()


def test_interfaces_sharing_a_slot_are_one_label() -> None:
    labels = ifslots.slot_labels({"eth1": 2 + SLOTS, "eth0": 2, "lab-gw": 5})
    assert labels == {2: "eth0+eth1", 5: "lab-gw"}


def test_counters_by_interface_and_other() -> None:
    slots = {
        2: row(drop_ban=Hits(3, 300)),
        5: row(**{"pass": Hits(1, 60)}),
        9: row(allow=Hits(2, 2)),
    }
    found = ifslots.by_interface(slots, {2: "eth0+eth1", 5: "lab-gw", 7: "idle"})
    assert found["eth0+eth1"]["drop_ban"] == Hits(3, 300)
    assert found["lab-gw"]["pass"] == Hits(1, 60)
    assert found["idle"] == row()  # configured, nothing seen: zeros
    assert found[ifslots.OTHER]["allow"] == Hits(2, 2)  # slot 9 is nobody's
    # the totals are the sums over the interfaces
    assert by_reason(slots) == {
        name: Hits(
            sum(r[name].packets for r in found.values()), sum(r[name].bytes for r in found.values())
        )
        for name in layout.reasons()
    }


def test_other_is_there_with_no_interface() -> None:
    assert ifslots.by_interface({}, {}) == {ifslots.OTHER: row()}
    maps = DryRunMaps()
    assert maps.counters() == row() and maps.counter_slots() == {}


def test_a_collision_is_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    table = {"eth0": 2, "eth1": 2 + SLOTS, "lab-gw": 5}

    def resolve(name: str) -> int:
        if name not in table:
            raise OSError(19, "No such device")
        return table[name]

    slots = ifslots.InterfaceSlots(resolve)
    with caplog.at_level(logging.WARNING, logger="stockade.controller"):
        assert slots.labels(["eth0", "eth1", "lab-gw", "gone0"]) == {2: "eth0+eth1", 5: "lab-gw"}
        assert slots.labels(["eth0", "eth1", "lab-gw"]) == {2: "eth0+eth1", 5: "lab-gw"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert (
        f"eth0 (ifindex 2), eth1 (ifindex {2 + SLOTS})" in warnings[0]
        and "'eth0+eth1'" in warnings[0]
    )


def test_metrics_carry_the_interface_label() -> None:
    counters = ifslots.by_interface({2: row(drop_ban=Hits(3, 300))}, {2: "eth0+eth1"})
    snapshot = metrics.Snapshot(counters, {}, 0, {}, 0, 0, False)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render(lambda: snapshot).decode())
        for s in family.samples
    }
    key = (("interface", "eth0+eth1"), ("reason", "drop_ban"), ("verdict", "drop"))
    assert samples[("stockade_xdp_packets_total", key)] == 3
    assert samples[("stockade_xdp_bytes_total", key)] == 300
    other = (("interface", "other"), ("reason", "pass"), ("verdict", "pass"))
    assert samples[("stockade_xdp_packets_total", other)] == 0
