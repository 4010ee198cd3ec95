"""The direct path of JwtVerifier: its own parse, `cryptography` signature checks and claim
checks, each held to what PyJWT's decode() did (and to RFC 7518 where PyJWT follows it)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm
from jwt_issuer import (
    ASYMMETRIC,
    AUD,
    HMAC,
    ISS,
    SECRET,
    b64,
    claims,
    inhouse,
    issuer_env,
    kind_for,
    mint,
    private_key,
    public_jwk,
    public_pem,
)

from stockade.clock import FakeClock
from stockade.proxy import jwt_auth
from stockade.proxy.jwt_auth import JwtError, JwtVerifier


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def reason(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(JwtError) as info:
        await verifier.verify(token)
    return info.value.reason


def signed(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A token with exactly this header, signed by `sign` over the signing input."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def rsa_signer(
    pad: padding.AsymmetricPadding, hash_: hashes.HashAlgorithm, kind: str = "rsa"
) -> Callable[[bytes], bytes]:
    key = private_key(kind)
    assert isinstance(key, rsa.RSAPrivateKey)
    return lambda message: key.sign(message, pad, hash_)


def pss(salt_length: int, mgf_hash: hashes.HashAlgorithm | None = None) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(mgf_hash or hashes.SHA256()), salt_length=salt_length)


def ecdsa_parts(kind: str, message: bytes, hash_: hashes.HashAlgorithm) -> tuple[int, int, bytes]:
    key = private_key(kind)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.sign(message, ec.ECDSA(hash_))
    r, s = decode_dss_signature(der)
    return r, s, der


# --- signatures ----------------------------------------------------------------------


def test_ecdsa_signature_must_be_raw_r_s_of_the_curve_size() -> None:
    """RFC 7518 3.4: r || s, each exactly 32 bytes for ES256 (48 for ES384). A DER
    signature, or r || s with a number padded by a zero byte, carries the right numbers
    and would pass a check that converts without the exact length test."""

    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            header = {"alg": "ES256", "kid": "k1"}
            payload = claims(clock)
            for name, shape in [
                ("raw r || s", lambda r, s, der: r.to_bytes(32, "big") + s.to_bytes(32, "big")),
                ("DER", lambda r, s, der: der),
                ("s padded", lambda r, s, der: r.to_bytes(32, "big") + s.to_bytes(33, "big")),
                ("r padded", lambda r, s, der: r.to_bytes(33, "big") + s.to_bytes(32, "big")),
                ("both padded", lambda r, s, der: r.to_bytes(33, "big") + s.to_bytes(33, "big")),
                ("as ES384", lambda r, s, der: r.to_bytes(48, "big") + s.to_bytes(48, "big")),
            ]:

                def sign(message: bytes, shape: Any = shape) -> bytes:
                    r, s, der = ecdsa_parts("p256", message, hashes.SHA256())
                    return bytes(shape(r, s, der))

                token = signed(header, payload, sign)
                if name == "raw r || s":
                    await verifier.verify(token)
                else:
                    assert await reason(verifier, token) == "bad_signature", name

            # ES384: 96 bytes; the 64 of ES256 or a padded s are refused
            def sign384(message: bytes) -> bytes:
                r, s, _ = ecdsa_parts("p384", message, hashes.SHA384())
                return r.to_bytes(48, "big") + s.to_bytes(49, "big")

            token = signed({"alg": "ES384", "kid": "k1"}, payload, sign384)
            assert await reason(verifier, token) == "bad_signature"

    run(scenario())


def test_ps256_needs_mgf1_sha256_and_a_32_byte_salt() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            header = {"alg": "PS256", "kid": "k1"}
            good = signed(header, claims(clock), rsa_signer(pss(32), hashes.SHA256()))
            await verifier.verify(good)
            for name, sign in [
                ("max salt", rsa_signer(pss(padding.PSS.MAX_LENGTH), hashes.SHA256())),
                ("no salt", rsa_signer(pss(0), hashes.SHA256())),
                ("20-byte salt", rsa_signer(pss(20), hashes.SHA256())),
                ("MGF1 with SHA-1", rsa_signer(pss(32, hashes.SHA1()), hashes.SHA256())),
                ("PKCS#1 v1.5", rsa_signer(padding.PKCS1v15(), hashes.SHA256())),
                ("SHA-384", rsa_signer(pss(32), hashes.SHA384())),
            ]:
                token = signed(header, claims(clock, sub=name), sign)
                assert await reason(verifier, token) == "bad_signature", name

    run(scenario())


def test_rs_algorithms_need_pkcs1_v15_with_their_own_hash() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            for alg, hash_ in (
                ("RS256", hashes.SHA256()),
                ("RS384", hashes.SHA384()),
                ("RS512", hashes.SHA512()),
            ):
                header = {"alg": alg, "kid": "k1"}
                await verifier.verify(
                    signed(header, claims(clock, sub=alg), rsa_signer(padding.PKCS1v15(), hash_))
                )
                others = [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()]
                for other in [h for h in others if h.name != hash_.name]:
                    sign = rsa_signer(padding.PKCS1v15(), other)
                    token = signed(header, claims(clock, sub=other.name), sign)
                    assert await reason(verifier, token) == "bad_signature", (alg, other.name)
                token = signed(header, claims(clock, sub="pss"), rsa_signer(pss(32), hash_))
                assert await reason(verifier, token) == "bad_signature", alg

    run(scenario())


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_signed_by_another_key_of_the_same_type(alg: str) -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            kind = kind_for(alg)
            await verifier.verify(mint(clock, alg, kind=kind))
            forged = mint(clock, alg, kind=f"{kind}-attacker")
            assert await reason(verifier, forged) == "bad_signature"
            # without a kid every key that fits is tried, and none matches
            forged = mint(clock, alg, kid=None, kind=f"{kind}-attacker")
            assert await reason(verifier, forged) == "bad_signature"

    run(scenario())


def test_hs256_with_another_secret_or_a_truncated_mac() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            payload = claims(clock)
            token = jwt.encode(payload, b"t" * 40, algorithm="HS256")
            assert await reason(verifier, token) == "bad_signature"
            good = jwt.encode(payload, SECRET, algorithm="HS256")
            head, body, mac = good.split(".")
            raw = jwt.utils.base64url_decode(mac)
            for cut in (raw[:16], raw[:31], raw + b"\0", b""):
                forged = f"{head}.{body}.{b64(cut)}"
                assert await reason(verifier, forged) == "bad_signature"
            await verifier.verify(good)

    run(scenario())


def test_rsa_signature_of_the_wrong_length() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            head, body, sig = mint(clock, "RS256").split(".")
            raw = jwt.utils.base64url_decode(sig)
            for bad in (b"\0" + raw, raw[:-1], raw + b"\0", raw * 2):
                assert await reason(verifier, f"{head}.{body}.{b64(bad)}") == "bad_signature"
            head, body, sig = mint(clock, "EdDSA").split(".")
            raw = jwt.utils.base64url_decode(sig)
            for bad in (b"\0" + raw, raw[:-1], raw + b"\0"):
                assert await reason(verifier, f"{head}.{body}.{b64(bad)}") == "bad_signature"

    run(scenario())


def test_alg_and_key_type_mismatches() -> None:
    """The token's alg names the check; the key must be the type that check needs."""

    async def scenario() -> None:
        keys = [public_jwk("rsa", "r"), public_jwk("p256", "e"), public_jwk("ed25519", "d")]
        async with issuer_env(keys=keys) as (verifier, _, clock):
            payload = claims(clock)
            ec_key = private_key("p256")
            ed_key = private_key("ed25519")
            cases = [
                # an EC signature labelled ES256, naming the RSA key
                (jwt.encode(payload, ec_key, "ES256", headers={"kid": "r"}), "unknown_kid"),
                # an RSA signature labelled RS256, naming the EC key
                (mint(clock, "RS256", kid="e"), "unknown_kid"),
                (jwt.encode(payload, ed_key, "EdDSA", headers={"kid": "r"}), "unknown_kid"),
                (jwt.encode(payload, ed_key, "EdDSA", headers={"kid": "e"}), "unknown_kid"),
                # a P-256 signature labelled ES384: no P-384 key here
                (
                    signed(
                        {"alg": "ES384", "kid": "e"},
                        payload,
                        lambda m: ec_key.sign(m, ec.ECDSA(hashes.SHA256())),  # type: ignore[union-attr]
                    ),
                    "unknown_kid",
                ),
                # a PKCS#1 v1.5 signature labelled PS256, and the reverse
                (
                    signed(
                        {"alg": "PS256", "kid": "r"},
                        payload,
                        rsa_signer(padding.PKCS1v15(), hashes.SHA256()),
                    ),
                    "bad_signature",
                ),
                (
                    signed(
                        {"alg": "RS256", "kid": "r"},
                        payload,
                        rsa_signer(pss(32), hashes.SHA256()),
                    ),
                    "bad_signature",
                ),
                # an RS256 signature labelled RS512
                (
                    signed(
                        {"alg": "RS512", "kid": "r"},
                        payload,
                        rsa_signer(padding.PKCS1v15(), hashes.SHA256()),
                    ),
                    "bad_signature",
                ),
            ]
            for token, expected in cases:
                assert await reason(verifier, token) == expected, jwt.get_unverified_header(token)

    run(scenario())


