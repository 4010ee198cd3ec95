"""One controller and one upstream for every observability test (a controller takes
seconds to compile its program); each module runs proxies of its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from obs_harness import Controller, require_root, running_controller, running_upstream


@pytest.fixture(scope="package")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    require_root()
    with running_controller(tmp_path_factory.mktemp("obs-controller")) as ctl:
        yield ctl


@pytest.fixture
def ctl(controller: Controller) -> Iterator[Controller]:
    """The shared controller, emptied of bans after each test."""
    yield controller
    controller.clear()


@pytest.fixture(scope="package")
def upstream() -> Iterator[int]:
    with running_upstream() as port:
        yield port
