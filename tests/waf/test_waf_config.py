"""[proxy.waf] and the routes' WAF keys; rules that do not load stop the gateway."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from waf_harness import HOST, RecordingUpstream, serving, waf_config

from stockade.config_fields import ConfigError, Section
from stockade.proxy.settings import parse_proxy
from stockade.proxy.waf.firewall import WafLoadError, check_waf
from stockade.proxy.waf_settings import CrsConfig, RouteWaf, WafConfig
from stockade.proxy.workers import ProxyStartupError, validate

POOLS = {"api": {"servers": ["127.0.0.1:8080"]}}


def parse(route: dict[str, Any], waf: dict[str, Any] | None = None) -> Any:
    table: dict[str, Any] = {"pools": POOLS, "routes": [{"pool": "api", **route}]}
    if waf is not None:
        table["waf"] = waf
    return parse_proxy(Section("proxy", table))


def test_defaults_and_overrides() -> None:
    config = parse(
        {"waf": "crs", "waf_action": "detect", "waf_exclude_rules": [942100, "920300-920399"]},
        {"body_limit": "64KiB", "crs": {"paranoia_level": 2, "anomaly_threshold": 10}},
    )
    route = config.routes[0].waf
    assert route == RouteWaf("crs", "detect", ("942100", "920300-920399"), None, 65536, "reject")
    assert config.waf.crs.paranoia_level == 2 and config.waf.crs.anomaly_threshold == 10
    assert parse({}).routes[0].waf.mode == "off"


@pytest.mark.parametrize(
    ("route", "waf", "says"),
    [
        ({"waf": "modsecurity"}, None, "'modsecurity' is not one of off, sqli_xss, crs"),
        ({"waf": "crs", "waf_actoin": "detect"}, None, "did you mean proxy.routes[0].waf_action"),
        ({"waf": "zero_trust"}, None, "needs an OpenAPI document"),
        ({"waf": "crs", "openapi": "/etc/api.yaml"}, None, "only it takes one"),
        ({"waf": "zero_trust", "openapi": "api.yaml"}, None, "must be an absolute path"),
        ({"waf": "off", "waf_exclude_rules": [1]}, None, 'only for waf = "sqli_xss" or "crs"'),
        ({"waf": "crs", "waf_exclude_rules": ["94x"]}, None, "'94x' is not a rule id"),
        (
            {"waf": "zero_trust", "openapi": "/a.yaml", "waf_body_over_limit": "pass"},
            None,
            "zero_trust never passes an uninspected body",
        ),
        ({"waf": "crs"}, {"crs": {"paranoia_level": 5}}, "out of range (1..4)"),
        ({"waf": "crs"}, {"compressed": "allow"}, "'allow' is not one of inspect, reject"),
        ({"waf": "crs"}, {"body_limit": "lots"}, "invalid size"),
        ({"waf": "crs"}, {"crs": {"paranoia": 2}}, "did you mean proxy.waf.crs.paranoia_level"),
    ],
)
def test_bad_keys_name_the_key(route: dict[str, Any], waf: Any, says: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        parse(route, waf)
    assert says in str(caught.value)


def test_zero_trust_never_passes_an_oversized_body() -> None:
    config = parse({"waf": "zero_trust", "openapi": "/etc/api.yaml"}, {"body_over_limit": "pass"})
    assert config.routes[0].waf.body_over_limit == "reject"


def _config(tmp_path: Path, waf: WafConfig, mode: str = "sqli_xss") -> Any:
    return waf_config(RecordingUpstream(port=1), tmp_path / "log", {"a": RouteWaf(mode)}, waf)


def test_rules_that_do_not_parse_stop_the_gateway_with_the_engine_error(tmp_path: Path) -> None:
    rules = tmp_path / "rules.conf"
    rules.write_text('SecRule ARGS "@detectSQLi" "phase:2,deny"\n')
    config = _config(tmp_path, WafConfig(sqli_xss_rules=rules))
    with pytest.raises(WafLoadError, match="Rules must have an ID"):
        check_waf(config)
    with pytest.raises(ProxyStartupError, match=r"waf: .*Rules must have an ID"):
        validate(config)


def test_missing_crs_rules_stop_the_gateway(tmp_path: Path) -> None:
    config = _config(tmp_path, WafConfig(crs=CrsConfig(rules_dir=tmp_path)), "crs")
    with pytest.raises(WafLoadError, match=r"no REQUEST-.*install modsecurity-crs"):
        check_waf(config)


def test_a_missing_engine_library_stops_the_gateway(tmp_path: Path) -> None:
    config = _config(tmp_path, WafConfig(library="libnosuch.so.3"))
    with pytest.raises(WafLoadError, match=r"cannot load libnosuch\.so\.3"):
        check_waf(config)


def test_check_config_reports_rules_that_do_not_load(tmp_path: Path) -> None:
    rules = tmp_path / "rules.conf"
    rules.write_text("SecNoSuchDirective On\n")
    toml = tmp_path / "stockade.toml"
    toml.write_text(
        f"""
[proxy.waf]
sqli_xss_rules = "{rules}"
[proxy.pools.api]
servers = ["127.0.0.1:8080"]
[[proxy.routes]]
pool = "api"
waf = "sqli_xss"
"""
    )
    command = [sys.executable, "-m", "stockade.cli.main", "--config", str(toml), "check-config"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "waf:" in result.stderr and "Invalid input" in result.stderr
    rules.write_text('SecRule ARGS "@detectSQLi" "id:1,phase:2,deny"\n')
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr


def test_rule_exclusions_apply_to_their_route_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        upstream = RecordingUpstream()
        await upstream.start()
        routes = {
            "strict": RouteWaf("crs"),
            "relaxed": RouteWaf("crs", exclude_rules=("942100",)),
            "mine": RouteWaf("sqli_xss", exclude_rules=("42100",)),
        }
        config = waf_config(upstream, tmp_path / "log", routes)
        query = "/x?id=1%27%20or%20%271%27=%271"
        async with (
            serving(config) as (base, _),
            aiohttp.ClientSession(headers={"Host": HOST}) as session,
        ):
            for route, status in (("strict", 403), ("relaxed", 200), ("mine", 200)):
                async with session.get(f"{base}/{route}{query}") as answer:
                    assert answer.status == status, route
            async with session.get(f"{base}/mine/x?q=%3Cscript%3Ealert(1)%3C/script%3E") as answer:
                assert answer.status == 403  # the route's other rule still applies
        await upstream.stop()

    asyncio.run(scenario())


def test_the_example_config_shows_the_defaults() -> None:
    from stockade.config import load_config

    example = Path(__file__).resolve().parents[2] / "examples" / "stockade.toml"
    config = load_config(example).proxy
    assert config.waf == WafConfig()
    assert config.routes[0].waf == RouteWaf("crs")
