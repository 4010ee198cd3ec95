"""Verdict tables: crafted frames through BPF_PROG_TEST_RUN (STYLE point 13).

Each case is (id, description, frame, map setup, expected verdict, expected
reason, expected ban/allow entry hit). A case passes when the program returns
the verdict, exactly one counter slot -- the one at the reason's code parsed
from the header -- grows by one packet and the frame's length, and only the
named ban or allow entry (if any) records the hit.

Most parse cases put a ban or an empty SYN bucket on the source, so a frame
that is parsed wrongly (source read from the wrong offset, TCP header not
found after options or extension headers) gets a different verdict.
"""

# The tables keep one case per line, so lines run long there.
# ruff: noqa: E501

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from xdp_harness import XDP_DROP, XDP_PASS, Xdp

from stockade.controller import layout
from stockade.controller.libbpf import LibbpfError, prog_test_run
from stockade.controller.maps import Hits, RuntimeSettings
from stockade.lab.packets import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ROUTING,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_SYN,
    ah_header,
    arp,
    ethernet,
    ext_header,
    fragment_header,
    ipv4,
    ipv6,
    ipv6_ext,
    tcp,
    tcp4,
    tcp6,
    udp,
    udp4,
    udp6,
)
from stockade.targets import parse_target

pytestmark = pytest.mark.kernel

PASS, DROP = XDP_PASS, XDP_DROP

V4 = "198.18.0.7"  # the source under test
V6 = "fd00:18::7"

# Ban expiry, resolved against CLOCK_MONOTONIC when the case runs.
PERMANENT = "permanent"  # expires_ns = 0
ACTIVE = "active"  # an hour from now
EXPIRED = "expired"  # a second ago

# Rate limiting is on in every case; a source only meets it when the setup
# empties its bucket (`exhausted`), so the verdict shows whether the program
# found the TCP flags.
RATE_ON = RuntimeSettings(syn_rate=1, syn_burst=4)
MONITOR = RuntimeSettings(syn_rate=1, syn_burst=4, monitor=True)


@dataclass(frozen=True)
class Setup:
    bans: tuple[tuple[str, str], ...] = ()  # (target, PERMANENT | ACTIVE | EXPIRED)
    allows: tuple[str, ...] = ()
    exhausted: tuple[str, ...] = ()  # sources whose SYN bucket is empty
    settings: RuntimeSettings = field(default=RATE_ON)


NONE = Setup()
BANNED_V4 = Setup(bans=((V4, PERMANENT),))
BANNED_V6 = Setup(bans=((V6, PERMANENT),))
EXHAUSTED_V4 = Setup(exhausted=(V4,))
EXHAUSTED_V6 = Setup(exhausted=(V6,))


@dataclass(frozen=True)
class Case:
    id: str
    description: str
    frame: bytes
    setup: Setup
    verdict: int
    reason: str  # a name from layout.reasons()
    hit: str | None = None  # the one ban (or allow, for "allow") entry that counts the frame


def v4(payload: bytes = b"", vlans: tuple[int, ...] = (), **ip: int) -> bytes:
    """An IPv4 frame from V4 carrying `payload` (a TCP SYN when empty)."""
    return ethernet(ETH_P_IP, ipv4(V4, payload=payload or tcp(), **ip), vlans)


def v6_ext(*headers: int, last: int = IPPROTO_TCP, payload: bytes | None = None) -> bytes:
    """An IPv6 frame from V6 with the given extension headers (then a TCP SYN)."""
    return ethernet(ETH_P_IPV6, ipv6_ext(V6, headers, last, payload))


HBH, RT, DST, AH, FRAG = (
    IPPROTO_HOPOPTS,
    IPPROTO_ROUTING,
    IPPROTO_DSTOPTS,
    IPPROTO_AH,
    IPPROTO_FRAGMENT,
)
MF = 0x2000  # IPv4 more-fragments bit
DF = 0x4000  # IPv4 don't-fragment bit: not a fragment

