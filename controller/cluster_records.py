"""How bans live in Redis: the durable record, its index, the event stream, and the codec.

    {prefix}ban:{target}   STRING  JSON: for a ban, the ban record's own fields (what
                                   a stockade before cluster authentication reads)
                                   and, under "envelope", the signed change a node
                                   reads now (a = action, t = target, n = publishing
                                   node, r = ban record, at = publish time, nc = nonce,
                                   sig = signature); PEXPIREAT its expiry (Redis drops
                                   it). For an unban: the envelope alone, a tombstone
                                   kept TOMBSTONE_TTL_MS, so that a node that missed
                                   the event still finds a signed unban
    {prefix}bans           ZSET    target -> expiry in ms (+inf = permanent): the index
                                   a resync reads; expired members are pruned on write
    {prefix}ban-events     STREAM  one entry per ban or unban, the envelope's fields;
                                   trimmed to about stream_max entries
    {prefix}nodes          HASH    node -> signed JSON {at, last_id, lag}: peers and lag
    {prefix}epoch          STRING  a random id set by the first node to find it missing:
                                   when it changes (checked on every heartbeat), Redis
                                   lost its data and every node publishes all its bans again

One Lua script writes the record, the index and the stream entry together,
so a node that reads the stream never sees an event without its record, and
a resync never misses a ban whose event it skipped. The signature
(cluster_auth.py) is made by the publisher before the script runs and covers
every field of the envelope, the ban record whole.

A node without a key (insecure_unauthenticated) writes the same without
sig; a stockade before cluster authentication wrote the bare ban record and
stream entries without nc and sig. All of these read as unsigned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from stockade.controller.cluster_auth import Signed
from stockade.controller.store import Ban
from stockade.targets import format_target, parse_target

CLUSTER_SOURCE = "cluster"  # the local store's source for bans another node made
MAX_REASON = 200
ENVELOPE_VERSION = 1
TOMBSTONE_TTL_MS = 7 * 86400 * 1000  # how long Redis keeps a signed unban for resyncs
MAX_VALUE = 16384  # bytes of a record or event field a node reads; longer is refused

# KEYS: record, index, stream. ARGV: action, target, record, envelope, expires_ms,
# now_ms, tombstone_ms, stream_max, node, at, nonce, sig ("" when unsigned).
PUBLISH_SCRIPT = """
local action, target, record, envelope = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expires_ms, now_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
if action == 'ban' then
  redis.call('SET', KEYS[1], envelope)
  if expires_ms > 0 then
    redis.call('PEXPIREAT', KEYS[1], expires_ms)
    redis.call('ZADD', KEYS[2], expires_ms, target)
  else
    redis.call('ZADD', KEYS[2], '+inf', target)
  end
else
  redis.call('SET', KEYS[1], envelope, 'PX', ARGV[7])
  redis.call('ZREM', KEYS[2], target)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now_ms)
local fields = {'a', action, 't', target, 'n', ARGV[9], 'r', record, 'at', ARGV[10],
  'nc', ARGV[11]}
