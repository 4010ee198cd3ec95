"""API keys: generation, the stored form, and verification of a presented key.

A key handed out to a consumer reads ``stk_<key_id>_<secret>``. The key id is
public and names the entry; the secret is ``secrets.token_urlsafe(32)`` (256
random bits, URL-safe base64, so it may itself contain ``_`` and ``-``: a
presented key is split on its first two underscores only). The gateway stores
only a random salt and ``SHA-256(salt || secret)``, never the secret.

Why a fast salted SHA-256 and not a slow KDF (bcrypt, scrypt, Argon2): those
exist to slow down guessing of low-entropy passwords. These secrets are 256
random bits, which no amount of hashing speed lets anyone brute-force, so a
slow KDF would add nothing against guessing while costing every request
milliseconds of CPU. SHA-256 over ~60 bytes is about a microsecond, so there
is no verified-key cache either. The salt keeps equal secrets (which should not
happen) from having equal digests, and makes a leaked keys file useless for
precomputed tables.

Lookup is by key id in a dict, so verifying costs one hash whatever the number
of keys, and the digest comparison uses ``hmac.compare_digest`` so its timing
does not tell how much of a guessed digest matched. Input longer than
``MAX_PRESENTED_LEN`` is refused before any parsing or hashing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PREFIX = "stk"
MAX_PRESENTED_LEN = 256
KEY_ID_RE = re.compile(r"[a-z0-9]{8,32}")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SALT_MIN_BYTES = 16
SALT_MAX_BYTES = 64
DIGEST_BYTES = hashlib.sha256().digest_size
FIELDS = ("key_id", "salt", "digest", "consumer", "plan")


class ApiKeyError(ValueError):
    """A bad keys file or key entry; the message names the file and the entry."""


@dataclass(frozen=True)
class ApiKeyEntry:
    key_id: str  # public part, [a-z0-9]{8,32}
    salt: bytes
    digest: bytes  # SHA-256(salt || secret); the secret itself is never stored
    consumer: str  # consumer id forwarded upstream
    plan: str  # used by rate limits and quotas


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("ascii")).digest()


def _bad_name(what: str, value: str) -> str:
    return f"bad {what} {value!r}: use 1-64 of A-Z a-z 0-9 _ . -"


def check_name(what: str, value: str) -> str:
    """Return `value` if it is a valid consumer or plan name, else raise ApiKeyError."""
    if not NAME_RE.fullmatch(value):
        raise ApiKeyError(_bad_name(what, value))
    return value


def generate_key(consumer: str, plan: str) -> tuple[str, ApiKeyEntry]:
    """A new key for `consumer` on `plan`: (the key to hand out once, its stored entry)."""
    check_name("consumer", consumer)
    check_name("plan", plan)
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(SALT_MIN_BYTES)
    entry = ApiKeyEntry(key_id, salt, _digest(salt, secret), consumer, plan)
    return f"{PREFIX}_{key_id}_{secret}", entry


def entry_to_toml(entry: ApiKeyEntry, table: str = "keys") -> str:
    """The entry as a TOML array-of-tables item (``[[keys]]`` by default).

    Pass ``table="proxy.auth.api_keys"`` for an entry in the main config.
    All values are restricted names or hex, so they need no escaping.
    """
    return (
        f"[[{table}]]\n"
        f'key_id = "{entry.key_id}"\n'
        f'salt = "{entry.salt.hex()}"\n'
        f'digest = "{entry.digest.hex()}"\n'
        f'consumer = "{entry.consumer}"\n'
        f'plan = "{entry.plan}"\n'
    )


def _hex_field(raw: object, name: str, at: str, lo: int, hi: int) -> bytes:
    if not isinstance(raw, str):
        raise ApiKeyError(f"{at}: {name} must be a hex string")
    try:
        value = bytes.fromhex(raw)
    except ValueError:
        raise ApiKeyError(f"{at}: {name} is not valid hex") from None
    if not lo <= len(value) <= hi:
        size = f"{lo}" if lo == hi else f"{lo}-{hi}"
        raise ApiKeyError(f"{at}: {name} must be {size} bytes, got {len(value)}")
    return value


def _str_field(item: dict[str, object], name: str, at: str) -> str:
    value = item[name]
    if not isinstance(value, str):
        raise ApiKeyError(f"{at}: {name} must be a string")
    return value


def _name_field(item: dict[str, object], name: str, at: str) -> str:
    value = _str_field(item, name, at)
    if not NAME_RE.fullmatch(value):
        raise ApiKeyError(f"{at}: {_bad_name(name, value)}")
    return value


def parse_entries(raw: list[dict[str, object]], where: str) -> list[ApiKeyEntry]:
    """Validate raw TOML tables into entries; errors read ``<where> entry <i>: ...``."""
    entries: list[ApiKeyEntry] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(raw):
        at = f"{where} entry {index}"
        if not isinstance(item, dict):
            raise ApiKeyError(f"{at}: must be a table")
        missing = [name for name in FIELDS if name not in item]
        if missing:
            raise ApiKeyError(f"{at}: missing {', '.join(missing)}")
        unknown = sorted(set(item) - set(FIELDS))
        if unknown:
            raise ApiKeyError(f"{at}: unknown field {', '.join(unknown)}")
        key_id = _str_field(item, "key_id", at)
        if not KEY_ID_RE.fullmatch(key_id):
            raise ApiKeyError(f"{at}: bad key_id {key_id!r}: use 8-32 of a-z 0-9")
        at = f"{at} ({key_id})"
        if key_id in seen:
            raise ApiKeyError(f"{at}: duplicate key_id, also entry {seen[key_id]}")
        seen[key_id] = index
        salt = _hex_field(item["salt"], "salt", at, SALT_MIN_BYTES, SALT_MAX_BYTES)
        digest = _hex_field(item["digest"], "digest", at, DIGEST_BYTES, DIGEST_BYTES)
        consumer = _name_field(item, "consumer", at)
        plan = _name_field(item, "plan", at)
        entries.append(ApiKeyEntry(key_id, salt, digest, consumer, plan))
    return entries


def load_api_keys_file(path: Path) -> list[ApiKeyEntry]:
    """Entries from a TOML file of ``[[keys]]`` tables; a file without any is empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ApiKeyError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ApiKeyError(f"{path}: not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ApiKeyError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"keys"})
    if unknown:
        raise ApiKeyError(f"{path}: unknown top-level key {', '.join(unknown)}; expected [[keys]]")
    raw = doc.get("keys", [])
    if not isinstance(raw, list):
        raise ApiKeyError(f"{path}: keys must be [[keys]] tables")
    return parse_entries(raw, str(path))


class ApiKeyStore:
    """Entries by key id; `verify` checks a presented key in constant work."""

    def __init__(self, entries: Iterable[ApiKeyEntry]) -> None:
        self._by_id: dict[str, ApiKeyEntry] = {}
        for entry in entries:
            if entry.key_id in self._by_id:
                raise ApiKeyError(f"duplicate key_id {entry.key_id!r}")
            self._by_id[entry.key_id] = entry

    def __len__(self) -> int:
        return len(self._by_id)

    def verify(self, presented: str) -> ApiKeyEntry | None:
        """The entry for a valid ``stk_<id>_<secret>``; None if malformed, unknown or wrong."""
        if len(presented) > MAX_PRESENTED_LEN or not presented.isascii():
            return None
        parts = presented.split("_", 2)  # the secret may contain "_"
        if len(parts) != 3 or parts[0] != PREFIX or not parts[2]:
            return None
        entry = self._by_id.get(parts[1])
        if entry is None:
            return None
        if not hmac.compare_digest(_digest(entry.salt, parts[2]), entry.digest):
            return None
        return entry
