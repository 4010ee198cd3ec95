"""Client side of the control API for the CLI: `call` (stockade.control_client) and waiting
for a controller we started."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from stockade.control_client import START_HINT, TIMEOUT, ControllerUnavailable, call

__all__ = ["START_HINT", "TIMEOUT", "ControllerUnavailable", "call", "wait_until_serving"]


def wait_until_serving(socket_path: Path, process: subprocess.Popen[Any], timeout: float) -> None:
    """Poll until a controller we started answers `status`.

    Raises ControllerUnavailable if the process exits first or the time runs
    out (the caller owns the process and decides what to do with it).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ControllerUnavailable(
                f"the controller exited with {process.returncode} while starting", None
            )
        try:
            call(socket_path, "status")
            return
        except ControllerUnavailable:
            time.sleep(0.05)  # polling for readiness, not waiting out a window
    raise ControllerUnavailable(f"the controller did not serve {socket_path} within {timeout:.0f}s")
