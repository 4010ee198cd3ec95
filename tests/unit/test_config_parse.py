"""The TOML config: defaults, and every error names the key and the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stockade import config as config_mod
from stockade.config import Config, ConfigError, load_config, parse_config
from stockade.targets import parse_target


@pytest.fixture
def no_default_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    missing = tmp_path / "absent" / "stockade.toml"
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", missing)
    monkeypatch.delenv(config_mod.ENV_PATH, raising=False)
    return missing


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stockade.toml"
    path.write_text(text)
    return path


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_defaults_when_the_default_path_is_absent(no_default_config: Path) -> None:
    config = load_config()
    assert config == Config()
    assert config.path is None
    assert config.controller.socket == Path("/run/stockade/control.sock")
    assert config.controller.ban_db == Path("/var/lib/stockade/bans.db")
    assert config.controller.pin_root == Path("/sys/fs/bpf/stockade")
    assert config.xdp.interfaces == ()
    assert config.xdp.mode == "auto"
    assert config.xdp.monitor is False
    assert config.xdp.management_networks == ()


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"config file {missing} does not exist"):
        load_config(missing)


def test_env_path_counts_as_explicit(
    no_default_config: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(config_mod.ENV_PATH, str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config()
    path = write(tmp_path, "[xdp]\nmode = 'generic'\n")
    monkeypatch.setenv(config_mod.ENV_PATH, str(path))
    assert load_config().xdp.mode == "generic"


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[xdp\nmode = 'auto'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid TOML")


def test_non_utf8_file_is_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "stockade.toml"
    path.write_bytes(b"[xdp]\nmode = '\xff'\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_full_config_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[controller]
socket = "/tmp/x/control.sock"
state_dir = "/tmp/x/state"
pin_root = "/sys/fs/bpf/stockade-x"
netns = "stk-gw"
sweep_interval = "5s"
log_level = "DEBUG"

[xdp]
interfaces = ["veth0", "eth1.100"]
mode = "generic"
monitor = true
management_networks = ["198.18.200.0/24", "fd00:200::/64", "198.18.0.1"]
syn_rate = 0
syn_burst = 1
ipv6_rate_prefix = 56
max_bans_v4 = 1024
max_bans_v6 = 2048
max_prefix_bans = 64
max_allow = 16
max_rate_sources = 4096
""",
    )
    config = load_config(path)
    assert config.path == path
    c = config.controller
    assert c.socket == Path("/tmp/x/control.sock")
    assert c.ban_db == Path("/tmp/x/state/bans.db")
    assert c.pin_root == Path("/sys/fs/bpf/stockade-x")
    assert c.netns == "stk-gw"
    assert c.sweep_interval == 5.0
    assert c.log_level == "debug"
    x = config.xdp
    assert x.interfaces == ("veth0", "eth1.100")
    assert x.mode == "generic"
    assert x.monitor is True
    assert x.management_networks == (
        parse_target("198.18.200.0/24"),
        parse_target("fd00:200::/64"),
        parse_target("198.18.0.1/32"),
    )
    assert (x.syn_rate, x.syn_burst, x.ipv6_rate_prefix) == (0, 1, 56)
    assert (x.max_bans_v4, x.max_bans_v6, x.max_prefix_bans) == (1024, 2048, 64)
    assert (x.max_allow, x.max_rate_sources) == (16, 4096)


def test_errors_from_a_file_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[xdp]\nsyn_rate = -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: xdp.syn_rate: -1 is out of range (0..1000000)"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"xdp": {"max_bans_v5": 10}}, "unknown key xdp.max_bans_v5; did you mean xdp.max_bans_v"),
        (
            {"xdp": {"interface": ["eth0"]}},
            "unknown key xdp.interface; did you mean xdp.interfaces?",
        ),
        ({"xdp": {"monitr": True}}, "unknown key xdp.monitr; did you mean xdp.monitor?"),
        (
            {"controller": {"sockt": "/run/x.sock"}},
            "unknown key controller.sockt; did you mean controller.socket?",
        ),
    ],
)
def test_unknown_key_did_you_mean(data: dict[str, Any], expected: str) -> None:
    assert expected in refused(data)


def test_unknown_key_without_a_close_match_has_no_guess() -> None:
    assert refused({"controller": {"zzzzzz": 1}}) == "unknown key controller.zzzzzz"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"xpd": {}}, "unknown section [xpd]; did you mean [xdp]?"),
        ({"controler": {}}, "unknown section [controler]; did you mean [controller]?"),
        ({"proxxy": {}}, "unknown section [proxxy]; did you mean [proxy]?"),
    ],
)
def test_unknown_section(data: dict[str, Any], expected: str) -> None:
    assert refused(data) == expected


