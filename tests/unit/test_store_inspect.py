"""inspect_store looks at bans.db without changing it; set_aside never deletes.

What the controller does with each finding is tested through a real controller
in tests/cli/test_cli_ban_store_guard.py.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.controller.store import SQLITE_HEADER, Ban, BanStore, inspect_store, set_aside
from stockade.targets import parse_target

NOW = 1_800_000_000.0


def make_store(path: Path, bans: int = 300, expired: int = 0) -> None:
    store = BanStore(path)
    try:
        with store.transaction():
            for i in range(bans + expired):
                target = parse_target(f"198.18.{i // 250}.{i % 250 + 1}")
                expires = NOW - 60 if i >= bans else NOW + 3600
                store.put_ban(Ban(target, "scanner " * 10, "cli", NOW - 100, expires))
    finally:
        store.close()


def digests(path: Path) -> dict[str, str]:
    """The store and what its WAL holds, byte for byte. A read-only open of a WAL-mode
    database may create an empty WAL (and -shm, SQLite's rebuildable index): no data."""
    out = {}
    for suffix in ("", "-wal"):
        file = path.with_name(path.name + suffix)
        if file.exists() and file.stat().st_size:
            out[suffix] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "bans.db"
    make_store(path)
    assert not path.with_name("bans.db-wal").exists()  # closed: checkpointed
    return path.read_bytes()


def test_a_missing_store(tmp_path: Path) -> None:
    found = inspect_store(tmp_path / "bans.db", NOW)
    assert found.state == "missing"
    assert not (tmp_path / "bans.db").exists()  # and nothing created


def test_a_good_store_counts_only_active_bans(tmp_path: Path) -> None:
    path = tmp_path / "bans.db"
    make_store(path, bans=7, expired=3)
    before = digests(path)
    found = inspect_store(path, NOW)
    assert (found.state, found.active_bans) == ("ok", 7)
    assert digests(path) == before


def test_bans_committed_only_to_the_wal_are_seen_and_left_alone(tmp_path: Path) -> None:
    """A controller killed before a checkpoint leaves its last bans in bans.db-wal."""
    path = tmp_path / "bans.db"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from stockade.controller.store import Ban, BanStore\n"
        "from stockade.targets import parse_target\n"
        "store = BanStore(Path(sys.argv[1]))\n"
        "with store.transaction():\n"
        "    for i in range(40):\n"
        "        store.put_ban(Ban(parse_target(f'198.18.0.{i + 1}'), 'r', 'cli', 1.0, None))\n"
        "os._exit(0)  # no close, no checkpoint\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    assert path.with_name("bans.db-wal").stat().st_size > 0
    before = digests(path)
    found = inspect_store(path, NOW)
    assert (found.state, found.active_bans) == ("ok", 40)
    assert digests(path) == before


def test_a_database_nothing_was_written_to_is_an_empty_store(tmp_path: Path) -> None:
    path = tmp_path / "bans.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 0")  # writes the header, no table
    db.commit()
    db.close()
    assert inspect_store(path, NOW).state == "ok"


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b"", "it is empty (0 bytes)"),
        (b"not a database at all\n" * 100, "it is not an SQLite database"),
        (b"SQLite format 2\x00" + b"\x00" * 4080, "it is not an SQLite database"),
        (SQLITE_HEADER + os.urandom(8192), ""),
    ],
    ids=["empty", "text", "other-header", "header-then-noise"],
)
def test_files_that_are_no_store_are_damaged(tmp_path: Path, content: bytes, detail: str) -> None:
    path = tmp_path / "bans.db"
    path.write_bytes(content)
    found = inspect_store(path, NOW)
    assert found.state == "damaged"
    assert detail in found.detail
    assert path.read_bytes() == content


def test_someone_elses_database_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "bans.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE orders (id INTEGER)")
    db.commit()
    db.close()
    found = inspect_store(path, NOW)
    assert (found.state, found.detail) == (
        "damaged",
        "it has no bans table: not a stockade ban store",
    )


def test_a_directory_in_its_place_is_damaged(tmp_path: Path) -> None:
    (tmp_path / "bans.db").mkdir()
    assert inspect_store(tmp_path / "bans.db", NOW).state == "damaged"


@settings(max_examples=60)
@given(data=st.data())
def test_a_truncated_store_is_never_taken_for_a_good_one(
    tmp_path_factory: pytest.TempPathFactory, good_bytes: bytes, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(good_bytes) - 1), label="cut")
    path = tmp_path_factory.mktemp("cut") / "bans.db"
    path.write_bytes(good_bytes[:cut])
    found = inspect_store(path, NOW)
    assert found.state == "damaged", (cut, found)
    assert path.read_bytes() == good_bytes[:cut]


