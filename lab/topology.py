"""The lab: three network namespaces joined by two veth pairs.

    {prefix}-cli (client)        {prefix}-gw (gateway)          {prefix}-up (upstream)
    c0 198.18.0.10-13/24  <-->  gw0 198.18.0.1/24   (XDP here)
       fd00:18::10-13/64            fd00:18::1/64
                                gw1 198.18.1.1/24         <-->  u0 198.18.1.10/24
                                    fd00:19::1/64                  fd00:19::10/64
    default via gw0             forwarding on, v4 and v6        default via gw1
                                                                HTTP API on :8080

Everything is made with pyroute2 (no `ip`), and everything carries the
per-run prefix: namespaces `{prefix}-cli|gw|up`, and the veths, which are
created in the root namespace as `{prefix}-c0|g0|g1|u0`, then moved into
their namespaces and renamed. Addresses come only from 198.18.0.0/15 and
fd00::/8.

Each lab is recorded in `/run/stockade/lab/{prefix}.json` before anything
is created, and again with the upstream's PID once it runs, so `down`
cleans up after a crash: it removes every namespace and root-namespace
link named with the prefix whether or not the state file survived, and
stops the upstream only after checking that the recorded PID still is
that upstream.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import re
import secrets
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from stockade.lab.netns_exec import NETNS_DIR, popen_in_netns, run_in_netns

__all__ = [
    "CLIENT_IF",
    "CLIENT_V4",
    "CLIENT_V6",
    "GATEWAY_IF",
    "GATEWAY_UPSTREAM_IF",
    "GATEWAY_UPSTREAM_V4",
    "GATEWAY_UPSTREAM_V6",
    "GATEWAY_V4",
    "GATEWAY_V6",
    "STATE_DIR",
    "UPSTREAM_IF",
    "UPSTREAM_PORT",
    "UPSTREAM_V4",
    "UPSTREAM_V6",
    "InvalidPrefixError",
    "Lab",
    "LabError",
    "LabExistsError",
    "LabStatus",
    "check_prefix",
    "down",
    "down_all",
    "find",
    "new_prefix",
    "popen_in_netns",
    "prefix_in_use",
    "read_state",
    "run_in_netns",
    "running_lab",
    "state_path",
    "status",
    "up",
    "write_sysctls",
]

log = logging.getLogger(__name__)

# --- names and addresses ----------------------------------------------------

PREFIX_RE = re.compile(r"[a-z0-9]{1,8}")
PREFIX_MAX = 8  # "{prefix}-g1" must fit IFNAMSIZ (15 characters)

CLIENT_IF = "c0"
GATEWAY_IF = "gw0"  # XDP goes here: faces the client
GATEWAY_UPSTREAM_IF = "gw1"
UPSTREAM_IF = "u0"

PREFIXLEN_V4 = 24
PREFIXLEN_V6 = 64
CLIENT_V4 = ("198.18.0.10", "198.18.0.11", "198.18.0.12", "198.18.0.13")
CLIENT_V6 = ("fd00:18::10", "fd00:18::11", "fd00:18::12", "fd00:18::13")
GATEWAY_V4 = "198.18.0.1"
GATEWAY_V6 = "fd00:18::1"
GATEWAY_UPSTREAM_V4 = "198.18.1.1"
GATEWAY_UPSTREAM_V6 = "fd00:19::1"
UPSTREAM_V4 = "198.18.1.10"
UPSTREAM_V6 = "fd00:19::10"
UPSTREAM_PORT = 8080

STATE_DIR = Path("/run/stockade/lab")
STATE_VERSION = 1

READY_TIMEOUT = 5.0  # interfaces up and addresses usable
UPSTREAM_START_TIMEOUT = 15.0
UPSTREAM_STOP_TIMEOUT = 3.0

IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08

UPSTREAM_MODULE = "stockade.lab.upstream"


class LabError(RuntimeError):
    """The lab could not be built, found or removed."""


class LabExistsError(LabError):
    """A lab (or leftovers of one) with this prefix already exists."""


class InvalidPrefixError(ValueError):
    """A prefix that is not 1-8 characters of [a-z0-9]."""


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.fullmatch(prefix):
        raise InvalidPrefixError(
            f"invalid lab prefix {prefix!r}: use 1-{PREFIX_MAX} characters of a-z and 0-9"
        )
    return prefix


@dataclass(frozen=True)
class Lab:
    prefix: str
    client_ns: str
    gateway_ns: str
    upstream_ns: str
    gateway_if: str = GATEWAY_IF
    upstream_pid: int | None = None

    @classmethod
    def named(cls, prefix: str, upstream_pid: int | None = None) -> Lab:
        check_prefix(prefix)
        return cls(
            prefix=prefix,
            client_ns=f"{prefix}-cli",
            gateway_ns=f"{prefix}-gw",
            upstream_ns=f"{prefix}-up",
            upstream_pid=upstream_pid,
        )

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.client_ns, self.gateway_ns, self.upstream_ns)

    # the module constants, reachable from a Lab for convenience
    client_if: ClassVar[str] = CLIENT_IF
    gateway_upstream_if: ClassVar[str] = GATEWAY_UPSTREAM_IF
    upstream_if: ClassVar[str] = UPSTREAM_IF
    client_v4: ClassVar[tuple[str, ...]] = CLIENT_V4
    client_v6: ClassVar[tuple[str, ...]] = CLIENT_V6
    gateway_v4: ClassVar[str] = GATEWAY_V4
    gateway_v6: ClassVar[str] = GATEWAY_V6
    gateway_upstream_v4: ClassVar[str] = GATEWAY_UPSTREAM_V4
    gateway_upstream_v6: ClassVar[str] = GATEWAY_UPSTREAM_V6
    upstream_v4: ClassVar[str] = UPSTREAM_V4
    upstream_v6: ClassVar[str] = UPSTREAM_V6
    upstream_port: ClassVar[int] = UPSTREAM_PORT

    def upstream_url(self, path: str = "/", v6: bool = False) -> str:
        host = f"[{UPSTREAM_V6}]" if v6 else UPSTREAM_V4
        return f"http://{host}:{UPSTREAM_PORT}{path}"

    def to_dict(self) -> dict[str, Any]:
        """Names and addresses, as `stockade lab up --json` prints them."""
        return {
            "prefix": self.prefix,
            "namespaces": {
                "client": self.client_ns,
                "gateway": self.gateway_ns,
                "upstream": self.upstream_ns,
            },
            "interfaces": {
                "client": CLIENT_IF,
                "gateway": self.gateway_if,
                "gateway_upstream": GATEWAY_UPSTREAM_IF,
                "upstream": UPSTREAM_IF,
            },
            "addresses": {
                "client_v4": list(CLIENT_V4),
                "client_v6": list(CLIENT_V6),
                "gateway_v4": GATEWAY_V4,
                "gateway_v6": GATEWAY_V6,
                "gateway_upstream_v4": GATEWAY_UPSTREAM_V4,
                "gateway_upstream_v6": GATEWAY_UPSTREAM_V6,
                "upstream_v4": UPSTREAM_V4,
                "upstream_v6": UPSTREAM_V6,
            },
            "upstream": {
                "pid": self.upstream_pid,
                "port": UPSTREAM_PORT,
                "url_v4": self.upstream_url(),
                "url_v6": self.upstream_url(v6=True),
            },
        }


@dataclass(frozen=True)
class LabStatus:
    prefix: str
    namespaces: dict[str, bool]  # name -> exists
    upstream_pid: int | None
    upstream_running: bool
    owner_pid: int | None  # the process that ran `up`
    created: float | None  # unix time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the veth pairs and what each namespace gets ----------------------------


@dataclass(frozen=True)
class _End:
    tmp_suffix: str  # root-namespace name is f"{prefix}-{tmp_suffix}"
    role: str  # "client", "gateway" or "upstream"
    ifname: str
    addresses: tuple[tuple[str, int], ...]


_PAIRS: tuple[tuple[_End, _End], ...] = (
    (
        _End(
            "c0",
            "client",
            CLIENT_IF,
            tuple((a, PREFIXLEN_V4) for a in CLIENT_V4)
            # v6 in reverse: the kernel prefers the newest address as the
            # default source, so the default is fd00:18::10 as in v4
            + tuple((a, PREFIXLEN_V6) for a in reversed(CLIENT_V6)),
        ),
        _End("g0", "gateway", GATEWAY_IF, ((GATEWAY_V4, PREFIXLEN_V4), (GATEWAY_V6, PREFIXLEN_V6))),
    ),
    (
        _End(
            "g1",
            "gateway",
            GATEWAY_UPSTREAM_IF,
            ((GATEWAY_UPSTREAM_V4, PREFIXLEN_V4), (GATEWAY_UPSTREAM_V6, PREFIXLEN_V6)),
        ),
        _End(
            "u0",
            "upstream",
            UPSTREAM_IF,
            ((UPSTREAM_V4, PREFIXLEN_V4), (UPSTREAM_V6, PREFIXLEN_V6)),
        ),
    ),
)

# default routes: role -> gateways
_DEFAULT_ROUTES: dict[str, tuple[str, ...]] = {
    "client": (GATEWAY_V4, GATEWAY_V6),
    "upstream": (GATEWAY_UPSTREAM_V4, GATEWAY_UPSTREAM_V6),
}

# written in every namespace before any interface moves in, so the moved
# interfaces pick up the defaults: no DAD (addresses usable at once), no RA
_SYSCTLS_ALL = {
    "net/ipv6/conf/all/disable_ipv6": "0",
    "net/ipv6/conf/default/disable_ipv6": "0",
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/default/accept_dad": "0",
    "net/ipv6/conf/all/accept_ra": "0",
    "net/ipv6/conf/default/accept_ra": "0",
}
_SYSCTLS_GATEWAY = {
    "net/ipv4/ip_forward": "1",
    "net/ipv6/conf/all/forwarding": "1",
}


def _root_links(prefix: str) -> list[str]:
    return [f"{prefix}-{end.tmp_suffix}" for pair in _PAIRS for end in pair]


def _ns_for(lab: Lab, role: str) -> str:
    return {"client": lab.client_ns, "gateway": lab.gateway_ns, "upstream": lab.upstream_ns}[role]


# --- state files ------------------------------------------------------------


def state_path(prefix: str) -> Path:
    return STATE_DIR / f"{check_prefix(prefix)}.json"


def upstream_log_path(prefix: str) -> Path:
    return STATE_DIR / f"{check_prefix(prefix)}.upstream.log"


def read_state(prefix: str) -> dict[str, Any] | None:
    """The recorded state of a lab, or None when there is none (or it is unreadable)."""
    path = state_path(prefix)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("lab state %s is unreadable (%s); cleaning up by name only", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _create_state(lab: Lab) -> None:
    """Record the lab before anything exists; O_EXCL makes the prefix ours or fails."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    data = {
        "version": STATE_VERSION,
        "prefix": lab.prefix,
        "owner_pid": os.getpid(),
        "created": time.time(),
        "namespaces": list(lab.namespaces),
        "root_links": _root_links(lab.prefix),
        "upstream": None,
    }
    try:
        fd = os.open(state_path(lab.prefix), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise LabExistsError(
            f"lab {lab.prefix!r} is already recorded in {state_path(lab.prefix)}; "
            f"remove it with `stockade lab down --prefix {lab.prefix}`"
        ) from None
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _update_state(prefix: str, **changes: Any) -> None:
    data = read_state(prefix) or {"version": STATE_VERSION, "prefix": prefix}
    data.update(changes)
    path = state_path(prefix)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# --- the public API ---------------------------------------------------------


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces and veth pairs); run it as root")


