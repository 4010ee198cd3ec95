"""The CLI against a real controller: output shapes, bad input, restarts.

Every bad-input case must exit 2 with a one-line error and leave the store
and the kernel maps exactly as they were.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from cli_harness import MANAGEMENT, Controller, one_line_error, run_stockade

from stockade import __version__
from stockade.controller import layout

pytestmark = pytest.mark.kernel

BAN_KEYS = {
    "target": str,
    "kind": str,
    "family": str,
    "reason": str,
    "source": str,
    "created": float,
    "expires": (float, type(None)),
    "ttl_remaining": (float, int, type(None)),
    "packets": int,
    "bytes": int,
    "in_kernel": bool,
}
ALLOW_KEYS = {"target": str, "reason": str, "source": str, "packets": int, "bytes": int}


CLI_JSON_DOC = Path(__file__).resolve().parents[2] / "docs" / "cli-json.md"


def documented_fields(command: str) -> set[str]:
    """The field names in the tables of the docs section on `stockade COMMAND ... --json`."""
    sections = re.split(r"^## ", CLI_JSON_DOC.read_text(), flags=re.MULTILINE)
    (section,) = [s for s in sections if s.startswith(f"`stockade {command} ")]
    fields: set[str] = set()
    for cell in re.findall(r"^\| (`[^|]+`) \|", section, flags=re.MULTILINE):
        fields |= set(re.findall(r"`([a-z0-9_.]+)`", cell))
    return fields


def flat_keys(obj: dict[str, Any], nested: tuple[str, ...] = ()) -> set[str]:
    """Top-level keys, with `parent.child` for the objects named in `nested`."""
    keys = set()
    for key, value in obj.items():
        if key in nested:
            keys |= {f"{key}.{child}" for child in value}
        else:
            keys.add(key)
    return keys


def assert_shape(obj: dict[str, Any], keys: dict[str, Any]) -> None:
    assert set(obj) == set(keys), obj
    for key, kind in keys.items():
        assert isinstance(obj[key], kind), (key, obj[key])


def kernel_keys(ctl: Controller, name: str) -> list[list[int]]:
    return [e["formatted"]["key"]["addr"] for e in ctl.dump_map(name)]


def test_socket_is_a_private_socket(ctl: Controller) -> None:
    mode = ctl.socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_ban_bans_unban_json(ctl: Controller) -> None:
    banned = ctl.ok_json("ban", "198.18.0.7", "--ttl", "1h", "--reason", "scanner")
    assert_shape(banned, {**BAN_KEYS, "status": str})
    assert banned["status"] == "added"
    assert (banned["target"], banned["kind"], banned["family"]) == ("198.18.0.7", "exact", "ipv4")
    assert (banned["reason"], banned["source"]) == ("scanner", "cli")
    assert banned["expires"] == pytest.approx(banned["created"] + 3600)
    assert 3590 < banned["ttl_remaining"] <= 3600

    listed = ctl.ok_json("bans")
    assert isinstance(listed, list) and len(listed) == 1
    assert_shape(listed[0], BAN_KEYS)
    assert listed[0]["target"] == "198.18.0.7"
    assert listed[0]["expires"] == banned["expires"]
    assert kernel_keys(ctl, "ban_v4") == [[198, 18, 0, 7]]

    assert ctl.ok_json("unban", "198.18.0.7") == {"target": "198.18.0.7", "status": "removed"}
    assert ctl.ok_json("bans") == []
    # docs/cli-json.md documents exactly these fields
    assert documented_fields("bans") == set(BAN_KEYS)
    assert documented_fields("ban") == {"status"}  # and "every field of a bans entry"
    assert documented_fields("unban") == {"target", "status"}
    assert kernel_keys(ctl, "ban_v4") == []


def test_plain_output(ctl: Controller) -> None:
    result = ctl.cli("ban", "198.18.0.7", "--ttl", "15m")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("added: 198.18.0.7 banned, expires in 1")
    table = ctl.cli("bans")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == [
        "TARGET",
        "EXPIRES",
        "KERNEL",
        "PACKETS",
        "BYTES",
        "SOURCE",
        "REASON",
    ]
    assert "198.18.0.7" in table.stdout
    result = ctl.cli("unban", "198.18.0.7")
    assert result.stdout == "removed: 198.18.0.7 is no longer banned\n"
    assert ctl.cli("bans").stdout == "no bans\n"


def test_address_and_slash_32_are_the_same_ban(ctl: Controller) -> None:
    first = ctl.cli("ban", "198.18.0.7")
    assert first.returncode == 0 and first.stdout.startswith("added:"), first
    second = ctl.cli("ban", "198.18.0.7/32", "--ttl", "1h")
    assert second.returncode == 0 and second.stdout.startswith("updated:"), second
    listed = ctl.ok_json("bans")
    assert [b["target"] for b in listed] == ["198.18.0.7"]
    assert listed[0]["expires"] is not None  # the second ban replaced the first
    assert kernel_keys(ctl, "ban_v4") == [[198, 18, 0, 7]]


def test_v6_and_prefix_bans(ctl: Controller) -> None:
    v6 = ctl.ok_json("ban", "fd00:18::/64", "--ttl", "7d")
    assert (v6["target"], v6["kind"], v6["family"]) == ("fd00:18::/64", "prefix", "ipv6")
    v4 = ctl.ok_json("ban", "198.18.4.0/24")
    assert (v4["kind"], v4["expires"], v4["ttl_remaining"]) == ("prefix", None, None)
    exact6 = ctl.ok_json("ban", "fd00::7/128")
    assert (exact6["target"], exact6["kind"]) == ("fd00::7", "exact")
    assert sorted(b["target"] for b in ctl.ok_json("bans")) == [
        "198.18.4.0/24",
        "fd00:18::/64",
        "fd00::7",
    ]
    assert len(ctl.dump_map("ban_prefix_v4")) == 1
    assert len(ctl.dump_map("ban_prefix_v6")) == 1
    assert len(ctl.dump_map("ban_v6")) == 1
    status = ctl.ok_json("status")
    assert status["bans"] == {
        "total": 3,
        "exact": 1,
        "prefix": 2,
        "ipv4": 1,
        "ipv6": 2,
        "not_in_kernel": 0,
    }
    assert status["maps"]["ban_prefix_v6"] == {"entries": 1, "max_entries": 256}


def test_allow_add_list_remove(ctl: Controller) -> None:
    assert ctl.ok_json("allow", "list") == [
        {
            "target": MANAGEMENT,
            "reason": "management network (config)",
            "source": "config",
            "packets": 0,
            "bytes": 0,
        }
    ]
    ctl.ok_json("ban", "198.18.9.7")
    added = ctl.ok_json("allow", "add", "198.18.9.0/24", "--reason", "office")
    assert added == {"target": "198.18.9.0/24", "status": "added", "shadowed_bans": ["198.18.9.7"]}
    listed = ctl.ok_json("allow", "list")
    for row in listed:
        assert_shape(row, ALLOW_KEYS)
    assert [(a["target"], a["source"], a["reason"]) for a in listed] == [
        (MANAGEMENT, "config", "management network (config)"),
        ("198.18.9.0/24", "cli", "office"),
    ]
    assert [e["formatted"]["key"]["prefixlen"] for e in ctl.dump_map("allow_v4")] == [24, 24]
    removed = ctl.ok_json("allow", "remove", "198.18.9.0/24")
    assert removed == {"target": "198.18.9.0/24", "status": "removed"}
    assert [a["target"] for a in ctl.ok_json("allow", "list")] == [MANAGEMENT]
    assert len(ctl.dump_map("allow_v4")) == 1
    assert documented_fields("allow list") == set(ALLOW_KEYS)
    assert documented_fields("allow add") == set(added)
    assert documented_fields("allow remove") == set(removed)


def test_stats_json(ctl: Controller) -> None:
    stats = ctl.ok_json("stats")
    assert set(stats) == {"reasons", "total_packets", "by_interface", "events"}
    assert set(stats["reasons"]) == set(layout.reasons())
    for counts in stats["reasons"].values():
        assert set(counts) == {"packets", "bytes"}
        assert all(isinstance(v, int) and v >= 0 for v in counts.values())
    assert stats["total_packets"] == sum(c["packets"] for c in stats["reasons"].values())
    assert set(stats["events"]) == {"syn_rate", "lost"}
    # no interface configured here: everything the program saw is "other"
    assert stats["by_interface"] == {
        "other": {"reasons": stats["reasons"], "total_packets": stats["total_packets"]}
    }
    assert documented_fields("stats") == flat_keys(stats, ("events",)) | set(layout.reasons())
    plain = ctl.cli("stats")
    assert plain.returncode == 0 and "drop_ban" in plain.stdout


def test_status_json(ctl: Controller) -> None:
    status = ctl.ok_json("status")
    assert set(status) == {
        "version",
        "pid",
        "uptime",
        "monitor",
        "program",
        "interfaces",
        "metrics",
        "bans",
        "maps",
        "allows",
        "syn_rate",
        "cluster",
        "proxy",
    }
    assert status["proxy"] == {"workers": []}  # no proxy runs in these tests
    assert status["cluster"]["backend"] == "embedded" and status["cluster"]["state"] == "off"
    assert status["metrics"]["address"] == "127.0.0.1" and status["metrics"]["port"] > 0
    assert status["version"] == __version__
    assert status["pid"] == ctl.pid
    assert status["monitor"] is False
    assert status["interfaces"] == []
    assert isinstance(status["program"]["id"], int) and status["program"]["id"] > 0
    assert status["program"]["pin_dir"] == str(ctl.pin_dir)
    assert status["program"]["layout_version"] == layout.layout_version()
    assert status["bans"] == {
        "total": 0,
        "exact": 0,
        "prefix": 0,
        "ipv4": 0,
        "ipv6": 0,
        "not_in_kernel": 0,
    }
    assert set(status["maps"]) == {
        "ban_v4",
        "ban_v6",
        "ban_prefix_v4",
        "ban_prefix_v6",
        "allow_v4",
        "allow_v6",
    }
    assert status["maps"]["allow_v4"] == {"entries": 1, "max_entries": 256}
    assert status["maps"]["ban_v4"] == {"entries": 0, "max_entries": 1024}
    assert status["allows"] == 1  # the management network
    assert set(status["syn_rate"]) == {"rate", "burst", "ipv6_prefix", "events", "recent"}
    interface_fields = {"name", "mode", "prog_id", "ours", "detached"}
    assert documented_fields("status") == (
        flat_keys(status, ("program", "bans", "syn_rate", "cluster", "proxy")) | interface_fields
    )
    plain = ctl.cli("status")
    assert plain.returncode == 0
    assert f"controller: running (pid {ctl.pid}" in plain.stdout
    assert "proxy:      not running" in plain.stdout
    assert "cluster:    off" in plain.stdout


# -- bad input: exit 2, one line, nothing changed ----------------------------------
BAD_INPUT = [
    (["ban", "198.18.0.300"], "invalid target '198.18.0.300'"),
    (["ban", "not-an-ip"], "invalid target 'not-an-ip'"),
    (["ban", "198.18.0.0/33"], "invalid target '198.18.0.0/33'"),
    (["ban", "fd00::/129"], "invalid target 'fd00::/129'"),
    (["ban", "198.18.0.7/24"], "host bits are set; did you mean 198.18.0.0/24?"),
    (["ban", "fd00::7/64"], "host bits are set; did you mean fd00::/64?"),
    (["ban", ""], "empty target"),
    (["ban", "198.18.0.8", "--ttl", "0s"], "must be longer than 0s"),
    (["ban", "198.18.0.8", "--ttl", "5x"], "invalid duration '5x'"),
    (["ban", "198.18.0.8", "--ttl", "-1m"], "invalid duration '-1m'"),
    (["ban", "198.18.0.8", "--ttl", ""], "invalid duration ''"),
    (["ban", "198.18.0.8", "--ttl", "99999d"], "at most"),
    (["ban", "198.18.0.8", "--reason", "x" * 201], "at most 200"),
    (["ban", "198.18.0.8", "--reason", "two\nlines"], "control characters"),
    (["ban", "198.18.200.7"], "inside 198.18.200.0/24, a management network in the config"),
    (["ban", "198.18.200.0/24"], "a management network in the config"),
    (["ban", "198.18.9.7"], "inside 198.18.9.0/24, in the allowlist"),
    (["ban", "198.18.0.8", "--bogus"], "no such option '--bogus'"),
    (["ban"], "give a TARGET or --file FILE"),
    (["ban", "198.18.0.8", "198.18.0.9"], "unexpected extra argument"),
    (["unban", "198.18.0.7/24"], "did you mean 198.18.0.0/24?"),
    (["allow", "add", "198.18.10.1/24"], "did you mean 198.18.10.0/24?"),
    (["allow", "add", "198.18.10.0/24", "--reason", "\x1b[2J"], "control characters"),
    (["allow", "remove", MANAGEMENT], "management network from the config"),
    (["allow", "remove", "nonsense"], "invalid target 'nonsense'"),
    (["bans", "--all"], "no such option '--all'"),
    (["explode"], "no such command 'explode'"),
]


@pytest.fixture
def populated(ctl: Controller) -> Controller:
    ctl.api("ban", target="198.18.0.50", ttl="1h", reason="existing")
    ctl.api("ban", target="fd00:50::/64")
    ctl.api("allow.add", target="198.18.9.0/24", reason="office")
    return ctl


@pytest.mark.parametrize(("args", "expected"), BAD_INPUT, ids=lambda v: repr(v)[:60])
def test_bad_input_exits_2_and_changes_nothing(
    populated: Controller, args: list[str], expected: str
) -> None:
    before = populated.state()
    assert len(before["kernel"]["ban_v4"]) == 1  # the state compared is not empty
    result = populated.cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    line = one_line_error(result)
    assert expected.lower() in line.lower()
    assert populated.state() == before


def test_refused_ban_says_why_and_what_to_do(populated: Controller) -> None:
    line = one_line_error(populated.cli("ban", "198.18.9.7"))
    assert line == (
        "stockade: refusing to ban 198.18.9.7: it is inside 198.18.9.0/24, in the allowlist, "
        "and allowlisted traffic always passes; "
        "remove it with `stockade allow remove 198.18.9.0/24` first"
    )


def test_unban_of_a_target_that_is_not_banned_exits_1(populated: Controller) -> None:
    before = populated.state()
    result = populated.cli("unban", "198.18.0.99")
    assert result.returncode == 1
    assert one_line_error(result) == (
        "stockade: 198.18.0.99 is not banned; list bans with `stockade bans`"
    )
    assert populated.state() == before


def test_allow_remove_of_a_missing_entry_exits_1(populated: Controller) -> None:
    result = populated.cli("allow", "remove", "198.18.11.0/24")
    assert result.returncode == 1
    assert "is not in the allowlist" in one_line_error(result)


# -- the controller process -----------------------------------------------------------
def test_second_controller_on_the_same_pin_root_refuses(ctl: Controller) -> None:
    result = run_stockade("--config", str(ctl.config), "controller", "run", timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"another stockade controller holds {ctl.pin_dir}" in result.stderr
    # the first one is unharmed
    assert ctl.proc is not None and ctl.proc.poll() is None
    assert ctl.socket.exists()
    assert ctl.ok_json("status")["pid"] == ctl.pid


def test_bans_survive_a_restart_and_the_kernel_keeps_them_meanwhile(ctl: Controller) -> None:
    ttl = ctl.ok_json("ban", "198.18.0.77", "--ttl", "1h", "--reason", "kept")
    ctl.ok_json("ban", "198.18.5.0/24")
    kernel_before = {name: ctl.dump_map(name) for name in ("ban_v4", "ban_prefix_v4")}
    assert kernel_keys(ctl, "ban_v4") == [[198, 18, 0, 77]]
    assert kernel_before["ban_v4"][0]["formatted"]["value"]["expires_ns"] > 0

    assert ctl.stop() == 0, ctl.log_tail()  # SIGTERM is a clean stop
    assert not ctl.socket.exists()
    assert "stopped; the XDP program stays attached" in ctl.log_tail()
    # controller down: the kernel still has every ban, the CLI says what to do
    assert {name: ctl.dump_map(name) for name in kernel_before} == kernel_before
    down = ctl.cli("bans")
    assert down.returncode == 1
    assert "the controller is not running" in one_line_error(down)
    refused = ctl.cli("ban", "198.18.0.78")
    assert refused.returncode == 1  # never silently lost
    assert "stockade controller run" in one_line_error(refused)

    ctl.start()
    listed = {b["target"]: b for b in ctl.ok_json("bans")}
    assert set(listed) == {"198.18.0.77", "198.18.5.0/24"}
    assert listed["198.18.0.77"]["reason"] == "kept"
    assert listed["198.18.0.77"]["expires"] == ttl["expires"]
    # reconcile found the maps right and left them alone (same expiry)
    assert {name: ctl.dump_map(name) for name in kernel_before} == kernel_before


def test_an_overlong_request_gets_an_error_reply_not_a_silent_hangup(ctl: Controller) -> None:
    import socket as socketlib

    from stockade.protocol import MAX_LINE

    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(ctl.socket))
        sock.sendall(b'{"command": "bans", "args": {"x": "' + b"a" * (MAX_LINE + 10) + b'"}}\n')
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["ok"] is False
    assert reply["error"]["kind"] == "bad_input"
    assert "longer than" in reply["error"]["message"]
    assert ctl.api("bans") == []  # the controller still serves
