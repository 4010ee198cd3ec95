"""The kernel fast path across veth pairs between network namespaces.

client ns (198.18.0.10-13, fd00:18::10-13) --veth--> gateway ns (XDP on gw0,
the controller) --veth--> upstream ns (HTTP on 198.18.1.10 / fd00:19::10:8080).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from controller_harness import (
    RunningController,
    can_connect,
    can_ping,
    probe,
    restart,
    running_controller,
    stop,
    watch_during,
)

from stockade.lab.topology import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

C1, C2, C3, C4 = "198.18.0.10", "198.18.0.11", "198.18.0.12", "198.18.0.13"
C1_6, C2_6 = "fd00:18::10", "fd00:18::11"
UP4, UP6, PORT = "198.18.1.10", "fd00:19::10", 8080


@pytest.fixture
def ctl(lab: Lab, tmp_path: Path) -> Iterator[RunningController]:
    with running_controller(tmp_path, lab.gateway_ns, lab.gateway_if, mode="native") as ctl:
        yield ctl


def reachable(lab: Lab, src: str, dst: str = UP4) -> bool:
    return can_connect(lab.client_ns, src, dst, PORT)


def test_ban_drops_one_client_and_not_another_then_unban(lab: Lab, ctl: RunningController) -> None:
    assert can_ping(lab.client_ns, C1, lab.gateway_v4)
    assert reachable(lab, C1) and reachable(lab, C2)
    before = ctl.counters()

    ctl.cli("ban", C1, "--reason", "test")
    assert not can_ping(lab.client_ns, C1, lab.gateway_v4)
    assert not reachable(lab, C1)
    assert reachable(lab, C2)
    after = ctl.counters()
    assert after["drop_ban"] > before["drop_ban"]
    (entry,) = ctl.api("bans")
    assert entry["target"] == C1 and entry["packets"] > 0 and entry["bytes"] > 0

    ctl.cli("unban", C1)
    assert reachable(lab, C1)
    assert can_ping(lab.client_ns, C1, lab.gateway_v4)


def test_ban_takes_effect_within_100ms(lab: Lab, ctl: RunningController) -> None:
    moments: dict[str, float] = {}

    def ban_now() -> None:
        time.sleep(1.0)
        moments["asked"] = time.monotonic()
        ctl.api("ban", target=C1)
        moments["acked"] = time.monotonic()

    attempts = watch_during(lab.client_ns, C1, UP4, PORT, 2.5, 0.005, ban_now)
    asked, acked = moments["asked"], moments["acked"]
    assert any(ok for start, ok in attempts if start < asked), "client never got through before"
    after = [(start, ok) for start, ok in attempts if start >= acked]
    assert after, "no attempt after the ban"
    assert not any(ok for _, ok in after), "a connection got through after the ban was acked"
    assert acked - asked < 0.1, f"ban took {acked - asked:.3f}s to apply"
    first_fail = min(start for start, ok in attempts if start >= asked and not ok)
    assert first_fail - asked < 0.1


def test_ttl_ban_expires_by_itself(lab: Lab, ctl: RunningController) -> None:
    ctl.cli("ban", C3, "--ttl", "2s")
    assert not reachable(lab, C3)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and not reachable(lab, C3):
        time.sleep(0.2)
    assert reachable(lab, C3)
    # the sweeper removes it from the store too
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and ctl.api("bans"):
        time.sleep(0.2)
    assert ctl.api("bans") == []


def test_ipv6_ban_and_unban(lab: Lab, ctl: RunningController) -> None:
    assert reachable(lab, C1_6, UP6) and reachable(lab, C2_6, UP6)
    ctl.cli("ban", C1_6)
    assert not reachable(lab, C1_6, UP6)
    assert reachable(lab, C2_6, UP6)
    assert can_ping(lab.client_ns, C2_6, lab.gateway_v6)
    ctl.cli("unban", C1_6)
    assert reachable(lab, C1_6, UP6)


def test_prefix_ban_with_allowlist_exception(lab: Lab, ctl: RunningController) -> None:
    ctl.cli("ban", "198.18.0.8/29")
    ctl.cli("ban", "fd00:18::/64")
    assert not reachable(lab, C1) and not reachable(lab, C4)
    assert not reachable(lab, C1_6, UP6)
    ctl.cli("allow", "add", C2)
    ctl.cli("allow", "add", "fd00:18::11/128")
    assert reachable(lab, C2)
    assert reachable(lab, C2_6, UP6)
    assert not reachable(lab, C1)
    assert ctl.counters()["allow"] > 0


def test_syn_flood_is_cut_to_the_rate_while_another_source_connects(
    lab: Lab, tmp_path: Path
) -> None:
    rate, burst = 50, 20
    with running_controller(
        tmp_path, lab.gateway_ns, lab.gateway_if, syn_rate=rate, syn_burst=burst
    ) as ctl:
        before = ctl.counters()
        flood = probe(
            lab.client_ns,
            "synflood",
            *("--src", C4, "--dst", UP4, "--port", str(PORT), "--count", "3000"),
            *("--duration", "3"),
        )
        after = ctl.counters()
        dropped = after["drop_rate"] - before["drop_rate"]
        passed = flood["sent"] - dropped
        allowed = burst + rate * flood["elapsed"]
        assert flood["sent"] >= 1000
        assert passed <= allowed * 1.1 + 5, (flood, dropped)
        assert passed >= burst, (flood, dropped)
        # another source is not affected
        assert reachable(lab, C2)
        # and the breach was reported to user space
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not ctl.api("status")["syn_rate"]["recent"]:
            time.sleep(0.1)
        recent = ctl.api("status")["syn_rate"]["recent"]
        assert any(r["source"] == C4 for r in recent), recent


def test_kill9_keeps_bans_and_restart_agrees(lab: Lab, ctl: RunningController) -> None:
    ctl.cli("ban", C1)
    ctl.cli("ban", C1_6)
    ctl.cli("ban", "198.18.0.12/31", "--ttl", "1h")
    old_prog = ctl.api("status")["program"]["id"]
    assert stop(ctl.proc, signal.SIGKILL) == -signal.SIGKILL
    # controller gone: the kernel still enforces every ban
    assert not reachable(lab, C1)
    assert not reachable(lab, C1_6, UP6)
    assert not reachable(lab, C3)
    assert reachable(lab, C2)
    restart(ctl)
    status = ctl.api("status")
    assert status["program"]["id"] != old_prog
    assert status["interfaces"][0]["ours"]
    targets = sorted(b["target"] for b in ctl.api("bans"))
    assert targets == sorted([C1, C1_6, "198.18.0.12/31"])
    assert not reachable(lab, C1) and reachable(lab, C2)


def test_no_window_during_restart(lab: Lab, ctl: RunningController) -> None:
    ctl.cli("ban", C1)

    def restart_controller() -> None:
        stop(ctl.proc)
        restart(ctl)

    attempts = watch_during(lab.client_ns, C1, UP4, PORT, 12, 0.01, restart_controller)
    assert len(attempts) > 20
    assert not any(ok for _, ok in attempts), "a banned client got through during the restart"


def test_upgrade_replaces_the_program_and_no_banned_packet_passes(
    lab: Lab, ctl: RunningController
) -> None:
    """An upgrade is a restart that loads a new program: the ban holds across the swap.

    A banned source tries to connect every 5 ms while the controller stops and a new
    one compiles, loads and attaches its own program against the pinned maps. No
    attempt may succeed, and the kernel must have dropped (as drop_ban, and on the
    ban's own counter) at least one packet per attempt.
    """
    ctl.cli("ban", C1, "--reason", "upgrade test")

    def status() -> dict[str, Any]:
        result: dict[str, Any] = json.loads(ctl.cli("status", "--json").stdout)
        return result

    def ban_packets() -> int:
        bans = json.loads(ctl.cli("bans", "--json").stdout)
        return sum(int(b["packets"]) for b in bans if b["target"] == C1)

    old = status()
    old_ids = {old["program"]["id"]} | {i["prog_id"] for i in old["interfaces"]}
    assert len(old_ids) == 1 and 0 not in old_ids, old
    drops_before, ban_before = ctl.counters()["drop_ban"], ban_packets()

    def upgrade() -> None:
        stop(ctl.proc)  # SIGTERM: the old program stays attached and keeps dropping
        restart(ctl)  # the new controller loads its program and swaps it in

    attempts = watch_during(lab.client_ns, C1, UP4, PORT, 10, 0.005, upgrade)
    new = status()
    assert new["program"]["id"] not in old_ids, "the program was not replaced"
    assert [i["prog_id"] for i in new["interfaces"]] == [new["program"]["id"]], new
    assert len(attempts) > 20
    assert not any(ok for _, ok in attempts), "a banned packet passed during the upgrade"
    dropped = ctl.counters()["drop_ban"] - drops_before
    assert dropped >= len(attempts), (dropped, len(attempts))
    assert ban_packets() - ban_before >= len(attempts)


def test_monitor_mode_counts_but_never_drops(lab: Lab, tmp_path: Path) -> None:
    with running_controller(tmp_path, lab.gateway_ns, lab.gateway_if, "--dry-run") as ctl:
        before = ctl.counters()
        ctl.cli("ban", C1)
        assert reachable(lab, C1)
        assert ctl.counters()["drop_ban"] > before["drop_ban"]
        assert ctl.api("status")["monitor"] is True


def test_generic_mode_enforces_too(lab: Lab, tmp_path: Path) -> None:
    with running_controller(tmp_path, lab.gateway_ns, lab.gateway_if, mode="generic") as ctl:
        assert ctl.api("status")["interfaces"][0]["mode"] == "generic"
        ctl.cli("ban", C1)
        assert not reachable(lab, C1)
        assert reachable(lab, C2)
