"""Integration fixtures: throwaway labs (network namespaces, veth pairs, upstream API).

Every lab made here carries a prefix unique to this test run ("st", four
digits of the PID, a two-digit counter) and is removed when its fixture ends,
whether the tests passed or not. Two more nets catch what a fixture could
not: an atexit hook for each lab, and, at the start of a session, removal of
test labs whose owning process is gone (a run killed with SIGKILL).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import re
from collections.abc import Callable, Iterator

import pytest

from stockade.lab import topology
from stockade.lab.topology import Lab

TEST_PREFIX_RE = re.compile(r"st\d{6}")
_counter = itertools.count()


def lab_prefix() -> str:
    """A lab prefix for this run that nothing on the host uses yet."""
    for _ in range(100):
        prefix = f"st{os.getpid() % 10000:04d}{next(_counter) % 100:02d}"
        if topology.prefix_in_use(prefix) is None:
            return prefix
    raise RuntimeError("no free lab prefix for this test run; run `stockade lab status`")


def _owner_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_abandoned_test_labs() -> None:
    """Remove test labs left by runs that died without cleaning up (never another run's)."""
    for lab in topology.status():
        if TEST_PREFIX_RE.fullmatch(lab.prefix) and not _owner_alive(lab.owner_pid):
            topology.down(lab.prefix)


@pytest.fixture(scope="session", autouse=True)
def _abandoned_test_labs_removed() -> None:
    _sweep_abandoned_test_labs()


def _lab(start_upstream: bool = True) -> Iterator[Lab]:
    prefix = lab_prefix()
    # if the interpreter shuts down without running the fixture's teardown,
    # atexit still removes the lab; after a SIGKILL, the next session's sweep does
    hook = functools.partial(topology.down, prefix)
    atexit.register(hook)
    try:
        with topology.running_lab(prefix, start_upstream=start_upstream) as lab:
            yield lab
    finally:
        atexit.unregister(hook)


@pytest.fixture
def lab_prefixes() -> Callable[[], str]:
    """Hands out fresh prefixes, for tests that build and remove labs themselves."""
    return lab_prefix


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A lab shared by the tests of one module, upstream API running."""
    yield from _lab()


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    """A lab of the test's own, for tests that change it (XDP, bans, killed processes)."""
    yield from _lab()
