"""`stockade proxy run`: a master process and N workers sharing the ports.

The master binds one SO_REUSEPORT socket per worker and listener (as root, so
low ports work), then forks the workers; each worker drops privileges and
serves its own sockets. Before that, a checker tries, as the workers' user,
everything a worker will open (proxy/preflight.py): a worker that could not
start stops the proxy with one line instead of crashing again and again.
A worker that dies is replaced on the same sockets, so connections queued on
them are not lost; one that dies before it serves is restarted with a
growing back-off, and when START_ATTEMPTS in a row fail while no worker
serves, the master closes the sockets (clients are refused, not left
hanging) and exits 1 with the worker's last error. SIGTERM drains: workers
stop accepting, finish in-flight requests (up to drain_timeout) and exit; the
master acts on it within a second whatever it is doing, back-off included.
SIGHUP reloads the config.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import pwd
import signal
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client.multiprocess import mark_process_dead

from stockade import __version__, logs
from stockade.admin_http import AdminError, AdminServer
from stockade.clock import SystemClock
from stockade.config import Config, ConfigError, load_config
from stockade.proxy.admin import ADMIN_FILE, render_workers
from stockade.proxy.anomaly import UserAgentListError, load_user_agents
from stockade.proxy.api_keys import ApiKeyError
from stockade.proxy.app import Gateway
from stockade.proxy.auth_setup import AuthSetupError, api_key_entries, issuer_configs
from stockade.proxy.cluster_counters import cluster_scoped
from stockade.proxy.context import reset_request_ids
from stockade.proxy.limits import GuardedAppRunner, GuardedServer, LimitCounters, handler_kwargs
from stockade.proxy.metrics import check_writable, enable_multiprocess, record_build_info
from stockade.proxy.parser_check import require_c_parser
from stockade.proxy.preflight import (
    CheckInterrupted,
    check_as_worker,
    drop_privileges,
    worker_ids,
)
from stockade.proxy.preflight import ProxyStartupError as ProxyStartupError  # re-exported
from stockade.proxy.rate_maps import RateMap, RateMapError
from stockade.proxy.redirect import redirect_app
from stockade.proxy.settings import Listener, ProxyConfig
from stockade.proxy.shared_state import SharedState, quotas_used
from stockade.proxy.status import (
    MASTER_FILE,
    RELOAD_FILE,
    StatusPublisher,
    clear,
    worker_file,
    write_atomically,
)
from stockade.proxy.status_page import status_pages
from stockade.proxy.tls import ServerTls, TlsConfigError, TlsSite
from stockade.proxy.waf.firewall import WafLoadError, check_waf
from stockade.redis_conn import check_credentials

log = logging.getLogger("stockade.proxy")

RESTART_BACKOFF_FIRST = 0.1  # doubled for each worker death in a row soon after its start
RESTART_BACKOFF_MAX = 5.0
START_ATTEMPTS = 5  # a worker that dies before serving this often in a row, none serving: stop
EXIT_CANNOT_START = 3  # a worker that cannot start stops the proxy instead of looping
LISTEN_BACKLOG = 1024
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
MASTER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
DRAIN_GRACE = 5.0  # keep-alive clients get this long to send their next request
STOP_GRACE = 5.0  # on top of drain_timeout before a worker is killed


@dataclass
class WorkerSlot:
    index: int
    sockets: list[tuple[Listener, socket.socket]]
    pid: int = 0  # 0: no worker (not started yet, or waiting for its restart)
    started: float = 0.0
    failures: int = 0  # deaths in a row soon after starting: the back-off grows
    report: int = -1  # the master's end of the worker's report pipe ("ready", "error ...")
    ready: bool = False  # the worker said it serves
    start_failures: int = 0  # workers in a row that died before they served
    last_error: str = ""  # the last error line a worker of this slot reported
    restart_at: float | None = None


def bind(listener: Listener) -> socket.socket:
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listener.address, listener.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ProxyStartupError(f"cannot listen on {listener.name}: {exc.strerror}") from None
    return sock


def _table_sizes(config: ProxyConfig) -> tuple[object, ...]:
    """What the shared tables are made from: when it changes, new tables are needed."""
    q = config.quotas
    return (
        config.rate_limiting.max_keys,
        config.anomaly.max_keys,
        config.anomaly.rules != (),
        (quotas_used(config), q.max_consumers, q.timezone, q.database),
    )


def check_policy_files(config: ProxyConfig) -> None:
    """Rate maps and the User-Agent list parse (else the workers would fail one by one)."""
    for rule in config.rate_limiting.limits:
        if rule.map_file is not None:
            RateMap(rule.map_file, rule.rate)
    if any(rule.user_agents for rule in config.anomaly.rules):
        load_user_agents(config.anomaly.user_agents_file)


def load_tls(config: ProxyConfig) -> dict[Listener, ServerTls]:
    tls = {}
    for listener in config.listeners:
        if listener.tls:
            try:
                tls[listener] = ServerTls(listener.certificates)
            except TlsConfigError as exc:
                raise ProxyStartupError(f"{listener.name}: {exc}") from None
    return tls


def listener_site(
    runner: web.BaseRunner, sock: socket.socket, context: ssl.SSLContext | None
) -> web.SockSite:
    """The site serving one listener's socket: HTTPS through TlsServer (proxy/tls.py),
    so that handshakes are timed and counted from accept."""
    if context is None:
        return web.SockSite(runner, sock, backlog=LISTEN_BACKLOG)
    server = runner.server
    if not isinstance(server, GuardedServer):  # its handlers are what TlsServer drives
        raise TypeError("an HTTPS listener needs a GuardedServer")
    return TlsSite(runner, sock, server, context)


async def _serve(
    config: ProxyConfig,
    index: int,
    sockets: list[tuple[Listener, socket.socket]],
    shared: SharedState,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """One worker: every listener's socket, one pipeline, until SIGTERM."""
    tls = load_tls(config)
    gateway = Gateway(config, SystemClock(), shared)
    await gateway.start()
    counters = LimitCounters()  # shared by every listener: max_connections is per worker
    publisher = StatusPublisher(
        worker_file(config.status_dir, index),
        index,
        gateway.upstreams.states,
        counters,
        gateway.auth.failures,
        gateway.limiter.refused,
        gateway.anomaly.snapshot,
    )
    publisher.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def reload_tls() -> None:
        for listener, server_tls in tls.items():
            try:
                server_tls.reload()
                log.info("%s: certificates reloaded", listener.name)
            except TlsConfigError as exc:
                log.error(
                    "%s: certificate reload failed, keeping the old ones: %s", listener.name, exc
                )

    loop.add_signal_handler(signal.SIGHUP, reload_tls)
    runners: list[web.BaseRunner] = []
    sites: list[web.SockSite] = []
    kwargs = handler_kwargs(config)
    try:
        for listener, sock in sockets:
            runner: web.BaseRunner
            if listener.redirect_to_https is not None:
                runner = GuardedAppRunner(
                    redirect_app(listener.redirect_to_https),
                    config,
                    counters,
                    handle_signals=False,
                    access_log=None,
                    shutdown_timeout=config.drain_timeout,
                    **kwargs,
                )
            else:
                server = gateway.server("https" if listener.tls else "http", counters)
                runner = web.ServerRunner(
                    server, handle_signals=False, shutdown_timeout=config.drain_timeout
                )
            await runner.setup()
            site = listener_site(runner, sock, tls[listener].context if listener in tls else None)
            await site.start()
            runners.append(runner)
            sites.append(site)
        on_ready()
        await stop.wait()
        await _wind_down(sites, gateway, counters, config)
    finally:
        # cleanup stops accepting, then waits for in-flight requests
        for runner in runners:
            await runner.cleanup()
        await publisher.stop()
        await gateway.close()


