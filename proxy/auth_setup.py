"""Build the authenticator from the config: API keys, issuers, secrets.

Files are read here, once per worker start, and by the master before it
forks, so a missing or malformed keys file or secret stops the proxy at
start with the file named, instead of failing requests later.
"""

from __future__ import annotations

from stockade.clock import Clock
from stockade.proxy.api_keys import ApiKeyEntry, ApiKeyStore, load_api_keys_file, parse_entries
from stockade.proxy.auth_settings import AuthConfig, Issuer
from stockade.proxy.jwt_auth import IssuerConfig, JwtVerifier, ca_context, hmac_secret_size
from stockade.proxy.stages.auth import Authenticator


class AuthSetupError(ValueError):
    pass


def api_key_entries(config: AuthConfig) -> list[ApiKeyEntry]:
    entries = parse_entries(list(config.api_keys), "proxy.auth.api_keys")
    if config.api_keys_file is not None:
        entries += load_api_keys_file(config.api_keys_file)
    seen: set[str] = set()
    for entry in entries:
        if entry.key_id in seen:
            raise AuthSetupError(f"API key id {entry.key_id} is configured twice")
        seen.add(entry.key_id)
    return entries


def _secret(issuer: Issuer) -> bytes | None:
    path = issuer.secret_file
    if path is None:
        return None
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise AuthSetupError(f"{path}: {exc.strerror}") from None
    # RFC 7518 3.2: as long as the hash output of the largest HS* allowed, or longer
    size = hmac_secret_size(issuer.algorithms)
    if len(secret) < size:
        allowed = "/".join(a for a in issuer.algorithms if a.startswith("HS"))
        raise AuthSetupError(f"{path}: a secret for {allowed} needs {size} bytes or more")
    return secret


def _check_ca_file(issuer: Issuer) -> None:
    """Load the CA file once here, so a bad one stops the proxy at start with its name."""
    if issuer.ca_file is not None:
        try:
            ca_context(issuer.ca_file)
        except ValueError as exc:
            raise AuthSetupError(str(exc)) from None


def _issuer_config(i: Issuer) -> IssuerConfig:
    _check_ca_file(i)
    return IssuerConfig(
        name=i.name,
        issuer=i.issuer,
        audience=i.audience,
        algorithms=i.algorithms,
        jwks_url=i.jwks_url,
        key_files=i.key_files,
        hmac_secret=_secret(i),
        leeway=i.leeway,
        required_claims=i.required_claims,
        jwks_refresh_interval=i.jwks_refresh_interval,
        jwks_timeout=i.jwks_timeout,
        jwks_max_age=i.jwks_max_age,
        ca_file=i.ca_file,
    )


def issuer_configs(config: AuthConfig) -> list[IssuerConfig]:
    return [_issuer_config(i) for i in config.issuers]


def build_authenticator(config: AuthConfig, clock: Clock) -> Authenticator:
    verifier = (
        JwtVerifier(issuer_configs(config), clock, max_token_size=config.max_token_size)
        if config.issuers
        else None
    )
    return Authenticator(config, verifier, ApiKeyStore(api_key_entries(config)))
