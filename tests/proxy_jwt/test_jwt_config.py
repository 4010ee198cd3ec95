"""The JWT keys of [proxy.auth.issuers.NAME]: HMAC secrets for HS256/384/512 (and the old
hs256_secret_file), OpenID discovery from the issuer URL, jwks_max_age, ca_file."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import trustme

from stockade.config import ConfigError, parse_config
from stockade.proxy.auth_settings import AuthConfig, Issuer
from stockade.proxy.auth_setup import AuthSetupError, issuer_configs

BASE: dict[str, Any] = {
    "proxy": {
        "pools": {"api": {"servers": ["198.18.1.10:8080"]}},
        "auth": {
            "issuers": {
                "idp": {
                    "issuer": "https://idp.test/",
                    "audience": "orders",
                    "algorithms": ["RS256"],
                }
            }
        },
        "routes": [{"pool": "api", "auth": "jwt"}],
    }
}


def issuer_with(**keys: Any) -> Issuer:
    data = copy.deepcopy(BASE)
    data["proxy"]["auth"]["issuers"]["idp"].update(keys)
    (issuer,) = parse_config(data).proxy.auth.issuers
    return issuer


def test_an_issuer_url_alone_is_discovery_with_the_defaults() -> None:
    issuer = issuer_with()
    assert issuer.jwks_url is None and issuer.key_files == ()
    assert (issuer.jwks_refresh_interval, issuer.jwks_max_age) == (300.0, 600.0)
    assert issuer.ca_file is None
    (config,) = issuer_configs(AuthConfig(issuers=(issuer,)))
    assert config.discovery_url == "https://idp.test/.well-known/openid-configuration"


@pytest.mark.parametrize(
    "algorithms",
    [["PS384"], ["PS512"], ["ES512"], ["RS256", "PS512", "ES512", "EdDSA"]],
)
def test_new_asymmetric_algorithms_are_accepted(algorithms: list[str]) -> None:
    assert issuer_with(algorithms=algorithms).algorithms == tuple(algorithms)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"issuer": "idp"}, "or an http(s) issuer URL to find them by OpenID discovery"),
        ({"issuer": "https://idp.test/?tenant=a"}, "OpenID discovery"),
        ({"jwks_url": "https://user@idp.test/jwks"}, "jwks_url: must be an http(s) URL"),
        ({"jwks_max_age": "4m"}, "jwks_max_age: 240s is shorter than jwks_refresh_interval"),
        ({"jwks_max_age": "1h", "jwks_refresh_interval": "2h"}, "is shorter than"),
        ({"ca_file": "ca.pem"}, "ca_file: must be an absolute path"),
        ({"algorithms": ["HS384"]}, "hmac_secret_file: HS384 needs a secret file"),
        ({"hmac_secret_file": "/s"}, "a secret file needs HS256, HS384 or HS512"),
        (
            {"algorithms": ["HS256"], "hmac_secret_file": "/a", "hs256_secret_file": "/b"},
            "the old name of hmac_secret_file; set one",
        ),
        ({"algorithms": ["HS256"], "hmac_secret_file": "s"}, "must be an absolute path"),
        ({"algorithms": ["HS256K"]}, "is not one of"),
    ],
)
def test_bad_issuer_keys_name_the_key(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        issuer_with(**keys)


@pytest.mark.parametrize("key", ["hmac_secret_file", "hs256_secret_file"])
@pytest.mark.parametrize(
    ("algorithms", "size"),
    [(["HS256"], 32), (["HS384"], 48), (["HS512"], 64), (["HS256", "HS512", "RS256"], 64)],
)
def test_hmac_secret_must_be_as_long_as_the_largest_hash(
    tmp_path: Path, key: str, algorithms: list[str], size: int
) -> None:
    """RFC 7518 3.2; one secret serves every HS* allowed, so the largest hash sets it."""
    secret = tmp_path / "hmac.secret"
    issuer = issuer_with(algorithms=algorithms, **{key: str(secret)})
    auth = AuthConfig(issuers=(issuer,))
    secret.write_bytes(b"k" * (size - 1) + b"\n")  # the newline is stripped
    with pytest.raises(AuthSetupError, match=f"needs {size} bytes or more"):
        issuer_configs(auth)
    secret.write_bytes(b"k" * size + b"\n")
    (config,) = issuer_configs(auth)
    assert config.secret == b"k" * size


def test_ca_file_is_loaded_before_the_workers_start(tmp_path: Path) -> None:
    path = tmp_path / "idp-ca.pem"
    issuer = issuer_with(ca_file=str(path), jwks_max_age="1h")
    auth = AuthConfig(issuers=(issuer,))
    with pytest.raises(AuthSetupError, match=re.escape(str(path))):
        issuer_configs(auth)  # missing
    path.write_text("not a certificate\n")
    with pytest.raises(AuthSetupError, match=re.escape(str(path))):
        issuer_configs(auth)
    trustme.CA().cert_pem.write_to_path(str(path))
    (config,) = issuer_configs(auth)
    assert (config.ca_file, config.jwks_max_age) == (path, 3600.0)
