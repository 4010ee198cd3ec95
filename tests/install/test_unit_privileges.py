"""The units' capability sets are enough, measured without systemd.

The controller runs as root bounded to the controller unit's
CapabilityBoundingSet (read from the unit file) and with a supplementary
group instead of CAP_CHOWN, as the unit runs it: it must compile, pin,
attach, hand the rules socket to the group, and, after a restart, reopen
the pinned maps (bcc does that with BPF_MAP_GET_FD_BY_ID, which needs
CAP_SYS_ADMIN). The proxy runs as `nobody` with only the proxy unit's
ambient capability and must serve on port 80.

Everything happens in a throwaway network namespace with a veth pair, and
the pins under a directory of this run's own, removed afterwards.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from install_harness import SOURCE_UNITS, capability_names, unit_value

from stockade.cli.client import ControllerUnavailable, call, wait_until_serving

pytestmark = [pytest.mark.kernel, pytest.mark.netns, pytest.mark.timeout(180)]

STOCKADE = [sys.executable, "-m", "stockade.cli.main"]
CONTROLLER_UNIT = SOURCE_UNITS / "stockade-controller.service"
PROXY_UNIT = SOURCE_UNITS / "stockade-proxy.service"
GROUP = "nogroup"  # stands in for `stockade`, which this host need not have
USER = "nobody"


@dataclass(frozen=True)
class Netns:
    name: str
    ifname: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = Netns(f"stkcap{os.getpid() % 100000}", "skcap0")
    ip("netns", "add", ns.name)
    try:
        ip("-n", ns.name, "link", "set", "lo", "up")
        ip("-n", ns.name, "link", "add", ns.ifname, "type", "veth", "peer", "name", "skcap1")
        ip("-n", ns.name, "link", "set", ns.ifname, "up")
        ip("-n", ns.name, "link", "set", "skcap1", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=30)


def bounded(unit: Path) -> list[str]:
    caps = ",".join(f"+{name}" for name in capability_names(unit, "CapabilityBoundingSet"))
    return [f"--bounding-set=-all,{caps}"]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by PID
        proc.wait()


def cli(config: Path, *args: str) -> str:
    result = subprocess.run(
        [*STOCKADE, "--config", str(config), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"stockade {' '.join(args)}: {result.stderr}"
    return result.stdout


def test_controller_runs_with_the_units_capabilities(netns: Netns, tmp_path: Path) -> None:
    assert unit_value(CONTROLLER_UNIT, "SupplementaryGroups") == "stockade"
    pin_root = Path(f"/sys/fs/bpf/stockade-captest-{os.getpid()}")
    socket = tmp_path / "control.sock"
    config = tmp_path / "stockade.toml"
    config.write_text(
        "\n".join(
            [
                "[controller]",
                f'socket = "{socket}"',
                f'rules_socket = "{tmp_path / "rules.sock"}"',
                f'rules_group = "{GROUP}"',
                f'state_dir = "{tmp_path / "state"}"',
                f'pin_root = "{pin_root}"',
                "[controller.admin]",
                "port = 0",
                "[xdp]",
                f'interfaces = ["{netns.ifname}"]',
                "max_bans_v4 = 1024",
                "max_bans_v6 = 1024",
                "max_rate_sources = 1024",
            ]
        )
        + "\n"
    )
    log = tmp_path / "controller.log"
    argv = [
        "nsenter",
        f"--net={netns.path}",
        "--",
        "setpriv",
        f"--groups={grp.getgrnam(GROUP).gr_gid}",
        *bounded(CONTROLLER_UNIT),
        "--",
        *STOCKADE,
        "--config",
        str(config),
        "controller",
        "run",
    ]

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until_serving(socket, proc, timeout=60)
        except ControllerUnavailable as exc:
            stop(proc)
            raise AssertionError(f"{exc.message}:\n{log.read_text()}") from None
        return proc

    proc = start()
    try:
        cli(config, "ban", "198.18.0.7")
        rules = tmp_path / "rules.sock"
        assert rules.stat().st_gid == grp.getgrnam(GROUP).gr_gid
        stop(proc)
        assert proc.returncode == 0, log.read_text()

        proc = start()  # reopens the pinned maps
        assert "198.18.0.7" in cli(config, "bans")
        status = call(socket, "status")
        (iface,) = status["interfaces"]
        assert iface["name"] == netns.ifname and iface["ours"], status
        effective = _cap_eff(proc.pid)
        assert effective & ~_mask(CONTROLLER_UNIT) == 0, hex(effective)
    finally:
        stop(proc)
        subprocess.run(
            [
                "nsenter",
                f"--net={netns.path}",
                "--",
                *STOCKADE,
                "--config",
                str(config),
                "detach",
                "--all",
                "--remove-maps",
            ],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(pin_root, ignore_errors=True)


def _cap_eff(pid: int) -> int:
    """CapEff of the program setpriv exec'd (the same PID: nsenter and setpriv exec)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff in /proc/{pid}/status")


