"""zero_trust bodies: XML read as the schema's xml objects describe, strict JSON, forms
without repeated fields; an empty body is never refused for its Content-Type alone (also
in the engine modes)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from waf_harness import HOST, RecordingUpstream, ThreadedGateway, waf_config
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

from stockade.proxy.settings import ProxyConfig
from stockade.proxy.waf.firewall import WafLoadError, check_waf
from stockade.proxy.waf_settings import RouteWaf

STRICT = OPENAPI / "strict.yaml"
XML = "Content-Type: application/xml"
FORM = "Content-Type: application/x-www-form-urlencoded"
JSON = "Content-Type: application/json"
NS = 'xmlns="urn:example:inventory"'


@pytest.fixture(scope="module")
def creds() -> Credentials:
    return credentials()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, creds: Credentials
) -> Iterator[ZeroTrustGateway]:
    tmp = tmp_path_factory.mktemp("zt-bodies")
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


def post(
    gw: ZeroTrustGateway, target: str, body: bytes, *headers: str
) -> tuple[int, str, bytes | None]:
    """(status, error code, the body the upstream got or None)."""
    seen = len(gw.upstream.seen)
    status, answer = gw.send(request("POST", target, body, headers))
    error = json.loads(answer).get("error", "") if status != 200 else ""
    got = gw.upstream.seen[-1].body if len(gw.upstream.seen) > seen else None
    return status, error, got


def item(inner: str, attributes: str = 'id="5"', root: str = "item") -> bytes:
    return f"<{root} {NS} {attributes}>{inner}</{root}>".encode()


GOOD_ITEMS = [
    item("<name>Blue box</name>"),
    item("<name>Blue box</name><count>3</count><active>true</active>"),
    item("<name>Box</name><colors><colors>red</colors><colors>blue</colors></colors>"),
    item("<name>Box</name><size>1</size><size>10</size>"),  # unwrapped: repeated in place
    item("<name>Box</name><active>0</active>", attributes=""),
    b'<?xml version="1.0" encoding="UTF-8"?>\n' + item("<name>Box</name><!-- a comment -->"),
    b'<i:item xmlns:i="urn:example:inventory"><name>Box</name></i:item>',
]
BAD_ITEMS = [
    ("no namespace", b"<item><name>Box</name></item>"),
    ("another root", item("<name>Box</name>", root="thing")),
    ("a property twice", item("<name>Box</name><name>Crate</name>")),
    ("an attribute property as an element too", item("<name>Box</name><id>6</id>")),
    ("over the maximum", item("<name>Box</name><count>101</count>")),
    ("not an integer", item("<name>Box</name><count>3 OR 1=1</count>")),
    ("not a boolean", item("<name>Box</name><active>yes</active>")),
    ("an attribute over its maximum", item("<name>Box</name>", attributes='id="5000"')),
    ("a string breaking its pattern", item("<name>Box'; DROP--</name>")),
    ("an undeclared element", item("<name>Box</name><admin>true</admin>")),
    ("an undeclared element with content", item("<name>Box</name><x><y>1</y></x>")),
    ("an undeclared attribute", item("<name>Box</name>", attributes='id="5" role="admin"')),
    ("text in an object", item("<name>Box</name>stray text")),
    ("elements in a value", item("<name><b>Box</b></name>")),
    ("a wrapped item of another name", item("<name>B</name><colors><color>red</color></colors>")),
    (
        "too many wrapped items",
        item("<name>B</name><colors>" + "<colors>red</colors>" * 4 + "</colors>"),
    ),
    ("an unwrapped item over its maximum", item("<name>B</name><size>1</size><size>11</size>")),
    (
        "xsi:type",
        item('<name xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="x">B</name>'),
    ),
    ("a missing required property", item("<count>1</count>")),
    ("not well-formed", b"<item " + NS.encode() + b"><name>Box</item>"),
    ("two roots", item("<name>B</name>") + item("<name>C</name>")),
    ("a DOCTYPE", b'<!DOCTYPE item [<!ENTITY x "Box">]>' + item("<name>&x;</name>")),
    (
        "entity expansion",
        b'<!DOCTYPE item [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
        + item("<name>&b;</name>"),
    ),
    (
        "an external entity",
        b'<!DOCTYPE item SYSTEM "http://127.0.0.1:1/x.dtd">' + item("<name>B</name>"),
    ),
    ("a processing instruction", b'<?php system("id"); ?>' + item("<name>B</name>")),
    (
        "another encoding declared",
        b'<?xml version="1.0" encoding="ISO-8859-1"?>' + item("<name>B</name>"),
    ),
    ("not UTF-8", item("<name>B</name>").replace(b"<name>B", b"<name>B\xe9")),
    ("too deep", item("<name>B</name>" + "<a>" * 40 + "</a>" * 40)),
]


@pytest.mark.parametrize("body", GOOD_ITEMS)
def test_xml_bodies_that_fit_pass_unchanged(
    gateway: ZeroTrustGateway, auth: str, body: bytes
) -> None:
    status, error, got = post(gateway, "/strict/items", body, auth, XML)
    assert (status, error, got) == (200, "", body)


@pytest.mark.parametrize(("name", "body"), BAD_ITEMS, ids=[case[0] for case in BAD_ITEMS])
def test_xml_bodies_that_do_not_fit_are_refused(
    gateway: ZeroTrustGateway, auth: str, name: str, body: bytes
) -> None:
    status, error, got = post(gateway, "/strict/items", body, auth, XML)
    assert (status, error, got) == (403, "invalid_body", None)


def test_an_xml_charset_other_than_utf8_is_refused(gateway: ZeroTrustGateway, auth: str) -> None:
    body = item("<name>Box</name>")
    assert post(gateway, "/strict/items", body, auth, f"{XML}; charset=utf-8")[0] == 200
    status, error, _ = post(gateway, "/strict/items", body, auth, f"{XML}; charset=iso-8859-1")
    assert (status, error) == (403, "invalid_body")


PET = (
    b'<?xml version="1.0" encoding="UTF-8"?><pet><id>10</id><name>doggie</name>'
    b"<category><id>1</id><name>Dogs</name></category>"
    b"<photoUrls><photoUrl>https://img.example/1.png</photoUrl></photoUrls>"
    b"<tags><tag><id>0</id><name>good</name></tag><tag><id>1</id><name>boy</name></tag></tags>"
    b"<status>available</status></pet>"
)


def test_the_petstore_pet_in_xml(gateway: ZeroTrustGateway, auth: str) -> None:
    assert post(gateway, "/api/v3/pet", PET, auth, XML) == (200, "", PET)
    for bad in (
        PET.replace(b"available", b"stolen"),  # enum
        PET.replace(b"<id>10</id>", b"<id>ten</id>"),
        PET.replace(b"<photoUrls>", b"<photoUrls><photoUrl>x</photoUrl><url>y</url>"),
        PET.replace(b"<tag><id>0</id>", b"<tag><id>0</id><id>1</id>"),  # an id twice
        PET.replace(b"<pet>", b"<Pet>").replace(b"</pet>", b"</Pet>"),  # xml.name is "pet"
        PET.replace(b"<name>doggie</name>", b""),  # required
    ):
        assert post(gateway, "/api/v3/pet", bad, auth, XML)[:2] == (403, "invalid_body"), bad


def test_json_is_read_strictly(gateway: ZeroTrustGateway, auth: str) -> None:
    good = b'{"name": "Box", "count": 3}'
    assert post(gateway, "/strict/items", good, auth, JSON) == (200, "", good)
    for bad in (
        b'{"name": "Box", "name": "Crate"}',  # parsers disagree on which one counts
        b'{"name": "Box", "count": NaN}',
        b'{"name": "Box", "count": Infinity}',
        '{"name": "Bo\xe9"}'.encode("latin-1"),
        '{"name": "Box"}'.encode("utf-16"),
    ):
        assert post(gateway, "/strict/items", bad, auth, JSON)[:2] == (403, "invalid_body"), bad


def test_a_form_may_repeat_only_its_arrays(gateway: ZeroTrustGateway, auth: str) -> None:
    good = b"name=Box&colors=red&colors=blue&count=3"
    assert post(gateway, "/strict/items", good, auth, FORM) == (200, "", good)
    for bad in (
        b"name=Box&name=Crate",  # two good values: the upstream may read either
        b"name=Box&count=3&count=300",
        b"name=Box&admin=1",  # additionalProperties: false
        b"name=Box&colors=red&colors=purple",
        b"name=B%FFx",
    ):
        assert post(gateway, "/strict/items", bad, auth, FORM)[:2] == (403, "invalid_body"), bad


def test_an_empty_body_is_judged_as_no_body(gateway: ZeroTrustGateway, auth: str) -> None:
    # POST /store/order takes an optional body, declared as JSON, XML or a form
    for content_type in (XML, "Content-Type: text/xml", JSON, FORM):
        assert post(gateway, "/api/v3/store/order", b"", auth, content_type)[:2] == (200, "")
    chunked = (
        f"POST /api/v3/store/order HTTP/1.1\r\nHost: {HOST}\r\n{auth}\r\n{XML}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n"
    ).encode()
    assert gateway.send(chunked)[0] == 200
    # a required body is still required
    assert post(gateway, "/strict/items", b"", auth, XML)[:2] == (403, "missing_body")


# -- the engine modes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    tmp = tmp_path_factory.mktemp("empty-bodies")
    routes = {"sx": RouteWaf("sqli_xss"), "crs": RouteWaf("crs")}

    def config(upstream: RecordingUpstream) -> ProxyConfig:
        return waf_config(upstream, tmp / "access.log", routes)

    with ThreadedGateway(config) as gw:
        yield gw


def engine_request(
    method: str, target: str, content_type: str, body: bytes, chunked: bool
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}", f"Content-Type: {content_type}"]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


@pytest.mark.parametrize("route", ["sx", "crs"])
@pytest.mark.parametrize("content_type", ["application/xml", "text/xml", "application/soap+xml"])
def test_engine_modes_never_refuse_an_empty_body_for_its_content_type(
    engine_gateway: ThreadedGateway, route: str, content_type: str
) -> None:
    # (CRS refuses a GET with Transfer-Encoding for that alone: rule 920171)
    for method, chunked in (("GET", False), ("POST", False), ("POST", True), ("DELETE", True)):
        raw = engine_request(method, f"/{route}/a?q=hello", content_type, b"", chunked)
        status, answer = engine_gateway.send(raw)
        assert status == 200, (method, chunked, answer)
    # the rules still run on everything else ...
    attack = "/a?q=1%27%20UNION%20SELECT%20password%20FROM%20users--"
    raw = engine_request("POST", f"/{route}{attack}", content_type, b"", False)
    assert engine_gateway.send(raw)[0] == 403
    # ... and a body that is there must parse
    raw = engine_request("POST", f"/{route}/a", content_type, b"<a><b></a>", False)
    status, answer = engine_gateway.send(raw)
    assert (status, json.loads(answer)["error"]) == (400, "bad_body")


# -- refused at load -------------------------------------------------------------------


def _doc(tmp: Path, operation: dict[str, object]) -> Path:
    doc = {
        "openapi": "3.0.3",
        "info": {"title": "t", "version": "1"},
        "paths": {"/things": {"post": {**operation, "responses": {"200": {"description": "ok"}}}}},
    }
    path = tmp / "doc.json"
    path.write_text(json.dumps(doc))
    return path


LOAD_REFUSED = [
    (
        "allOf in an XML body",
        {
            "requestBody": {
                "content": {
                    "application/xml": {
                        "schema": {"allOf": [{"type": "object"}, {"properties": {"a": {}}}]}
                    }
                }
            }
        },
        "the XML body's schema uses allOf",
    ),
    (
        "an object as an attribute",
        {
            "requestBody": {
                "content": {
                    "text/xml": {
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"type": "object", "xml": {"attribute": True}}},
                        }
                    }
                }
            }
        },
        "an object cannot be an XML attribute",
    ),
    (
        "a spaceDelimited query array",
        {
            "parameters": [
                {
                    "name": "q",
                    "in": "query",
                    "style": "spaceDelimited",
                    "explode": False,
                    "schema": {"type": "array", "items": {"type": "string"}},
                }
            ]
        },
        "style 'spaceDelimited'",
    ),
    (
        "an exploded form object in the query",
        {"parameters": [{"name": "q", "in": "query", "schema": {"type": "object"}}]},
        "style 'form' (explode true)",
    ),
    (
        "a deepObject that is not an object",
        {
            "parameters": [
                {"name": "q", "in": "query", "style": "deepObject", "schema": {"type": "string"}}
            ]
        },
        "style 'deepObject'",
    ),
]


@pytest.mark.parametrize(
    ("name", "operation", "says"), LOAD_REFUSED, ids=[case[0] for case in LOAD_REFUSED]
)
def test_what_cannot_be_checked_refuses_the_document(
    tmp_path: Path, name: str, operation: dict[str, object], says: str
) -> None:
    path = _doc(tmp_path, operation)
    config = waf_config(
        RecordingUpstream(port=1), tmp_path / "log", {"zt": RouteWaf("zero_trust", openapi=path)}
    )
    with pytest.raises(WafLoadError) as caught:
        check_waf(config)
    assert says in str(caught.value) and "POST /things" in str(caught.value)