def test_signature_check_refuses_a_key_of_the_wrong_type() -> None:
    """_signature_ok checks the key type itself, whatever its caller chose."""
    message = b"header.payload"
    rsa_key = private_key("rsa")
    p256 = private_key("p256")
    p384 = private_key("p384")
    ed = private_key("ed25519")
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert isinstance(p256, ec.EllipticCurvePrivateKey)
    assert isinstance(p384, ec.EllipticCurvePrivateKey)
    assert isinstance(ed, ed25519.Ed25519PrivateKey)
    rs256 = rsa_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    r, s = decode_dss_signature(p256.sign(message, ec.ECDSA(hashes.SHA256())))
    es256 = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    eddsa = ed.sign(message)
    ok = jwt_auth._signature_ok
    assert ok("RS256", rsa_key.public_key(), message, rs256)
    assert ok("ES256", p256.public_key(), message, es256)
    assert ok("EdDSA", ed.public_key(), message, eddsa)
    assert not ok("ES256", p384.public_key(), message, es256)
    assert not ok("ES384", p256.public_key(), message, es256)
    assert not ok("RS256", p256.public_key(), message, rs256)
    assert not ok("EdDSA", rsa_key.public_key(), message, eddsa)
    pem = public_pem("rsa")
    # a public key as an HMAC secret, and a secret where a key is needed
    assert not ok("HS256", rsa_key.public_key(), message, b"x" * 32)
    assert not ok("RS256", pem, message, rs256)
    assert not ok("HS256", pem, message, jwt_auth.hmac.digest(b"x", message, "sha256"))
    assert ok("HS256", SECRET, message, jwt_auth.hmac.digest(SECRET, message, "sha256"))
    for alg in ("none", "HS512", "ES512", "RS1"):
        assert not ok(alg, rsa_key.public_key(), message, rs256)


