"""What a node trusts from Redis: HMAC-signed ban events, ban records and heartbeats.

Every change a node publishes (a ban or an unban) is signed with the cluster
key: HMAC-SHA256 over, length-prefixed, a version label, the key prefix, the
publishing node, the action, the target, the publish time, a random nonce
and the ban record (whose JSON holds reason, source, origin node, created,
expiry, rule and details). The same signature travels with the stream event
and with the durable record (or the unban's tombstone) that a joining node
reads, so nothing a node applies from Redis is unsigned: a Redis writer
without the key can delete, but not invent, change or rename anything.

A signature is "v1.<key id>.<hex tag>"; the key id (an HMAC of a fixed label
under the key) says which key signed, without revealing it, so a node can tell
a key it lacks (rotation in progress) from a forged tag. Tags are compared in
constant time. The key files are read by the controller only (at start and on
reload), refused when group or others may read them, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stockade.cluster_settings import ClusterAccept, ClusterAuth, ClusterConfig

VERSION = "v1"
LABEL = b"stockade-cluster-v1"
MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 4096
NONCE_BYTES = 16
REFUSAL_LOG_INTERVAL = 60.0  # a refusal is logged once per origin per this many seconds
MAX_LOGGED_ORIGINS = 64  # more origins than this in one interval share one log line
MAX_NONCES = 200_000  # nonces remembered for the replay window (oldest forgotten first)

# Why a node refused something it read from Redis: the metric's `reason` label.
UNSIGNED = "unsigned"  # no signature, and accept_unsigned is off
UNKNOWN_KEY = "unknown_key"  # signed with a key this node does not hold
BAD_TAG = "bad_tag"  # the signature does not match the content
UNKNOWN_NODE = "unknown_node"  # a publisher (or origin) not in [cluster.auth] nodes
REPLAYED = "replayed"  # outside the replay window, a nonce seen before, or stale
MALFORMED = "malformed"  # does not parse
INVALID = "invalid"  # fails the validation a local ban gets (prefix, TTL, reason, ...)
ALLOWLISTED = "allowlisted"  # inside this node's allowlist or management networks
NOT_ACCEPTED = "not_accepted"  # [cluster.accept] says no to this source or unban
REASONS = (
    UNSIGNED,
    UNKNOWN_KEY,
    BAD_TAG,
    UNKNOWN_NODE,
    REPLAYED,
    MALFORMED,
    INVALID,
    ALLOWLISTED,
    NOT_ACCEPTED,
)


class KeyFileError(RuntimeError):
    """A cluster key file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ClusterKey:
    kid: str
    secret: bytes = field(repr=False)


def key_id(secret: bytes) -> str:
    return hmac.new(secret, b"stockade-cluster-key-id", hashlib.sha256).hexdigest()[:16]


