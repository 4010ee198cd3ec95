"""JWT verification at the gateway: per-issuer algorithm allowlists, JWKS (from a jwks_url or
found by OpenID discovery) refreshed periodically, local key files, and a cache of verified
tokens keyed by the token's hash.

Security rules, each checked in verify():
- the token's size is checked before anything parses it;
- the issuer (chosen by the unverified "iss", then checked again after the signature) decides
  the algorithms; the token's "alg" only has to be one of them, and the key must be of the
  type that algorithm needs: an RSA key for RS*/PS*, the right EC curve for ES*, an Ed25519/
  Ed448 key for EdDSA, and only the configured secret for HS*. A public key is never used
  as an HMAC secret, so an RS256 -> HS256 key-confusion token fails;
- JWKS keys are used only if their kty, alg, use and key_ops fit a signature check;
- the JWKS is fetched again every jwks_max_age (sooner if the issuer's Cache-Control
  max-age says so, never more often than jwks_refresh_interval): a key the issuer withdrew
  stops verifying, and the cached tokens it verified are dropped. When a fetch fails the
  known keys stay;
- an unknown kid refetches the JWKS at most once per interval per issuer, so a flood of
  random kids cannot hammer the issuer; when the JWKS is down, known keys keep working and
  unknown kids fail closed;
- exp/nbf/iat are checked against the injected clock (PyJWT would read the system clock);
- the token is never logged and never stored: the cache is keyed by its SHA-256.

The token is parsed once (_parse) and its signature checked directly with `cryptography`
on the key objects loaded with the keys (_signature_ok); the claims are then checked by
_check_claims. Both follow PyJWT 2.x's decode() rule for rule (strict base64url, the
"crit" header, required claims, iss, aud, sub, jti) and are stricter where PyJWT is loose:
JSON with a duplicate name or a non-finite number (NaN, Infinity, 1e400) is malformed, and
exp/nbf/iat must be JSON numbers. PyJWT's own parse tests each byte of each segment in a
Python generator and ran twice per token, several times the cost of the RSA check itself.
PyJWT still parses the JWKs (PyJWK), when keys are loaded.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
import ssl
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn

import aiohttp
import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from multidict import MultiMapping

from stockade.clock import Clock, SystemClock
from stockade.proxy.auth_settings import discovery_url, http_url_scheme

log = logging.getLogger("stockade.proxy.jwt")

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# RFC 7518 3.2: the HMAC key is at least as long as the hash output
HMAC_ALGORITHMS: Mapping[str, tuple[str, int]] = MappingProxyType(
    {"HS256": ("sha256", 32), "HS384": ("sha384", 48), "HS512": ("sha512", 64)}
)
ALGORITHMS = ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS.keys()
JWKS_MAX_BYTES = 1 << 20  # a JWKS larger than this is refused, not parsed
DISCOVERY_MAX_BYTES = 1 << 18  # an OpenID provider configuration is a few KiB
MIN_RSA_BITS = 2048
RETRY_AFTER_FAILURE = 1.0  # s: the least wait before a failed fetch is retried
FAILURE_LOG_INTERVAL = 60.0  # s: a failing issuer logs at most one warning per interval
REFRESH_TICK = 1.0  # s: the refresh task looks at the deadlines at least this often

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

REASONS = (
    "missing",
    "too_large",
    "malformed",
    "bad_algorithm",
    "unknown_kid",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "missing_claim",
    "jwks_unavailable",
)


def hmac_secret_size(algorithms: Collection[str]) -> int:
    """The shortest secret the allowed HS* algorithms accept (0: none allowed)."""
    return max((HMAC_ALGORITHMS[a][1] for a in algorithms if a in HMAC_ALGORITHMS), default=0)


@dataclass(frozen=True)
class IssuerConfig:
    name: str  # config name, e.g. "inhouse"
    issuer: str  # expected "iss"
    audience: tuple[str, ...]  # accepted "aud" values (at least one required)
    algorithms: tuple[str, ...]  # allowlist, a subset of ALGORITHMS
    jwks_url: str | None = None  # None: found by OpenID discovery, unless key_files are given
    key_files: tuple[Path, ...] = ()  # PEM public keys, or JWK / JWKS JSON files
    hmac_secret: bytes | None = field(default=None, repr=False)  # only with HS256/384/512
    hs256_secret: bytes | None = field(default=None, repr=False)  # the old name of hmac_secret
    leeway: float = 30.0
    required_claims: tuple[str, ...] = ("exp",)
    jwks_refresh_interval: float = 300.0  # at most one fetch per interval (unknown kid, max-age)
    jwks_timeout: float = 2.0
    jwks_max_age: float = 600.0  # the JWKS is fetched again when it is this old
    ca_file: Path | None = None  # CAs for an https JWKS / discovery; None: the system's

    @property
    def secret(self) -> bytes | None:
        return self.hmac_secret if self.hmac_secret is not None else self.hs256_secret

    @property
    def discovery_url(self) -> str | None:
        """Where the JWKS URL is looked up, when neither it nor key files are configured."""
        if self.jwks_url is not None or self.key_files:
            return None
        if not ASYMMETRIC_ALGORITHMS.intersection(self.algorithms):
            return None
        return discovery_url(self.issuer)

    def validate(self) -> None:
        """Raise ValueError naming the issuer and the field at fault."""
        where = f"issuer {self.name!r}"
        if not self.issuer:
            raise ValueError(f"{where}: 'issuer' is empty")
        if not self.audience or not all(self.audience):
            raise ValueError(f"{where}: at least one non-empty audience is required")
        if not self.algorithms:
            raise ValueError(f"{where}: 'algorithms' is empty")
        unknown = sorted(set(self.algorithms) - ALGORITHMS)
        if unknown:
            raise ValueError(
                f"{where}: algorithms {unknown} not supported; use {sorted(ALGORITHMS)}"
            )
        if self.hmac_secret is not None and self.hs256_secret is not None:
            raise ValueError(f"{where}: set hmac_secret or its old name hs256_secret, not both")
        hmac_algs = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        secret = self.secret
        if hmac_algs and not secret:
            raise ValueError(f"{where}: {hmac_algs} allowed but no hmac_secret is set")
        if secret is not None:
            if not hmac_algs:
                raise ValueError(f"{where}: hmac_secret is set but no HS* algorithm is allowed")
            # RFC 7518 3.2: at least the hash size; PyJWT would warn on a shorter one.
            size = hmac_secret_size(hmac_algs)
            if len(secret) < size:
                raise ValueError(
                    f"{where}: hmac_secret must be at least {size} bytes for {hmac_algs}"
                )
            if secret.lstrip().startswith(b"-----BEGIN"):
                raise ValueError(f"{where}: hmac_secret looks like a PEM key")
        asymmetric = [a for a in self.algorithms if a in ASYMMETRIC_ALGORITHMS]
        if asymmetric and not self.jwks_url and not self.key_files and not self.discovery_url:
            raise ValueError(
                f"{where}: {asymmetric} need a jwks_url, key_files, or an http(s) issuer URL "
                "to find the JWKS by OpenID discovery"
            )
        if self.jwks_url is not None and http_url_scheme(self.jwks_url) is None:
            raise ValueError(f"{where}: jwks_url must be an http(s) URL")
        if self.leeway < 0 or self.jwks_refresh_interval < 0 or self.jwks_timeout <= 0:
            raise ValueError(f"{where}: leeway/refresh interval/timeout must be positive")
        if self.jwks_max_age < self.jwks_refresh_interval or self.jwks_max_age <= 0:
            raise ValueError(
                f"{where}: jwks_max_age ({self.jwks_max_age:g}s) must be positive and at least "
                f"jwks_refresh_interval ({self.jwks_refresh_interval:g}s)"
            )


class JwtError(Exception):
    """A refused token. `reason` is a stable code; `description` is safe to send back."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(f"{reason}: {description}")
        self.reason = reason
        self.description = description