def test_ed448_keys() -> None:
    async def scenario() -> None:
        ours, theirs = ed448.Ed448PrivateKey.generate(), ed448.Ed448PrivateKey.generate()
        jwk = {**OKPAlgorithm.to_jwk(ours.public_key(), as_dict=True), "kid": "x"}
        async with issuer_env(keys=[jwk, public_jwk("ed25519", "k1")]) as (verifier, _, clock):
            payload = claims(clock)
            await verifier.verify(jwt.encode(payload, ours, "EdDSA", headers={"kid": "x"}))
            forged = jwt.encode(payload, theirs, "EdDSA", headers={"kid": "x"})
            assert await reason(verifier, forged) == "bad_signature"
            # an Ed25519 signature naming the Ed448 key
            ed25519_token = jwt.encode(payload, private_key("ed25519"), "EdDSA", {"kid": "x"})
            assert await reason(verifier, ed25519_token) == "bad_signature"

    run(scenario())


def test_short_rsa_key_is_used_with_a_warning_at_load(caplog: pytest.LogCaptureFixture) -> None:
    """PyJWT warned on each token signed with an RSA key under 2048 bits; now once per key."""
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    jwk = {**RSAAlgorithm.to_jwk(short.public_key(), as_dict=True), "kid": "short"}

    async def scenario() -> None:
        async with issuer_env(keys=[jwk]) as (verifier, _, clock):
            # (PyJWT would warn when signing with it too)
            sign = lambda m: short.sign(m, padding.PKCS1v15(), hashes.SHA256())  # noqa: E731
            token = signed({"alg": "RS256", "kid": "short"}, claims(clock), sign)
            await verifier.verify(token)

    with caplog.at_level(logging.WARNING, logger="stockade.proxy.jwt"):
        run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "1024 bits" in r.getMessage()]
    assert len(warnings) == 1 and "short" in warnings[0]


