"""sqli_xss's fast pass (proxy/waf/fast_pass.py) held to the engine it stands in for.

The fast pass may only let through what a ModSecurity transaction with the
shipped rules would let through. On thousands of randomly built requests
(paths, query strings, cookies, User-Agent and Referer made of SQL, HTML and
encoding fragments) the two are compared: whatever the fast pass passes,
the engine passes; and where every string is plain, the two agree exactly.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from waf_harness import HOST, RecordingUpstream, serving, waf_config

from stockade.proxy.waf.fast_pass import (
    RULES_SHA256,
    FastPass,
    cookie_strings,
    fast_pass_for,
    is_plain,
    query_strings,
    rules_digest,
    uri_strings,
)
from stockade.proxy.waf.modsec import Engine, RuleSet
from stockade.proxy.waf.rulesets import RuleSets
from stockade.proxy.waf_settings import SHIPPED_RULES, RouteWaf, WafConfig

LIBRARY = WafConfig().library

# Fragments the random requests are made of: plain words, SQL and HTML
# pieces, separators the parsers split on, and what is not plain (%, +, &,
# backslash, NUL, non-ASCII) raw and percent-encoded.
FRAGMENTS = (
    "1", "42", "a", "id", "name", "q", "page", "O'Brien", "hello", "world", "'", '"', " ",
    "or", "and", "1=1", "union", "select", "from", "users", "where", "--", "#", "/*", "*/",
    "(", ")", ";", ",", "<", ">", "script", "<script>", "</script>", "alert(1)", "onerror=",
    "<img src=x ", "javascript:", "sleep(5)", "@@version", "0x41", "`", "|", "$", "..", "/",
    "=", "?", "&", "+", "%", "\\", "%27", "%3C", "%3E", "%20", "%2B", "%25", "%26", "%00",
    "%zz", "%4", "%u0027", "&#39;", "&lt;", "\\x27", "é", "%C3%A9", "\t", "1' or '1'='1",
    "' union select password from users --", "<svg onload=alert(1)>", "admin'--",
)  # fmt: skip
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"


def _text(rng: random.Random, most: int) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, most)))


def random_request(rng: random.Random) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    segments = [_text(rng, 3) for _ in range(rng.randint(1, 3))]
    uri = "/" + "/".join(segments)
    if rng.random() < 0.8:
        pairs = [f"{_text(rng, 2)}={_text(rng, 3)}" for _ in range(rng.randint(0, 3))]
        uri += "?" + "&".join(pairs)
    if rng.random() < 0.1:
        uri += "#" + _text(rng, 2)
    headers = [(b"Host", HOST.encode())]
    if rng.random() < 0.7:
        headers.append((b"User-Agent", (UA if rng.random() < 0.5 else _text(rng, 3)).encode()))
    if rng.random() < 0.3:
        headers.append((b"Referer", f"https://{HOST}/{_text(rng, 2)}".encode()))
    if rng.random() < 0.6:
        cookies = [f"{rng.choice(['', ' ', '  '])}{_text(rng, 2)}={_text(rng, 2)}"]
        cookies += [f" {_text(rng, 1)}={_text(rng, 2)}" for _ in range(rng.randint(0, 2))]
        headers.append((b"Cookie", ";".join(cookies).encode() + rng.choice([b"", b";", b" "])))
    return uri.encode(), headers


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[Engine, RuleSet]]:
    engine = Engine(LIBRARY)
    rule_sets = RuleSets(engine, WafConfig(), 1 << 20)
    try:
        yield engine, rule_sets.get("sqli_xss")
    finally:
        rule_sets.close()
        engine.close()


def engine_passes(
    engine: tuple[Engine, RuleSet], uri: bytes, headers: list[tuple[bytes, bytes]]
) -> bool:
    msc, rules = engine
    with msc.transaction(rules, "fastpass") as tx:
        tx.connection("198.18.0.1", 40000, "198.18.0.2", 80)
        tx.uri(uri, "GET", "1.1")
        tx.add_headers(headers)
        tx.process_headers()
        found = tx.intervention()
        if found is None:
            tx.process_body()
            found = tx.intervention()
    return found is None


def all_plain(uri: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    strings = uri_strings(uri)
    if strings is None:
        return False
    values = list(strings)
    for name, value in headers:
        values.extend(cookie_strings(value) if name.lower() == b"cookie" else [value])
    return all(is_plain(v) for v in values)


def test_the_shipped_rules_are_the_ones_the_fast_pass_reasons_about() -> None:
    # A change to rules/sqli_xss.conf must revisit proxy/waf/fast_pass.py.
    assert rules_digest(SHIPPED_RULES.read_bytes()) == RULES_SHA256


def test_libinjection_finds_nothing_in_an_empty_string() -> None:
    assert not FastPass(LIBRARY).flagged(b"")


def test_query_strings_split_and_decode_as_modsecurity() -> None:
    assert list(query_strings(b"a=b=c&&=x&y&z+1=%41%2b%zz%4")) == [
        b"a", b"b=c", b"", b"", b"", b"x", b"y", b"", b"z 1", b"A+%zz%4",
    ]  # fmt: skip
    assert list(query_strings(b"a=1&")) == [b"a", b"1"]  # no empty pair after a trailing &


def test_cookie_strings_split_and_trim_as_modsecurity() -> None:
    header = b" a=1; b = 2 ;;=skipped; c=x=y;  d  "
    assert list(cookie_strings(header)) == [b"a", b"1", b"b ", b" 2 ", b"c", b"x=y", b"d", b""]


def test_uri_strings_refuse_an_encoded_path_or_a_nul() -> None:
    assert uri_strings(b"/a%2fb?q=1") is None
    assert uri_strings(b"/a\0b") is None
    strings = uri_strings(b"/v1/items?q=%27#frag?x=<")
    assert strings is not None and list(strings) == [b"/v1/items", b"items", b"q", b"'"]


def test_what_the_fast_pass_passes_the_engine_passes(engine: tuple[Engine, RuleSet]) -> None:
    fast = FastPass(LIBRARY)
    rng = random.Random(20261124)
    passed = plain = plain_blocked = 0
    for _ in range(4000):
        uri, headers = random_request(rng)
        verdict = engine_passes(engine, uri, headers)
        fast_verdict = fast.passes(uri, headers, None)
        assert verdict or not fast_verdict, (uri, headers)
        if all_plain(uri, headers):
            plain += 1
            plain_blocked += not verdict
            assert fast_verdict == verdict, (uri, headers)
        passed += fast_verdict
    # the comparison covers both verdicts, on many requests each
    assert passed >= 200 and plain - plain_blocked >= 200 and plain_blocked >= 200, (
        passed,
        plain,
        plain_blocked,
    )


def test_the_cache_does_not_change_a_verdict(engine: tuple[Engine, RuleSet]) -> None:
    fast = FastPass(LIBRARY)
    rng = random.Random(7)
    requests = [random_request(rng) for _ in range(300)]
    first = [fast.passes(uri, headers, None) for uri, headers in requests]
    assert [fast.passes(uri, headers, None) for uri, headers in requests] == first


def test_a_body_or_a_content_type_goes_to_the_engine() -> None:
    fast = FastPass(LIBRARY)
    assert fast.passes(b"/a?q=1", [(b"User-Agent", b"x")], None)
    assert not fast.passes(b"/a?q=1", [(b"User-Agent", b"x")], b'{"a": 1}')
    # an XML Content-Type without a body is a parse error for the engine (400)
    assert not fast.passes(b"/a?q=1", [(b"Content-Type", b"application/xml")], None)


def test_other_rules_get_no_fast_pass(tmp_path: Path) -> None:
    rules = tmp_path / "mine.conf"
    rules.write_text(
        SHIPPED_RULES.read_text()
        + '\nSecRule ARGS "@contains forbidden" "id:43000,phase:2,deny,status:403,log"\n'
    )
    assert fast_pass_for(rules, LIBRARY) is None
    assert fast_pass_for(SHIPPED_RULES, LIBRARY) is not None


async def _get(base: str, path: str, **headers: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + path, headers={"Host": HOST, **headers}) as response:
            await response.read()
            return response.status


@pytest.mark.parametrize("fast_pass", [True, False])
def test_the_gateway_passes_clean_gets_without_a_transaction(
    tmp_path: Path, fast_pass: bool
) -> None:
    async def scenario() -> None:
        upstream = RecordingUpstream()
        await upstream.start()
        try:
            config = waf_config(
                upstream,
                tmp_path / "access.log",
                {"s": RouteWaf("sqli_xss")},
                WafConfig(fast_pass=fast_pass),
            )
            async with serving(config) as (base, gateway):
                waf = gateway.waf
                assert waf is not None
                assert await _get(base, "/s/items?q=hello+world&page=2", Cookie="a=b") == 200
                assert await _get(base, "/s/items?q=1'+or+'1'='1") == 403
                assert await _get(base, "/s/items?q=%3Cscript%3Ealert(1)%3C/script%3E") == 403
                assert await _get(base, "/s/items", Cookie="s=1' union select 1 --") == 403
                assert await _get(base, "/s/caf%C3%A9?q=%C3%A9t%C3%A9") == 200
                counters = waf.counters
                assert counters.inspected["sqli_xss"] == 5
                assert counters.fast_passed == (1 if fast_pass else 0)
                gateway.sync_metrics()
                metric = gateway.metrics.waf_fast_passed._value.get()  # type: ignore[attr-defined]
                assert metric == counters.fast_passed
        finally:
            await upstream.stop()

    asyncio.run(scenario())


def test_custom_rules_still_see_every_request(tmp_path: Path) -> None:
    rules = tmp_path / "mine.conf"
    rules.write_text('SecRule ARGS "@contains forbidden" "id:43000,phase:2,deny,status:403,log"\n')

    async def scenario() -> None:
        upstream = RecordingUpstream()
        await upstream.start()
        try:
            config = waf_config(
                upstream,
                tmp_path / "access.log",
                {"s": RouteWaf("sqli_xss")},
                WafConfig(sqli_xss_rules=rules),
            )
            async with serving(config) as (base, gateway):
                assert await _get(base, "/s/items?q=forbidden") == 403
                assert await _get(base, "/s/items?q=fine") == 200
                assert gateway.waf is not None and gateway.waf.counters.fast_passed == 0
        finally:
            await upstream.stop()

    asyncio.run(scenario())
