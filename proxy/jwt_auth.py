"""JWT verification at the gateway: per-issuer algorithm allowlists, JWKS with rate-limited
refresh, local key files, and a cache of verified tokens keyed by the token's hash.

Security rules, each checked in verify():
- the token's size is checked before anything parses it;
- the issuer (chosen by the unverified "iss", then checked again after the signature) decides
  the algorithms; the token's "alg" only has to be one of them, and the key must be of the
  type that algorithm needs: an RSA key for RS*/PS*, the right EC curve for ES*, an Ed25519/
  Ed448 key for EdDSA, and only the configured secret for HS256. A public key is never used
  as an HMAC secret, so an RS256 -> HS256 key-confusion token fails;
- JWKS keys are used only if their kty, alg, use and key_ops fit a signature check;
- an unknown kid refetches the JWKS at most once per interval per issuer, so a flood of
  random kids cannot hammer the issuer; when the JWKS is down, known keys keep working and
  unknown kids fail closed;
- exp/nbf/iat are checked against the injected clock (PyJWT would read the system clock);
- the token is never logged and never stored: the cache is keyed by its SHA-256.

The token is parsed once (_parse) and its signature checked directly with `cryptography`
on the key objects loaded with the keys (_signature_ok); the claims are then checked by
_check_claims. Both mirror PyJWT 2.x's decode() rule for rule (strict base64url, the
"crit" header, required claims, iss, aud, sub, jti): PyJWT's own parse tests each byte of
each segment in a Python generator and ran twice per token, several times the cost of the
RSA check itself. PyJWT still parses the JWKs (PyJWK), when keys are loaded.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import aiohttp
import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from stockade.clock import Clock, SystemClock

log = logging.getLogger("stockade.proxy.jwt")

ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA", "HS256"})
JWKS_MAX_BYTES = 1 << 20  # a JWKS larger than this is refused, not parsed
MIN_RSA_BITS = 2048

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


@dataclass(frozen=True)
class IssuerConfig:
    name: str  # config name, e.g. "inhouse"
    issuer: str  # expected "iss"
    audience: tuple[str, ...]  # accepted "aud" values (at least one required)
    algorithms: tuple[str, ...]  # allowlist, a subset of ALGORITHMS
    jwks_url: str | None = None
    key_files: tuple[Path, ...] = ()  # PEM public keys, or JWK / JWKS JSON files
    hs256_secret: bytes | None = field(default=None, repr=False)  # only with HS256
    leeway: float = 30.0
    required_claims: tuple[str, ...] = ("exp",)
    jwks_refresh_interval: float = 300.0  # an unknown kid refetches at most this often
    jwks_timeout: float = 2.0

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
        has_hs = "HS256" in self.algorithms
        if has_hs and not self.hs256_secret:
            raise ValueError(f"{where}: HS256 is allowed but no hs256_secret is set")
        if self.hs256_secret is not None:
            if not has_hs:
                raise ValueError(f"{where}: hs256_secret is set but HS256 is not allowed")
            # RFC 7518 3.2: at least the hash size; PyJWT would warn on a shorter one.
            if len(self.hs256_secret) < 32:
                raise ValueError(f"{where}: hs256_secret must be at least 32 bytes")
            if self.hs256_secret.lstrip().startswith(b"-----BEGIN"):
                raise ValueError(f"{where}: hs256_secret looks like a PEM key")
        asymmetric = [a for a in self.algorithms if a != "HS256"]
        if asymmetric and not self.jwks_url and not self.key_files:
            raise ValueError(f"{where}: {asymmetric} need a jwks_url or key_files")
        if self.leeway < 0 or self.jwks_refresh_interval < 0 or self.jwks_timeout <= 0:
            raise ValueError(f"{where}: leeway/refresh interval/timeout must be positive")


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


def key_fits(alg: str, key: PublicKey) -> bool:
    """Whether `key` is the type of key `alg` needs (the token's alg never picks the type)."""
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    if alg == "ES384":
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False  # HS256 uses the configured secret only, never a key from a set


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
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
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
_SHA256, _SHA384 = Prehashed(hashes.SHA256()), Prehashed(hashes.SHA384())
_RSA: dict[str, tuple[Callable[[bytes], Any], padding.AsymmetricPadding, Prehashed]] = {
    "RS256": (hashlib.sha256, padding.PKCS1v15(), _SHA256),
    "RS384": (hashlib.sha384, padding.PKCS1v15(), _SHA384),
    "RS512": (hashlib.sha512, padding.PKCS1v15(), Prehashed(hashes.SHA512())),
    # RFC 7518 3.5: MGF1 with the same hash, a salt as long as the hash output
    "PS256": (
        hashlib.sha256,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=hashes.SHA256.digest_size),
        _SHA256,
    ),
}
# RFC 7518 3.4: the signature is r || s, each exactly the curve's size in bytes
_ECDSA: dict[str, tuple[Callable[[bytes], Any], ec.ECDSA, int]] = {
    "ES256": (hashlib.sha256, ec.ECDSA(_SHA256), 32),
    "ES384": (hashlib.sha384, ec.ECDSA(_SHA384), 48),
}