# --- the header: crit, b64, kid ------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"crit": ["exp"], "exp": 1}, "malformed"),  # not an extension anyone here knows
        ({"crit": ["x-unknown"], "x-unknown": 1}, "malformed"),
        ({"crit": []}, "malformed"),
        ({"crit": "b64", "b64": True}, "malformed"),
        ({"crit": [1]}, "malformed"),
        ({"crit": None}, "malformed"),
        ({"crit": ["b64"]}, "malformed"),  # listed but absent
        ({"crit": ["b64", "x-unknown"], "b64": True, "x-unknown": 1}, "malformed"),
        ({"crit": ["b64"], "b64": False}, "malformed"),  # unencoded payload: never
        ({"b64": False}, "malformed"),
        ({"kid": 5}, "malformed"),
        ({"kid": None}, "malformed"),
        ({"crit": ["b64"], "b64": True}, None),  # understood, and the payload is base64url
        ({"b64": True}, None),
        ({"x-private": {"a": [1]}}, None),  # not critical: ignored
    ],
)
def test_crit_and_header_rules(extra: dict[str, Any], expected: str | None) -> None:
    """Validly signed tokens, so only the header rule decides."""

    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            header = {"alg": "RS256", "typ": "JWT", "kid": "k1", **extra}
            token = signed(header, claims(clock), rsa_signer(padding.PKCS1v15(), hashes.SHA256()))
            if expected is None:
                await verifier.verify(token)
            else:
                assert await reason(verifier, token) == expected

    run(scenario())


# --- claims ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sub": 42}, "malformed"),
        ({"jti": 7}, "malformed"),
        ({"jti": "abc"}, None),
        ({"aud": []}, "missing_claim"),
        ({"aud": ""}, "missing_claim"),
        ({"aud": {}}, "missing_claim"),
        ({"aud": {"stockade-api": 1}}, "wrong_audience"),
        ({"aud": [AUD, 5]}, "wrong_audience"),
        ({"aud": 5}, "wrong_audience"),
        ({"aud": [AUD]}, None),
        ({"iss": [ISS]}, "wrong_issuer"),
        ({"iss": ISS + "x"}, "wrong_issuer"),
        ({"exp": True}, "malformed"),
        ({"exp": 1_800_000_000.5}, None),
        ({"nbf": "now"}, "malformed"),
        ({"iat": None}, "malformed"),  # present, so it must be a number
    ],
)
def test_claim_rules(overrides: dict[str, Any], expected: str | None) -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            payload = {**claims(clock), **overrides}
            sign = rsa_signer(padding.PKCS1v15(), hashes.SHA256())
            token = signed({"alg": "RS256", "kid": "k1"}, payload, sign)
            if expected is None:
                await verifier.verify(token)
            else:
                assert await reason(verifier, token) == expected

    run(scenario())


def test_check_claims_rechecks_the_issuer() -> None:
    """The issuer config is chosen by the unverified "iss"; after the signature the claim
    is checked again against that config (no path through verify() can tell, so directly)."""
    config = inhouse("http://127.0.0.1:9/")
    good = claims(FakeClock())
    jwt_auth._check_claims(good, config)
    for iss, expected in ((ISS + "x", "wrong_issuer"), ([ISS], "wrong_issuer"), (None, None)):
        payload = {**good, "iss": iss} if iss is not None else {**good}
        if iss is None:
            del payload["iss"]
            expected = "missing_claim"
        with pytest.raises(JwtError) as info:
            jwt_auth._check_claims(payload, config)
        assert info.value.reason == expected


def test_required_claim_present_but_null() -> None:
    async def scenario() -> None:
        config = inhouse("JWKS", required_claims=("exp", "sub"))
        async with issuer_env(config) as (verifier, _, clock):
            for sub in (None, "alice"):
                payload = {**claims(clock), "sub": sub}
                token = jwt.encode(payload, private_key("rsa"), "RS256", headers={"kid": "k1"})
                if sub is None:
                    assert await reason(verifier, token) == "missing_claim"
                else:
                    await verifier.verify(token)

    run(scenario())


