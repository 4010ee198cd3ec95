"""Crafted Ethernet frames for BPF_PROG_TEST_RUN tests and benchmarks.

Plain `struct` packing, no scapy: every field the XDP parser reads can be
set, including broken ones (short headers, bad ihl, extension-header chains).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_DSTOPTS = 60
IPPROTO_AH = 51

TCP_SYN = 0x02
TCP_ACK = 0x10

DST_MAC = bytes.fromhex("020000000001")
SRC_MAC = bytes.fromhex("020000000002")


def ethernet(ethertype: int, payload: bytes, vlans: tuple[int, ...] = ()) -> bytes:
    """An Ethernet frame; `vlans` lists tag TPIDs outermost first (VLAN id 10)."""
    header = DST_MAC + SRC_MAC
    for tpid in vlans:
        header += struct.pack("!H", tpid) + struct.pack("!H", 10)
    return header + struct.pack("!H", ethertype) + payload


def tcp(sport: int = 40000, dport: int = 80, flags: int = TCP_SYN, doff: int = 5) -> bytes:
    options = b"\x01" * (max(doff, 5) * 4 - 20)
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, flags, 65535, 0, 0) + options


def udp(sport: int = 40000, dport: int = 53, payload: bytes = b"x" * 8) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(
    src: str,
    dst: str = "198.18.0.1",
    proto: int = IPPROTO_TCP,
    payload: bytes = b"",
    ihl: int = 5,
    frag_off: int = 0,
    tot_len: int | None = None,
    version: int = 4,
) -> bytes:
    options = b"\x01" * (max(ihl, 5) * 4 - 20)  # NOP options
    length = tot_len if tot_len is not None else ihl * 4 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        (version << 4) | ihl,
        0,
        length,
        1,
        frag_off,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + options + payload


def ipv6(
    src: str,
    dst: str = "fd00:18::1",
    nexthdr: int = IPPROTO_TCP,
    payload: bytes = b"",
    version: int = 6,
) -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        version << 28,
        len(payload),
        nexthdr,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


def ext_header(nexthdr: int, length_units: int = 0) -> bytes:
    """A Hop-by-Hop/Routing/Destination-options header of (length_units+1)*8 bytes."""
    return struct.pack("!BB", nexthdr, length_units) + b"\x00" * (6 + 8 * length_units)


def ah_header(nexthdr: int, payload_len: int = 4) -> bytes:
    """An Authentication Header: (payload_len + 2) * 4 bytes."""
    return struct.pack("!BBH", nexthdr, payload_len, 0) + b"\x00" * ((payload_len + 2) * 4 - 4)


def fragment_header(nexthdr: int, offset: int = 0, more: bool = True) -> bytes:
    return struct.pack("!BBHI", nexthdr, 0, (offset << 3) | int(more), 0x1234)


def ipv6_ext(
    src: str,
    headers: Sequence[int],
    last: int = IPPROTO_TCP,
    payload: bytes | None = None,
    dst: str = "fd00:18::1",
) -> bytes:
    """An IPv6 packet with the extension headers `headers` in order, then `last`.

    Each header is the smallest of its kind (8 bytes; AH 24 bytes; a first
    fragment with more to follow) and points at the next one. The payload is
    a TCP SYN by default.
    """
    body = tcp() if payload is None else payload
    nexthdr = last
    for kind in reversed(headers):
        if kind == IPPROTO_AH:
            body = ah_header(nexthdr) + body
        elif kind == IPPROTO_FRAGMENT:
            body = fragment_header(nexthdr, offset=0, more=True) + body
        elif kind in (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS):
            body = ext_header(nexthdr) + body
        else:
            raise ValueError(f"not an IPv6 extension header: {kind}")
        nexthdr = kind
    return ipv6(src, dst, nexthdr, body)


def tcp4(src: str, flags: int = TCP_SYN, dst: str = "198.18.0.1", **ip: int) -> bytes:
    """A whole IPv4 TCP frame (a SYN by default)."""
    return ethernet(ETH_P_IP, ipv4(src, dst, IPPROTO_TCP, tcp(flags=flags), **ip))


def tcp6(src: str, flags: int = TCP_SYN, dst: str = "fd00:18::1") -> bytes:
    """A whole IPv6 TCP frame (a SYN by default)."""
    return ethernet(ETH_P_IPV6, ipv6(src, dst, IPPROTO_TCP, tcp(flags=flags)))


def udp4(src: str, dst: str = "198.18.0.1") -> bytes:
    return ethernet(ETH_P_IP, ipv4(src, dst, IPPROTO_UDP, udp()))


def udp6(src: str, dst: str = "fd00:18::1") -> bytes:
    return ethernet(ETH_P_IPV6, ipv6(src, dst, IPPROTO_UDP, udp()))


def arp() -> bytes:
    return ethernet(ETH_P_ARP, b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\x00" * 20)
