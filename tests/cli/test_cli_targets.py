"""Targets that mean something else than they say, through the CLI, the real
controller and the kernel maps.

Every refusal: exit 2, one line, and the store and the kernel maps exactly as
they were. A permission problem is a runtime failure: exit 1, "permission
denied ... run as root".
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_harness import STOCKADE, Controller, one_line_error, run_stockade, stockade_env
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.control_client import call
from stockade.controller import libbpf
from stockade.lab.packets import tcp4, tcp6
from stockade.protocol import BAD_INPUT, CommandError

pytestmark = pytest.mark.kernel

XDP_DROP, XDP_PASS = 1, 2
NOBODY = 65534


@pytest.fixture
def populated(ctl: Controller) -> Controller:
    ctl.api("ban", target="198.18.0.50", ttl="1h", reason="existing")
    ctl.api("ban", target="fd00:50::/64")
    ctl.api("allow.add", target="198.18.9.0/24", reason="office")
    return ctl


def refused(ctl: Controller, *args: str) -> str:
    """Run a command that must be refused as bad input and change nothing; its error line."""
    before = ctl.state()
    assert len(before["kernel"]["ban_v4"]) == 1  # the state compared is not empty
    result = ctl.cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    line = one_line_error(result)
    assert ctl.state() == before
    return line


# -- /0 and other prefixes broader than the minimum -----------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["ban", "0.0.0.0/0"],
        ["ban", "::/0"],
        ["ban", "10.0.0.0/7"],
        ["ban", "fd00::/15", "--ttl", "1h"],
        ["allow", "add", "0.0.0.0/0"],
        ["allow", "add", "::/0"],
        ["allow", "add", "128.0.0.0/1"],
        ["rule", "ban", "0.0.0.0/0", "--ttl", "10m", "--rule", "scanner"],
    ],
    ids=lambda args: " ".join(args),
)
def test_broad_prefixes_are_refused_without_force(populated: Controller, args: list[str]) -> None:
    line = refused(populated, *args)
    assert "refusing to" in line and "broader than the minimum" in line
    if args[0] != "rule":  # a rule ban can never be forced
        assert line.endswith("; add --force if you mean it")


def test_force_bans_and_allows_a_broad_prefix(ctl: Controller) -> None:
    banned = ctl.ok_json("ban", "10.0.0.0/7", "--force")
    assert (banned["target"], banned["kind"]) == ("10.0.0.0/7", "prefix")
    assert [e["formatted"]["key"]["prefixlen"] for e in ctl.dump_map("ban_prefix_v4")] == [7]
    allowed = ctl.ok_json("allow", "add", "::/0", "--force")
    assert allowed["target"] == "::/0"
    assert [e["formatted"]["key"]["prefixlen"] for e in ctl.dump_map("allow_v6")] == [0]


def test_rule_bans_from_the_proxy_obey_the_minimum(ctl: Controller) -> None:
    before = ctl.state()
    with pytest.raises(CommandError) as info:
        call(ctl.rules_socket, "rule.ban", target="0.0.0.0/0", ttl="10m", rule="scanner")
    assert info.value.kind == BAD_INPUT and "refusing to ban 0.0.0.0/0" in info.value.message
    assert ctl.state() == before


# -- zone ids ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["ban", "fd00::12%x"],
        ["ban", "fe80::1%eth0/128"],
        ["unban", "fd00::12%x"],
        ["allow", "add", "fd00::%lo/64"],
        ["explain", "fd00::12%x"],
    ],
    ids=lambda args: " ".join(args),
)
def test_zone_ids_are_refused(populated: Controller, args: list[str]) -> None:
    assert "zone id" in refused(populated, *args)


def test_a_zone_id_over_the_control_api_is_refused(populated: Controller) -> None:
    before = populated.state()
    with pytest.raises(CommandError) as info:
        populated.api("ban", target="fd00::12%x")
    assert info.value.kind == BAD_INPUT and "zone id" in info.value.message
    assert populated.state() == before


# -- IPv4-mapped IPv6 ----------------------------------------------------------------------
def running_program(ctl: Controller) -> int:
    return libbpf.prog_fd_by_id(ctl.api("status")["program"]["id"])


def test_a_mapped_address_is_stored_and_enforced_as_ipv4(ctl: Controller) -> None:
    result = ctl.cli("ban", "::ffff:198.18.0.11", "--json")
    assert result.returncode == 0, result.stderr
    banned = json.loads(result.stdout)
    assert (banned["target"], banned["family"]) == ("198.18.0.11", "ipv4")
    assert "stored and enforced as 198.18.0.11" in result.stderr  # and it says so
    assert [b["target"] for b in ctl.ok_json("bans")] == ["198.18.0.11"]
    assert [e["formatted"]["key"]["addr"] for e in ctl.dump_map("ban_v4")] == [[198, 18, 0, 11]]
    assert ctl.dump_map("ban_v6") == []
    fd = running_program(ctl)
    try:  # an IPv4 packet from it is dropped by the controller's own program
        assert libbpf.prog_test_run(fd, tcp4("198.18.0.11")).retval == XDP_DROP
        assert libbpf.prog_test_run(fd, tcp4("198.18.0.12")).retval == XDP_PASS
        assert libbpf.prog_test_run(fd, tcp6("::ffff:198.18.0.11")).retval == XDP_PASS
    finally:
        os.close(fd)
    # the bare address lifts it: store and kernel agree
    assert ctl.ok_json("unban", "198.18.0.11")["status"] == "removed"
    assert ctl.ok_json("bans") == [] and ctl.dump_map("ban_v4") == []


def test_a_mapped_prefix_over_the_api_is_the_ipv4_prefix(ctl: Controller) -> None:
    assert ctl.api("ban", target="::ffff:198.18.0.0/112")["target"] == "198.18.0.0/16"
    (entry,) = ctl.dump_map("ban_prefix_v4")
    assert entry["formatted"]["key"]["prefixlen"] == 16
    assert ctl.dump_map("ban_prefix_v6") == []
    assert ctl.api("explain", target="::ffff:198.18.3.4")["verdict"] == "banned"


# -- ASCII digits only ---------------------------------------------------------------------
FOREIGN_DIGITS = ["٣", "۳", "३", "৩", "\uff13", "²", "①", "\U0001d7d1"]  # fullwidth, bold


@pytest.mark.parametrize("digit", FOREIGN_DIGITS)
def test_foreign_digits_in_a_ttl_and_an_address(populated: Controller, digit: str) -> None:
    assert "invalid duration" in refused(populated, "ban", "198.18.0.8", "--ttl", f"{digit}s")
    assert "invalid target" in refused(populated, "ban", f"198.18.0.{digit}")
    assert "invalid target" in refused(populated, "allow", "add", f"198.18.0.0/2{digit}")
    assert "--factor" in refused(
        populated, "rule", "ban", "198.18.0.8", "--ttl", "1m", "--rule", "r", "--factor", digit
    )


@settings(max_examples=40)
@given(
    digit=st.characters(categories=("Nd", "No")).filter(lambda c: not c.isascii()),
    field=st.sampled_from(["ttl", "target"]),
)
def test_foreign_digits_over_the_control_api(
    controller: Controller, digit: str, field: str
) -> None:
    args = {"target": "198.18.0.8", "ttl": "1h"} | {
        field: f"{digit}s" if field == "ttl" else f"198.18.0.{digit}"
    }
    before = controller.api("bans")
    with pytest.raises(CommandError) as info:
        controller.api("ban", **args)
    assert info.value.kind == BAD_INPUT
    assert controller.api("bans") == before


# -- permissions: a runtime failure, not bad input -------------------------------------------
def as_nobody(*args: str, cwd: Path = Path("/")) -> subprocess.CompletedProcess[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to run as another user"
    return subprocess.run(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *STOCKADE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=stockade_env(),
        cwd=cwd,
        check=False,
    )


@contextmanager
def searchable_by_others(path: Path) -> Iterator[None]:
    """Let other users reach `path` (o+x on each directory above it, restored after),
    as /run/stockade (0755) lets them reach the root-only control socket."""
    changed = []
    for directory in path.parents:
        if directory == Path("/tmp") or directory == Path("/"):
            break
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            changed.append((directory, stat.S_IMODE(mode)))
    try:
        yield
    finally:
        for directory, mode in changed:
            directory.chmod(mode)


def test_a_root_only_socket_is_permission_denied_exit_1(populated: Controller) -> None:
    before = populated.state()
    assert stat.S_IMODE(populated.socket.stat().st_mode) == 0o600
    with searchable_by_others(populated.socket):
        for command in (["bans"], ["ban", "198.18.0.9"], ["status"]):
            result = as_nobody("--socket", str(populated.socket), *command)
            assert result.returncode == 1, (command, result.stderr)
            line = one_line_error(result)
            assert "permission denied" in line and "run as root" in line, line
            assert "is not readable" not in line
    assert populated.state() == before


def test_an_unreadable_config_is_permission_denied_exit_1(tmp_path: Path) -> None:
    config = tmp_path / "stockade.toml"
    config.write_text("[xdp]\n")
    config.chmod(0o600)
    tmp_path.chmod(0o755)
    result = as_nobody("--config", str(config), "bans")
    assert result.returncode == 1, result.stderr
    line = one_line_error(result)
    assert line == f"stockade: permission denied reading the config file {config}; run as root"
    assert as_nobody("check-config", str(config)).returncode == 1


def test_the_cli_runs_as_root_here() -> None:
    # the tests above change user with setpriv; they mean something only as root
    assert os.geteuid() == 0
    assert run_stockade("--version").returncode == 0
    assert sys.executable
