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

import math
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stockade.targets import Network, TargetError, format_target, parse_target

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
_IN_CHUNK = 500  # targets per `IN (...)` query: well under SQLite's variable limit


SQLITE_HEADER = b"SQLite format 3\x00"
# The columns of every schema version, named as this code writes them (an upgrade to
# schema 2 adds bans.rule and bans.details).
_REQUIRED_COLUMNS = {
    "bans": ("target", "reason", "source", "created", "expires"),
    "allows": ("target", "reason", "created"),
    "ban_events": ("id", "target", "at", "action", "source", "reason", "ttl", "rule", "details"),
}
_ADDED_IN_2 = {"bans": ("rule", "details")}
# SQLite's companions of a database in WAL mode: they belong to that file only.
COMPANIONS = ("-wal", "-shm")


@dataclass(frozen=True)
class StoreCheck:
    """What is at the ban store's path, found without changing a byte of it.

    state: "missing" (no file), "ok" (an SQLite database that passes
    PRAGMA integrity_check and has a bans table, or no table at all), or
    "damaged" (anything else: unreadable, not SQLite, truncated, failing the
    check, someone else's database); `detail` says what was found.
    """

    state: str
    detail: str = ""
    active_bans: int = 0  # for "ok": bans not yet expired


def inspect_store(path: Path, now: float) -> StoreCheck:
    """Look at the store read-only, before anything opens it for writing
    (sqlite3.connect would create a missing file and use an empty one)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return StoreCheck("missing", "it does not exist")
    except OSError as exc:
        return StoreCheck("damaged", f"cannot stat it: {exc.strerror}")
    if not stat.S_ISREG(info.st_mode):
        return StoreCheck("damaged", "it is not a regular file")
    try:
        with path.open("rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except OSError as exc:
        return StoreCheck("damaged", f"cannot read it: {exc.strerror}")
    if not header:
        return StoreCheck("damaged", "it is empty (0 bytes)")
    if header != SQLITE_HEADER:
        return StoreCheck("damaged", "it is not an SQLite database")
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return StoreCheck("damaged", f"SQLite cannot open it: {exc}")
    try:
        # its report may quote bytes of the damaged pages: decode them leniently
        db.text_factory = lambda raw: raw.decode("utf-8", "replace")
        problems = [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
        db.text_factory = str  # the rows below are read as BanStore will read them
        if problems != ["ok"]:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            return StoreCheck("damaged", _printable(f"PRAGMA integrity_check: {problems[0]}{more}"))
        tables = {str(row[0]) for row in db.execute("SELECT name FROM sqlite_master")}
        if not tables:
            return StoreCheck("ok")  # a database nothing was ever written to
        if "bans" not in tables:
            return StoreCheck("damaged", "it has no bans table: not a stockade ban store")
        problem = _schema_problem(db)
        if problem is not None:
            return StoreCheck("damaged", _printable(f"its schema does not parse: {problem}"))
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        for table, columns in _REQUIRED_COLUMNS.items():
            if version >= 2:
                columns += _ADDED_IN_2.get(table, ())
            if table in tables:
                have = {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")}
                missing = [c for c in columns if c not in have]
                if missing:
                    return StoreCheck(
                        "damaged", f"table {table} has no column {missing[0]}: not a ban store"
                    )
        # integrity_check sees the structure, not the values: a ban or allow the
        # controller could not read would stop it later, halfway. Read each as it will.
        active = 0
        for row in _rows(db, "bans", ("target", "reason", "source", "created", "expires")):
            problem = _unreadable(row, expires_may_be_null=True)
            if problem is not None:
                return StoreCheck("damaged", f"a ban that cannot be read: {problem}")
            expires = row["expires"]
            active += expires is None or expires > now
        for extra in _rows(db, "bans", ("rule", "details")):  # schema 2
            for value in extra.values():
                if value is not None and not isinstance(value, str):
                    return StoreCheck("damaged", f"a ban that cannot be read: {value!r:.60}")
        if "allows" in tables:
            for row in _rows(db, "allows", ("target", "reason", "created")):
                problem = _unreadable(row, expires_may_be_null=False)
                if problem is not None:
                    return StoreCheck("damaged", f"an allow that cannot be read: {problem}")
        return StoreCheck("ok", active_bans=active)
    except (sqlite3.Error, UnicodeDecodeError) as exc:
        return StoreCheck("damaged", _printable(f"SQLite: {exc}"))
    finally:
        db.close()


def _schema_problem(db: sqlite3.Connection) -> str | None:
    """Why the schema would not load for writing, or None.

    A read-only connection overlooks some damage to the schema (a CHECK or an
    index naming a column that is gone) that opening it for writing, as
    BanStore does, refuses: each statement is run again in an empty database.
    """
    rows = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type = 'index'"
    ).fetchall()
    scratch = sqlite3.connect(":memory:")
    try:
        for name, sql in rows:
            if not isinstance(sql, str):
                return f"the definition of {name!r:.60} is not text"
            if not str(name).startswith("sqlite_"):  # SQLite's own tables
                scratch.execute(sql)
    except sqlite3.Error as exc:
        return str(exc)
    finally:
        scratch.close()
    return None


def _rows(db: sqlite3.Connection, table: str, wanted: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Each row of `table` as a dict of the wanted columns it has (an older schema has fewer)."""
    have = {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")}
    columns = [c for c in wanted if c in have]
    if not columns:
        return
    for row in db.execute(f"SELECT {', '.join(columns)} FROM {table}"):
        yield dict(zip(columns, row, strict=True))


def _unreadable(row: dict[str, Any], expires_may_be_null: bool) -> str | None:
    """Why a row is not one this store could have written, or None."""
    target = row.get("target")
    try:
        if not isinstance(target, str):
            raise TargetError("not text")
        parse_target(target)
    except TargetError:
        return _printable(f"target {target!r:.60}")
    for name in ("reason", "source"):
        if name in row and not isinstance(row[name], str):
            return _printable(f"{target}: {name} {row[name]!r:.60}")
    for name in ("created", "expires"):
        value = row.get(name)
        if name not in row or (value is None and expires_may_be_null and name == "expires"):
            continue
        if not isinstance(value, int | float) or not math.isfinite(value):
            return _printable(f"{target}: {name} {value!r:.60}")
    return None


def _printable(text: str, limit: int = 200) -> str:
    """One line for the log, whatever bytes a damaged file held."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:limit]


def set_aside(path: Path, now: float | None = None) -> list[Path]:
    """Rename the store and its WAL companions to `<name>.damaged-<UTC time>[...]`,
    never deleting anything; returns the new paths (the main file first, if any).

    A WAL file left without its database must go too: SQLite would replay it
    into a new database of the same name.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    base = f"{path.name}.damaged-{stamp}"
    for attempt in range(1000):
        name = base if attempt == 0 else f"{base}.{attempt}"
        sources = [path.with_name(path.name + c) for c in ("", *COMPANIONS)]
        targets = [path.with_name(name + c) for c in ("", *COMPANIONS)]
        if not any(os.path.lexists(t) for t in targets):
            break
    else:
        raise RuntimeError(f"cannot find a free name to set {path} aside")
    moved = []
    for source, target in zip(sources, targets, strict=True):
        if os.path.lexists(source):
            os.rename(source, target)
            moved.append(target)
    return moved


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
            self._canonicalize_legacy_targets()

    def _canonicalize_legacy_targets(self) -> None:
        """Rewrite targets stored before they were refused or unmapped: an IPv6 zone id
        (`fd00::12%x`; the kernel held the bare address) and IPv4-mapped IPv6 (now
        the IPv4 address, as the kernel matches it). A target already stored in its
        canonical form keeps its row; the legacy row goes."""
        for table in ("bans", "allows", "ban_events"):
            rows = self._db.execute(
                f"SELECT DISTINCT target FROM {table} "
                "WHERE target LIKE '%!%%' ESCAPE '!' OR target LIKE '::ffff:%'"
            ).fetchall()
            for (text,) in rows:
                address, _, rest = str(text).partition("%")
                length = rest.partition("/")[1:]
                try:
                    canonical = format_target(parse_target(address + "".join(length)))
                except ValueError:
                    continue  # not a legacy form we know: left as it is
                if canonical == text:
                    continue
                if table != "ban_events":
                    taken = self._db.execute(
                        f"SELECT 1 FROM {table} WHERE target = ?", (canonical,)
                    ).fetchone()
                    if taken:
                        self._db.execute(f"DELETE FROM {table} WHERE target = ?", (text,))
                        continue
                self._db.execute(
                    f"UPDATE {table} SET target = ? WHERE target = ?", (canonical, text)
                )

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

    # -- many bans at once (batches; inside the caller's transaction) -----------
    def ban_expiries(self) -> dict[str, float | None]:
        """Every stored ban as target text -> expiry, without parsing the targets."""
        return dict(self._db.execute("SELECT target, expires FROM bans"))

    def ban_sources(self) -> list[tuple[str, str, str]]:
        """Every stored ban as (target text, source, reason), without parsing the targets."""
        return self._db.execute("SELECT target, source, reason FROM bans").fetchall()

    def lift_bans(self, targets: Sequence[str], at: float) -> dict[str, str]:
        """Delete the bans on `targets` (canonical texts), each with its "unban" event, in
        SQL through a temporary table (no row parsed in Python, no giant IN list);
        returns target text -> source of those that were stored."""
        self._db.execute("CREATE TEMP TABLE IF NOT EXISTS lifting (target TEXT PRIMARY KEY)")
        self._db.execute("DELETE FROM temp.lifting")
        self._db.executemany(
            "INSERT OR IGNORE INTO temp.lifting VALUES (?)", [(t,) for t in targets]
        )
        joined = "FROM bans JOIN temp.lifting USING (target)"
        lifted = dict(self._db.execute(f"SELECT target, bans.source {joined}").fetchall())
        self._db.execute(
            f"INSERT INTO ban_events ({_EVENT_COLUMNS}) "
            f"SELECT target, ?, 'unban', source, reason, NULL, rule, details {joined}",
            (at,),
        )
        self._db.execute("DELETE FROM bans WHERE target IN (SELECT target FROM temp.lifting)")
        self._db.execute("DELETE FROM temp.lifting")
        return lifted

    def put_bans(self, bans: Sequence[Ban], texts: Sequence[str], at: float) -> None:
        """Insert or replace many bans, each with its "ban" event at `at`; `texts`: their
        targets' canonical text (format_target), computed once by the caller."""
        self._db.executemany(
            f"INSERT INTO bans ({_BAN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (target) DO UPDATE SET reason = excluded.reason, "
            "source = excluded.source, created = excluded.created, expires = excluded.expires, "
            "rule = excluded.rule, details = excluded.details",
            [
                (text, b.reason, b.source, b.created, b.expires, b.rule, b.details)
                for b, text in zip(bans, texts, strict=True)
            ],
        )
        self._db.executemany(
            f"INSERT INTO ban_events ({_EVENT_COLUMNS}) VALUES (?, ?, 'ban', ?, ?, ?, ?, ?)",
            [
                (
                    text,
                    at,
                    b.source,
                    b.reason,
                    None if b.expires is None else b.expires - b.created,
                    b.rule,
                    b.details,
                )
                for b, text in zip(bans, texts, strict=True)
            ],
        )

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
