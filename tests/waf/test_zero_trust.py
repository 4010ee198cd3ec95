"""zero_trust: only what the route's OpenAPI document declares gets through."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from waf_harness import HOST, RecordingUpstream, ThreadedGateway, waf_config

from stockade.proxy.settings import ProxyConfig
from stockade.proxy.waf.firewall import WafLoadError, check_waf
from stockade.proxy.waf_settings import RouteWaf

API = """\
openapi: 3.0.3
info: {title: pets, version: "1"}
servers: [{url: /zt}, {url: /ztd}]
paths:
  /pets:
    get:
      parameters:
        - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 100}}
        - {name: tag, in: query, required: false, schema: {type: string, maxLength: 20}}
      responses: {"200": {description: ok}}
    post:
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              required: [name]
              additionalProperties: false
              properties:
                name: {type: string, maxLength: 40}
                tags: {type: array, items: {type: string}, maxItems: 5}
                age: {type: integer, minimum: 0}
      responses: {"201": {description: created}}
  /pets/{id}:
    parameters:
      - {name: id, in: path, required: true, schema: {type: integer}}
    get:
      responses: {"200": {description: ok}}
  /search:
    get:
      parameters:
        - {name: q, in: query, required: true, schema: {type: string}}
      responses: {"200": {description: ok}}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    tmp = tmp_path_factory.mktemp("zt")
    document = tmp / "api.yaml"
    document.write_text(API)
    routes = {
        "zt": RouteWaf("zero_trust", openapi=document),
        "ztd": RouteWaf("zero_trust", "detect", openapi=document),
    }

    def config(upstream: RecordingUpstream) -> ProxyConfig:
        return waf_config(upstream, tmp / "access.log", routes)

    with ThreadedGateway(config) as gw:
        yield gw


def request(method: str, target: str, body: bytes = b"", headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}", *headers]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


JSON = "Content-Type: application/json"
ALLOWED = [
    ("GET", "/zt/pets", b"", ()),
    ("GET", "/zt/pets?limit=10&tag=cute", b"", ()),
    ("GET", "/zt/pets/42", b"", ()),
    ("GET", "/zt/search?q=O%27Brien", b"", ()),
    ("POST", "/zt/pets", b'{"name": "Rex", "tags": ["a", "b"], "age": 3}', (JSON,)),
]
REFUSED = [
    ("undeclared method", "DELETE", "/zt/pets/42", b"", (), "undeclared_operation"),
    ("undeclared path", "GET", "/zt/admin", b"", (), "undeclared_operation"),
    ("HEAD is not GET", "HEAD", "/zt/pets", b"", (), "undeclared_operation"),
    ("unknown query parameter", "GET", "/zt/pets?limit=1&debug=1", b"", (), "unknown_parameter"),
    ("parameter of wrong type", "GET", "/zt/pets?limit=ten", b"", (), "invalid_parameter"),
    ("parameter over its maximum", "GET", "/zt/pets?limit=1000", b"", (), "invalid_parameter"),
    ("path parameter of wrong type", "GET", "/zt/pets/abc", b"", (), "invalid_parameter"),
    ("required parameter missing", "GET", "/zt/search", b"", (), "missing_parameter"),
    (
        "body with an extra field",
        "POST",
        "/zt/pets",
        b'{"name": "x", "admin": true}',
        (JSON,),
        "invalid_body",
    ),
    ("body of wrong type", "POST", "/zt/pets", b'{"name": 42}', (JSON,), "invalid_body"),
    ("body missing a required field", "POST", "/zt/pets", b'{"age": 1}', (JSON,), "invalid_body"),
    ("body that is not JSON", "POST", "/zt/pets", b'{"name": ', (JSON,), "invalid_body"),
    (
        "body too long a string",
        "POST",
        "/zt/pets",
        json.dumps({"name": "x" * 41}).encode(),
        (JSON,),
        "invalid_body",
    ),
    (
        "undeclared media type",
        "POST",
        "/zt/pets",
        b"name=x",
        ("Content-Type: application/x-www-form-urlencoded",),
        "unsupported_media_type",
    ),
    ("required body missing", "POST", "/zt/pets", b"", (JSON,), "missing_body"),
    ("body where none is declared", "GET", "/zt/pets/1", b'{"a": 1}', (JSON,), "unexpected_body"),
]


@pytest.mark.parametrize(("method", "target", "body", "headers"), ALLOWED)
def test_declared_operations_pass(
    gateway: ThreadedGateway, method: str, target: str, body: bytes, headers: tuple[str, ...]
) -> None:
    status, answer = gateway.send(request(method, target, body, headers))
    assert status == 200, answer


@pytest.mark.parametrize(
    ("name", "method", "target", "body", "headers", "reason"),
    REFUSED,
    ids=[case[0] for case in REFUSED],
)
def test_anything_else_is_refused_with_the_reason(
    gateway: ThreadedGateway,
    name: str,
    method: str,
    target: str,
    body: bytes,
    headers: tuple[str, ...],
    reason: str,
) -> None:
    seen = len(gateway.upstream.bodies)
    status, answer = gateway.send(request(method, target, body, headers))
    assert status == 403
    if method != "HEAD":
        assert json.loads(answer)["error"] == reason
    assert len(gateway.upstream.bodies) == seen


def test_the_answer_never_echoes_the_request(gateway: ThreadedGateway) -> None:
    status, answer = gateway.send(request("GET", "/zt/pets?%3Cscript%3Eevil=1"))
    assert status == 403
    assert b"script" not in answer and b"evil" not in answer
    answer_json = json.loads(answer)
    assert answer_json["message"] == "query parameter not declared"


def test_a_compressed_body_is_checked_decompressed(gateway: ThreadedGateway) -> None:
    good = gzip.compress(b'{"name": "Rex"}')
    bad = gzip.compress(b'{"name": "Rex", "role": "admin"}')
    encoding = "Content-Encoding: gzip"
    assert gateway.send(request("POST", "/zt/pets", good, (JSON, encoding)))[0] == 200
    assert gateway.send(request("POST", "/zt/pets", bad, (JSON, encoding)))[0] == 403
    assert gateway.upstream.bodies[-1] == good  # forwarded as sent


def test_detect_mode_passes_and_counts(gateway: ThreadedGateway) -> None:
    assert gateway.gateway is not None
    counters = gateway.gateway.waf.counters
    before = counters.detections[("zero_trust", "undeclared_operation")]
    assert gateway.send(request("DELETE", "/ztd/pets/1"))[0] == 200
    assert counters.detections[("zero_trust", "undeclared_operation")] == before + 1


def test_a_bad_document_stops_the_gateway(tmp_path: Path) -> None:
    upstream = RecordingUpstream(port=1)
    for text, says in (
        ("openapi: 3.0.3\ninfo: {title: x}\npaths: {}\n", "not a valid OpenAPI 3 document"),
        ("{{{", "not JSON or YAML"),
        ("- a list", "no top-level object"),
    ):
        document = tmp_path / "api.yaml"
        document.write_text(text)
        config = waf_config(
            upstream, tmp_path / "log", {"zt": RouteWaf("zero_trust", openapi=document)}
        )
        with pytest.raises(WafLoadError, match=says):
            check_waf(config)
    missing = waf_config(
        upstream, tmp_path / "log", {"zt": RouteWaf("zero_trust", openapi=tmp_path / "no.yaml")}
    )
    with pytest.raises(WafLoadError, match="cannot read the OpenAPI document"):
        check_waf(missing)