@settings(max_examples=60)
@given(data=st.data())
def test_a_store_taken_for_good_can_be_read_whole(
    tmp_path_factory: pytest.TempPathFactory, good_bytes: bytes, data: st.DataObject
) -> None:
    """A run of bytes overwritten anywhere after the header (a bad disk, a stray write).

    SQLite keeps no checksum of a row's values, so damage inside one may pass
    PRAGMA integrity_check; what passes inspect_store must still open, and every
    ban in it must read, or the controller would stop halfway through a start.
    """
    start = data.draw(st.integers(100, len(good_bytes) - 512), label="start")
    length = data.draw(st.integers(1, 512), label="length")
    damaged = bytearray(good_bytes)
    damaged[start : start + length] = b"\xa5" * length
    path = tmp_path_factory.mktemp("overwritten") / "bans.db"
    path.write_bytes(bytes(damaged))
    found = inspect_store(path, NOW)
    assert path.read_bytes() == bytes(damaged)
    if found.state == "ok":
        store = BanStore(path)
        try:
            assert len(store.bans()) == 300
        finally:
            store.close()
    else:
        assert found.state == "damaged"


def test_damage_reported_in_bytes_that_are_not_text_is_still_damage(
    tmp_path: Path, good_bytes: bytes
) -> None:
    """A garbled schema: SQLite's error message quotes the bad byte (not UTF-8)."""
    at = good_bytes.index(b"target  TEXT PRIMARY KEY") + len("target  TEXT PRIMARY ")
    damaged = good_bytes[:at] + b"\xa5" + good_bytes[at + 1 :]
    path = tmp_path / "bans.db"
    path.write_bytes(damaged)
    found = inspect_store(path, NOW)
    assert found.state == "damaged"
    assert found.detail.isprintable()
    assert path.read_bytes() == damaged


@pytest.mark.parametrize(
    ("column", "value", "detail"),
    [
        ("target", "198.18.0.300", "target '198.18.0.300'"),
        ("target", "198.18.0.7/24", "target '198.18.0.7/24'"),
        ("target", b"\x01\x02", "target b'\\x01\\x02'"),
        ("expires", "soon", "198.18.0.1: expires 'soon'"),
        ("created", None, "198.18.0.1: created None"),
    ],
)
def test_a_ban_that_cannot_be_read_makes_the_store_damaged(
    tmp_path: Path, column: str, value: object, detail: str
) -> None:
    path = tmp_path / "bans.db"
    make_store(path, bans=2)
    db = sqlite3.connect(path)
    db.execute("PRAGMA ignore_check_constraints = 1")
    db.execute("CREATE TABLE loose AS SELECT * FROM bans")  # no NOT NULL: any value goes
    db.execute("DROP TABLE bans")
    db.execute("ALTER TABLE loose RENAME TO bans")
    db.execute(f"UPDATE bans SET {column} = ? WHERE target = '198.18.0.1'", (value,))
    db.commit()
    db.close()
    found = inspect_store(path, NOW)
    assert (found.state, found.detail) == ("damaged", f"a ban that cannot be read: {detail}")


# -- set_aside ---------------------------------------------------------------------------
def test_set_aside_moves_the_store_and_its_wal_and_deletes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bans.db"
    files = {"": b"main", "-wal": b"wal", "-shm": b"shm"}
    for suffix, content in files.items():
        path.with_name("bans.db" + suffix).write_bytes(content)
    moved = set_aside(path, NOW)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(NOW))
    assert moved == [tmp_path / f"bans.db.damaged-{stamp}{s}" for s in files]
    for suffix, content in files.items():
        assert not path.with_name("bans.db" + suffix).exists()
        assert (tmp_path / f"bans.db.damaged-{stamp}{suffix}").read_bytes() == content

    # the same second again: a new name, the first one untouched
    path.write_bytes(b"second")
    again = set_aside(path, NOW)
    assert again == [tmp_path / f"bans.db.damaged-{stamp}.1"]
    assert again[0].read_bytes() == b"second"
    assert (tmp_path / f"bans.db.damaged-{stamp}").read_bytes() == b"main"


def test_set_aside_takes_a_wal_left_without_its_store(tmp_path: Path) -> None:
    path = tmp_path / "bans.db"
    path.with_name("bans.db-wal").write_bytes(b"orphan")
    moved = set_aside(path, NOW)
    assert [p.name.endswith("-wal") for p in moved] == [True]
    assert moved[0].read_bytes() == b"orphan"
    assert not path.with_name("bans.db-wal").exists()