_CAP_NUMBERS = {"net_bind_service": 10, "net_admin": 12, "sys_admin": 21, "perfmon": 38, "bpf": 39}


def _mask(unit: Path) -> int:
    return sum(1 << _CAP_NUMBERS[name] for name in capability_names(unit, "CapabilityBoundingSet"))


@contextlib.contextmanager
def nobody_dir() -> Iterator[Path]:
    """A directory `nobody` owns (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="stockade-captest-"))
    try:
        os.chmod(path, 0o755)
        entry = pwd.getpwnam(USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_proxy_serves_port_80_as_nobody_with_the_units_capability(netns: Netns) -> None:
    assert unit_value(PROXY_UNIT, "User") == "stockade"
    ambient = ",".join(f"+{n}" for n in capability_names(PROXY_UNIT, "AmbientCapabilities"))
    with nobody_dir() as run_dir:
        config = run_dir / "stockade.toml"
        config.write_text(
            "\n".join(
                [
                    "[proxy]",
                    "workers = 2",
                    f'status_dir = "{run_dir / "status"}"',
                    f'metrics_dir = "{run_dir / "metrics"}"',
                    "[proxy.admin]",
                    "port = 0",
                    "[[proxy.listeners]]",
                    'address = "127.0.0.1"',
                    "port = 80",
                ]
            )
            + "\n"
        )
        config.chmod(0o644)
        log = run_dir / "proxy.log"
        argv = [
            "nsenter",
            f"--net={netns.path}",
            "--",
            "setpriv",
            f"--reuid={USER}",
            f"--regid={GROUP}",
            "--clear-groups",
            f"--inh-caps=-all,{ambient}",
            f"--ambient-caps=-all,{ambient}",
            *bounded(PROXY_UNIT),
            "--",
            *STOCKADE,
            "--config",
            str(config),
            "proxy",
            "run",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd="/")
        try:
            status = _get_status(netns, "http://127.0.0.1:80/anything")
            assert status == 404, log.read_text()
            assert _cap_eff(proc.pid) == 1 << _CAP_NUMBERS["net_bind_service"]
            assert os.stat(f"/proc/{proc.pid}").st_uid == pwd.getpwnam(USER).pw_uid
        finally:
            stop(proc)
        assert proc.returncode == 0, log.read_text()


def _get_status(netns: Netns, url: str) -> int:
    """The HTTP status of GET url from inside the namespace, retried while the proxy starts."""
    code = (
        "import sys, time, urllib.request, urllib.error\n"
        "deadline = time.monotonic() + 30\n"
        "while True:\n"
        "    try:\n"
        f"        print(urllib.request.urlopen({url!r}, timeout=2).status); break\n"
        "    except urllib.error.HTTPError as exc:\n"
        "        print(exc.code); break\n"
        "    except OSError:\n"
        "        if time.monotonic() > deadline: print(0); break\n"
        "        time.sleep(0.2)\n"
    )
    result = subprocess.run(
        ["nsenter", f"--net={netns.path}", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return int(result.stdout.strip() or 0)
