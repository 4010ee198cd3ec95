"""API keys: generation, verification of presented keys, and keys-file loading."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path

import pytest

from stockade.proxy import api_keys
from stockade.proxy.api_keys import (
    MAX_PRESENTED_LEN,
    ApiKeyEntry,
    ApiKeyError,
    ApiKeyStore,
    entry_to_toml,
    generate_key,
    load_api_keys_file,
    parse_entries,
)


def test_generate_and_verify_round_trip() -> None:
    key, entry = generate_key("acme", "gold")
    store = ApiKeyStore([entry, generate_key("other", "free")[1]])
    assert store.verify(key) == entry
    assert key.startswith(f"stk_{entry.key_id}_")
    assert entry.consumer == "acme" and entry.plan == "gold"
    assert len(entry.salt) == 16 and len(entry.digest) == 32
    secret = key.split("_", 2)[2]
    assert secret.encode() not in entry_to_toml(entry).encode()


def test_generated_keys_differ() -> None:
    (key_a, a), (key_b, b) = generate_key("acme", "gold"), generate_key("acme", "gold")
    assert key_a != key_b and a.key_id != b.key_id and a.salt != b.salt


def test_secret_containing_underscores_and_dashes() -> None:
    # token_urlsafe secrets may contain "_" and "-": only the first two "_" split.
    salt = b"s" * 16
    secret = "a_b-c__d_"
    entry = ApiKeyEntry("abcdefgh", salt, api_keys._digest(salt, secret), "c", "p")
    store = ApiKeyStore([entry])
    assert store.verify(f"stk_abcdefgh_{secret}") == entry
    assert store.verify("stk_abcdefgh_a_b-c__d") is None


def test_bad_names_refused_by_generate() -> None:
    for consumer, plan in (("", "p"), ("a b", "p"), ("c", "x" * 65), ("c", "ü")):
        with pytest.raises(ApiKeyError):
            generate_key(consumer, plan)


@pytest.fixture(scope="module")
def issued() -> tuple[str, ApiKeyEntry, ApiKeyStore]:
    key, entry = generate_key("acme", "gold")
    return key, entry, ApiKeyStore([entry])


Mangle = Callable[[str, str], str]

REJECTED: list[tuple[str, Mangle]] = [
    ("empty", lambda key, kid: ""),
    ("wrong secret", lambda key, kid: key[:-1] + ("A" if key[-1] != "A" else "B")),
    ("secret truncated", lambda key, kid: key[:-1]),
    ("secret extended", lambda key, kid: key + "x"),
    ("unknown id", lambda key, kid: key.replace(kid, "zzzzzzzz", 1)),
    ("no prefix", lambda key, kid: key[len("stk_") :]),
    ("other prefix", lambda key, kid: "sk_" + key[len("stk_") :]),
    ("prefix only", lambda key, kid: "stk_"),
    ("no secret", lambda key, kid: f"stk_{kid}_"),
    ("no secret separator", lambda key, kid: f"stk_{kid}"),
    ("upper-case prefix", lambda key, kid: "STK_" + key[len("stk_") :]),
    ("bearer prefix kept", lambda key, kid: "Bearer " + key),
    ("non-ascii", lambda key, kid: key + "é"),
    ("lone surrogate", lambda key, kid: key + "\ud800"),
    ("oversized", lambda key, kid: key + "A" * MAX_PRESENTED_LEN),
]


@pytest.mark.parametrize(("name", "mangle"), REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected(name: str, mangle: Mangle, issued: tuple[str, ApiKeyEntry, ApiKeyStore]) -> None:
    key, entry, store = issued
    presented = mangle(key, entry.key_id)
    assert presented != key
    assert store.verify(presented) is None


def test_oversized_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    key, entry = generate_key("acme", "gold")
    store = ApiKeyStore([entry])

    def no_hashing(*args: object) -> bytes:
        raise AssertionError("hashed an oversized key")

    monkeypatch.setattr(api_keys, "_digest", no_hashing)
    assert store.verify(key + "_" * (MAX_PRESENTED_LEN - len(key) + 1)) is None


def test_digest_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    key, entry = generate_key("acme", "gold")
    store = ApiKeyStore([entry])
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert store.verify(key) == entry
    assert store.verify(key + "x") is None
    assert len(calls) == 2
    assert all(b == entry.digest for _, b in calls)


def test_store_refuses_duplicate_ids() -> None:
    _, entry = generate_key("acme", "gold")
    with pytest.raises(ApiKeyError, match=entry.key_id):
        ApiKeyStore([entry, entry])


# --- parsing and files -------------------------------------------------------


def good_raw() -> dict[str, object]:
    return {
        "key_id": "abcd1234",
        "salt": "00" * 16,
        "digest": "11" * 32,
        "consumer": "acme",
        "plan": "gold",
    }


def test_entry_to_toml_parses_back(tmp_path: Path) -> None:
    key, entry = generate_key("acme.eu", "gold-1")
    path = tmp_path / "keys.toml"
    path.write_text(entry_to_toml(entry) + "\n" + entry_to_toml(generate_key("b", "c")[1]))
    loaded = load_api_keys_file(path)
    assert loaded[0] == entry and len(loaded) == 2
    assert ApiKeyStore(loaded).verify(key) == entry


def test_entry_to_toml_other_table() -> None:
    _, entry = generate_key("acme", "gold")
    assert entry_to_toml(entry, "proxy.auth.api_keys").startswith("[[proxy.auth.api_keys]]\n")


def with_field(**changes: object) -> dict[str, object]:
    raw = good_raw()
    for name, value in changes.items():
        if value is None:
            del raw[name]
        else:
            raw[name] = value
    return raw


BAD_ENTRIES = [
    ("missing field", with_field(digest=None), "missing digest"),
    ("unknown field", with_field(secret="x"), "unknown field secret"),
    ("key_id upper", with_field(key_id="ABCD1234"), "bad key_id"),
    ("key_id short", with_field(key_id="abc"), "bad key_id"),
    ("key_id not str", with_field(key_id=12345678), "key_id must be a string"),
    ("salt not hex", with_field(salt="zz" * 16), "salt is not valid hex"),
    ("salt short", with_field(salt="00" * 8), "salt must be 16-64 bytes"),
    ("digest short", with_field(digest="11" * 31), "digest must be 32 bytes"),
    ("digest not str", with_field(digest=5), "digest must be a hex string"),
    ("bad consumer", with_field(consumer="a b"), "bad consumer"),
    ("bad plan", with_field(plan=""), "bad plan"),
]


@pytest.mark.parametrize(("name", "raw", "message"), BAD_ENTRIES, ids=[b[0] for b in BAD_ENTRIES])
def test_parse_entries_errors(name: str, raw: dict[str, object], message: str) -> None:
    with pytest.raises(ApiKeyError) as err:
        parse_entries([good_raw() | {"key_id": "other123"}, raw], "cfg.toml")
    assert str(err.value).startswith("cfg.toml entry 1")
    assert message in str(err.value)


def test_parse_entries_not_a_table() -> None:
    with pytest.raises(ApiKeyError, match=r"^here entry 0: must be a table"):
        parse_entries(["x"], "here")  # type: ignore[list-item]


def test_parse_entries_duplicate_id() -> None:
    with pytest.raises(
        ApiKeyError, match=r"^w entry 1 \(abcd1234\): duplicate key_id, also entry 0"
    ):
        parse_entries([good_raw(), good_raw()], "w")


FILE_CASES = [
    ("bad toml", "[[keys]\n", ": not valid TOML"),
    ("keys not tables", 'keys = "x"\n', ": keys must be [[keys]] tables"),
    ("unknown top level", "[other]\n", ": unknown top-level key other; expected [[keys]]"),
    (
        "missing field",
        '[[keys]]\nkey_id = "abcd1234"\n',
        " entry 0: missing salt, digest, consumer, plan",
    ),
    (
        "bad hex",
        entry_to_toml(ApiKeyEntry("abcd1234", b"s" * 16, b"d" * 32, "a", "b")).replace(
            'salt = "', 'salt = "zz'
        ),
        " entry 0 (abcd1234): salt is not valid hex",
    ),
    (
        "duplicate id",
        entry_to_toml(ApiKeyEntry("abcd1234", b"s" * 16, b"d" * 32, "a", "b")) * 2,
        " entry 1 (abcd1234): duplicate key_id, also entry 0",
    ),
]


@pytest.mark.parametrize(("name", "text", "after"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_file_errors_name_the_file(tmp_path: Path, name: str, text: str, after: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ApiKeyError) as err:
        load_api_keys_file(path)
    assert str(err.value).startswith(f"{path}{after}")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ApiKeyError, match=rf"^{path}: cannot read: No such file"):
        load_api_keys_file(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ApiKeyError, match="not UTF-8"):
        load_api_keys_file(path)


def test_empty_file_has_no_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text("")
    assert load_api_keys_file(path) == []
