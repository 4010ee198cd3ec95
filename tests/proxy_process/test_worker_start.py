"""`stockade proxy run` when workers cannot start: a clear stop, never a crash loop.

Files the workers' user cannot open stop the proxy before any worker is forked, with one
line naming the file, the user and the fix. A worker that still dies at start (something
unforeseen, induced here by a wrapper that breaks the gateway) is retried a few times,
then the master closes its sockets and exits 1 with the worker's error. SIGTERM is acted
on within a second in every state: during the start check and in a restart back-off.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from process_harness import STOCKADE, free_port, running_proxy

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user may enter (pytest's own tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="stockade-start-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def proxy_config(base: Path, port: int, extra: str = "", listener: str = "") -> str:
    return f"""
[controller]
socket = "/nonexistent/stockade-test/control.sock"
[proxy]
workers = 2
drain_timeout = "5s"
status_dir = "{base}/status"
metrics_dir = "{base}/metrics"
{extra}
[proxy.admin]
enabled = false
[[proxy.listeners]]
address = "127.0.0.1"
port = {port}
{listener}
[proxy.pools.api]
servers = ["127.0.0.1:9"]
[proxy.pools.api.health]
enabled = false
[[proxy.routes]]
pool = "api"
"""


def run_proxy(command: list[str], config: Path, timeout: float = 60) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [*command, "--config", str(config), "proxy", "run"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.returncode, result.stderr, time.monotonic() - started


def root_only_dir(base: Path) -> Path:
    path = base / "private"
    path.mkdir(mode=0o700)
    return path


def root_only_file(path: Path, text: str = "") -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# (description, setup -> (config lines, the file the error must name), what the fix says)
Setup = Callable[[Path], tuple[str, Path]]


def _log_in_root_only_dir(base: Path) -> tuple[str, Path]:
    log = root_only_dir(base) / "access.log"
    return f'access_log = "{log}"', log.parent


def _root_only_log_file(base: Path) -> tuple[str, Path]:
    log = root_only_file(base / "access.log")
    return f'access_log = "{log}"', log


def _log_in_unwritable_dir(base: Path) -> tuple[str, Path]:
    directory = base / "logs"
    directory.mkdir(mode=0o755)
    return f'access_log = "{directory}/access.log"', directory / "access.log"


def _root_only_api_keys(base: Path) -> tuple[str, Path]:
    keys = root_only_file(base / "keys.toml", "")
    return f'[proxy.auth]\napi_keys_file = "{keys}"', keys


CASES: list[tuple[str, Setup, str]] = [
    ("access log in a root-only directory", _log_in_root_only_dir, "chmod o+x"),
    ("access log file only root may write", _root_only_log_file, "chown nobody"),
    ("access log in a directory only root may write", _log_in_unwritable_dir, "chown nobody"),
    ("API keys file only root may read", _root_only_api_keys, "chmod g+r"),
]


@pytest.mark.parametrize(("setup", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_file_the_workers_cannot_open_stops_the_start(base: Path, setup: Setup, fix: str) -> None:
    lines, named = setup(base)
    config = base / "stockade.toml"
    extra = 'user = "nobody"\n' + (lines if not lines.startswith("[") else "")
    text = proxy_config(base, free_port(), extra)
    if lines.startswith("["):  # a section of its own, after [proxy]'s keys
        text = text.replace("[proxy.admin]", f"{lines}\n[proxy.admin]", 1)
    config.write_text(text)
    code, stderr, took = run_proxy(STOCKADE, config)
    assert code == 1, stderr
    assert took < 30
    assert "Traceback" not in stderr
    assert "proxy serving" not in stderr and "worker" not in stderr.replace("workers'", "")
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, stderr
    assert str(named) in errors[0]
    assert "user nobody" in errors[0]
    assert fix in errors[0]


@pytest.mark.parametrize(("setup", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_config_checks_as_the_workers_user(base: Path, setup: Setup, fix: str) -> None:
    """`stockade check-config` run as root finds what `proxy run` would stop on."""
    lines, named = setup(base)
    config = base / "stockade.toml"
    extra = 'user = "nobody"\n' + (lines if not lines.startswith("[") else "")
    text = proxy_config(base, free_port(), extra)
    if lines.startswith("["):
        text = text.replace("[proxy.admin]", f"{lines}\n[proxy.admin]", 1)
    config.write_text(text)
    result = subprocess.run(
        [*STOCKADE, "--config", str(config), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert str(named) in result.stderr and "user nobody" in result.stderr, result.stderr
    assert fix in result.stderr


def test_a_user_that_does_not_exist_stops_the_start(base: Path) -> None:
    config = base / "stockade.toml"
    quotas = '[proxy.quotas]\ndatabase = "{}/usage.db"\n[proxy.quotas.plans.free]\nper_day = 10\n'
    text = proxy_config(base, free_port(), 'user = "no-such-user"')
    config.write_text(text.replace("[proxy.admin]", quotas.format(base) + "[proxy.admin]", 1))
    code, stderr, _ = run_proxy(STOCKADE, config)
    assert code == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "proxy.user 'no-such-user' does not exist" in errors[0], stderr


def test_the_same_files_made_right_start(base: Path) -> None:
    """The control: where nobody may write, the start check passes and workers serve."""
    logs = base / "logs"
    logs.mkdir()
    os.chown(logs, NOBODY.pw_uid, NOBODY.pw_gid)
    port = free_port()
    text = proxy_config(base, port, f'user = "nobody"\naccess_log = "{logs}/access.log"')
    with running_proxy(text, base, port) as proxy:
        proxy.wait_workers(2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 502")  # no upstream on port 9
    assert (logs / "access.log").stat().st_uid == NOBODY.pw_uid


WRAPPER = """
import sys, time
import stockade.proxy.workers as workers
from stockade.proxy.preflight import ProxyStartupError

