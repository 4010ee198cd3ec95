"""Fixtures for the CLI tests: one real controller per module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_harness import Controller, require_root


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    require_root()
    home = tmp_path_factory.mktemp("clitest")
    ctl = Controller(home, Path(f"/sys/fs/bpf/stockade-clitest-{os.getpid()}"))
    try:
        ctl.start()
        yield ctl
        if ctl.proc is not None:
            assert ctl.stop() == 0, ctl.log_tail()
    finally:
        ctl.kill()
        ctl.remove_pins()


@pytest.fixture
def ctl(controller: Controller) -> Iterator[Controller]:
    """The module's controller, emptied of bans and allows after each test."""
    yield controller
    if controller.proc is not None:
        controller.clear()
