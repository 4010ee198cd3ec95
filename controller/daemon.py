"""`stockade controller run`: the only privileged process.

Start-up order keeps enforcement continuous: load the program (reusing the
pinned maps, so existing bans keep dropping), reconcile the maps with the
store, then swap the program in on each interface with a compare-and-swap.
Exit never detaches: the kernel keeps enforcing while we are away.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import errno
import fcntl
import grp
import ipaddress
import logging
import os
import platform
import pwd
import re
import signal
import socket
import sqlite3
import struct
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from stockade import __version__, logs
from stockade.admin_http import AdminError, AdminServer
from stockade.clock import Clock, SystemClock
from stockade.config import Config, ConfigError, load_config
from stockade.controller import ifslots, layout, libbpf, loader, metrics, xdp_attach, xdp_state
from stockade.controller.cluster import ClusterSync, embedded_status
from stockade.controller.cluster_auth import KeyFileError, Trust, trust_from_config
from stockade.controller.maps import BpfMaps, Hits, RuntimeSettings
from stockade.controller.service import (
    REBUILT_REASON,
    BanLossRefused,
    BanService,
    BatchSession,
    RemovalGuard,
    StagingBudget,
    kernel_active,
)
from stockade.controller.store import COMPANIONS, BanStore, StoreCheck, inspect_store, set_aside
from stockade.protocol import (
    BAD_INPUT,
    MAX_LINE,
    RULES_SOCKET_COMMANDS,
    RUNTIME,
    CommandError,
    decode_request,
    encode,
)
from stockade.redis_conn import ClusterAuthError, check_credentials
from stockade.targets import is_exact

log = logging.getLogger("stockade.controller")

CLIENT_IDLE_TIMEOUT = 30.0
IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")  # as xdp.interfaces accepts them
EVENT_POLL_INTERVAL = 0.2
RECENT_EVENTS = 100
EVENT_LOGS_PER_SECOND = 10
SCRAPE_TIMEOUT = 5.0
MAP_SIZE_KEYS = (
    "max_bans_v4",
    "max_bans_v6",
    "max_prefix_bans",
    "max_allow",
    "max_rate_sources",
)  # a scrape waits this long for the worker thread


class StartupError(RuntimeError):
    """The controller cannot start; the message says why and what to do."""


# One-shot start options for a ban store that does not match the kernel's bans
# (`stockade controller run --rebuild-store-from-maps` / `--accept-ban-loss`).
REBUILD_STORE = "rebuild-store-from-maps"
ACCEPT_BAN_LOSS = "accept-ban-loss"
RECOVERY_OPTIONS = (REBUILD_STORE, ACCEPT_BAN_LOSS)
RECOVERY_HINT = (
    "restore bans.db from a backup, or start once with --rebuild-store-from-maps "
    "(keep the kernel's bans, recorded in the store as rebuilt-from-kernel) or with "
    "--accept-ban-loss (lift them)"
)
# The maps whose fill `status` and the metrics show (the SYN buckets are an LRU: always full).
FILL_MAPS = ("ban_v4", "ban_v6", "ban_prefix_v4", "ban_prefix_v6", "allow_v4", "allow_v6")
# Counting a map's entries walks its keys (about 0.6 s for 262144): `stockade top` asks
# for the status every second, so a count is reused for this long.
MAP_FILL_MAX_AGE = 5.0


def removal_guard(config: Config) -> RemovalGuard:
    ctl = config.controller
    return RemovalGuard(ctl.reconcile_max_removal_share, ctl.reconcile_removal_allowance)


def program_settings(config: Config) -> loader.ProgramSettings:
    x = config.xdp
    return loader.ProgramSettings(
        pin_root=config.controller.pin_root,
        max_bans_v4=x.max_bans_v4,
        max_bans_v6=x.max_bans_v6,
        max_prefix_bans=x.max_prefix_bans,
        max_allow=x.max_allow,
        max_rate_sources=x.max_rate_sources,
    )


def runtime_settings(config: Config, dry_run: bool) -> RuntimeSettings:
    return RuntimeSettings(
        syn_rate=config.xdp.syn_rate,
        syn_burst=config.xdp.syn_burst,
        v6_rate_prefix=config.xdp.ipv6_rate_prefix,
        monitor=config.xdp.monitor or dry_run,
    )


def lock_pin_dir(pin_dir: Path) -> int:
    """Hold an exclusive lock on the pin directory for the process's life."""
    pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(
                f"another stockade controller holds {pin_dir}; stop it first "
                "(`systemctl stop stockade-controller`)"
            ) from None
        raise
    return fd


def peer_in_group(uid: int, gid: int, group_gid: int) -> bool:
    """Whether a peer belongs to a group: as its gid, or as a member (supplementary).

    SO_PEERCRED carries only the peer's gid; membership is read from the
    group database for the peer's user name.
    """
    if gid == group_gid:
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry has no supplementary groups to find
        return False
    return group_gid in os.getgrouplist(name, gid)


@dataclass(frozen=True)
class Listener:
    """One control socket: who may connect, and which commands it carries."""

    name: str
    path: Path
    group_gid: int | None = None  # None: root only (0600); else chgrp and 0660
    commands: frozenset[str] | None = None  # None: every command
    group_name: str = ""  # for messages

    def peer_allowed(self, uid: int, gid: int) -> bool:
        if uid in (0, os.geteuid()):
            return True
        return self.group_gid is not None and peer_in_group(uid, gid, self.group_gid)

    def refusal(self) -> str:
        if self.group_gid is None:
            return "permission denied: root only"
        return f"permission denied: root or group {self.group_name} only"


