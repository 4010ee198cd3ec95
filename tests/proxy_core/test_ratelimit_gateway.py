"""Rate limits, plans and quotas through the whole gateway."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from proxy_harness import Upstream, config_for, gateway

from stockade.proxy.api_keys import generate_key
from stockade.proxy.auth_settings import AuthConfig, RouteAuth
from stockade.proxy.quota import read_usage
from stockade.proxy.ratelimit_settings import (
    LimitRule,
    Plan,
    QuotaConfig,
    RateLimitConfig,
    parse_rate,
)
from stockade.proxy.settings import ProxyConfig


def run(coro: Any) -> None:
    asyncio.run(coro)


def limited(config: ProxyConfig, *rules: LimitRule, headers: bool = True) -> ProxyConfig:
    route = replace(config.routes[0], rate_limits=tuple(r.name for r in rules))
    return replace(
        config,
        routes=(route,),
        rate_limiting=RateLimitConfig(limits=rules, response_headers=headers, max_keys=4096),
    )


def test_ip_limit_answers_429_with_the_ietf_headers(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            rule = LimitRule("per_ip", parse_rate("5/10s"), "ip")
            config = limited(config_for([up], tmp_path / "log"), rule)
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:
                remaining = []
                for _ in range(5):
                    async with s.get(f"{url}/x") as r:
                        assert r.status == 200
                        assert r.headers["RateLimit-Limit"] == "5"
                        assert r.headers["RateLimit-Policy"] == "5;w=10"
                        remaining.append(int(r.headers["RateLimit-Remaining"]))
                assert remaining == [4, 3, 2, 1, 0]
                async with s.get(f"{url}/x") as r:
                    assert r.status == 429
                    body = await r.json()
                    assert body["error"] == "limit:per_ip" and body["request_id"]
                    assert 1 <= int(r.headers["Retry-After"]) <= 11
                    assert r.headers["RateLimit-Remaining"] == "0"
                    assert 1 <= int(r.headers["RateLimit-Reset"]) <= 11
                assert len(up.seen) == 5  # the refused request never reached the upstream
                assert gw.limiter.refused["per_ip"] == 1
        finally:
            await up.stop()

    run(scenario())


def test_header_keys_are_separate_and_a_missing_key_falls_back_to_the_ip(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            rule = LimitRule("tenant", parse_rate("2/min"), "header", "x-tenant")
            config = limited(config_for([up], tmp_path / "log"), rule, headers=False)
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:

                async def status(tenant: str | None) -> int:
                    headers = {"X-Tenant": tenant} if tenant else {}
                    async with s.get(f"{url}/x", headers=headers) as r:
                        if r.status == 200:  # response_headers = false: only on a 429
                            assert "RateLimit-Limit" not in r.headers
                        else:
                            assert r.headers["RateLimit-Limit"] == "2"
                        return r.status

                assert [await status("a") for _ in range(3)] == [200, 200, 429]
                assert [await status("b") for _ in range(3)] == [200, 200, 429]
                # leaving the header out is no way around the limit
                assert [await status(None) for _ in range(3)] == [200, 200, 429]
        finally:
            await up.stop()

    run(scenario())


def test_a_rate_map_gives_keys_their_own_rates(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            path = tmp_path / "tenants.map"
            path.write_text("gold 4\n")
            rule = LimitRule("tenant", parse_rate("1/min"), "header", "x-tenant", map_file=path)
            config = limited(config_for([up], tmp_path / "log"), rule)
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:

                async def statuses(tenant: str, n: int) -> list[int]:
                    out = []
                    for _ in range(n):
                        async with s.get(f"{url}/x", headers={"X-Tenant": tenant}) as r:
                            out.append(r.status)
                    return out

                assert await statuses("gold", 5) == [200] * 4 + [429]
                assert await statuses("tin", 2) == [200, 429]
        finally:
            await up.stop()

    run(scenario())


def test_per_ip_limits_run_before_authentication(tmp_path: Path) -> None:
    """A flood of bad tokens costs a 429, not a signature check each."""

    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            rule = LimitRule("per_ip", parse_rate("3/min"), "ip")
            config = limited(config_for([up], tmp_path / "log"), rule)
            route = replace(config.routes[0], auth=RouteAuth(mode="api_key"))
            config = replace(config, routes=(route,))
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:
                statuses = []
                for i in range(6):
                    async with s.get(f"{url}/x", headers={"X-API-Key": f"stk_x_{i}"}) as r:
                        statuses.append(r.status)
                        if r.status == 401:  # a refusal after the limit keeps its headers
                            assert r.headers["RateLimit-Limit"] == "3"
                assert statuses == [401, 401, 401, 429, 429, 429]
                assert sum(gw.auth.failures.values()) == 3
        finally:
            await up.stop()

    run(scenario())


def test_plans_and_quotas_follow_the_api_key(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        free_key, free = generate_key("acme", "free")
        pro_key, pro = generate_key("bigco", "pro")
        entries = [
            {
                "key_id": e.key_id,
                "salt": e.salt.hex(),
                "digest": e.digest.hex(),
                "consumer": e.consumer,
                "plan": e.plan,
            }
            for e in (free, pro)
        ]
        db = tmp_path / "usage.db"
        quotas = QuotaConfig(
            plans=(
                Plan("free", (parse_rate("100/s"),), per_day=3),
                Plan("pro", (parse_rate("100/s"),), per_day=100),
            ),
            database=db,
        )
        try:
            config = config_for([up], tmp_path / "log")
            route = replace(config.routes[0], auth=RouteAuth(mode="api_key"))
            config = replace(
                config, routes=(route,), auth=AuthConfig(api_keys=tuple(entries)), quotas=quotas
            )
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:

                async def call(key: str) -> aiohttp.ClientResponse:
                    async with s.get(f"{url}/x", headers={"X-API-Key": key}) as r:
                        await r.read()
                        return r

                free_answers = [await call(free_key) for _ in range(4)]
                assert [r.status for r in free_answers] == [200, 200, 200, 429]
                refused = free_answers[-1]
                assert (await refused.json())["error"] == "quota:day"
                assert refused.headers["RateLimit-Limit"] == "3"
                assert refused.headers["RateLimit-Policy"] == "3;w=86400"
                # Retry-After points at the next midnight (UTC by default)
                until_midnight = 86400 - time.time() % 86400
                assert abs(int(refused.headers["Retry-After"]) - until_midnight) < 5
                assert [(await call(pro_key)).status for _ in range(5)] == [200] * 5
                assert gw.limiter.refused["quota:day"] == 1
                assert gw.usage is not None
                await gw.usage.flush()
            usage = {u.consumer: (u.plan, u.count) for u in read_usage(db)}
            assert usage == {"acme": ("free", 3), "bigco": ("pro", 5)}
        finally:
            await up.stop()

    run(scenario())


def test_a_repeated_query_key_is_refused_not_counted_as_one_of_its_values(
    tmp_path: Path,
) -> None:
    """`?key=a&key=b`: the limit would count "a" while the upstream may read "b"."""

    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            rule = LimitRule("per_key", parse_rate("2/min"), "query", "key")
            config = limited(config_for([up], tmp_path / "log"), rule)
            async with gateway(config) as (url, _gw), aiohttp.ClientSession() as s:
                for target in ("/x?key=a&key=b", "/x?key=a&k%65y=b", "/x?key=&key=b"):
                    async with s.get(url + target) as r:
                        assert r.status == 400, target
                        assert (await r.json())["error"] == "repeated_key_parameter"
                # one value per request still counts as before
                statuses = []
                for value in ("b", "b", "b"):
                    async with s.get(f"{url}/x?key={value}") as r:
                        statuses.append(r.status)
                assert statuses == [200, 200, 429]
            assert all("key=a" not in seen["path"] for seen in up.seen)
        finally:
            await up.stop()

    run(scenario())
