"""Rule bans against a real controller: the rules socket, `stockade rule ban`, `explain`.

The module's controller (conftest) serves the default, root-only rules socket.
A second one, in dry-run, serves it to the group `nogroup`, so an unprivileged
peer (uid nobody) can be tried for real; `BanClient` runs against that one,
through a restart and while the controller is frozen.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_harness import MANAGEMENT, Controller, one_line_error, run_stockade

from stockade.cli.client import call
from stockade.protocol import CommandError
from stockade.proxy.ban_client import TIMEOUT, UNAVAILABLE, BanClient, BanPushError

pytestmark = pytest.mark.kernel

CLI_JSON_DOC = Path(__file__).resolve().parents[2] / "docs" / "cli-json.md"
NOBODY, NOGROUP = 65534, 65534
BAN_FIELDS = {
    "target",
    "kind",
    "family",
    "reason",
    "source",
    "created",
    "expires",
    "ttl_remaining",
    "packets",
    "bytes",
    "in_kernel",
}


def documented(command: str) -> set[str]:
    """Field names in the tables of the docs/cli-json.md section on `stockade COMMAND`."""
    sections = re.split(r"^## ", CLI_JSON_DOC.read_text(), flags=re.MULTILINE)
    (section,) = [s for s in sections if s.startswith(f"`stockade {command} ")]
    return set(re.findall(r"^\| `([a-z0-9_.]+)` \|", section, flags=re.MULTILINE))


def kernel_v4_bans(ctl: Controller) -> list[list[int]]:
    return [e["formatted"]["key"]["addr"] for e in ctl.dump_map("ban_v4")]


# -- the rules socket of the module's controller ---------------------------------------
def test_the_rules_socket_is_root_only_by_default(ctl: Controller) -> None:
    st = ctl.rules_socket.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert ctl.rules_socket.parent == ctl.socket.parent


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("ban", {"target": "198.18.0.7"}),
        ("unban", {"target": "198.18.0.50"}),
        ("bans", {}),
        ("allow.remove", {"target": "198.18.9.0/24"}),
        ("explain", {"target": "198.18.0.50"}),
    ],
)
def test_the_rules_socket_refuses_every_other_command(
    ctl: Controller, command: str, args: dict[str, Any]
) -> None:
    ctl.api("ban", target="198.18.0.50", ttl="1h")
    ctl.api("allow.add", target="198.18.9.0/24")
    before = ctl.state()
    with pytest.raises(CommandError) as info:
        call(ctl.rules_socket, command, **args)
    assert info.value.kind == "runtime"
    assert info.value.message == (
        f"permission denied: `{command}` is not accepted on the rules socket, only rule.ban"
    )
    assert info.value.hint == f"use the control socket {ctl.socket} (root only)"
    assert ctl.state() == before


def test_rule_ban_on_the_rules_socket_reaches_the_kernel(ctl: Controller) -> None:
    result = call(ctl.rules_socket, "rule.ban", target="198.18.0.11", ttl="10m", rule="scanner")
    assert (result["status"], result["ttl"], result["offence"]) == ("added", 600, 1)
    assert kernel_v4_bans(ctl) == [[198, 18, 0, 11]]
    again = call(ctl.rules_socket, "rule.ban", target="198.18.0.11", ttl="10m", rule="scanner")
    assert (again["status"], again["ttl"], again["offence"]) == ("updated", 1200, 2)
    assert [b["source"] for b in ctl.api("bans")] == ["rule"]


# -- `stockade rule ban` -----------------------------------------------------------------
def test_rule_ban_json_and_the_documented_fields(ctl: Controller) -> None:
    escalation = ["--ttl", "10m", "--rule", "scanner", "--factor", "3", "--max-ttl", "1h"]
    details = ["--details", '{"distinct_404_paths": 31}']
    added = ctl.ok_json("rule", "ban", "198.18.0.21", *escalation, *details)
    assert set(added) == BAN_FIELDS | {"status", "ttl", "offence", "rule", "details"}
    assert (added["status"], added["source"], added["reason"]) == ("added", "rule", "rule scanner")
    assert added["details"] == {"distinct_404_paths": 31}
    second = ctl.ok_json("rule", "ban", "198.18.0.21", *escalation)
    assert (second["status"], second["ttl"], second["offence"]) == ("updated", 1800, 2)

    ctl.ok_json("ban", "198.18.0.22")  # permanent
    kept = ctl.ok_json("rule", "ban", "198.18.0.22", "--ttl", "10m", "--rule", "scanner")
    assert kept == {
        "status": "already_banned",
        "target": "198.18.0.22",
        "banned_by": "198.18.0.22",
        "expires": None,
        "rule": "scanner",
    }
    inside = ctl.ok_json("rule", "ban", "198.18.200.9", "--ttl", "10m", "--rule", "scanner")
    assert inside == {
        "status": "allowlisted",
        "target": "198.18.200.9",
        "allowed_by": MANAGEMENT,
        "rule": "scanner",
    }
    assert "rule scanner asked to ban 198.18.200.9" in ctl.log_tail()
    assert documented("rule ban") == (set(added) - BAN_FIELDS) | set(kept) | set(inside)


def test_rule_ban_plain_output(ctl: Controller) -> None:
    first = ctl.cli("rule", "ban", "198.18.0.31", "--ttl", "10m", "--rule", "scanner")
    assert (first.returncode, first.stderr) == (0, "")
    assert first.stdout.startswith("added: 198.18.0.31 banned for 10m (offence 1), expires in ")
    inside = ctl.cli("rule", "ban", "198.18.200.9", "--ttl", "10m", "--rule", "scanner")
    assert inside.stdout == f"allowlisted: 198.18.200.9 is inside {MANAGEMENT}; not banned\n"
    ctl.api("ban", target="198.18.4.0/24")
    kept = ctl.cli("rule", "ban", "198.18.4.4", "--ttl", "10m", "--rule", "scanner")
    assert kept.stdout == (
        "already banned: 198.18.4.4 is covered by 198.18.4.0/24, which expires never; kept\n"
    )


RULE_BAN_BAD_INPUT = [
    (["--ttl", "10m"], "missing option '--rule'"),
    (["--rule", "scanner"], "missing option '--ttl'"),
    (["--ttl", "soon", "--rule", "scanner"], "ttl: invalid duration 'soon'"),
    (["--ttl", "10m", "--rule", "has space"], "invalid rule name 'has space'"),
    (["--ttl", "10m", "--rule", "r", "--factor", "0.5"], "factor must be a finite number"),
    (["--ttl", "10m", "--rule", "r", "--factor", "x"], "'x' is not a number"),
    (["--ttl", "10m", "--rule", "r", "--max-ttl", "5m"], "max_ttl (5m) is shorter than ttl"),
    (["--ttl", "10m", "--rule", "r", "--memory", "later"], "memory: invalid duration"),
    (["--ttl", "10m", "--rule", "r", "--details", "{oops"], "--details is not valid JSON"),
    (["--ttl", "10m", "--rule", "r", "--details", "[1]"], "--details must be a JSON object"),
    (["--ttl", "10m", "--rule", "r", "--details", json.dumps({"x": "y" * 5000})], "at most 4096"),
]


@pytest.mark.parametrize(("args", "expected"), RULE_BAN_BAD_INPUT, ids=lambda v: repr(v)[:50])
def test_rule_ban_bad_input_exits_2_and_changes_nothing(
    ctl: Controller, args: list[str], expected: str
) -> None:
    ctl.api("ban", target="198.18.0.50", ttl="1h")
    before = ctl.state()
    result = ctl.cli("rule", "ban", "198.18.0.7", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert expected.lower() in one_line_error(result).lower()
    assert ctl.state() == before


# -- `stockade explain` ---------------------------------------------------------------------
def test_explain_json_and_plain(ctl: Controller) -> None:
    ctl.api("ban", target="198.18.0.0/16", ttl="5m", reason="botnet range")
    call(
        ctl.rules_socket,
        "rule.ban",
        target="198.18.0.51",
        ttl="10m",
        rule="scanner",
        details={"distinct_404_paths": 31},
    )
    # a proxy worker's status file: its scanner rule acted on .51 (and on an older address)
    status_dir = ctl.home / "run" / "proxy"
    status_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    firing = {
        "rule": "scanner",
        "action": "ban",
        "subject": "198.18.0.51",
        "at": now - 1,
        "until": now + 600,
        "counters": {"distinct_404_paths": 31.0},
    }
    expired = {**firing, "subject": "198.18.0.52", "until": now - 5}
    (status_dir / "worker-0.json").write_text(
        json.dumps({"updated": now, "anomaly": {"recent": [expired, firing]}})
    )
    result = ctl.ok_json("explain", "198.18.0.51")
    assert result["verdict"] == "banned"
    assert result["proxy"]["penalties"] == [firing]
    assert ctl.ok_json("explain", "198.18.0.52")["proxy"]["penalties"] == []  # over
    assert [(b["target"], b["match"], b["rule"]) for b in result["bans"]] == [
        ("198.18.0.51", "exact", "scanner"),
        ("198.18.0.0/16", "prefix", None),
    ]
    assert result["bans"][0]["details"] == {"distinct_404_paths": 31}
    assert result["allowed_by"] == []
    assert [(e["action"], e["rule"], e["ttl"]) for e in result["history"]] == [
        ("ban", "scanner", 600)
    ]
    fields = set(result) | set(result["bans"][0]) | set(result["history"][0]) | set(firing)
    assert documented("explain") == fields

    plain = ctl.cli("explain", "198.18.0.51")
    assert (plain.returncode, plain.stderr) == (0, "")
    lines = plain.stdout.splitlines()
    assert lines[0] == "198.18.0.51: BANNED: its packets are dropped"
    assert "  no allowlist entry or management network covers it" in lines
    assert any(
        line.startswith("  banned as 198.18.0.51 (exact) by rule scanner, expires in ")
        for line in lines
    )
    assert '    details: {"distinct_404_paths": 31}' in lines
    assert "history (newest first, last 1):" in lines
    assert any(
        line.startswith("  proxy: rule scanner (ban) on 198.18.0.51 until ") for line in lines
    )
    assert re.search(
        r"^  \S+ \S+Z  ban for 10m \(rule scanner\): rule scanner$", plain.stdout, re.M
    )

    ctl.api("unban", target="198.18.0.51")
    after = ctl.ok_json("explain", "198.18.0.51")
    assert [e["action"] for e in after["history"]] == ["unban", "ban"]
    assert [b["target"] for b in after["bans"]] == ["198.18.0.0/16"]


def test_explain_an_allowlisted_and_an_unknown_target(ctl: Controller) -> None:
    allowed = ctl.ok_json("explain", "198.18.200.0/28")
    assert allowed["verdict"] == "allowlisted"
    assert allowed["allowed_by"] == [
        {"target": MANAGEMENT, "source": "config", "reason": "management network"}
    ]
    plain = ctl.cli("explain", "fd00::9")
    assert plain.stdout.splitlines() == [
        "fd00::9: not banned",
        "  no allowlist entry or management network covers it",
        "  no active ban covers it",
        "history: none",
    ]


def test_explain_bad_target_exits_2(ctl: Controller) -> None:
    result = ctl.cli("explain", "198.18.0.7/24")
    assert result.returncode == 2
    assert "did you mean 198.18.0.0/24?" in one_line_error(result)


def test_an_unknown_rules_group_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "stockade.toml"
    config.write_text('[controller]\nrules_group = "no-such-group-stockade"\n')
    result = run_stockade("--config", str(config), "controller", "run")
    assert result.returncode == 2
    assert "controller.rules_group: no group 'no-such-group-stockade'" in one_line_error(result)


# -- a controller serving the rules socket to a group, in dry-run ---------------------------
@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged peer can pass through (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="stockade-rulestest-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def group_ctl(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Iterator[Controller]:
    group = grp.getgrgid(NOGROUP).gr_name
    home = tmp_path_factory.mktemp("rulesgroup")
    ctl = Controller(
        home,
        Path(f"/sys/fs/bpf/stockade-rulestest-{os.getpid()}"),
        controller_extra=f'rules_socket = "{shared_dir}/rules.sock"\nrules_group = "{group}"',
        run_args=("--dry-run",),
    )
    try:
        ctl.start()
        yield ctl
    finally:
        ctl.kill()
        ctl.remove_pins()


PEER = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
    sys.exit(0)
try:
    sock.sendall(sys.argv[2].encode() + b"\\n")
except (BrokenPipeError, ConnectionResetError):
    pass  # a refused peer may be answered and hung up on before it has sent
print(sock.makefile("rb").readline().decode().strip())
"""


