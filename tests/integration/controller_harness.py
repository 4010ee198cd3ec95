"""Run a real `stockade controller run` against a lab's gateway interface."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stockade.cli.client import ControllerUnavailable, call, wait_until_serving
from stockade.controller import layout
from stockade.lab.netns_exec import popen_in_netns, python_argv, run_in_netns

STOCKADE = [sys.executable, "-m", "stockade.cli.main"]


@dataclass
class RunningController:
    config_path: Path
    socket: Path
    pin_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*STOCKADE, "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"stockade {' '.join(args)} failed: {result.stderr}")
        return result

    def api(self, command: str, **args: Any) -> Any:
        return call(self.socket, command, **args)

    def counters(self) -> dict[str, int]:
        stats = self.api("stats")
        return {name: v["packets"] for name, v in stats["reasons"].items()}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_config(
    path: Path, tmp: Path, pin_root: Path, netns: str, ifname: str, **xdp: Any
) -> None:
    lines = [
        "[controller]",
        f'socket = "{tmp / "control.sock"}"',
        f'state_dir = "{tmp / "state"}"',
        f'pin_root = "{pin_root}"',
        f'netns = "{netns}"',
        'sweep_interval = "1s"',
        "[controller.admin]",
        "port = 0",  # metrics on a free port: tests may run controllers side by side
        "[xdp]",
        f'interfaces = ["{ifname}"]',
        "max_bans_v4 = 4096",
        "max_bans_v6 = 4096",
        "max_rate_sources = 4096",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in xdp.items()]
    path.write_text("\n".join(lines) + "\n")


def start(config_path: Path, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [*STOCKADE, "--config", str(config_path), "controller", "run", *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return proc


def wait_ready(socket_path: Path, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    try:
        wait_until_serving(socket_path, proc, timeout=30)
    except ControllerUnavailable as exc:
        raise AssertionError(f"{exc.message}:\n{log_path.read_text()}") from None


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    return proc.wait(timeout=20)


@contextmanager
def running_controller(
    tmp: Path, netns: str, ifname: str, *extra: str, **xdp: Any
) -> Iterator[RunningController]:
    pin_root = Path(f"/sys/fs/bpf/stockade-it-{os.getpid()}-{tmp.name}"[:200])
    config_path = tmp / "stockade.toml"
    write_config(config_path, tmp, pin_root, netns, ifname, **xdp)
    log_path = tmp / "controller.log"
    proc = start(config_path, log_path, *extra)
    ctl = RunningController(
        config_path, tmp / "control.sock", pin_root / f"v{layout.layout_version()}", log_path, proc
    )
    try:
        wait_ready(ctl.socket, proc, log_path)
        yield ctl
    finally:
        stop(ctl.proc)
        subprocess.run(
            [*STOCKADE, "--config", str(config_path), "detach", "--all", "--remove-maps"],
            capture_output=True,
            timeout=30,
        )
        shutil.rmtree(pin_root, ignore_errors=True)


def restart(ctl: RunningController, *extra: str) -> None:
    ctl.proc = start(ctl.config_path, ctl.log_path, *extra)
    wait_ready(ctl.socket, ctl.proc, ctl.log_path)


def probe(netns: str, kind: str, *args: str, timeout: float = 60) -> Any:
    """Run `python -m stockade.lab.probe KIND ARGS` in netns; its JSON result."""
    result = run_in_netns(
        netns,
        python_argv("-m", "stockade.lab.probe", kind, *args),
        capture_output=True,
        timeout=timeout,
    )
    if not result.stdout.strip():
        raise AssertionError(f"probe {kind} {args} printed nothing: {result.stderr}")
    return json.loads(result.stdout)


def watch_during(
    netns: str,
    src: str,
    dst: str,
    port: int,
    duration: float,
    interval: float,
    action: Callable[[], None],
) -> list[tuple[float, bool]]:
    """Run `action` while the client probes dst:port; [(start monotonic, ok)] per attempt."""
    args = ("--src", src, "--dst", dst, "--port", str(port), "--duration", str(duration))
    watcher = popen_in_netns(
        netns,
        python_argv("-m", "stockade.lab.probe", "watch", *args, "--interval", str(interval)),
        stdout=subprocess.PIPE,
    )
    try:
        action()
        out, _ = watcher.communicate(timeout=duration + 60)
    finally:
        if watcher.poll() is None:
            watcher.kill()  # our own child, by PID
            watcher.wait()
    return [(start, ok) for start, ok in json.loads(out)["attempts"]]


def can_connect(netns: str, src: str, dst: str, port: int, timeout: float = 0.5) -> bool:
    args = ("--src", src, "--dst", dst, "--port", str(port), "--timeout", str(timeout))
    return bool(probe(netns, "tcp", *args)["ok"])


def can_ping(netns: str, src: str, dst: str) -> bool:
    return bool(probe(netns, "ping", "--src", src, "--dst", dst, "--timeout", "1")["ok"])