def prefix_in_use(prefix: str) -> str | None:
    """What already carries this prefix, or None."""
    if state_path(prefix).exists():
        return f"state file {state_path(prefix)}"
    from pyroute2 import netns

    for name in netns.listnetns():
        if name.startswith(f"{prefix}-"):
            return f"network namespace {name}"
    for name in _root_link_names():
        if name.startswith(f"{prefix}-"):
            return f"interface {name}"
    return None


def new_prefix() -> str:
    """A fresh per-run prefix like "stk3fa2"."""
    for _ in range(100):
        prefix = f"stk{secrets.token_hex(2)}"
        if prefix_in_use(prefix) is None:
            return prefix
    raise LabError("could not find a free lab prefix; run `stockade lab status` and clean up")


def up(prefix: str | None = None, start_upstream: bool = True) -> Lab:
    """Build a lab and return it; on any failure (or Ctrl-C) remove what was built."""
    _require_root()
    if prefix is None:
        prefix = new_prefix()
    else:
        check_prefix(prefix)
        leftover = prefix_in_use(prefix)
        if leftover is not None:
            raise LabExistsError(
                f"lab prefix {prefix!r} is in use ({leftover}); "
                f"run `stockade lab down --prefix {prefix}` or pick another prefix"
            )
    lab = Lab.named(prefix)
    _create_state(lab)
    started = time.monotonic()
    try:
        _build(lab)
        if start_upstream:
            lab = replace(lab, upstream_pid=_start_upstream(lab))
    except BaseException:
        log.error("lab %s: building failed; removing what was built", prefix)
        try:
            down(prefix)
        except Exception:
            log.exception("lab %s: cleanup after the failure failed too", prefix)
        raise
    log.info("lab %s is up (%.2fs)", prefix, time.monotonic() - started)
    return lab


