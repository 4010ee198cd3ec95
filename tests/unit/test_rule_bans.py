"""`rule.ban`: escalation of repeat offenders, the allowlist wins, never shorten a ban; `explain`.

BanService on DryRunMaps and a FakeClock: no kernel, no sleeping.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stockade.clock import FakeClock
from stockade.config import Config
from stockade.controller.daemon import Controller, Listener, peer_in_group
from stockade.controller.maps import DryRunMaps
from stockade.controller.service import MAX_DETAILS, BanService, escalated_ttl
from stockade.controller.store import Ban, BanStore
from stockade.protocol import (
    BAD_INPUT,
    COMMANDS_BY_NAME,
    RULES_SOCKET_COMMANDS,
    RUNTIME,
    CommandError,
    decode_request,
    encode,
    request,
)
from stockade.targets import Network, parse_target

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
MANAGEMENT = "198.18.200.0/24"


def net(text: str) -> Network:
    return parse_target(text)


@dataclass
class World:
    store: BanStore
    maps: DryRunMaps
    clock: FakeClock
    service: BanService

    def snapshot(self) -> tuple[Any, ...]:
        events = {str(b.target): self.store.events(b.target) for b in self.store.bans()}
        return (self.store.bans(), self.maps.bans(), events)

    def rule_ban(self, target: str = "198.18.0.7", **kwargs: Any) -> dict[str, Any]:
        args: dict[str, Any] = {"ttl": "10m", "rule": "scanner", "max_ttl": "1h", **kwargs}
        return self.service.rule_ban(target, **args)

    def wait_out(self, seconds: float) -> None:
        """Let time pass and the sweeper run, as the controller does every second."""
        self.clock.advance(seconds)
        self.service.sweep()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    store = BanStore(tmp_path / "bans.db")
    clock = FakeClock()
    maps = DryRunMaps()
    service = BanService(store, maps, clock, [net(MANAGEMENT)], history_retention=30 * DAY)
    try:
        yield World(store, maps, clock, service)
    finally:
        store.close()


# -- escalation -----------------------------------------------------------------------
def test_the_ladder_doubles_caps_at_max_ttl_and_resets_outside_memory(world: World) -> None:
    ladder = []
    for _ in range(5):
        result = world.rule_ban()
        ladder.append((result["status"], result["ttl"], result["offence"]))
        world.wait_out(result["ttl"])  # expired and swept before the next offence
    assert ladder == [
        ("added", 10 * MINUTE, 1),
        ("added", 20 * MINUTE, 2),
        ("added", 40 * MINUTE, 3),
        ("added", HOUR, 4),  # 80m, capped at max_ttl
        ("added", HOUR, 5),
    ]
    world.wait_out(7 * DAY)  # memory (7d by default) has forgotten them all
    again = world.rule_ban()
    assert (again["ttl"], again["offence"]) == (10 * MINUTE, 1)


def test_the_result_is_the_ban_with_its_escalation(world: World) -> None:
    now = world.clock.wall()
    result = world.rule_ban(details={"distinct_404_paths": 31, "window": "1m"})
    assert result == {
        "target": "198.18.0.7",
        "kind": "exact",
        "family": "ipv4",
        "reason": "rule scanner",
        "source": "rule",
        "created": now,
        "expires": now + 10 * MINUTE,
        "ttl_remaining": 10 * MINUTE,
        "packets": 0,
        "bytes": 0,
        "status": "added",
        "ttl": 10 * MINUTE,
        "offence": 1,
        "rule": "scanner",
        "details": {"distinct_404_paths": 31, "window": "1m"},
        "in_kernel": True,
    }
    stored = world.store.get_ban(net("198.18.0.7"))
    assert stored == Ban(
        net("198.18.0.7"),
        "rule scanner",
        "rule",
        now,
        now + 10 * MINUTE,
        "scanner",
        '{"distinct_404_paths":31,"window":"1m"}',
    )
    assert net("198.18.0.7") in world.maps.bans()
    (event,) = world.store.events(net("198.18.0.7"))
    assert (event.action, event.source, event.ttl, event.rule) == ("ban", "rule", 600, "scanner")
    assert event.details == stored.details


def test_a_repeat_while_banned_lengthens_the_ban(world: World) -> None:
    first = world.rule_ban()
    world.clock.advance(MINUTE)
    second = world.rule_ban(reason="rule scanner: again")
    assert (second["status"], second["ttl"], second["offence"]) == ("updated", 20 * MINUTE, 2)
    assert second["expires"] == world.clock.wall() + 20 * MINUTE > first["expires"]
    assert world.store.get_ban(net("198.18.0.7")) is not None
    assert [b.reason for b in world.store.bans()] == ["rule scanner: again"]


def test_factor_max_ttl_and_memory_are_per_request(world: World) -> None:
    world.rule_ban(factor=3, memory="1h")
    world.wait_out(30 * MINUTE)
    assert world.rule_ban(factor=3, max_ttl="1d", memory="1h")["ttl"] == 30 * MINUTE
    world.wait_out(59 * MINUTE)  # the first ban is 89 minutes old: outside a 1h memory
    second = world.rule_ban(factor=3, max_ttl="1d", memory="1h")
    assert (second["offence"], second["ttl"]) == (2, 30 * MINUTE)
    # factor 1 never escalates: 10m, shorter than the 30m ban in place, which is kept
    assert world.rule_ban(factor=1, max_ttl="1d")["status"] == "already_banned"


def test_only_rule_bans_of_the_same_target_count(world: World) -> None:
    world.service.ban("198.18.0.7", ttl="1m", reason="manual")  # source cli: not an offence
    world.wait_out(MINUTE)
    world.rule_ban("198.18.0.8")
    world.rule_ban("198.18.0.0/24", ttl="1m")  # a prefix is a target of its own
    assert world.rule_ban()["offence"] == 1
    world.wait_out(HOUR)
    # another rule's ban of the same target counts: the target is the offender
    assert world.rule_ban(rule="other-rule")["offence"] == 2


def test_escalated_ttl_never_overflows() -> None:
    assert escalated_ttl(600, 2, 0, DAY) == 600
    assert escalated_ttl(600, 10.0, 10_000, DAY) == DAY
    assert escalated_ttl(600, 1e300, 3, DAY) == DAY


# -- the allowlist always wins ----------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "allowed_by"),
    [("198.18.200.7", MANAGEMENT), (MANAGEMENT, MANAGEMENT), ("198.18.9.7", "198.18.9.0/24")],
)
def test_an_allowlisted_target_is_reported_not_banned(
    world: World, caplog: pytest.LogCaptureFixture, target: str, allowed_by: str
) -> None:
    world.service.allow_add("198.18.9.0/24", reason="office")
    before = world.snapshot()
    with caplog.at_level(logging.WARNING, logger="stockade.controller.service"):
        result = world.rule_ban(target)
    assert result == {
        "status": "allowlisted",
        "target": target,
        "allowed_by": allowed_by,
        "rule": "scanner",
    }
    assert world.snapshot() == before
    assert world.store.events(net(target)) == []
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert f"rule scanner asked to ban {target}" in record.getMessage()
    assert allowed_by in record.getMessage()


# -- never shorten a ban ------------------------------------------------------------------
def test_a_permanent_manual_ban_is_kept(world: World) -> None:
    world.service.ban("198.18.0.7", reason="known bad")
    before = world.snapshot()
    result = world.rule_ban()
    assert result == {
        "status": "already_banned",
        "target": "198.18.0.7",
        "banned_by": "198.18.0.7",
        "expires": None,
        "rule": "scanner",
    }
    assert world.snapshot() == before  # no event either: nothing changed


def test_a_longer_covering_prefix_ban_is_kept(world: World) -> None:
    world.service.ban("198.18.0.0/24", ttl="2h")
    before = world.snapshot()
    result = world.rule_ban()
    assert (result["status"], result["banned_by"]) == ("already_banned", "198.18.0.0/24")
    assert result["expires"] == world.clock.wall() + 2 * HOUR
    assert world.snapshot() == before


def test_a_shorter_covering_ban_gets_an_exact_ban_on_top(world: World) -> None:
    world.service.ban("198.18.0.0/24", ttl="5m")
    result = world.rule_ban()
    assert (result["status"], result["target"], result["ttl"]) == ("added", "198.18.0.7", 600)
    assert set(world.maps.bans()) == {net("198.18.0.0/24"), net("198.18.0.7")}


def test_an_expired_unswept_ban_does_not_count_as_covering(world: World) -> None:
    world.service.ban("198.18.0.7", ttl="1m")
    world.clock.advance(MINUTE)
    assert world.rule_ban()["status"] == "added"


# -- validation: bad input changes nothing ------------------------------------------------
BAD = [
    ({"target": "198.18.0.300"}, "invalid target"),
    ({"target": "198.18.0.7/24"}, "host bits are set"),
    ({"ttl": "soon"}, "ttl: invalid duration 'soon'"),
    ({"ttl": "0s"}, "ttl: invalid duration '0s': must be longer than 0s"),
    ({"ttl": "99999d"}, "ttl: invalid duration '99999d': at most"),
    ({"rule": ""}, "invalid rule name ''"),
    ({"rule": "has space"}, "invalid rule name 'has space'"),
    ({"rule": "-dash-first"}, "invalid rule name"),
    ({"rule": "x" * 65}, "at most 64 characters"),
    ({"rule": "new\nline"}, "invalid rule name"),
    ({"reason": "two\nlines"}, "control characters"),
    ({"reason": "x" * 201}, "at most 200"),
    ({"details": ["not", "an", "object"]}, "details must be a JSON object"),
    ({"details": {"x": float("nan")}}, "details cannot be stored as JSON"),
    ({"details": {"blob": "x" * MAX_DETAILS}}, f"bytes as JSON; at most {MAX_DETAILS}"),
    ({"factor": 0.5}, "factor must be a finite number of at least 1, got 0.5"),
    ({"factor": 0}, "at least 1"),
    ({"factor": float("nan")}, "factor must be a finite number"),
    ({"factor": float("inf")}, "factor must be a finite number"),
    ({"factor": True}, "factor must be a number"),
    ({"factor": "2"}, "factor must be a number"),
    ({"max_ttl": "5m"}, "max_ttl (5m) is shorter than ttl (10m)"),
    ({"max_ttl": "huge"}, "max_ttl: invalid duration 'huge'"),
    ({"memory": "-1d"}, "memory: invalid duration '-1d'"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=lambda v: repr(v)[:40])
def test_bad_input_is_refused_and_changes_nothing(
    world: World, change: dict[str, Any], message: str
) -> None:
    world.rule_ban("198.18.0.9")  # some state to keep
    before = world.snapshot()
    args: dict[str, Any] = {"target": "198.18.0.7", "ttl": "10m", "rule": "scanner", **change}
    with pytest.raises(CommandError) as info:
        world.service.rule_ban(**args)
    assert info.value.kind == BAD_INPUT
    assert message in info.value.message
    assert world.snapshot() == before
    assert world.store.events(net("198.18.0.7")) == []


def test_details_of_exactly_the_limit_are_accepted(world: World) -> None:
    overhead = len(json.dumps({"blob": ""}, separators=(",", ":")))
    details = {"blob": "x" * (MAX_DETAILS - overhead)}
    assert world.rule_ban(details=details)["details"] == details


def test_a_nan_factor_never_reaches_the_service_from_the_wire() -> None:
    line = b'{"command":"rule.ban","args":{"target":"198.18.0.7","ttl":"1m","rule":"r",'
    with pytest.raises(CommandError, match="factor must be a finite number"):
        decode_request(line + b'"factor":NaN}}\n')
    with pytest.raises(CommandError, match="factor must be a number"):
        decode_request(line + b'"factor":true}}\n')
    with pytest.raises(CommandError, match="details must be a JSON object"):
        decode_request(line + b'"details":"{}"}}\n')
    spec, args = decode_request(line + b'"factor":1.5,"details":{"a":{"b":[1]}}}}\n')
    assert (spec.name, args["factor"], args["details"]) == ("rule.ban", 1.5, {"a": {"b": [1]}})


def test_deeply_nested_json_is_bad_input_not_a_crash() -> None:
    line = b'{"command":"explain","args":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    with pytest.raises(CommandError) as info:
        decode_request(line)
    assert info.value.kind == BAD_INPUT


# -- explain --------------------------------------------------------------------------------
def test_explain_a_target_nothing_covers(world: World) -> None:
    assert world.service.explain("198.18.0.7") == {
        "target": "198.18.0.7",
        "kind": "exact",
        "family": "ipv4",
        "verdict": "not_banned",
        "bans": [],
        "allowed_by": [],
        "history": [],
    }


def test_explain_shows_covering_bans_with_rule_and_details(world: World) -> None:
    t0 = world.clock.wall()
    world.service.ban("198.18.0.0/16", ttl="5m", reason="botnet range")
    world.rule_ban(details={"distinct_404_paths": 31})  # longer than the /16: added
    world.service.ban("198.18.0.8", reason="neighbour")  # does not cover .7
    world.clock.advance(MINUTE)
    result = world.service.explain("198.18.0.7/32")
    assert result["verdict"] == "banned"
    assert result["bans"] == [
        {
            "target": "198.18.0.7",
            "match": "exact",
            "reason": "rule scanner",
            "source": "rule",
            "rule": "scanner",
            "created": t0,
            "expires": t0 + 10 * MINUTE,
            "ttl_remaining": 9 * MINUTE,
            "details": {"distinct_404_paths": 31},
            "in_kernel": True,
        },
        {
            "target": "198.18.0.0/16",
            "match": "prefix",
            "reason": "botnet range",
            "source": "cli",
            "rule": None,
            "created": t0,
            "expires": t0 + 5 * MINUTE,
            "ttl_remaining": 4 * MINUTE,
            "details": None,
            "in_kernel": True,
        },
    ]
    assert result["history"] == [
        {
            "at": t0,
            "action": "ban",
            "source": "rule",
            "reason": "rule scanner",
            "ttl": 10 * MINUTE,
            "rule": "scanner",
            "details": {"distinct_404_paths": 31},
        }
    ]


def test_explain_says_the_allowlist_wins(world: World) -> None:
    world.service.ban("198.18.0.0/16")
    world.service.allow_add("198.18.0.0/24", reason="office")
    result = world.service.explain("198.18.0.7")
    assert result["verdict"] == "allowlisted"
    assert [b["target"] for b in result["bans"]] == ["198.18.0.0/16"]  # listed, not applied
    assert result["allowed_by"] == [
        {"target": "198.18.0.0/24", "source": "cli", "reason": "office"}
    ]
    mgmt = world.service.explain("198.18.200.0/28")
    assert mgmt["allowed_by"] == [
        {"target": MANAGEMENT, "source": "config", "reason": "management network"}
    ]
    assert (mgmt["kind"], mgmt["verdict"]) == ("prefix", "allowlisted")


def test_explain_history_is_newest_first_and_bounded(world: World) -> None:
    for _ in range(30):
        result = world.rule_ban(max_ttl="10m")
        world.wait_out(result["ttl"])
    world.service.ban("198.18.0.7")
    world.clock.advance(1)
    world.service.unban("198.18.0.7")
    history = world.service.explain("198.18.0.7")["history"]
    assert len(history) == 50
    assert [e["action"] for e in history[:4]] == ["unban", "ban", "expire", "ban"]
    assert [e["at"] for e in history] == sorted((e["at"] for e in history), reverse=True)
    assert world.service.explain("198.18.0.7")["verdict"] == "not_banned"


def test_explain_refuses_a_bad_target(world: World) -> None:
    with pytest.raises(CommandError) as info:
        world.service.explain("nonsense")
    assert info.value.kind == BAD_INPUT


# -- the rules socket's command filter and peer check ----------------------------------------
def test_only_rule_ban_is_marked_for_the_rules_socket() -> None:
    assert frozenset({"rule.ban"}) == RULES_SOCKET_COMMANDS
    assert COMMANDS_BY_NAME["rule.ban"].rules_socket
    assert COMMANDS_BY_NAME["explain"].params[0].name == "target"


@pytest.fixture
def controller(world: World) -> Iterator[Controller]:
    ctl = Controller(Config())
    ctl.store, ctl.service = world.store, world.service
    try:
        yield ctl
    finally:
        ctl.close()


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("ban", {"target": "198.18.0.7"}),
        ("unban", {"target": "198.18.0.7"}),
        ("bans", {}),
        ("allow.add", {"target": "198.18.0.7"}),
        ("explain", {"target": "198.18.0.7"}),
        ("status", {}),
    ],
)
def test_the_rules_socket_refuses_every_other_command(
    controller: Controller, world: World, command: str, args: dict[str, Any]
) -> None:
    world.service.ban("198.18.0.7")
    before = world.snapshot()
    reply = controller.dispatch(request(command, **args), RULES_SOCKET_COMMANDS)
    assert reply["ok"] is False
    assert reply["error"]["kind"] == RUNTIME
    assert reply["error"]["message"] == (
        f"permission denied: `{command}` is not accepted on the rules socket, only rule.ban"
    )
    assert "control socket /run/stockade/control.sock" in reply["error"]["hint"]
    assert world.snapshot() == before


def test_rule_ban_through_both_dispatchers(controller: Controller) -> None:
    line = request("rule.ban", target="198.18.0.7", ttl="1m", rule="r", factor=2, details={"n": 1})
    for commands in (RULES_SOCKET_COMMANDS, None):
        reply = controller.dispatch(line, commands)
        assert reply["ok"] is True, reply
        assert json.loads(encode(reply)) == reply
    assert controller.dispatch(request("explain", target="198.18.0.7"))["result"]["verdict"] == (
        "banned"
    )


def test_peer_check(monkeypatch: pytest.MonkeyPatch) -> None:
    root_only = Listener("control", Path("/x"))
    group = Listener("rules", Path("/y"), group_gid=4242, group_name="proxies")
    assert root_only.refusal() == "permission denied: root only"
    assert group.refusal() == "permission denied: root or group proxies only"
    assert root_only.peer_allowed(0, 0)
    assert not root_only.peer_allowed(65534, 4242)
    assert group.peer_allowed(0, 0)
    assert group.peer_allowed(65534, 4242)  # primary gid
    assert not group.peer_allowed(65534, 65534)  # nobody is not a member of 4242

    class Entry:
        pw_name = "proxyuser"

    monkeypatch.setattr(pwd, "getpwuid", lambda uid: Entry())
    monkeypatch.setattr(
        os, "getgrouplist", lambda name, gid: [gid, 4242] if name == "proxyuser" else [gid]
    )
    assert group.peer_allowed(1000, 1000)  # a member through its supplementary groups
    assert not root_only.peer_allowed(1000, 1000)
    assert peer_in_group(1000, 1000, 4242)
    assert not peer_in_group(1000, 1000, 4343)


def test_a_peer_without_a_passwd_entry_needs_the_gid(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(uid: int) -> None:
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", missing)
    assert not peer_in_group(123456, 1, 4242)
    assert peer_in_group(123456, 4242, 4242)
