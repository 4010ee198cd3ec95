"""Micro-benchmark of JwtVerifier.verify() in one process: microseconds per verification.

Two cases, each over a fixed set of tokens made up front (bounded: no load
generator, no network, the keys in a temporary PEM/JWK file):

  new tokens      --tokens distinct tokens, each verified once by a fresh
                  verifier: every one pays the parse, the signature check and
                  the claim checks (the cache only gets filled)
  repeated token  one token verified --tokens times: the verified-token cache

Side by side in one invocation, in a shuffled order each round:

  current         proxy/jwt_auth.py as it is in the working tree
  baseline        proxy/jwt_auth.py at git revision --baseline (default: the
                  PyJWT path, before the direct `cryptography` verification),
                  loaded from `git show` into a module of its own. Only for
                  comparison: nothing else ever imports it.

Prints the median over --rounds of the per-token mean of each round, and the
min-max spread. The host is shared and noisy: trust the medians.
--profile runs cProfile over one pass of the new tokens of each variant and
prints the top functions by total time.

Run: .venv/bin/python -m bench.jwt_verify_micro [--alg RS256] [--tokens 5000] [--rounds 7]
     [--baseline REV | --baseline none] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from stockade.clock import FakeClock
from stockade.proxy import jwt_auth

ROOT = Path(__file__).resolve().parent.parent
# proxy/jwt_auth.py before the direct `cryptography` path: every token through PyJWT
BASELINE_REV = "97a24441fa2a221331875cd8e31e16a76e1da314"
ISSUER = "https://bench.test/"
AUDIENCE = "bench"
SECRET = b"b" * 32
TOKENS = 5_000
ROUNDS = 7
ALGS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA", "HS256")
COMMAND = ".venv/bin/python -m bench.jwt_verify_micro"


def load_baseline(rev: str) -> types.ModuleType:
    """proxy/jwt_auth.py at `rev` as a module of its own (the tree is not touched)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:proxy/jwt_auth.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = "stockade.proxy._jwt_auth_baseline"
    module = types.ModuleType(name)
    module.__file__ = f"{rev[:12]}:proxy/jwt_auth.py"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def private_key(alg: str) -> Any:
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return SECRET


def make_tokens(alg: str, key: Any, count: int, now: int) -> list[str]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "scope": "orders:read orders:write",
    }
    headers = {"kid": "k1"}
    return [
        pyjwt.encode({**base, "sub": f"user-{n}"}, key, algorithm=alg, headers=headers)
        for n in range(count)
    ]


def issuer_config(module: types.ModuleType, alg: str, key_file: Path | None) -> Any:
    return module.IssuerConfig(
        name="bench",
        issuer=ISSUER,
        audience=(AUDIENCE,),
        algorithms=(alg,),
        key_files=(key_file,) if key_file is not None else (),
        hs256_secret=SECRET if alg == "HS256" else None,
        required_claims=("exp", "sub"),
    )


async def new_verifier(module: types.ModuleType, config: Any, clock: FakeClock) -> Any:
    verifier = module.JwtVerifier([config], clock)
    await verifier.start()
    return verifier


async def time_new_tokens(
    module: types.ModuleType, config: Any, clock: FakeClock, tokens: Sequence[str]
) -> float:
    """Mean microseconds per token, each token new to a fresh verifier."""
    verifier = await new_verifier(module, config, clock)
    try:
        verify = verifier.verify
        gc.collect()
        start = time.perf_counter_ns()
        for token in tokens:
            await verify(token)
        elapsed = time.perf_counter_ns() - start
    finally:
        await verifier.close()
    return elapsed / len(tokens) / 1000


async def time_repeated(
    module: types.ModuleType, config: Any, clock: FakeClock, token: str, count: int
) -> float:
    verifier = await new_verifier(module, config, clock)
    try:
        verify = verifier.verify
        await verify(token)  # into the cache
        gc.collect()
        start = time.perf_counter_ns()
        for _ in range(count):
            await verify(token)
        elapsed = time.perf_counter_ns() - start
    finally:
        await verifier.close()
    return elapsed / count / 1000