def down(prefix: str) -> list[str]:
    """Remove everything carrying `prefix`; idempotent, and works after a crash.

    Returns one line per thing done (or deliberately left alone). A step that
    fails does not stop the others; the failures are raised together at the
    end, and the state file is then kept so that another `down` can retry.
    """
    check_prefix(prefix)
    _require_root()
    from pyroute2 import netns

    done: list[str] = []
    failed: list[str] = []
    state = read_state(prefix)
    lab = Lab.named(prefix)

    upstream = state.get("upstream") if state else None
    if isinstance(upstream, dict) and isinstance(upstream.get("pid"), int):
        try:
            done.append(
                _stop_upstream(
                    upstream["pid"],
                    upstream.get("start_time"),
                    str(upstream.get("netns", lab.upstream_ns)),
                )
            )
        except (LabError, OSError) as exc:
            failed.append(str(exc))

    for name in sorted(n for n in netns.listnetns() if n.startswith(f"{prefix}-")):
        _delete_links_in(name)
        try:
            netns.remove(name)
        except FileNotFoundError:
            continue  # removed meanwhile: the goal is reached
        except OSError as exc:
            failed.append(f"cannot remove network namespace {name}: {exc}")
            continue
        done.append(f"removed network namespace {name}")

    for name in _root_link_names():
        if not name.startswith(f"{prefix}-"):
            continue
        try:
            if _delete_root_link(name):
                done.append(f"removed interface {name}")
        except Exception as exc:  # NetlinkError, OSError
            failed.append(f"cannot remove interface {name}: {exc}")

    if failed:
        raise LabError(f"lab {prefix}: " + "; ".join(failed))
    for path in (state_path(prefix), upstream_log_path(prefix)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            if path.suffix == ".json":
                done.append(f"removed state file {path}")
    return done


def down_all() -> list[str]:
    """`down` for every lab recorded in the state directory."""
    done: list[str] = []
    for prefix in _recorded_prefixes():
        done.extend(down(prefix))
    return done


@contextlib.contextmanager
def running_lab(prefix: str | None = None, start_upstream: bool = True) -> Iterator[Lab]:
    """`up`, yield the lab, and always `down`, whatever happens in the block."""
    lab = up(prefix, start_upstream=start_upstream)
    try:
        yield lab
    finally:
        down(lab.prefix)


def find(prefix: str) -> Lab:
    """The lab `stockade lab up` (or another process) built with this prefix."""
    check_prefix(prefix)
    state = read_state(prefix)
    lab = Lab.named(prefix)
    if state is None or not all((NETNS_DIR / ns).exists() for ns in lab.namespaces):
        raise LabError(
            f"no lab {prefix!r} is up; start one with `stockade lab up --prefix {prefix}`"
        )
    upstream = state.get("upstream")
    pid = upstream.get("pid") if isinstance(upstream, dict) else None
    return replace(lab, upstream_pid=pid if isinstance(pid, int) else None)


def status() -> list[LabStatus]:
    """Every lab recorded in the state directory, and whether its parts exist."""
    result: list[LabStatus] = []
    for prefix in _recorded_prefixes():
        state = read_state(prefix) or {}
        lab = Lab.named(prefix)
        upstream = state.get("upstream")
        pid = upstream.get("pid") if isinstance(upstream, dict) else None
        running = (
            isinstance(pid, int)
            and isinstance(upstream, dict)
            and _is_our_upstream(pid, upstream.get("start_time"), lab.upstream_ns)
        )
        owner = state.get("owner_pid")
        created = state.get("created")
        result.append(
            LabStatus(
                prefix=prefix,
                namespaces={ns: (NETNS_DIR / ns).exists() for ns in lab.namespaces},
                upstream_pid=pid if isinstance(pid, int) else None,
                upstream_running=running,
                owner_pid=owner if isinstance(owner, int) else None,
                created=float(created) if isinstance(created, int | float) else None,
            )
        )
    return result


def _recorded_prefixes() -> list[str]:
    try:
        names = sorted(p.stem for p in STATE_DIR.glob("*.json"))
    except OSError:
        return []
    return [n for n in names if PREFIX_RE.fullmatch(n)]


# --- building ---------------------------------------------------------------


def write_sysctls(netns_name: str, values: dict[str, str]) -> None:
    """Write /proc/sys entries (paths like "net/ipv4/ip_forward") inside a namespace.

    /proc/sys/net shows the network namespace of the thread that opens it, so a
    short-lived helper thread joins the namespace (setns affects only the calling
    thread) and writes there; the rest of the process stays where it is.
    """
    errors: list[BaseException] = []

    def work() -> None:
        try:
            from pyroute2 import netns

            netns.setns(netns_name, flags=0)  # flags=0: never create it
            for key, value in values.items():
                Path("/proc/sys", key).write_text(f"{value}\n")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=work, name=f"sysctl-{netns_name}", daemon=True)
    thread.start()
    thread.join(10.0)
    if thread.is_alive():
        raise LabError(f"{netns_name}: writing sysctls did not finish within 10s")
    if errors:
        raise LabError(f"{netns_name}: cannot write sysctls: {errors[0]}") from errors[0]


