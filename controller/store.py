"""The persistent ban store (SQLite in WAL mode): the truth the maps follow.

Times are wall-clock seconds (the maps hold monotonic ns, converted when a
ban is projected), so a ban's expiry survives a reboot.

Every change to a ban is also written to `ban_events` (ban, unban, expire),
in the same transaction as the change itself: the history that escalates
repeat offenders and that `stockade explain` shows. It is pruned by age.

Schema versions: 1 = bans and allows; 2 = ban_events, and bans.rule /
bans.details. An older database is upgraded in place when it is opened.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stockade.targets import Network, format_target, parse_target

SOURCES = ("cli", "proxy", "cluster", "rule")
ACTIONS = ("ban", "unban", "expire")
SCHEMA_VERSION = 2

# Each statement is idempotent, so opening any older database brings it up to date.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS bans (
        target  TEXT PRIMARY KEY,
        reason  TEXT NOT NULL,
        source  TEXT NOT NULL,
        created REAL NOT NULL,
        expires REAL,           -- NULL = permanent
        rule    TEXT,           -- the proxy rule that asked for it (source "rule")
        details TEXT            -- JSON object recorded at ban time
    )""",
    "CREATE INDEX IF NOT EXISTS bans_expires ON bans (expires)",
    """CREATE TABLE IF NOT EXISTS allows (
        target  TEXT PRIMARY KEY,
        reason  TEXT NOT NULL,
        created REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS ban_events (
        id      INTEGER PRIMARY KEY,
        target  TEXT NOT NULL,
        at      REAL NOT NULL,
        action  TEXT NOT NULL CHECK (action IN ('ban', 'unban', 'expire')),
        source  TEXT NOT NULL,
        reason  TEXT NOT NULL,
        ttl     REAL,           -- seconds, for a ban; NULL = permanent or not a ban
        rule    TEXT,
        details TEXT            -- JSON object
    )""",
    "CREATE INDEX IF NOT EXISTS ban_events_target ON ban_events (target, at)",
    "CREATE INDEX IF NOT EXISTS ban_events_at ON ban_events (at)",
)
# Columns added to a table that already existed in an older schema.
_ADDED_COLUMNS = (("bans", "rule", "TEXT"), ("bans", "details", "TEXT"))
_BAN_COLUMNS = "target, reason, source, created, expires, rule, details"
_EVENT_COLUMNS = "target, at, action, source, reason, ttl, rule, details"


@dataclass(frozen=True)
class Ban:
    target: Network
    reason: str
    source: str
    created: float
    expires: float | None  # wall clock; None = permanent
    rule: str | None = None  # set for bans pushed by a proxy rule
    details: str | None = None  # JSON object text, as recorded at ban time

    def active(self, now: float) -> bool:
        return self.expires is None or self.expires > now


@dataclass(frozen=True)
class BanEvent:
    """One row of the ban history.

    For "ban": the ban as set (ttl in seconds, None = permanent). For "unban"
    and "expire": source, reason, rule and details of the ban that ended.
    """

    target: Network
    at: float
    action: str  # one of ACTIONS
    source: str
    reason: str
    ttl: float | None = None
    rule: str | None = None
    details: str | None = None

    @classmethod
    def of_ban(cls, ban: Ban, action: str, at: float) -> BanEvent:
        ttl = None
        if action == "ban" and ban.expires is not None:
            ttl = ban.expires - ban.created
        return cls(ban.target, at, action, ban.source, ban.reason, ttl, ban.rule, ban.details)


@dataclass(frozen=True)
class Allow:
    target: Network
    reason: str
    created: float


class BanStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        # One worker thread uses it at a time (the controller serializes commands).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a ban survives a power cut
        self._db.execute("PRAGMA busy_timeout=5000")
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        """Create or upgrade the schema, in one transaction: all of it or nothing."""
        with self.transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} was written by a newer stockade (schema {version}); "
                    "upgrade stockade"
                )
            for statement in _SCHEMA:
                self._db.execute(statement)
            for table, column, kind in _ADDED_COLUMNS:
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- bans ---------------------------------------------------------------
    @staticmethod
    def _ban(row: tuple[Any, ...]) -> Ban:
        target, reason, source, created, expires, rule, details = row
        return Ban(parse_target(target), reason, source, created, expires, rule, details)

    def bans(self) -> list[Ban]:
        rows = self._db.execute(f"SELECT {_BAN_COLUMNS} FROM bans ORDER BY created, target")
        return [self._ban(row) for row in rows]

    def get_ban(self, target: Network) -> Ban | None:
        row = self._db.execute(
            f"SELECT {_BAN_COLUMNS} FROM bans WHERE target = ?", (format_target(target),)
        ).fetchone()
        return self._ban(row) if row else None

    def covering_bans(self, target: Network) -> list[Ban]:
        """Bans on `target` itself or on a prefix that contains it, most specific first.

        Looked up by key (one candidate per prefix length), not by a scan.
        """
        candidates = [
            format_target(target.supernet(new_prefix=length))
            for length in range(target.prefixlen, -1, -1)
        ]
        marks = ", ".join("?" * len(candidates))
        rows = self._db.execute(
            f"SELECT {_BAN_COLUMNS} FROM bans WHERE target IN ({marks})", candidates
        )
        return sorted((self._ban(row) for row in rows), key=lambda b: -b.target.prefixlen)

    def put_ban(self, ban: Ban) -> None:
        self._db.execute(
            f"INSERT INTO bans ({_BAN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (target) DO UPDATE SET reason = excluded.reason, "
            "source = excluded.source, created = excluded.created, expires = excluded.expires, "
            "rule = excluded.rule, details = excluded.details",
            (
                format_target(ban.target),
                ban.reason,
                ban.source,
                ban.created,
                ban.expires,
                ban.rule,
                ban.details,
            ),
        )

    def delete_ban(self, target: Network) -> bool:
        cur = self._db.execute("DELETE FROM bans WHERE target = ?", (format_target(target),))
        return cur.rowcount > 0

    def expired_bans(self, now: float) -> list[Ban]:
        rows = self._db.execute(
            f"SELECT {_BAN_COLUMNS} FROM bans WHERE expires IS NOT NULL AND expires <= ?",
            (now,),
        )
        return [self._ban(row) for row in rows]

    # -- history ------------------------------------------------------------
    def add_event(self, event: BanEvent) -> None:
        if event.action not in ACTIONS:
            raise ValueError(f"unknown ban event action {event.action!r}")
        self._db.execute(
            f"INSERT INTO ban_events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                format_target(event.target),
                event.at,
                event.action,
                event.source,
                event.reason,
                event.ttl,
                event.rule,
                event.details,
            ),
        )

    def events(self, target: Network, limit: int = 50) -> list[BanEvent]:
        """The history of one target (exactly that target), newest first."""
        rows = self._db.execute(
            f"SELECT {_EVENT_COLUMNS} FROM ban_events WHERE target = ? "
            "ORDER BY at DESC, id DESC LIMIT ?",
            (format_target(target), limit),
        )
        return [
            BanEvent(parse_target(t), at, action, source, reason, ttl, rule, details)
            for t, at, action, source, reason, ttl, rule, details in rows
        ]

    def count_events(self, target: Network, action: str, source: str, since: float) -> int:
        """Events of `target` with this action and source, strictly after `since`."""
        row = self._db.execute(
            "SELECT count(*) FROM ban_events "
            "WHERE target = ? AND action = ? AND source = ? AND at > ?",
            (format_target(target), action, source, since),
        ).fetchone()
        return int(row[0])

    def prune_events(self, before: float) -> int:
        """Forget events older than `before`; returns how many."""
        cur = self._db.execute("DELETE FROM ban_events WHERE at < ?", (before,))
        return cur.rowcount

    # -- allowlist ----------------------------------------------------------
    def allows(self) -> list[Allow]:
        rows = self._db.execute("SELECT target, reason, created FROM allows ORDER BY created")
        return [Allow(parse_target(t), reason, created) for t, reason, created in rows]

    def put_allow(self, allow: Allow) -> None:
        self._db.execute(
            "INSERT INTO allows (target, reason, created) VALUES (?, ?, ?) "
            "ON CONFLICT (target) DO UPDATE SET reason = excluded.reason",
            (format_target(allow.target), allow.reason, allow.created),
        )

    def delete_allow(self, target: Network) -> bool:
        cur = self._db.execute("DELETE FROM allows WHERE target = ?", (format_target(target),))
        return cur.rowcount > 0
