"""zero_trust enforces every security requirement of the document, through the route's auth,
and refuses at load a document whose requirements the route cannot check."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from waf_harness import RecordingUpstream
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

from stockade.proxy.auth_settings import AuthConfig
from stockade.proxy.waf.firewall import WafLoadError, check_waf

STRICT = OPENAPI / "strict.yaml"
JSON = "Content-Type: application/json"
PET = json.dumps({"name": "rex", "photoUrls": ["https://img.example/rex.png"]}).encode()
BOTH = "write:pets read:pets"


@pytest.fixture(scope="module")
def creds() -> Credentials:
    return credentials()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, creds: Credentials
) -> Iterator[ZeroTrustGateway]:
    tmp = tmp_path_factory.mktemp("zt-security")
    auth = auth_config(tmp, creds)
    routes = [
        ZtRoute("pets", PETSTORE, "jwt_or_api_key", prefix="/api/v3/"),
        ZtRoute("strict", STRICT, "jwt", prefix="/strict/"),
        ZtRoute(
            "watch",
            PETSTORE,
            "jwt_or_api_key",
            prefix="/watch/",
            base_path="/watch",
            action="detect",
        ),
    ]
    with ZeroTrustGateway(lambda up: zt_config(up, tmp, auth, routes)) as gw:
        yield gw


def api_key(creds: Credentials) -> str:
    return f"api_key: {creds.api_key}"


def send(gw: ZeroTrustGateway, *args: object) -> tuple[int, dict[str, object], bool]:
    """(status, JSON answer, whether the upstream got the request)."""
    seen = len(gw.upstream.seen)
    status, answer = gw.send(request(*args))  # type: ignore[arg-type]
    return status, json.loads(answer) if answer else {}, len(gw.upstream.seen) > seen


def test_oauth2_requirement_needs_a_token_with_every_scope(
    gateway: ZeroTrustGateway, creds: Credentials
) -> None:
    # POST /pet: security [{petstore_auth: [write:pets, read:pets]}]
    status, answer, reached = send(gateway, "POST", "/api/v3/pet", PET, (JSON, api_key(creds)))
    assert (status, answer["error"], reached) == (401, "missing_credentials", False)
    for scope in ("read:pets", "write:pets", "", "write:pets:all read"):
        token = creds.token(scope=scope)
        status, answer, reached = send(gateway, "POST", "/api/v3/pet", PET, (JSON, bearer(token)))
        assert (status, answer["error"], reached) == (403, "insufficient_scope", False), scope
    for claims in ({"scope": BOTH}, {"scp": ["read:pets", "write:pets"]}, {"scope": f"x {BOTH}"}):
        token = creds.token(**claims)
        status, _, reached = send(gateway, "POST", "/api/v3/pet", PET, (JSON, bearer(token)))
        assert (status, reached) == (200, True), claims


def test_alternatives_are_an_or(gateway: ZeroTrustGateway, creds: Credentials) -> None:
    # GET /pet/{petId}: [{api_key: []}, {petstore_auth: [...]}]
    assert send(gateway, "GET", "/api/v3/pet/7", b"", (api_key(creds),))[0] == 200
    token = creds.token(scope=BOTH)
    assert send(gateway, "GET", "/api/v3/pet/7", b"", (bearer(token),))[0] == 200
    narrow = creds.token(scope="read:pets")
    status, answer, reached = send(gateway, "GET", "/api/v3/pet/7", b"", (bearer(narrow),))
    assert (status, answer["error"], reached) == (403, "insufficient_scope", False)


def test_an_api_key_requirement_is_not_met_by_a_token(
    gateway: ZeroTrustGateway, creds: Credentials
) -> None:
    # GET /store/inventory: [{api_key: []}]
    token = creds.token(scope=BOTH)
    status, answer, reached = send(gateway, "GET", "/api/v3/store/inventory", b"", (bearer(token),))
    assert (status, answer["error"], reached) == (401, "missing_credentials", False)
    assert send(gateway, "GET", "/api/v3/store/inventory", b"", (api_key(creds),))[0] == 200


def test_operations_without_security_take_either_credential(
    gateway: ZeroTrustGateway, creds: Credentials
) -> None:
    order = json.dumps({"petId": 7, "quantity": 1, "status": "placed"}).encode()
    for credential in (api_key(creds), bearer(creds.token())):
        assert send(gateway, "POST", "/api/v3/store/order", order, (JSON, credential))[0] == 200


def test_openid_connect_scopes_and_open_operations(
    gateway: ZeroTrustGateway, creds: Credentials
) -> None:
    # /admin/users: [{oidc: [admin]}]; /items: the top-level default [{oidc: [items:read]}];
    # /health: security [] (open, the route's auth still applies)
    plain = creds.token(scope="items:read")
    admin = creds.token(scope="admin")
    status, answer, reached = send(gateway, "GET", "/strict/admin/users", b"", (bearer(plain),))
    assert (status, answer["error"], reached) == (403, "insufficient_scope", False)
    assert send(gateway, "GET", "/strict/admin/users", b"", (bearer(admin),))[0] == 200
    status, answer, _ = send(gateway, "GET", "/strict/items", b"", (bearer(admin),))
    assert (status, answer["error"]) == (403, "insufficient_scope")
    assert send(gateway, "GET", "/strict/items", b"", (bearer(plain),))[0] == 200
    assert send(gateway, "GET", "/strict/health", b"", (bearer(creds.token()),))[0] == 200
    assert send(gateway, "GET", "/strict/health")[0] == 401  # the route's own auth


def test_refusals_carry_a_challenge_and_are_counted(
    gateway: ZeroTrustGateway, creds: Credentials
) -> None:
    assert gateway.gateway is not None
    blocks = gateway.gateway.waf.counters.blocks
    before = (
        blocks[("zero_trust", "missing_credentials")],
        blocks[("zero_trust", "insufficient_scope")],
    )
    raw = request("POST", "/api/v3/pet", PET, (JSON, api_key(creds)))
    head = _head(gateway, raw)
    assert head.startswith(b"HTTP/1.1 401") and b'WWW-Authenticate: Bearer realm="stockade"' in head
    narrow = creds.token(scope="read:pets")
    head = _head(gateway, request("POST", "/api/v3/pet", PET, (JSON, bearer(narrow))))
    assert head.startswith(b"HTTP/1.1 403")
    assert b'error="insufficient_scope"' in head and b'scope="read:pets write:pets"' in head
    after = (
        blocks[("zero_trust", "missing_credentials")],
        blocks[("zero_trust", "insufficient_scope")],
    )
    assert after == (before[0] + 1, before[1] + 1)


def test_detect_mode_logs_and_passes(gateway: ZeroTrustGateway, creds: Credentials) -> None:
    assert gateway.gateway is not None
    detections = gateway.gateway.waf.counters.detections
    before = detections[("zero_trust", "missing_credentials")]
    status, _, reached = send(gateway, "POST", "/watch/pet", PET, (JSON, api_key(creds)))
    assert (status, reached) == (200, True)
    assert detections[("zero_trust", "missing_credentials")] == before + 1


def _head(gateway: ZeroTrustGateway, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


# -- refused at load ----------------------------------------------------------------------

SCHEMES = {
    "oauth": {
        "type": "oauth2",
        "flows": {"clientCredentials": {"tokenUrl": "https://idp.test/t", "scopes": {"a": "a"}}},
    },
    "oidc": {
        "type": "openIdConnect",
        "openIdConnectUrl": "https://idp.test/.well-known/openid-configuration",
    },
    "bearer": {"type": "http", "scheme": "bearer"},
    "basic": {"type": "http", "scheme": "basic"},
    "digest": {"type": "http", "scheme": "Digest"},
    "key_header": {"type": "apiKey", "in": "header", "name": "api_key"},
    "key_other": {"type": "apiKey", "in": "header", "name": "X-Other-Key"},
    "key_query": {"type": "apiKey", "in": "query", "name": "api_key"},
    "key_cookie": {"type": "apiKey", "in": "cookie", "name": "api_key"},
    "mtls": {"type": "mutualTLS"},
}


def document(tmp: Path, security: list[dict[str, list[str]]], version: str = "3.0.3") -> Path:
    schemes = {k: v for k, v in SCHEMES.items() if version.startswith("3.1") or k != "mtls"}
    doc = {
        "openapi": version,
        "info": {"title": "t", "version": "1"},
        "paths": {
            "/open": {"get": {"security": [], "responses": {"200": {"description": "ok"}}}},
            "/things": {
                "post": {"security": security, "responses": {"200": {"description": "ok"}}}
            },
        },
        "components": {"securitySchemes": schemes},
    }
    text = json.dumps(doc)
    path = tmp / f"doc-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    path.write_text(text)
    return path


def load(tmp: Path, path: Path, auth: str, creds: Credentials) -> None:
    routes = [ZtRoute("shop", path, auth)]
    check_waf(zt_config(RecordingUpstream(port=1), tmp, auth_config(tmp, creds), routes))


LOAD_REFUSED = [
    ("oauth", "none", "oauth2 needs a token verified by the route's auth"),
    ("oauth", "api_key", 'the route\'s auth is "api_key"'),
    ("oidc", "none", "openIdConnect needs a token"),
    ("bearer", "api_key", "http needs a token"),
    ("basic", "jwt", "does not verify HTTP basic credentials"),
    ("digest", "jwt_or_api_key", "does not verify HTTP Digest credentials"),
    ("key_header", "jwt", "which verifies no API key"),
    ("key_header", "none", "which verifies no API key"),
    ("key_other", "api_key", "not in 'X-Other-Key'"),
    ("key_query", "api_key", "an API key in the query is not verified"),
    ("key_cookie", "jwt_or_api_key", "an API key in the cookie is not verified"),
]


@pytest.mark.parametrize(("scheme", "auth", "says"), LOAD_REFUSED)
def test_a_requirement_the_route_cannot_check_refuses_the_config(
    tmp_path: Path, creds: Credentials, scheme: str, auth: str, says: str
) -> None:
    path = document(tmp_path, [{scheme: []}])
    with pytest.raises(WafLoadError) as caught:
        load(tmp_path, path, auth, creds)
    message = str(caught.value)
    # the route, the document, the operation and the scheme
    for part in ("route 'shop'", str(path), "POST /things", f"security scheme {scheme!r}", says):
        assert part in message


def test_one_uncheckable_alternative_refuses_the_whole_document(
    tmp_path: Path, creds: Credentials
) -> None:
    path = document(tmp_path, [{"oauth": []}, {"basic": []}])
    with pytest.raises(WafLoadError, match="'basic'"):
        load(tmp_path, path, "jwt", creds)


def test_mutual_tls_is_refused_with_a_reason(tmp_path: Path, creds: Credentials) -> None:
    path = document(tmp_path, [{"mtls": []}], version="3.1.0")
    with pytest.raises(WafLoadError, match="no client certificates"):
        load(tmp_path, path, "jwt_or_api_key", creds)


def test_roles_on_an_api_key_cannot_be_checked(tmp_path: Path, creds: Credentials) -> None:
    path = document(tmp_path, [{"key_header": ["admin"]}], version="3.1.0")
    with pytest.raises(WafLoadError, match="no roles or scopes"):
        load(tmp_path, path, "api_key", creds)


def test_the_public_petstore_needs_an_auth_that_checks_both_schemes(
    tmp_path: Path, creds: Credentials
) -> None:
    for auth in ("none", "jwt", "api_key"):
        with pytest.raises(WafLoadError, match="route 'shop'"):
            load(tmp_path, PETSTORE, auth, creds)
    load(tmp_path, PETSTORE, "jwt_or_api_key", creds)
    # ... and the api_key header must be the one stockade reads
    other = AuthConfig(issuers=auth_config(tmp_path, creds).issuers, api_key_header="X-API-Key")
    config = zt_config(
        RecordingUpstream(port=1), tmp_path, other, [ZtRoute("shop", PETSTORE, "jwt_or_api_key")]
    )
    with pytest.raises(WafLoadError, match="not in 'api_key'"):
        check_waf(config)


def test_checkable_requirements_load(tmp_path: Path, creds: Credentials) -> None:
    for scheme, auth in (
        ("oauth", "jwt"),
        ("oidc", "jwt_or_api_key"),
        ("bearer", "jwt"),
        ("key_header", "api_key"),
        ("key_header", "jwt_or_api_key"),
    ):
        load(tmp_path, document(tmp_path, [{scheme: []}]), auth, creds)
    # security [{}] (anonymous allowed) is open: nothing to check
    load(tmp_path, document(tmp_path, [{}]), "none", creds)