# fmt: off
PARSE_CASES = [
    # -- Ethernet and VLAN tags ------------------------------------------------
    Case("eth-plain", "plain Ethernet, unbanned SYN", tcp4(V4), NONE, PASS, "pass"),
    Case("eth-plain-banned", "plain Ethernet, banned source", tcp4(V4), BANNED_V4, DROP, "drop_ban", V4),
    Case("vlan-1-banned", "one 802.1Q tag, banned source", v4(vlans=(ETH_P_8021Q,)), BANNED_V4, DROP, "drop_ban", V4),
    Case("vlan-1-syn-over-rate", "one 802.1Q tag, SYN over the rate", v4(vlans=(ETH_P_8021Q,)), EXHAUSTED_V4, DROP, "drop_rate"),
    Case("vlan-1-ad-banned", "one 802.1ad tag, banned source", v4(vlans=(ETH_P_8021AD,)), BANNED_V4, DROP, "drop_ban", V4),
    Case("vlan-2-banned", "802.1ad + 802.1Q, banned source", v4(vlans=(ETH_P_8021AD, ETH_P_8021Q)), BANNED_V4, DROP, "drop_ban", V4),
    Case("vlan-2-syn-over-rate", "802.1ad + 802.1Q, SYN over the rate", v4(vlans=(ETH_P_8021AD, ETH_P_8021Q)), EXHAUSTED_V4, DROP, "drop_rate"),
    Case("vlan-2-v6-banned", "802.1ad + 802.1Q, IPv6 banned source", ethernet(ETH_P_IPV6, ipv6(V6, payload=tcp()), (ETH_P_8021AD, ETH_P_8021Q)), BANNED_V6, DROP, "drop_ban", V6),
    Case("vlan-3-malformed", "three tags are malformed, even from a banned source", v4(vlans=(ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q)), BANNED_V4, PASS, "malformed"),
    Case("vlan-tag-truncated", "802.1Q tag cut after its TCI", ethernet(ETH_P_IP, b"", (ETH_P_8021Q,))[:16], NONE, PASS, "malformed"),
    Case("vlan-tag-missing", "Ethernet header says 802.1Q, frame ends", ethernet(ETH_P_8021Q, b""), NONE, PASS, "malformed"),
    Case("eth-only-ipv4", "Ethernet header says IPv4, frame ends", ethernet(ETH_P_IP, b""), NONE, PASS, "malformed"),
    Case("eth-only-ipv6", "Ethernet header says IPv6, frame ends", ethernet(ETH_P_IPV6, b""), NONE, PASS, "malformed"),
    Case("arp", "ARP is non-IP and passes", arp(), NONE, PASS, "non_ip"),
    Case("arp-banned-host", "ARP passes even when the host's address is banned", arp(), BANNED_V4, PASS, "non_ip"),
    Case("arp-vlan", "ARP behind an 802.1Q tag", ethernet(ETH_P_ARP, arp()[14:], (ETH_P_8021Q,)), NONE, PASS, "non_ip"),
    # -- IPv4 ---------------------------------------------------------------
    Case("ipv4-udp", "IPv4 UDP, unbanned", udp4(V4), NONE, PASS, "pass"),
    Case("ipv4-udp-banned", "IPv4 UDP, banned source", udp4(V4), BANNED_V4, DROP, "drop_ban", V4),
    Case("ipv4-syn-over-rate", "IPv4 SYN over the rate", tcp4(V4), EXHAUSTED_V4, DROP, "drop_rate"),
    Case("ipv4-ack-over-rate", "IPv4 ACK is never rate limited", tcp4(V4, flags=TCP_ACK), EXHAUSTED_V4, PASS, "pass"),
    Case("ipv4-synack-over-rate", "IPv4 SYN+ACK is never rate limited", tcp4(V4, flags=TCP_SYN | TCP_ACK), EXHAUSTED_V4, PASS, "pass"),
    *[
        # NOP options: a parser that ignored ihl would read 0x01 bytes as the TCP header
        Case(f"ipv4-ihl-{ihl}-syn-over-rate", f"IPv4 with {ihl * 4 - 20} bytes of options, SYN over the rate", v4(ihl=ihl), EXHAUSTED_V4, DROP, "drop_rate")
        for ihl in range(6, 16)
    ],
    Case("ipv4-ihl-15-banned", "IPv4 with 40 bytes of options, banned source", v4(ihl=15), BANNED_V4, DROP, "drop_ban", V4),
    Case("ipv4-ihl-4", "ihl < 5 is malformed, even from a banned source", v4(ihl=4), BANNED_V4, PASS, "malformed"),
    Case("ipv4-ihl-0", "ihl 0 is malformed", v4(ihl=0), BANNED_V4, PASS, "malformed"),
    Case("ipv4-options-past-end", "ihl 15 but the frame ends inside the options", v4(ihl=15)[: 14 + 40], BANNED_V4, PASS, "malformed"),
    Case("ipv4-tot-len-short", "tot_len 19 < 20-byte header", v4(tot_len=19), BANNED_V4, PASS, "malformed"),
    Case("ipv4-tot-len-below-options", "tot_len 59 < 60-byte header with options", v4(ihl=15, tot_len=59), BANNED_V4, PASS, "malformed"),
    Case("ipv4-tot-len-header-only", "tot_len equal to the header length is whole", v4(tot_len=20), BANNED_V4, DROP, "drop_ban", V4),
    Case("ipv4-version-6", "version nibble 6 in an IPv4 ethertype", v4(version=6), BANNED_V4, PASS, "malformed"),
    Case("ipv4-truncated", "IPv4 header cut at 19 bytes", ethernet(ETH_P_IP, ipv4(V4)[:19]), BANNED_V4, PASS, "malformed"),
    Case("ipv4-frag-mf-banned", "first fragment (MF) from a banned source", v4(frag_off=MF), BANNED_V4, DROP, "drop_ban", V4),
    Case("ipv4-frag-offset-banned", "later fragment (offset) from a banned source", v4(b"\x00" * 8, frag_off=185), BANNED_V4, DROP, "drop_ban", V4),
    Case("ipv4-frag-mf-syn-over-rate", "first fragment holding a SYN is not rate limited", v4(frag_off=MF), EXHAUSTED_V4, PASS, "pass"),
    Case("ipv4-frag-offset-syn-over-rate", "later fragment that looks like a SYN is not rate limited", v4(frag_off=1), EXHAUSTED_V4, PASS, "pass"),
    Case("ipv4-frag-offset-short", "later fragment shorter than a TCP header is not malformed", v4(b"\x00" * 3, frag_off=100), NONE, PASS, "pass"),
    Case("ipv4-df-syn-over-rate", "DF is not a fragment: SYN over the rate", v4(frag_off=DF), EXHAUSTED_V4, DROP, "drop_rate"),
    Case("ipv4-tcp-truncated", "TCP header cut at 10 bytes, unbanned", v4(tcp()[:10]), NONE, PASS, "malformed"),
    Case("ipv4-tcp-truncated-banned", "TCP header cut, banned source: the ban is decided on L3", v4(tcp()[:10]), BANNED_V4, DROP, "drop_ban", V4),
    Case("ipv4-tcp-doff-4", "TCP data offset 4 is malformed", v4(tcp(doff=4)), NONE, PASS, "malformed"),
    Case("ipv4-tcp-options-syn-over-rate", "TCP with options, SYN over the rate", v4(tcp(doff=8)), EXHAUSTED_V4, DROP, "drop_rate"),
    # -- IPv6 ---------------------------------------------------------------
    Case("ipv6-plain", "IPv6 SYN, unbanned", tcp6(V6), NONE, PASS, "pass"),
    Case("ipv6-plain-banned", "IPv6 SYN, banned source", tcp6(V6), BANNED_V6, DROP, "drop_ban", V6),
    Case("ipv6-udp-banned", "IPv6 UDP, banned source", udp6(V6), BANNED_V6, DROP, "drop_ban", V6),
    Case("ipv6-syn-over-rate", "IPv6 SYN over the rate", tcp6(V6), EXHAUSTED_V6, DROP, "drop_rate"),
    Case("ipv6-ack-over-rate", "IPv6 ACK is never rate limited", tcp6(V6, flags=TCP_ACK), EXHAUSTED_V6, PASS, "pass"),
    Case("ipv6-version-4", "version nibble 4 in an IPv6 ethertype", ethernet(ETH_P_IPV6, ipv6(V6, payload=tcp(), version=4)), BANNED_V6, PASS, "malformed"),
    Case("ipv6-truncated", "IPv6 header cut at 39 bytes", ethernet(ETH_P_IPV6, ipv6(V6)[:39]), BANNED_V6, PASS, "malformed"),
    Case("ipv6-hbh-syn-over-rate", "hop-by-hop options, then a SYN over the rate", v6_ext(HBH), EXHAUSTED_V6, DROP, "drop_rate"),
    Case("ipv6-routing-syn-over-rate", "routing header, then a SYN over the rate", v6_ext(RT), EXHAUSTED_V6, DROP, "drop_rate"),
    Case("ipv6-dstopts-syn-over-rate", "destination options, then a SYN over the rate", v6_ext(DST), EXHAUSTED_V6, DROP, "drop_rate"),
    Case("ipv6-ah-syn-over-rate", "AH (length in 4-byte units), then a SYN over the rate", v6_ext(AH), EXHAUSTED_V6, DROP, "drop_rate"),
    Case("ipv6-hbh-long-syn-over-rate", "32-byte hop-by-hop header, then a SYN over the rate", ethernet(ETH_P_IPV6, ipv6(V6, nexthdr=HBH, payload=ext_header(IPPROTO_TCP, 3) + tcp())), EXHAUSTED_V6, DROP, "drop_rate"),
    Case("ipv6-ah-long-syn-over-rate", "40-byte AH, then a SYN over the rate", ethernet(ETH_P_IPV6, ipv6(V6, nexthdr=AH, payload=ah_header(IPPROTO_TCP, 8) + tcp())), EXHAUSTED_V6, DROP, "drop_rate"),
    Case("ipv6-chain-4-syn-over-rate", "HBH, routing, dest-opts, AH, then a SYN over the rate", v6_ext(HBH, RT, DST, AH), EXHAUSTED_V6, DROP, "drop_rate"),
    Case("ipv6-chain-6-syn-over-rate", "six extension headers (the bound), then a SYN over the rate", v6_ext(HBH, DST, RT, AH, AH, DST), EXHAUSTED_V6, DROP, "drop_rate"),
    Case("ipv6-chain-7-syn-over-rate", "seven extension headers: judged by source only, no SYN limit", v6_ext(HBH, DST, RT, AH, AH, AH, DST), EXHAUSTED_V6, PASS, "pass"),
    Case("ipv6-chain-7-banned", "seven extension headers, banned source", v6_ext(HBH, DST, RT, AH, AH, AH, DST), BANNED_V6, DROP, "drop_ban", V6),
    Case("ipv6-chain-udp-over-rate", "extension headers, then UDP", v6_ext(HBH, DST, last=IPPROTO_UDP, payload=udp()), EXHAUSTED_V6, PASS, "pass"),
    Case("ipv6-frag-syn-over-rate", "fragment header: judged by source only, no SYN limit", v6_ext(FRAG), EXHAUSTED_V6, PASS, "pass"),
    Case("ipv6-hbh-frag-syn-over-rate", "HBH then fragment header: no SYN limit", v6_ext(HBH, FRAG), EXHAUSTED_V6, PASS, "pass"),
    Case("ipv6-frag-banned", "fragment header, banned source", v6_ext(FRAG), BANNED_V6, DROP, "drop_ban", V6),
    Case("ipv6-frag-truncated", "fragment header cut at 7 bytes", ethernet(ETH_P_IPV6, ipv6(V6, nexthdr=FRAG, payload=fragment_header(IPPROTO_TCP)[:7])), BANNED_V6, PASS, "malformed"),
    Case("ipv6-ext-truncated-length", "hop-by-hop header cut before its length byte", ethernet(ETH_P_IPV6, ipv6(V6, nexthdr=HBH, payload=b"\x06")), BANNED_V6, PASS, "malformed"),
    Case("ipv6-ext-truncated-body", "hop-by-hop header says 16 bytes, frame has 8", ethernet(ETH_P_IPV6, ipv6(V6, nexthdr=HBH, payload=ext_header(IPPROTO_TCP, 1)[:8])), BANNED_V6, PASS, "malformed"),
    Case("ipv6-ah-truncated", "AH says 24 bytes, frame has 12", ethernet(ETH_P_IPV6, ipv6(V6, nexthdr=AH, payload=ah_header(IPPROTO_TCP)[:12])), BANNED_V6, PASS, "malformed"),
    Case("ipv6-tcp-truncated", "IPv6 TCP header cut, unbanned", ethernet(ETH_P_IPV6, ipv6(V6, payload=tcp()[:12])), NONE, PASS, "malformed"),
    Case("ipv6-tcp-truncated-banned", "IPv6 TCP header cut, banned source", ethernet(ETH_P_IPV6, ipv6(V6, payload=tcp()[:12])), BANNED_V6, DROP, "drop_ban", V6),
    Case("ipv6-ext-tcp-truncated-banned", "HBH then a cut TCP header, banned source", v6_ext(HBH, payload=tcp()[:12]), BANNED_V6, DROP, "drop_ban", V6),
]
# fmt: on

