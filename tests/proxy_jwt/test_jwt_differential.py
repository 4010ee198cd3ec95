"""Differential: thousands of generated tokens, judged by stockade's verifier and by PyJWT's
jwt.decode() with the same keys, the same allowlist, audience, issuer, required claims and
leeway, at the same instant.

Stockade must never accept a token PyJWT refuses. Where stockade refuses what PyJWT
accepts, the reason must be one of the deliberate differences listed in STRICTER (each is
seen in the corpus, so none of them is a dead letter); when both accept, the claims agree.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jwt_issuer import ASYMMETRIC, AUD, HMAC, ISS, SECRET, kind_for, private_key, public_jwk

from stockade.clock import FakeClock
from stockade.proxy.jwt_auth import IssuerConfig, JwtError, JwtVerifier

NOW = 1_800_000_000.25  # a fraction: PyJWT's int() and the comparisons at the edges
LEEWAY = 30.0
AUDIENCES = (AUD, "other-api")
ALGS = (*ASYMMETRIC, *HMAC)
CORPUS = 4000


class FrozenDatetime(datetime.datetime):
    """What PyJWT's decode() reads as now: the verifier's fake clock."""

    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> FrozenDatetime:
        return cls.fromtimestamp(NOW, tz)


def public_key(alg: str) -> Any:
    if alg in HMAC:
        return SECRET
    return private_key(kind_for(alg)).public_key()


def pyjwt_claims(token: str) -> dict[str, Any] | None:
    """PyJWT's verdict: the claims, or None for any refusal (OverflowError included)."""
    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except Exception:  # any failure is a refusal
        return None
    key = public_key(alg) if alg in ALGS else public_key("RS256")
    try:
        with mock.patch.object(jwt.api_jwt, "datetime", FrozenDatetime):
            return jwt.decode(
                token,
                key,
                algorithms=list(ALGS),
                audience=list(AUDIENCES),
                issuer=ISS,
                leeway=LEEWAY,
                options={"require": ["exp"]},
            )
    except Exception:  # the same
        return None


class Stockade:
    """One started verifier on a loop of its own, so that a hypothesis test can call it."""

    def __init__(self, tmp_path: Path) -> None:
        jwks = tmp_path / "keys.jwks"
        kinds = ("rsa", "p256", "p384", "p521", "ed25519")
        jwks.write_text(json.dumps({"keys": [public_jwk(k, "k1") for k in kinds]}))
        config = IssuerConfig(
            name="idp",
            issuer=ISS,
            audience=AUDIENCES,
            algorithms=ALGS,
            key_files=(jwks,),
            hmac_secret=SECRET,
            leeway=LEEWAY,
            required_claims=("exp",),
        )
        self.loop = asyncio.new_event_loop()
        self.verifier = JwtVerifier([config], FakeClock(wall=NOW), cache_size=0)
        self.loop.run_until_complete(self.verifier.start())

    def judge(self, token: str) -> dict[str, Any] | str:
        """The claims, or the reason of the refusal."""
        try:
            return dict(self.loop.run_until_complete(self.verifier.verify(token)))
        except JwtError as exc:
            return exc.reason

    def close(self) -> None:
        self.loop.run_until_complete(self.verifier.close())
        self.loop.close()


@contextmanager
def stockade(tmp_path: Path) -> Iterator[Stockade]:
    verifier = Stockade(tmp_path)
    try:
        yield verifier
    finally:
        verifier.close()


# --- why stockade may refuse what PyJWT accepts ------------------------------------------


def _segments(token: str) -> tuple[bytes, bytes]:
    head, payload, _ = token.split(".")
    return tuple(jwt.utils.base64url_decode(s) for s in (head, payload))  # type: ignore[return-value]


def _duplicate_names(data: bytes) -> bool:
    found = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        found |= len({k for k, _ in items}) != len(items)
        return dict(items)

    json.loads(data, object_pairs_hook=pairs)
    return found