def test_a_claim_failure_stops_at_the_first_key_that_verifies() -> None:
    """Without a kid: the key whose signature matches decides; a claim it refuses is not
    retried with the other keys."""

    async def scenario() -> None:
        keys = [public_jwk("rsa-other", "a"), public_jwk("rsa", "b")]
        async with issuer_env(keys=keys) as (verifier, _, clock):
            token = mint(clock, "RS256", kid=None, aud="elsewhere")
            assert await reason(verifier, token) == "wrong_audience"

    run(scenario())


# --- the parse ------------------------------------------------------------------------


def test_base64url_segments_decode_exactly_as_pyjwt_does() -> None:
    """_b64url against PyJWS._decode_base64url_segment on edge cases and random segments."""
    pyjwt_decode = jwt.api_jws.PyJWS._decode_base64url_segment
    alphabet = jwt_auth._B64URL_ALPHABET.decode()
    rng = random.Random(7)
    cases = ["", "=", "==", "A", "AA", "AAA", "AAAA", "AB", "AE", "AQ", "AAB", "AAE", "AAAA="]
    cases += ["AA=", "AA==", "AA===", "AAA=", "AAA==", "AAAA==", "A=A", "AA+/", "AA/_", "A A"]
    cases += ["QQ", "QR", "QW", "Qg", "Qh", "QUI", "QUJ", "QUM", "QUE=", "\u00e9", "AA\x00"]
    for _ in range(5000):
        length = rng.randint(0, 11)
        chars = alphabet + "=+/. \u00e9" if rng.random() < 0.3 else alphabet
        segment = "".join(rng.choice(chars) for _ in range(length))
        cases.append(segment + "=" * rng.choice((0, 0, 1, 2, 3)))
    for case in cases:
        raw = case.encode()
        try:
            expected: bytes | None = pyjwt_decode(raw, "x")
        except jwt.DecodeError:
            expected = None
        try:
            got: bytes | None = jwt_auth._b64url(raw)
        except ValueError:
            got = None
        assert got == expected, case


def _pyjwt_reason(token: str, key: Any, alg: str) -> str | None:
    """What the PyJWT path said of a token: one unverified parse (any error: malformed),
    then decode() with the issuer's checks."""
    try:
        jwt.PyJWT().decode_complete(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return "malformed"
    try:
        jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=[AUD, "other-api"],
            issuer=ISS,
            options={"require": ["exp"]},
            leeway=10**10,  # times are not what this compares
        )
    except jwt.InvalidSignatureError:
        return "bad_signature"
    except jwt.PyJWTError:
        return "malformed"
    return None


def _mutations(token: str) -> list[str]:
    parts = token.split(".")
    out = [token]
    for i, part in enumerate(parts):

        def with_part(new: str, i: int = i) -> str:
            return ".".join([*parts[:i], new, *parts[i + 1 :]])

        out += [with_part(part + pad) for pad in ("=", "==", "===", "=" * (-len(part) % 4))]
        out += [with_part(part[:-1] + c) for c in "AQgw_-BCDEFGHIJKLMNOP"]
        out += [with_part(part[:-1]), with_part(part[1:]), with_part(part + "A")]
        out += [with_part(part[:5] + c + part[5:]) for c in (".", "+", "/", " ", "\u00e9", "=")]
    out += [token + ".", "." + token, token.replace(".", "..", 1)]
    return out


@pytest.mark.parametrize("alg", [*ASYMMETRIC, *HMAC])
def test_mutated_tokens_are_judged_as_pyjwt_judges_them(alg: str) -> None:
    """Differential: each mutation of a valid token is accepted by the verifier iff PyJWT's
    decode() accepts it, and refused for the same kind of reason (malformed/signature)."""

    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            key: Any = SECRET if alg in HMAC else private_key(kind_for(alg)).public_key()
            token = mint(clock, alg)
            for mutated in _mutations(token):
                expected = _pyjwt_reason(mutated, key, alg)
                try:
                    await verifier.verify(mutated)
                    got = None
                except JwtError as exc:
                    got = exc.reason
                assert got == expected, (alg, mutated)

    run(scenario())


def test_non_ascii_or_surrogate_tokens_are_malformed() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            token = mint(clock)
            for bad in (token + "\udc80", "\udcff" + token, token[:10] + "\u00e9" + token[10:]):
                assert await reason(verifier, bad) == "malformed"

    run(scenario())