def broken_gateway(*args, **kwargs):
    raise {error}("induced failure at start")

def slow_validate(config):
    print("start check running", file=sys.stderr, flush=True)
    time.sleep(30)

workers.Gateway = broken_gateway
{patches}
from stockade.cli.main import main
main()
"""


def wrapper(base: Path, error: str = "RuntimeError", patches: str = "") -> list[str]:
    """`stockade` with its gateway broken (and maybe more), for workers that die at start."""
    script = base / "wrapper.py"
    script.write_text(WRAPPER.format(error=error, patches=patches))
    return [sys.executable, str(script)]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize(
    ("error", "said"),
    [
        ("RuntimeError", "no worker could start (5 attempts in a row); the last one: RuntimeError"),
        # whichever worker reports first names itself ("worker 0" or "worker 1")
        ("ProxyStartupError", " cannot start: induced failure at start"),
    ],
    ids=["unforeseen crash", "startup error"],
)
def test_workers_that_cannot_start_stop_the_master(base: Path, error: str, said: str) -> None:
    port = free_port()
    config = base / "stockade.toml"
    config.write_text(proxy_config(base, port))
    code, stderr, took = run_proxy(wrapper(base, error), config)
    assert code == 1, stderr
    assert took < 20, stderr
    last = [line for line in stderr.splitlines() if " ERROR " in line][-1]
    assert said in last and "induced failure at start" in last and "stopping the proxy" in last
    assert stderr.count("restarting in") <= 2 * 5
    assert refused(port)


def log_contains(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert proc.poll() is None, path.read_text()
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.02)


def sigterm_is_taken_within_a_second(base: Path, command: list[str], marker: str) -> int:
    """Start the proxy, wait for marker in its log, SIGTERM it: its exit code."""
    port = free_port()
    config = base / "stockade.toml"
    config.write_text(proxy_config(base, port))
    log = base / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--config", str(config), "proxy", "run"], stdout=out, stderr=out
        )
    try:
        log_contains(log, marker, proc, timeout=30)
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 1.0, (took, log.read_text())
    assert refused(port)
    return code


def test_sigterm_during_a_restart_backoff(base: Path) -> None:
    patches = "workers.RESTART_BACKOFF_FIRST = 5.0\nworkers.START_ATTEMPTS = 1000"
    command = wrapper(base, patches=patches)
    assert sigterm_is_taken_within_a_second(base, command, "restarting in 5.0s") == 0


def test_sigterm_during_the_start_check(base: Path) -> None:
    command = wrapper(base, patches="workers.validate = slow_validate")
    assert sigterm_is_taken_within_a_second(base, command, "start check running") == 0