def _non_finite(data: bytes, constants: bool) -> bool:
    """NaN/Infinity literals (constants=True), or numbers that overflow to inf (1e400)."""
    found = False

    def number(text: str) -> float:
        nonlocal found
        value = float(text)
        found |= not constants and not math.isfinite(value)
        return value

    def constant(name: str) -> float:
        nonlocal found
        found |= constants
        return float(name)

    json.loads(data, parse_float=number, parse_constant=constant)
    return found


def _not_utf8_json(data: bytes) -> bool:
    try:
        json.JSONDecoder().decode(data.decode("utf-8"))
    except ValueError:
        return True  # UTF-16/32, a BOM or CESU-8 surrogates: json.loads(bytes) takes them
    return False


def _time_claim_not_a_number(claims: dict[str, Any]) -> bool:
    return any(isinstance(claims.get(name), bool | str) for name in ("exp", "nbf", "iat"))


def _exact_nbf_iat(claims: dict[str, Any]) -> bool:
    bound = NOW + LEEWAY
    return any(
        isinstance(v, float) and v > bound >= int(v) for v in (claims.get("nbf"), claims.get("iat"))
    )


STRICTER: dict[str, Callable[[str, str, dict[str, Any], bytes, bytes], bool]] = {
    # RFC 7515 5.2 / RFC 7519 7.2 let a parser refuse duplicate names; a gateway must not
    # pick one of two "exp"s (Python's json keeps the last one)
    "duplicate name in the header or claims": lambda tok, why, c, h, p: (
        why == "malformed" and (_duplicate_names(h) or _duplicate_names(p))
    ),
    # NaN/Infinity are not JSON (RFC 8259 6): refused anywhere
    "NaN or Infinity": lambda tok, why, c, h, p: (
        why == "malformed" and (_non_finite(h, True) or _non_finite(p, True))
    ),
    # 1e400 is JSON, but no double holds it: Python makes it inf (an exp that never comes)
    "a number that overflows a double": lambda tok, why, c, h, p: (
        why == "malformed" and (_non_finite(h, False) or _non_finite(p, False))
    ),
    # RFC 7515/7519: the JOSE header and claims are UTF-8 JSON
    "JSON that is not UTF-8 text": lambda tok, why, c, h, p: (
        why == "malformed" and (_not_utf8_json(h) or _not_utf8_json(p))
    ),
    # PyJWT takes int("1800000000") and int(True); a NumericDate is a JSON number
    "a time claim that is not a JSON number": lambda tok, why, c, h, p: (
        why == "malformed" and _time_claim_not_a_number(c)
    ),
    # PyJWT truncates nbf/iat to whole seconds, stockade compares them as given
    "nbf/iat compared as given, not truncated": lambda tok, why, c, h, p: (
        why == "not_yet_valid" and _exact_nbf_iat(c)
    ),
    # PyJWT was handed the one key; stockade looks the key up by kid
    "kid names no published key": lambda tok, why, c, h, p: (
        why == "unknown_kid" and json.loads(h).get("kid") not in (None, "k1")
    ),
}


def stricter_because(token: str, why: str, claims: dict[str, Any]) -> str | None:
    head, payload = _segments(token)
    for name, applies in STRICTER.items():
        if applies(token, why, claims, head, payload):
            return name
    return None


# --- the corpus -------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(alg: str, message: bytes) -> bytes:
    if alg not in ALGS:
        return b"x" * 64
    key = SECRET if alg in HMAC else private_key(kind_for(alg))
    signature: bytes = jwt.get_algorithm_by_name(alg).sign(message, key)
    return signature