def test_one_parse_per_new_token_and_pyjwt_never_on_the_request_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parses: list[str] = []
    original = jwt_auth._parse

    def counting(token: str) -> Any:
        parses.append(token)
        return original(token)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("PyJWT parsed a token on the request path")

    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            monkeypatch.setattr(jwt_auth, "_parse", counting)
            monkeypatch.setattr(jwt.api_jws.PyJWS, "_load", forbidden)
            monkeypatch.setattr(jwt.api_jws.PyJWS, "decode_complete", forbidden)
            monkeypatch.setattr(jwt.api_jwt.PyJWT, "decode_complete", forbidden)
            for alg in [*ASYMMETRIC, *HMAC]:
                token = mint(clock, alg)
                await verifier.verify(token)
                await verifier.verify(token)  # cached: not parsed again
            assert len(parses) == len(ASYMMETRIC) + len(HMAC)

    run(scenario())


def test_oversized_token_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parsing(token: str) -> Any:
        raise AssertionError("parsed an oversized token")

    async def scenario() -> None:
        async with issuer_env(max_token_size=1024) as (verifier, _, clock):
            monkeypatch.setattr(jwt_auth, "_parse", no_parsing)
            assert await reason(verifier, mint(clock, padding="x" * 2000)) == "too_large"
            assert await reason(verifier, "a." * 50_000) == "too_large"

    run(scenario())


# --- JSON: what Python's json takes and a gateway must not -----------------------------