NET4, WIDE4, OTHER4 = "198.18.0.0/24", "198.18.0.0/16", "198.18.1.0/24"
NET6, WIDE6, OTHER6 = "fd00:18::/64", "fd00:18::/48", "fd00:18:0:1::/64"

# fmt: off
POLICY_CASES = [
    # -- allowlist over bans ----------------------------------------------------
    Case("allow-exact-over-ban-v4", "allowed /32 beats an exact ban", tcp4(V4), Setup(bans=((V4, PERMANENT),), allows=(V4,)), PASS, "allow", V4),
    Case("allow-prefix-over-ban-v4", "allowed /24 beats an exact ban", tcp4(V4), Setup(bans=((V4, PERMANENT),), allows=(NET4,)), PASS, "allow", NET4),
    Case("allow-exact-over-prefix-ban-v4", "allowed /32 beats a /24 ban", tcp4(V4), Setup(bans=((NET4, PERMANENT),), allows=(V4,)), PASS, "allow", V4),
    Case("allow-wide-over-narrow-ban-v4", "allowed /16 beats a longer /24 ban", tcp4(V4), Setup(bans=((NET4, PERMANENT),), allows=(WIDE4,)), PASS, "allow", WIDE4),
    Case("allow-longest-prefix-v4", "the longest allow entry counts the hit", tcp4(V4), Setup(allows=(WIDE4, NET4)), PASS, "allow", NET4),
    Case("allow-exact-over-ban-v6", "allowed /128 beats an exact ban", tcp6(V6), Setup(bans=((V6, PERMANENT),), allows=(V6,)), PASS, "allow", V6),
    Case("allow-prefix-over-ban-v6", "allowed /64 beats an exact ban", tcp6(V6), Setup(bans=((V6, PERMANENT),), allows=(NET6,)), PASS, "allow", NET6),
    Case("allow-exact-over-prefix-ban-v6", "allowed /128 beats a /48 ban", tcp6(V6), Setup(bans=((WIDE6, PERMANENT),), allows=(V6,)), PASS, "allow", V6),
    Case("allow-wide-over-narrow-ban-v6", "allowed /48 beats a longer /64 ban", tcp6(V6), Setup(bans=((NET6, PERMANENT),), allows=(WIDE6,)), PASS, "allow", WIDE6),
    Case("allow-other-range-v4", "an allow entry for another /24 does not cover the source", tcp4(V4), Setup(bans=((V4, PERMANENT),), allows=(OTHER4,)), DROP, "drop_ban", V4),
    Case("allow-other-range-v6", "an allow entry for another /64 does not cover the source", tcp6(V6), Setup(bans=((V6, PERMANENT),), allows=(OTHER6,)), DROP, "drop_ban", V6),
    Case("allow-over-rate", "an allowed source is not rate limited", tcp4(V4), Setup(allows=(V4,), exhausted=(V4,)), PASS, "allow", V4),
    Case("allow-tcp-truncated", "an allowed source with a cut TCP header", v4(tcp()[:10]), Setup(allows=(V4,)), PASS, "allow", V4),
    # -- exact and prefix bans ------------------------------------------------
    Case("ban-permanent-v4", "expires_ns 0 is permanent", tcp4(V4), Setup(bans=((V4, PERMANENT),)), DROP, "drop_ban", V4),
    Case("ban-active-v4", "an exact ban that expires in an hour", tcp4(V4), Setup(bans=((V4, ACTIVE),)), DROP, "drop_ban", V4),
    Case("ban-active-v6", "an exact IPv6 ban that expires in an hour", tcp6(V6), Setup(bans=((V6, ACTIVE),)), DROP, "drop_ban", V6),
    Case("ban-other-address-v4", "a ban on 198.18.0.8 does not touch 198.18.0.7", tcp4(V4), Setup(bans=(("198.18.0.8", PERMANENT),)), PASS, "pass"),
    Case("ban-other-address-v6", "a ban on another address in the /64", tcp6(V6), Setup(bans=(("fd00:18::8", PERMANENT),)), PASS, "pass"),
    Case("ban-prefix-v4", "a /24 ban covers the source", tcp4(V4), Setup(bans=((NET4, PERMANENT),)), DROP, "drop_ban", NET4),
    Case("ban-prefix-v6", "a /64 ban covers the source", tcp6(V6), Setup(bans=((NET6, PERMANENT),)), DROP, "drop_ban", NET6),
    Case("ban-prefix-miss-v4", "a /24 ban on another range", tcp4(V4), Setup(bans=((OTHER4, PERMANENT),)), PASS, "pass"),
    Case("ban-prefix-miss-v6", "a /64 ban on another range", tcp6(V6), Setup(bans=((OTHER6, PERMANENT),)), PASS, "pass"),
    Case("ban-longest-prefix-v4", "/16 and /24 bans: the /24 counts the hit", tcp4(V4), Setup(bans=((WIDE4, PERMANENT), (NET4, PERMANENT))), DROP, "drop_ban", NET4),
    Case("ban-longest-prefix-v6", "/48 and /64 bans: the /64 counts the hit", tcp6(V6), Setup(bans=((WIDE6, PERMANENT), (NET6, PERMANENT))), DROP, "drop_ban", NET6),
    Case("ban-longest-prefix-active-v4", "expired /16, active /24: the /24 drops", tcp4(V4), Setup(bans=((WIDE4, EXPIRED), (NET4, ACTIVE))), DROP, "drop_ban", NET4),
    Case("ban-exact-before-prefix-v4", "exact and /24 bans: the exact entry counts the hit", tcp4(V4), Setup(bans=((NET4, PERMANENT), (V4, PERMANENT))), DROP, "drop_ban", V4),
    Case("ban-exact-before-prefix-v6", "exact and /64 bans: the exact entry counts the hit", tcp6(V6), Setup(bans=((NET6, PERMANENT), (V6, PERMANENT))), DROP, "drop_ban", V6),
    # -- expiry ---------------------------------------------------------------
    Case("ban-expired-v4", "an exact ban whose expiry has passed never drops", tcp4(V4), Setup(bans=((V4, EXPIRED),)), PASS, "pass"),
    Case("ban-expired-v6", "an exact IPv6 ban whose expiry has passed", tcp6(V6), Setup(bans=((V6, EXPIRED),)), PASS, "pass"),
    Case("ban-prefix-expired-v4", "an expired /24 ban never drops", tcp4(V4), Setup(bans=((NET4, EXPIRED),)), PASS, "pass"),
    Case("ban-prefix-expired-v6", "an expired /64 ban never drops", tcp6(V6), Setup(bans=((NET6, EXPIRED),)), PASS, "pass"),
    Case("ban-exact-expired-prefix-active-v4", "exact ban expired, /24 still active: drop", tcp4(V4), Setup(bans=((V4, EXPIRED), (NET4, ACTIVE))), DROP, "drop_ban", NET4),
    Case("ban-exact-expired-prefix-permanent-v6", "exact ban expired, /64 permanent: drop", tcp6(V6), Setup(bans=((V6, EXPIRED), (NET6, PERMANENT))), DROP, "drop_ban", NET6),
    Case("ban-expired-over-rate", "expired ban: the SYN limit still applies", tcp4(V4), Setup(bans=((V4, EXPIRED),), exhausted=(V4,)), DROP, "drop_rate"),
    # -- monitor mode: counted as it would be, never dropped -----------------------
    Case("monitor-ban-v4", "monitor: a banned source passes, counted as drop_ban", tcp4(V4), Setup(bans=((V4, PERMANENT),), settings=MONITOR), PASS, "drop_ban", V4),
    Case("monitor-ban-prefix-v6", "monitor: a /64 ban passes, counted as drop_ban", tcp6(V6), Setup(bans=((NET6, PERMANENT),), settings=MONITOR), PASS, "drop_ban", NET6),
    Case("monitor-rate-v4", "monitor: a SYN over the rate passes, counted as drop_rate", tcp4(V4), Setup(exhausted=(V4,), settings=MONITOR), PASS, "drop_rate"),
    Case("monitor-rate-v6", "monitor: an IPv6 SYN over the rate passes", tcp6(V6), Setup(exhausted=(V6,), settings=MONITOR), PASS, "drop_rate"),
]
# fmt: on