def _build(lab: Lab) -> None:
    from pyroute2 import IPRoute, netns

    for ns in lab.namespaces:
        netns.create(ns)
        write_sysctls(ns, _SYSCTLS_ALL | (_SYSCTLS_GATEWAY if ns == lab.gateway_ns else {}))

    # veth pairs in the root namespace under prefixed names, then each end
    # into its namespace
    with IPRoute() as ipr:
        for a, b in _PAIRS:
            ipr.link(
                "add",
                ifname=f"{lab.prefix}-{a.tmp_suffix}",
                kind="veth",
                peer={"ifname": f"{lab.prefix}-{b.tmp_suffix}"},
            )
        for pair in _PAIRS:
            for end in pair:
                index = _lookup(ipr, f"{lab.prefix}-{end.tmp_suffix}", "root namespace")
                ipr.link("set", index=index, net_ns_fd=_ns_for(lab, end.role))

    with contextlib.ExitStack() as stack:
        sockets: dict[str, Any] = {
            ns: stack.enter_context(IPRoute(netns=ns, flags=0)) for ns in lab.namespaces
        }
        # rename, bring up, address (lo too: the proxy and controller use it)
        for ns, ipr in sockets.items():
            ipr.link("set", index=_lookup(ipr, "lo", ns), state="up")
        for pair in _PAIRS:
            for end in pair:
                ns = _ns_for(lab, end.role)
                ipr = sockets[ns]
                index = _lookup(ipr, f"{lab.prefix}-{end.tmp_suffix}", ns)
                ipr.link("set", index=index, ifname=end.ifname)
                ipr.link("set", index=index, state="up")
                for address, prefixlen in end.addresses:
                    extra = {"flags": IFA_F_NODAD} if ":" in address else {}
                    ipr.addr("add", index=index, address=address, prefixlen=prefixlen, **extra)
        # default routes once every link is up (a v6 nexthop needs its link up)
        for role, gateways in _DEFAULT_ROUTES.items():
            ns = _ns_for(lab, role)
            for gateway in gateways:
                dst = "::/0" if ":" in gateway else "0.0.0.0/0"
                sockets[ns].route("add", dst=dst, gateway=gateway)
        deadline = time.monotonic() + READY_TIMEOUT
        for ns, ipr in sockets.items():
            _wait_usable(ipr, ns, deadline)


