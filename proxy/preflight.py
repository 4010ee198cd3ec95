"""Before workers start: everything they will open, tried as the user they will run as.

A worker drops privileges, then opens its access log, reads its certificates and keys,
API keys, JWT keys, rate maps, rule files and OpenAPI documents, and writes its status,
metric and quota files. The master runs as root, so a file that only root may open passes
every check the master makes itself, and then each worker fails on it, one after the
other. So the master forks a checker that drops privileges exactly as a worker does and
opens each file the way the worker will; a problem stops the start (or a reload) before
any worker is forked, with one line naming the file, the user and the fix.

The checker runs in a child process in every case (also without a user to become), so
the master can wait for it without blocking: a SIGTERM that arrives during the check is
acted on at once.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import select
import signal
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from stockade.proxy.anomaly import DEFAULT_RULES_SOCKET
from stockade.proxy.settings import ProxyConfig

log = logging.getLogger("stockade.proxy")

CHECK_TIMEOUT = 300.0  # WAF rule sets can take a while to load; a hung check must not
POLL = 0.1  # how often the master looks for SIGTERM while the checker runs


class ProxyStartupError(RuntimeError):
    pass


class CheckInterrupted(Exception):
    """SIGTERM or SIGINT arrived while the checker ran; it was stopped."""


class Access(Enum):
    READ = "read"  # a file the worker reads (at start, and again on SIGHUP)
    APPEND = "append"  # a file the worker opens to append to, creating it if missing
    DIRECTORY = "directory"  # a directory the worker writes files in
    DATABASE = "database"  # SQLite: the file, and its directory for the journal
    SOCKET = "socket"  # a Unix socket the worker connects to (may be absent at start)


@dataclass(frozen=True)
class WorkerFile:
    what: str  # what it is, with the config key that names it
    path: Path
    access: Access
    required: bool = True  # False: the worker goes on without it (a warning, not an error)


def worker_ids(user: str | None, group: str | None) -> tuple[int, int] | None:
    """The uid and gid workers run as (None: they stay who the master is)."""
    if user is None:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ProxyStartupError(f"proxy.user {user!r} does not exist") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ProxyStartupError(f"proxy.group {group!r} does not exist") from None
    return entry.pw_uid, gid


def drop_privileges(user: str | None, group: str | None) -> None:
    if user is None or os.geteuid() != 0:
        return
    ids = worker_ids(user, group)
    assert ids is not None
    os.setgroups([])
    os.setgid(ids[1])
    os.setuid(ids[0])


def worker_files(config: ProxyConfig) -> list[WorkerFile]:
    """What a worker opens after it dropped privileges, as named in the config."""
    files: list[WorkerFile] = []
    read = Access.READ
    for listener in config.listeners:
        for pair in listener.certificates:
            files.append(WorkerFile(f"{listener.name} certificate", pair.cert, read))
            files.append(WorkerFile(f"{listener.name} private key", pair.key, read))
    auth = config.auth
    if auth.api_keys_file is not None:
        files.append(WorkerFile("proxy.auth.api_keys_file", auth.api_keys_file, read))
    for issuer in auth.issuers:
        where = f"proxy.auth.issuers {issuer.name!r}"
        files += [WorkerFile(f"{where} key file", path, read) for path in issuer.key_files]
        if issuer.secret_file is not None:
            files.append(WorkerFile(f"{where} secret file", issuer.secret_file, read))
        if issuer.ca_file is not None:
            files.append(WorkerFile(f"{where} ca_file", issuer.ca_file, read))
    for rule in config.rate_limiting.limits:
        if rule.map_file is not None:
            files.append(WorkerFile(f"rate limit {rule.name!r} map", rule.map_file, read))
    if any(rule.user_agents for rule in config.anomaly.rules):
        files.append(
            WorkerFile("proxy.anomaly.user_agents_file", config.anomaly.user_agents_file, read)
        )
    if any(route.waf.mode == "sqli_xss" for route in config.routes):
        files.append(WorkerFile("proxy.waf.sqli_xss_rules", config.waf.sqli_xss_rules, read))
    for route in config.routes:
        if route.waf.openapi is not None:
            files.append(WorkerFile(f"route {route.name!r} openapi", route.waf.openapi, read))
    if config.access_log != "-":
        files.append(WorkerFile("proxy.access_log", Path(config.access_log), Access.APPEND))
    if any(plan.per_day or plan.per_month for plan in config.quotas.plans):
        files.append(WorkerFile("proxy.quotas.database", config.quotas.database, Access.DATABASE))
    # Status and metrics are conveniences: a worker serves without them (and says so).
    files.append(WorkerFile("proxy.status_dir", config.status_dir, Access.DIRECTORY, False))
    if config.admin.enabled:
        files.append(WorkerFile("proxy.metrics_dir", config.metrics_dir, Access.DIRECTORY, False))
    if any(rule.action == "ban" for rule in config.anomaly.rules):
        socket_path = config.anomaly.rules_socket or DEFAULT_RULES_SOCKET
        files.append(WorkerFile("proxy.anomaly.rules_socket", socket_path, Access.SOCKET, False))
    return files


def _owner(path: Path) -> str:
    """Who owns path and its mode, e.g. "owner root, group root, mode 0700"."""
    try:
        info = path.stat()
    except OSError:
        return "not readable"
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f"owner {owner}, group {group}, mode {stat.S_IMODE(info.st_mode):04o}"


def _closed_directory(path: Path) -> Path | None:
    """The first directory on the way to path that this process may not enter."""
    for directory in reversed(path.parents):
        if not os.path.lexists(directory):
            return None  # opening says so ("does not exist")
        if not os.access(directory, os.X_OK):
            return directory
    return None


class _Checker:
    """Runs in the child, after it dropped privileges: real and effective ids are the
    workers' own, so os.access answers for them."""

    def __init__(self) -> None:
        self.user = pwd.getpwuid(os.getuid()).pw_name
        try:
            self.group = grp.getgrgid(os.getgid()).gr_name
        except KeyError:
            self.group = str(os.getgid())

    def problem(self, item: WorkerFile) -> str | None:
        """None when the worker will manage; else one line: what, which file, who, the fix."""
        path, user = item.path, self.user
        head = f"{item.what} {path}: the workers' user {user}"
        closed = _closed_directory(path)
        if closed is not None:
            return (
                f"{head} cannot enter the directory {closed} ({_owner(closed)}); let {user} "
                f"through (e.g. chmod o+x {closed}) or move the file"
            )
        try:
            self._open(item)
        except FileNotFoundError:
            if item.access in (Access.READ, Access.SOCKET):
                return None  # its loader says "file not found"; a socket may come later
            return f"{head} cannot create it: {path.parent} does not exist; create it"
        except (OSError, sqlite3.Error) as exc:
            return f"{head} {self._cannot(item, exc)}"
        return None

    def _open(self, item: WorkerFile) -> None:
        path = item.path
        if item.access is Access.READ:
            with path.open("rb"):
                pass
        elif item.access is Access.APPEND:  # as AccessLog opens it ("a"), but never waiting
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                os.close(os.open(path, flags, 0o666))
            except OSError as exc:
                # a FIFO with no reader yet (a log shipper that starts later) is fine
                if exc.errno != errno.ENXIO or not stat.S_ISFIFO(path.stat().st_mode):
                    raise
        elif item.access is Access.DIRECTORY:
            probe = path / f".stockade-check-{os.getpid()}"
            probe.touch()
            probe.unlink()
        elif item.access is Access.DATABASE:
            if not path.exists():
                raise FileNotFoundError(path)
            db = sqlite3.connect(path, timeout=5.0)  # the master created it before forking
            try:
                db.execute("BEGIN IMMEDIATE")  # takes the write lock: creates the journal
                db.execute("ROLLBACK")
            finally:
                db.close()
        elif path.exists() and not os.access(path, os.W_OK):  # a socket: connecting writes
            raise PermissionError(f"cannot connect to {path}")

    def _cannot(self, item: WorkerFile, exc: BaseException) -> str:
        path, user, group = item.path, self.user, self.group
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if item.access is Access.READ:
            return (
                f"cannot read it ({reason}; {_owner(path)}); make it readable by {user} "
                f"(e.g. chgrp {group} {path} && chmod g+r {path})"
            )
        if item.access is Access.APPEND:
            if path.exists():
                return f"cannot write it ({reason}; {_owner(path)}); fix: chown {user} {path}"
            return (
                f"cannot create it in {path.parent} ({reason}; {_owner(path.parent)}); fix: "
                f"touch {path} && chown {user} {path}, or choose a directory {user} may write in"
            )
        if item.access is Access.SOCKET:
            return (
                f"cannot connect to it ({_owner(path)}); rule bans will not reach the "
                f"kernel; set controller.rules_group to {group} (or a group {user} is in)"
            )
        directory = path if item.access is Access.DIRECTORY else path.parent
        return (
            f"cannot write in {directory} ({reason}; {_owner(directory)}); fix: chown "
            f"{user} {directory}" + ("" if directory == path else f" {path}*")
        )