ALL_CASES = PARSE_CASES + POLICY_CASES


def expires_ns(kind: str) -> int:
    if kind == PERMANENT:
        return 0
    now = time.monotonic_ns()  # CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns
    return now + 3600 * layout.NS_PER_SEC if kind == ACTIVE else now - layout.NS_PER_SEC


def apply(xdp: Xdp, setup: Setup) -> None:
    xdp.maps.apply_settings(setup.settings)
    for target, expiry in setup.bans:
        xdp.maps.put_ban(parse_target(target), expires_ns(expiry))
    for target in setup.allows:
        xdp.maps.put_allow(parse_target(target))
    for source in setup.exhausted:
        xdp.exhaust_bucket(source, setup.settings.v6_rate_prefix)


def entry_hits(xdp: Xdp) -> dict[tuple[str, str], Hits]:
    """Hit counters of every ban and allow entry, by ("ban"|"allow", target)."""
    hits = {("ban", str(net)): ban.hits for net, ban in xdp.maps.bans().items()}
    hits.update({("allow", str(net)): h for net, h in xdp.maps.allows().items()})
    return hits


def check(xdp: Xdp, case: Case) -> None:
    """Set up, run and check one case (on top of whatever the counters hold)."""
    apply(xdp, case.setup)
    counters_before = xdp.all_counters()

    verdict = xdp.run(case.frame)

    assert verdict == case.verdict, case.description
    expected = list(counters_before)
    code = layout.reasons()[case.reason]
    expected[code] = Hits(expected[code].packets + 1, expected[code].bytes + len(case.frame))
    assert xdp.all_counters() == expected, f"{case.description}: counted as {case.reason}"

    # the hit is on an allow entry for an allowed frame, else on a ban entry
    kind = "allow" if case.reason == "allow" else "ban"
    hit = (kind, str(parse_target(case.hit))) if case.hit else None
    hits = entry_hits(xdp)
    assert hit is None or hit in hits, f"{case.description}: no entry {hit}"
    want = {entry: Hits(1, len(case.frame)) if entry == hit else Hits() for entry in hits}
    assert hits == want, f"{case.description}: entry hit counters"