def _lookup(ipr: Any, ifname: str, where: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"{where}: interface {ifname} is missing")
    return int(found[0])


def _wait_usable(ipr: Any, ns: str, deadline: float) -> None:
    """Wait until every link is operationally up and no address is tentative."""
    while True:
        waiting: list[str] = []
        for link in ipr.link("dump"):
            name = link.get("IFLA_IFNAME")
            if name != "lo" and link.get("IFLA_OPERSTATE") != "UP":
                waiting.append(f"{name} is {link.get('IFLA_OPERSTATE')}")
        for addr in ipr.addr("dump"):
            flags = int(addr.get("IFA_FLAGS") or addr["flags"])
            if flags & IFA_F_DADFAILED:
                raise LabError(f"{ns}: address {addr.get('IFA_ADDRESS')} failed DAD")
            if flags & IFA_F_TENTATIVE:
                waiting.append(f"{addr.get('IFA_ADDRESS')} is tentative")
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise LabError(f"{ns}: not ready after {READY_TIMEOUT}s: {', '.join(waiting)}")
        time.sleep(0.01)


def _root_link_names() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [str(link.get("IFLA_IFNAME")) for link in ipr.link("dump")]


def _delete_root_link(ifname: str) -> bool:
    """Delete a root-namespace link; False if it was gone (a veth peer goes with its pair)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise
    return True


def _delete_links_in(ns: str) -> None:
    """Delete the links in a namespace before removing it.

    Removing the namespace alone would also destroy them, but asynchronously,
    and not at all while some process still holds the namespace; deleting them
    first means that once `down` returns, the lab's interfaces are gone.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute(netns=ns, flags=0) as ipr:
            for link in ipr.link("dump"):
                if link.get("IFLA_IFNAME") == "lo":
                    continue
                try:
                    ipr.link("del", index=link["index"])
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:  # the peer of one deleted before
                        raise
    except Exception as exc:  # removing the namespace below still cleans up
        log.warning("%s: could not delete its links first (%s)", ns, exc)


