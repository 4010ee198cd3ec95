"""Daily and monthly quotas per consumer: counted in shared memory, kept in SQLite.

Every worker counts in one shared table (exact across workers, like the rate
limits) and writes the counts it touched to the usage database once a
second; the master loads the current periods back into the table before it
forks the workers, so a restart resets no one's usage. A write stores the
absolute count and keeps the larger of two (`MAX`), so workers racing to
store the same consumer never move a count backwards.

Periods begin at midnight and on the first of the month in the configured
time zone; a new period is a new key, so usage resets by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import sqlite3
import time
import zoneinfo
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from stockade.proxy.shared_table import SlotTable, digest

log = logging.getLogger("stockade.proxy")

DAY, MONTH = "day", "month"
MAX_NAME = 128  # longer consumer ids are counted under a hash of themselves
TEXT_BYTES = 200
RECLAIM_GRACE = 3600.0  # a past period's slot stays this long, for the last writes
FLUSH_INTERVAL = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    consumer TEXT NOT NULL,
    period   TEXT NOT NULL,   -- "2026-11-24" (day) or "2026-11" (month), local time
    plan     TEXT NOT NULL,
    count    INTEGER NOT NULL,
    updated  REAL NOT NULL,
    PRIMARY KEY (consumer, period)
);
"""


def consumer_id(name: str) -> str:
    if len(name.encode()) <= MAX_NAME:
        return name
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Period:
    kind: str  # DAY or MONTH
    label: str
    ends: float  # wall-clock seconds


def period(kind: str, now: float, zone: zoneinfo.ZoneInfo) -> Period:
    local = datetime.datetime.fromtimestamp(now, zone)
    if kind == DAY:
        start = datetime.datetime(local.year, local.month, local.day, tzinfo=zone)
        end = start + datetime.timedelta(days=1)
        # a day can be 23 or 25 hours long: recompute midnight in the zone
        end = datetime.datetime(end.year, end.month, end.day, tzinfo=zone)
        return Period(DAY, start.strftime("%Y-%m-%d"), end.timestamp())
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    end = datetime.datetime(year, month, 1, tzinfo=zone)
    return Period(MONTH, f"{local.year:04d}-{local.month:02d}", end.timestamp())


@dataclass(frozen=True)
class Usage:
    consumer: str
    period: str
    plan: str
    count: int
    updated: float


@contextmanager
def _connect(path: Path, readonly: bool = False) -> Iterator[sqlite3.Connection]:
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    else:
        db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
    with closing(db):
        yield db


def read_usage(path: Path, periods: tuple[str, ...] = ()) -> list[Usage]:
    """Stored usage (the last second's counts may still be on their way)."""
    with _connect(path, readonly=True) as db:
        query = "SELECT consumer, period, plan, count, updated FROM usage"
        args: tuple[str, ...] = ()
        if periods:
            query += f" WHERE period IN ({','.join('?' * len(periods))})"
            args = periods
        rows = db.execute(query + " ORDER BY consumer, period", args).fetchall()
    return [Usage(*row) for row in rows]


