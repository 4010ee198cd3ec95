"""Anomaly and bot rules through the whole gateway (the controller is a fake here;
the kernel side is tested in tests/integration)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from proxy_harness import Upstream, config_for, gateway

from stockade.proxy.anomaly_settings import AnomalyConfig, AnomalyRule, parse_condition
from stockade.proxy.api_keys import generate_key
from stockade.proxy.auth_settings import AuthConfig, RouteAuth
from stockade.proxy.ban_client import BanPushError
from stockade.proxy.ratelimit_settings import LimitRule, RateLimitConfig, parse_rate
from stockade.proxy.settings import ProxyConfig


class FakeController:
    def __init__(self, answer: str = "added", failures: int = 0, kind: str = "unavailable") -> None:
        self.answer = answer
        self.failures = failures  # the first calls fail like an absent controller
        self.kind = kind
        self.calls: list[dict[str, Any]] = []

    async def rule_ban(self, **args: Any) -> dict[str, Any]:
        self.calls.append(args)
        if len(self.calls) <= self.failures:
            raise BanPushError(self.kind, "no controller")
        return {"status": self.answer, "target": args["target"]}

    async def close(self) -> None:
        pass


def with_rules(config: ProxyConfig, tmp_path: Path, *rules: AnomalyRule) -> ProxyConfig:
    agents = tmp_path / "agents.data"
    agents.write_text("# scanners\nsqlmap\nnikto\n")
    return replace(
        config, anomaly=AnomalyConfig(rules=rules, user_agents_file=agents, tarpit_max=1)
    )


def rule(name: str, when: str | None, action: str, **extra: Any) -> AnomalyRule:
    condition = parse_condition(when) if when else None
    return AnomalyRule(name, action, condition=condition, user_agents=when is None, **extra)


async def get(s: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    async with s.get(url, **kwargs) as r:
        await r.read()
        return r.status


def run(coro: Any) -> None:
    asyncio.run(coro)


def test_a_scanner_is_banned_once_and_refused_from_then_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            scan = rule("scanner", "distinct_404_paths > 5 in 1m", "ban", duration=60.0)
            config = with_rules(config_for([up], tmp_path / "log"), tmp_path, scan)
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:
                fake = FakeController()
                gw.anomaly.bans = fake
                # the same missing path again and again is not a scan
                for _ in range(10):
                    assert await get(s, f"{url}/status/404/same") == 404
                assert gw.anomaly.fired["scanner"] == 0
                statuses = [await get(s, f"{url}/status/404/p{i}") for i in range(5)]
                assert statuses == [404] * 5  # with "same", the 6th distinct path trips it
                await asyncio.sleep(0.05)  # the push runs in the background
                assert len(fake.calls) == 1
                call = fake.calls[0]
                assert call["target"] == "127.0.0.1" and call["rule"] == "scanner"
                assert call["details"]["counters"] == {"distinct_404_paths": 6.0}
                seen = len(up.seen)
                # denied here until the kernel drops it, and the connection closed
                assert await get(s, f"{url}/fine") == 403
                for i in range(3):  # new connections from it are closed at once
                    with pytest.raises(aiohttp.ServerDisconnectedError):
                        await get(s, f"{url}/status/404/q{i}")
                assert len(up.seen) == seen
                assert len(fake.calls) == 1  # and the ban is pushed once
                assert gw.anomaly.fired["scanner"] == 1
                assert gw.anomaly.snapshot()["recent"][0]["subject"] == "127.0.0.1"
        finally:
            await up.stop()

    run(scenario())


def test_an_allowlisted_source_is_not_denied_after_the_controller_refuses(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            burst = rule("burst", "requests > 3 in 1m", "ban", duration=60.0)
            config = with_rules(config_for([up], tmp_path / "log"), tmp_path, burst)
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:
                gw.anomaly.bans = fake = FakeController(answer="allowlisted")
                for _ in range(4):
                    assert await get(s, f"{url}/x") == 200
                await asyncio.sleep(0.05)
                assert len(fake.calls) == 1
                assert [await get(s, f"{url}/x") for _ in range(5)] == [200] * 5
                assert len(fake.calls) == 1  # and it is not asked again every request
        finally:
            await up.stop()

    run(scenario())


def test_credential_brute_force_on_one_path_is_denied(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        key, entry = generate_key("acme", "free")
        raw = {
            "key_id": entry.key_id,
            "salt": entry.salt.hex(),
            "digest": entry.digest.hex(),
            "consumer": "acme",
            "plan": "free",
        }
        try:
            brute = rule("brute", "auth_failures_same_path > 3 in 1m", "deny", duration=30.0)
            config = with_rules(config_for([up], tmp_path / "log"), tmp_path, brute)
            route = replace(config.routes[0], auth=RouteAuth(mode="api_key"))
            config = replace(config, routes=(route,), auth=AuthConfig(api_keys=(raw,)))
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:
                bad = {"X-API-Key": "stk_nope_nope"}
                # failures spread over different paths are not one brute force
                assert [await get(s, f"{url}/p{i}", headers=bad) for i in range(4)] == [401] * 4
                assert [await get(s, f"{url}/login", headers=bad) for _ in range(4)] == [401] * 4
                # now denied: even the right key, on any path
                async with s.get(f"{url}/x", headers={"X-API-Key": key}) as r:
                    assert r.status == 403
                    assert (await r.json())["error"] == "rule:brute"
                assert gw.anomaly.fired["brute"] == 1
        finally:
            await up.stop()

    run(scenario())


def test_an_error_ratio_rule_tarpits_with_bounded_concurrency(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            errors = rule(
                "errors",
                "err_ratio > 0.5 with requests >= 6 in 1m",
                "tarpit",
                duration=30.0,
                tarpit_delay=0.5,
            )
            config = with_rules(config_for([up], tmp_path / "log"), tmp_path, errors)
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                assert await get(s, f"{url}/ok") == 200
                for _ in range(5):
                    assert await get(s, f"{url}/status/400") == 400
                started = time.monotonic()
                assert await get(s, f"{url}/ok") == 403
                assert time.monotonic() - started >= 0.45  # held before the answer
                # tarpit_max = 1: a second tarpitted request at once is refused at once
                first = asyncio.create_task(get(s, f"{url}/ok"))
                await asyncio.sleep(0.1)
                started = time.monotonic()
                assert await get(s, f"{url}/ok") == 403
                assert time.monotonic() - started < 0.3
                assert await first == 403
        finally:
            await up.stop()

    run(scenario())


def test_scanner_user_agents_are_denied_and_others_pass(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            bots = rule("bots", None, "deny", duration=0.5)
            config = with_rules(config_for([up], tmp_path / "log"), tmp_path, bots)
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:
                ok = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"}
                assert await get(s, f"{url}/x", headers=ok) == 200
                scanner = {"User-Agent": "Mozilla/5.00 (Nikto/2.1.6)"}
                assert await get(s, f"{url}/x", headers=scanner) == 403
                assert await get(s, f"{url}/x", headers=ok) == 403  # the source, for a while
                await asyncio.sleep(0.6)
                assert await get(s, f"{url}/x", headers=ok) == 200
                assert gw.anomaly.fired["bots"] == 1
        finally:
            await up.stop()

    run(scenario())


def test_a_consumer_rule_denies_the_consumer_not_the_address(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        keys = [generate_key(name, "free") for name in ("greedy", "polite")]
        raws = tuple(
            {
                "key_id": e.key_id,
                "salt": e.salt.hex(),
                "digest": e.digest.hex(),
                "consumer": e.consumer,
                "plan": "free",
            }
            for _, e in keys
        )
        try:
            scraping = rule(
                "scraping", "bytes_out > 5000 in 1m", "deny", key="consumer", duration=30.0
            )
            config = with_rules(config_for([up], tmp_path / "log"), tmp_path, scraping)
            route = replace(config.routes[0], auth=RouteAuth(mode="api_key"))
            config = replace(config, routes=(route,), auth=AuthConfig(api_keys=raws))
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                greedy = {"X-API-Key": keys[0][0]}
                polite = {"X-API-Key": keys[1][0]}
                assert await get(s, f"{url}/bytes/4000", headers=greedy) == 200
                assert await get(s, f"{url}/bytes/4000", headers=greedy) == 200
                assert await get(s, f"{url}/x", headers=greedy) == 403
                assert await get(s, f"{url}/x", headers=polite) == 200  # same IP, other consumer
        finally:
            await up.stop()

    run(scenario())


def test_a_ban_push_is_retried_while_the_controller_is_away(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            burst = rule("burst", "requests > 2 in 1m", "ban", duration=60.0)
            config = with_rules(config_for([up], tmp_path / "log"), tmp_path, burst)
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:
                gw.anomaly.bans = fake = FakeController(failures=1)
                for _ in range(3):
                    assert await get(s, f"{url}/x") == 200
                await asyncio.sleep(0.5)  # one failure, a 0.2 s pause, then it lands
                assert len(fake.calls) == 2
                # a refusal that will stay a refusal is not retried
                gw.anomaly.bans = refused = FakeController(failures=9, kind="bad_input")
                gw.anomaly.fire(0, "198.18.0.99", {"requests": 3.0}, gw.anomaly.monotonic())
                await asyncio.sleep(0.5)
                assert len(refused.calls) == 1
        finally:
            await up.stop()

    run(scenario())


def test_counts_start_afresh_after_a_rule_acts_and_log_never_masks_deny(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            noisy = rule("noisy", "requests > 1 in 1m", "log", duration=60.0)
            burst = rule("burst", "requests > 3 in 1m", "deny", duration=0.5)
            config = with_rules(config_for([up], tmp_path / "log"), tmp_path, noisy, burst)
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:
                # the 4th request trips "burst" although "noisy" logged the 2nd
                assert [await get(s, f"{url}/x") for _ in range(5)] == [200] * 4 + [403]
                await asyncio.sleep(0.6)
                # the deny is over, and the counts that caused it are gone with it;
                # only the one request denied meanwhile still counts
                assert [await get(s, f"{url}/x") for _ in range(4)] == [200, 200, 200, 403]
                # one penalty per source: the deny replaced the log entry, so once
                # the deny was over "noisy" logged again
                assert gw.anomaly.fired == {"noisy": 2, "burst": 2}
        finally:
            await up.stop()

    run(scenario())


def test_repeated_429s_escalate_to_a_ban(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            hammer = rule("hammer", "rate_limited > 3 in 1m", "ban", duration=60.0)
            config = with_rules(config_for([up], tmp_path / "log"), tmp_path, hammer)
            route = replace(config.routes[0], rate_limits=("per_ip",))
            config = replace(
                config,
                routes=(route,),
                rate_limiting=RateLimitConfig(
                    limits=(LimitRule("per_ip", parse_rate("2/min"), "ip"),), max_keys=4096
                ),
            )
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:
                gw.anomaly.bans = fake = FakeController()
                statuses = [await get(s, f"{url}/x") for _ in range(6)]
                assert statuses == [200, 200, 429, 429, 429, 429]
                await asyncio.sleep(0.05)
                (call,) = fake.calls
                assert call["rule"] == "hammer"
                assert call["details"]["counters"] == {"rate_limited": 4.0}
        finally:
            await up.stop()

    run(scenario())