def as_peer(uid: int, gid: int, path: Path, command: str, **args: Any) -> str:
    """Send one request as another user, from a process of its own; the reply line."""
    line = json.dumps({"command": command, "args": args})
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", PEER, str(path), line],
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_rules_group_gets_the_socket_with_mode_0660(group_ctl: Controller) -> None:
    st = group_ctl.rules_socket.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, NOGROUP)
    control = group_ctl.socket.stat()  # the control socket stays root only
    assert (stat.S_IMODE(control.st_mode), control.st_gid) == (0o600, 0)


def test_a_member_of_the_rules_group_may_push_rule_bans_and_nothing_else(
    group_ctl: Controller,
) -> None:
    path = group_ctl.rules_socket
    reply = json.loads(
        as_peer(NOBODY, NOGROUP, path, "rule.ban", target="198.18.0.7", ttl="1m", rule="scanner")
    )
    assert reply["ok"] is True, reply
    assert reply["result"]["status"] in ("added", "updated")
    refused = json.loads(as_peer(NOBODY, NOGROUP, path, "unban", target="198.18.0.7"))
    assert refused["ok"] is False
    assert "not accepted on the rules socket" in refused["error"]["message"]
    assert [b["target"] for b in group_ctl.api("bans")] == ["198.18.0.7"]
    group_ctl.api("unban", target="198.18.0.7")


