"""Request and response headers across the proxy: hop-by-hop out, forwarding in."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from multidict import CIMultiDict, CIMultiDictProxy

from stockade.targets import Network

# RFC 9110 7.6.1 and the usual extras: these describe one connection, not
# the message, and never cross the proxy.
HOP_BY_HOP = frozenset(
    name.lower()
    for name in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)


def end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers and those the Connection header names."""
    return end_to_end_pairs(list(headers.items()))


def end_to_end_pairs(pairs: Sequence[tuple[str, str]]) -> CIMultiDict[str]:
    """The end-to-end headers of (name, value) pairs, as received in either direction."""
    drop = set(HOP_BY_HOP)
    for name, value in pairs:
        if name.lower() == "connection":
            drop.update(t.strip().lower() for t in value.split(",") if t.strip())
    return CIMultiDict((k, v) for k, v in pairs if k.lower() not in drop)


def is_trusted(ip: str, trusted: Sequence[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def client_ip(peer: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The real client: walk X-Forwarded-For from the right past trusted proxies."""
    if not forwarded_for or not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed chain is not believed
        if not is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def forwarding_headers(
    headers: CIMultiDict[str],
    *,
    peer: str,
    incoming_xff: str | None,
    peer_trusted: bool,
    scheme: str,
    host: str,
    request_id: str,
) -> None:
    """Set X-Forwarded-*, Forwarded and X-Request-ID on the upstream request.

    A chain from an untrusted peer is dropped, not extended, so an upstream
    never mistakes a client's claim for the gateway's.
    """
    chain = f"{incoming_xff}, {peer}" if incoming_xff and peer_trusted else peer
    headers["X-Forwarded-For"] = chain
    headers["X-Forwarded-Proto"] = scheme
    headers["X-Forwarded-Host"] = host
    node = f'"[{peer}]"' if ":" in peer else peer
    headers["Forwarded"] = f"for={node};proto={scheme}"
    headers["X-Request-ID"] = request_id
