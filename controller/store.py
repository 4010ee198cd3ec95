"""The persistent ban store (SQLite in WAL mode): the truth the maps follow.

Times are wall-clock seconds (the maps hold monotonic ns, converted when a
ban is projected), so a ban's expiry survives a reboot.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stockade.targets import Network, format_target, parse_target

SOURCES = ("cli", "proxy", "cluster", "rule")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bans (
    target  TEXT PRIMARY KEY,
    reason  TEXT NOT NULL,
    source  TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL            -- NULL = permanent
);
CREATE INDEX IF NOT EXISTS bans_expires ON bans (expires);
CREATE TABLE IF NOT EXISTS allows (
    target  TEXT PRIMARY KEY,
    reason  TEXT NOT NULL,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Ban:
    target: Network
    reason: str
    source: str
    created: float
    expires: float | None  # wall clock; None = permanent

    def active(self, now: float) -> bool:
        return self.expires is None or self.expires > now


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
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self._db.close()
            raise RuntimeError(
                f"{path} was written by a newer stockade (schema {version}); upgrade stockade"
            )
        self._db.executescript(_SCHEMA)
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
    def _ban(row: tuple[str, str, str, float, float | None]) -> Ban:
        target, reason, source, created, expires = row
        return Ban(parse_target(target), reason, source, created, expires)

    def bans(self) -> list[Ban]:
        rows = self._db.execute(
            "SELECT target, reason, source, created, expires FROM bans ORDER BY created, target"
        )
        return [self._ban(row) for row in rows]

    def get_ban(self, target: Network) -> Ban | None:
        row = self._db.execute(
            "SELECT target, reason, source, created, expires FROM bans WHERE target = ?",
            (format_target(target),),
        ).fetchone()
        return self._ban(row) if row else None

    def put_ban(self, ban: Ban) -> None:
        self._db.execute(
            "INSERT INTO bans (target, reason, source, created, expires) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (target) DO UPDATE SET reason = excluded.reason, "
            "source = excluded.source, created = excluded.created, expires = excluded.expires",
            (format_target(ban.target), ban.reason, ban.source, ban.created, ban.expires),
        )

    def delete_ban(self, target: Network) -> bool:
        cur = self._db.execute("DELETE FROM bans WHERE target = ?", (format_target(target),))
        return cur.rowcount > 0

    def expired_bans(self, now: float) -> list[Ban]:
        rows = self._db.execute(
            "SELECT target, reason, source, created, expires FROM bans "
            "WHERE expires IS NOT NULL AND expires <= ?",
            (now,),
        )
        return [self._ban(row) for row in rows]

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
