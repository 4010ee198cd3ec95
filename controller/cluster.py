"""Cluster mode: this node's bans shared with every other node through Redis.

A ban or unban made here (CLI or rule) is handed over by BanService.on_change
on the worker thread, queued, signed when it is published (cluster_auth.py),
and published by one Lua script that writes the durable record and appends
to the stream (cluster_records.py). Every node reads the stream from its last
seen id and applies other nodes' events on the controller's worker thread,
which stays the only writer of the maps and the store; its own events come
back on the stream and are skipped, and what came from the cluster is never
published again, so nothing echoes.

Nothing read from Redis is applied on trust: an event, a record or a
tombstone must carry a valid signature by a key this node holds (or be
accepted unsigned during a migration), come from a node in [cluster.auth]
nodes, be fresh (events: within the replay window, nonce not seen before),
pass [cluster.accept], and pass the checks a local ban gets (BanService).
Whatever fails is refused, counted by kind and reason, and logged once per
origin per minute.

On every (re)connect: replay the queue, catch up on the stream from the last
id this node saw (it is kept in <state_dir>/cluster.json with the queue, so a
restart catches up too), then resync from the durable record: add or fix
what the cluster has, lift a "cluster" ban when a signed unban (tombstone)
says so (or, when unsigned data is trusted, when the record lacks it),
publish our own bans it lacks. While Redis is away the node keeps enforcing
what it has, queues its own changes (also in cluster.json) and retries every
retry_interval; every Redis call has a timeout, so nothing waits on it.

A Redis that lost its data (restarted without persistence, FLUSHALL) is told
by its epoch key, checked when a connection starts and on every heartbeat
(so within one heartbeat on a live connection): then each node publishes
every ban it has, received ones too, in place of lifting what the record
lacks, so the shared record is whole again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis

from stockade.cluster_settings import BAN_SOURCES, ClusterConfig
from stockade.controller.cluster_auth import (
    ALLOWLISTED,
    BAD_TAG,
    INVALID,
    MALFORMED,
    NOT_ACCEPTED,
    REPLAYED,
    UNKNOWN_KEY,
    UNKNOWN_NODE,
    UNSIGNED,
    NonceMemory,
    RefusalLog,
    Signed,
    Trust,
    new_nonce,
    shown_origin,
    sign,
    verify,
)
from stockade.controller.cluster_records import (
    CLUSTER_SOURCE,
    PUBLISH_SCRIPT,
    TOMBSTONE_TTL_MS,
    Change,
    Keys,
    MalformedChange,
    Record,
    as_ban,
    change_from_entry,
    change_from_value,
    encode_ban,
    expires_ms,
    parse_record,
)
from stockade.controller.service import BanChange, BanService, RemoteBanRefused
from stockade.controller.store import Ban
from stockade.redis_conn import ClusterAuthError, connect, describe_error, is_auth_error
from stockade.targets import Network, TargetError, format_target, parse_target

log = logging.getLogger("stockade.controller.cluster")

T = TypeVar("T")
OnWorker = Callable[[Callable[[], T]], Awaitable[T]]

READ_BLOCK = 1.0  # seconds one XREAD waits for events (its socket waits a timeout longer)
BATCH = 500  # stream entries and records read per call
PEER_ALIVE = 5.0  # heartbeats: a peer not seen for this long is shown as gone
STATE_FILE = "cluster.json"
# An unban signed this much before the ban it would lift was created is stale (a
# replay): the nodes' clocks must agree within it, as they must for TTLs.
CLOCK_SKEW = 2.0
_RETRYABLE = (OSError, TimeoutError, ConnectionError)

# What was refused, for the metric's `kind` label.
EVENT, RECORD, TOMBSTONE, HEARTBEAT = "event", "record", "tombstone", "heartbeat"

Refusal = tuple[str, str]  # (reason, detail)


@dataclass
class Peer:
    node: str
    last_seen: float
    lag: float | None


@dataclass(frozen=True)
class Incoming:
    """A change read from Redis that passed the signature, node and freshness checks."""

    change: Change
    record: Record | None  # parsed, for a ban


@dataclass(frozen=True)
class Refused:
    kind: str
    origin: str
    target: str
    reason: str
    detail: str


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set or `seconds` pass. (Not asyncio.wait_for: on 3.11 it can
    swallow a cancellation that arrives as the event is set, and stop() would hang.)"""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class ClusterSync:
    def __init__(
        self,
        config: ClusterConfig,
        service: BanService,
        on_worker: OnWorker[Any],
        state_dir: Path,
        trust: Trust,
    ) -> None:
        self.config = config
        self.service = service
        self.on_worker = on_worker
        self.keys = Keys(config.key_prefix)
        self.state_path = state_dir / STATE_FILE
        self.state = "connecting"  # connected, degraded
        self.since = time.time()
        self.last_error: str | None = None
        self.last_sync: float | None = None  # the last round trip that worked
        self.lag: float | None = None  # publish -> applied here, for the last event
        self.published = 0
        self.received = 0
        self.dropped = 0  # queued events pushed out by queue_max
        self.peers: dict[str, Peer] = {}
        self.last_id: str | None = None
        self.epoch: str | None = None  # the Redis data set this node last synced with
        self.pending: deque[dict[str, Any]] = deque()
        self.trust = trust
        self.nonces = NonceMemory(trust.auth.replay_window)
        self.refusals = RefusalLog(log.warning)
        # (kind, reason) -> count since start: stockade_cluster_refused_total
        self.refused: collections.Counter[tuple[str, str]] = collections.Counter()
        self.unsigned_accepted = 0  # during a migration (accept_unsigned)
        self.record_losses = 0  # times Redis was found to have lost the shared record
        self.kept_unconfirmed = 0  # received bans kept: gone from the record, no signed unban
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._saved_id: str | None = None

    # -- life ---------------------------------------------------------------
    async def start(self) -> None:
        """Load the saved queue and position, check the credentials, then sync in the
        background. A refused password stops the start; an unreachable Redis does not."""
        self._loop = asyncio.get_running_loop()
        self._load_state()
        self._log_trust()
        client = connect(self.config)
        try:
            await asyncio.wait_for(client.ping(), self.config.timeout * 2)
        except Exception as exc:
            if is_auth_error(exc):
                raise ClusterAuthError(
                    f"cluster.url: Redis at {self.config.shown_url()} refused the password "
                    f"({describe_error(exc)}); check the password in cluster.url or "
                    "cluster.password_file"
                ) from None
            self._degraded(exc)
        finally:
            await client.aclose()
        self.service.on_change = self.on_change
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=READ_BLOCK + 4 * self.config.timeout)
        self.service.on_change = None
        self._save_state()

    def set_trust(self, trust: Trust) -> None:
        """New keys or [cluster.accept] (a reload): used from the next item on."""
        self.trust = trust
        self.nonces.window = trust.auth.replay_window
        self._log_trust()

    def _log_trust(self) -> None:
        trust = self.trust
        if not trust.signs:
            log.warning(
                "cluster: authentication is OFF (cluster.auth.insecure_unauthenticated): "
                "anything that can write to Redis can ban or unban on this node"
            )
        elif trust.auth.accept_unsigned:
            log.warning(
                "cluster: signing with key %s and ACCEPTING UNSIGNED bans and unbans "
                "(cluster.auth.accept_unsigned, for a migration only): turn it off once "
                "every node has the key",
                trust.keyring.signing.kid if trust.keyring.signing else "-",
            )
        else:
            log.info(
                "cluster: signing with key %s; accepting keys %s",
                trust.keyring.signing.kid if trust.keyring.signing else "-",
                ", ".join(sorted(trust.keyring.accepted)),
            )

    # -- changes made here --------------------------------------------------
    def on_change(self, change: BanChange) -> None:
        """From the worker thread: queue the change for publishing."""
        event = {
            "action": change.action,
            "target": format_target(change.target),
            "record": "" if change.ban is None else encode_ban(change.ban, self.config.node),
            "expires_ms": 0 if change.ban is None else expires_ms(change.ban),
        }
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._enqueue, event)

    def _enqueue(self, event: dict[str, Any]) -> None:
        self.pending.append(event)
        if len(self.pending) > self.config.queue_max:
            lost = self.pending.popleft()
            self.dropped += 1
            log.error(
                "cluster: more than %d ban events queued; the oldest (%s %s) is dropped "
                "(the resync on reconnect still publishes the bans this node has)",
                self.config.queue_max,
                lost["action"],
                lost["target"],
            )
        self._save_state()
        self._wake.set()

    def _outgoing(self, event: dict[str, Any]) -> Change:
        """A queued change as it is published now: stamped, and signed when we have a key."""
        change = Change(
            node=self.config.node,
            action=event["action"],
            target=event["target"],
            at=f"{time.time():.6f}",
            nonce=new_nonce(),
            record=event["record"],
            signature=None,
        )
        key = self.trust.keyring.signing
        if key is None:
            return change
        return dataclasses.replace(change, signature=sign(key, change.signed(self.keys.prefix)))

    # -- the sync loop ------------------------------------------------------
    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._cycle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_auth_error(exc):
                    log.error("cluster: %s", describe_error(exc))
                elif not isinstance(exc, (*_RETRYABLE, aioredis.RedisError)):
                    log.exception("cluster: sync failed")
                self._degraded(exc)
            await _wait(self._stop, self.config.retry_interval)

    async def _cycle(self) -> None:
        client = connect(self.config)
        reader = connect(self.config, read_timeout=READ_BLOCK + self.config.timeout)
        halt = asyncio.Event()  # ends this cycle's loops (see _halt)
        tasks: list[asyncio.Task[None]] = []
        try:
            await client.ping()
            replayed = await self._drain(client)
            head = await self._head(client)
            caught_up = await self._catch_up(client, head) if self.last_id else 0
            lost = await self._check_epoch(client)
            added, removed, published = await self._resync(client, lost)
            self.last_id = self._later(self.last_id, head)
            self._save_state()
            self._connected(replayed, caught_up, added, removed, published)
            await self._heartbeat(client)
            tasks = [
                asyncio.create_task(self._read_loop(reader, halt)),
                asyncio.create_task(self._publish_loop(client, halt)),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
        finally:
            await self._halt(halt, tasks)
            for c in (client, reader):
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.config.timeout):
                        await c.aclose()

    async def _halt(self, halt: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
        """Stop a cycle's loops within a bounded time. The flag as well as cancel():
        redis-py can swallow a cancellation that lands in a blocking XREAD."""
        halt.set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=READ_BLOCK + 2 * self.config.timeout)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: it was reported by the cycle already

    @staticmethod
    def _later(a: str | None, b: str | None) -> str | None:
        if a is None or b is None:
            return a or b
        return a if _stream_id(a) >= _stream_id(b) else b

    async def _drain(self, client: aioredis.Redis) -> int:
        """Publish the queue in order; an event leaves the queue once Redis has it."""
        if not self.pending:
            return 0
        script = client.register_script(PUBLISH_SCRIPT)
        keys = self.keys
        count = 0
        while self.pending:
            event = self.pending[0]
            change = self._outgoing(event)
            await script(
                keys=[keys.ban(change.target), keys.index, keys.stream],
                args=[
                    change.action,
                    change.target,
                    change.record,
                    change.stored_value(),
                    event["expires_ms"],
                    int(time.time() * 1000),
                    TOMBSTONE_TTL_MS,
                    self.config.stream_max,
                    change.node,
                    change.at,
                    change.nonce,
                    change.signature or "",
                ],
            )
            self.pending.popleft()
            self.published += 1
            count += 1
        self._save_state()
        return count

    async def _head(self, client: aioredis.Redis) -> str:
        last = await client.xrevrange(self.keys.stream, count=1)
        return str(last[0][0]) if last else "0-0"

    async def _catch_up(self, client: aioredis.Redis, head: str) -> int:
        """Events since the last id this node saw, up to `head` (a node that was away)."""
        assert self.last_id is not None
        if _stream_id(self.last_id) >= _stream_id(head):
            return 0
        first = await client.xrange(self.keys.stream, count=1)
        known = self.last_id != "0-0"  # "0-0": the stream was empty when we last looked
        if known and first and _stream_id(str(first[0][0])) > _stream_id(self.last_id):
            log.warning(
                "cluster: the stream no longer reaches back to %s (raise cluster.stream_max); "
                "catching up from the durable record only",
                self.last_id,
            )
        applied = 0
        cursor = self.last_id
        while _stream_id(cursor) < _stream_id(head):
            entries = await client.xrange(self.keys.stream, min=f"({cursor}", max=head, count=BATCH)
            if not entries:
                break
            applied += await self._apply(entries)
            cursor = str(entries[-1][0])
        return applied

    async def _check_epoch(self, client: aioredis.Redis) -> bool:
        """Whether Redis lost its data since this node last synced with it."""
        await client.set(self.keys.epoch, secrets.token_hex(8), nx=True)
        epoch = await client.get(self.keys.epoch)
        lost = self.epoch is not None and epoch != self.epoch
        if lost:
            log.warning(
                "cluster: Redis at %s lost its data (new epoch): publishing every ban this "
                "node has",
                self.config.shown_url(),
            )
        self.epoch = None if epoch is None else str(epoch)
        return lost

    # -- what is read from Redis: checked before anything is applied ---------
    def _refuse(self, refused: Refused) -> None:
        self.refused[(refused.kind, refused.reason)] += 1
        detail = f"{refused.target or '-'}: {refused.detail}" if refused.target else refused.detail
        self.refusals.refused(refused.kind, refused.origin, refused.reason, detail)

    def _authentic(self, change: Change) -> Refusal | None:
        """The signature and the publisher: None when this node may go on with it."""
        trust = self.trust
        if change.signature is None:
            if not trust.unsigned_ok:
                return UNSIGNED, (
                    "no signature (a node without the cluster key, or not stockade); "
                    "cluster.auth.accept_unsigned = true accepts them during a migration"
                )
        elif trust.signs:
            why = verify(trust.keyring, change.signed(self.keys.prefix), change.signature)
            if why == UNKNOWN_KEY:
                kid = change.signature.split(".")[1] if "." in change.signature else "?"
                return why, (
                    f"signed with key id {shown_origin(kid)}, which this node does not hold "
                    "(cluster.auth.key_file, accept_key_files)"
                )
            if why == BAD_TAG:
                return why, "the signature does not match the content"
            if why is not None:
                return why, "the signature is not v1.<key id>.<tag>"
        nodes = trust.auth.nodes
        if nodes and change.node not in nodes:
            return UNKNOWN_NODE, "the publisher is not in cluster.auth.nodes"
        return None

    def _admit(self, kind: str, change: Change, entry_ms: int | None = None) -> Incoming | Refused:
        """Signature, publisher, origin and (for a stream event) freshness."""
        origin = shown_origin(change.node)
        target = shown_origin(change.target)

        def refused(refusal: Refusal) -> Refused:
            return Refused(kind, origin, target, *refusal)

        problem = self._authentic(change)
        if problem is not None:
            return refused(problem)
        if change.signature is not None and not change.nonce:
            return refused((MALFORMED, "signed without a nonce"))
        record = None
        try:
            if change.action == "ban":
                record = parse_record(change.record)
                if record.target != change.target:
                    return refused((MALFORMED, "the record is for another target"))
            nodes = self.trust.auth.nodes
            if record is not None and nodes and record.node not in nodes:
                return refused(
                    (
                        UNKNOWN_NODE,
                        f"the ban's origin {shown_origin(record.node)} "
                        "is not in cluster.auth.nodes",
                    )
                )
            if entry_ms is not None:
                window = self.trust.auth.replay_window
                apart = abs(entry_ms / 1000 - change.time)
                if apart > window:
                    return refused(
                        (
                            REPLAYED,
                            f"signed {apart:.0f}s away from when Redis took it (replay window "
                            f"{window:g}s: a replay, or clocks out of sync)",
                        )
                    )
                if change.nonce and not self.nonces.first_time(change.nonce):
                    return refused((REPLAYED, "its nonce was seen before (a replay)"))
        except MalformedChange as exc:
            return refused((MALFORMED, str(exc)))
        if change.signature is None and self.trust.signs:
            self.unsigned_accepted += 1
        return Incoming(change, record)

    def _apply_one(self, incoming: Incoming) -> tuple[bool, Refusal | None]:
        """On the worker thread: [cluster.accept], the local checks, then the change.
        (changed, refusal)."""
        change, record = incoming.change, incoming.record
        accept = self.trust.accept
        own = self.config.node
        try:
            if record is not None:
                if record.source not in BAN_SOURCES:
                    return False, (INVALID, f"unknown ban source {shown_origin(record.source)}")
                if record.node != own and record.source not in accept.bans:
                    return False, (
                        NOT_ACCEPTED,
                        f"{record.source} bans from other nodes are not accepted "
                        "(cluster.accept.bans)",
                    )
                try:  # as its setter made it: the checks a ban made here gets
                    self.service.check_remote_ban(as_ban(record, record.node))
                except RemoteBanRefused as exc:
                    return False, (ALLOWLISTED if exc.allowlisted else INVALID, str(exc))
                return self._apply_ban(as_ban(record, own))
            return self._apply_unban(parse_target(change.target), change.time)
        except (TargetError, MalformedChange) as exc:
            return False, (MALFORMED, str(exc))

    def _apply_ban(self, ban: Ban) -> tuple[bool, Refusal | None]:
        service = self.service
        if ban.active(service.clock.wall()):
            return service.apply_remote(ban), None
        # Already over: it can only end an older copy of itself received from the cluster.
        current = service.store.get_ban(ban.target)
        if current is None or current.source != CLUSTER_SOURCE or current.created > ban.created:
            return False, None
        return service.remove_remote(ban.target), None

    def _apply_unban(self, net: Network, at: float) -> tuple[bool, Refusal | None]:
        service = self.service
        current = service.store.get_ban(net)
        if current is None:
            return service.remove_remote(net), None  # the map alone may still hold it
        refusal = self._unban_refusal(current, at)
        if refusal is not None:
            return False, refusal
        return service.remove_remote(net), None

    def _unban_refusal(self, current: Ban, at: float) -> Refusal | None:
        unbans = self.trust.accept.unbans
        if unbans == "none":
            return NOT_ACCEPTED, "unbans from other nodes are not accepted (cluster.accept.unbans)"
        if unbans == "received" and current.source != CLUSTER_SOURCE:
            return NOT_ACCEPTED, (
                f"it would lift this node's own {current.source} ban "
                '(cluster.accept.unbans = "received")'
            )
        if at < current.created - CLOCK_SKEW:
            return REPLAYED, "the unban is older than the ban it would lift"
        return None

    async def _apply(self, entries: list[Any]) -> int:
        """Other nodes' events, checked here, applied in order on the worker thread."""
        node = self.config.node
        admitted: list[Incoming] = []
        for entry_id, fields in entries:
            if fields.get("n") == node:
                continue  # ours, back from the stream
            try:
                change = change_from_entry(fields)
            except MalformedChange as exc:
                origin = shown_origin(fields.get("n", "?"))
                self._refuse(Refused(EVENT, origin, "", MALFORMED, str(exc)))
                continue
            result = self._admit(EVENT, change, _stream_id(str(entry_id))[0])
            if isinstance(result, Refused):
                self._refuse(result)
            else:
                admitted.append(result)

        def apply() -> tuple[int, list[Refused]]:
            changed, refused = 0, []
            for incoming in admitted:
                done, refusal = self._apply_one(incoming)
                changed += done
                if refusal is not None:
                    c = incoming.change
                    refused.append(Refused(EVENT, shown_origin(c.node), c.target, *refusal))
            return changed, refused

        if admitted:
            _changed, refused = await self.on_worker(apply)
            for item in refused:
                self._refuse(item)
            with contextlib.suppress(MalformedChange):
                self.lag = max(0.0, time.time() - admitted[-1].change.time)
            self.received += len(admitted) - len(refused)
        if entries:
            self.last_id = str(entries[-1][0])
        return len(admitted)

    # -- resync from the durable record ---------------------------------------
    async def _values(self, client: aioredis.Redis, targets: list[str]) -> dict[str, str]:
        values: dict[str, str] = {}
        for start in range(0, len(targets), BATCH):
            chunk = targets[start : start + BATCH]
            got = await client.mget([self.keys.ban(t) for t in chunk])
            values.update({t: str(v) for t, v in zip(chunk, got, strict=True) if v is not None})
        return values

    def _admit_value(self, kind: str, target: str, text: str) -> Incoming | Refused:
        try:
            change = change_from_value(text)
        except MalformedChange as exc:
            return Refused(kind, "?", shown_origin(target), MALFORMED, str(exc))
        if change.target != target:
            return Refused(
                kind,
                shown_origin(change.node),
                shown_origin(target),
                MALFORMED,
                "stored under another target's key",
            )
        return self._admit(kind, change)

    async def _resync(self, client: aioredis.Redis, lost: bool) -> tuple[int, int, int]:
        """Make this node's bans equal the durable record (and publish ours it lacks);
        after a data loss, publish every ban this node has instead of lifting any."""
        now_ms = int(time.time() * 1000)
        targets = [
            str(t) for t in await client.zrangebyscore(self.keys.index, f"({now_ms}", "+inf")
        ]
        records: list[Incoming] = []
        for target, text in (await self._values(client, targets)).items():
            result = self._admit_value(RECORD, target, text)
            if isinstance(result, Refused):
                self._refuse(result)
            elif result.change.action == "ban":
                records.append(result)

        def apply() -> tuple[int, list[Refused], list[Ban]]:
            added, refused = 0, []
            wanted: set[Network] = set()
            for incoming in records:
                assert incoming.record is not None
                with contextlib.suppress(TargetError):
                    wanted.add(parse_target(incoming.record.target))
                done, refusal = self._apply_one(incoming)
                added += done
                if refusal is not None:
                    c = incoming.change
                    refused.append(Refused(RECORD, shown_origin(c.node), c.target, *refusal))
            missing = [b for b in self.service.active_bans() if b.target not in wanted]
            return added, refused, missing

        added, refused, missing = await self.on_worker(apply)
        for item in refused:
            self._refuse(item)
        if lost:
            ours = missing  # Redis lost them all: publish every ban this node has
            removed = 0
        else:
            removed, ours = await self._settle_missing(client, missing)
        for ban in ours:
            event = {
                "action": "ban",
                "target": format_target(ban.target),
                "record": encode_ban(ban, self.config.node),
                "expires_ms": expires_ms(ban),
            }
            self.pending.append(event)
        await self._drain(client)
        return added, removed, len(ours)

    async def _settle_missing(
        self, client: aioredis.Redis, missing: list[Ban]
    ) -> tuple[int, list[Ban]]:
        """Bans this node has and the record lacks: lifted when a signed unban (the
        tombstone) newer than the ban says so; else a received ban is lifted only when
        unsigned data is trusted (absence proves nothing: anyone who can write to Redis
        can delete), and one of our own is published again. (lifted, to publish)"""
        if not missing:
            return 0, []
        values = await self._values(client, [format_target(b.target) for b in missing])
        unbans: dict[str, Change] = {}
        for target, text in values.items():
            result = self._admit_value(TOMBSTONE, target, text)
            if isinstance(result, Refused):
                self._refuse(result)
            elif result.change.action == "unban":
                unbans[target] = result.change
        trust_absence = self.trust.unsigned_ok

        def settle() -> tuple[int, int, list[Refused], list[Ban]]:
            lifted = kept = 0
            refused: list[Refused] = []
            ours: list[Ban] = []
            for ban in missing:
                current = self.service.store.get_ban(ban.target)
                if current is None or current.created != ban.created:
                    continue  # changed on this node meanwhile
                text = format_target(ban.target)
                unban = unbans.get(text)
                if unban is not None and unban.time >= ban.created - CLOCK_SKEW:
                    refusal = self._unban_refusal(current, unban.time)
                    if refusal is None:
                        lifted += int(self.service.remove_remote(ban.target))
                    else:
                        refused.append(Refused(TOMBSTONE, shown_origin(unban.node), text, *refusal))
                        if ban.source != CLUSTER_SOURCE:
                            ours.append(ban)
                elif ban.source != CLUSTER_SOURCE:
                    ours.append(ban)  # never published (Redis was away), or deleted there
                elif trust_absence and self.trust.accept.unbans != "none":
                    lifted += int(self.service.remove_remote(ban.target))
                else:
                    kept += 1
            return lifted, kept, refused, ours

        lifted, kept, refused, ours = await self.on_worker(settle)
        for item in refused:
            self._refuse(item)
        if kept:
            self.kept_unconfirmed += kept
            log.warning(
                "cluster: kept %d bans received from other nodes that the shared record no "
                "longer has, with no signed unban for them (deleted from Redis, or unbanned "
                "longer ago than the tombstones last); `stockade unban` lifts one everywhere",
                kept,
            )
        return lifted, ours

    # -- the running connection -----------------------------------------------
    async def _read_loop(self, reader: aioredis.Redis, halt: asyncio.Event) -> None:
        cursor = self.last_id or "0-0"
        block_ms = int(READ_BLOCK * 1000)
        while not halt.is_set():
            reply: Any = await reader.xread({self.keys.stream: cursor}, count=BATCH, block=block_ms)
            self.last_sync = time.time()
            for _stream, entries in reply or ():
                if entries:
                    await self._apply(entries)
                    cursor = str(entries[-1][0])

    async def _publish_loop(self, client: aioredis.Redis, halt: asyncio.Event) -> None:
        next_beat = time.monotonic() + self.config.heartbeat
        while not halt.is_set():
            await self._drain(client)
            if time.monotonic() >= next_beat:
                await self._heartbeat(client)
                next_beat = time.monotonic() + self.config.heartbeat
            self._wake.clear()
            if self.pending:
                continue
            await _wait(self._wake, max(0.0, next_beat - time.monotonic()))

    def _heartbeat_value(self, now: float) -> str:
        body = json.dumps(
            {"at": now, "last_id": self.last_id, "lag": self.lag}, separators=(",", ":")
        )
        at = f"{now:.6f}"
        data: dict[str, Any] = {"v": 1, "h": body, "at": at}
        key = self.trust.keyring.signing
        if key is not None:
            signed = Signed(self.keys.prefix, self.config.node, "alive", "", at, "", body)
            data["sig"] = sign(key, signed)
        return json.dumps(data, separators=(",", ":"))

    def _peer(self, name: str, text: str) -> Peer | Refused:
        try:
            data = json.loads(text)
            if isinstance(data, dict) and "h" in data:  # signed (or unsigned) envelope
                body, at, signature = str(data["h"]), str(data["at"]), data.get("sig")
            else:  # from a stockade before cluster authentication
                body, at, signature = text, "", None
            change = Change(name, "alive", "", at, "", body, None)
            if signature is not None:
                change = dataclasses.replace(change, signature=str(signature))
            problem = self._authentic(change)
            if problem is not None:
                return Refused(HEARTBEAT, shown_origin(name), "", *problem)
            beat = json.loads(body)
            return Peer(name, float(beat["at"]), beat.get("lag"))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return Refused(HEARTBEAT, shown_origin(name), "", MALFORMED, repr(exc)[:200])

    async def _heartbeat(self, client: aioredis.Redis) -> None:
        """Say we are alive, read the peers, and check the epoch: a Redis emptied while we
        are connected (FLUSHALL, a failover to an empty replica) shows here within one
        heartbeat, and is made whole again at once, on this connection."""
        now = time.time()
        async with client.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.epoch)
            pipe.hset(self.keys.nodes, self.config.node, self._heartbeat_value(now))
            pipe.hgetall(self.keys.nodes)
            epoch, _, raw = await pipe.execute()
        if self.epoch is not None and epoch != self.epoch:
            await self._record_lost(client, epoch)
        peers: dict[str, Peer] = {}
        for name, text in raw.items():
            if name == self.config.node:
                continue
            result = self._peer(str(name), str(text))
            if isinstance(result, Refused):
                self._refuse(result)
            else:
                peers[result.node] = result
        self.peers = peers
        self.last_sync = now
        self.refusals.flush()
        if self.last_id != self._saved_id:
            self._save_state()

    async def _record_lost(self, client: aioredis.Redis, epoch: str | None) -> None:
        """Publish every ban this node has, as after a Redis restart without its data.
        (The read loop goes on meanwhile: the worker thread orders both.)"""
        self.record_losses += 1
        was = self.epoch
        await self._check_epoch(client)  # the new epoch (ours, or another node's); logs
        added, _removed, published = await self._resync(client, lost=True)
        log.warning(
            "cluster: the shared ban record was lost while connected (epoch %s, now %s): "
            "%d bans of this node published again, %d added here",
            was,
            epoch or "missing",
            published,
            added,
        )

    # -- state --------------------------------------------------------------
    def _connected(
        self, replayed: int, caught_up: int, added: int, removed: int, ours: int
    ) -> None:
        was = self.state
        self.state, self.since, self.last_error = "connected", time.time(), None
        self.last_sync = self.since
        log.log(
            logging.WARNING if was == "degraded" else logging.INFO,
            "cluster: %s Redis at %s as node %s: %d queued events replayed, %d caught up "
            "from the stream; resync added %d, lifted %d, published %d of ours",
            "back on" if was == "degraded" else "connected to",
            self.config.shown_url(),
            self.config.node,
            replayed,
            caught_up,
            added,
            removed,
            ours,
        )

    def _degraded(self, exc: BaseException) -> None:
        self.last_error = describe_error(exc)
        if self.state != "degraded":
            self.state, self.since = "degraded", time.time()
            log.warning(
                "cluster: Redis at %s unreachable (%s): degraded; enforcing the bans this "
                "node has, queuing its changes (%d now) and retrying every %gs",
                self.config.shown_url(),
                self.last_error,
                len(self.pending),
                self.config.retry_interval,
            )

    def _load_state(self) -> None:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error(
                "cluster: cannot read %s (%s); starting from a full resync", self.state_path, exc
            )
            return
        last, epoch = data.get("last_id"), data.get("epoch")
        self.last_id = self._saved_id = str(last) if last else None
        self.epoch = str(epoch) if epoch else None
        self.pending.extend(e for e in data.get("pending", []) if isinstance(e, dict))
        if self.pending:
            log.info("cluster: %d ban events queued from before the restart", len(self.pending))

    def _save_state(self) -> None:
        """The last seen id and the queue, replaced atomically (they survive a restart)."""
        data = {
            "node": self.config.node,
            "last_id": self.last_id,
            "epoch": self.epoch,
            "pending": list(self.pending),
        }
        tmp = self.state_path.with_suffix(".tmp")
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.write_text(json.dumps(data, separators=(",", ":")))
            os.replace(tmp, self.state_path)
            self._saved_id = self.last_id
        except OSError as exc:
            log.error("cluster: cannot write %s: %s", self.state_path, exc)

    def status(self) -> dict[str, Any]:
        now = time.time()
        trust = self.trust
        refused: dict[str, dict[str, int]] = {}
        for (kind, reason), count in sorted(self.refused.items()):
            refused.setdefault(kind, {})[reason] = count
        return {
            "backend": "redis",
            "node": self.config.node,
            "url": self.config.shown_url(),
            "state": self.state,
            "since": self.since,
            "peers": [
                {
                    "node": p.node,
                    "last_seen": p.last_seen,
                    "alive": now - p.last_seen < max(PEER_ALIVE, 3 * self.config.heartbeat),
                    "lag": p.lag,
                }
                for p in sorted(self.peers.values(), key=lambda p: p.node)
            ],
            "last_sync": self.last_sync,
            "lag": self.lag,
            "queued": len(self.pending),
            "published": self.published,
            "received": self.received,
            "last_error": self.last_error,
            "auth": {
                "mode": "off" if not trust.signs else "migration" if trust.unsigned_ok else "on",
                "key_id": trust.keyring.signing.kid if trust.keyring.signing else None,
                "accepted_key_ids": sorted(trust.keyring.accepted),
            },
            "refused": refused,
            "unsigned_accepted": self.unsigned_accepted,
            "record_losses": self.record_losses,
            "kept_unconfirmed": self.kept_unconfirmed,
        }


def embedded_status(node: str) -> dict[str, Any]:
    """`status` of a node without a cluster: the same fields, nothing shared."""
    return {
        "backend": "embedded",
        "node": node,
        "url": None,
        "state": "off",
        "since": None,
        "peers": [],
        "last_sync": None,
        "lag": None,
        "queued": 0,
        "published": 0,
        "received": 0,
        "last_error": None,
        "auth": None,
        "refused": {},
        "unsigned_accepted": 0,
        "record_losses": 0,
        "kept_unconfirmed": 0,
    }
