"""zero_trust checks every value of every parameter (HTTP parameter pollution), and the
upstream gets exactly what was checked."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zt_gateway import (
    OPENAPI,
    PETSTORE,
    Credentials,
    ZeroTrustGateway,
    ZtRoute,
    auth_config,
    bearer,
    credentials,
    request,
    zt_config,
)

STRICT = OPENAPI / "strict.yaml"


@pytest.fixture(scope="module")
def creds() -> Credentials:
    return credentials()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, creds: Credentials
) -> Iterator[ZeroTrustGateway]:
    tmp = tmp_path_factory.mktemp("zt-params")
    auth = auth_config(tmp, creds)
    routes = [
        ZtRoute("pets", PETSTORE, "jwt_or_api_key", prefix="/api/v3/"),
        ZtRoute("strict", STRICT, "jwt", prefix="/strict/"),
    ]
    with ZeroTrustGateway(lambda up: zt_config(up, tmp, auth, routes)) as gw:
        yield gw


@pytest.fixture(scope="module")
def auth(creds: Credentials) -> str:
    return bearer(creds.token(scope="items:read write:pets read:pets"))


def send(
    gw: ZeroTrustGateway, target: str, auth: str, *headers: str
) -> tuple[int, str, str | None]:
    """(status, error code, the target the upstream got or None)."""
    seen = len(gw.upstream.seen)
    status, answer = gw.send(request("GET", target, b"", (auth, *headers)))
    error = json.loads(answer).get("error", "") if status != 200 else ""
    got = gw.upstream.seen[-1].target if len(gw.upstream.seen) > seen else None
    return status, error, got


POLLUTED = [
    # the cases: the first value is good, a later one is not
    ("/api/v3/pet/findByStatus?status=sold&status=sold'%20OR%20'1'='1", "repeated_parameter"),
    ("/strict/items?limit=5&limit=1000", "repeated_parameter"),
    ("/strict/items?limit=5&limit=6", "repeated_parameter"),  # even two good values
    ("/strict/items?status=open&status=closed", "repeated_parameter"),
    ("/strict/items?tags=red&tags=blue", "repeated_parameter"),  # explode false: one value
    ("/strict/items?filter[color]=red&filter[color]=x", "repeated_parameter"),
    ("/strict/items?ids=1&ids=2&ids=1000", "invalid_parameter"),  # every item checked
    ("/strict/items?ids=1&ids=2&ids=3&ids=4&ids=5&ids=6", "invalid_parameter"),  # maxItems
    ("/strict/items?ids=1&ids=x", "invalid_parameter"),
    ("/strict/items?tags=red,purple", "invalid_parameter"),
    ("/strict/items?filter[color]=red&filter[size]=11", "invalid_parameter"),
    ("/strict/items?filter[color]=red&filter[shape]=round", "invalid_parameter"),
    ("/strict/items?filter[color][x]=red", "unknown_parameter"),
    ("/strict/items?limit=5&Limit=6", "unknown_parameter"),  # names are case-sensitive
    ("/strict/items?limit=%FF", "invalid_parameter"),  # not UTF-8
    ("/strict/items?status=open;status=closed", "invalid_parameter"),  # ';' splits for some
    ("/strict/items/0x10", "invalid_parameter"),
    ("/strict/items/5000", "invalid_parameter"),
    ("/strict/labels/x%2Fy", "invalid_parameter"),  # refused by the path stage or here
]
ALLOWED = [
    "/api/v3/pet/findByStatus?status=sold",
    "/api/v3/pet/findByTags?tags=a&tags=b&tags=c",
    "/strict/items?limit=100&status=closed",
    "/strict/items?ids=1&ids=2&ids=100",
    "/strict/items?tags=red,green",
    "/strict/items?status=op%65n&limit=%31%30",  # percent-decoded before the check
    "/strict/items?filter[color]=blue&filter[size]=10",
    "/strict/items/1000",
    "/strict/labels/a%20b",  # checked percent-decoded, as the upstream reads it
]


@pytest.mark.parametrize(("target", "reason"), POLLUTED)
def test_every_value_is_checked(
    gateway: ZeroTrustGateway, auth: str, target: str, reason: str
) -> None:
    status, error, got = send(gateway, target, auth)
    assert got is None
    if target.startswith("/strict/labels/x%2F"):
        assert status in (400, 403)
        return
    assert (status, error) == (403, reason)


@pytest.mark.parametrize("target", ALLOWED)
def test_declared_values_pass_as_sent(gateway: ZeroTrustGateway, auth: str, target: str) -> None:
    status, error, got = send(gateway, target, auth)
    assert (status, error) == (200, "")
    assert got == target


def test_headers_and_cookies_are_checked_on_every_line(
    gateway: ZeroTrustGateway, auth: str
) -> None:
    target = "/strict/items"
    assert send(gateway, target, auth, "X-Trace: 0a1b2c3d")[0] == 200
    status, error, _ = send(gateway, target, auth, "X-Trace: 0a1b2c3d", "X-Trace: ' OR 1=1")
    assert (status, error) == (403, "repeated_parameter")
    status, error, _ = send(gateway, target, auth, "x-trace: 0a1b2c3d", "X-TRACE: 0a1b2c3d")
    assert (status, error) == (403, "repeated_parameter")
    # a header array: its lines are one list, every item checked
    assert send(gateway, target, auth, "X-Regions: eu", "X-Regions: us")[0] == 200
    status, error, _ = send(gateway, target, auth, "X-Regions: eu", "X-Regions: mars")
    assert (status, error) == (403, "invalid_parameter")
    # cookies: on one line or several, every one
    assert send(gateway, target, auth, "Cookie: session=abcd; theme=dark")[0] == 200
    for cookies in (
        ("Cookie: session=abcd; session=' OR 1=1",),
        ("Cookie: session=abcd", "Cookie: session=wxyz"),
    ):
        status, error, _ = send(gateway, target, auth, *cookies)
        assert (status, error) == (403, "repeated_parameter"), cookies
    status, error, _ = send(gateway, target, auth, "Cookie: theme=dark; session=toolong")
    assert (status, error) == (403, "invalid_parameter")
    # undeclared headers and cookies are not checked (clients and proxies add their own)
    assert send(gateway, target, auth, "X-Other: 1", "X-Other: 2", "Cookie: a=1; a=2")[0] == 200


# -- generated pollution ----------------------------------------------------------------

LIMIT_JUNK = ["", "five", "5' OR '1'='1", "1.5", "0x10", "1e2", "-", "5;limit=1000"]
STATUS = ["open", "closed", "open", "closed", "Open", "opened", "", "open' OR '1'='1", "closed\x00"]
TAG_VALUES = ["red", "green", "blue", "red", "green", "blue", "purple", "", "red'--"]


def _tags_value(parts: list[str]) -> str:
    return ",".join(parts)


in_range = st.integers(1, 100).map(str)
out_of_range = st.one_of(st.integers(-200, 0), st.integers(101, 100_000)).map(str)
values = {
    # about half the values are good, so that both verdicts come up often
    "limit": st.one_of(in_range, in_range, out_of_range, st.sampled_from(LIMIT_JUNK)),
    "status": st.sampled_from(STATUS),
    "ids": st.one_of(in_range, in_range, in_range, out_of_range, st.sampled_from(LIMIT_JUNK)),
    "tags": st.lists(st.sampled_from(TAG_VALUES), min_size=1, max_size=3).map(_tags_value),
}
pairs = st.lists(
    st.sampled_from(sorted(values)).flatmap(lambda name: values[name].map(lambda v: (name, v))),
    max_size=5,
)


def _integer_in(value: str, low: int, high: int) -> bool:
    return value.lstrip("-").isdigit() and low <= int(value) <= high


def conforms(query: list[tuple[str, str]]) -> bool:
    """The strict document's GET /items, as a model: single parameters at most once,
    ids at most five times, every value within its schema."""
    counts = Counter(name for name, _ in query)
    if any(counts[name] > 1 for name in ("limit", "status", "tags")) or counts["ids"] > 5:
        return False
    for name, value in query:
        if name in ("limit", "ids") and not _integer_in(value, 1, 100):
            return False
        if name == "status" and value not in ("open", "closed"):
            return False
        if name == "tags" and not all(t in ("red", "green", "blue") for t in value.split(",")):
            return False
    return True


@settings(max_examples=250)
@given(query=pairs)
def test_generated_pollution_is_refused_and_what_passes_is_what_was_checked(
    gateway: ZeroTrustGateway, auth: str, query: list[tuple[str, str]]
) -> None:
    target = "/strict/items" + (f"?{urlencode(query)}" if query else "")
    status, error, got = send(gateway, target, auth)
    if conforms(query):
        assert status == 200, (query, error)
        assert got is not None
        # the upstream got the query byte for byte, and parses it to what was validated
        assert got == target
        assert parse_qsl(urlsplit(got).query, keep_blank_values=True) == query
    else:
        assert status == 403 and got is None, query
        assert error in ("repeated_parameter", "invalid_parameter"), error