def raw_signed(header: str, payload: str) -> str:
    """A token from JSON text exactly as given, validly signed RS256 with kid k1's key."""
    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    sign = rsa_signer(padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


HEADER = '{"alg": "RS256", "kid": "k1"}'


@pytest.mark.parametrize(
    ("header", "exp", "extra", "expected"),
    [
        (HEADER, "{soon}", [], None),
        (HEADER, "{soon}", ['"nbf": 1e3'], None),  # a finite float is a number like any other
        # NaN compares false with everything: an exp of NaN would never expire
        (HEADER, "NaN", [], "malformed"),
        (HEADER, "Infinity", [], "malformed"),
        (HEADER, "1e400", [], "malformed"),  # inf, as a float
        (HEADER, "-Infinity", [], "malformed"),
        (HEADER, "{soon}", ['"nbf": NaN'], "malformed"),
        (HEADER, "{soon}", ['"nbf": -1e400'], "malformed"),
        (HEADER, "{soon}", ['"iat": NaN'], "malformed"),
        (HEADER, "{soon}", ['"x-custom": NaN'], "malformed"),  # anywhere in the claims
        (HEADER, "{soon}", ['"x-custom": {"deep": [1, 2e999]}'], "malformed"),
        ('{"alg": "RS256", "kid": "k1", "x": Infinity}', "{soon}", [], "malformed"),
        # duplicate names: Python's json keeps the last; a gateway must not pick one
        (HEADER, "1", ['"exp": {soon}'], "malformed"),  # an expired exp, then a good one
        (HEADER, "{soon}", ['"iss": "https://other.example/"'], "malformed"),
        (HEADER, "{soon}", ['"x": {"a": 1, "a": 1}'], "malformed"),  # equal, nested: still
        ('{"alg": "RS256", "kid": "k1", "kid": "k1"}', "{soon}", [], "malformed"),
        ('{"alg": "HS256", "alg": "RS256", "kid": "k1"}', "{soon}", [], "malformed"),
        # exp in whole seconds, as PyJWT: now + 0.9 is past at now + 0.5 (leeway 0)
        (HEADER, "{now}.9", [], "expired"),
        (HEADER, "{soon}", ['"nbf": {now}.6'], "not_yet_valid"),
        (HEADER, "{soon}", ['"nbf": {now}.4', '"iat": {now}.5'], None),
    ],
)
def test_non_finite_numbers_and_duplicate_names(
    header: str, exp: str, extra: list[str], expected: str | None
) -> None:
    """Validly signed JSON text, so only the parse and the claim rules decide."""

    async def scenario() -> None:
        async with issuer_env(inhouse("JWKS", leeway=0.0)) as (verifier, _, clock):
            clock.advance(0.5)
            now = int(clock.wall())
            fields = [f'"iss": "{ISS}"', f'"aud": "{AUD}"', f'"exp": {exp}', *extra]
            payload = "{" + ", ".join(fields) + "}"
            payload = payload.replace("{soon}", str(now + 300)).replace("{now}", str(now))
            token = raw_signed(header, payload)
            if expected is None:
                await verifier.verify(token)
            else:
                assert await reason(verifier, token) == expected

    run(scenario())


# --- PS384, PS512, ES512, HS384, HS512 ----------------------------------------------------


def test_es512_is_p521_with_66_byte_r_and_s() -> None:
    """RFC 7518 3.4: P-521 numbers are 521 bits, sent in 66 bytes each (not 65, not DER)."""

    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            header = {"alg": "ES512", "kid": "k1"}
            for name, shape in [
                ("raw r || s", lambda r, s, der: r.to_bytes(66, "big") + s.to_bytes(66, "big")),
                ("DER", lambda r, s, der: der),
                ("67 bytes", lambda r, s, der: r.to_bytes(67, "big") + s.to_bytes(67, "big")),
                ("s padded", lambda r, s, der: r.to_bytes(66, "big") + s.to_bytes(67, "big")),
            ]:

                def sign(message: bytes, shape: Any = shape) -> bytes:
                    r, s, der = ecdsa_parts("p521", message, hashes.SHA512())
                    return bytes(shape(r, s, der))

                token = signed(header, claims(clock, sub=name), sign)
                if name == "raw r || s":
                    await verifier.verify(token)
                else:
                    assert await reason(verifier, token) == "bad_signature", name

            def sha256_sign(message: bytes) -> bytes:  # P-521 with the wrong hash
                r, s, _ = ecdsa_parts("p521", message, hashes.SHA256())
                return r.to_bytes(66, "big") + s.to_bytes(66, "big")

            token = signed(header, claims(clock, sub="sha256"), sha256_sign)
            assert await reason(verifier, token) == "bad_signature"

    run(scenario())


@pytest.mark.parametrize(("alg", "hash_"), [("PS384", hashes.SHA384()), ("PS512", hashes.SHA512())])
def test_pss_needs_mgf1_with_its_hash_and_a_salt_of_the_hash_size(
    alg: str, hash_: hashes.HashAlgorithm
) -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            header = {"alg": alg, "kid": "k1"}
            size = hash_.digest_size
            good = rsa_signer(pss(size, hash_), hash_)
            await verifier.verify(signed(header, claims(clock), good))
            for name, sign in [
                ("32-byte salt", rsa_signer(pss(32, hash_), hash_)),
                ("MGF1 with SHA-256", rsa_signer(pss(size, hashes.SHA256()), hash_)),
                ("PKCS#1 v1.5", rsa_signer(padding.PKCS1v15(), hash_)),
                ("PS256 signature", rsa_signer(pss(32), hashes.SHA256())),
            ]:
                token = signed(header, claims(clock, sub=name), sign)
                assert await reason(verifier, token) == "bad_signature", name

    run(scenario())


def test_hmac_algorithms_use_their_own_hash_and_the_one_secret() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            payload = claims(clock)
            for alg in HMAC:
                await verifier.verify(jwt.encode({**payload, "sub": alg}, SECRET, algorithm=alg))
                other = jwt.encode(payload, b"t" * 64, algorithm=alg)
                assert await reason(verifier, other) == "bad_signature", alg
            # an HS256 MAC labelled HS384/HS512, and the reverse
            for label, mac in (("HS384", "HS256"), ("HS512", "HS384"), ("HS256", "HS512")):
                head = b64(json.dumps({"alg": label}).encode())
                body = b64(json.dumps(payload).encode())
                digest = hmac.digest(SECRET, f"{head}.{body}".encode(), mac.replace("HS", "sha"))
                assert await reason(verifier, f"{head}.{body}.{b64(digest)}") == "bad_signature"

    run(scenario())


def test_an_es512_token_never_uses_a_key_of_another_curve() -> None:
    async def scenario() -> None:
        keys = [public_jwk("p256", "a"), public_jwk("p384", "b"), public_jwk("p521", "c")]
        async with issuer_env(keys=keys) as (verifier, _, clock):
            await verifier.verify(mint(clock, "ES512", kid="c"))
            for kid in ("a", "b"):
                assert await reason(verifier, mint(clock, "ES512", kid=kid)) == "unknown_kid"
            assert await reason(verifier, mint(clock, "ES256", kid="c")) == "unknown_kid"

    run(scenario())
