"""JwtVerifier against a local issuer: algorithms, claims, attacks, JWKS rotation and outages,
the verified-token cache."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import jwt
import pytest
from jwt_issuer import (
    ASYMMETRIC,
    AUD,
    HMAC,
    ISS,
    SECRET,
    b64,
    claims,
    default_jwks,
    inhouse,
    issuer_env,
    mint,
    public_jwk,
    public_pem,
    raw_token,
)

from stockade.clock import FakeClock
from stockade.proxy.jwt_auth import IssuerConfig, JwtError, JwtVerifier


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def reason(verifier: JwtVerifier, token: str, issuers: list[str] | None = None) -> str:
    with pytest.raises(JwtError) as info:
        await verifier.verify(token, issuers)
    assert not token or token not in info.value.description
    return info.value.reason


def count_signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each call of the signature path (JwtVerifier._decode)."""
    calls: list[str] = []
    original = JwtVerifier._decode

    def counting(self: JwtVerifier, token: str, *args: Any) -> dict[str, Any]:
        calls.append(token)
        return original(self, token, *args)

    monkeypatch.setattr(JwtVerifier, "_decode", counting)
    return calls


@pytest.mark.parametrize("alg", [*ASYMMETRIC, *HMAC])
def test_valid_token_for_each_algorithm(alg: str) -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            got = await verifier.verify(mint(clock, alg), ["inhouse"])
            assert got["sub"] == "alice" and got["iss"] == ISS

    run(scenario())


@pytest.mark.parametrize(
    ("description", "overrides", "expected"),
    [
        ("expired beyond the leeway", {"exp": -31}, "expired"),
        ("exp exactly now minus leeway", {"exp": -30}, "expired"),
        ("nbf beyond the leeway", {"nbf": 31}, "not_yet_valid"),
        ("iat in the future", {"iat": 120}, "not_yet_valid"),
        ("unknown issuer", {"iss": "https://evil.example/"}, "wrong_issuer"),
        ("no issuer", {"iss": None}, "wrong_issuer"),
        ("wrong audience", {"aud": "someone-else"}, "wrong_audience"),
        ("no audience", {"aud": None}, "missing_claim"),
        ("no exp", {"exp": None}, "missing_claim"),
        ("exp not a number", {"exp": "soon"}, "malformed"),
    ],
)
def test_claims_refused(description: str, overrides: dict[str, Any], expected: str) -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            now = int(clock.wall())
            relative: dict[str, Any] = {
                k: now + v if k in ("exp", "nbf", "iat") and isinstance(v, int) else v
                for k, v in overrides.items()
            }
            assert await reason(verifier, mint(clock, **relative)) == expected, description

    run(scenario())


def test_leeway_accepts_slightly_expired_and_early_tokens() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            now = int(clock.wall())
            await verifier.verify(mint(clock, exp=now - 29))
            await verifier.verify(mint(clock, nbf=now + 29, iat=now + 29))

    run(scenario())


def test_audience_list_intersecting_the_configured_ones_is_accepted() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            await verifier.verify(mint(clock, aud=["x", "other-api"]))
            assert await reason(verifier, mint(clock, aud=["x", "y"])) == "wrong_audience"

    run(scenario())


def test_required_claims_from_config() -> None:
    async def scenario() -> None:
        async with issuer_env(inhouse("JWKS", required_claims=("exp", "sub", "scope"))) as (
            verifier,
            _,
            clock,
        ):
            assert await reason(verifier, mint(clock)) == "missing_claim"
            await verifier.verify(mint(clock, scope="orders:read"))

    run(scenario())


