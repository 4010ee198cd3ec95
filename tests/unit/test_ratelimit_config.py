"""Rates, limits, plans and anomaly rules in the config: parsed, or refused with the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade.config_fields import ConfigError, Section
from stockade.proxy.anomaly import UserAgentListError, load_user_agents
from stockade.proxy.anomaly_settings import DEFAULT_USER_AGENTS, parse_anomaly, parse_condition
from stockade.proxy.rate_maps import RateMap, RateMapError, parse_rate_map
from stockade.proxy.ratelimit_settings import (
    RateError,
    parse_quotas,
    parse_rate,
    parse_rate_limiting,
)


@pytest.mark.parametrize(
    ("text", "count", "window"),
    [
        ("100/min", 100, 60.0),
        ("10/s", 10, 1.0),
        ("5000/day", 5000, 86400.0),
        ("3/hour", 3, 3600.0),
        ("20/10s", 20, 10.0),
        (" 7 / 5m ", 7, 300.0),
    ],
)
def test_rates_parse(text: str, count: int, window: float) -> None:
    rate = parse_rate(text)
    assert (rate.count, rate.window) == (count, window)


@pytest.mark.parametrize("text", ["", "100", "0/s", "-1/s", "10/fortnight", "1/50ms", "1/40d"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(RateError):
        parse_rate(text)


def test_limits_and_their_keys() -> None:
    config = parse_rate_limiting(
        Section(
            "proxy.rate_limiting",
            {
                "limits": {
                    "per_ip": {"rate": "100/min", "all_routes": True},
                    "tenant": {"rate": "10/s", "key": "header:X-Tenant"},
                    "by_key": {"rate": "5/s", "key": "api_key"},
                }
            },
        )
    )
    assert config.limit("per_ip").key == "ip" and config.limit("per_ip").all_routes
    assert config.limit("tenant").field == "x-tenant" and config.limit("tenant").pre_auth
    assert not config.limit("by_key").pre_auth


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ({}, "rate: required"),
        ({"rate": "1/s", "key": "cookie"}, "key"),
        ({"rate": "1/s", "key": "header:"}, "need a name"),
        ({"rate": "1/s", "key": "ip:x"}, "need a name"),
        ({"rate": "1/s", "rat": 1}, "did you mean"),
        ({"rate": "1/s", "map": "relative.map"}, "absolute"),
    ],
)
def test_bad_limits_name_the_key(limit: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_rate_limiting(Section("proxy.rate_limiting", {"limits": {"x": limit}}))


def test_plans_and_quotas() -> None:
    config = parse_quotas(
        Section(
            "proxy.quotas",
            {
                "timezone": "Europe/Berlin",
                "default_plan": "free",
                "plans": {"free": {"rates": ["10/s"], "per_day": 1000}, "pro": {"per_month": 5}},
            },
        )
    )
    free = config.plan(None)
    assert free is not None and free.per_day == 1000 and free.rates[0].count == 10
    pro = config.plan("pro")
    assert pro is not None and pro.per_month == 5
    with pytest.raises(ConfigError, match="time zone"):
        parse_quotas(Section("proxy.quotas", {"timezone": "Mars/Olympus"}))
    with pytest.raises(ConfigError, match="default_plan"):
        parse_quotas(Section("proxy.quotas", {"default_plan": "gold"}))


def test_rate_maps(tmp_path: Path) -> None:
    default = parse_rate("10/min")
    rates = parse_rate_map("# comment\n198.18.0.10 1000/min\npartner 50\n\n", default, "m")
    assert rates["198.18.0.10"].count == 1000
    assert rates["partner"].count == 50 and rates["partner"].window == 60.0
    for bad in ("a", "a b c", "a 0", "a 1/fortnight"):
        with pytest.raises(RateMapError):
            parse_rate_map(bad, default, "m")
    path = tmp_path / "limits.map"
    path.write_text("a 5\n")
    rate_map = RateMap(path, default)
    assert rate_map.rate("a").count == 5 and rate_map.rate("b") is default
    path.write_text("nonsense line here\n")
    rate_map._checked = 0.0
    assert rate_map.rate("a").count == 5  # a broken new version keeps the old rates
    path.write_text("a 7\nb 9\n")
    rate_map._checked = 0.0
    assert rate_map.rate("a").count == 7 and rate_map.rate("b").count == 9
    with pytest.raises(RateMapError):
        RateMap(tmp_path / "missing.map", default)


def test_conditions() -> None:
    c = parse_condition("err_ratio > 0.5 with requests > 50 in 5m")
    assert c.window == 300.0
    assert [(t.metric, t.operator, t.value) for t in c.terms] == [
        ("err_ratio", ">", 0.5),
        ("requests", ">", 50.0),
    ]
    assert parse_condition("distinct_404_paths >= 30 in 1m").terms[0].holds(30)
    for bad in ("requests > 5", "requests >> 5 in 1m", "bogus > 1 in 1m", "requests > 5 in 2d"):
        with pytest.raises(ValueError):
            parse_condition(bad)


def test_anomaly_rules() -> None:
    config = parse_anomaly(
        Section(
            "proxy.anomaly",
            {
                "rules": [
                    {"name": "scan", "when": "distinct_404_paths > 30 in 1m", "action": "ban"},
                    {"name": "ua", "user_agents": True, "action": "deny"},
                ]
            },
        )
    )
    assert config.rules[0].metrics == {"distinct_404_paths"}
    assert config.rules[1].condition is None
    for rule, message in (
        ({"name": "x", "action": "ban"}, "exactly one"),
        ({"name": "x", "action": "nuke", "when": "requests > 1 in 1m"}, "action"),
        ({"name": "x", "action": "ban", "key": "consumer", "when": "requests > 1 in 1m"}, "ip"),
        ({"name": "x", "action": "deny", "when": "requests > 1"}, "window"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_anomaly(Section("proxy.anomaly", {"rules": [rule]}))


def test_the_core_rule_sets_scanner_list_loads() -> None:
    """The bootstrap installs modsecurity-crs; its list is the default."""
    pattern = load_user_agents(DEFAULT_USER_AGENTS)
    assert pattern.search("sqlmap/1.7.2#stable (https://sqlmap.org)")
    assert pattern.search("Mozilla/5.00 (Nikto/2.1.6) (Evasions:None) (Test:000003)")
    assert not pattern.search("Mozilla/5.0 (Windows NT 10.0; Win64; x64) Firefox/120.0")


def test_a_bad_user_agent_list_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.data"
    empty.write_text("# nothing\n\n")
    for path in (empty, tmp_path / "missing.data"):
        with pytest.raises(UserAgentListError):
            load_user_agents(path)


def test_the_proxy_pushes_rule_bans_to_its_controllers_rules_socket(tmp_path: Path) -> None:
    from stockade.config import parse_config

    config = parse_config({"controller": {"socket": str(tmp_path / "c.sock")}})
    assert config.proxy.anomaly.rules_socket == tmp_path / "rules.sock"
    explicit = parse_config({"proxy": {"anomaly": {"rules_socket": "/run/x/r.sock"}}})
    assert explicit.proxy.anomaly.rules_socket == Path("/run/x/r.sock")
