"""[proxy.auth] and per-route auth settings: what is accepted, what names the key."""

from __future__ import annotations

import re
from typing import Any

import pytest

from stockade.config import ConfigError, parse_config

BASE: dict[str, Any] = {
    "proxy": {
        "pools": {"api": {"servers": ["198.18.1.10:8080"]}},
        "auth": {
            "issuers": {
                "idp": {
                    "issuer": "https://idp.test/",
                    "audience": "orders",
                    "algorithms": ["RS256"],
                    "jwks_url": "https://idp.test/jwks.json",
                }
            }
        },
        "routes": [
            {
                "pool": "api",
                "auth": "jwt",
                "required_scopes": ["orders:write"],
                "forward_claims": {"sub": "X-Auth-Sub"},
            }
        ],
    }
}


def with_changes(**changes: Any) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = data["proxy"]
        *parents, last = path.split("__")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return data


def test_a_jwt_route_parses() -> None:
    proxy = parse_config(BASE).proxy
    (issuer,) = proxy.auth.issuers
    assert issuer.audience == ("orders",) and issuer.leeway == 30.0
    route = proxy.routes[0].auth
    assert route.mode == "jwt" and route.required_scopes == ("orders:write",)
    assert route.forward_claims == (("sub", "X-Auth-Sub"),)
    assert set(route.headers_set) == {"X-Auth-Sub", "X-Consumer-ID"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"routes__0__auth": "jwtt"}, "proxy.routes[0].auth: 'jwtt' is not one of"),
        ({"routes__0__issuers": ["nope"]}, "unknown issuer 'nope'"),
        ({"auth__issuers__idp__algorithms": ["none"]}, "'none' is not one of"),
        ({"auth__issuers__idp__algorithms": ["HS256"]}, "HS256 needs a secret file"),
        ({"auth__issuers__idp__audience": []}, "audience: required"),
        ({"auth__issuers__idp__jwks_url": "ftp://x"}, "must be an http(s) URL"),
        (
            {"auth__issuers__idp__jwks_url": None, "auth__issuers__idp__issuer": "idp"},
            "give jwks_url or key_files",
        ),  # an http(s) issuer URL alone is OpenID discovery (tests/proxy_jwt)
        ({"routes__0__forward_claims": {"sub": "Host"}}, "'Host' cannot be set"),
        ({"routes__0__forward_claims": {"sub": "X-Request-ID"}}, "cannot be set"),
        ({"routes__0__auth": "none"}, "scopes and claims need auth"),
        ({"auth__api_key_header": "bad header"}, "is not a header name"),
        ({"auth__issuers__idp__leeway": "5x"}, "leeway: invalid duration"),
    ],
)
def test_bad_auth_settings_name_the_key(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(with_changes(**changes))


def test_jwt_routes_need_an_issuer() -> None:
    data = with_changes(auth=None)
    with pytest.raises(ConfigError, match=re.escape("needs [proxy.auth.issuers")):
        parse_config(data)