def test_route_issuer_restriction() -> None:
    async def scenario() -> None:
        partner = IssuerConfig(
            name="partner",
            issuer="https://partner.example/",
            audience=(AUD,),
            algorithms=("RS256",),
            jwks_url="JWKS",
        )
        async with issuer_env(inhouse("JWKS"), partner) as (verifier, _, clock):
            token = mint(clock)
            assert await reason(verifier, token, ["partner"]) == "wrong_issuer"
            await verifier.verify(token, ["inhouse", "partner"])
            # a cached token is still held to the route's issuers
            assert await reason(verifier, token, ["partner"]) == "wrong_issuer"
            await verifier.verify(mint(clock, iss="https://partner.example/"), ["partner"])

    run(scenario())


def test_tampered_payload_and_stripped_signature() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            for alg in ("RS256", "ES256", "EdDSA", "HS256"):
                header, _, signature = mint(clock, alg).split(".")
                forged = b64(json.dumps(claims(clock, sub="root")).encode())
                assert await reason(verifier, f"{header}.{forged}.{signature}") == "bad_signature"
                token = mint(clock, alg)
                stripped = token.rsplit(".", 1)[0] + "."
                assert await reason(verifier, stripped) == "bad_signature", alg

    run(scenario())


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_refused(alg: str) -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            token = raw_token({"alg": alg, "typ": "JWT", "kid": "k1"}, claims(clock), None)
            assert await reason(verifier, token) == "bad_algorithm"

    run(scenario())


def test_algorithm_outside_the_issuer_allowlist() -> None:
    async def scenario() -> None:
        async with issuer_env(inhouse("JWKS", algorithms=("ES256",), hs256_secret=None)) as (
            verifier,
            _,
            clock,
        ):
            assert await reason(verifier, mint(clock, "RS256")) == "bad_algorithm"
            assert await reason(verifier, mint(clock, "HS256")) == "bad_algorithm"
            await verifier.verify(mint(clock, "ES256"))

    run(scenario())


def test_rs256_to_hs256_key_confusion() -> None:
    """An HS256 token whose HMAC key is the issuer's RSA public key (PEM), as published."""

    async def scenario() -> None:
        both = inhouse("JWKS", name="both", algorithms=("RS256", "HS256"))
        rsa_only = IssuerConfig(
            name="rsa_only",
            issuer="https://rsa-only.example/",
            audience=(AUD,),
            algorithms=("RS256",),
            jwks_url="JWKS",
        )
        async with issuer_env(both, rsa_only) as (verifier, _, clock):
            pem = public_pem("rsa")
            for iss, expected in ((ISS, "bad_signature"), (rsa_only.issuer, "bad_algorithm")):
                for header in ({"alg": "HS256", "kid": "k1"}, {"alg": "HS256"}):
                    token = raw_token(header, claims(clock, iss=iss), pem)
                    assert await reason(verifier, token) == expected
            # the JWK form of the public key as an HMAC secret fails the same way
            jwk_bytes = json.dumps(public_jwk("rsa", "k1")).encode()
            token = raw_token({"alg": "HS256", "kid": "k1"}, claims(clock), jwk_bytes)
            assert await reason(verifier, token) == "bad_signature"

    run(scenario())


def test_key_of_the_wrong_type_or_curve_is_not_used() -> None:
    async def scenario() -> None:
        # kid "p" is only a P-384 key: an ES256 token naming it finds no key that fits.
        keys = [public_jwk("p384", "p"), public_jwk("rsa", "r")]
        async with issuer_env(keys=keys) as (verifier, _, clock):
            assert await reason(verifier, mint(clock, "ES256", kid="p", kind="p256")) in (
                "unknown_kid"
            )
            # signed by P-384 but labelled ES256: PyJWT never sees that key for ES256
            assert await reason(verifier, mint(clock, "ES384", kid="r")) == "unknown_kid"
            await verifier.verify(mint(clock, "ES384", kid="p"))

    run(scenario())


def test_unknown_kid() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, server, clock):
            assert await reason(verifier, mint(clock, kid="nope")) == "unknown_kid"
            assert server.fetches == 1  # at start; the refetch is within the interval

    run(scenario())