def prepare_database(path: Path, owner: tuple[int, int] | None = None) -> None:
    """Create the database (and its directory) so that unprivileged workers can write it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    with _connect(path):
        pass
    if owner is not None:
        for item in (path.parent, path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if item.exists():
                os.chown(item, *owner)


class QuotaCounters:
    """The shared table: one slot per (consumer, period) with its count and names.

    Slot, in 8-byte words: digest(2) expires(1) count(1) text length(1),
    then TEXT_BYTES of "consumer\\0plan\\0period" for writing it back.
    """

    SLOT_WORDS = 5 + TEXT_BYTES // 8

    def __init__(self, capacity: int, zone: zoneinfo.ZoneInfo) -> None:
        self.table = SlotTable(capacity, self.SLOT_WORDS, evict_live=False)
        self.zone = zone
        self.dirty: set[int] = set()  # this worker's slots changed since the last write
        self.full = 0  # consumers not counted because the table was full

    def consume(
        self, consumer: str, plan: str, p: Period, quota: int, now: float, mono: float
    ) -> tuple[bool, int]:
        """Count one request unless the consumer's quota for the period is used up.

        Returns (allowed, used including this request when allowed).
        """
        table = self.table
        key = digest(f"{consumer}\0{p.label}")
        group, lock = table.locate(key)
        with lock:
            offset = self._claim(key, group, consumer, plan, p.label, p.ends - now, mono)
            if offset < 0:
                self.full += 1
                return True, 0  # fail open: never refuse a customer for our table's size
            q = offset // 8
            used = table.quads[q + 3]
            if used >= quota:
                return False, used
            table.quads[q + 3] = used + 1
        self.dirty.add(offset)
        return True, used + 1

    def observe(
        self, consumer: str, plan: str, p: Period, used: int, now: float, mono: float
    ) -> None:
        """A count the cluster (Redis) keeps: held here too, so the usage database and
        `stockade usage` show it, and a fallback while Redis is away goes on from it."""
        table = self.table
        key = digest(f"{consumer}\0{p.label}")
        group, lock = table.locate(key)
        with lock:
            offset = self._claim(key, group, consumer, plan, p.label, p.ends - now, mono)
            if offset < 0:
                self.full += 1
                return
            q = offset // 8 + 3
            table.quads[q] = max(table.quads[q], used)
        self.dirty.add(offset)

    def _claim(
        self,
        key: bytes,
        group: int,
        consumer: str,
        plan: str,
        label: str,
        left: float,
        mono: float,
    ) -> int:
        """Under the group's lock: the slot of (consumer, period), claimed and named when
        new (reclaimable RECLAIM_GRACE after the period's end, `left` seconds from now);
        -1 when the table is full."""
        table = self.table
        offset, new = table.find(key, group, int(mono * 1e9), claim=True)
        if offset >= 0 and new:
            text = f"{consumer}\0{plan}\0{label}".encode()[:TEXT_BYTES]
            start = offset + 40
            table.memory[start : start + len(text)] = text
            table.quads[offset // 8 + 4] = len(text)
            table.quads[offset // 8 + 2] = int((mono + left + RECLAIM_GRACE) * 1e9)
        return offset

    def load(self, rows: list[Usage], now: float, mono: float) -> int:
        """Put stored counts for the current periods into the table (the master, at start)."""
        current = {period(DAY, now, self.zone), period(MONTH, now, self.zone)}
        ends = {p.label: p.ends for p in current}
        loaded = 0
        for row in rows:
            if row.period not in ends:
                continue
            key = digest(f"{row.consumer}\0{row.period}")
            group, lock = self.table.locate(key)
            with lock:
                left = ends[row.period] - now
                offset = self._claim(key, group, row.consumer, row.plan, row.period, left, mono)
                if offset < 0:
                    log.error("quota table full; %s starts from 0", row.consumer)
                    continue
                q = offset // 8 + 3
                self.table.quads[q] = max(self.table.quads[q], row.count)
            loaded += 1
        return loaded

    def take_dirty(self) -> tuple[set[int], list[tuple[str, str, str, int]]]:
        """The slots this worker changed since last time, as (consumer, period, plan, count)."""
        taken, self.dirty = self.dirty, set()
        rows = []
        memory, quads = self.table.memory, self.table.quads
        for offset in taken:
            length = quads[offset // 8 + 4]
            parts = memory[offset + 40 : offset + 40 + length].decode(errors="replace").split("\0")
            if len(parts) == 3:
                rows.append((parts[0], parts[2], parts[1], quads[offset // 8 + 3]))
        return taken, rows

    def restore(self, offsets: set[int]) -> None:
        """A write failed: write these slots next time."""
        self.dirty |= offsets


class UsageWriter:
    """A worker's once-a-second write of the counts it changed (off the event loop)."""

    def __init__(self, path: Path, counters: QuotaCounters) -> None:
        self.path = path
        self.counters = counters
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def write(self, rows: list[tuple[str, str, str, int]]) -> None:
        now = time.time()
        with _connect(self.path) as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO usage (consumer, period, plan, count, updated) VALUES (?,?,?,?,?) "
                "ON CONFLICT (consumer, period) DO UPDATE SET "
                "count = MAX(count, excluded.count), plan = excluded.plan, "
                "updated = excluded.updated",
                [(c, p, plan, n, now) for c, p, plan, n in rows],
            )
            db.execute("COMMIT")

    async def flush(self) -> None:
        offsets, rows = self.counters.take_dirty()
        if not rows:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.write, rows)
        except (sqlite3.Error, OSError) as exc:
            self.counters.restore(offsets)
            if not self._failing:
                log.error("cannot store quota usage in %s: %s; retrying", self.path, exc)
            self._failing = True
            return
        if self._failing:
            log.info("quota usage stored again in %s", self.path)
        self._failing = False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
