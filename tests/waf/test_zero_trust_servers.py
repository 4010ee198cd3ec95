"""zero_trust matches a document's operations under the paths of its servers, absolute URLs
included, on any listener; openapi_base_path maps a document under another path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from waf_harness import RecordingUpstream
from zt_gateway import (
    PETSTORE,
    Credentials,
    ZeroTrustGateway,
    ZtRoute,
    auth_config,
    credentials,
    request,
    zt_config,
)

from stockade.config_fields import ConfigError, Section
from stockade.proxy.settings import parse_proxy
from stockade.proxy.waf.firewall import WafLoadError, check_waf

OPS = {"get": {"responses": {"200": {"description": "ok"}}}}


def document(tmp: Path, name: str, servers: list[dict[str, Any]]) -> Path:
    doc = {
        "openapi": "3.0.3",
        "info": {"title": name, "version": "1"},
        "servers": servers,
        "paths": {"/pets": OPS},
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def creds() -> Credentials:
    return credentials()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, creds: Credentials
) -> Iterator[ZeroTrustGateway]:
    tmp = tmp_path_factory.mktemp("zt-servers")
    # the Petstore as it is published on its host: an absolute https server URL
    published = yaml.safe_load(PETSTORE.read_text())
    published["servers"] = [{"url": "https://petstore3.swagger.io/api/v3"}]
    hosted = tmp / "petstore-hosted.yaml"
    hosted.write_text(yaml.safe_dump(published))
    versions = document(
        tmp,
        "versions",
        [
            {
                "url": "https://{region}.api.example.com/{version}",
                "variables": {
                    "region": {"default": "eu"},
                    "version": {"default": "v1", "enum": ["v1", "v2"]},
                },
            },
            {
                "url": "{scheme}://api.example.com/{stage}",
                "variables": {
                    "scheme": {"default": "https", "enum": ["https"]},
                    "stage": {"default": "beta"},
                },
            },
        ],
    )
    relative = document(tmp, "relative", [{"url": "v1"}])
    routes = [
        ZtRoute("hosted", hosted, "jwt_or_api_key", prefix="/api/v3/"),
        ZtRoute("shop", hosted, "jwt_or_api_key", prefix="/shop/", base_path="/shop"),
        *(ZtRoute(v, versions) for v in ("v1", "v2", "v3")),  # each at /NAME/
        ZtRoute("beta", versions, prefix="/beta/"),
        ZtRoute("mapped", relative, prefix="/mapped/", base_path="/mapped/"),
    ]
    auth = auth_config(tmp, creds)
    with ZeroTrustGateway(lambda up: zt_config(up, tmp, auth, routes)) as gw:
        yield gw


def status(gw: ZeroTrustGateway, target: str, *headers: str) -> tuple[int, str]:
    code, answer = gw.send(request("GET", target, b"", headers))
    return code, json.loads(answer).get("error", "") if code != 200 else ""


def test_an_absolute_server_url_matches_on_a_plain_listener(
    gateway: ZeroTrustGateway, creds: Credentials
) -> None:
    key = f"api_key: {creds.api_key}"
    # the document says https://petstore3.swagger.io; the gateway listens on http, 127.0.0.1
    assert status(gateway, "/api/v3/pet/7", key) == (200, "")
    assert status(gateway, "/api/v3/store/inventory", key) == (200, "")


def test_base_path_maps_the_document_elsewhere(
    gateway: ZeroTrustGateway, creds: Credentials
) -> None:
    key = f"api_key: {creds.api_key}"
    assert status(gateway, "/shop/pet/7", key) == (200, "")
    # the document's own servers no longer count on that route
    assert status(gateway, "/shop/api/v3/pet/7", key) == (403, "undeclared_operation")
    assert status(gateway, "/mapped/pets") == (200, "")


def test_server_variables_are_their_enum_values_or_default(gateway: ZeroTrustGateway) -> None:
    assert status(gateway, "/v1/pets") == (200, "")
    assert status(gateway, "/v2/pets") == (200, "")
    assert status(gateway, "/v3/pets") == (403, "undeclared_operation")
    assert status(gateway, "/beta/pets") == (200, "")  # no enum: the default only


def test_a_server_relative_to_the_document_needs_a_base_path(tmp_path: Path) -> None:
    path = document(tmp_path, "relative", [{"url": "v1"}])
    config = zt_config(
        RecordingUpstream(port=1),
        tmp_path,
        auth_config(tmp_path, credentials()),
        [ZtRoute("r", path)],
    )
    with pytest.raises(WafLoadError, match="set the route's openapi_base_path"):
        check_waf(config)


POOLS = {"api": {"servers": ["127.0.0.1:8080"]}}


def parse_route(route: dict[str, Any]) -> Any:
    table = {"pools": POOLS, "routes": [{"pool": "api", **route}]}
    return parse_proxy(Section("proxy", table)).routes[0].waf


def test_openapi_base_path_in_the_config() -> None:
    zt = {"waf": "zero_trust", "openapi": "/etc/stockade/api.yaml"}
    assert parse_route(zt).openapi_base_path is None
    assert parse_route({**zt, "openapi_base_path": "/api/v3/"}).openapi_base_path == "/api/v3"
    assert parse_route({**zt, "openapi_base_path": "/"}).openapi_base_path == "/"
    for bad in ("api", "/a?b=1", "/{version}", "//x", "/a b", ""):
        with pytest.raises(ConfigError, match="openapi_base_path"):
            parse_route({**zt, "openapi_base_path": bad})
    with pytest.raises(ConfigError, match='only for waf = "zero_trust"'):
        parse_route({"waf": "crs", "openapi_base_path": "/api"})