def test_section_must_be_a_table() -> None:
    assert refused({"xdp": 5}) == "[xdp] must be a table"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"xdp": {"syn_rate": True}}, "xdp.syn_rate: expected an integer, got a boolean"),
        ({"xdp": {"max_allow": False}}, "xdp.max_allow: expected an integer, got a boolean"),
        ({"xdp": {"syn_rate": "200"}}, "xdp.syn_rate: expected an integer, got str"),
        ({"xdp": {"syn_rate": 1.5}}, "xdp.syn_rate: expected an integer, got float"),
        ({"xdp": {"monitor": 1}}, "xdp.monitor: expected true or false, got int"),
        ({"xdp": {"monitor": "yes"}}, "xdp.monitor: expected true or false, got str"),
        ({"xdp": {"interfaces": "eth0"}}, "xdp.interfaces: expected a list, got str"),
        ({"xdp": {"mode": 1}}, "xdp.mode: expected a string, got int"),
        ({"controller": {"socket": 5}}, "controller.socket: expected a string, got int"),
        (
            {"controller": {"sweep_interval": 5}},
            "controller.sweep_interval: expected a string, got int",
        ),
    ],
)
def test_wrong_types(data: dict[str, Any], expected: str) -> None:
    assert refused(data) == expected


@pytest.mark.parametrize(
    ("key", "value", "bounds"),
    [
        ("syn_rate", -1, "(0..1000000)"),
        ("syn_rate", 1_000_001, "(0..1000000)"),
        ("syn_burst", 0, "(1..10000000)"),
        ("ipv6_rate_prefix", 0, "(1..128)"),
        ("ipv6_rate_prefix", 129, "(1..128)"),
        ("max_bans_v4", 0, "(1..16777216)"),
        ("max_bans_v6", 16_777_217, "(1..16777216)"),
        ("max_prefix_bans", 0, "(1..1048576)"),
        ("max_allow", 1_048_577, "(1..1048576)"),
        ("max_rate_sources", 0, "(1..16777216)"),
    ],
)
def test_out_of_range(key: str, value: int, bounds: str) -> None:
    assert refused({"xdp": {key: value}}) == f"xdp.{key}: {value} is out of range {bounds}"


def test_range_edges_are_accepted() -> None:
    x = parse_config({"xdp": {"syn_rate": 0, "ipv6_rate_prefix": 128, "max_allow": 1}}).xdp
    assert (x.syn_rate, x.ipv6_rate_prefix, x.max_allow) == (0, 128, 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0s", "controller.sweep_interval: invalid duration '0s': must be longer than 0s"),
        ("fast", "controller.sweep_interval: invalid duration 'fast'"),
        ("2m", "controller.sweep_interval: at most 60s"),
    ],
)
def test_bad_durations(value: str, expected: str) -> None:
    assert refused({"controller": {"sweep_interval": value}}).startswith(expected)


def test_management_networks_host_bits_name_the_meant_prefix() -> None:
    message = refused({"xdp": {"management_networks": ["198.18.200.1/24"]}})
    assert message.startswith("xdp.management_networks: invalid prefix 198.18.200.1/24")
    assert "did you mean 198.18.200.0/24?" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["not-an-address"], "xdp.management_networks: invalid target 'not-an-address'"),
        ([24], "xdp.management_networks: 24 is not a string"),
        ("198.18.200.0/24", "xdp.management_networks: expected a list, got str"),
    ],
)
def test_management_networks_other_errors(value: Any, expected: str) -> None:
    assert refused({"xdp": {"management_networks": value}}).startswith(expected)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"xdp": {"mode": "fast"}}, "xdp.mode: 'fast' is not one of auto, native, generic"),
        ({"xdp": {"interfaces": ["eth0", "eth0"]}}, "xdp.interfaces: an interface is listed twice"),
        (
            {"xdp": {"interfaces": ["a-name-longer-than-15"]}},
            "xdp.interfaces: invalid interface name 'a-name-longer-than-15'",
        ),
        ({"xdp": {"interfaces": ["eth 0"]}}, "xdp.interfaces: invalid interface name 'eth 0'"),
        ({"xdp": {"interfaces": [3]}}, "xdp.interfaces: invalid interface name 3"),
        (
            {"controller": {"socket": "run/control.sock"}},
            "controller.socket: must be an absolute path, got 'run/control.sock'",
        ),
        (
            {"controller": {"state_dir": "state"}},
            "controller.state_dir: must be an absolute path, got 'state'",
        ),
        (
            {"controller": {"log_level": "verbose"}},
            "controller.log_level: use debug, info, warning or error",
        ),
        (
            {"controller": {"netns": "bad/name"}},
            "controller.netns: invalid namespace name 'bad/name'",
        ),
    ],
)
def test_invalid_values(data: dict[str, Any], expected: str) -> None:
    assert refused(data) == expected


def test_empty_netns_means_none() -> None:
    assert parse_config({"controller": {"netns": ""}}).controller.netns is None


def test_config_is_frozen() -> None:
    config = parse_config({})
    with pytest.raises(AttributeError):
        config.xdp.mode = "native"  # type: ignore[misc]
