"""[controller] keys for rule bans: rules_socket, rules_group, history_retention."""

from __future__ import annotations

import grp
import os
from pathlib import Path
from typing import Any

import pytest

from stockade.config import Config, ConfigError, ControllerConfig, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stockade.toml"


def controller(table: dict[str, Any]) -> ControllerConfig:
    return parse_config({"controller": table}).controller


def refused(table: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"controller": table})
    return str(info.value)


def test_defaults() -> None:
    c = Config().controller
    assert c.rules_socket == Path("/run/stockade/rules.sock")
    assert c.rules_group is None
    assert c.history_retention == 30 * 86400
    assert parse_config({}).controller == c


def test_the_rules_socket_defaults_to_a_neighbour_of_the_control_socket() -> None:
    c = controller({"socket": "/tmp/x/control.sock"})
    assert c.rules_socket == Path("/tmp/x/rules.sock")
    c = controller({"socket": "/tmp/x/control.sock", "rules_socket": "/tmp/y/r.sock"})
    assert c.rules_socket == Path("/tmp/y/r.sock")


def test_rules_group_and_retention() -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    c = controller({"rules_group": group, "history_retention": "90d"})
    assert c.rules_group == group
    assert c.history_retention == 90 * 86400
    assert controller({"rules_group": ""}).rules_group is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"rules_group": "no-such-group-stockade"},
            "controller.rules_group: no group 'no-such-group-stockade' on this host; "
            "create it (groupadd no-such-group-stockade) or leave the key out (root only)",
        ),
        ({"rules_group": 0}, "controller.rules_group: expected a string, got int"),
        (
            {"rules_socket": "rules.sock"},
            "controller.rules_socket: must be an absolute path, got 'rules.sock'",
        ),
        (
            {"socket": "/run/s/c.sock", "rules_socket": "/run/s/c.sock"},
            "controller.rules_socket: must differ from controller.socket (/run/s/c.sock)",
        ),
        ({"history_retention": "0s"}, "controller.history_retention: invalid duration '0s'"),
        ({"history_retention": "forever"}, "controller.history_retention: invalid duration"),
        ({"history_retention": "3651d"}, "controller.history_retention: at most 3650d"),
        ({"rules_gruop": "x"}, "unknown key controller.rules_gruop; did you mean"),
    ],
)
def test_bad_values_name_the_key(table: dict[str, Any], message: str) -> None:
    assert refused(table).startswith(message)


def test_the_example_shows_the_defaults() -> None:
    example = load_config(EXAMPLE).controller
    assert example.rules_socket == ControllerConfig().rules_socket
    assert example.rules_group is None  # shown commented out: the group may not exist
    assert example.history_retention == ControllerConfig().history_retention
    assert "# rules_group = " in EXAMPLE.read_text()