async def _wind_down(
    sites: list[web.SockSite], gateway: Gateway, counters: LimitCounters, config: ProxyConfig
) -> None:
    """Before the runners' cleanup: let keep-alive clients leave on their own.

    New connections stop at once (the sockets stay open in the master and
    the other workers, which accept them); every response from now on says
    `Connection: close`, so a client in the middle of a keep-alive
    conversation gets its next answer and reconnects to another worker
    instead of finding its connection cut. Connections still open after
    the grace period are closed by the cleanup, as keepalive_timeout would.
    """
    for site in sites:
        server = getattr(site, "_server", None)  # aiohttp keeps the asyncio.Server here
        if server is not None:
            server.close()
    gateway.draining.active = True
    deadline = time.monotonic() + min(DRAIN_GRACE, config.drain_timeout)
    while counters.connections_active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _loop_runner() -> asyncio.Runner:
    try:
        import uvloop  # optional: faster when installed
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _report(fd: int, line: str) -> None:
    """One line to the master over the report pipe ("ready", or "error <message>")."""
    with contextlib.suppress(OSError):
        os.write(fd, (" ".join(line.split()) + "\n").encode("utf-8", "replace"))


def _worker_main(config: ProxyConfig, slot: WorkerSlot, shared: SharedState, report: int) -> None:
    """The child after fork: never returns."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
    for sig in MASTER_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    reset_request_ids()
    code = 0
    try:
        drop_privileges(config.user, config.group)
        if config.admin.enabled:
            check_writable(config.metrics_dir)
        with _loop_runner() as runner:
            runner.run(
                _serve(config, slot.index, slot.sockets, shared, lambda: _report(report, "ready"))
            )
    except ProxyStartupError as exc:
        log.error("worker %d: %s", slot.index, exc)
        _report(report, f"error {exc}")
        code = EXIT_CANNOT_START
    except Exception as exc:
        log.exception("worker %d crashed", slot.index)
        _report(report, f"error {type(exc).__name__}: {exc}")
        code = 1
    logging.shutdown()
    os._exit(code)


def validate(config: ProxyConfig) -> None:
    """Everything that would make a worker fail at start, checked in the master (at start
    and before a reload): certificates, API keys and JWT secrets, rate maps, User-Agents."""
    load_tls(config)
    try:
        api_key_entries(config.auth)
        issuer_configs(config.auth)
        check_policy_files(config)
    except (ApiKeyError, AuthSetupError, RateMapError, UserAgentListError) as exc:
        raise ProxyStartupError(str(exc)) from None
    try:  # and the WAF's engine, rule sets and OpenAPI documents
        check_waf(config)
    except WafLoadError as exc:
        raise ProxyStartupError(str(exc)) from None
    if cluster_scoped(config):  # a password Redis refuses stops the start (unreachable: logged)
        error = check_credentials(config.cluster)
        if error is not None:
            raise ProxyStartupError(error)


class _Stopped(Exception):
    """SIGTERM or SIGINT arrived during a start or reload check."""


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with {code}"


class Master:
    def __init__(self, config: Config) -> None:
        self.path = config.path
        self.config = config.proxy
        self.control_socket = config.controller.socket  # the status page's kernel side
        self.retiring: set[int] = set()  # old workers draining after a reload
        self.generation = 0
        self.slots: list[WorkerSlot] = []
        self.stopping = False
        self.exit_code = 0
        self.shared: SharedState | None = None
        self.admin: AdminServer | None = None

    def start(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        require_c_parser()
        if not self.config.listeners:
            raise ProxyStartupError("no listeners in [[proxy.listeners]]; nothing to serve")
        if not self.config.routes:
            log.warning("no [[proxy.routes]]: every request will get 404")
        worker_ids(self.config.user, self.config.group)  # they exist, before anything is made
        try:
            self._prepare_directories()
        except OSError as exc:
            raise ProxyStartupError(f"cannot prepare {exc.filename}: {exc.strerror}") from None
        try:  # before forking: every worker must map the same tables
            self.shared = SharedState.create(self.config)
        except (OSError, sqlite3.Error) as exc:
            raise ProxyStartupError(f"cannot prepare the quota database: {exc}") from None
        try:  # what the master made above, and every file the config names, as the workers
            self._check_as_worker(self.config)
        except _Stopped:
            log.info("stopped before starting")
            self.stopping = True
            return
        self._start_admin()
        count = self.config.worker_count
        for index in range(count):
            sockets = [(listener, bind(listener)) for listener in self.config.listeners]
            self.slots.append(WorkerSlot(index, sockets))
        for slot in self.slots:
            self._spawn(slot)
        names = ", ".join(listener.name for listener in self.config.listeners)
        log.info("proxy serving %s with %d workers", names, count)

    def _prepare_directories(self) -> None:
        self.config.status_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self.config.status_dir / MASTER_FILE, {"pid": os.getpid()})
        clear(self.config.status_dir)
        if self.config.admin.enabled:  # else metrics stay in each worker's memory
            enable_multiprocess(self.config.metrics_dir)  # before any metric exists
            record_build_info(__version__, platform.python_version())
        if self.config.user is not None:
            # workers write their status and metric files after dropping
            # privileges; a missing user is reported by the start check
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(self.config.user)
                os.chown(self.config.status_dir, entry.pw_uid, entry.pw_gid)
                if self.config.admin.enabled:
                    os.chown(self.config.metrics_dir, entry.pw_uid, entry.pw_gid)

    def _check_as_worker(self, config: ProxyConfig) -> None:
        """validate() and every file a worker opens, as the workers' user (proxy/preflight.py);
        _Stopped when SIGTERM or SIGINT arrives meanwhile."""
        try:
            check_as_worker(config, validate, self._stop_requested)
        except CheckInterrupted:
            raise _Stopped() from None

    @staticmethod
    def _stop_requested() -> bool:
        return signal.sigtimedwait(STOP_SIGNALS, 0) is not None

    def _start_admin(self) -> None:
        admin = self.config.admin
        if not admin.enabled:
            return
        try:
            directory = self.config.metrics_dir
            pages = status_pages(directory, self.control_socket, __version__)
            self.admin = AdminServer(admin, lambda: render_workers(directory), pages)
        except AdminError as exc:
            raise ProxyStartupError(str(exc)) from None
        self.admin.start()
        # where it listens (with port = 0, the kernel chose): for `stockade top`
        write_atomically(
            self.config.status_dir / ADMIN_FILE,
            {"address": admin.address, "port": self.admin.port, "pid": os.getpid()},
        )

    def _spawn(self, slot: WorkerSlot) -> None:
        assert self.shared is not None
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _worker_main(self.config, slot, self.shared, write_end)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self._close_report(slot)
        slot.pid, slot.started, slot.report = pid, time.monotonic(), read_end
        slot.ready, slot.restart_at = False, None

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (or until workers cannot start); the exit code.

        Signals are blocked and taken synchronously with sigtimedwait, so a
        signal never interrupts the master half-way through a restart. Nothing
        here sleeps: a worker's restart is due at a time, and the wait for the
        next signal ends then, so SIGTERM is taken at once even in a back-off.
        """
        while not self.stopping:
            info = signal.sigtimedwait(MASTER_SIGNALS, self._wait_time())
            if info is not None and info.si_signo in STOP_SIGNALS:
                self.stopping = True
                break
            if info is not None and info.si_signo == signal.SIGHUP:
                self._on_hup()
            self._read_reports()
            self._reap_all()
            self._restart_due()
        return self._drain()

    def _wait_time(self) -> float:
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        if not due:
            return 1.0
        return min(1.0, max(0.01, min(due) - time.monotonic()))

    def _read_reports(self) -> None:
        for slot in self.slots:
            self._read_report(slot)

    def _read_report(self, slot: WorkerSlot) -> None:
        """What the slot's worker said: "ready" once it serves, "error ..." when it fails."""
        if slot.report < 0:
            return
        data = b""
        while True:
            try:
                chunk = os.read(slot.report, 65536)
            except BlockingIOError:
                break
            if not chunk:  # the worker is gone
                self._close_report(slot)
                break
            data += chunk
        for line in data.decode("utf-8", "replace").splitlines():
            if line == "ready":
                slot.ready, slot.start_failures = True, 0
            elif line.startswith("error "):
                slot.last_error = line.removeprefix("error ")

    @staticmethod
    def _close_report(slot: WorkerSlot) -> None:
        if slot.report >= 0:
            os.close(slot.report)
            slot.report = -1

    def _serving(self) -> bool:
        return any(slot.pid > 0 and slot.ready for slot in self.slots)

    def _reap_all(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._reap(pid, status)

    def _reap(self, pid: int, status: int) -> None:
        self.retiring.discard(pid)
        slot = next((s for s in self.slots if s.pid == pid), None)
        mark_process_dead(pid, str(self.config.metrics_dir))  # type: ignore[no-untyped-call]
        if slot is None or self.stopping:
            return
        self._read_report(slot)  # to the end: the pipe holds what it wrote before dying
        self._close_report(slot)
        slot.pid = 0
        code = os.waitstatus_to_exitcode(status)
        error = slot.last_error or f"the worker {_describe_exit(code)}"
        if code == EXIT_CANNOT_START:
            self._give_up(f"worker {slot.index} cannot start: {error}")
            return
        if not slot.ready:
            slot.start_failures += 1
            if slot.start_failures >= START_ATTEMPTS and not self._serving():
                self._give_up(
                    f"no worker could start ({slot.start_failures} attempts in a row); "
                    f"the last one: {error}"
                )
                return
        # Back off when a worker keeps dying young, so a crash loop cannot spin.
        slot.failures = slot.failures + 1 if time.monotonic() - slot.started < 10 else 1
        delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_FIRST * 2 ** (slot.failures - 1))
        log.warning(
            "worker %d (pid %d) %s; restarting in %.1fs",
            slot.index,
            pid,
            _describe_exit(code),
            delay,
        )
        slot.restart_at = time.monotonic() + delay

    def _give_up(self, message: str) -> None:
        """Workers cannot start: refuse clients at once (close the sockets), then exit 1."""
        log.error("%s; stopping the proxy", message)
        for slot in self.slots:
            for _, sock in slot.sockets:
                sock.close()
        self.exit_code = 1
        self.stopping = True

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid == 0 and slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot)

    def _on_hup(self) -> None:
        """Reload: a new set of workers with the new config, then the old ones drain.

        The new config is checked in full first; if anything is wrong, the
        error is logged (and written to status_dir/reload.json for `stockade
        reload`) and the running workers go on untouched. Listening sockets
        of unchanged listeners are handed to the new workers, so no
        connection attempt is refused; old workers stop accepting, finish
        their requests and tell keep-alive clients to reconnect (Connection:
        close). Rate-limit, quota and penalty tables are kept when their sizes
        did not change, so a reload resets no one's counters.
        """
        self.generation += 1
        try:
            new = self._load_new_config()
            slots = self._new_slots(new)
        except (ConfigError, ProxyStartupError) as exc:
            log.error("reload refused, the running config stays: %s", exc)
            self._reload_status(False, str(exc))
            return
        except _Stopped:
            self.stopping = True  # SIGTERM while the new config was checked
            return
        if _table_sizes(new) != _table_sizes(self.config):
            log.warning("reload: table sizes changed; rate-limit and anomaly counters start over")
            self.shared = SharedState.create(new)
        old_slots, self.slots, self.config = self.slots, slots, new
        logs.use_format(new.log_format)  # the master's lines, and the new workers'
        for slot in self.slots:
            self._spawn(slot)
        kept = {id(sock) for slot in self.slots for _, sock in slot.sockets}
        for slot in old_slots:
            self._close_report(slot)
            if slot.pid <= 0:
                continue  # it was waiting for a restart
            self.retiring.add(slot.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGTERM)  # it drains, then exits
            for _, sock in slot.sockets:
                if id(sock) not in kept:
                    sock.close()  # its worker still holds it until it exits
        names = ", ".join(listener.name for listener in new.listeners)
        log.info("config reloaded: serving %s with %d workers", names, len(self.slots))
        self._reload_status(True, None)

    def _load_new_config(self) -> ProxyConfig:
        if self.path is None:
            raise ProxyStartupError("no config file to reload (started without one)")
        new = load_config(self.path).proxy
        # read at start only: these keep their running values
        fixed = ("status_dir", "metrics_dir", "admin", "user", "group")
        changed = [key for key in fixed if getattr(new, key) != getattr(self.config, key)]
        if changed:
            log.warning("reload: %s change only with a restart", ", ".join(changed))
        new = dataclasses.replace(new, **{key: getattr(self.config, key) for key in fixed})
        if not new.listeners:
            raise ProxyStartupError("no listeners in [[proxy.listeners]]; nothing to serve")
        self._check_as_worker(new)
        return new

    def _new_slots(self, new: ProxyConfig) -> list[WorkerSlot]:
        """The new workers' sockets: the running ones where the listener stayed."""
        slots: list[WorkerSlot] = []
        try:
            for index in range(new.worker_count):
                old = self.slots[index] if index < len(self.slots) else None
                running = {(li.address, li.port): sock for li, sock in old.sockets} if old else {}
                sockets = []
                for listener in new.listeners:
                    sock = running.get((listener.address, listener.port))
                    sockets.append((listener, sock if sock is not None else bind(listener)))
                slots.append(WorkerSlot(index, sockets))
        except ProxyStartupError:
            running_ids = {id(sock) for slot in self.slots for _, sock in slot.sockets}
            for slot in slots:
                for _, sock in slot.sockets:
                    if id(sock) not in running_ids:
                        sock.close()
            raise
        return slots

    def _reload_status(self, ok: bool, error: str | None) -> None:
        with contextlib.suppress(OSError):
            write_atomically(
                self.config.status_dir / RELOAD_FILE,
                {"generation": self.generation, "at": time.time(), "ok": ok, "error": error},
            )

    def _drain(self) -> int:
        # pid 0 is no worker (os.kill(0, ...) would signal the whole process group)
        alive = {slot.pid for slot in self.slots if slot.pid > 0} | self.retiring
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout + STOP_GRACE
        while alive and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
                continue
            alive.discard(pid)
        for pid in alive:
            log.warning("worker pid %d did not drain in time; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for slot in self.slots:
            self._close_report(slot)
            for _, sock in slot.sockets:
                sock.close()
        if self.admin is not None:
            self.admin.stop()
        for name in (ADMIN_FILE, MASTER_FILE, RELOAD_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.config.status_dir / name).unlink()
        log.info("proxy stopped")
        return self.exit_code


def run(config: Config) -> int:
    master = Master(config)
    try:
        master.start()
    except (ProxyStartupError, RuntimeError) as exc:
        log.error("%s", exc)
        master.stopping = True
        master._drain()
        return 1
    return master.run()
