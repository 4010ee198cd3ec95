"""Run programs inside a named network namespace.

`nsenter --net=/run/netns/NAME` switches only the network namespace, so the
program keeps the caller's mount namespace and sees the same /sys/fs/bpf
(`ip netns exec` remounts /sys and hides bpffs, and the pinned maps with it).
nsenter execs the program, so the PID of the returned process is the
program's own PID and can be signalled directly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")


class NetnsNotFoundError(RuntimeError):
    """The named network namespace does not exist."""


def netns_path(netns: str) -> Path:
    """The bind-mounted namespace file for `netns`; refuses names with a slash."""
    if not netns or "/" in netns or netns in (".", ".."):
        raise ValueError(f"invalid network namespace name {netns!r}")
    return NETNS_DIR / netns


def netns_exists(netns: str) -> bool:
    return netns_path(netns).exists()


def nsenter_argv(netns: str, argv: list[str]) -> list[str]:
    """The command line that runs `argv` in `netns`."""
    path = netns_path(netns)
    if not path.exists():
        raise NetnsNotFoundError(
            f"network namespace {netns!r} does not exist; is the lab up? (stockade lab status)"
        )
    if not argv:
        raise ValueError("argv is empty")
    return ["nsenter", f"--net={path}", "--", *argv]


def run_in_netns(
    netns: str, argv: list[str], **subprocess_kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(argv, ...)` inside `netns`; text mode unless told otherwise.

    Pass `timeout=` for anything that talks to the network: every probe in
    the lab is bounded in time.
    """
    subprocess_kwargs.setdefault("text", True)
    return subprocess.run(nsenter_argv(netns, argv), **subprocess_kwargs)


def popen_in_netns(netns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    """`subprocess.Popen(argv, ...)` inside `netns`; text mode unless told otherwise.

    The caller owns the process: stop it by its PID (`proc.terminate()`,
    then `proc.wait(timeout=...)`).
    """
    kwargs.setdefault("text", True)
    return subprocess.Popen(nsenter_argv(netns, argv), **kwargs)


def python_argv(*args: str) -> list[str]:
    """argv for this interpreter (the venv's), for running stockade modules in a namespace."""
    return [sys.executable, *args]
