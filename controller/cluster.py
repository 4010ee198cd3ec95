"""Cluster mode: this node's bans shared with every other node through Redis.

A ban or unban made here (CLI or rule) is handed over by BanService.on_change
on the worker thread, queued, and published by one Lua script that writes the
durable record and appends to the stream (cluster_records.py). Every node
reads the stream from its last seen id and applies other nodes' events on
the controller's worker thread, which stays the only writer of the maps and
the store; its own events come back on the stream and are skipped, and what
came from the cluster is never published again, so nothing echoes.

On every (re)connect: replay the queue, catch up on the stream from the last
id this node saw (it is kept in <state_dir>/cluster.json with the queue, so a
restart catches up too), then resync from the durable record: add or fix
what the cluster has, lift "cluster" bans it no longer has, publish our own
bans it lacks. While Redis is away the node keeps enforcing what it has,
queues its own changes (also in cluster.json) and retries every
retry_interval; every Redis call has a timeout, so nothing waits on it.

A Redis that comes back empty (restarted without persistence) is told by its
epoch key: then each node publishes every ban it has, received ones too, in
place of lifting what the record lacks, so a Redis restart loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from stockade.cluster_settings import ClusterConfig
from stockade.controller.cluster_records import (
    CLUSTER_SOURCE,
    PUBLISH_SCRIPT,
    Keys,
    decode_ban,
    encode_ban,
    expires_ms,
)
from stockade.controller.service import BanChange, BanService
from stockade.controller.store import Ban
from stockade.redis_conn import ClusterAuthError, connect, describe_error, is_auth_error
from stockade.targets import format_target, parse_target

log = logging.getLogger("stockade.controller.cluster")

T = TypeVar("T")
OnWorker = Callable[[Callable[[], T]], Awaitable[T]]

READ_BLOCK = 1.0  # seconds one XREAD waits for events (its socket waits a timeout longer)
BATCH = 500  # stream entries and records read per call
PEER_ALIVE = 5.0  # heartbeats: a peer not seen for this long is shown as gone
STATE_FILE = "cluster.json"
_RETRYABLE = (OSError, TimeoutError, ConnectionError)


@dataclass
class Peer:
    node: str
    last_seen: float
    lag: float | None


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
            await script(
                keys=[keys.ban(event["target"]), keys.index, keys.stream],
                args=[
                    event["action"],
                    event["target"],
                    event["record"],
                    event["expires_ms"],
                    int(time.time() * 1000),
                    self.config.stream_max,
                    self.config.node,
                    f"{time.time():.6f}",
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

    async def _resync(self, client: aioredis.Redis, lost: bool) -> tuple[int, int, int]:
        """Make this node's bans equal the durable record (and publish ours it lacks);
        after a data loss, publish every ban this node has instead of lifting any."""
        now_ms = int(time.time() * 1000)
        targets = await client.zrangebyscore(self.keys.index, f"({now_ms}", "+inf")
        records: list[str] = []
        for start in range(0, len(targets), BATCH):
            chunk = targets[start : start + BATCH]
            values = await client.mget([self.keys.ban(str(t)) for t in chunk])
            records += [str(v) for v in values if v is not None]
        node = self.config.node

        def apply() -> tuple[int, int, list[Ban]]:
            wanted: dict[Any, Ban] = {}
            for text in records:
                try:
                    ban = decode_ban(text, node)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("cluster: skipped a ban record that does not parse: %s", exc)
                    continue
                wanted[ban.target] = ban
            added = sum(1 for ban in wanted.values() if self.service.apply_remote(ban))
            removed = 0
            ours: list[Ban] = []
            for ban in self.service.active_bans():
                if ban.target in wanted:
                    continue
                if ban.source == CLUSTER_SOURCE and not lost:  # lifted while we were away
                    removed += int(self.service.remove_remote(ban.target))
                else:  # never published (Redis was away or lost it, or before cluster mode)
                    ours.append(ban)
            return added, removed, ours

        added, removed, ours = await self.on_worker(apply)
        for ban in ours:
            event = {
                "action": "ban",
                "target": format_target(ban.target),
                "record": encode_ban(ban, node),
                "expires_ms": expires_ms(ban),
            }
            self.pending.append(event)
        await self._drain(client)
        return added, removed, len(ours)

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

    async def _apply(self, entries: list[Any]) -> int:
        """Other nodes' events, applied in order on the worker thread."""
        node = self.config.node
        events = [(str(i), f) for i, f in entries if f.get("n") != node]

        def apply() -> int:
            changed = 0
            for _id, fields in events:
                try:
                    if fields.get("a") == "ban":
                        changed += int(self.service.apply_remote(decode_ban(fields["r"], node)))
                    else:
                        changed += int(self.service.remove_remote(parse_target(fields["t"])))
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("cluster: skipped an event that does not parse: %s", exc)
            return changed

        if events:
            await self.on_worker(apply)
            now = time.time()
            with contextlib.suppress(KeyError, ValueError):
                self.lag = max(0.0, now - float(events[-1][1]["at"]))
            self.received += len(events)
        self.last_id = str(entries[-1][0])
        return len(events)

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

    async def _heartbeat(self, client: aioredis.Redis) -> None:
        now = time.time()
        mine = {"at": now, "last_id": self.last_id, "lag": self.lag}
        await client.hset(self.keys.nodes, self.config.node, json.dumps(mine))
        raw = await client.hgetall(self.keys.nodes)
        peers: dict[str, Peer] = {}
        for name, text in raw.items():
            if name == self.config.node:
                continue
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                data = json.loads(text)
                peers[str(name)] = Peer(str(name), float(data["at"]), data.get("lag"))
        self.peers = peers
        self.last_sync = now
        if self.last_id != self._saved_id:
            self._save_state()

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
    }
