"""Request and response headers across the proxy: hop-by-hop out, forwarding in.

Two sets are computed from the whole config, once:

- `single_valued_headers`: the headers the gateway decides on. A request
  with more than one field line of any of them is refused (400) by the
  first stage, so the upstream, which may read the last value, never sees
  one the gateway did not check. They are Host, Content-Length,
  Authorization and the API-key header always; the header of every
  `header:NAME` rate limit; User-Agent when an anomaly rule matches
  User-Agents; Content-Type and Content-Encoding when a route has a WAF.
  X-Forwarded-For is a list by design (RFC 9110 5.3): its lines are joined
  in order (`forwarded_for`) and believed only from trusted proxies. Cookie
  is not decided on by name and X-Request-ID only names the request in the
  log; both pass as sent.
- `gateway_headers`: the identity headers the gateway writes upstream (the
  consumer header, every route's forward_claims headers). A client's copy
  is removed on every route, also on routes that never set them, so an
  upstream that trusts them only ever reads the gateway's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy

from stockade.targets import Network

if TYPE_CHECKING:
    from stockade.proxy.settings import ProxyConfig

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


def single_valued_headers(config: ProxyConfig) -> frozenset[bytes]:
    """The lowercase names of the headers the gateway decides on (see above)."""
    names = {"host", "content-length", "authorization", config.auth.api_key_header.lower()}
    names.update(rule.field.lower() for rule in config.rate_limiting.limits if rule.key == "header")
    if any(rule.user_agents for rule in config.anomaly.rules):
        names.add("user-agent")
    if any(route.waf.mode != "off" for route in config.routes):
        names.update(("content-type", "content-encoding"))
    return frozenset(name.encode("ascii") for name in names)


def gateway_headers(config: ProxyConfig) -> frozenset[str]:
    """The lowercase names of the identity headers the gateway writes upstream."""
    names = {config.auth.consumer_header.lower()}
    for route in config.routes:
        names.update(header.lower() for _, header in route.auth.forward_claims)
        names.update(header.lower() for header in route.auth.headers_set)
    return frozenset(names)


def forwarded_for(headers: CIMultiDictProxy[str]) -> str | None:
    """Every X-Forwarded-For line joined in order (RFC 9110 5.3), or None."""
    lines = headers.getall("X-Forwarded-For", ())
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else ", ".join(lines)


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
    if host:
        headers["X-Forwarded-Host"] = host
    else:  # an HTTP/1.0 request without Host: nothing to vouch for
        headers.popall("X-Forwarded-Host", None)
    node = f'"[{peer}]"' if ":" in peer else peer
    headers["Forwarded"] = f"for={node};proto={scheme}"
    headers["X-Request-ID"] = request_id
