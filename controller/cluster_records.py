"""How bans live in Redis: the durable record, its index, the event stream, and the codec.

    {prefix}ban:{target}   STRING  the ban as JSON; PEXPIREAT its expiry (Redis drops it)
    {prefix}bans           ZSET    target -> expiry in ms (+inf = permanent): the index
                                   a resync reads; expired members are pruned on write
    {prefix}ban-events     STREAM  one entry per ban or unban: a = action, t = target,
                                   n = node, r = record (JSON), at = publish time;
                                   trimmed to about stream_max entries
    {prefix}nodes          HASH    node -> JSON {at, last_id, lag}: peers and their lag
    {prefix}epoch          STRING  a random id set by the first node to find it missing:
                                   when it changes, Redis lost its data (restarted without
                                   persistence) and every node publishes all its bans again

One Lua script writes the record, the index and the stream entry together,
so a node that reads the stream never sees an event without its record, and
a resync never misses a ban whose event it skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from stockade.controller.store import Ban
from stockade.targets import format_target, parse_target

CLUSTER_SOURCE = "cluster"  # the local store's source for bans another node made
MAX_REASON = 200

PUBLISH_SCRIPT = """
local action, target, record = ARGV[1], ARGV[2], ARGV[3]
local expires_ms, now_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
if action == 'ban' then
  redis.call('SET', KEYS[1], record)
  if expires_ms > 0 then
    redis.call('PEXPIREAT', KEYS[1], expires_ms)
    redis.call('ZADD', KEYS[2], expires_ms, target)
  else
    redis.call('ZADD', KEYS[2], '+inf', target)
  end
else
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], target)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now_ms)
return redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*',
  'a', action, 't', target, 'n', ARGV[7], 'r', record, 'at', ARGV[8])
"""


@dataclass(frozen=True)
class Keys:
    prefix: str

    def ban(self, target: str) -> str:
        return f"{self.prefix}ban:{target}"

    @property
    def index(self) -> str:
        return f"{self.prefix}bans"

    @property
    def stream(self) -> str:
        return f"{self.prefix}ban-events"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}nodes"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}epoch"


def encode_ban(ban: Ban, node: str) -> str:
    """The record another node reads: the ban as its setter made it, and where."""
    origin = _origin(ban)
    return json.dumps(
        {
            "target": format_target(ban.target),
            "reason": origin.get("reason", ban.reason),
            "source": origin.get("source", ban.source),
            "node": origin.get("node", node),
            "created": ban.created,
            "expires": ban.expires,
            "rule": ban.rule,
            "details": _own_details(ban),
        },
        separators=(",", ":"),
        sort_keys=True,
    )


def _origin(ban: Ban) -> dict[str, Any]:
    """For a ban that came from the cluster: who set it first (kept when passed on)."""
    if ban.source != CLUSTER_SOURCE or ban.details is None:
        return {}
    details = json.loads(ban.details)
    origin = details.get("cluster") if isinstance(details, dict) else None
    return origin if isinstance(origin, dict) else {}


def _own_details(ban: Ban) -> dict[str, Any] | None:
    if ban.details is None:
        return None
    details = json.loads(ban.details)
    if not isinstance(details, dict):
        return None
    details.pop("cluster", None)
    return details or None


def decode_ban(text: str | bytes, own_node: str) -> Ban:
    """A record as this node stores it: source "cluster" when another node set it,
    with the original setter in the reason and in details.cluster."""
    data = json.loads(text)
    target = parse_target(str(data["target"]))
    reason, source, node = str(data["reason"]), str(data["source"]), str(data["node"])
    created = float(data["created"])
    expires = None if data.get("expires") is None else float(data["expires"])
    rule = data.get("rule")
    details = data.get("details") or {}
    if node == own_node:  # our own ban, as we published it
        text_details = json.dumps(details, separators=(",", ":"), sort_keys=True)
        return Ban(
            target, reason, source, created, expires, rule, text_details if details else None
        )
    details = {**details, "cluster": {"node": node, "source": source, "reason": reason}}
    shown = f"{reason} (from {node}, {source})"
    return Ban(
        target,
        shown[:MAX_REASON],
        CLUSTER_SOURCE,
        created,
        expires,
        None if rule is None else str(rule),
        json.dumps(details, separators=(",", ":"), sort_keys=True),
    )


def expires_ms(ban: Ban) -> int:
    """For PEXPIREAT: the expiry in ms; 0 = permanent."""
    return 0 if ban.expires is None else max(1, int(ban.expires * 1000))