Report = dict[str, list[str]]


def _check_here(config: ProxyConfig, validate: Callable[[ProxyConfig], None]) -> Report:
    """In the child: become the workers' user, try every file, then load everything."""
    errors: list[str] = []
    warnings: list[str] = []
    try:
        drop_privileges(config.user, config.group)
    except ProxyStartupError as exc:
        return {"errors": [str(exc)], "warnings": []}
    checker = _Checker()
    for item in worker_files(config):
        problem = checker.problem(item)
        if problem is not None:
            (errors if item.required else warnings).append(problem)
    if errors:
        return {"errors": errors, "warnings": warnings}
    try:  # what the worker loads at start (certificates, keys, rules...), as it will
        validate(config)
    except ProxyStartupError as exc:
        message = str(exc)
        if config.user is not None:
            message += f" (checked as the workers' user {checker.user})"
        errors.append(message)
    return {"errors": errors, "warnings": warnings}


def check_as_worker(
    config: ProxyConfig,
    validate: Callable[[ProxyConfig], None],
    stop_requested: Callable[[], bool],
) -> None:
    """Raise ProxyStartupError (one line) if a worker could not start with this config.

    validate(config) is run too, as the workers' user. stop_requested() is polled while
    the checker runs; when it says so, the checker is killed and CheckInterrupted raised.
    Warnings (files a worker can do without) are logged.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the checker: never returns
        os.close(read_end)
        try:
            report = _check_here(config, validate)
        except BaseException as exc:  # a bug in a check: say so, do not hang the master
            report = {"errors": [f"the start check failed: {type(exc).__name__}: {exc}"]}
        try:
            with os.fdopen(write_end, "w", encoding="utf-8") as out:
                json.dump(report, out)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = _collect(read_end, pid, stop_requested)
    finally:
        os.close(read_end)
    try:
        report = json.loads(data)
    except ValueError:
        raise ProxyStartupError("the start check died before it reported") from None
    for warning in report.get("warnings", []):
        log.warning("%s", warning)
    errors = report.get("errors", [])
    for extra in errors[1:]:
        log.error("%s", extra)
    if errors:
        raise ProxyStartupError(errors[0])


def _collect(read_end: int, pid: int, stop_requested: Callable[[], bool]) -> bytes:
    """The checker's report, waiting for it in short steps; the checker is reaped."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + CHECK_TIMEOUT
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], POLL)
            if ready:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                continue
            if stop_requested():
                raise CheckInterrupted()
            if time.monotonic() > deadline:
                raise ProxyStartupError(f"the start check did not finish in {CHECK_TIMEOUT:.0f}s")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    os.waitpid(pid, 0)  # it exits right after writing
    return b"".join(chunks)