def test_others_are_refused_by_the_mode_and_by_the_peer_check(group_ctl: Controller) -> None:
    path = group_ctl.rules_socket
    rule_ban = {"target": "198.18.0.8", "ttl": "1m", "rule": "scanner"}
    assert as_peer(NOBODY, 12345, path, "rule.ban", **rule_ban) == "EACCES"
    # Even when the mode lets it connect, SO_PEERCRED decides.
    path.chmod(0o666)
    try:
        refused = json.loads(as_peer(NOBODY, 12345, path, "rule.ban", **rule_ban))
    finally:
        path.chmod(0o660)
    assert refused["ok"] is False
    assert refused["error"]["message"] == "permission denied: root or group nogroup only"
    assert group_ctl.api("bans") == []
    assert "refused a peer (uid 65534, gid 12345) on the rules socket" in group_ctl.log_tail()
    # the control socket: root only, whatever the group
    assert as_peer(NOBODY, NOGROUP, group_ctl.socket, "bans") == "EACCES"


def test_ban_client_against_a_controller_that_restarts_and_freezes(group_ctl: Controller) -> None:
    async def scenario() -> None:
        client = BanClient(group_ctl.rules_socket)
        first = await client.rule_ban("198.18.0.9", ttl=60, rule="scanner", details={"n": 1})
        assert (first["status"], first["offence"], first["ttl"]) == ("added", 1, 60)
        inside = await client.rule_ban("198.18.200.1", ttl=60, rule="scanner")
        assert inside["status"] == "allowlisted"
        with pytest.raises(BanPushError) as info:
            await client.rule_ban("198.18.0.9", ttl=60, rule="bad name")
        assert info.value.kind == "bad_input" and not info.value.retryable

        assert group_ctl.stop() == 0  # its connection is gone with it
        with pytest.raises(BanPushError) as info:
            await client.rule_ban("198.18.0.9", ttl=60, rule="scanner")
        assert info.value.kind == UNAVAILABLE and info.value.retryable
        group_ctl.start()
        again = await client.rule_ban("198.18.0.9", ttl=60, rule="scanner")
        assert (again["status"], again["offence"], again["ttl"]) == ("updated", 2, 120)

        # a controller that accepts but never answers: the call ends at the timeout
        client.timeout = 0.3
        os.kill(group_ctl.pid, signal.SIGSTOP)
        try:
            with pytest.raises(BanPushError) as info:
                await client.rule_ban("198.18.0.10", ttl=60, rule="scanner")
        finally:
            os.kill(group_ctl.pid, signal.SIGCONT)
        assert info.value.kind == TIMEOUT
        client.timeout = 5.0
        third = await client.rule_ban("198.18.0.9", ttl=60, rule="scanner")
        assert third["offence"] == 3
        await client.close()

    asyncio.run(scenario())
    assert group_ctl.ok_json("status")["monitor"] is True  # dry-run: counted, never dropped
    for ban in group_ctl.api("bans"):
        group_ctl.api("unban", target=ban["target"])