def test_token_without_kid_tries_the_keys_that_fit() -> None:
    async def scenario() -> None:
        keys = [public_jwk("rsa", "a"), public_jwk("ed25519", "b"), public_jwk("p256", "c")]
        async with issuer_env(keys=keys) as (verifier, _, clock):
            for alg in ("RS256", "EdDSA", "ES256"):
                await verifier.verify(mint(clock, alg, kid=None))
            token = mint(clock, "RS256", kid=None, kind="rsa-other")
            assert await reason(verifier, token) == "bad_signature"

    run(scenario())


def test_kid_rotation() -> None:
    async def scenario() -> None:
        async with issuer_env(keys=[public_jwk("rsa", "old")]) as (verifier, server, clock):
            old_token = mint(clock, kid="old", exp=int(clock.wall()) + 1000)
            await verifier.verify(old_token)
            new_token = mint(clock, kid="new", kind="rsa-new")
            server.keys = [public_jwk("rsa", "old"), public_jwk("rsa-new", "new")]
            clock.advance(301)  # the last fetch was at start
            await verifier.verify(new_token)
            assert server.fetches == 2
            # both keys published: the old token stays valid until its exp
            clock.advance(300)
            await verifier.verify(old_token)
            clock.advance(1000 - 601 + 30)  # at exp plus the 30 s leeway
            assert await reason(verifier, old_token) == "expired"
            assert server.fetches == 2

    run(scenario())


def test_retired_key_drops_its_cached_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_signature_checks(monkeypatch)

    async def scenario() -> None:
        keys = [public_jwk("rsa", "old"), public_jwk("rsa-new", "new")]
        async with issuer_env(keys=keys) as (verifier, server, clock):
            exp = int(clock.wall()) + 1000
            old_token = mint(clock, kid="old", exp=exp)
            new_token = mint(clock, kid="new", kind="rsa-new", exp=exp)
            hs_token = mint(clock, "HS256", exp=exp)
            for token in (old_token, new_token, hs_token):
                await verifier.verify(token)
            server.keys = [public_jwk("rsa-new", "new")]
            clock.advance(301)
            assert await reason(verifier, mint(clock, kid="other")) == "unknown_kid"
            assert server.fetches == 2
            assert await reason(verifier, old_token) == "unknown_kid"
            before = len(calls)
            await verifier.verify(new_token)  # still cached
            await verifier.verify(hs_token)
            assert len(calls) == before

    run(scenario())


def test_refetch_rate_limited_under_a_flood_of_random_kids() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, server, clock):
            clock.advance(301)
            tokens = [mint(clock, kid=uuid.uuid4().hex) for _ in range(50)]
            reasons = await asyncio.gather(*(reason(verifier, t) for t in tokens))
            assert set(reasons) == {"unknown_kid"}
            assert server.fetches == 2  # start + one refetch for the whole flood
            for _ in range(20):
                clock.advance(10)
                assert await reason(verifier, mint(clock, kid=uuid.uuid4().hex)) == "unknown_kid"
            assert server.fetches == 2
            clock.advance(100)  # 300 s after the refetch
            assert await reason(verifier, mint(clock, kid=uuid.uuid4().hex)) == "unknown_kid"
            assert server.fetches == 3

    run(scenario())


def test_concurrent_tokens_with_a_new_kid_share_one_refetch() -> None:
    async def scenario() -> None:
        async with issuer_env(keys=[]) as (verifier, server, clock):
            server.keys = default_jwks()
            clock.advance(301)
            got = await asyncio.gather(
                *(verifier.verify(mint(clock, sub=str(i))) for i in range(5))
            )
            assert [c["sub"] for c in got] == [str(i) for i in range(5)]
            assert server.fetches == 2

    run(scenario())