@dataclass
class RateBreach:
    source: str
    dropped: int
    at: float


@dataclass
class ControllerState:
    started: float = field(default_factory=time.time)
    syn_events: int = 0
    recent: deque[RateBreach] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    log_second: int = 0  # the second the counts below belong to
    logged: int = 0
    unlogged: int = 0


class Controller:
    def __init__(
        self,
        config: Config,
        *,
        dry_run: bool = False,
        mode: xdp_attach.Mode | None = None,
        clock: Clock | None = None,
        recovery: str | None = None,
    ) -> None:
        if recovery is not None and recovery not in RECOVERY_OPTIONS:
            raise ValueError(f"unknown recovery {recovery!r}")
        self.config = config
        self.dry_run = dry_run
        self.recovery = recovery  # this start only: REBUILD_STORE, ACCEPT_BAN_LOSS or None
        self._fill_cache: tuple[float, dict[str, dict[str, int]]] = (0.0, {})
        self.mode = mode or xdp_attach.Mode(config.xdp.mode)
        self.clock = clock or SystemClock()
        self.state = ControllerState()
        self.settings = program_settings(config)
        self._lock_fd: int | None = None
        self.program: loader.LoadedProgram | None = None
        self.maps: BpfMaps | None = None
        self.store: BanStore | None = None
        self.service: BanService | None = None
        self._stop = asyncio.Event()
        self._rules_gid: int | None = None
        self.admin: AdminServer | None = None
        self.cluster: ClusterSync | None = None  # cluster mode ([cluster] backend = "redis")
        self._cluster_trust: Trust | None = None  # its keys, read at start (and on reload)
        self.slots = ifslots.InterfaceSlots()  # interface -> counters slot
        # tags of stockade's programs, interfaces detached on purpose (state_dir/xdp.json)
        self.xdp_state = xdp_state.AttachState()
        # Every command and sweep runs on this one thread: map and store
        # writes never interleave, and the event loop stays free (pyroute2's
        # sync API runs an event loop of its own, which needs another thread).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stockade-maps")
        self._staging = StagingBudget()  # batch entries staged by all connections together

    # -- start-up -----------------------------------------------------------
    def start(self) -> None:
        ctl = self.config.controller
        if self.config.cluster.enabled:  # a password Redis refuses stops us before any change
            try:  # and so does a cluster key file we cannot use
                self._cluster_trust = trust_from_config(self.config.cluster)
            except KeyFileError as exc:
                raise StartupError(str(exc)) from None
            error = check_credentials(self.config.cluster)
            if error is not None:
                raise StartupError(error)
        if ctl.rules_group is not None:
            try:
                self._rules_gid = grp.getgrnam(ctl.rules_group).gr_gid
            except KeyError:
                raise StartupError(
                    f"controller.rules_group: no group {ctl.rules_group!r} on this host; "
                    f"create it (groupadd {ctl.rules_group}) or remove the key"
                ) from None
        if ctl.netns:
            from pyroute2 import netns as pr_netns

            try:
                # network namespace only (bpffs stays visible); flags=0: never create one
                pr_netns.setns(ctl.netns, flags=0)
            except OSError as exc:
                raise StartupError(f"cannot enter network namespace {ctl.netns}: {exc}") from None
        loader.ensure_bpffs()
        self._lock_fd = lock_pin_dir(self.settings.pin_dir)
        # Looked at read-only before anything may create or write it.
        found = inspect_store(ctl.ban_db, self.clock.wall())
        try:
            self.program = loader.load(self.settings)
        except loader.LoadError as exc:
            raise StartupError(str(exc)) from None
        self.maps = BpfMaps(self.program)
        self.store = self._open_store(found)
        self.service = BanService(
            self.store,
            self.maps,
            self.clock,
            self.config.xdp.management_networks,
            ctl.history_retention,
        )
        self.service.prefix_floor = self.config.xdp.prefix_floor
        if self.recovery == REBUILD_STORE:
            rebuilt = self.service.rebuild_from_maps()
            log.warning(
                "--rebuild-store-from-maps: %d bans from the kernel maps added to %s "
                "(reason %s, expiry as the kernel had it)",
                rebuilt,
                ctl.ban_db,
                REBUILT_REASON,
            )
        # --accept-ban-loss: the operator said so, any share may go
        guard = None if self.recovery == ACCEPT_BAN_LOSS else removal_guard(self.config)
        try:
            report = self.service.reconcile(guard)
        except BanLossRefused as exc:
            raise StartupError(
                f"{exc}, to match the ban store {ctl.ban_db} "
                f"(controller.reconcile_max_removal_share); nothing was changed; {RECOVERY_HINT}"
            ) from None
        # after the checks: a refused start leaves the running settings (monitor mode) alone
        self.maps.apply_settings(runtime_settings(self.config, self.dry_run))
        log.info(
            "reconciled maps with %s: %d added, %d updated, %d removed, %d failed",
            ctl.ban_db,
            report.added,
            report.updated,
            report.removed,
            report.failed,
        )
        if not self.config.xdp.interfaces:
            log.warning(
                "no interfaces in xdp.interfaces: the program is loaded but filters nothing"
            )
        self._remember_program()
        for ifname in self.config.xdp.interfaces:
            if ifname in self.xdp_state.detached:
                self._log_held_detached(ifname)
                continue
            try:
                state = xdp_attach.attach(ifname, self.program.fd, self.mode)
            except xdp_attach.AttachError as exc:
                raise StartupError(str(exc)) from None
            log.info("XDP program %d on %s (%s mode)", state.prog_id, ifname, state.mode)
        self.slots.labels(self.config.xdp.interfaces)  # warns now if two share a slot
        if self.dry_run or self.config.xdp.monitor:
            log.warning("monitor mode: verdicts are counted but nothing is dropped")
        self.program.bpf[b"events"].open_ring_buffer(self._on_event)

    def _kernel_bans(self) -> int:
        """Active bans in the pinned maps (the kernel ignores expired entries)."""
        assert self.maps is not None
        now = self.clock.monotonic_ns()
        return sum(1 for entry in self.maps.bans().values() if kernel_active(entry, now))

    def _open_store(self, found: StoreCheck) -> BanStore:
        """Open the ban store, refusing one that would lift the kernel's bans silently.

        A damaged store is never used or written over: it is refused, or, with
        a recovery option, renamed aside and a new store made. A missing store,
        or one without an active ban, is refused while the maps hold bans,
        unless a recovery option says what to do.
        """
        path = self.config.controller.ban_db
        if found.state == "damaged":
            self._set_damaged_aside(found.detail)
        elif found.state == "missing" or found.active_bans == 0:
            held = self._kernel_bans()
            if held and self.recovery is None:
                what = "does not exist" if found.state == "missing" else "holds no active ban"
                raise StartupError(
                    f"the ban store {path} {what} but the kernel maps in {self.settings.pin_dir} "
                    f"hold {held} bans: starting would lift them all; nothing was changed; "
                    f"{RECOVERY_HINT}"
                )
            if found.state == "missing" and any(
                os.path.lexists(f"{path}{c}") for c in COMPANIONS
            ):  # a WAL without its database would be replayed into the new one
                kept = set_aside(path)
                log.warning("set aside what was left of a ban store: %s", kept)
        try:
            return BanStore(path)
        except sqlite3.DatabaseError as exc:
            # damage that only opening it for writing shows (a garbled schema): the
            # failed upgrade transaction rolled back, the file is as it was
            if found.state == "damaged":
                raise StartupError(f"cannot open a new ban store {path}: {exc}") from None
            self._set_damaged_aside(f"SQLite: {exc}")
        except Exception as exc:
            raise StartupError(f"cannot open the ban store {path}: {exc}") from None
        try:
            return BanStore(path)
        except Exception as exc:
            raise StartupError(f"cannot open a new ban store {path}: {exc}") from None

    def _set_damaged_aside(self, detail: str) -> None:
        """Refuse a damaged store, or with a recovery option rename it aside."""
        path = self.config.controller.ban_db
        if self.recovery is None:
            raise StartupError(
                f"the ban store {path} is damaged ({detail}) and the kernel maps in "
                f"{self.settings.pin_dir} hold {self._kernel_bans()} bans; nothing was changed; "
                f"{RECOVERY_HINT}; either option keeps the damaged file, renamed"
            )
        kept = set_aside(path)
        log.warning(
            "--%s: the damaged ban store (%s) is kept as %s; starting a new one",
            self.recovery,
            detail,
            ", ".join(str(p) for p in kept),
        )

    def _map_fill(self) -> dict[str, dict[str, int]]:
        """Entries and capacity of each ban and allow map, as the kernel has them
        (counted at most every MAP_FILL_MAX_AGE seconds)."""
        assert self.program is not None
        counted_at, fill = self._fill_cache
        if fill and time.monotonic() - counted_at < MAP_FILL_MAX_AGE:
            return fill
        fill = {}
        for name in FILL_MAPS:
            table = self.program.table(name)
            capacity = libbpf.map_info(table.map_fd).max_entries
            # bcc's len() of an LPM trie raises NotImplementedError; iterating keys works
            entries = sum(1 for _ in table)
            fill[name] = {"entries": entries, "max_entries": int(capacity)}
        self._fill_cache = (time.monotonic(), fill)
        return fill

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> int:
        event = ctypes.cast(data, ctypes.POINTER(layout.RateEvent)).contents
        raw = bytes(event.addr)
        if event.family == layout.AF_INET:
            source = str(ipaddress.IPv4Address(raw[:4]))
        else:
            source = f"{ipaddress.IPv6Address(raw)}/{self.config.xdp.ipv6_rate_prefix}"
        self.state.syn_events += 1
        self.state.recent.append(RateBreach(source, int(event.dropped), time.time()))
        # The kernel sends one event per source per second; a flood from many
        # sources must not become a flood of log lines.
        second = int(time.monotonic())
        if second != self.state.log_second:
            if self.state.unlogged:
                log.warning("SYN rate exceeded by %d more sources", self.state.unlogged)
            self.state.log_second, self.state.logged, self.state.unlogged = second, 0, 0
        if self.state.logged < EVENT_LOGS_PER_SECOND:
            self.state.logged += 1
            log.warning("SYN rate exceeded by %s: %d SYNs dropped so far", source, event.dropped)
        else:
            self.state.unlogged += 1
        return 0

    # -- control API --------------------------------------------------------
    def _service(self) -> BanService:
        if self.service is None:
            raise CommandError(RUNTIME, "the controller is still starting", "retry in a moment")
        return self.service

    def handlers(
        self, session: BatchSession | None = None
    ) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """One handler per command in the protocol table.

        The service is looked up on each call, so the table can be built (and
        checked against `protocol.COMMANDS`) without starting anything.
        `session`: the connection's staged batch (None: a batch of one request).
        """
        return {
            "ban": lambda a: self._service().ban(
                a["target"], a.get("ttl"), a.get("reason"), a.get("source"), a.get("force", False)
            ),
            "ban.batch": lambda a: self._service().ban_batch(
                session or BatchSession(),
                a["entries"],
                a.get("commit", False),
                a.get("force", False),
            ),
            "unban.batch": lambda a: self._service().unban_batch(
                session or BatchSession(), a["entries"], a.get("commit", False)
            ),
            "unban.all": lambda a: self._service().unban_all(
                a.get("source"), a.get("reason_match"), a.get("force", False)
            ),
            "rule.ban": lambda a: self._service().rule_ban(
                a["target"],
                a["ttl"],
                a["rule"],
                a.get("reason"),
                a.get("details"),
                a.get("factor"),
                a.get("max_ttl"),
                a.get("memory"),
            ),
            "explain": lambda a: self._service().explain(a["target"]),
            "unban": lambda a: self._service().unban(a["target"]),
            "bans": lambda a: self._service().list_bans_filtered(a.get("source"), a.get("filter")),
            "allow.add": lambda a: self._service().allow_add(
                a["target"], a.get("reason"), a.get("force", False)
            ),
            "allow.remove": lambda a: self._service().allow_remove(a["target"]),
            "allow.list": lambda a: self._service().allow_list(),
            "stats": lambda a: self.stats(),
            "status": lambda a: self.status(),
            "reload": lambda a: self.reload(),
            "detach": lambda a: self.detach_interfaces(
                a.get("interfaces"), a.get("all", False), a.get("force", False)
            ),
            "attach": lambda a: self.attach_interfaces(a["interfaces"]),
        }

    def dispatch(
        self,
        line: bytes,
        commands: frozenset[str] | None = None,
        session: BatchSession | None = None,
    ) -> dict[str, Any]:
        """One request; `commands`: the only ones this socket accepts (None: all);
        `session`: what the request's connection has staged of a batch."""
        try:
            spec, args = decode_request(line)
            if commands is not None and spec.name not in commands:
                raise CommandError(
                    RUNTIME,
                    f"permission denied: `{spec.name}` is not accepted on the rules socket, "
                    f"only {', '.join(sorted(commands))}",
                    f"use the control socket {self.config.controller.socket} (root only)",
                )
            return {"ok": True, "result": self.handlers(session)[spec.name](args)}
        except CommandError as exc:
            return exc.to_wire()
        except Exception as exc:  # never let one request take the controller down
            log.exception("control request failed")
            return CommandError(RUNTIME, f"internal error: {exc}").to_wire()

    def stats(self) -> dict[str, Any]:
        assert self.service is not None and self.maps is not None
        return {
            **self.service.stats(),
            "by_interface": ifslots.stats_rows(self._counters_by_interface()),
            "events": {"syn_rate": self.state.syn_events, "lost": self.maps.events_lost()},
        }

    def _counters_by_interface(self) -> dict[str, dict[str, Hits]]:
        assert self.maps is not None
        labels = self.slots.labels(self.config.xdp.interfaces)
        return ifslots.by_interface(self.maps.counter_slots(), labels)

    # -- detach and attach on request (`stockade detach`, `stockade attach`) -------
    def _remember_program(self) -> None:
        """Record this program's tag, so that a detach without a controller knows it."""
        assert self.program is not None
        state_dir = self.config.controller.state_dir
        self.xdp_state = xdp_state.read_state(state_dir)
        self.xdp_state.remember(libbpf.prog_info(self.program.fd).tag)
        try:
            xdp_state.write_state(state_dir, self.xdp_state)
        except OSError as exc:  # enforcing matters more than the record
            log.error("cannot record the program's tag in %s: %s", state_dir, exc)

    def _log_held_detached(self, ifname: str) -> None:
        since = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(self.xdp_state.detached[ifname]))
        log.warning(
            "%s stays detached (by `stockade detach` at %s): NOT filtered; "
            "`stockade attach %s` re-attaches it",
            ifname,
            since,
            ifname,
        )

    def _save_xdp_state(self) -> None:
        try:
            xdp_state.write_state(self.config.controller.state_dir, self.xdp_state)
        except OSError as exc:
            raise CommandError(
                RUNTIME,
                f"cannot record the interfaces' state in {self.config.controller.state_dir}: "
                f"{exc.strerror}",
                "check the state directory (disk space, permissions)",
            ) from None

    def _forget_detached(self, new: Config, attached: list[str]) -> None:
        """A reload: an interface no longer in the config, or newly named there (just
        attached), is no longer held detached."""
        keep = {
            name: since
            for name, since in self.xdp_state.detached.items()
            if name in new.xdp.interfaces and not any(a.startswith(f"{name} ") for a in attached)
        }
        if keep != self.xdp_state.detached:
            self.xdp_state.detached = keep
            try:
                xdp_state.write_state(self.config.controller.state_dir, self.xdp_state)
            except OSError as exc:
                log.error("reload: cannot record the interfaces' state: %s", exc)

    def _is_stockade(self, prog_id: int) -> bool:
        """This program, or one with stockade's name and a tag a stockade controller loaded."""
        assert self.program is not None
        if prog_id == self.program.prog_id:
            return True
        try:
            return self.xdp_state.is_stockade(xdp_attach.program_info(prog_id))
        except xdp_attach.AttachError:
            return False  # gone meanwhile, or unreadable: not known to be ours

    def _named_interfaces(self, names: Any, all_interfaces: bool, command: str) -> list[str]:
        if all_interfaces and names:
            raise CommandError(BAD_INPUT, f"{command}: name interfaces or give all, not both")
        if all_interfaces:
            return list(self.config.xdp.interfaces)
        if not names:
            raise CommandError(BAD_INPUT, f"{command}: name an interface", "or use --all")
        if not all(isinstance(n, str) and IFNAME.fullmatch(n) for n in names):
            raise CommandError(BAD_INPUT, f"{command}: interfaces must be interface names")
        return list(dict.fromkeys(names))  # in order, once each

    def _query(self, ifname: str) -> xdp_attach.XdpState:
        try:
            return xdp_attach.query(ifname)
        except xdp_attach.AttachError as exc:
            raise CommandError(BAD_INPUT, str(exc)) from None

    def detach_interfaces(self, names: Any, all_interfaces: bool, force: bool) -> dict[str, Any]:
        """Remove stockade's program from interfaces, all checked before any is touched.

        A program that is not stockade's is refused unless forced. Interfaces of
        xdp.interfaces stay detached (also across restarts) until attached again.
        """
        assert self.program is not None
        wanted = self._named_interfaces(names, all_interfaces, "detach")
        found = [(ifname, self._query(ifname)) for ifname in wanted]
        for ifname, st in found:
            if st.prog_id and not force and not self._is_stockade(st.prog_id):
                info = _describe_program(st.prog_id)
                raise CommandError(
                    BAD_INPUT,
                    f"refusing to detach {ifname}: its XDP program ({info}) is not "
                    "stockade's; nothing was detached",
                    "add --force to remove it anyway",
                )
        rows = []
        try:
            for ifname, st in found:
                row: dict[str, Any] = {
                    "name": ifname,
                    "prog_id": st.prog_id,
                    "status": "not_attached",
                }
                if st.prog_id:
                    try:
                        xdp_attach.detach(ifname, expected_prog_id=st.prog_id)
                    except xdp_attach.AttachError as exc:
                        raise CommandError(RUNTIME, str(exc)) from None
                    row["status"] = "detached"
                    log.warning(
                        "detached XDP program %d from %s on request: its traffic is NOT "
                        "filtered until `stockade attach %s`",
                        st.prog_id,
                        ifname,
                        ifname,
                    )
                if ifname in self.config.xdp.interfaces:
                    xdp_state.mark_detached(self.xdp_state, [ifname])
                rows.append(row)
        finally:  # what was detached stays recorded, also when a later one failed
            self._save_xdp_state()
        return {"interfaces": rows}

    def attach_interfaces(self, names: Any) -> dict[str, Any]:
        """Attach the program again to interfaces of xdp.interfaces (after a detach)."""
        assert self.program is not None
        wanted = self._named_interfaces(names, False, "attach")
        for ifname in wanted:
            if ifname not in self.config.xdp.interfaces:
                raise CommandError(
                    BAD_INPUT,
                    f"{ifname} is not in xdp.interfaces; nothing was attached",
                    "add it to the config and run `stockade reload`",
                )
        for ifname, st in [(ifname, self._query(ifname)) for ifname in wanted]:
            if st.prog_id and not self._is_stockade(st.prog_id):
                raise CommandError(
                    BAD_INPUT,
                    f"refusing to attach to {ifname}: it runs another XDP program "
                    f"({_describe_program(st.prog_id)}); nothing was attached",
                    f"remove it first with `stockade detach {ifname} --force`",
                )
        rows = []
        try:
            for ifname in wanted:
                try:
                    st = xdp_attach.attach(ifname, self.program.fd, self.mode)
                except xdp_attach.AttachError as exc:
                    raise CommandError(RUNTIME, str(exc)) from None
                self.xdp_state.detached.pop(ifname, None)
                log.info(
                    "attached XDP program %d to %s (%s mode) on request",
                    st.prog_id,
                    ifname,
                    st.mode,
                )
                rows.append(
                    {"name": ifname, "prog_id": st.prog_id, "mode": st.mode, "status": "attached"}
                )
        finally:
            self._save_xdp_state()
        return {"interfaces": rows}

    def _interfaces(self) -> list[dict[str, Any]]:
        assert self.program is not None
        interfaces: list[dict[str, Any]] = []
        for ifname in self.config.xdp.interfaces:
            try:
                st = xdp_attach.query(ifname)
                interfaces.append(
                    {
                        "name": ifname,
                        "mode": st.mode,
                        "prog_id": st.prog_id,
                        "ours": st.prog_id == self.program.prog_id,
                        # by `stockade detach`, until `stockade attach`
                        "detached": ifname in self.xdp_state.detached,
                    }
                )
            except xdp_attach.AttachError as exc:
                interfaces.append({"name": ifname, "error": str(exc)})
        return interfaces

    def status(self) -> dict[str, Any]:
        assert self.program is not None and self.store is not None and self.maps is not None
        assert self.service is not None
        interfaces = self._interfaces()
        now = self.clock.wall()
        bans = [b for b in self.store.bans() if b.active(now)]
        s = self.maps.settings
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.state.started, 1),
            "monitor": s.monitor,
            "program": {
                "id": self.program.prog_id,
                "pin_dir": str(self.settings.pin_dir),
                "layout_version": layout.layout_version(),
            },
            "interfaces": interfaces,
            "metrics": None
            if self.admin is None
            else {"address": self.config.controller.admin.address, "port": self.admin.port},
            "bans": {
                "total": len(bans),
                "exact": sum(1 for b in bans if is_exact(b.target)),
                "prefix": sum(1 for b in bans if not is_exact(b.target)),
                "ipv4": sum(1 for b in bans if b.target.version == 4),
                "ipv6": sum(1 for b in bans if b.target.version == 6),
                # in the store but not in the kernel (a map was full): their packets pass
                "not_in_kernel": sum(1 for b in bans if b.target in self.service.unenforced),
            },
            "maps": self._map_fill(),
            "allows": len(self.maps.allows()),
            "cluster": self.cluster.status()
            if self.cluster is not None
            else embedded_status(self.config.cluster.node),
            "syn_rate": {
                "rate": s.syn_rate,
                "burst": s.syn_burst,
                "ipv6_prefix": s.v6_rate_prefix,
                "events": self.state.syn_events,
                "recent": [
                    {"source": r.source, "dropped": r.dropped, "at": r.at}
                    for r in list(self.state.recent)[-10:]
                ],
            },
        }

    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener: Listener
    ) -> None:
        session: BatchSession | None = None
        try:
            if not self._peer_allowed(writer, listener):
                writer.write(CommandError(RUNTIME, listener.refusal()).to_wire_bytes())
                return
            session = BatchSession(self._staging)  # dropped with the connection
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), CLIENT_IDLE_TIMEOUT)
                except TimeoutError:  # idle client
                    break
                except ValueError:  # a line over the limit: answer, then hang up
                    error = CommandError(BAD_INPUT, f"request longer than {MAX_LINE} bytes")
                    writer.write(error.to_wire_bytes())
                    await writer.drain()
                    break
                if not line:
                    break
                loop = asyncio.get_running_loop()
                reply = await loop.run_in_executor(
                    self._worker, self.dispatch, line, listener.commands, session
                )
                writer.write(encode(reply))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            if session is not None and session.staged is not None:  # an abandoned batch
                with suppress(RuntimeError):  # the worker is gone: so is everything staged
                    await asyncio.get_running_loop().run_in_executor(self._worker, session.drop)
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    def _peer_allowed(writer: asyncio.StreamWriter, listener: Listener) -> bool:
        """SO_PEERCRED checked on top of the socket's mode (0600, or 0660 for a group)."""
        sock: socket.socket | None = writer.get_extra_info("socket")
        if sock is None:
            return False
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, gid = struct.unpack("3i", creds)
        allowed = listener.peer_allowed(uid, gid)
        if not allowed:
            log.warning("refused a peer (uid %d, gid %d) on the %s socket", uid, gid, listener.name)
        return allowed

    async def _sweeper(self) -> None:
        assert self.service is not None
        while not self._stop.is_set():
            try:
                await asyncio.get_running_loop().run_in_executor(self._worker, self.service.sweep)
            except Exception:
                log.exception("sweep failed")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.config.controller.sweep_interval)

    async def _event_poller(self) -> None:
        assert self.program is not None
        while not self._stop.is_set():
            self.program.bpf.ring_buffer_consume()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), EVENT_POLL_INTERVAL)

    def listeners(self) -> tuple[Listener, Listener]:
        ctl = self.config.controller
        return (
            Listener("control", ctl.socket),
            Listener(
                "rules",
                ctl.rules_socket,
                self._rules_gid,
                RULES_SOCKET_COMMANDS,
                ctl.rules_group or "",
            ),
        )

    async def _listen(self, listener: Listener) -> asyncio.Server:
        path = listener.path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with suppress(FileNotFoundError):
            path.unlink()  # stale: we hold the pin lock, so no other controller serves it
        old_umask = os.umask(0o177)  # never reachable with a wider mode, even briefly
        try:
            server = await asyncio.start_unix_server(
                lambda r, w: self._client(r, w, listener), path=str(path), limit=MAX_LINE
            )
        finally:
            os.umask(old_umask)
        if listener.group_gid is None:
            os.chmod(path, 0o600)
        else:
            os.chown(path, -1, listener.group_gid)
            os.chmod(path, 0o660)
            parent = path.parent.stat()
            if not parent.st_mode & 0o001 and not (
                parent.st_mode & 0o010 and parent.st_gid == listener.group_gid
            ):
                log.warning(
                    "%s is not searchable by group %s: its members cannot reach %s",
                    path.parent,
                    listener.group_name,
                    path,
                )
        return server

    async def serve(self) -> None:
        listeners = self.listeners()
        servers: list[asyncio.Server] = []
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._start_cluster()
            for listener in listeners:
                servers.append(await self._listen(listener))
            control, rules = listeners
            log.info("control API on %s", control.path)
            log.info(
                "rule bans on %s (%s)",
                rules.path,
                "root only" if rules.group_gid is None else f"group {rules.group_name}, mode 0660",
            )
            tasks = [
                asyncio.create_task(self._sweeper()),
                asyncio.create_task(self._event_poller()),
            ]
            self._start_metrics()
            await self._stop.wait()
        finally:
            if self.admin is not None:
                self.admin.stop()
            for server in servers:
                server.close()
                await server.wait_closed()
            for task in tasks:
                task.cancel()
            if self.cluster is not None:
                await self.cluster.stop()
            for listener in listeners[: len(servers)]:
                with suppress(FileNotFoundError):
                    listener.path.unlink()
            held = sorted(set(self.config.xdp.interfaces) & set(self.xdp_state.detached))
            log.info(
                "stopped; the XDP program stays attached and keeps enforcing%s",
                f" (not on {', '.join(held)}: detached on purpose)" if held else "",
            )

    async def _start_cluster(self) -> None:
        """Cluster mode: share bans through Redis (a sync task on this event loop)."""
        if not self.config.cluster.enabled:
            return
        assert self.service is not None and self._cluster_trust is not None
        loop = asyncio.get_running_loop()
        self.cluster = ClusterSync(
            self.config.cluster,
            self.service,
            lambda fn: loop.run_in_executor(self._worker, fn),  # the one writer of maps/store
            self.config.controller.state_dir,
            self._cluster_trust,
        )
        try:
            await self.cluster.start()
        except ClusterAuthError as exc:
            self.cluster = None
            raise StartupError(str(exc)) from None

    # -- reload (SIGHUP, `stockade reload`) -------------------------------------
    def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply what can change while running.

        Runtime settings (SYN rate, monitor mode), management networks,
        interfaces (attach to new ones, detach ours from removed ones), the
        sweep interval, log level and history retention apply at once. Map
        sizes, sockets, the state and pin directories, the namespace and the
        metrics listener are read at start only: they are reported as
        needing a restart and keep their running values. A config that does
        not load changes nothing.
        """
        assert self.service is not None and self.maps is not None and self.program is not None
        old = self.config
        try:
            new = load_config(old.path) if old.path is not None else old
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            raise CommandError(
                BAD_INPUT, f"reload refused: {exc}", "fix the file and retry"
            ) from None
        self._check_reload_removals(new)
        trust = self._reload_cluster_trust(new)
        # [cluster.auth] and [cluster.accept] apply on reload (key rotation); the rest of
        # [cluster] needs a restart
        cluster_rest = dataclasses.replace(
            new.cluster, auth=old.cluster.auth, accept=old.cluster.accept
        )
        restart = [
            key
            for key, changed in (
                ("xdp map sizes", program_settings(new) != program_settings(old)),
                ("controller.socket", new.controller.socket != old.controller.socket),
                (
                    "controller.rules_socket",
                    new.controller.rules_socket != old.controller.rules_socket,
                ),
                (
                    "controller.rules_group",
                    new.controller.rules_group != old.controller.rules_group,
                ),
                ("controller.state_dir", new.controller.state_dir != old.controller.state_dir),
                ("controller.netns", new.controller.netns != old.controller.netns),
                ("controller.admin", new.controller.admin != old.controller.admin),
                ("xdp.mode", new.xdp.mode != old.xdp.mode),
                ("cluster", cluster_rest != old.cluster),
            )
            if changed
        ]
        attached, detached = [], []
        for ifname in new.xdp.interfaces:
            if ifname not in old.xdp.interfaces:
                try:
                    state = xdp_attach.attach(ifname, self.program.fd, self.mode)
                except xdp_attach.AttachError as exc:
                    log.error("reload refused, the running config stays: %s", exc)
                    raise CommandError(RUNTIME, f"reload refused: {exc}") from None
                attached.append(f"{ifname} ({state.mode})")
        for ifname in old.xdp.interfaces:
            if ifname not in new.xdp.interfaces:
                try:
                    if xdp_attach.query(ifname).prog_id == self.program.prog_id:
                        xdp_attach.detach(ifname)
                        detached.append(ifname)
                except xdp_attach.AttachError as exc:
                    log.warning("reload: could not detach from %s: %s", ifname, exc)
        self.maps.apply_settings(runtime_settings(new, self.dry_run))
        self.service.management = tuple(new.xdp.management_networks)
        self.service.history_retention = new.controller.history_retention
        self.service.prefix_floor = new.xdp.prefix_floor
        self._forget_detached(new, attached)
        self.service.reconcile()
        cluster = old.cluster
        if trust is not None and self.cluster is not None:
            self.cluster.set_trust(trust)
            self._cluster_trust = trust
            cluster = dataclasses.replace(
                old.cluster, auth=new.cluster.auth, accept=new.cluster.accept
            )
        self.slots.labels(new.xdp.interfaces)  # warns now if two share a slot
        logs.use_format(new.controller.log_format, new.controller.log_level)
        # what needs a restart keeps its running value
        controller = dataclasses.replace(
            new.controller,
            socket=old.controller.socket,
            rules_socket=old.controller.rules_socket,
            rules_group=old.controller.rules_group,
            state_dir=old.controller.state_dir,
            pin_root=old.controller.pin_root,
            netns=old.controller.netns,
            admin=old.controller.admin,
        )
        sizes = {k: getattr(old.xdp, k) for k in MAP_SIZE_KEYS}
        self.config = dataclasses.replace(
            new,
            controller=controller,
            xdp=dataclasses.replace(new.xdp, mode=old.xdp.mode, **sizes),
            cluster=cluster,
        )
        log.info(
            "config reloaded from %s%s%s%s",
            old.path,
            f"; attached to {', '.join(attached)}" if attached else "",
            f"; detached from {', '.join(detached)}" if detached else "",
            f"; needs a restart to change: {', '.join(restart)}" if restart else "",
        )
        return {
            "status": "reloaded",
            "attached": attached,
            "detached": detached,
            "needs_restart": restart,
        }

    def _reload_cluster_trust(self, new: Config) -> Trust | None:
        """The cluster keys re-read (a rotation) with the new [cluster.auth] and
        [cluster.accept]; a key file that cannot be used refuses the reload before
        anything changes. None: not in cluster mode, before or after."""
        if self.cluster is None or not new.cluster.enabled:
            return None
        try:
            return trust_from_config(new.cluster)
        except KeyFileError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            raise CommandError(
                BAD_INPUT, f"reload refused: {exc}", "fix the key file and retry"
            ) from None

    def _check_reload_removals(self, new: Config) -> None:
        """Refuse a reload, before it changes anything, whose reconcile would lift more of
        the kernel's bans than the new config's share allows (the store lost them while
        we ran). The reconcile later in the same reload, on this same thread, sees the
        same store and maps."""
        assert self.service is not None
        try:
            self.service.check_removals(removal_guard(new))
        except BanLossRefused as exc:
            store = self.config.controller.ban_db
            log.error("reload refused, the running config stays: %s, to match %s", exc, store)
            raise CommandError(
                RUNTIME,
                f"reload refused: {exc}, to match the ban store {store}; nothing was changed",
                "restore the bans in the store, or restart the controller once with "
                "--rebuild-store-from-maps (keep them) or --accept-ban-loss (lift them)",
            ) from None

    def _start_metrics(self) -> None:
        config = self.config.controller.admin
        if not config.enabled:
            return
        build = CollectorRegistry()
        Gauge(
            "stockade_build_info",
            "Always 1; the labels say which stockade is running.",
            ["version", "python", "component"],
            registry=build,
        ).labels(__version__, platform.python_version(), "controller").set(1)

        def scrape() -> bytes:
            # on the worker thread, which owns the maps and the store
            snapshot = self._worker.submit(self.metrics_snapshot).result(timeout=SCRAPE_TIMEOUT)
            return metrics.render(lambda: snapshot, build)

        try:
            self.admin = AdminServer(config, scrape)
        except AdminError as exc:
            raise StartupError(str(exc)) from None
        self.admin.start()

    def metrics_snapshot(self) -> metrics.Snapshot:
        assert self.service is not None and self.maps is not None and self.store is not None
        now = self.clock.wall()
        bans: collections.Counter[tuple[str, str, str]] = collections.Counter()
        not_in_kernel = 0
        for ban in self.store.bans():
            if ban.active(now):
                kind = "exact" if is_exact(ban.target) else "prefix"
                bans[(ban.source, kind, f"ipv{ban.target.version}")] += 1
                not_in_kernel += ban.target in self.service.unenforced
        interfaces = []
        for row in self._interfaces():
            if "error" not in row:
                interfaces.append((str(row["name"]), str(row["mode"]), bool(row["ours"])))
        fill = {name: (m["entries"], m["max_entries"]) for name, m in self._map_fill().items()}
        return metrics.Snapshot(
            counters=self._counters_by_interface(),
            bans=dict(bans),
            allows=len(self.maps.allows()),
            events=dict(self.service.events),
            syn_events=self.state.syn_events,
            events_lost=self.maps.events_lost(),
            monitor=self.maps.settings.monitor,
            interfaces=interfaces,
            cluster=None if self.cluster is None else self.cluster.status(),
            not_in_kernel=not_in_kernel,
            map_fill=fill,
        )

    def _reload_on_signal(self) -> None:
        def run() -> None:
            try:
                self.reload()
            except CommandError:
                pass  # logged by reload; the running config stays
            except Exception:
                log.exception("reload failed; the running config stays")

        self._worker.submit(run)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        if self.store is not None:
            self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _describe_program(prog_id: int) -> str:
    try:
        info = xdp_attach.program_info(prog_id)
    except xdp_attach.AttachError:
        return f"id {prog_id}"
    return f"id {prog_id}, name {info.name or '(none)'}, tag {info.tag}"


def run(
    config: Config,
    *,
    dry_run: bool = False,
    mode: xdp_attach.Mode | None = None,
    recovery: str | None = None,
) -> int:
    controller = Controller(config, dry_run=dry_run, mode=mode, recovery=recovery)
    try:
        controller.start()
        asyncio.run(controller.serve())
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    finally:
        controller.close()
    return 0