@pytest.mark.parametrize("case", PARSE_CASES, ids=[c.id for c in PARSE_CASES])
def test_parse(xdp: Xdp, case: Case) -> None:
    check(xdp, case)


@pytest.mark.parametrize("case", POLICY_CASES, ids=[c.id for c in POLICY_CASES])
def test_policy(xdp: Xdp, case: Case) -> None:
    check(xdp, case)


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in ALL_CASES]
    assert len(ids) == len(set(ids))


def test_every_reason_has_a_case() -> None:
    assert {c.reason for c in ALL_CASES} == set(layout.reasons())


def test_whole_table_counters_add_up(xdp: Xdp) -> None:
    """Every case in one run, maps reset in between but counters kept: each
    reason counts exactly its cases, and all reasons add up to every frame."""
    for case in ALL_CASES:
        xdp.clear_state()
        check(xdp, case)

    counters = xdp.counters()
    for name, code in layout.reasons().items():
        cases = [c for c in ALL_CASES if c.reason == name]
        # run without an ingress interface, a frame arrives on loopback (ifindex 1)
        assert xdp.counter_at(layout.if_slot(1), code) == counters[name]
        assert counters[name] == Hits(len(cases), sum(len(c.frame) for c in cases)), name
    assert sum(h.packets for h in counters.values()) == len(ALL_CASES)
    assert sum(h.bytes for h in counters.values()) == sum(len(c.frame) for c in ALL_CASES)