def test_jwks_down_at_start_then_recovers(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with issuer_env(down=True) as (verifier, server, clock):
            assert "JWKS fetch for issuer inhouse failed" in caplog.text
            assert await reason(verifier, mint(clock)) == "jwks_unavailable"
            await verifier.verify(mint(clock, "HS256"))  # the secret does not need the JWKS
            server.down = False
            clock.advance(301)
            await verifier.verify(mint(clock))
            assert server.fetches == 2

    with caplog.at_level(logging.INFO, logger="stockade.proxy.jwt"):
        run(scenario())


def test_jwks_unreachable_at_start() -> None:
    async def scenario() -> None:
        config = inhouse("http://127.0.0.1:9/jwks.json", jwks_timeout=0.5)
        async with issuer_env(config) as (verifier, _, clock):
            assert await reason(verifier, mint(clock)) == "jwks_unavailable"

    run(scenario())


def test_jwks_down_later_known_keys_keep_working(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, server, clock):
            server.down = True
            for step in range(4):
                clock.advance(200)
                await verifier.verify(mint(clock, sub=f"s{step}"))  # known kid, no fetch
                assert await reason(verifier, mint(clock, kid=uuid.uuid4().hex)) == "unknown_kid"
                assert await reason(verifier, mint(clock, kid=uuid.uuid4().hex)) == "unknown_kid"
            failures = [r for r in caplog.records if "failed" in r.getMessage()]
            assert server.fetches == 1 + 2  # start, then at 400 s and 800 s (interval 300)
            assert len(failures) == 2  # once per fetch, not once per token

    with caplog.at_level(logging.INFO, logger="stockade.proxy.jwt"):
        run(scenario())


def test_unusable_jwks_entries_are_ignored() -> None:
    async def scenario() -> None:
        keys = [
            public_jwk("rsa", "enc", use="enc"),
            public_jwk("rsa", "ops", key_ops=["encrypt", "wrapKey"]),
            public_jwk("rsa", "alg", alg="RS512"),
            public_jwk("rsa", "rsa-oaep", alg="RSA-OAEP"),
            {"kty": "oct", "kid": "oct", "k": b64(SECRET), "alg": "HS256"},
            {"kty": "RSA", "kid": "broken", "n": "AA", "e": "??"},
            "not an object",
            public_jwk("rsa", "good", key_ops=["verify"], alg="RS256"),
        ]
        async with issuer_env(keys=keys) as (verifier, _, clock):
            for kid in ("enc", "ops", "alg", "rsa-oaep", "broken"):
                assert await reason(verifier, mint(clock, kid=kid)) == "unknown_kid", kid
            await verifier.verify(mint(clock, kid="alg", alg="RS512"))
            await verifier.verify(mint(clock, kid="good"))
            # an HS256 token naming the published oct key: only the configured secret counts
            other = raw_token({"alg": "HS256", "kid": "oct"}, claims(clock), b"x" * 40)
            assert await reason(verifier, other) == "bad_signature"

    run(scenario())


def test_oversized_token_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parsing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("parsed an oversized token")

    async def scenario() -> None:
        async with issuer_env(max_token_size=1024) as (verifier, _, clock):
            big = mint(clock, padding="x" * 2000)
            monkeypatch.setattr(jwt, "get_unverified_header", no_parsing)
            monkeypatch.setattr(jwt, "decode", no_parsing)
            assert await reason(verifier, big) == "too_large"
            assert await reason(verifier, "a" * 100_000) == "too_large"

    run(scenario())


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "!!!.###.$$$",
        b64(b"{not json") + "." + b64(b"{}") + ".",
        b64(b'{"alg":"RS256"}') + "." + b64(b"[not json") + "." + b64(b"sig"),
        b64(b'{"alg":"RS256"}') + "." + b64(b"[1,2]") + "." + b64(b"sig"),
        b64(b'"just a string"') + "." + b64(b"{}") + "." + b64(b"sig"),
        b64(b'{"alg":"RS256","kid":7}') + "." + b64(b"{}") + "." + b64(b"sig"),
        b64(b'{"alg":"RS256","crit":["x-unknown"],"x-unknown":1}')
        + "."
        + b64(b"{}")
        + "."
        + b64(b"sig"),
    ],
)
def test_malformed_tokens(token: str) -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, _clock):
            assert await reason(verifier, token) == "malformed"

    run(scenario())