if ARGV[12] ~= '' then
  fields[#fields + 1] = 'sig'
  fields[#fields + 1] = ARGV[12]
end
return redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', unpack(fields))
"""


class MalformedChange(ValueError):
    """A record, tombstone or stream entry read from Redis that does not parse."""


@dataclass(frozen=True)
class Change:
    """One ban or unban as published: what a stream entry and a durable record hold."""

    node: str  # the publisher
    action: str  # "ban" or "unban"
    target: str
    at: str  # publish time, wall-clock seconds as text
    nonce: str
    record: str  # the ban record JSON; "" for an unban
    signature: str | None  # None: unsigned

    def signed(self, prefix: str) -> Signed:
        return Signed(prefix, self.node, self.action, self.target, self.at, self.nonce, self.record)

    def stored_value(self) -> str:
        """The durable record's value: the ban record's own fields, which a stockade from
        before cluster authentication reads (it ignores the rest), and the signed envelope
        under "envelope", which is all a node reads now. An unban: the envelope alone."""
        envelope: dict[str, Any] = {
            "v": ENVELOPE_VERSION,
            "a": self.action,
            "t": self.target,
            "n": self.node,
            "at": self.at,
            "nc": self.nonce,
            "r": self.record,
        }
        if self.signature is not None:
            envelope["sig"] = self.signature
        data: dict[str, Any] = json.loads(self.record) if self.record else {}
        data["envelope"] = envelope
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @property
    def time(self) -> float:
        try:
            return float(self.at)
        except ValueError:
            raise MalformedChange(f"publish time {self.at[:40]!r} is not a number") from None


def _text(data: dict[str, Any], key: str, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise MalformedChange(f"field {key!r} is missing or not text")
    if len(value) > MAX_VALUE:
        raise MalformedChange(f"field {key!r} is over {MAX_VALUE} bytes")
    return value


def _check(change: Change) -> Change:
    if change.action not in ("ban", "unban"):
        raise MalformedChange(f"action {change.action[:20]!r}")
    if (change.action == "ban") != bool(change.record):
        raise MalformedChange("a ban needs a record, an unban has none")
    return change


def change_from_entry(fields: dict[str, Any]) -> Change:
    """A change from its short field names: a stream entry's, or a record's envelope."""
    signature = fields.get("sig")
    return _check(
        Change(
            node=_text(fields, "n"),
            action=_text(fields, "a"),
            target=_text(fields, "t"),
            at=_text(fields, "at"),
            nonce=_text(fields, "nc", required=False),
            record=_text(fields, "r", required=False),
            signature=None if signature is None else _text(fields, "sig"),
        )
    )


def change_from_value(text: str) -> Change:
    """A durable record's value: its envelope, or a bare ban record (unsigned)."""
    if len(text) > 3 * MAX_VALUE:
        raise MalformedChange(f"over {3 * MAX_VALUE} bytes")
    try:
        outer = json.loads(text)
    except ValueError as exc:
        raise MalformedChange(f"not JSON: {exc}") from None
    if not isinstance(outer, dict):
        raise MalformedChange("not a JSON object")
    if "envelope" not in outer:  # written by a stockade before cluster authentication
        record = parse_record(text)
        return Change(record.node, "ban", record.target, "", "", text, None)
    data = outer["envelope"]
    if not isinstance(data, dict) or data.get("v") != ENVELOPE_VERSION:
        raise MalformedChange("the envelope is not a version 1 object")
    return change_from_entry(data)


@dataclass(frozen=True)
class Record:
    """A ban record as its setter published it (before this node makes it its own)."""

    target: str
    reason: str
    source: str
    node: str  # the node that set the ban first
    created: float
    expires: float | None
    rule: str | None
    details: dict[str, Any]


def parse_record(text: str) -> Record:
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise MalformedChange("the ban record is not a JSON object")
        expires = data.get("expires")
        rule = data.get("rule")
        details = data.get("details") or {}
        if not isinstance(details, dict):
            raise MalformedChange("the ban record's details are not an object")
        fields = [data["target"], data["reason"], data["source"], data["node"]]
        if not all(isinstance(f, str) for f in fields) or not (
            rule is None or isinstance(rule, str)
        ):
            raise MalformedChange("the ban record has a field that is not text")
        return Record(
            target=data["target"],
            reason=data["reason"],
            source=data["source"],
            node=data["node"],
            created=_number(data["created"]),
            expires=None if expires is None else _number(expires),
            rule=rule,
            details=details,
        )
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, MalformedChange):
            raise
        raise MalformedChange(f"the ban record does not parse: {exc!r}"[:200]) from None


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedChange(f"{str(value)[:20]!r} is not a number")
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise MalformedChange("a time is not finite")
    return number


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
    return as_ban(parse_record(text if isinstance(text, str) else text.decode()), own_node)


def as_ban(record: Record, own_node: str) -> Ban:
    target = parse_target(record.target)
    details = record.details
    if record.node == own_node:  # our own ban, as we published it
        text_details = json.dumps(details, separators=(",", ":"), sort_keys=True)
        return Ban(
            target,
            record.reason,
            record.source,
            record.created,
            record.expires,
            record.rule,
            text_details if details else None,
        )
    origin = {"node": record.node, "source": record.source, "reason": record.reason}
    details = {**details, "cluster": origin}
    shown = f"{record.reason} (from {record.node}, {record.source})"
    return Ban(
        target,
        shown[:MAX_REASON],
        CLUSTER_SOURCE,
        record.created,
        record.expires,
        record.rule,
        json.dumps(details, separators=(",", ":"), sort_keys=True),
    )


def expires_ms(ban: Ban) -> int:
    """For PEXPIREAT: the expiry in ms; 0 = permanent."""
    return 0 if ban.expires is None else max(1, int(ban.expires * 1000))