async def profile_new_tokens(
    module: types.ModuleType, config: Any, clock: FakeClock, tokens: Sequence[str]
) -> str:
    verifier = await new_verifier(module, config, clock)
    profiler = cProfile.Profile()
    try:
        verify = verifier.verify
        profiler.enable()
        for token in tokens:
            await verify(token)
        profiler.disable()
    finally:
        await verifier.close()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(18)
    return out.getvalue()


def summary(samples: Sequence[float]) -> str:
    return (
        f"{statistics.median(samples):8.1f} us  "
        f"(min {min(samples):.1f}, max {max(samples):.1f}, n={len(samples)})"
    )


async def run(args: argparse.Namespace) -> int:
    variants: dict[str, types.ModuleType] = {"current": jwt_auth}
    if args.baseline != "none":
        variants["baseline"] = load_baseline(args.baseline)
    clock = FakeClock()
    now = int(clock.wall())
    key = private_key(args.alg)
    print(f"making {args.tokens} {args.alg} tokens ...", file=sys.stderr, flush=True)
    tokens = make_tokens(args.alg, key, args.tokens, now)
    # check every variant accepts them (and refuses a forged one) before timing anything
    with tempfile.TemporaryDirectory() as tmp:
        key_file: Path | None = None
        if args.alg != "HS256":
            key_file = Path(tmp) / "bench-key.pem"
            key_file.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        configs = {name: issuer_config(m, args.alg, key_file) for name, m in variants.items()}
        header, payload, signature = tokens[0].split(".")
        forged_payload = json.loads(pyjwt.utils.base64url_decode(payload))
        forged_payload["sub"] = "root"
        forged_segment = pyjwt.utils.base64url_encode(json.dumps(forged_payload).encode())
        forged = f"{header}.{forged_segment.decode()}.{signature}"
        for name, module in variants.items():
            verifier = await new_verifier(module, configs[name], clock)
            try:
                claims = await verifier.verify(tokens[-1])
                assert claims["sub"] == f"user-{args.tokens - 1}", name
                try:
                    await verifier.verify(forged)
                except module.JwtError as exc:
                    assert exc.reason == "bad_signature", (name, exc.reason)
                else:
                    raise AssertionError(f"{name} accepted a forged token")
            finally:
                await verifier.close()

        if args.profile:
            for name, module in variants.items():
                print(f"== cProfile, {name}, {len(tokens)} new {args.alg} tokens")
                print(await profile_new_tokens(module, configs[name], clock, tokens))

        new: dict[str, list[float]] = {name: [] for name in variants}
        repeated: dict[str, list[float]] = {name: [] for name in variants}
        cases = [(name, case) for name in variants for case in ("new", "repeated")]
        for round_ in range(args.rounds):
            random.shuffle(cases)
            for name, case in cases:
                module, config = variants[name], configs[name]
                if case == "new":
                    new[name].append(await time_new_tokens(module, config, clock, tokens))
                else:
                    repeated[name].append(
                        await time_repeated(module, config, clock, tokens[0], len(tokens))
                    )
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    baseline = f" (baseline: {args.baseline[:12]})" if args.baseline != "none" else ""
    print(f"{args.alg}, {len(tokens)} tokens, {args.rounds} rounds{baseline}")
    print("median per verification over the rounds:")
    for name in variants:
        print(f"  {name:8} new token      {summary(new[name])}")
        print(f"  {name:8} repeated token {summary(repeated[name])}")
    if "baseline" in variants:
        ratios = [b / c for b, c in zip(new["baseline"], new["current"], strict=True)]
        print(f"  new token: baseline / current = {statistics.median(ratios):.2f}x per round")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--alg", choices=ALGS, default="RS256")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--baseline",
        default=BASELINE_REV,
        help="git revision of proxy/jwt_auth.py to compare with, or 'none'",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one pass first")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.rounds < 1:
        parser.error("--tokens and --rounds must be at least 1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
