"""The per-source SYN token bucket and its ring-buffer breach events.

Time is never waited for: a refill is made by rewriting the source's bucket
in `syn_buckets` with an older `last_ns` (bpf_ktime_get_ns is CLOCK_MONOTONIC,
the clock of time.monotonic_ns()), and a second report by an older
`last_report_ns`. Rates are low (a few SYNs per second), so the time the test
itself takes refills well under one token.
"""

from __future__ import annotations

import ipaddress
import time

import pytest
from xdp_harness import XDP_DROP, XDP_PASS, Xdp, rate_key

from stockade.controller import layout
from stockade.controller.maps import Hits, RuntimeSettings
from stockade.lab.packets import TCP_ACK, TCP_SYN, tcp4, tcp6

pytestmark = pytest.mark.kernel

PASS, DROP = XDP_PASS, XDP_DROP
SEC = layout.NS_PER_SEC
TCP_FIN, TCP_RST = 0x01, 0x04

V4, V4_OTHER = "198.18.0.7", "198.18.0.8"
V6 = "fd00:18::7"


def syn(source: str, flags: int = TCP_SYN) -> bytes:
    if ipaddress.ip_address(source).version == 4:
        return tcp4(source, flags=flags)
    return tcp6(source, flags=flags)


def syns(xdp: Xdp, source: str, count: int) -> list[int]:
    return xdp.run_many([syn(source)] * count)


def age_bucket(
    xdp: Xdp, source: str, seconds: float, v6_rate_prefix: int = 64, **fields: int
) -> None:
    """Pretend the source's last refill was `seconds` ago (and set `fields`)."""
    bucket = xdp.bucket(source, v6_rate_prefix)
    assert bucket is not None, f"no SYN bucket for {source}"
    # never below 0: CLOCK_MONOTONIC starts near boot, and a wrapped value is "in the future"
    bucket.last_ns = max(0, time.monotonic_ns() - int(seconds * SEC))
    for name, value in fields.items():
        setattr(bucket, name, value)
    xdp.set_bucket(source, bucket, v6_rate_prefix)


@pytest.mark.parametrize("source", [V4, V6])
def test_burst_passes_then_excess_drops(xdp: Xdp, source: str) -> None:
    xdp.maps.apply_settings(RuntimeSettings(syn_rate=2, syn_burst=5))

    assert syns(xdp, source, 6) == [PASS] * 5 + [DROP]

    counters = xdp.counters()
    assert counters["pass"].packets == 5
    assert counters["drop_rate"] == Hits(1, len(syn(source)))
    bucket = xdp.bucket(source)
    assert bucket is not None and bucket.dropped == 1


@pytest.mark.parametrize("source", [V4, V6])
def test_only_syn_without_ack_is_limited(xdp: Xdp, source: str) -> None:
    xdp.maps.apply_settings(RuntimeSettings(syn_rate=1, syn_burst=2))
    others = [syn(source, flags) for flags in (TCP_ACK, TCP_SYN | TCP_ACK, TCP_FIN, TCP_RST)]

    assert xdp.run_many(others * 5) == [PASS] * 20
    assert xdp.bucket(source) is None, "non-SYN segments must not touch the bucket"
    assert syns(xdp, source, 3) == [PASS, PASS, DROP]
    # with the bucket empty, everything but a SYN still passes
    assert xdp.run_many(others) == [PASS] * 4
    assert xdp.counters()["drop_rate"].packets == 1


def test_each_source_has_its_own_bucket(xdp: Xdp) -> None:
    xdp.maps.apply_settings(RuntimeSettings(syn_rate=1, syn_burst=2))

    assert syns(xdp, V4, 3) == [PASS, PASS, DROP]
    assert syns(xdp, V4_OTHER, 3) == [PASS, PASS, DROP]
    assert syns(xdp, V6, 3) == [PASS, PASS, DROP]
    assert syns(xdp, V4, 1) == [DROP]


def test_refill_after_a_second_up_to_the_rate(xdp: Xdp) -> None:
    xdp.maps.apply_settings(RuntimeSettings(syn_rate=4, syn_burst=4))
    assert syns(xdp, V4, 5) == [PASS] * 4 + [DROP]

    age_bucket(xdp, V4, 1.0)

    assert syns(xdp, V4, 5) == [PASS] * 4 + [DROP]


def test_refill_is_proportional_to_time(xdp: Xdp) -> None:
    xdp.maps.apply_settings(RuntimeSettings(syn_rate=4, syn_burst=4))
    assert syns(xdp, V4, 5) == [PASS] * 4 + [DROP]

    age_bucket(xdp, V4, 0.5, tokens_nano=0)  # half a second at 4/s: two tokens

    assert syns(xdp, V4, 3) == [PASS, PASS, DROP]


def test_refill_never_exceeds_the_burst(xdp: Xdp) -> None:
    xdp.maps.apply_settings(RuntimeSettings(syn_rate=4, syn_burst=6))
    assert syns(xdp, V4, 7) == [PASS] * 6 + [DROP]

    age_bucket(xdp, V4, 3600.0)

    assert syns(xdp, V4, 7) == [PASS] * 6 + [DROP]


