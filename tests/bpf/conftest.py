"""Fixtures for the BPF unit tests: one compiled program, clean state per test.

The program is compiled once per session against its own pin directory
(`/sys/fs/bpf/stockade-test-<pid>`), which is removed at the end even when a
test fails. Before every test the maps and counters are emptied and the
default runtime settings applied; after every test the per-reason counters
must add up to the frames that test ran (STYLE point 4: one exit, counted).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from xdp_harness import MAP_SIZE, Program, Xdp

from stockade.controller import loader


@pytest.fixture(scope="session")
def program() -> Iterator[Program]:
    if os.geteuid() != 0:
        pytest.fail(
            "the BPF tests load an XDP program and need root (bpf(), bpffs); "
            "run them as root, e.g. `sudo make test`",
            pytrace=False,
        )
    settings = loader.ProgramSettings(
        pin_root=Path(f"/sys/fs/bpf/stockade-test-{os.getpid()}"),
        max_bans_v4=MAP_SIZE,
        max_bans_v6=MAP_SIZE,
        max_prefix_bans=MAP_SIZE,
        max_allow=MAP_SIZE,
        max_rate_sources=MAP_SIZE,
    )
    loaded: loader.LoadedProgram | None = None
    try:
        loaded = loader.load(settings)
        yield Program(loaded)
    finally:
        if loaded is not None:
            loaded.close()
        loader.remove_pins(settings)
        if settings.pin_root.exists():
            settings.pin_root.rmdir()


@pytest.fixture
def xdp(program: Program) -> Iterator[Xdp]:
    env = Xdp(program)
    yield env
    env.assert_counters_add_up()
