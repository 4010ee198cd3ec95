"""Lab names, addresses, state files and CLI input checks; nothing here touches the network."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from stockade.cli.lab import lab_group
from stockade.lab import topology
from stockade.lab.netns_exec import NetnsNotFoundError, nsenter_argv
from stockade.lab.topology import Lab

IFNAMSIZ = 16  # including the terminating NUL


@pytest.mark.parametrize("prefix", ["a", "stk3fa2", "st012345", "12345678"])
def test_valid_prefixes(prefix: str) -> None:
    assert topology.check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "Stk", "stk-1", "stk_1", "123456789", "a b", "stk/..", "é"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(topology.InvalidPrefixError, match="a-z and 0-9"):
        topology.check_prefix(prefix)


def test_names_fit_ifnamsiz_with_the_longest_prefix() -> None:
    lab = Lab.named("abcdefgh")
    assert lab.namespaces == ("abcdefgh-cli", "abcdefgh-gw", "abcdefgh-up")
    assert lab.gateway_if == "gw0"
    for name in topology._root_links("abcdefgh"):
        assert name.startswith("abcdefgh-")
        assert len(name) < IFNAMSIZ


def test_every_address_is_inside_the_lab_ranges() -> None:
    allowed = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fd00::/8")]
    addresses = [*topology.CLIENT_V4, *topology.CLIENT_V6]
    for pair in topology._PAIRS:
        for end in pair:
            addresses += [a for a, _ in end.addresses]
    for gateways in topology._DEFAULT_ROUTES.values():
        addresses += list(gateways)
    assert len(set(topology.CLIENT_V4)) >= 2 and len(set(topology.CLIENT_V6)) >= 2
    for address in addresses:
        ip = ipaddress.ip_address(address)
        assert any(ip in net for net in allowed if net.version == ip.version), address


def test_to_dict_is_json_and_complete() -> None:
    shown = json.loads(json.dumps(Lab.named("stk1", upstream_pid=42).to_dict()))
    namespaces = {"client": "stk1-cli", "gateway": "stk1-gw", "upstream": "stk1-up"}
    assert shown["namespaces"] == namespaces
    assert shown["addresses"]["upstream_v6"] == "fd00:19::10"
    assert shown["upstream"]["url_v6"] == "http://[fd00:19::10]:8080/"
    assert shown["upstream"]["pid"] == 42


def test_unreadable_state_is_treated_as_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topology, "STATE_DIR", tmp_path)
    (tmp_path / "stk1.json").write_text("{not json")
    (tmp_path / "stk2.json").write_text(json.dumps({"prefix": "stk2", "owner_pid": 1}))
    (tmp_path / "Bad-Name.json").write_text("{}")
    assert topology.read_state("stk1") is None
    assert topology.read_state("stk2") == {"prefix": "stk2", "owner_pid": 1}
    assert topology._recorded_prefixes() == ["stk1", "stk2"]


def test_update_state_keeps_what_was_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topology, "STATE_DIR", tmp_path)
    topology._create_state(Lab.named("stk1"))
    with pytest.raises(topology.LabExistsError):
        topology._create_state(Lab.named("stk1"))
    topology._update_state("stk1", upstream={"pid": 7})
    state = topology.read_state("stk1")
    assert state is not None
    assert state["namespaces"] == ["stk1-cli", "stk1-gw", "stk1-up"]
    assert state["upstream"] == {"pid": 7}
    assert state["owner_pid"] == os.getpid()


def test_only_the_upstream_command_line_is_recognised() -> None:
    me = os.getpid()
    # this process is alive but is not the upstream: never signalled
    assert not topology._is_our_upstream(me, None, "stk1-up")
    assert topology._stop_upstream(me, None, "stk1-up").endswith("left alone")
    stat = topology._proc_stat(me)
    assert stat is not None and stat[0] in "RS"
    assert not topology._is_our_upstream(2**22 + 1, None, "stk1-up")  # beyond pid_max


def test_nsenter_keeps_the_mount_namespace() -> None:
    with pytest.raises(NetnsNotFoundError, match="stockade lab status"):
        nsenter_argv("stkmissing-gw", ["true"])
    with pytest.raises(ValueError, match="invalid network namespace"):
        nsenter_argv("../etc", ["true"])


@pytest.mark.parametrize(
    "args",
    [
        ["up", "--prefix", "Bad"],
        ["up", "--prefix", "toolongprefix"],
        ["down"],
        ["down", "--prefix", "stk1", "--all"],
        ["down", "--prefix", "stk/1"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args: list[str]) -> None:
    result = CliRunner().invoke(lab_group, args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
