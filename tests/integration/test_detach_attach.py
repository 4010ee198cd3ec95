"""`stockade detach` and `stockade attach`, with and without a controller.

With a controller running, detach goes through it: logged, shown by
`status`, kept across its restarts until `stockade attach`. Without one,
the CLI removes only stockade's program (name and tag, as the controller
recorded them) and refuses any other XDP program unless --force. A detach
that would also remove the maps under a running controller is refused before
anything changes.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from controller_harness import (
    STOCKADE,
    RunningController,
    can_connect,
    restart,
    running_controller,
    stop,
)
from pyroute2 import NetNS, netns

from stockade.controller import xdp_attach, xdp_state
from stockade.controller.xdp_attach import Mode
from stockade.lab.topology import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

C1, C2, UP4, PORT = "198.18.0.10", "198.18.0.11", "198.18.1.10", 8080


def one_line(result: Any) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stockade: "), result.stderr
    return str(lines[0])


def interface(ctl: RunningController, name: str) -> dict[str, Any]:
    (row,) = [row for row in ctl.api("status")["interfaces"] if row["name"] == name]
    return dict(row)


@pytest.fixture
def ctl(fresh_lab: Lab, tmp_path: Path) -> Iterator[RunningController]:
    with running_controller(
        tmp_path, fresh_lab.gateway_ns, fresh_lab.gateway_if, mode="native"
    ) as ctl:
        yield ctl


def test_detach_through_the_controller_until_attach(fresh_lab: Lab, ctl: RunningController) -> None:
    gw, ns = fresh_lab.gateway_if, fresh_lab.gateway_ns
    ctl.api("ban", target=C1)
    assert not can_connect(fresh_lab.client_ns, C1, UP4, PORT)
    prog = interface(ctl, gw)["prog_id"]
    assert prog and interface(ctl, gw)["ours"]

    detached = ctl.cli("detach", gw)
    assert detached.stdout == f"detached: {gw} (program {prog})\n", detached.stderr
    assert f"detached XDP program {prog} from {gw} on request" in ctl.log()
    assert xdp_attach.query(gw, ns).prog_id == 0
    assert interface(ctl, gw) == {
        "name": gw,
        "mode": "none",
        "prog_id": 0,
        "ours": False,
        "detached": True,
    }
    plain = ctl.cli("status").stdout
    assert f"{gw}: DETACHED" in plain and "NOT our program" not in plain
    assert can_connect(fresh_lab.client_ns, C1, UP4, PORT)  # no filter there now

    # a restart keeps it detached, and says so
    assert stop(ctl.proc) == 0
    assert f"(not on {gw}: detached on purpose)" in ctl.log()
    restart(ctl)
    assert f"{gw} stays detached" in ctl.log()
    assert xdp_attach.query(gw, ns).prog_id == 0
    assert interface(ctl, gw)["detached"] is True

    attached = json.loads(ctl.cli("attach", gw, "--json").stdout)
    (row,) = attached["interfaces"]
    assert (row["name"], row["status"], row["mode"]) == (gw, "attached", "native")
    assert interface(ctl, gw)["ours"] and not interface(ctl, gw)["detached"]
    assert not can_connect(fresh_lab.client_ns, C1, UP4, PORT)
    # ... and a restart attaches it again as usual
    assert stop(ctl.proc) == 0
    restart(ctl)
    assert interface(ctl, gw)["ours"] is True


def test_a_reload_attaches_only_an_interface_it_newly_names(
    fresh_lab: Lab, ctl: RunningController
) -> None:
    gw, ns = fresh_lab.gateway_if, fresh_lab.gateway_ns
    ctl.cli("detach", gw)
    assert ctl.api("reload")["attached"] == []  # still named: still detached
    assert xdp_attach.query(gw, ns).prog_id == 0 and interface(ctl, gw)["detached"]
    named = ctl.config_path.read_text()
    ctl.config_path.write_text(named.replace(f'interfaces = ["{gw}"]', "interfaces = []"))
    ctl.api("reload")
    ctl.config_path.write_text(named)
    assert ctl.api("reload")["attached"] == [f"{gw} (native)"]  # newly named: attached
    assert interface(ctl, gw)["ours"] and not interface(ctl, gw)["detached"]


def test_the_controller_leaves_a_foreign_program_alone_unless_forced(
    fresh_lab: Lab, ctl: RunningController
) -> None:
    from bcc import BPF

    gw, ns = fresh_lab.gateway_if, fresh_lab.gateway_ns
    ctl.cli("detach", gw)
    program = BPF(text=OTHER_XDP)
    try:
        fn = program.load_func(b"xdp_other", BPF.XDP)
        other = xdp_attach.attach(gw, fn.fd, Mode.NATIVE, ns).prog_id
        refused = ctl.cli("detach", gw, check=False)
        assert refused.returncode == 2 and refused.stdout == ""
        line = one_line(refused)
        assert f"refusing to detach {gw}: its XDP program (id {other}, name xdp_other" in line
        attach = ctl.cli("attach", gw, check=False)
        assert attach.returncode == 2 and "it runs another XDP program" in one_line(attach)
        assert xdp_attach.query(gw, ns).prog_id == other  # untouched by both
        forced = json.loads(ctl.cli("detach", gw, "--force", "--json").stdout)
        assert forced["interfaces"] == [{"name": gw, "prog_id": other, "status": "detached"}]
        assert xdp_attach.query(gw, ns).prog_id == 0
        assert f"detached XDP program {other} from {gw} on request" in ctl.log()
    finally:
        program.cleanup()


def test_attach_only_what_the_config_names(fresh_lab: Lab, ctl: RunningController) -> None:
    result = ctl.cli("attach", "lo", check=False)
    assert result.returncode == 2
    assert "lo is not in xdp.interfaces" in one_line(result)


def test_detach_all_remove_maps_under_a_controller_changes_nothing(
    fresh_lab: Lab, ctl: RunningController
) -> None:
    gw = fresh_lab.gateway_if
    before = interface(ctl, gw)
    pins = sorted(p.name for p in ctl.pin_dir.iterdir())
    result = ctl.cli("detach", "--all", "--remove-maps", check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert "a stockade controller is running and holds" in one_line(result)
    assert interface(ctl, gw) == before and before["ours"]
    assert sorted(p.name for p in ctl.pin_dir.iterdir()) == pins
    assert ctl.api("status")["program"]["id"] == before["prog_id"]


def test_detach_without_a_controller_takes_stockades_program(
    fresh_lab: Lab, ctl: RunningController
) -> None:
    gw, ns = fresh_lab.gateway_if, fresh_lab.gateway_ns
    prog = interface(ctl, gw)["prog_id"]
    assert stop(ctl.proc) == 0
    assert xdp_attach.query(gw, ns).prog_id == prog  # still enforcing
    state = xdp_state.read_state(ctl.config_path.parent / "state")
    assert state.tags  # the controller recorded its program's tag: how it is recognised
    result = ctl.cli("detach", gw)
    assert result.stdout == f"detached: {gw} (program {prog})\n"
    assert xdp_attach.query(gw, ns).prog_id == 0
    # no controller to remember it: the next start puts the filter back
    assert xdp_state.read_state(ctl.config_path.parent / "state").detached == {}
    restart(ctl)
    assert f"{gw} stays detached" not in ctl.log()
    assert interface(ctl, gw)["ours"]


# -- a program that is not stockade's -------------------------------------------------------
NS = f"stdt{os.getpid() % 100000:05d}"
OTHER_XDP = b"int xdp_other(struct xdp_md *ctx) { return XDP_PASS; }"


@pytest.fixture
def foreign(tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    """A veth in a namespace of this test, running a tiny XDP program that is not stockade's;
    and a config naming it (no controller runs)."""
    from bcc import BPF

    program = BPF(text=OTHER_XDP)
    netns.create(NS)
    try:
        with NetNS(NS) as ipr:
            ipr.link("add", ifname="fx0", kind="veth", peer="fx1")
            for name in ("fx0", "fx1"):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        fn = program.load_func(b"xdp_other", BPF.XDP)
        prog_id = xdp_attach.attach("fx0", fn.fd, Mode.GENERIC, NS).prog_id
        config = tmp_path / "stockade.toml"
        config.write_text(
            "[controller]\n"
            f'socket = "{tmp_path}/control.sock"\n'
            f'state_dir = "{tmp_path}/state"\n'
            f'pin_root = "{tmp_path}/no-pins"\n'
            f'netns = "{NS}"\n'
            '[xdp]\ninterfaces = ["fx0"]\n'
        )
        yield "fx0", prog_id, config
    finally:
        program.cleanup()
        netns.remove(NS)


def stockade(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STOCKADE, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("args", [["fx0"], ["--all"], ["fx0", "--netns", NS]])
def test_a_foreign_program_is_refused_without_force(
    foreign: tuple[str, int, Path], args: list[str]
) -> None:
    ifname, prog_id, config = foreign
    result = stockade(config, "detach", *args)
    assert result.returncode == 2 and result.stdout == ""
    line = one_line(result)
    assert line.startswith(f"stockade: refusing to detach {ifname}: its XDP program (id {prog_id}")
    assert "name xdp_other" in line and line.endswith("add --force to remove it anyway")
    assert xdp_attach.query(ifname, NS).prog_id == prog_id  # untouched
    assert not (config.parent / "state" / "xdp.json").exists()


def test_force_removes_a_foreign_program(foreign: tuple[str, int, Path]) -> None:
    ifname, prog_id, config = foreign
    result = stockade(config, "detach", ifname, "--force", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "interfaces": [{"name": ifname, "prog_id": prog_id, "status": "detached"}],
        "unpinned": [],
    }
    assert xdp_attach.query(ifname, NS).prog_id == 0


def test_a_program_named_like_stockades_with_an_unknown_tag_is_refused(
    foreign: tuple[str, int, Path],
) -> None:
    ifname, prog_id, config = foreign
    # the record knows other tags only: the name alone proves nothing
    xdp_state.write_state(config.parent / "state", xdp_state.AttachState(tags=["00" * 8]))
    result = stockade(config, "detach", ifname)
    assert result.returncode == 2 and "is not stockade's" in one_line(result)
    assert xdp_attach.query(ifname, NS).prog_id == prog_id
