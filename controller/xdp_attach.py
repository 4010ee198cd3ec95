"""Attach, replace and detach XDP programs through netlink (pyroute2).

Replacing uses XDP_FLAGS_REPLACE with the fd of the program we expect to
find, so an upgrade is a compare-and-swap: the interface always has either
the old or the new program, never none, and a program someone else put
there in the meantime is not clobbered.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from stockade.controller import libbpf

log = logging.getLogger(__name__)

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4

# IFLA_XDP_ATTACHED values
XDP_ATTACHED_NONE = 0
XDP_ATTACHED_DRV = 1
XDP_ATTACHED_SKB = 2
XDP_ATTACHED_HW = 3
XDP_ATTACHED_MULTI = 4


def _netlink_errors() -> tuple[type[Exception], ...]:
    from pyroute2.netlink.exceptions import NetlinkError

    return (OSError, NetlinkError)  # NetlinkError is not an OSError


NETLINK_ERRORS = _netlink_errors()


def _code(exc: Exception) -> int:
    return int(getattr(exc, "code", None) or getattr(exc, "errno", None) or errno.EINVAL)


def _reason(exc: Exception) -> str:
    return os.strerror(_code(exc))


class Mode(enum.StrEnum):
    AUTO = "auto"  # native, generic as a fallback with a warning
    NATIVE = "native"
    GENERIC = "generic"


class AttachError(RuntimeError):
    pass


@dataclass(frozen=True)
class XdpState:
    ifname: str
    ifindex: int
    prog_id: int  # 0 when nothing is attached
    mode: str  # "native", "generic", "offload", "multi" or "none"


# IFLA_XDP_ATTACHED as numbers, and as pyroute2 decodes them
_ATTACHED_NAMES: dict[object, str] = {
    XDP_ATTACHED_NONE: "none",
    XDP_ATTACHED_DRV: "native",
    XDP_ATTACHED_SKB: "generic",
    XDP_ATTACHED_HW: "offload",
    XDP_ATTACHED_MULTI: "multi",
    None: "none",
    "xdp": "native",
    "xdpgeneric": "generic",
    "xdpoffload": "offload",
    "xdpmulti": "multi",
}


@contextmanager
def _netlink(netns: str | None) -> Iterator[Any]:
    from pyroute2 import IPRoute, NetNS

    ipr = NetNS(netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _ifindex(ipr: Any, ifname: str, netns: str | None) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        where = f" in network namespace {netns}" if netns else ""
        raise AttachError(f"interface {ifname} not found{where}; check `ip link`")
    return int(found[0])


def query(ifname: str, netns: str | None = None) -> XdpState:
    with _netlink(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        (link,) = ipr.get_links(index)
    xdp = link.get_attr("IFLA_XDP")
    attached = xdp.get_attr("IFLA_XDP_ATTACHED") if xdp is not None else XDP_ATTACHED_NONE
    prog_id = (xdp.get_attr("IFLA_XDP_PROG_ID") if xdp is not None else 0) or 0
    mode = _ATTACHED_NAMES.get(attached, str(attached))
    return XdpState(ifname=ifname, ifindex=index, prog_id=int(prog_id), mode=mode)


def _set_xdp(ipr: Any, index: int, fd: int, flags: int, expected_fd: int | None) -> None:
    attrs: list[list[Any]] = [["IFLA_XDP_FD", fd], ["IFLA_XDP_FLAGS", flags]]
    if expected_fd is not None:
        attrs.append(["IFLA_XDP_EXPECTED_FD", expected_fd])
    ipr.link("set", index=index, IFLA_XDP={"attrs": attrs})


def _mode_flag(mode: Mode) -> int:
    return XDP_FLAGS_SKB_MODE if mode is Mode.GENERIC else XDP_FLAGS_DRV_MODE


def attach(ifname: str, prog_fd: int, mode: Mode = Mode.AUTO, netns: str | None = None) -> XdpState:
    """Attach prog_fd, atomically replacing whatever stockade program is there."""
    current = query(ifname, netns)
    if current.prog_id and current.mode in ("native", "generic"):
        # Keep the mode already in use: switching modes would need a detach,
        # which is a window where nothing filters.
        wanted = Mode.NATIVE if current.mode == "native" else Mode.GENERIC
        if mode is not Mode.AUTO and mode is not wanted:
            raise AttachError(
                f"{ifname} runs XDP in {current.mode} mode; switching to {mode.value} needs "
                f"`stockade detach {ifname}` first (a window with no filter)"
            )
        replace(ifname, prog_fd, current.prog_id, wanted, netns)
        return query(ifname, netns)

    tries = [Mode.NATIVE, Mode.GENERIC] if mode is Mode.AUTO else [mode]
    last_error: Exception | None = None
    for attempt in tries:
        try:
            with _netlink(netns) as ipr:
                flags = _mode_flag(attempt) | XDP_FLAGS_UPDATE_IF_NOEXIST
                _set_xdp(ipr, current.ifindex, prog_fd, flags, None)
        except NETLINK_ERRORS as exc:
            last_error = exc
            if attempt is Mode.NATIVE and mode is Mode.AUTO:
                log.warning(
                    "native XDP not supported on %s (%s); falling back to generic XDP, "
                    "which runs after the skb is built and is slower",
                    ifname,
                    _reason(exc),
                )
            continue
        return query(ifname, netns)
    raise AttachError(f"cannot attach XDP to {ifname}: {last_error}")


def replace(
    ifname: str, prog_fd: int, expected_prog_id: int, mode: Mode, netns: str | None = None
) -> None:
    """Swap in prog_fd only if expected_prog_id is what runs there (a compare-and-swap)."""
    try:
        old_fd = libbpf.prog_fd_by_id(expected_prog_id)
    except OSError as exc:
        raise AttachError(f"cannot open the program on {ifname}: {exc}") from exc
    try:
        with _netlink(netns) as ipr:
            flags = _mode_flag(mode) | XDP_FLAGS_REPLACE
            _set_xdp(ipr, _ifindex(ipr, ifname, netns), prog_fd, flags, old_fd)
    except NETLINK_ERRORS as exc:
        raise AttachError(
            f"cannot replace the XDP program on {ifname} (expected id {expected_prog_id}): {exc}"
        ) from exc
    finally:
        os.close(old_fd)


def detach(ifname: str, netns: str | None = None, expected_prog_id: int | None = None) -> XdpState:
    """Remove the XDP program on the interface.

    With expected_prog_id, only that program (a compare-and-swap to nothing):
    a program put there since it was checked is left alone (AttachError).
    """
    current = query(ifname, netns)
    if not current.prog_id:
        return current
    flag = XDP_FLAGS_SKB_MODE if current.mode == "generic" else XDP_FLAGS_DRV_MODE
    expected_fd = None
    if expected_prog_id is not None:
        if current.prog_id != expected_prog_id:
            raise AttachError(
                f"{ifname} now runs XDP program {current.prog_id}, not {expected_prog_id}; "
                "left alone"
            )
        try:
            expected_fd = libbpf.prog_fd_by_id(expected_prog_id)
        except OSError as exc:
            raise AttachError(f"cannot open the program on {ifname}: {exc}") from exc
        flag |= XDP_FLAGS_REPLACE
    try:
        with _netlink(netns) as ipr:
            _set_xdp(ipr, current.ifindex, -1, flag, expected_fd)
    except NETLINK_ERRORS as exc:
        if _code(exc) == errno.EPERM:
            raise AttachError(
                f"permission denied detaching XDP from {ifname}; run as root"
            ) from exc
        raise AttachError(f"cannot detach XDP from {ifname}: {_reason(exc)}") from exc
    finally:
        if expected_fd is not None:
            os.close(expected_fd)
    return query(ifname, netns)


def program_info(prog_id: int) -> libbpf.ProgInfo:
    """Name and tag of a loaded program (how stockade recognises its own)."""
    try:
        return libbpf.prog_info_by_id(prog_id)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise AttachError(
                f"permission denied reading BPF program {prog_id}; run as root"
            ) from exc
        raise AttachError(f"cannot read BPF program {prog_id}: {exc.strerror}") from exc
