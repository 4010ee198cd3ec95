"""Ban and allowlist targets: IPv4/IPv6 addresses and CIDR prefixes.

`198.18.0.7` and `198.18.0.7/32` are the same target. A prefix with host
bits set is refused, naming the prefix that was probably meant.
"""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetError(ValueError):
    """A target that is not a valid address or prefix."""


def parse_target(text: str) -> Network:
    raw = text.strip()
    if not raw:
        raise TargetError("empty target; give an IPv4/IPv6 address or CIDR prefix")
    if raw != text or any(ch.isspace() for ch in raw):
        raise TargetError(f"invalid target {text!r}: whitespace is not allowed")
    try:
        return ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            meant = ipaddress.ip_network(raw, strict=False)
            raise TargetError(
                f"invalid prefix {raw}: host bits are set; did you mean {meant}?"
            ) from None
        raise TargetError(
            f"invalid target {raw!r}: expected an IPv4/IPv6 address or CIDR prefix "
            "such as 198.18.0.7, 198.18.0.0/24 or fd00::/64"
        ) from None


def format_target(net: Network) -> str:
    """Canonical text: a bare address for /32 and /128, CIDR otherwise."""
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