@dataclass(frozen=True)
class _Key:
    kid: str | None
    key: PublicKey
    alg: str | None  # the JWK's "alg", if it named one; the token's alg must equal it
    fingerprint: bytes  # DER of the public key: tells whether a JWKS still has this key


def _make_key(kid: str | None, key: PublicKey, alg: str | None) -> _Key:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        # as PyJWT did (a warning, not a refusal), once per key instead of once per token
        log.warning(
            "JWT key %s: the RSA key is %d bits, below the recommended %d (NIST SP 800-131A)",
            kid if kid is not None else "(no kid)",
            key.key_size,
            MIN_RSA_BITS,
        )
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _Key(kid, key, alg, der)


_CURVES: Mapping[str, type[ec.EllipticCurve]] = MappingProxyType(
    {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
)


def key_fits(alg: str, key: PublicKey) -> bool:
    """Whether `key` is the type of key `alg` needs (the token's alg never picks the type)."""
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    curve = _CURVES.get(alg)
    if curve is not None:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, curve)
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False  # HS* use the configured secret only, never a key from a set


# --- JSON: strict ---------------------------------------------------------------------


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 would become inf: a token that never expires
        raise ValueError("number out of range")
    return value


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # two "exp"s: never pick one
        raise ValueError("duplicate name in a JSON object")
    return obj


# Python's json takes NaN/Infinity (not JSON, RFC 8259 6) and keeps the last of duplicate
# names (RFC 7515 5.2 and RFC 7519 7.2: refuse them, or take the last; a gateway refuses).
_STRICT_JSON = json.JSONDecoder(
    object_pairs_hook=_unique_names, parse_float=_finite_float, parse_constant=_refuse_constant
)


def strict_json(data: bytes) -> Any:
    """JSON as JOSE sends it: UTF-8, no duplicate names, finite numbers; ValueError else."""
    try:
        return _STRICT_JSON.decode(data.decode("utf-8"))  # a bad byte is a ValueError too
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


