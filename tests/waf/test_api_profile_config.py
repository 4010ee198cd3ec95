"""waf_profile, waf_graphql_fields and waf_exclusions: parsed, refused, and loaded at start."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from waf_harness import RecordingUpstream, waf_config

from stockade.config_fields import ConfigError, Section
from stockade.proxy.settings import parse_proxy
from stockade.proxy.waf.firewall import Waf, WafLoadError, check_waf
from stockade.proxy.waf_settings import Exclusion, RouteWaf

POOLS = {"api": {"servers": ["127.0.0.1:8080"]}}


def parse(route: dict[str, Any]) -> RouteWaf:
    table: dict[str, Any] = {"pools": POOLS, "routes": [{"pool": "api", **route}]}
    waf: RouteWaf = parse_proxy(Section("proxy", table)).routes[0].waf
    return waf


def test_the_profile_is_on_for_crs_routes_by_default() -> None:
    assert parse({"waf": "crs"}).api_profile
    assert parse({"waf": "crs", "waf_profile": "api"}).api_profile
    assert not parse({"waf": "crs", "waf_profile": "none"}).api_profile
    assert not parse({"waf": "sqli_xss"}).api_profile
    assert not RouteWaf("off").api_profile and RouteWaf("crs").api_profile


def test_the_keys_as_stockade_waf_tune_writes_them() -> None:
    waf = parse(
        {
            "waf": "crs",
            "waf_graphql_fields": ["query", "data.query", "query"],
            "waf_exclusions": [
                {
                    "rules": [942360, "920300-920399"],
                    "arguments": ["json.address.line1", "q"],
                    "reason": "street addresses look like SQL",
                },
                {"rules": ["913101"], "reason": "our mobile app's User-Agent"},
            ],
        }
    )
    assert waf.graphql_fields == ("query", "data.query")
    assert waf.exclusions == (
        Exclusion(
            ("942360", "920300-920399"),
            ("json.address.line1", "q"),
            "street addresses look like SQL",
        ),
        Exclusion(("913101",), (), "our mobile app's User-Agent"),
    )


BAD = [
    ({"waf": "sqli_xss", "waf_profile": "api"}, 'waf_profile: only for waf = "crs"'),
    ({"waf": "crs", "waf_profile": "strict"}, "'strict' is not one of api, none"),
    ({"waf": "crs", "waf_profile": "none", "waf_graphql_fields": ["query"]}, "API profile"),
    ({"waf": "sqli_xss", "waf_graphql_fields": ["query"]}, "API profile"),
    ({"waf": "crs", "waf_graphql_fields": ["a b"]}, "'a b' is not a JSON member"),
    ({"waf": "crs", "waf_graphql_fields": "query"}, "expected a list"),
    ({"waf": "off", "waf_exclusions": [{"rules": [1], "reason": "x"}]}, "only for waf ="),
    ({"waf": "crs", "waf_exclusions": {"rules": [1]}}, "expected a list"),
    ({"waf": "crs", "waf_exclusions": ["942100"]}, r"waf_exclusions\[0\]: must be a table"),
    ({"waf": "crs", "waf_exclusions": [{"rules": [942100]}]}, r"waf_exclusions\[0\].reason"),
    ({"waf": "crs", "waf_exclusions": [{"rules": [1], "reason": " "}]}, "reason: required"),
    ({"waf": "crs", "waf_exclusions": [{"rules": [1], "reason": "a\nb"}]}, "one line"),
    ({"waf": "crs", "waf_exclusions": [{"rules": [1], "reason": "x" * 301}]}, "300"),
    ({"waf": "crs", "waf_exclusions": [{"reason": "x"}]}, "rules: at least one"),
    ({"waf": "crs", "waf_exclusions": [{"rules": ["94x"], "reason": "x"}]}, "not a rule id"),
    ({"waf": "crs", "waf_exclusions": [{"rules": ["9-1"], "reason": "x"}]}, "empty range"),
    ({"waf": "crs", "waf_exclusions": [{"rules": [True], "reason": "x"}]}, "not a rule id"),
    (
        {"waf": "crs", "waf_exclusions": [{"rules": [1], "reason": "x", "argument": ["q"]}]},
        r"did you mean proxy.routes\[0\].waf_exclusions\[0\].arguments",
    ),
]
NAMES = ["a b", 'a"b', "a|b", "a,b", "a{b", "a}b", "a\\b", "/^json/", "!q", "", "x" * 257, 5]
NAMES += ["a\x00b", "a\x7fb", "a\u200bb", "a\x1bb"]  # control and invisible characters


@pytest.mark.parametrize(("route", "says"), BAD, ids=[s for _, s in BAD])
def test_bad_keys_are_refused_with_the_key_named(route: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse(route)


@pytest.mark.parametrize("name", NAMES, ids=repr)
def test_an_argument_seclang_would_misread_is_refused(name: object) -> None:
    route = {"waf": "crs", "waf_exclusions": [{"rules": [1], "arguments": [name], "reason": "x"}]}
    with pytest.raises(ConfigError, match="is not an argument name"):
        parse(route)


def test_an_unknown_rule_stops_the_gateway_with_the_route_named(tmp_path: Any) -> None:
    upstream = RecordingUpstream(port=9)
    policy = RouteWaf("crs", exclusions=(Exclusion(("942999",), ("q",), "typo"),))
    config = waf_config(upstream, tmp_path / "access.log", {"orders": policy})
    with pytest.raises(WafLoadError, match="route orders: waf_exclusions: 942999: no such rule"):
        check_waf(config)


def test_the_exclusions_and_their_reasons_are_logged_at_load(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = RecordingUpstream(port=9)
    policy = RouteWaf(
        "crs", exclusions=(Exclusion(("942360",), ("json.address.line1",), "addresses"),)
    )
    config = waf_config(upstream, tmp_path / "access.log", {"orders": policy})
    with caplog.at_level(logging.INFO, logger="stockade.proxy.waf"):
        waf = Waf(config)
    waf.executor.shutdown()
    waf._release()
    assert "waf: route orders: rules 942360 off for json.address.line1: addresses" in caplog.text
