"""The start check (proxy/preflight.py): every file a worker opens, tried as its user.

check_as_worker forks a checker that drops privileges to `nobody`, so these run as root
against files and directories with real owners and modes.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.proxy.preflight import (
    CheckInterrupted,
    ProxyStartupError,
    check_as_worker,
    drop_privileges,
)
from stockade.proxy.ratelimit_settings import Plan, QuotaConfig
from stockade.proxy.settings import ProxyConfig

NOBODY = pwd.getpwnam("nobody")


def nothing_to_validate(config: ProxyConfig) -> None:
    pass


def never() -> bool:
    return False


def check(config: ProxyConfig) -> None:
    check_as_worker(config, nothing_to_validate, never)


def open_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="stockade-preflight-", dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture
def base() -> Iterator[Path]:
    path = open_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(base: Path, **changes: object) -> ProxyConfig:
    status = base / "status"
    if not status.exists():
        status.mkdir()
        os.chown(status, NOBODY.pw_uid, NOBODY.pw_gid)
    return ProxyConfig(user="nobody", status_dir=status, **changes)  # type: ignore[arg-type]


def nobody_can_append(path: Path) -> bool:
    """The ground truth, found apart from the checker: a child as nobody opens the file."""
    pid = os.fork()
    if pid == 0:
        try:
            drop_privileges("nobody", None)
            with path.open("a"):
                pass
        except OSError:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@settings(max_examples=40)
@given(
    dir_mode=st.sampled_from([0o700, 0o711, 0o755, 0o733, 0o777, 0o1777, 0o300]),
    dir_owner_nobody=st.booleans(),
    file_state=st.sampled_from(["missing", "root 0600", "root 0666", "nobody 0600", "a dir"]),
)
def test_the_access_log_check_agrees_with_a_real_open(
    dir_mode: int, dir_owner_nobody: bool, file_state: str
) -> None:
    base = open_dir()
    try:
        directory = base / "logs"
        directory.mkdir()
        log = directory / "access.log"
        if file_state == "a dir":
            log.mkdir()
        elif file_state != "missing":
            owner, mode = file_state.split()
            log.write_text("")
            log.chmod(int(mode, 8))
            if owner == "nobody":
                os.chown(log, NOBODY.pw_uid, NOBODY.pw_gid)
        if dir_owner_nobody:
            os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
        directory.chmod(dir_mode)
        can = nobody_can_append(log)
        config = as_nobody(base, access_log=str(log))
        if can:
            check(config)
        else:
            with pytest.raises(ProxyStartupError) as refused:
                check(config)
            message = str(refused.value)
            assert message.startswith(f"proxy.access_log {log}: the workers' user nobody ")
            assert "\n" not in message
            assert "chmod" in message or "chown" in message or "Is a directory" in message
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_root_only_certificate_key_is_named_with_the_fix(base: Path) -> None:
    from stockade.proxy.settings import Certificate, Listener

    key = base / "key.pem"
    key.write_text("")
    key.chmod(0o600)
    cert = base / "cert.pem"
    cert.write_text("")
    listener = Listener("127.0.0.1", 8443, (Certificate(cert, key),))
    with pytest.raises(ProxyStartupError) as refused:
        check(as_nobody(base, listeners=(listener,)))
    message = str(refused.value)
    assert f"private key {key}: the workers' user nobody cannot read it" in message
    assert f"chgrp nogroup {key} && chmod g+r {key}" in message


def test_a_quota_database_the_workers_cannot_write(base: Path) -> None:
    database = base / "quota" / "usage.db"
    database.parent.mkdir()
    sqlite3.connect(database).close()
    os.chown(database, NOBODY.pw_uid, NOBODY.pw_gid)  # the file, not its directory
    quotas = QuotaConfig(plans=(Plan("free", per_day=10),), database=database)
    with pytest.raises(ProxyStartupError, match=r"cannot write in .*quota.*chown nobody"):
        check(as_nobody(base, quotas=quotas))
    os.chown(database.parent, NOBODY.pw_uid, NOBODY.pw_gid)  # sqlite's journal goes there
    check(as_nobody(base, quotas=quotas))


def test_a_status_dir_the_workers_cannot_write_is_only_a_warning(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status = base / "private" / "status"
    status.mkdir(parents=True)
    (base / "private").chmod(0o700)
    with caplog.at_level(logging.WARNING, logger="stockade.proxy"):
        check(ProxyConfig(user="nobody", status_dir=status))
    assert any(
        f"proxy.status_dir {status}: the workers' user nobody cannot enter" in r.message
        for r in caplog.records
    )


def test_an_unknown_user_is_a_startup_error(base: Path) -> None:
    with pytest.raises(ProxyStartupError, match=r"proxy\.user 'no-such-user' does not exist"):
        check(ProxyConfig(user="no-such-user", status_dir=base))


def test_validate_runs_as_the_workers_user(base: Path) -> None:
    def whoami(config: ProxyConfig) -> None:
        raise ProxyStartupError(f"uid {os.getuid()} gid {os.getgid()} groups {os.getgroups()}")

    with pytest.raises(ProxyStartupError) as refused:
        check_as_worker(as_nobody(base), whoami, never)
    assert str(refused.value) == (
        f"uid {NOBODY.pw_uid} gid {NOBODY.pw_gid} groups [] (checked as the workers' user nobody)"
    )


def test_a_stop_request_kills_the_checker_at_once(base: Path) -> None:
    def slow(config: ProxyConfig) -> None:
        time.sleep(30)

    asked: list[float] = []

    def stop_after_a_moment() -> bool:
        asked.append(time.monotonic())
        return len(asked) > 2

    before = children()
    started = time.monotonic()
    with pytest.raises(CheckInterrupted):
        check_as_worker(as_nobody(base), slow, stop_after_a_moment)
    assert time.monotonic() - started < 1.0
    assert children() == before  # the checker was killed and reaped, not left behind


def children() -> set[int]:
    """This process's children, zombies included."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids |= {int(pid) for pid in (task / "children").read_text().split()}
    return pids


def test_a_checker_that_dies_is_a_startup_error(base: Path) -> None:
    def die(config: ProxyConfig) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(ProxyStartupError, match="the start check died before it reported"):
        check_as_worker(as_nobody(base), die, never)


def test_an_access_log_in_a_missing_directory(base: Path) -> None:
    log = base / "missing" / "access.log"
    with pytest.raises(ProxyStartupError) as refused:
        check(as_nobody(base, access_log=str(log)))
    assert str(refused.value) == (
        f"proxy.access_log {log}: the workers' user nobody cannot create it: "
        f"{log.parent} does not exist; create it"
    )


def test_an_access_log_fifo_without_a_reader_does_not_hang_the_check(base: Path) -> None:
    fifo = base / "access.fifo"
    os.mkfifo(fifo)
    fifo.chmod(0o666)
    started = time.monotonic()
    check(as_nobody(base, access_log=str(fifo)))  # a log shipper may start later
    assert time.monotonic() - started < 5