# --- the token: one strict parse --------------------------------------------------------

_MALFORMED = ("malformed", "token is not a well-formed JWT")
_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL_TO_STD = bytes.maketrans(b"-_", b"+/")
_B64_VALUE = bytes(_B64URL_ALPHABET.index(c) if c in _B64URL_ALPHABET else 0 for c in range(256))
_SUPPORTED_CRIT = frozenset({"b64"})  # what PyJWT understands (and b64=false is refused below)


class _Parsed(NamedTuple):
    """A token taken apart, nothing verified yet; the claims are exactly the signed bytes'."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes  # header.payload, as sent: what the signature covers
    signature: bytes


def _b64url(segment: bytes) -> bytes:
    """PyJWS._decode_base64url_segment without a Python step per byte: base64url with an
    optional '=' padding of at most 2 that makes the length a multiple of 4; no byte outside
    the alphabet; canonical (the bits the last character carries beyond the data are zero,
    as PyJWT's re-encoding check requires). ValueError otherwise."""
    stripped = segment.rstrip(b"=")
    pad = len(segment) - len(stripped)
    tail = len(stripped) % 4  # 0: whole groups; 2: one byte more; 3: two bytes more
    if pad > 2 or (pad and len(segment) % 4) or tail == 1:
        raise ValueError("bad padding")
    if stripped.translate(None, _B64URL_ALPHABET):  # what is left is outside the alphabet
        raise ValueError("not base64url")
    if tail and _B64_VALUE[stripped[-1]] & (0x0F if tail == 2 else 0x03):
        raise ValueError("not canonical base64url")
    try:
        return binascii.a2b_base64(stripped.translate(_B64URL_TO_STD) + b"=" * (-tail % 4))
    except binascii.Error:  # not expected after the checks above
        raise ValueError("not base64url") from None


def _json_object(data: bytes) -> dict[str, Any]:
    value = strict_json(data)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _crit_ok(header: Mapping[str, Any]) -> bool:
    """PyJWS._validate_crit: a non-empty list of names, each understood and present."""
    crit = header["crit"]
    if not isinstance(crit, list) or not crit:
        return False
    return all(isinstance(n, str) and n in _SUPPORTED_CRIT and n in header for n in crit)


def _parse(token: str) -> _Parsed:
    """The one parse of a token, as strict as PyJWT's (JwtError "malformed" otherwise)."""
    try:
        raw = token.encode("ascii")  # a JWT is ASCII; anything else cannot be base64url
        signing_input, signature_segment = raw.rsplit(b".", 1)
        header_segment, payload_segment = signing_input.split(b".", 1)
        header = _json_object(_b64url(header_segment))
        # b64=false (RFC 7797, a detached or unencoded payload) is never accepted: PyJWT
        # needs the payload passed separately for it, which the gateway never does
        if header.get("b64", True) is False:
            raise ValueError("b64=false")
        if "kid" in header and not isinstance(header["kid"], str):
            raise ValueError("kid is not a string")
        if "crit" in header and not _crit_ok(header):
            raise ValueError("unsupported crit")
        claims = _json_object(_b64url(payload_segment))
        signature = _b64url(signature_segment)
    except ValueError:  # UnicodeEncodeError and a failed unpacking are ValueErrors too
        raise JwtError(*_MALFORMED) from None
    return _Parsed(header, claims, signing_input, signature)


# --- the signature: `cryptography` on the loaded key objects ----------------------------

# The message is hashed with hashlib and the digest checked as Prehashed: the same check,
# without the Python-level hash object `cryptography` would make for every call.
_SHA256, _SHA384, _SHA512 = (
    Prehashed(h) for h in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512())
)


def _pss(hash_: hashes.HashAlgorithm) -> padding.PSS:
    # RFC 7518 3.5: MGF1 with the same hash, a salt as long as the hash output
    return padding.PSS(mgf=padding.MGF1(hash_), salt_length=hash_.digest_size)


_RSA: dict[str, tuple[Callable[[bytes], Any], padding.AsymmetricPadding, Prehashed]] = {
    "RS256": (hashlib.sha256, padding.PKCS1v15(), _SHA256),
    "RS384": (hashlib.sha384, padding.PKCS1v15(), _SHA384),
    "RS512": (hashlib.sha512, padding.PKCS1v15(), _SHA512),
    "PS256": (hashlib.sha256, _pss(hashes.SHA256()), _SHA256),
    "PS384": (hashlib.sha384, _pss(hashes.SHA384()), _SHA384),
    "PS512": (hashlib.sha512, _pss(hashes.SHA512()), _SHA512),
}
# RFC 7518 3.4: the signature is r || s, each exactly the curve's size in bytes (P-521: 66)
_ECDSA: dict[str, tuple[Callable[[bytes], Any], ec.ECDSA, int]] = {
    "ES256": (hashlib.sha256, ec.ECDSA(_SHA256), 32),
    "ES384": (hashlib.sha384, ec.ECDSA(_SHA384), 48),
    "ES512": (hashlib.sha512, ec.ECDSA(_SHA512), 66),
}
_HMAC_HASH = {alg: name for alg, (name, _) in HMAC_ALGORITHMS.items()}