def test_empty_token_is_missing() -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, _, _clock):
            assert await reason(verifier, "") == "missing"

    run(scenario())


def test_cache_hit_skips_the_signature_check(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_signature_checks(monkeypatch)

    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            token = mint(clock, exp=int(clock.wall()) + 60)
            first = await verifier.verify(token)
            again = await verifier.verify(token)
            assert first == again and len(calls) == 1
            assert token.encode() not in verifier._cache  # keyed by a hash
            # at exp the entry is not used (even inside the leeway the signature is rechecked)
            clock.advance(60)
            await verifier.verify(token)
            assert len(calls) == 2
            clock.advance(30)
            assert await reason(verifier, token) == "expired"
            with pytest.raises(TypeError):
                again["sub"] = "root"  # type: ignore[index]

    run(scenario())


def test_cache_is_bounded_and_evicts_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_signature_checks(monkeypatch)

    async def scenario() -> None:
        async with issuer_env(cache_size=2) as (verifier, _, clock):
            tokens = [mint(clock, sub=str(i)) for i in range(3)]
            for token in tokens:
                await verifier.verify(token)
            assert len(verifier._cache) == 2
            await verifier.verify(tokens[2])
            assert len(calls) == 3
            await verifier.verify(tokens[0])  # evicted: checked again
            assert len(calls) == 4

    run(scenario())


def test_failed_tokens_are_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_signature_checks(monkeypatch)

    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            token = mint(clock, aud="someone-else")
            for _ in range(2):
                assert await reason(verifier, token) == "wrong_audience"
            assert len(calls) == 2 and not verifier._cache

    run(scenario())


def test_the_token_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with issuer_env(down=True) as (verifier, server, clock):
            tokens = [mint(clock), mint(clock, kid="x", exp=1), mint(clock, "HS256")]
            server.down = False
            clock.advance(301)
            for token in tokens:
                with contextlib.suppress(JwtError):
                    await verifier.verify(token)
            for token in tokens:
                for part in token.split("."):
                    assert part not in caplog.text

    with caplog.at_level(logging.DEBUG):
        run(scenario())


def test_key_files(tmp_path: Path) -> None:
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(public_pem("rsa"))
    jwk = tmp_path / "ed.jwk"
    jwk.write_text(json.dumps(public_jwk("ed25519", "ed")))
    jwks = tmp_path / "ec.jwks"
    jwks.write_text(json.dumps({"keys": [public_jwk("p256", "ec")]}))
    config = IssuerConfig(
        name="files",
        issuer=ISS,
        audience=(AUD,),
        algorithms=("RS256", "EdDSA", "ES256"),
        key_files=(pem, jwk, jwks),
    )

    async def scenario() -> None:
        verifier = JwtVerifier([config], FakeClock())
        await verifier.start()
        try:
            clock = FakeClock()
            await verifier.verify(mint(clock, "RS256", kid=None))
            await verifier.verify(mint(clock, "EdDSA", kid="ed"))
            await verifier.verify(mint(clock, "ES256", kid="ec"))
            assert await reason(verifier, mint(clock, "ES256", kid="ed")) == "unknown_kid"
        finally:
            await verifier.close()

    run(scenario())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n", "not a PEM"),
        (b"{not json", "not PEM, JWK or JWKS"),
        (json.dumps({"keys": [{"kty": "oct", "k": "AAAA"}]}).encode(), "no key usable"),
        (b"[1, 2]", "not PEM, JWK or JWKS"),
    ],
)
def test_bad_key_file_names_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-key.pem"
    path.write_bytes(content)
    config = IssuerConfig(
        name="files", issuer=ISS, audience=(AUD,), algorithms=("RS256",), key_files=(path,)
    )

    async def scenario() -> None:
        verifier = JwtVerifier([config])
        try:
            with pytest.raises(ValueError, match=message) as info:
                await verifier.start()
            assert str(path) in str(info.value)
        finally:
            await verifier.close()

    run(scenario())


