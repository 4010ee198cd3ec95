"""Counting per interface: a frame is counted in slot ingress_ifindex % IF_SLOTS.

BPF_PROG_TEST_RUN takes the ingress interface from an xdp_md passed as
ctx_in (it must exist in the caller's namespace), so frames "received" on
loopback and on the host's other interfaces land in their own slots, while
the per-reason totals stay the sum over the slots.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from xdp_harness import XDP_DROP, XDP_PASS, Xdp

from stockade.controller import ifslots, layout
from stockade.controller.maps import Hits
from stockade.lab.packets import arp, udp4

pytestmark = pytest.mark.kernel

BANNED = "198.18.0.77"


def two_interfaces_in_two_slots() -> tuple[int, int]:
    """Loopback (ifindex 1) and another interface of this namespace in another slot."""
    others = [i for i, _ in socket.if_nameindex() if layout.if_slot(i) != layout.if_slot(1)]
    if not others:
        pytest.skip("this namespace has no interface besides loopback in another slot")
    return 1, others[0]


def test_frames_land_in_the_slot_of_their_ingress_interface(xdp: Xdp) -> None:
    lo, other = two_interfaces_in_two_slots()
    xdp.maps.put_ban(ipaddress.ip_network(BANNED), 0)
    passed, banned, non_ip = udp4("198.18.0.10"), udp4(BANNED), arp()

    assert xdp.run(passed, ingress_ifindex=lo) == XDP_PASS
    assert xdp.run(banned, ingress_ifindex=lo) == XDP_DROP
    for _ in range(3):
        assert xdp.run(banned, ingress_ifindex=other) == XDP_DROP
    assert xdp.run(non_ip, ingress_ifindex=other) == XDP_PASS
    assert xdp.run(passed) == XDP_PASS  # no ctx_in: the kernel says loopback

    codes = layout.reasons()
    lo_slot, other_slot = layout.if_slot(lo), layout.if_slot(other)
    assert xdp.counter_at(lo_slot, codes["pass"]) == Hits(2, 2 * len(passed))
    assert xdp.counter_at(lo_slot, codes["drop_ban"]) == Hits(1, len(banned))
    assert xdp.counter_at(other_slot, codes["drop_ban"]) == Hits(3, 3 * len(banned))
    assert xdp.counter_at(other_slot, codes["non_ip"]) == Hits(1, len(non_ip))
    assert xdp.counter_at(other_slot, codes["pass"]) == Hits()
    # nothing anywhere else
    assert set(xdp.slot_counters()) == {lo_slot, other_slot}

    # the totals by reason are the sums over the slots
    totals = xdp.counters()
    assert totals["drop_ban"] == Hits(4, 4 * len(banned))
    assert totals["pass"] == Hits(2, 2 * len(passed))
    assert totals["non_ip"] == Hits(1, len(non_ip))

    # and the controller labels them by interface name
    names = {lo: socket.if_indextoname(lo), other: socket.if_indextoname(other)}
    labels = ifslots.slot_labels({name: index for index, name in names.items()})
    by_name = ifslots.by_interface(xdp.slot_counters(), labels)
    assert by_name[names[other]]["drop_ban"] == Hits(3, 3 * len(banned))
    assert by_name[names[lo]]["drop_ban"] == Hits(1, len(banned))
    assert by_name[ifslots.OTHER] == {name: Hits() for name in codes}
