"""Ban and allowlist targets: IPv4/IPv6 addresses and CIDR prefixes.

`198.18.0.7` and `198.18.0.7/32` are the same target. A prefix with host
bits set is refused, naming the prefix that was probably meant.

A target must mean what it says to the kernel, which matches the source
address of a packet:
- only ASCII is accepted (no Unicode digits that int() would read);
- an IPv6 zone id (`fe80::1%eth0`) names a local link, never a source
  address: refused;
- an IPv4-mapped IPv6 address (`::ffff:198.18.0.11`) never appears in an
  IPv4 packet: it is taken as the IPv4 address it maps, and so is a mapped
  prefix (`::ffff:198.18.0.0/112` is `198.18.0.0/16`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_SPACE = re.compile(r"\s")

# ::ffff:0:0/96, the IPv4-mapped addresses (RFC 4291 2.5.5.2)
_MAPPED_HIGH = 0xFFFF  # the address's upper 96 bits
_MAPPED_BITS = 96
_EXAMPLES = "such as 198.18.0.7, 198.18.0.0/24 or fd00::/64"

# The broadest prefixes a ban or an allowlist entry may cover without --force:
# a /0 bans or allows everything, one command away from taking the host off the
# network or disabling every ban.
DEFAULT_MIN_PREFIX_V4 = 8
DEFAULT_MIN_PREFIX_V6 = 16


class TargetError(ValueError):
    """A target that is not a valid address or prefix."""


def parse_target(text: str) -> Network:
    raw = text.strip()
    if not raw:
        raise TargetError("empty target; give an IPv4/IPv6 address or CIDR prefix")
    if raw != text or _SPACE.search(raw):
        raise TargetError(f"invalid target {text!r}: whitespace is not allowed")
    if not raw.isascii():
        raise TargetError(
            f"invalid target {text!r}: only ASCII digits, hex letters, '.', ':' and '/' "
            f"are allowed ({_EXAMPLES})"
        )
    if "%" in raw:
        address, _, zone = raw.partition("%")
        zone_id, slash, length = zone.partition("/")
        raise TargetError(
            f"invalid target {raw!r}: an IPv6 zone id (%{zone_id}) names a local link, "
            f"not a source address; give the address without it, e.g. {address}{slash}{length}"
        )
    net = _parse_fast(raw)
    if net is not None:
        return unmap(net)
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            meant = unmap(ipaddress.ip_network(raw, strict=False))
            raise TargetError(
                f"invalid prefix {raw}: host bits are set; did you mean {format_target(meant)}?"
            ) from None
        raise TargetError(
            f"invalid target {raw!r}: expected an IPv4/IPv6 address or CIDR prefix {_EXAMPLES}"
        ) from None
    return unmap(net)


def _parse_fast(raw: str) -> Network | None:
    """A well-formed address or prefix through inet_pton (C, several times faster than
    ipaddress's parser: a batch parses 100,000 of them); None for anything else, which
    the slow path then parses or refuses with its message. The forms inet_pton accepts
    are ones ipaddress accepts too, with the same value."""
    address, slash, length = raw.partition("/")
    v6 = ":" in address
    try:
        packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, address)
    except OSError:
        return None
    bits = 128 if v6 else 32
    if not slash:
        prefixlen = bits
    elif length.isdigit() and len(length) <= 3 and int(length) <= bits:  # ASCII: checked
        prefixlen = int(length)
    else:
        return None
    value = int.from_bytes(packed, "big")
    if value & ((1 << (bits - prefixlen)) - 1):
        return None  # host bits set: the slow path says which prefix was meant
    if v6:
        return ipaddress.IPv6Network((value, prefixlen))
    return ipaddress.IPv4Network((value, prefixlen))


def unmap(net: Network) -> Network:
    """An IPv4-mapped IPv6 address or prefix as the IPv4 one it maps; others unchanged.

    A prefix broader than /96 is not entirely mapped space and stays IPv6.
    """
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= _MAPPED_BITS:
        value = int(net.network_address)
        if value >> 32 == _MAPPED_HIGH:  # inside ::ffff:0:0/96
            return ipaddress.IPv4Network((value & 0xFFFF_FFFF, net.prefixlen - _MAPPED_BITS))
    return net


def mapping_note(text: str) -> str | None:
    """What an IPv4-mapped target was taken as, to tell the operator; None otherwise.

    `text` must already parse (parse_target).
    """
    raw = text.strip()
    if ":" not in raw:
        return None
    net = parse_target(raw)
    if net.version != 4:
        return None
    return (
        f"{raw} is IPv4-mapped IPv6 (::ffff:0:0/96): IPv4 packets carry it as "
        f"{format_target(net)}, so it is stored and enforced as {format_target(net)}"
    )


def format_target(net: Network) -> str:
    """Canonical text: a bare address for /32 and /128, CIDR otherwise."""
    if isinstance(net, ipaddress.IPv4Network):  # inet_ntop: the same text, faster
        address = socket.inet_ntop(socket.AF_INET, net.network_address.packed)
        return address if net.prefixlen == 32 else f"{address}/{net.prefixlen}"
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def is_exact(net: Network) -> bool:
    return net.prefixlen == net.max_prefixlen


def covers(outer: Network, inner: Network) -> bool:
    """True if every address of `inner` is inside `outer` (same family)."""
    if isinstance(outer, ipaddress.IPv4Network) and isinstance(inner, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(outer, ipaddress.IPv6Network) and isinstance(inner, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


@dataclass(frozen=True)
class PrefixFloor:
    """The shortest prefix a ban or an allowlist entry may have without force."""

    v4: int = DEFAULT_MIN_PREFIX_V4
    v6: int = DEFAULT_MIN_PREFIX_V6

    def minimum(self, net: Network) -> int:
        return self.v4 if net.version == 4 else self.v6

    def too_broad(self, net: Network) -> bool:
        return net.prefixlen < self.minimum(net)

    def refusal(self, net: Network, what: str) -> str:
        """One line: what was refused and why (the caller adds what to do)."""
        key = "xdp.min_prefix_v4" if net.version == 4 else "xdp.min_prefix_v6"
        size = net.num_addresses
        count = f"2^{size.bit_length() - 1}" if size > 1 << 32 else f"{size:,}"
        return (
            f"refusing to {what} {format_target(net)}: a /{net.prefixlen} covers {count} "
            f"addresses, broader than the minimum /{self.minimum(net)} ({key})"
        )