def _signature_ok(alg: str, key: PublicKey | bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `alg` over `message` with `key`. The key's type must be the one
    `alg` needs (checked again here, whatever the caller did): bytes only for HS*."""
    try:
        hmac_hash = _HMAC_HASH.get(alg)
        if hmac_hash is not None:
            if not isinstance(key, bytes):
                return False
            return hmac.compare_digest(signature, hmac.digest(key, message, hmac_hash))
        if isinstance(key, bytes) or not key_fits(alg, key):
            return False
        if alg in _RSA:
            assert isinstance(key, rsa.RSAPublicKey)
            digest, pad, prehashed = _RSA[alg]
            key.verify(signature, digest(message).digest(), pad, prehashed)
        elif alg in _ECDSA:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            digest, ecdsa, size = _ECDSA[alg]
            if len(signature) != 2 * size:  # raw r || s only: never DER, never shortened
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), digest(message).digest(), ecdsa)
        elif alg == "EdDSA":
            assert isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
            key.verify(signature, message)
        else:
            return False
    except InvalidSignature:
        return False
    return True


# --- the claims: PyJWT's decode() checks, after the signature ---------------------------


def _check_claims(claims: Mapping[str, Any], config: IssuerConfig) -> None:
    """What jwt.decode(issuer=, audience=, options={"require": ...}) checked, in its order:
    required claims, iss, aud, sub, jti (exp/nbf/iat: JwtVerifier._check_times)."""
    for name in config.required_claims:
        if claims.get(name) is None:
            raise JwtError("missing_claim", "a required claim is missing")
    if "iss" not in claims:
        raise JwtError("missing_claim", "a required claim is missing")
    if not isinstance(claims["iss"], str) or claims["iss"] != config.issuer:
        raise JwtError("wrong_issuer", "issuer not accepted here")
    aud = claims.get("aud")
    if not aud:  # absent, null, "" or []
        raise JwtError("missing_claim", "a required claim is missing")
    if isinstance(aud, str):
        aud = [aud]
    if not isinstance(aud, list) or not all(isinstance(a, str) for a in aud):
        raise JwtError("wrong_audience", "audience not accepted")
    if all(wanted not in aud for wanted in config.audience):
        raise JwtError("wrong_audience", "audience not accepted")
    for name in ("sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise JwtError("malformed", "token is not valid")


def _check_times(claims: Mapping[str, Any], leeway: float, now: float) -> int | None:
    """PyJWT's exp/nbf/iat rules with the same leeway, but on our clock; returns exp in
    whole seconds (None: no exp). PyJWT compares int(value): so does exp here (1.9 s past
    exp is 1 s past), while nbf and iat are compared as given, which is never looser than
    PyJWT's int() (with a clock past 1970). Only JSON numbers count (PyJWT takes "123")."""
    for name in ("exp", "nbf", "iat"):
        if name in claims:
            value = claims[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise JwtError("malformed", f"claim {name} is not a number")
    exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
    if exp is not None:
        exp = math.floor(exp)
        if exp <= now - leeway:
            raise JwtError("expired", "token expired")
    if nbf is not None and nbf > now + leeway:
        raise JwtError("not_yet_valid", "token not yet valid")
    if iat is not None and iat > now + leeway:
        raise JwtError("not_yet_valid", "token issued in the future")
    return exp


def _public(key: object) -> PublicKey | None:
    """The public half of a key object from PyJWK or a PEM file; None for anything else."""
    if isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        key = key.public_key()
    if isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        return key
    return None


def jwk_usable(jwk: Mapping[str, Any]) -> bool:
    """PyJWT does not filter on use/key_ops: keep only keys meant for verifying signatures.

    Symmetric ("oct") keys are never taken from a JWK: HS* use the configured secret.
    """
    if jwk.get("kty") not in ("RSA", "EC", "OKP"):
        return False
    if "use" in jwk and jwk["use"] != "sig":
        return False
    if "key_ops" in jwk:
        ops = jwk["key_ops"]
        if not isinstance(ops, list) or "verify" not in ops:
            return False
    alg = jwk.get("alg")
    return alg is None or (isinstance(alg, str) and alg in ASYMMETRIC_ALGORITHMS)


def parse_jwks(document: Any) -> tuple[list[_Key], int]:
    """The usable keys of a JWKS (or of one JWK) and how many were skipped."""
    if isinstance(document, dict) and "keys" in document:
        entries = document["keys"]
        if not isinstance(entries, list):
            raise ValueError("'keys' is not a list")
    elif isinstance(document, dict):
        entries = [document]
    else:
        raise ValueError("not a JWK or JWKS object")
    keys: list[_Key] = []
    skipped = 0
    for entry in entries:
        if not isinstance(entry, dict) or not jwk_usable(entry):
            skipped += 1
            continue
        # Without an "alg", PyJWK infers one from kty/crv and has none for Ed448.
        hint = "EdDSA" if entry.get("kty") == "OKP" and "alg" not in entry else None
        try:
            parsed = jwt.PyJWK(entry, hint)
        except jwt.PyJWTError:
            skipped += 1
            continue
        public = _public(parsed.key)
        kid = entry.get("kid")
        if public is None or (kid is not None and not isinstance(kid, str)):
            skipped += 1
            continue
        keys.append(_make_key(kid, public, entry.get("alg")))
    return keys, skipped


def load_key_file(path: Path) -> list[_Key]:
    """Keys from a PEM public key or a JWK/JWKS JSON file; ValueError names the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"JWT key file {path}: {exc.strerror}") from None
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            loaded = serialization.load_pem_public_key(data)
        except ValueError:
            raise ValueError(
                f"JWT key file {path}: not a PEM public key (private keys do not belong here)"
            ) from None
        public = _public(loaded)
        if public is None:
            raise ValueError(f"JWT key file {path}: unsupported key type")
        return [_make_key(None, public, None)]
    try:
        keys, _ = parse_jwks(strict_json(data))
    except ValueError as exc:
        raise ValueError(f"JWT key file {path}: not PEM, JWK or JWKS ({exc})") from None
    if not keys:
        raise ValueError(f"JWT key file {path}: no key usable for signature checks")
    return keys


def ca_context(ca_file: Path) -> ssl.SSLContext:
    """A client TLS context that trusts the CAs in `ca_file` only; ValueError names it."""
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except OSError as exc:  # ssl.SSLError (not PEM, no certificate) is an OSError too
        raise ValueError(f"JWKS CA file {ca_file}: {exc.strerror or exc}") from None


# --- fetching: the JWKS and the OpenID provider configuration ---------------------------


async def read_body(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (ValueError past it). StreamReader.read(n)
    returns what has arrived so far: one call would return a prefix of a body sent chunked,
    in several TCP segments or in several TLS records."""
    chunks: list[bytes] = []
    total = 0
    while chunk := await content.read(limit + 1 - total):  # never more than one byte past
        total += len(chunk)
        if total > limit:
            raise ValueError(f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


_DELTA_SECONDS = re.compile(r"[0-9]+")


def _delta_seconds(text: str) -> int | None:
    """RFC 9111 1.2.2 delta-seconds; a value too large for 31 bits is 2**31."""
    if not _DELTA_SECONDS.fullmatch(text):
        return None
    return int(text) if len(text) <= 10 else 2**31


def cache_lifetime(headers: MultiMapping[str]) -> float | None:
    """Seconds a response stays fresh by its Cache-Control (RFC 9111 5.2.2.1): max-age less
    the Age. 0 for no-store, no-cache, or a max-age or Age that is repeated or not a number
    (RFC 9111 4.2.1: such a response is stale); None when there is no max-age."""
    max_ages: list[str] = []
    for value in headers.getall("Cache-Control", ()):
        for directive in value.split(","):
            name, _, argument = directive.partition("=")
            name = name.strip().lower()
            if name in ("no-store", "no-cache"):
                return 0.0
            if name == "max-age":
                argument = argument.strip()
                if len(argument) >= 2 and argument[0] == argument[-1] == '"':
                    argument = argument[1:-1]  # RFC 9111 5.2: accept the quoted form too
                max_ages.append(argument)
    if not max_ages:
        return None
    max_age = _delta_seconds(max_ages[0]) if len(max_ages) == 1 else None
    ages = headers.getall("Age", ())
    age = _delta_seconds(ages[0].strip()) if len(ages) == 1 else (0 if not ages else None)
    if max_age is None or age is None:
        return 0.0
    return float(max(0, max_age - age))


def refresh_delay(config: IssuerConfig, lifetime: float | None) -> float:
    """Seconds until the next fetch after a good one: the issuer's lifetime for the JWKS,
    within [jwks_refresh_interval, jwks_max_age]; jwks_max_age when it gave none."""
    wanted = config.jwks_max_age if lifetime is None else lifetime
    return min(max(wanted, config.jwks_refresh_interval), config.jwks_max_age)


def jwks_uri_of(document: Any, issuer: str) -> str:
    """The jwks_uri of an OpenID provider configuration, checked as OpenID Connect
    Discovery 1.0 section 4.3 says: its "issuer" is exactly the configured one. The JWKS of
    an https issuer is fetched over https only; ValueError otherwise."""
    if not isinstance(document, dict):
        raise ValueError("the provider configuration is not a JSON object")
    if document.get("issuer") != issuer:
        named = str(document.get("issuer"))[:200]
        raise ValueError(f"the provider configuration is for issuer {named!r}, not {issuer!r}")
    uri = document.get("jwks_uri")
    if not isinstance(uri, str) or not uri:
        raise ValueError("the provider configuration has no jwks_uri")
    scheme = http_url_scheme(uri)
    if scheme is None:
        raise ValueError("jwks_uri is not an absolute http(s) URL")
    if scheme != "https" and http_url_scheme(issuer) == "https":
        raise ValueError("jwks_uri is not https, and the issuer is")
    return uri


def _usable_keys(body: bytes) -> tuple[list[_Key], int]:
    keys, skipped = parse_jwks(strict_json(body))
    if not keys:
        # as PyJWKSet does: an empty set is a broken answer, not a retirement of every
        # key, so the known keys stay
        raise ValueError(f"no usable key ({skipped} skipped)")
    return keys, skipped


@dataclass
class _Issuer:
    config: IssuerConfig
    remote: bool = False  # keys from a JWKS: a jwks_url, or one found by discovery
    secret: bytes | None = field(default=None, repr=False)  # the HS* secret
    jwks_url: str | None = None  # configured, or found by discovery (None: look it up)
    ssl: ssl.SSLContext | bool = True  # True: aiohttp's default, the system's CAs
    file_keys: list[_Key] = field(default_factory=list)
    jwks_keys: list[_Key] = field(default_factory=list)
    last_fetch_ns: int | None = None  # monotonic time of the last fetch attempt
    next_fetch_ns: int | None = None  # when the refresh task fetches again
    jwks_ok: bool = False  # whether the last fetch succeeded
    inflight: asyncio.Task[None] | None = None
    last_warning_ns: int | None = None  # the last failure logged as a warning
    unlogged_failures: int = 0  # failures since then, logged at debug only

    def all_keys(self) -> list[_Key]:
        return self.file_keys + self.jwks_keys


@dataclass(frozen=True)
class _Cached:
    claims: Mapping[str, Any]
    exp: int
    issuer: str  # the config name, checked against the route's allowed issuers
    key: bytes | None  # fingerprint of the key that verified it (None: the HMAC secret)


class JwtVerifier:
    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        clock: Clock | None = None,
        *,
        max_token_size: int = 8192,
        cache_size: int = 10_000,
        background_refresh: bool = True,
    ) -> None:
        """`background_refresh`: run the periodic JWKS refresh as a task from start() to
        close(); without it refresh_due() does it when called (the tests, on a fake clock)."""
        names = [c.name for c in issuers]
        if len(set(names)) != len(names):
            raise ValueError(f"JWT issuer names must be unique: {names}")
        for config in issuers:
            config.validate()
        self._issuers = {
            c.name: _Issuer(
                c,
                remote=c.jwks_url is not None or c.discovery_url is not None,
                secret=c.secret,
                jwks_url=c.jwks_url,
            )
            for c in issuers
        }
        self._clock: Clock = clock or SystemClock()
        self._max_token_size = max_token_size
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._background_refresh = background_refresh
        self._refresh_task: asyncio.Task[None] | None = None
        self.fetch_failures: Counter[str] = Counter()  # failed JWKS fetches, by issuer name

    async def start(self) -> None:
        for state in self._issuers.values():
            for path in state.config.key_files:
                state.file_keys.extend(load_key_file(path))
            if state.config.ca_file is not None:
                state.ssl = ca_context(state.config.ca_file)
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), headers={"Accept": "application/json"}
        )
        remote = [s for s in self._issuers.values() if s.remote]
        await asyncio.gather(*(self._join_or_fetch(s) for s in remote))  # failures: logged
        if remote and self._background_refresh:
            self._refresh_task = asyncio.create_task(self._refresh_forever(), name="jwks-refresh")

    async def close(self) -> None:
        tasks = [self._refresh_task, *(s.inflight for s in self._issuers.values())]
        running = [t for t in tasks if t is not None]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)  # each fetch has a timeout
        self._refresh_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def verify(self, token: str, issuers: Collection[str] | None = None) -> Mapping[str, Any]:
        """The verified claims, or JwtError. `issuers`: the config names this route accepts."""
        if self._session is None:
            raise RuntimeError("JwtVerifier.verify() before start() or after close()")
        if not token:
            raise JwtError("missing", "no bearer token")
        # Before any parsing: an attacker's 1 MB token costs a len(), nothing more.
        if len(token) > self._max_token_size:
            raise JwtError("too_large", "token too large")

        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock.wall()
        cached = self._cache.get(digest)
        if cached is not None:
            if now < cached.exp:  # never used at or past exp, whatever the leeway
                if issuers is not None and cached.issuer not in issuers:
                    raise JwtError("wrong_issuer", "issuer not accepted here")
                return cached.claims
            del self._cache[digest]

        parsed = _parse(token)  # the only parse: selection and checks use its result
        alg, kid, state = self._select_issuer(parsed, issuers)
        config = state.config
        if alg in HMAC_ALGORITHMS:
            assert state.secret is not None  # validate() ties HS* to the secret
            claims = self._decode(parsed, state.secret, alg, config)
            used: bytes | None = None
        else:
            claims, key = await self._verify_asymmetric(parsed, alg, kid, state)
            used = key.fingerprint
        exp = _check_times(claims, config.leeway, now)

        frozen = MappingProxyType(claims)
        if exp is not None and now < exp and self._cache_size > 0:
            self._cache[digest] = _Cached(frozen, exp, config.name, used)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)  # the oldest entry
        return frozen

    def _select_issuer(
        self, parsed: _Parsed, allowed: Collection[str] | None
    ) -> tuple[str, str | None, _Issuer]:
        """alg, kid and issuer from the unverified token; only to pick the checks to run.

        Signature not checked yet: "iss" only selects the issuer config, and _decode checks
        it again, signed, against that config."""
        header = parsed.header
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise JwtError("bad_algorithm", "algorithm not allowed")
        if kid is not None and not isinstance(kid, str):
            raise JwtError("malformed", "kid is not a string")
        iss = parsed.claims.get("iss")
        for state in self._issuers.values():
            if state.config.issuer == iss and (allowed is None or state.config.name in allowed):
                break
        else:
            raise JwtError("wrong_issuer", "issuer not accepted here")
        # The allowlist is the issuer's, never the token's.
        if alg not in state.config.algorithms:
            raise JwtError("bad_algorithm", "algorithm not allowed")
        return alg, kid, state

    async def _verify_asymmetric(
        self, parsed: _Parsed, alg: str, kid: str | None, state: _Issuer
    ) -> tuple[dict[str, Any], _Key]:
        candidates = self._candidates(state, alg, kid)
        if not candidates and state.remote:
            await self._refetch(state)
            candidates = self._candidates(state, alg, kid)
        if not candidates:
            if state.remote and not state.jwks_ok and not state.all_keys():
                # never had a key at all: the JWKS endpoint is the problem, not the token
                raise JwtError("jwks_unavailable", "issuer keys unavailable")
            raise JwtError("unknown_kid", "no key for this token")
        last: JwtError | None = None
        for key in candidates:
            try:
                return self._decode(parsed, key.key, alg, state.config), key
            except JwtError as exc:
                if exc.reason != "bad_signature":
                    raise  # the signature matched; a claim is wrong
                last = exc
        assert last is not None
        raise last

    @staticmethod
    def _candidates(state: _Issuer, alg: str, kid: str | None) -> list[_Key]:
        # A token without a kid may be checked against every key that fits its
        # alg; a key without a kid (a PEM file) against any token's kid.
        return [
            k
            for k in state.all_keys()
            if (kid is None or k.kid is None or k.kid == kid)
            and (k.alg is None or k.alg == alg)
            and key_fits(alg, k.key)
        ]

    def _decode(
        self, parsed: _Parsed, key: PublicKey | bytes, alg: str, config: IssuerConfig
    ) -> dict[str, Any]:
        """The signature path: one algorithm, one key object; iss, aud and required claims."""
        if not _signature_ok(alg, key, parsed.signing_input, parsed.signature):
            raise JwtError("bad_signature", "signature verification failed")
        _check_claims(parsed.claims, config)
        return parsed.claims

    # --- keeping the keys fresh ----------------------------------------------------------

    async def refresh_due(self) -> None:
        """Fetch the JWKS of each remote issuer whose next fetch time has come (what the
        refresh task does on each tick)."""
        now = self._clock.monotonic_ns()
        due = [
            s
            for s in self._issuers.values()
            if s.remote and (s.next_fetch_ns is None or now >= s.next_fetch_ns)
        ]
        await asyncio.gather(*(self._join_or_fetch(s) for s in due))

    async def _refresh_forever(self) -> None:
        """The refresh task: fetch what is due, sleep until the next deadline (at most a
        tick, so a clock that jumps is noticed), until close() cancels it."""
        while True:
            try:
                await self.refresh_due()  # _fetch logs and counts every fetch failure
            except Exception:  # a bug, then: keep the task alive, and refreshing
                log.exception("JWKS refresh task: unexpected error")
                await asyncio.sleep(REFRESH_TICK)
            await asyncio.sleep(self._seconds_to_next_fetch())

    def _seconds_to_next_fetch(self) -> float:
        now = self._clock.monotonic_ns()
        deadlines = [s.next_fetch_ns for s in self._issuers.values() if s.next_fetch_ns is not None]
        if not deadlines:
            return REFRESH_TICK
        return min(max((min(deadlines) - now) / 1e9, 0.0), REFRESH_TICK)

    async def _refetch(self, state: _Issuer) -> None:
        """Join a fetch in flight, or start one unless the last was under an interval ago."""
        if state.inflight is None:
            interval_ns = int(state.config.jwks_refresh_interval * 1e9)
            now = self._clock.monotonic_ns()
            if state.last_fetch_ns is not None and now - state.last_fetch_ns < interval_ns:
                return  # rate limit: a flood of random kids costs the issuer nothing
        await self._join_or_fetch(state)

    async def _join_or_fetch(self, state: _Issuer) -> None:
        """Wait for the issuer's fetch in flight, starting one if there is none. A waiter
        that is cancelled (a client gone) leaves the fetch running for the others."""
        task = state.inflight
        if task is None:
            state.last_fetch_ns = self._clock.monotonic_ns()
            task = state.inflight = asyncio.ensure_future(self._fetch(state))
            task.add_done_callback(lambda done: self._fetch_done(state, done))
        await asyncio.shield(task)

    @staticmethod
    def _fetch_done(state: _Issuer, task: asyncio.Task[None]) -> None:
        if state.inflight is task:
            state.inflight = None

    async def _fetch(self, state: _Issuer) -> None:
        """One fetch of the issuer's JWKS (after discovery if needed). Any failure keeps the
        known keys, and is counted and logged; the next try is after jwks_refresh_interval."""
        config = state.config
        try:
            url = state.jwks_url or await self._discover(state)
            body, headers = await self._get(state, url, JWKS_MAX_BYTES)
            # parsing a large set (JSON, then each key) must not hold up the requests
            keys, skipped = await asyncio.to_thread(_usable_keys, body)
        except Exception as exc:  # whatever it was, the known keys stay and refreshing goes on
            if config.jwks_url is None:
                state.jwks_url = None  # discovered: look it up again next time
            self._failed(state, str(exc) or type(exc).__name__)
            retry = max(config.jwks_refresh_interval, RETRY_AFTER_FAILURE)
            state.next_fetch_ns = self._clock.monotonic_ns() + int(retry * 1e9)
            return
        before = {k.fingerprint for k in state.jwks_keys}
        state.jwks_keys = keys
        recovered = not state.jwks_ok
        state.jwks_ok = True
        state.last_warning_ns, state.unlogged_failures = None, 0
        delay = refresh_delay(config, cache_lifetime(headers))
        state.next_fetch_ns = self._clock.monotonic_ns() + int(delay * 1e9)
        self._forget_retired_keys(state)
        changed = before != {k.fingerprint for k in keys}
        log.log(
            logging.INFO if changed or recovered else logging.DEBUG,
            "JWKS for issuer %s: %d usable keys, %d skipped; next fetch in %.0fs",
            config.name,
            len(keys),
            skipped,
            delay,
        )

    async def _discover(self, state: _Issuer) -> str:
        config = state.config
        url = config.discovery_url
        assert url is not None  # remote, without a jwks_url
        body, _ = await self._get(state, url, DISCOVERY_MAX_BYTES)
        state.jwks_url = jwks_uri_of(strict_json(body), config.issuer)
        log.info("OpenID discovery for issuer %s: JWKS at %s", config.name, state.jwks_url)
        return state.jwks_url

    async def _get(self, state: _Issuer, url: str, limit: int) -> tuple[bytes, MultiMapping[str]]:
        """The body (whole, at most `limit` bytes) and headers of a 200 answer to a GET."""
        assert self._session is not None
        seconds = state.config.jwks_timeout
        async with (
            asyncio.timeout(seconds),  # the whole exchange, a body that trickles too
            self._session.get(
                url,
                ssl=state.ssl,
                allow_redirects=False,  # a redirect could lead anywhere, https to http too
                timeout=aiohttp.ClientTimeout(total=seconds),
            ) as response,
        ):
            if response.status != 200:
                raise ValueError(f"HTTP {response.status} from {url}")
            length = response.content_length
            if length is not None and length > limit:
                raise ValueError(f"{url}: body of {length} bytes, over {limit}")
            return await read_body(response.content, limit), response.headers

    def _failed(self, state: _Issuer, why: str) -> None:
        """Count a failed fetch, and log it: one warning per FAILURE_LOG_INTERVAL at most."""
        name = state.config.name
        self.fetch_failures[name] += 1
        state.jwks_ok = False
        now = self._clock.monotonic_ns()
        last = state.last_warning_ns
        if last is not None and now - last < FAILURE_LOG_INTERVAL * 1e9:
            state.unlogged_failures += 1
            log.debug("JWKS fetch for issuer %s failed again: %s", name, why)
            return
        also = state.unlogged_failures
        log.warning(
            "JWKS fetch for issuer %s failed: %s; keeping %d known keys%s",
            name,
            why,
            len(state.jwks_keys),
            f" ({also} more failures since the last warning)" if also else "",
        )
        state.last_warning_ns, state.unlogged_failures = now, 0

    def _forget_retired_keys(self, state: _Issuer) -> None:
        """Drop cached tokens verified by a key the issuer no longer publishes (a key is
        usually retired because it leaked): they are checked again, and then refused."""
        live = {k.fingerprint for k in state.all_keys()}
        retired = [
            digest
            for digest, entry in self._cache.items()
            if entry.issuer == state.config.name and entry.key is not None and entry.key not in live
        ]
        for digest in retired:
            del self._cache[digest]
        if retired:
            log.info(
                "issuer %s: %d cached tokens dropped (their key was retired)",
                state.config.name,
                len(retired),
            )