def test_v6_sources_in_one_prefix_share_a_bucket(xdp: Xdp) -> None:
    xdp.maps.apply_settings(RuntimeSettings(syn_rate=1, syn_burst=3, v6_rate_prefix=64))
    same_64 = ["fd00:18::1", "fd00:18::2", "fd00:18::ffff:1", "fd00:18::3"]

    verdicts = [xdp.run(syn(source)) for source in same_64]

    assert verdicts == [PASS, PASS, PASS, DROP]
    assert syns(xdp, "fd00:18:0:1::1", 1) == [PASS]  # the next /64 has its own
    keys = {bytes(key) for key in xdp.table("syn_buckets")}
    assert keys == {bytes(rate_key("fd00:18::1", 64)), bytes(rate_key("fd00:18:0:1::1", 64))}


def test_v6_rate_prefix_changes_without_reload(xdp: Xdp) -> None:
    maps = xdp.maps
    maps.apply_settings(RuntimeSettings(syn_rate=1, syn_burst=1, v6_rate_prefix=64))
    assert [xdp.run(syn(s)) for s in ("fd00:18::1", "fd00:18::2")] == [PASS, DROP]

    # /128: every address is its own source
    maps.apply_settings(RuntimeSettings(syn_rate=1, syn_burst=1, v6_rate_prefix=128))
    assert [xdp.run(syn(s)) for s in ("fd00:18::2", "fd00:18::3", "fd00:18::3")] == [
        PASS,
        PASS,
        DROP,
    ]
    assert xdp.bucket("fd00:18::3", 128) is not None

    # /48: different /64s of one /48 share (a fresh /48, so no /64 bucket aliases it)
    maps.apply_settings(RuntimeSettings(syn_rate=1, syn_burst=1, v6_rate_prefix=48))
    assert [xdp.run(syn(s)) for s in ("fd00:19:0:1::1", "fd00:19:0:2::1")] == [PASS, DROP]

    # /60 is not a whole number of bytes: fd00:1a:0:0::/60 holds ...:0: to ...:f:
    maps.apply_settings(RuntimeSettings(syn_rate=1, syn_burst=1, v6_rate_prefix=60))
    sources = ("fd00:1a:0:a::1", "fd00:1a:0:f::1", "fd00:1a:0:10::1")
    assert [xdp.run(syn(s)) for s in sources] == [PASS, DROP, PASS]
    assert xdp.bucket("fd00:1a::", 60) is not None
    assert xdp.bucket("fd00:1a:0:10::", 60) is not None


def test_zero_rate_disables_the_limit(xdp: Xdp) -> None:
    xdp.maps.apply_settings(RuntimeSettings(syn_rate=0, syn_burst=1))
    xdp.exhaust_bucket(V4_OTHER)  # even an empty bucket left from before

    assert syns(xdp, V4, 20) == [PASS] * 20
    assert syns(xdp, V4_OTHER, 3) == [PASS] * 3
    assert xdp.bucket(V4) is None, "a disabled limit must not create buckets"
    assert xdp.counters()["drop_rate"].packets == 0


def test_breach_reports_once_per_second_per_source(xdp: Xdp) -> None:
    xdp.maps.apply_settings(RuntimeSettings(syn_rate=1, syn_burst=1))
    start = time.monotonic_ns()

    assert syns(xdp, V4, 11) == [PASS] + [DROP] * 10
    events = xdp.events()

    assert len(events) == 1, "many breaches within a second: one event"
    event = events[0]
    assert event.type == layout.EVENT_SYN_RATE
    assert event.family == layout.AF_INET
    assert bytes(event.addr) == ipaddress.ip_address(V4).packed + bytes(12)
    assert event.dropped == 1  # reported at the first breach
    assert start <= event.ts_ns <= time.monotonic_ns()
    bucket = xdp.bucket(V4)
    assert bucket is not None
    assert (bucket.dropped, bucket.last_report_ns) == (10, event.ts_ns)

    # another source breaching in the same second gets its own event
    assert syns(xdp, V4_OTHER, 3) == [PASS, DROP, DROP]
    assert [bytes(e.addr[:4]) for e in xdp.events()] == [ipaddress.ip_address(V4_OTHER).packed]

    # a second after the last report, the next breach reports again
    age_bucket(xdp, V4, 0.0, last_report_ns=time.monotonic_ns() - 1_100_000_000)
    assert syns(xdp, V4, 3) == [DROP] * 3
    events = xdp.events()
    assert len(events) == 1
    assert events[0].dropped == 11
    assert xdp.events_lost() == 0


def test_v6_breach_event_names_the_prefix(xdp: Xdp) -> None:
    xdp.maps.apply_settings(RuntimeSettings(syn_rate=1, syn_burst=1, v6_rate_prefix=64))

    assert syns(xdp, V6, 3) == [PASS, DROP, DROP]

    events = xdp.events()
    assert len(events) == 1
    assert events[0].family == layout.AF_INET6
    assert bytes(events[0].addr) == ipaddress.ip_address("fd00:18::").packed
    assert events[0].dropped == 1