# --- the upstream process ---------------------------------------------------


def _start_upstream(lab: Lab) -> int:
    """Start the upstream API in its namespace; return its PID once it accepts connections.

    posix_spawn, not Popen: the process outlives this one (`stockade lab up`
    returns while it keeps serving), in its own session so a Ctrl-C in the
    terminal does not reach it; `down` stops it by its recorded PID.
    """
    argv = [
        sys.executable,
        "-m",
        UPSTREAM_MODULE,
        "--netns",
        lab.upstream_ns,
        "--port",
        str(UPSTREAM_PORT),
    ]
    log_path = upstream_log_path(lab.prefix)
    read_fd, write_fd = os.pipe()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        pid = os.posix_spawn(
            sys.executable,
            argv,
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, write_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(write_fd)
        os.close(log_fd)
    try:
        _update_state(
            lab.prefix,
            upstream={
                "pid": pid,
                "start_time": _start_time(pid),
                "netns": lab.upstream_ns,
                "argv": argv,
                "log": str(log_path),
            },
        )
        line = _read_line(read_fd, UPSTREAM_START_TIMEOUT)
        if not line.startswith("ready"):
            detail = _log_tail(log_path) or "no output"
            raise LabError(
                f"upstream in {lab.upstream_ns} did not start within "
                f"{UPSTREAM_START_TIMEOUT:.0f}s: {detail} (log: {log_path})"
            )
    except BaseException:
        # our own child, not yet collected: its PID cannot have been reused
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    finally:
        os.close(read_fd)
    log.info("lab %s: upstream pid %d serving on port %d", lab.prefix, pid, UPSTREAM_PORT)
    return pid


def _read_line(fd: int, timeout: float) -> str:
    """One line from `fd`, or what came before EOF or the timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        chunk = os.read(fd, 256)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").split("\n", 1)[0]


def _log_tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # the command name is in parentheses and may contain anything; fields follow the last ')'
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[19])


def _start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _reap(pid: int) -> bool:
    """Collect `pid` if it is an exited child of ours; True if it is gone for good."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False  # not our child (or already collected)
    return waited == pid


def _is_our_upstream(pid: int, start_time: object, netns_name: str) -> bool:
    """True if `pid` is alive and still is the upstream we started for `netns_name`.

    Checks the command line (and the start time, when recorded) so a PID the
    kernel has since given to another process is never signalled.
    """
    _reap(pid)
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    if isinstance(start_time, int) and stat[1] != start_time:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in argv]
    if UPSTREAM_MODULE not in args:
        return False
    return any(a == "--netns" and b == netns_name for a, b in itertools.pairwise(args))


def _stop_upstream(pid: int, start_time: object, netns_name: str) -> str:
    if not _is_our_upstream(pid, start_time, netns_name):
        return f"upstream pid {pid} was not running (or is no longer ours); left alone"
    for sig, wait in ((signal.SIGTERM, UPSTREAM_STOP_TIMEOUT), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return f"stopped upstream pid {pid}"
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _is_our_upstream(pid, start_time, netns_name):
                return f"stopped upstream pid {pid}" + (
                    " (SIGKILL)" if sig == signal.SIGKILL else ""
                )
            time.sleep(0.02)
    raise LabError(f"upstream pid {pid} survived SIGKILL; check `ps -p {pid}`")
