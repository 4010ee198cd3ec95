"""The cluster lines of `stockade status` (the `cluster` object of the controller's status)."""

from __future__ import annotations

import time
from typing import Any


def _ago(at: float | None, now: float) -> str:
    return "never" if at is None else f"{max(0.0, now - at):.1f}s ago"


def cluster_lines(cluster: dict[str, Any], now: float | None = None) -> list[str]:
    if cluster["backend"] != "redis":
        return ["cluster:    off (this node alone: SQLite and local counters)"]
    now = time.time() if now is None else now
    state = cluster["state"].upper() if cluster["state"] != "connected" else "connected"
    lines = [f"cluster:    node {cluster['node']}, {state} to {cluster['url']}"]
    if cluster["state"] != "connected" and cluster["last_error"]:
        lines.append(f"            last error: {cluster['last_error']}")
    peers = cluster["peers"]
    alive = [p["node"] for p in peers if p["alive"]]
    gone = [p["node"] for p in peers if not p["alive"]]
    shown = ", ".join(alive) or "none"
    if gone:
        shown += f" (not seen lately: {', '.join(gone)})"
    lines.append(f"            peers: {shown}")
    lag = "n/a" if cluster["lag"] is None else f"{cluster['lag'] * 1000:.0f} ms"
    lines.append(
        f"            last sync {_ago(cluster['last_sync'], now)}, lag {lag}, "
        f"{cluster['queued']} events queued, {cluster['published']} published, "
        f"{cluster['received']} received"
    )
    lines.extend(_trust_lines(cluster))
    return lines


def _trust_lines(cluster: dict[str, Any]) -> list[str]:
    """How this node authenticates what arrives through Redis, and what it refused."""
    auth = cluster.get("auth")
    if auth is None:  # a controller from before cluster authentication
        return []
    mode = auth["mode"]
    if mode == "off":
        shown = "OFF (insecure_unauthenticated: anyone who can write to Redis is trusted)"
    elif mode == "migration":
        shown = f"on with key {auth['key_id']}, UNSIGNED ACCEPTED (accept_unsigned)"
    else:
        shown = f"on with key {auth['key_id']}"
    extra = [k for k in auth.get("accepted_key_ids", []) if k != auth["key_id"]]
    if extra:
        shown += f" (also accepting {', '.join(extra)})"
    lines = [f"            auth: {shown}"]
    refused = cluster.get("refused") or {}
    if refused:
        parts = [
            f"{kind} {reason} {count}"
            for kind, reasons in sorted(refused.items())
            for reason, count in sorted(reasons.items())
        ]
        total = sum(sum(r.values()) for r in refused.values())
        lines.append(f"            REFUSED {total} from the cluster: {', '.join(parts)}")
    return lines