def test_missing_key_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pem"
    config = IssuerConfig(
        name="files", issuer=ISS, audience=(AUD,), algorithms=("RS256",), key_files=(path,)
    )

    async def scenario() -> None:
        verifier = JwtVerifier([config])
        try:
            with pytest.raises(ValueError, match=r"absent\.pem"):
                await verifier.start()
        finally:
            await verifier.close()

    run(scenario())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"audience": ()}, "audience"),
        ({"algorithms": ("HS1024",)}, "not supported"),
        ({"algorithms": ("ES256K",)}, "not supported"),
        ({"algorithms": ("none",)}, "not supported"),
        ({"algorithms": ()}, "empty"),
        ({"algorithms": ("HS256",), "hs256_secret": None}, "no hmac_secret"),
        ({"algorithms": ("HS384",), "hs256_secret": None}, "no hmac_secret"),
        ({"algorithms": ("RS256",), "hs256_secret": SECRET}, "no HS. algorithm is allowed"),
        ({"algorithms": ("HS256",), "hs256_secret": b"short"}, "at least 32 bytes"),
        ({"algorithms": ("HS256",), "hs256_secret": None, "hmac_secret": b"x" * 31}, "32 bytes"),
        ({"hs256_secret": b"x" * 63}, "at least 64 bytes"),
        # one secret for all the HS* allowed: as long as the largest hash (RFC 7518 3.2)
        ({"algorithms": ("HS256", "HS384"), "hs256_secret": b"x" * 47}, "at least 48 bytes"),
        ({"algorithms": ("HS512",), "hs256_secret": b"x" * 63}, "at least 64 bytes"),
        ({"hmac_secret": SECRET}, "not both"),
        ({"hs256_secret": public_pem("rsa")}, "PEM"),
        ({"jwks_url": None, "issuer": "inhouse"}, "need a jwks_url, key_files, or an http"),
        ({"jwks_url": None, "issuer": "https://idp.test/?tenant=1"}, "OpenID discovery"),
        ({"jwks_url": "ftp://idp.test/jwks"}, "http"),
        ({"jwks_max_age": 299.0}, "at least jwks_refresh_interval"),
        ({"jwks_max_age": 0.0, "jwks_refresh_interval": 0.0}, "must be positive"),
    ],
)
def test_config_validation(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JwtVerifier([inhouse("http://127.0.0.1:9/", **overrides)])


def test_broken_or_empty_jwks_keeps_the_known_keys(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, server, clock):
            for junk in ([[[]]], "x" * 10, [], [public_jwk("rsa", "k1", use="enc")]):
                server.keys = junk
                clock.advance(301)
                assert await reason(verifier, mint(clock, kid="new")) == "unknown_kid"
                await verifier.verify(mint(clock, kid="k1", sub=str(junk)))
            assert server.fetches == 5
            failures = [r for r in caplog.records if "failed" in r.getMessage()]
            assert len(failures) == 4

    with caplog.at_level(logging.INFO, logger="stockade.proxy.jwt"):
        run(scenario())


def test_verify_before_start_is_a_programming_error() -> None:
    async def scenario() -> None:
        verifier = JwtVerifier([inhouse("http://127.0.0.1:9/")])
        with pytest.raises(RuntimeError, match="before start"):
            await verifier.verify("x")

    run(scenario())


def test_duplicate_issuer_names_refused() -> None:
    config = inhouse("http://127.0.0.1:9/")
    with pytest.raises(ValueError, match="unique"):
        JwtVerifier([config, config])