def _signature_ok(alg: str, key: PublicKey | bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `alg` over `message` with `key`. The key's type must be the one
    `alg` needs (checked again here, whatever the caller did): bytes only for HS256."""
    try:
        if alg == "HS256":
            if not isinstance(key, bytes):
                return False
            return hmac.compare_digest(signature, hmac.digest(key, message, "sha256"))
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

    Symmetric ("oct") keys are never taken from a JWK: HS256 uses the configured secret.
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
    return alg is None or alg in ALGORITHMS


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
        keys, _ = parse_jwks(json.loads(data))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"JWT key file {path}: not PEM, JWK or JWKS ({exc})") from None
    if not keys:
        raise ValueError(f"JWT key file {path}: no key usable for signature checks")
    return keys


@dataclass
class _Issuer:
    config: IssuerConfig
    file_keys: list[_Key] = field(default_factory=list)
    jwks_keys: list[_Key] = field(default_factory=list)
    last_fetch_ns: int | None = None  # monotonic time of the last fetch attempt
    jwks_ok: bool = False  # whether the last fetch succeeded
    inflight: asyncio.Task[None] | None = None

    def all_keys(self) -> list[_Key]:
        return self.file_keys + self.jwks_keys


@dataclass(frozen=True)
class _Cached:
    claims: Mapping[str, Any]
    exp: float
    issuer: str  # the config name, checked against the route's allowed issuers
    key: bytes | None  # fingerprint of the key that verified it (None: the HS256 secret)


class JwtVerifier:
    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        clock: Clock | None = None,
        *,
        max_token_size: int = 8192,
        cache_size: int = 10_000,
    ) -> None:
        names = [c.name for c in issuers]
        if len(set(names)) != len(names):
            raise ValueError(f"JWT issuer names must be unique: {names}")
        for config in issuers:
            config.validate()
        self._issuers = {c.name: _Issuer(c) for c in issuers}
        self._clock: Clock = clock or SystemClock()
        self._max_token_size = max_token_size
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        for state in self._issuers.values():
            for path in state.config.key_files:
                state.file_keys.extend(load_key_file(path))
        self._session = aiohttp.ClientSession()
        fetches = [self._refresh(s) for s in self._issuers.values() if s.config.jwks_url]
        await asyncio.gather(*fetches)  # a failure is logged and the verifier starts anyway

    async def close(self) -> None:
        for state in self._issuers.values():
            if state.inflight is not None:
                state.inflight.cancel()
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
        if alg == "HS256":
            assert config.hs256_secret is not None  # validate() ties HS256 to the secret
            claims = self._decode(parsed, config.hs256_secret, alg, config)
            used: bytes | None = None
        else:
            claims, key = await self._verify_asymmetric(parsed, alg, kid, state)
            used = key.fingerprint
        self._check_times(claims, config, now)

        exp = claims.get("exp")
        frozen = MappingProxyType(claims)
        if isinstance(exp, int | float) and now < exp and self._cache_size > 0:
            self._cache[digest] = _Cached(frozen, float(exp), config.name, used)
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
        if not candidates and state.config.jwks_url:
            await self._refetch(state)
            candidates = self._candidates(state, alg, kid)
        if not candidates:
            if state.config.jwks_url and not state.jwks_ok and not state.all_keys():
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

    @staticmethod
    def _check_times(claims: Mapping[str, Any], config: IssuerConfig, now: float) -> None:
        """PyJWT's exp/nbf/iat rules with the same leeway, but on our clock."""
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise JwtError("malformed", f"claim {name} is not a number")
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if exp is not None and exp <= now - config.leeway:
            raise JwtError("expired", "token expired")
        if nbf is not None and nbf > now + config.leeway:
            raise JwtError("not_yet_valid", "token not yet valid")
        if iat is not None and iat > now + config.leeway:
            raise JwtError("not_yet_valid", "token issued in the future")

    async def _refetch(self, state: _Issuer) -> None:
        """Join a fetch in flight, or start one unless the last was under an interval ago."""
        if state.inflight is None:
            interval_ns = int(state.config.jwks_refresh_interval * 1e9)
            now = self._clock.monotonic_ns()
            if state.last_fetch_ns is not None and now - state.last_fetch_ns < interval_ns:
                return  # rate limit: a flood of random kids costs the issuer nothing
            await self._refresh(state)
        else:
            await asyncio.shield(state.inflight)

    async def _refresh(self, state: _Issuer) -> None:
        state.last_fetch_ns = self._clock.monotonic_ns()
        state.inflight = asyncio.ensure_future(self._fetch(state))
        try:
            await asyncio.shield(state.inflight)
        finally:
            state.inflight = None

    async def _fetch(self, state: _Issuer) -> None:
        config = state.config
        assert config.jwks_url is not None and self._session is not None
        try:
            timeout = aiohttp.ClientTimeout(total=config.jwks_timeout)
            async with self._session.get(config.jwks_url, timeout=timeout) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await response.content.read(JWKS_MAX_BYTES + 1)
            if len(body) > JWKS_MAX_BYTES:
                raise ValueError("JWKS too large")
            keys, skipped = parse_jwks(json.loads(body))
            if not keys:
                # as PyJWKSet does: an empty set is a broken answer, not a retirement of
                # every key, so the known keys stay
                raise ValueError(f"no usable key ({skipped} skipped)")
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
            # Known keys stay in use; unknown kids fail closed until a fetch succeeds.
            # Fetches are rate-limited, so this logs at most once per refresh interval.
            log.warning(
                "JWKS fetch for issuer %s failed: %s; keeping %d known keys",
                config.name,
                str(exc) or type(exc).__name__,
                len(state.jwks_keys),
            )
            state.jwks_ok = False
            return
        state.jwks_keys = keys
        state.jwks_ok = True
        self._forget_retired_keys(state)
        log.info("JWKS for issuer %s: %d usable keys, %d skipped", config.name, len(keys), skipped)

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