def test_entry_hits_add_up_frame_sizes(xdp: Xdp) -> None:
    """Ban and allow entries count every frame they decide, by its length."""
    xdp.maps.put_ban(parse_target(V4), 0)
    xdp.maps.put_ban(parse_target(NET6), 0)
    xdp.maps.put_allow(parse_target(OTHER4))
    frames4 = [
        ethernet(ETH_P_IP, ipv4(V4, proto=IPPROTO_UDP, payload=udp(payload=b"x" * n)))
        for n in (1, 100, 1000)
    ]
    frames6 = [tcp6("fd00:18::1"), tcp6("fd00:18::2", flags=TCP_ACK)]
    frames_allowed = [tcp4("198.18.1.1"), udp4("198.18.1.200")]

    assert xdp.run_many(frames4 + frames6 + frames_allowed) == [DROP] * 5 + [PASS] * 2

    def hits(frames: list[bytes]) -> Hits:
        return Hits(len(frames), sum(map(len, frames)))

    assert xdp.maps.bans()[parse_target(V4)].hits == hits(frames4)
    assert xdp.maps.bans()[parse_target(NET6)].hits == hits(frames6)
    assert xdp.maps.allows()[parse_target(OTHER4)] == hits(frames_allowed)
    assert xdp.counters()["drop_ban"] == hits(frames4 + frames6)
    assert xdp.counters()["allow"] == hits(frames_allowed)


def test_kernel_refuses_frames_shorter_than_ethernet(xdp: Xdp) -> None:
    """BPF_PROG_TEST_RUN will not run a frame shorter than an Ethernet header
    (also not behind XDP metadata), so the shortest frame the table can give
    the program is 14 bytes; parse_eth's own bounds check covers the rest."""
    with pytest.raises(LibbpfError, match="Invalid argument"):
        prog_test_run(xdp.fd, ethernet(ETH_P_IP, b"")[:13])
