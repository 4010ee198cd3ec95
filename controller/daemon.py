"""`stockade controller run`: the only privileged process.

Start-up order keeps enforcement continuous: load the program (reusing the
pinned maps, so existing bans keep dropping), reconcile the maps with the
store, then swap the program in on each interface with a compare-and-swap.
Exit never detaches: the kernel keeps enforcing while we are away.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade import __version__
from stockade.clock import Clock, SystemClock
from stockade.config import Config
from stockade.controller import layout, loader, xdp_attach
from stockade.controller.maps import BpfMaps, RuntimeSettings
from stockade.controller.service import BanService
from stockade.controller.store import BanStore
from stockade.protocol import (
    BAD_INPUT,
    MAX_LINE,
    RUNTIME,
    CommandError,
    decode_request,
    encode,
)
from stockade.targets import is_exact

log = logging.getLogger("stockade.controller")

CLIENT_IDLE_TIMEOUT = 30.0
EVENT_POLL_INTERVAL = 0.2
RECENT_EVENTS = 100
EVENT_LOGS_PER_SECOND = 10


class StartupError(RuntimeError):
    """The controller cannot start; the message says why and what to do."""


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
    ) -> None:
        self.config = config
        self.dry_run = dry_run
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
        # Every command and sweep runs on this one thread: map and store
        # writes never interleave, and the event loop stays free (pyroute2's
        # sync API runs an event loop of its own, which needs another thread).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stockade-maps")

    # -- start-up -----------------------------------------------------------
    def start(self) -> None:
        ctl = self.config.controller
        if ctl.netns:
            from pyroute2 import netns as pr_netns

            try:
                # network namespace only (bpffs stays visible); flags=0: never create one
                pr_netns.setns(ctl.netns, flags=0)
            except OSError as exc:
                raise StartupError(f"cannot enter network namespace {ctl.netns}: {exc}") from None
        loader.ensure_bpffs()
        self._lock_fd = lock_pin_dir(self.settings.pin_dir)
        try:
            self.store = BanStore(ctl.ban_db)
        except Exception as exc:
            raise StartupError(f"cannot open the ban store {ctl.ban_db}: {exc}") from None
        try:
            self.program = loader.load(self.settings)
        except loader.LoadError as exc:
            raise StartupError(str(exc)) from None
        self.maps = BpfMaps(self.program)
        self.maps.apply_settings(runtime_settings(self.config, self.dry_run))
        self.service = BanService(
            self.store,
            self.maps,
            self.clock,
            self.config.xdp.management_networks,
            ctl.history_retention,
        )
        report = self.service.reconcile()
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
        for ifname in self.config.xdp.interfaces:
            try:
                state = xdp_attach.attach(ifname, self.program.fd, self.mode)
            except xdp_attach.AttachError as exc:
                raise StartupError(str(exc)) from None
            log.info("XDP program %d on %s (%s mode)", state.prog_id, ifname, state.mode)
        if self.dry_run or self.config.xdp.monitor:
            log.warning("monitor mode: verdicts are counted but nothing is dropped")
        self.program.bpf[b"events"].open_ring_buffer(self._on_event)

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

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """One handler per command in the protocol table.

        The service is looked up on each call, so the table can be built (and
        checked against `protocol.COMMANDS`) without starting anything.
        """
        return {
            "ban": lambda a: self._service().ban(
                a["target"], a.get("ttl"), a.get("reason"), a.get("source")
            ),
            "unban": lambda a: self._service().unban(a["target"]),
            "bans": lambda a: self._service().list_bans(),
            "allow.add": lambda a: self._service().allow_add(a["target"], a.get("reason")),
            "allow.remove": lambda a: self._service().allow_remove(a["target"]),
            "allow.list": lambda a: self._service().allow_list(),
            "stats": lambda a: self.stats(),
            "status": lambda a: self.status(),
        }

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            spec, args = decode_request(line)
            return {"ok": True, "result": self.handlers()[spec.name](args)}
        except CommandError as exc:
            return exc.to_wire()
        except Exception as exc:  # never let one request take the controller down
            log.exception("control request failed")
            return CommandError(RUNTIME, f"internal error: {exc}").to_wire()

    def stats(self) -> dict[str, Any]:
        assert self.service is not None and self.maps is not None
        return {
            **self.service.stats(),
            "events": {"syn_rate": self.state.syn_events, "lost": self.maps.events_lost()},
        }

    def status(self) -> dict[str, Any]:
        assert self.program is not None and self.store is not None and self.maps is not None
        interfaces = []
        for ifname in self.config.xdp.interfaces:
            try:
                st = xdp_attach.query(ifname)
                interfaces.append(
                    {
                        "name": ifname,
                        "mode": st.mode,
                        "prog_id": st.prog_id,
                        "ours": st.prog_id == self.program.prog_id,
                    }
                )
            except xdp_attach.AttachError as exc:
                interfaces.append({"name": ifname, "error": str(exc)})
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
            "bans": {
                "total": len(bans),
                "exact": sum(1 for b in bans if is_exact(b.target)),
                "prefix": sum(1 for b in bans if not is_exact(b.target)),
                "ipv4": sum(1 for b in bans if b.target.version == 4),
                "ipv6": sum(1 for b in bans if b.target.version == 6),
            },
            "allows": len(self.maps.allows()),
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

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self._peer_allowed(writer):
                writer.write(CommandError(RUNTIME, "permission denied: root only").to_wire_bytes())
                return
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
                reply = await loop.run_in_executor(self._worker, self.dispatch, line)
                writer.write(encode(reply))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
        """Root or our own user only, on top of the socket's 0600 mode."""
        sock: socket.socket | None = writer.get_extra_info("socket")
        if sock is None:
            return False
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid in (0, os.geteuid())

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

    async def serve(self) -> None:
        path = self.config.controller.socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with suppress(FileNotFoundError):
            path.unlink()  # stale: we hold the pin lock, so no other controller serves it
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._client, path=str(path), limit=MAX_LINE)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("control API on %s", path)
        tasks = [asyncio.create_task(self._sweeper()), asyncio.create_task(self._event_poller())]
        try:
            await self._stop.wait()
        finally:
            server.close()
            await server.wait_closed()
            for task in tasks:
                task.cancel()
            with suppress(FileNotFoundError):
                path.unlink()
            log.info("stopped; the XDP program stays attached and keeps enforcing")

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        if self.store is not None:
            self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def run(config: Config, *, dry_run: bool = False, mode: xdp_attach.Mode | None = None) -> int:
    controller = Controller(config, dry_run=dry_run, mode=mode)
    try:
        controller.start()
        asyncio.run(controller.serve())
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    finally:
        controller.close()
    return 0