def load_key(path: Path, setting: str) -> ClusterKey:
    """Read one key file, as ssh reads a private key: a regular file that only its
    owner (root or this process's user) may read, holding at least MIN_KEY_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise KeyFileError(
            f"{setting}: cannot open {path}: {exc.strerror}"
            + (" (a symlink is refused)" if exc.errno == 40 else "")
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{setting}: {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"{setting}: {path} is mode {stat.S_IMODE(info.st_mode):04o}: group or others "
                f"may read it; `chmod 600 {path}`"
            )
        if info.st_uid not in (0, os.geteuid()):
            raise KeyFileError(
                f"{setting}: {path} belongs to uid {info.st_uid}, not root or this process's "
                "user; `chown root {path}`"
            )
        data = os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)
    secret = data.strip()
    if len(data) > MAX_KEY_BYTES:
        raise KeyFileError(f"{setting}: {path} is over {MAX_KEY_BYTES} bytes; not a key file")
    if len(secret) < MIN_KEY_BYTES:
        raise KeyFileError(
            f"{setting}: {path} holds {len(secret)} bytes; at least {MIN_KEY_BYTES} "
            "(e.g. `openssl rand -hex 32`)"
        )
    return ClusterKey(key_id(secret), secret)


@dataclass(frozen=True)
class Keyring:
    """The key this node signs with, and every key it accepts (its own included)."""

    signing: ClusterKey | None
    accepted: dict[str, ClusterKey]

    @property
    def enabled(self) -> bool:
        return self.signing is not None


def load_keyring(auth: ClusterAuth) -> Keyring:
    """The keys [cluster.auth] names (KeyFileError when any cannot be used)."""
    if auth.key_file is None:
        return Keyring(None, {})
    signing = load_key(auth.key_file, "cluster.auth.key_file")
    accepted = {signing.kid: signing}
    for path in auth.accept_key_files:
        key = load_key(path, "cluster.auth.accept_key_files")
        accepted[key.kid] = key
    return Keyring(signing, accepted)


@dataclass(frozen=True)
class Trust:
    """Everything a node checks what it reads from Redis against; replaced whole on reload."""

    keyring: Keyring
    auth: ClusterAuth
    accept: ClusterAccept

    @property
    def signs(self) -> bool:
        return self.keyring.enabled

    @property
    def unsigned_ok(self) -> bool:
        """Whether unsigned data is applied: no key at all (insecure), or a migration."""
        return not self.keyring.enabled or self.auth.accept_unsigned


def _message(fields: tuple[str, ...]) -> bytes:
    """Length-prefixed, so no field can run into the next."""
    out = [b"%d:%s" % (len(LABEL), LABEL)]
    for text in fields:
        data = text.encode("utf-8", "surrogatepass")
        out.append(b"%d:%s" % (len(data), data))
    return b"".join(out)


@dataclass(frozen=True)
class Signed:
    """The fields a signature binds: one change (or heartbeat) as published."""

    prefix: str  # cluster.key_prefix: a record of one cluster is not valid in another
    node: str  # the publisher
    action: str  # "ban", "unban" or "alive" (a heartbeat)
    target: str
    at: str  # the publish time (wall clock, seconds, as text)
    nonce: str
    record: str  # the ban record JSON ("" for an unban or a heartbeat's body)

    def message(self) -> bytes:
        return _message(
            (self.prefix, self.node, self.action, self.target, self.at, self.nonce, self.record)
        )


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def sign(key: ClusterKey, signed: Signed) -> str:
    tag = hmac.new(key.secret, signed.message(), hashlib.sha256).hexdigest()
    return f"{VERSION}.{key.kid}.{tag}"


def verify(keyring: Keyring, signed: Signed, signature: str) -> str | None:
    """None when `signature` is a valid tag over `signed` by an accepted key; else why not."""
    version, _, rest = signature.partition(".")
    kid, _, tag = rest.partition(".")
    if version != VERSION or not kid or not tag:
        return MALFORMED
    key = keyring.accepted.get(kid)
    if key is None:
        return UNKNOWN_KEY
    expected = hmac.new(key.secret, signed.message(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), tag.encode("utf-8", "replace")):
        return BAD_TAG
    return None


class NonceMemory:
    """Nonces seen within the replay window: an event signed once is applied once."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_time(self, nonce: str) -> bool:
        now = self.clock()
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at <= 2 * self.window and len(self._seen) < MAX_NONCES:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


def shown_origin(node: object) -> str:
    """A claimed node name as it may appear in a log line (it comes from Redis)."""
    text = str(node)[:64]
    return text if text.isprintable() and text.isascii() else repr(text)


@dataclass
class _Pending:
    first: float
    count: int = 0
    reasons: set[str] = field(default_factory=set)


class RefusalLog:
    """Log a refusal once per origin per REFUSAL_LOG_INTERVAL; the rest are counted into
    the next line for that origin. Bounded: a flood of invented origins shares one line."""

    def __init__(self, log: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.log = log
        self.clock = clock
        self._last: dict[str, _Pending] = {}

    def flush(self) -> None:
        """Log the counts of origins whose interval is over (called on every heartbeat)."""
        now = self.clock()
        for name, entry in list(self._last.items()):
            if now - entry.first >= REFUSAL_LOG_INTERVAL:
                if entry.count:
                    self.log(
                        f"cluster: refused {entry.count} more from {name} in the last "
                        f"{REFUSAL_LOG_INTERVAL:g}s ({', '.join(sorted(entry.reasons))})"
                    )
                del self._last[name]

    def refused(self, kind: str, origin: str, reason: str, detail: str) -> None:
        self.flush()
        now = self.clock()
        fits = origin in self._last or len(self._last) < MAX_LOGGED_ORIGINS
        key = origin if fits else "(other origins)"
        entry = self._last.get(key)
        if entry is None:
            self._last[key] = _Pending(now)
            self.log(
                f"cluster: refused {'an' if kind[0] in 'aeiou' else 'a'} {kind} from {key} "
                f"({reason}): {detail}; further "
                f"refusals from it are logged at most once a minute "
                f"(stockade_cluster_refused_total)"
            )
            return
        entry.count += 1
        entry.reasons.add(reason)


def trust_from_config(cluster: ClusterConfig) -> Trust:
    """What cluster mode checks Redis against, keys read now (KeyFileError)."""
    return Trust(load_keyring(cluster.auth), cluster.auth, cluster.accept)
