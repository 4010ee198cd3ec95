"""sqli_xss's fast pass (proxy/waf/fast_pass.py) held to the engine it stands in for.

The fast pass may only let through what a ModSecurity transaction with the
shipped rules would let through. On thousands of randomly built requests
(paths, query strings, cookies, User-Agent and Referer made of SQL, HTML and
encoding fragments) the two are compared: whatever the fast pass passes,
the engine passes; and where every string is plain, the two agree exactly.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from waf_harness import HOST, RecordingUpstream, serving, waf_config
from yarl import URL

from stockade.proxy.app import Gateway
from stockade.proxy.waf.fast_pass import (
    RULES_SHA256,
    FastPass,
    cookie_strings,
    fast_pass_for,
    is_plain,
    json_strings,
    query_strings,
    rules_digest,
    uri_strings,
)
from stockade.proxy.waf.modsec import Engine, RuleSet
from stockade.proxy.waf.rulesets import RuleSets, engine_settings
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
    engine: tuple[Engine, RuleSet],
    uri: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None = None,
) -> bool:
    msc, rules = engine
    with msc.transaction(rules, "fastpass") as tx:
        tx.connection("198.18.0.1", 40000, "198.18.0.2", 80)
        tx.uri(uri, "POST" if body else "GET", "1.1")
        tx.add_headers(headers)
        tx.process_headers()
        found = tx.intervention()
        if found is None:
            if body:
                tx.append_body(body)
            tx.process_body()
            found = tx.intervention()
    return found is None


# JSON documents of the fragments: nested objects and arrays, empty and
# repeated keys, numbers as written, true, false, null.
NUMBERS = ("0", "-0", "42", "-7", "1.50", "2e10", "1.5E+3", "-0.0e-2", "123456789012345678901234")


def random_json(rng: random.Random, depth: int = 0, fragments: tuple[str, ...] = FRAGMENTS) -> str:
    kind = rng.random()
    if depth < 4 and kind < 0.3:
        members = [
            f"{json.dumps(rng.choice(['', *fragments]) + _text(rng, 1))}: "
            + random_json(rng, depth + 1, fragments)
            for _ in range(rng.randint(0, 4))
        ]
        return "{" + ", ".join(members) + "}"
    if depth < 4 and kind < 0.5:
        items = [random_json(rng, depth + 1, fragments) for _ in range(rng.randint(0, 3))]
        return "[" + ",".join(items) + "]"
    if kind < 0.6:
        return rng.choice(NUMBERS)
    if kind < 0.65:
        return rng.choice(["true", "false", "null"])
    return json.dumps(_text(rng, 3), ensure_ascii=rng.random() < 0.8)


JSON_TYPES = (
    b"application/json",
    b"application/json; charset=utf-8",
    b"Application/JSON",
    b"application/problem+json",
    b"application/xml",
    b"text/plain",
    b"application/x-www-form-urlencoded",
)


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


def test_json_bodies_the_fast_pass_passes_the_engine_passes(
    engine: tuple[Engine, RuleSet],
) -> None:
    fast = FastPass(LIBRARY)
    rng = random.Random(11)
    passed = plain = plain_blocked = 0
    for _ in range(3000):
        document = random_json(rng)
        if rng.random() < 0.05:
            document = document[: rng.randint(0, len(document))]  # cut short: not JSON
        body = document.encode()
        content_type = rng.choice(JSON_TYPES[:4]) if rng.random() < 0.85 else rng.choice(JSON_TYPES)
        headers = [(b"Host", HOST.encode()), (b"Content-Type", content_type)]
        uri = b"/api/items"
        verdict = engine_passes(engine, uri, headers, body)
        fast_verdict = fast.passes(uri, headers, body)
        assert verdict or not fast_verdict, (content_type, body)
        strings = json_strings(body)
        if (
            strings is not None
            and all(is_plain(s) for s in strings)
            and content_type in JSON_TYPES[:4]
        ):
            plain += 1
            plain_blocked += not verdict
            assert fast_verdict == verdict, (content_type, body)
        passed += fast_verdict
    assert passed >= 200 and plain - plain_blocked >= 200 and plain_blocked >= 100, (
        passed,
        plain,
        plain_blocked,
    )


_ARGUMENT = re.compile(rb'Adding request argument \((GET|JSON)\): name "(.*)", value "(.*)"$', re.M)


def test_arguments_are_named_and_valued_as_the_engine_does(tmp_path: Path) -> None:
    """The engine's own debug log lists every argument it makes (name and value):
    the fast pass takes the same ones from query strings and JSON bodies."""
    debug_log = tmp_path / "debug.log"
    msc = Engine(LIBRARY)
    rules = msc.rule_set()
    rules.add(engine_settings(1 << 20) + f"SecDebugLog {debug_log}\nSecDebugLogLevel 4\n")
    # no quote or backslash in the fragments: the log line does not escape them
    fragments = tuple(f for f in FRAGMENTS if '"' not in f and "\\" not in f)
    rng = random.Random(5)
    compared = 0
    try:
        for _ in range(600):
            query = "&".join(f"{_text(rng, 2)}={_text(rng, 2)}" for _ in range(rng.randint(0, 3)))
            body = random_json(rng, fragments=fragments).encode()
            strings = json_strings(body)
            if strings is None or not all(is_plain(s) for s in strings):
                continue
            uri = b"/api/items?" + query.encode().replace(b"#", b"")
            start = debug_log.stat().st_size if debug_log.exists() else 0
            with msc.transaction(rules, "names") as tx:
                tx.connection("198.18.0.1", 40000, "198.18.0.2", 80)
                tx.uri(uri, "POST", "1.1")
                tx.add_headers([(b"Content-Type", b"application/json")])
                tx.process_headers()
                tx.append_body(body)
                tx.process_body()
            logged = _ARGUMENT.findall(debug_log.read_bytes()[start:])
            query_logged = [s for kind, n, v in logged if kind == b"GET" for s in (n, v)]
            json_logged = [s for kind, n, v in logged if kind == b"JSON" for s in (n, v)]
            from_uri = uri_strings(uri)
            assert from_uri is not None
            if all(b"\n" not in s and b'"' not in s for s in from_uri):
                assert from_uri[2:] == query_logged, uri
            assert strings == json_logged, body
            compared += 1
    finally:
        rules.close()
        msc.close()
    assert compared >= 300


def test_the_cache_does_not_change_a_verdict(engine: tuple[Engine, RuleSet]) -> None:
    fast = FastPass(LIBRARY)
    rng = random.Random(7)
    requests = [random_request(rng) for _ in range(300)]
    first = [fast.passes(uri, headers, None) for uri, headers in requests]
    assert [fast.passes(uri, headers, None) for uri, headers in requests] == first


def test_only_json_bodies_are_for_the_fast_pass() -> None:
    fast = FastPass(LIBRARY)
    json_type = (b"Content-Type", b"application/json")
    assert fast.passes(b"/a?q=1", [(b"User-Agent", b"x")], None)
    assert fast.passes(b"/a", [json_type], b'{"a": [1, "two"]}')
    assert fast.passes(b"/a", [json_type], None)  # the engine ignores an empty JSON body
    assert not fast.passes(b"/a", [(b"User-Agent", b"x")], b'{"a": 1}')  # no Content-Type
    assert not fast.passes(b"/a", [json_type, json_type], b'{"a": 1}')
    assert not fast.passes(b"/a", [json_type], b'{"a": NaN}')
    assert not fast.passes(b"/a", [json_type], b'{"a": 1} x')
    assert not fast.passes(b"/a", [json_type], '{"a": "é"}'.encode())
    assert not fast.passes(b"/a", [json_type], b"[" * 40 + b"]" * 40)  # deeper than 32
    # an XML Content-Type without a body is a parse error for the engine (400)
    assert not fast.passes(b"/a?q=1", [(b"Content-Type", b"application/xml")], None)
    form = (b"Content-Type", b"application/x-www-form-urlencoded")
    assert not fast.passes(b"/a", [form], b"a=1")


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


async def _post_json(base: str, path: str, document: object) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(base + path, json=document, headers={"Host": HOST}) as response:
            await response.read()
            return response.status


@asynccontextmanager
async def sqli_xss_gateway(tmp_path: Path, waf: WafConfig) -> AsyncIterator[tuple[str, Gateway]]:
    """A gateway with one sqli_xss route at /s/ in front of a recording upstream."""
    upstream = RecordingUpstream()
    await upstream.start()
    try:
        routes = {"s": RouteWaf("sqli_xss")}
        async with serving(waf_config(upstream, tmp_path / "access.log", routes, waf)) as served:
            yield served
    finally:
        await upstream.stop()


@pytest.mark.parametrize("fast_pass", [True, False])
def test_the_gateway_passes_clean_requests_without_a_transaction(
    tmp_path: Path, fast_pass: bool
) -> None:
    async def scenario() -> None:
        async with sqli_xss_gateway(tmp_path, WafConfig(fast_pass=fast_pass)) as (base, gateway):
            waf = gateway.waf
            assert waf is not None
            assert await _get(base, "/s/items?q=hello+world&page=2", Cookie="a=b") == 200
            assert await _get(base, "/s/items?q=1'+or+'1'='1") == 403
            assert await _get(base, "/s/items?q=%3Cscript%3Ealert(1)%3C/script%3E") == 403
            assert await _get(base, "/s/items", Cookie="s=1' union select 1 --") == 403
            assert await _get(base, "/s/caf%C3%A9?q=%C3%A9t%C3%A9") == 200
            order = {"order": {"items": [{"sku": "A-1", "qty": 2}], "note": "O'Brien"}}
            assert await _post_json(base, "/s/orders", order) == 200
            attack = {"order": {"note": "1' union select password from users --"}}
            assert await _post_json(base, "/s/orders", attack) == 403
            assert await _post_json(base, "/s/orders", {"<script>alert(1)</script>": 1}) == 403
            counters = waf.counters
            assert counters.inspected["sqli_xss"] == 8
            assert counters.fast_passed == (2 if fast_pass else 0)
            gateway.sync_metrics()
            metric = gateway.metrics.waf_fast_passed._value.get()  # type: ignore[attr-defined]
            assert metric == counters.fast_passed

    asyncio.run(scenario())


def test_custom_rules_still_see_every_request(tmp_path: Path) -> None:
    rules = tmp_path / "mine.conf"
    rules.write_text('SecRule ARGS "@contains forbidden" "id:43000,phase:2,deny,status:403,log"\n')

    async def scenario() -> None:
        async with sqli_xss_gateway(tmp_path, WafConfig(sqli_xss_rules=rules)) as (base, gateway):
            assert await _get(base, "/s/items?q=forbidden") == 403
            assert await _get(base, "/s/items?q=fine") == 200
            assert gateway.waf is not None and gateway.waf.counters.fast_passed == 0

    asyncio.run(scenario())


async def _raw_get(base: str, target: str) -> int:
    """A request line sent as written (aiohttp's client would turn it into origin form)."""
    url = URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()


@pytest.mark.parametrize("fast_pass", [True, False])
def test_rules_see_an_absolute_form_target_in_origin_form(tmp_path: Path, fast_pass: bool) -> None:
    """The rules see what the upstream gets: the path and query, not the scheme and
    authority the request was routed by (a path rule must hold for both forms)."""
    rules = tmp_path / "mine.conf"
    rules.write_text(
        SHIPPED_RULES.read_text()
        + '\nSecRule REQUEST_URI "!@beginsWith /" "id:43001,phase:1,deny,status:403,log"\n'
        + 'SecRule REQUEST_FILENAME "@streq /s/private" "id:43002,phase:1,deny,status:403,log"\n'
    )
    waf = WafConfig(sqli_xss_rules=rules, fast_pass=fast_pass)

    async def scenario() -> None:
        async with sqli_xss_gateway(tmp_path, waf) as (base, _gateway):
            for prefix in ("", f"http://{HOST}"):
                assert await _raw_get(base, f"{prefix}/s/items?q=fine") == 200, prefix
                assert await _raw_get(base, f"{prefix}/s/private") == 403, prefix
                assert await _raw_get(base, f"{prefix}/s/items?q=1'+or+'1'='1") == 403, prefix

    asyncio.run(scenario())