class Gen:
    """One token's choices: each mutation point picks a bad value with probability `rate`
    (a token-wide rate from 0 to 0.3, so the corpus has clean tokens, tokens with one
    flaw, and tokens with many)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.rate = rng.choice((0.0, 0.03, 0.1, 0.3))

    def pick(self, good: Any, bad: list[Any]) -> Any:
        return self.rng.choice(bad) if self.rng.random() < self.rate else good


def time_value(gen: Gen, base: float, good: float) -> str:
    """A JSON number (or not quite one) near a time that matters."""
    b = int(base)
    value: str = gen.pick(
        str(int(good)),
        [
            str(b),
            str(b + gen.rng.choice((-1, 1))),
            f"{base + gen.rng.choice((-0.75, -0.5, -0.1, 0.1, 0.5, 0.75)):.2f}",
            f"{b}.{gen.rng.choice((1, 3, 5, 9))}",  # either side of the fraction in NOW
            f"{b}.{gen.rng.choice((1, 3, 5, 9))}",
            repr(base),
            "NaN",
            "Infinity",
            "-Infinity",
            "1e400",
            "-1e400",
            "1e308",
            "10000000000000000000000000000000",
            "0",
            "-1",
            "1.5",
            "true",
            "null",
            f'"{b}"',
            f'"{int(good)}"',
            "[]",
            f"{b}e0",
            f"{base:.0f}.000",
        ],
    )
    return value


def header_fields(gen: Gen, alg: str) -> list[str]:
    fields = [f'"alg": {json.dumps(alg)}']
    kid = gen.pick(gen.rng.choice(['"k1"', None]), ['"k2"', "5", "null", '""'])
    if kid is not None:
        fields.append(f'"kid": {kid}')
    if gen.rng.random() < 0.3:
        fields.append('"typ": "JWT"')
    extra = gen.pick(
        None,
        [
            '"crit": ["b64"], "b64": true',
            '"crit": []',
            '"crit": ["exp"]',
            '"b64": false',
            '"x-private": {"a": [1, 2]}',
            '"alg": "none"',  # a second alg
            f'"alg": {json.dumps(alg)}',  # the same alg twice
            '"kid": "k1"',
            '"x": NaN',
            '"x": 1e999',
        ],
    )
    if extra is not None:
        fields.append(extra)
    gen.rng.shuffle(fields)
    return fields


def claim_fields(gen: Gen) -> list[str]:
    fields = []
    iss = gen.pick(ISS, ["https://other.example/", None, 5, [ISS]])
    if iss is not None:
        fields.append(f'"iss": {json.dumps(iss)}')
    aud = gen.pick(
        gen.rng.choice([AUD, [AUD], ["x", "other-api"]]), ["x", [], "", 5, [AUD, 5], None, {}]
    )
    if aud is not None:
        fields.append(f'"aud": {json.dumps(aud)}')
    times = (
        ("exp", NOW - LEEWAY, NOW + 600),
        ("nbf", NOW + LEEWAY, NOW),
        ("iat", NOW + LEEWAY, NOW),
    )
    for name, edge, good in times:
        present = gen.pick(True, [False]) if name == "exp" else gen.rng.random() < 0.5
        if present:
            fields.append(f'"{name}": {time_value(gen, edge, good)}')
    for name in ("sub", "jti"):
        if gen.rng.random() < 0.5:
            value = gen.pick('"alice"', ["5", "null", '""'])
            fields.append(f'"{name}": {value}')
    extra = gen.pick(
        None,
        [
            '"exp": 1',
            f'"exp": {int(NOW) + 600}',
            f'"iss": {json.dumps(ISS)}',
            '"scope": "a b"',
            '"x": NaN',
            '"x": [1, -Infinity]',
            '"x": {"y": 1, "y": 2}',
            '"x": "\\ud800"',
            '"x": 1e400',
        ],
    )
    if extra is not None:
        fields.append(extra)
    gen.rng.shuffle(fields)
    return fields


def encode_json(gen: Gen, fields: list[str]) -> bytes:
    text = "{" + ", ".join(fields) + "}"
    choice = gen.pick(
        gen.rng.choice(["utf-8", "ascii-escapes", "spaces"]),
        ["bom", "utf-16", "trailing", "cesu"],
    )
    if choice == "ascii-escapes":
        return text.replace("alice", "\\u0061lice").encode()
    if choice == "spaces":
        return f" \n\t{text}\r\n ".encode()
    if choice == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if choice == "utf-16":
        return text.encode("utf-16-le")
    if choice == "trailing":
        return (text + " x").encode()
    if choice == "cesu":  # a surrogate encoded on its own, as CESU-8 does
        return (text[:-1] + ', "c": "\ud83d"}').encode("utf-8", "surrogatepass")
    return text.encode()


def encode_segment(gen: Gen, data: bytes) -> str:
    segment = b64(data)
    choice = gen.pick("plain", ["padded", "bad-pad", "std-alphabet", "noncanonical", "junk"])
    if choice == "padded":
        return segment + "=" * (-len(segment) % 4)
    if choice == "bad-pad":
        return segment + "==="
    if choice == "std-alphabet":
        return segment.replace("-", "+").replace("_", "/")
    if choice == "noncanonical" and segment:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        return segment[:-1] + gen.rng.choice(alphabet)
    if choice == "junk":
        position = gen.rng.randrange(len(segment) + 1)
        return segment[:position] + gen.rng.choice(".!é ") + segment[position:]
    return segment


def mutate_signature(gen: Gen, signature: bytes, message: bytes) -> bytes:
    rng = gen.rng
    choice = gen.pick("good", ["flip", "truncate", "extend", "empty", "other-alg"])
    if choice == "flip" and signature:
        i = rng.randrange(len(signature))
        return signature[:i] + bytes([signature[i] ^ 1 << rng.randrange(8)]) + signature[i + 1 :]
    if choice == "truncate":
        return signature[: rng.randrange(len(signature) + 1)]
    if choice == "extend":
        return signature + b"\x00"
    if choice == "empty":
        return b""
    if choice == "other-alg":
        return sign(rng.choice(ALGS), message)
    return signature


def corpus(seed: int, count: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(count):
        gen = Gen(rng)
        alg = gen.pick(rng.choice(ALGS), ["none", "None", "HS1024", "", "rs256", "ES256K"])
        header = encode_json(gen, header_fields(gen, alg))
        payload = encode_json(gen, claim_fields(gen))
        signing_input = f"{encode_segment(gen, header)}.{encode_segment(gen, payload)}"
        message = signing_input.encode()
        signature = mutate_signature(gen, sign(alg, message), message)
        yield f"{signing_input}.{encode_segment(gen, signature)}"


def compare(verifier: Stockade, token: str, seen: Counter[str]) -> None:
    ours = verifier.judge(token)
    theirs = pyjwt_claims(token)
    if isinstance(ours, dict):
        assert theirs is not None, f"stockade accepted what PyJWT refuses: {token}"
        assert ours == theirs, token
        seen["both accept"] += 1
    elif theirs is None:
        seen["both refuse"] += 1
    else:
        why = stricter_because(token, ours, theirs)
        assert why is not None, f"stockade refused ({ours}) what PyJWT accepts: {token}"
        seen[why] += 1


def test_generated_tokens_stockade_never_accepts_what_pyjwt_refuses(tmp_path: Path) -> None:
    seen: Counter[str] = Counter()
    with stockade(tmp_path) as verifier:
        for token in corpus(seed=2024, count=CORPUS):
            compare(verifier, token, seen)
    # the corpus reaches every deliberate difference, and agreement both ways
    assert set(STRICTER) <= set(seen), seen
    assert seen["both accept"] > CORPUS // 10 and seen["both refuse"] > CORPUS // 10, seen


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stockade]:
    with stockade(tmp_path_factory.mktemp("keys")) as verifier:
        yield verifier


@given(
    exp=st.one_of(
        st.integers(-(10**20), 10**20),
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(NOW - 100, NOW + 100),
    ),
    nbf=st.one_of(st.none(), st.floats(NOW - 100, NOW + 100), st.integers(0, 2 * 10**9)),
    iat=st.one_of(st.none(), st.floats(allow_nan=True), st.integers(-5, 2 * 10**9)),
)
def test_time_claims_against_pyjwt(shared: Stockade, exp: Any, nbf: Any, iat: Any) -> None:
    """Any number in exp/nbf/iat (NaN, infinities and fractions at the edges included):
    stockade accepts only what PyJWT accepts."""
    claims: dict[str, Any] = {"iss": ISS, "aud": AUD, "exp": exp}
    if nbf is not None:
        claims["nbf"] = nbf
    if iat is not None:
        claims["iat"] = iat
    header = b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    signing_input = f"{header}.{b64(json.dumps(claims).encode())}"  # NaN as NaN, inf as Infinity
    token = f"{signing_input}.{b64(sign('HS256', signing_input.encode()))}"
    compare(shared, token, Counter())
