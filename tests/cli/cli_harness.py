"""A real controller for the CLI tests, and helpers to run `stockade` against it.

The controller runs as a subprocess (`stockade controller run`) with its own
config: socket and ban store in a temporary directory, maps pinned under
/sys/fs/bpf/stockade-clitest-<pid>, no interface (the program loads and the
API serves without one). Teardown stops it by its PID and removes the pins,
also when a test failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stockade.cli.client import ControllerUnavailable, call, wait_until_serving
from stockade.config import load_config
from stockade.controller import loader
from stockade.controller.daemon import program_settings

MANAGEMENT = "198.18.200.0/24"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 30.0
STOCKADE = (sys.executable, "-m", "stockade.cli.main")
BAN_MAPS = ("ban_v4", "ban_v6", "ban_prefix_v4", "ban_prefix_v6")
ALLOW_MAPS = ("allow_v4", "allow_v6")


def stockade_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STOCKADE_CONFIG", "STOCKADE_SOCKET")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_stockade(
    *args: str, timeout: float = CLI_TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`stockade ARGS...` as a user runs it: a new process, real exit code."""
    return subprocess.run(
        [*STOCKADE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**stockade_env(), **(env or {})},
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error a failed command printed: exactly one line, `stockade: ...`."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{result.stderr}"
    assert lines[0].startswith("stockade: "), lines[0]
    return lines[0]


def config_text(state: Path, pin_root: Path, controller_extra: str = "") -> str:
    return f"""
[controller]
socket = "{state}/run/control.sock"
state_dir = "{state}/lib"
pin_root = "{pin_root}"
sweep_interval = "1s"
{controller_extra}

[controller.admin]
port = 0

[xdp]
interfaces = []
management_networks = ["{MANAGEMENT}"]
max_bans_v4 = 1024
max_bans_v6 = 1024
max_prefix_bans = 256
max_allow = 256
max_rate_sources = 1024

[proxy]
status_dir = "{state}/run/proxy"
"""


@dataclass
class Controller:
    """One `stockade controller run` process and the CLI pointed at it."""

    home: Path
    pin_root: Path
    controller_extra: str = ""  # more [controller] keys
    run_args: tuple[str, ...] = ()  # e.g. ("--dry-run",)
    config: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.config = self.home / "stockade.toml"
        self.config.write_text(config_text(self.home, self.pin_root, self.controller_extra))
        settings = program_settings(load_config(self.config))
        self.socket = load_config(self.config).controller.socket
        self.rules_socket = load_config(self.config).controller.rules_socket
        self.pin_dir = settings.pin_dir
        self.settings = settings

    @property
    def log(self) -> Path:
        return self.home / f"controller-{self.starts}.log"

    def log_tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> None:
        assert self.proc is None, "already running"
        # only ever a leftover of a killed run; waiting for the socket needs it gone
        self.socket.unlink(missing_ok=True)
        self.rules_socket.unlink(missing_ok=True)
        self.starts += 1
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*STOCKADE, "--config", str(self.config), "controller", "run", *self.run_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=stockade_env(),
            )
        try:
            wait_until_serving(self.socket, self.proc, START_TIMEOUT)
        except ControllerUnavailable as exc:
            if self.proc.poll() is None:
                self.kill()
            self.proc = None
            pytest.fail(f"{exc.message}:\n{self.log_tail()}")

    def stop(self) -> int:
        """SIGTERM by PID; returns the exit code."""
        assert self.proc is not None, "not running"
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"the controller ignored SIGTERM for {STOP_TIMEOUT:.0f}s")

    def kill(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- the CLI against this controller ------------------------------------------------
    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_stockade("--config", str(self.config), *args)

    def ok_json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        return json.loads(result.stdout)

    def api(self, command: str, **args: Any) -> Any:
        """Straight to the control API (for set-up and clean-up, not under test)."""
        return call(self.socket, command, **args)

    def state(self) -> dict[str, Any]:
        """What a change could touch: the store (via the API) and the kernel maps."""
        return {
            # ttl_remaining counts down by itself; everything else must stay
            "bans": [
                {k: v for k, v in ban.items() if k != "ttl_remaining"} for ban in self.api("bans")
            ],
            "allows": self.api("allow.list"),
            "kernel": {name: self.dump_map(name) for name in BAN_MAPS + ALLOW_MAPS},
        }

    def dump_map(self, name: str) -> list[dict[str, Any]]:
        """A pinned map as bpftool sees it (readable with the controller down)."""
        path = self.pin_dir / name
        result = subprocess.run(
            ["bpftool", "map", "dump", "pinned", str(path), "-j"],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, f"bpftool map dump {path}: {result.stdout}{result.stderr}"
        entries: list[dict[str, Any]] = json.loads(result.stdout)
        return sorted(entries, key=lambda e: json.dumps(e["key"]))

    def clear(self) -> None:
        for ban in self.api("bans"):
            self.api("unban", target=ban["target"])
        for allow in self.api("allow.list"):
            if allow["source"] != "config":
                self.api("allow.remove", target=allow["target"])

    def remove_pins(self) -> None:
        loader.remove_pins(self.settings)
        if self.pin_root.exists():
            self.pin_root.rmdir()


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the CLI tests run a real controller, which loads an XDP program and needs root "
            "(bpf(), bpffs); run them as root, e.g. `sudo make test`",
            pytrace=False,
        )
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is missing; install it (`apt-get install bpftool`)", pytrace=False)
