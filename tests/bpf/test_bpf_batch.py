"""Many bans at once in the real maps (BPF_MAP_UPDATE_BATCH / DELETE_BATCH), checked
with BPF_PROG_TEST_RUN: all of them or none, hit counters kept, trie counts right.
"""

from __future__ import annotations

import errno
import ipaddress
from typing import Any

import pytest
from xdp_harness import MAP_SIZE, XDP_DROP, XDP_PASS, Xdp

from stockade.controller import libbpf
from stockade.controller import maps as maps_module
from stockade.controller.maps import MapFullError
from stockade.lab.packets import tcp4, tcp6
from stockade.targets import Network, parse_target

pytestmark = pytest.mark.kernel

NEVER = 0  # expires_ns of a permanent ban


def exact_v4(count: int, base: str = "198.18.0.0") -> list[Network]:
    start = int(ipaddress.IPv4Address(base))
    return [ipaddress.IPv4Network((start + i, 32)) for i in range(count)]


def prefixes(count: int) -> list[Network]:
    return [parse_target(f"198.19.{i}.0/24") for i in range(count)] + [
        parse_target(f"fd00:19:{i:x}::/48") for i in range(count)
    ]


def frame(net: Network) -> bytes:
    address = str(net.network_address)
    return tcp4(address) if net.version == 4 else tcp6(address)


def trie_counts(xdp: Xdp) -> tuple[int, int]:
    config = xdp.config()
    return int(config.ban_prefix_v4_count), int(config.ban_prefix_v6_count)


@pytest.fixture
def batch_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the BPF_MAP_UPDATE_BATCH calls made (they still reach the kernel)."""
    calls: list[int] = []
    real = libbpf.map_update_batch

    def counted(fd: int, keys: Any, values: Any) -> None:
        calls.append(len(keys))
        real(fd, keys, values)

    monkeypatch.setattr(libbpf, "map_update_batch", counted)
    return calls


def test_a_batch_drops_every_target_it_bans(xdp: Xdp, batch_calls: list[int]) -> None:
    exact = exact_v4(3000)
    broad = prefixes(100)
    undo = xdp.maps.put_bans([(net, NEVER) for net in exact + broad])
    assert undo == [(net, None) for net in exact + broad]  # all of them were new
    # one system call per map here (the kernel has batch operations for both kinds)
    assert sorted(batch_calls) == [100, 100, 3000]
    assert xdp.entries("ban_v4") == 3000 and trie_counts(xdp) == (100, 100)
    for net in [*exact[::97], exact[-1], *broad[::7]]:
        assert xdp.run(frame(net)) == XDP_DROP, net
    assert xdp.run(tcp4("198.18.200.1")) == XDP_PASS
    assert xdp.run(tcp6("fd00:18::1")) == XDP_PASS


def test_a_batch_keeps_hit_counters_of_bans_it_updates(xdp: Xdp) -> None:
    (net,) = exact_v4(1)
    xdp.maps.put_ban(net, NEVER)
    for _ in range(3):
        assert xdp.run(frame(net)) == XDP_DROP
    before = xdp.maps.bans()[net].hits
    assert before.packets == 3
    undo = xdp.maps.put_bans([(net, 10**18), *[(n, NEVER) for n in exact_v4(10, "198.18.1.0")]])
    assert undo[0][0] == net and undo[0][1] is not None
    assert xdp.maps.bans()[net].hits == before
    assert xdp.maps.bans()[net].expires_ns == 10**18


def test_a_batch_that_does_not_fit_changes_nothing(xdp: Xdp) -> None:
    xdp.maps.put_bans([(net, NEVER) for net in exact_v4(MAP_SIZE - 10)])
    old_prefixes = prefixes(3)
    xdp.maps.put_bans([(net, NEVER) for net in old_prefixes])
    before = xdp.maps.bans()
    counts = trie_counts(xdp)
    # new prefixes (fit) and 11 exact more than ban_v4 has room for
    too_many = [(net, NEVER) for net in prefixes(20)[3:20] + exact_v4(11, "198.18.100.0")]
    with pytest.raises(MapFullError, match="ban_v4 is full"):
        xdp.maps.put_bans(too_many)
    assert xdp.maps.bans() == before
    assert trie_counts(xdp) == counts
    assert xdp.run(tcp4("198.18.100.0")) == XDP_PASS  # none of the refused batch drops
    assert xdp.run(tcp4("198.19.10.1")) == XDP_PASS
    assert xdp.run(frame(old_prefixes[0])) == XDP_DROP  # what was there still does


def test_delete_and_restore_many(xdp: Xdp) -> None:
    nets = exact_v4(500) + prefixes(50)
    xdp.maps.put_bans([(net, NEVER) for net in nets])
    gone = parse_target("198.18.222.1")  # never banned: skipped
    undo = xdp.maps.delete_bans([*nets[:400], *nets[500:], gone])
    assert len(undo) == 500 and gone not in dict(undo)
    assert xdp.entries("ban_v4") == 100 and trie_counts(xdp) == (0, 0)
    assert xdp.run(frame(nets[0])) == XDP_PASS
    assert xdp.run(frame(nets[450])) == XDP_DROP
    xdp.maps.restore_bans(undo)
    assert set(xdp.maps.bans()) == set(nets)
    assert trie_counts(xdp) == (50, 50)
    assert xdp.run(frame(nets[0])) == XDP_DROP


def test_batches_larger_than_one_system_call(
    xdp: Xdp, batch_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maps_module, "BATCH_CHUNK", 1000)
    nets = exact_v4(3500)
    xdp.maps.put_bans([(net, NEVER) for net in nets])
    assert batch_calls == [1000, 1000, 1000, 500]
    assert all(xdp.run(frame(net)) == XDP_DROP for net in [*nets[::250], nets[-1]])


def test_a_later_chunk_that_fails_undoes_the_earlier_ones(
    xdp: Xdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maps_module, "BATCH_CHUNK", 1000)
    xdp.maps.put_bans([(net, NEVER) for net in exact_v4(MAP_SIZE - 2500)])
    before = xdp.maps.bans()
    with pytest.raises(MapFullError):  # the third chunk finds the map full
        xdp.maps.put_bans([(net, NEVER) for net in exact_v4(3000, "198.18.100.0")])
    assert xdp.maps.bans() == before
    assert xdp.run(tcp4("198.18.100.1")) == XDP_PASS


def test_without_batch_support_every_entry_is_written_one_by_one(
    xdp: Xdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, keys: Any, values: Any) -> None:
        raise libbpf.BatchError(errno.EINVAL, "BPF_MAP_UPDATE_BATCH: Invalid argument", 0)

    monkeypatch.setattr(libbpf, "map_update_batch", unsupported)
    nets = exact_v4(300) + prefixes(20)
    xdp.maps.put_bans([(net, NEVER) for net in nets])
    assert set(xdp.maps.bans()) == set(nets) and trie_counts(xdp) == (20, 20)
    assert all(xdp.run(frame(net)) == XDP_DROP for net in nets[::13])


def test_a_mapped_ipv4_target_drops_ipv4_packets(xdp: Xdp) -> None:
    net = parse_target("::ffff:198.18.0.11")
    assert net == parse_target("198.18.0.11")
    xdp.maps.put_bans([(net, NEVER)])
    assert xdp.run(tcp4("198.18.0.11")) == XDP_DROP
    assert xdp.run(tcp4("198.18.0.12")) == XDP_PASS
