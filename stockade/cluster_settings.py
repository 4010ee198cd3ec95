"""The [cluster] section: several gateway nodes sharing bans and counters through Redis.

[cluster]
backend = "redis"                     # "embedded" (default): this node alone, no server
url = "rediss://:secret@198.18.2.1:6380/0"   # redis://, rediss:// (TLS) or unix:///path
password_file = "/etc/stockade/redis.password"  # instead of a password in the url
node = "edge-1"                       # default: the host name
expected_nodes = 3                    # cluster limits fall back to limit / this
on_redis_down = "local"               # local, open or closed (limits, quotas, anomaly)

[cluster.auth]                        # what a node trusts from Redis (docs/cluster.md)
key_file = "/etc/stockade/cluster.key"   # HMAC key every node holds; required with redis
accept_key_files = []                 # key rotation: also accepted, never used to sign
nodes = ["edge-1", "edge-2"]          # who may publish ([] = any holder of the key)

[cluster.accept]                      # which of the other nodes' changes this node applies
bans = ["cli", "proxy", "rule", "kernel"]
unbans = "any"                        # any, received (only bans from the cluster) or none

An absent section, or backend = "embedded", keeps everything on the node
(SQLite and shared memory) and needs no server.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from stockade.config_fields import ConfigError, Section

BACKENDS = ("embedded", "redis")
# What cluster-scoped limits, quotas and anomaly counters do while Redis is away.
FALLBACKS = ("local", "open", "closed")
SCOPES = ("local", "cluster")
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_SCHEMES = ("redis", "rediss", "unix")
# The sources of another node's ban that a node can choose to apply ([cluster.accept] bans).
BAN_SOURCES = ("cli", "proxy", "rule", "kernel")  # kernel: rebuilt from the maps
# Which unbans from other nodes a node applies: every one, only those lifting a ban that
# came from the cluster (never one of this node's own), or none.
UNBAN_POLICIES = ("any", "received", "none")
MAX_REPLAY_WINDOW = 3600.0


@dataclass(frozen=True)
class ClusterTls:
    ca_file: Path | None = None  # None: the system's trust store
    cert_file: Path | None = None  # a client certificate, when Redis asks for one
    key_file: Path | None = None
    check_hostname: bool = True


@dataclass(frozen=True)
class ClusterAuth:
    """How ban events, ban records and heartbeats in Redis are authenticated
    (controller/cluster_auth.py). The keys are read by the controller at start and
    on reload, not here: the proxy shares this file and must not need them."""

    key_file: Path | None = None  # signs and verifies (HMAC-SHA256)
    accept_key_files: tuple[Path, ...] = ()  # verify only: a key being rotated in or out
    nodes: tuple[str, ...] = ()  # node names allowed to publish; () = any holder of the key
    replay_window: float = 30.0  # an event's signed time vs its stream entry's time
    accept_unsigned: bool = False  # migration only: apply unsigned data (still validated)
    insecure_unauthenticated: bool = False  # no key at all: everything in Redis is trusted

    @property
    def enabled(self) -> bool:
        return self.key_file is not None


@dataclass(frozen=True)
class ClusterAccept:
    """Which changes made on other nodes this node applies."""

    bans: tuple[str, ...] = BAN_SOURCES
    unbans: str = "any"


@dataclass(frozen=True)
class ClusterConfig:
    backend: str = "embedded"
    url: str = ""
    password: str | None = None  # from password_file (the url may carry one too)
    node: str = field(default_factory=lambda: default_node())
    key_prefix: str = "stockade:"
    timeout: float = 0.5  # every Redis call, connect included
    retry_interval: float = 1.0  # how often a degraded node tries Redis again
    expected_nodes: int = 1
    on_redis_down: str = "local"
    queue_max: int = 100_000  # ban events kept for replay while Redis is away
    stream_max: int = 100_000  # ban events kept in the stream (a node's catch-up horizon)
    heartbeat: float = 1.0  # how often a node says it is alive (peers, lag)
    tls: ClusterTls = field(default_factory=ClusterTls)
    auth: ClusterAuth = field(default_factory=ClusterAuth)
    accept: ClusterAccept = field(default_factory=ClusterAccept)

    @property
    def enabled(self) -> bool:
        return self.backend == "redis"

    def shown_url(self) -> str:
        """The url without its password, for status and logs."""
        return redact(self.url)


def default_node() -> str:
    name = socket.gethostname().split(".")[0] or "node"
    return name if _NODE.fullmatch(name) else "node"


def redact(url: str) -> str:
    """The url with any password (in the netloc or a ?password= query) shown as ***."""
    parts = urlsplit(url)
    if parts.password is not None:
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    query = "&".join(
        "password=***" if item.startswith("password=") else item
        for item in parts.query.split("&")
        if item
    )
    if parts.scheme == "unix":  # urlunsplit would drop the empty host's "//"
        return f"unix://{parts.path}" + (f"?{query}" if query else "")
    return parts._replace(query=query).geturl()


def _url(section: Section) -> str:
    url: str = section.get("url", str, "")
    if not url:
        raise ConfigError(
            f'{section.key("url")}: required with backend = "redis", '
            'e.g. "redis://198.18.2.1:6379/0" or "unix:///run/redis/redis.sock"'
        )
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"{section.key('url')}: scheme {parts.scheme or '(none)'!r}; "
            "use redis://, rediss:// (TLS) or unix://"
        )
    if parts.scheme == "unix" and not parts.path.startswith("/"):
        raise ConfigError(f"{section.key('url')}: a unix url needs an absolute socket path")
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ConfigError(f"{section.key('url')}: no host in {redact(url)!r}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ConfigError(f"{section.key('url')}: invalid port in {redact(url)!r}") from None
        db = parts.path.strip("/")
        if db and not (db.isascii() and db.isdigit()):  # str.isdigit takes any script's
            raise ConfigError(f"{section.key('url')}: the path must be a database number")
    return url


def _password(section: Section) -> str | None:
    if "password_file" not in section.table:
        section.known.add("password_file")
        return None
    path = section.path("password_file", Path())
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{section.key('password_file')}: cannot read {path}: {exc.strerror}"
        ) from None
    if not text:
        raise ConfigError(f"{section.key('password_file')}: {path} is empty")
    return text


def _optional_path(section: Section, key: str) -> Path | None:
    section.known.add(key)
    return section.path(key, Path()) if key in section.table else None


def _tls(section: Section) -> ClusterTls:
    tls = ClusterTls(
        ca_file=_optional_path(section, "ca_file"),
        cert_file=_optional_path(section, "cert_file"),
        key_file=_optional_path(section, "key_file"),
        check_hostname=section.get("check_hostname", bool, True),
    )
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError(f"{section.name}: give both cert_file and key_file, or neither")
    section.finish()
    return tls


def _names(section: Section, key: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    values = section.get(key, list, None)
    if values is None:
        return allowed or ()
    out: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ConfigError(f"{section.key(key)}: {value!r} is not a string")
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{section.key(key)}: {value!r}; use {', '.join(allowed)}")
        if allowed is None and not _NODE.fullmatch(value):
            raise ConfigError(f"{section.key(key)}: {value!r} is not a valid node name")
        if value not in out:
            out.append(value)
    return tuple(out)


def _auth(section: Section, backend: str, node: str) -> ClusterAuth:
    d = ClusterAuth()
    key_file = _optional_path(section, "key_file")
    accepted = []
    for text in section.get("accept_key_files", list, []):
        if not isinstance(text, str) or not text.startswith("/"):
            raise ConfigError(
                f"{section.key('accept_key_files')}: {text!r} is not an absolute path"
            )
        accepted.append(Path(text))
    auth = ClusterAuth(
        key_file=key_file,
        accept_key_files=tuple(accepted),
        nodes=_names(section, "nodes"),
        replay_window=section.duration("replay_window", d.replay_window),
        accept_unsigned=section.get("accept_unsigned", bool, d.accept_unsigned),
        insecure_unauthenticated=section.get(
            "insecure_unauthenticated", bool, d.insecure_unauthenticated
        ),
    )
    section.finish()
    if not 1.0 <= auth.replay_window <= MAX_REPLAY_WINDOW:
        raise ConfigError(f"{section.key('replay_window')}: between 1s and 1h")
    if auth.insecure_unauthenticated and auth.enabled:
        raise ConfigError(
            f"{section.name}: key_file and insecure_unauthenticated = true together; "
            "remove insecure_unauthenticated (the key is used)"
        )
    if not auth.enabled and (auth.accept_key_files or auth.accept_unsigned):
        raise ConfigError(
            f"{section.name}: accept_key_files and accept_unsigned need a key_file "
            "(this node's own key)"
        )
    if backend != "redis":
        return auth
    if not auth.enabled and not auth.insecure_unauthenticated:
        raise ConfigError(
            f'{section.key("key_file")}: required with backend = "redis": without it any '
            "client that can write to Redis can ban or unban on every node. Create one "
            "(umask 077; openssl rand -hex 32 > /etc/stockade/cluster.key), copy it to "
            "every node, or set insecure_unauthenticated = true to trust everything in "
            "Redis (docs/cluster.md, Trust model)"
        )
    if auth.nodes and node not in auth.nodes:
        raise ConfigError(
            f"{section.key('nodes')}: this node ({node!r}) is not in the list; add it, "
            "or the others refuse what it publishes"
        )
    return auth


def _accept(section: Section) -> ClusterAccept:
    d = ClusterAccept()
    unbans = section.get("unbans", str, d.unbans)
    if unbans not in UNBAN_POLICIES:
        raise ConfigError(f"{section.key('unbans')}: {unbans!r}; use {', '.join(UNBAN_POLICIES)}")
    accept = ClusterAccept(bans=_names(section, "bans", BAN_SOURCES), unbans=unbans)
    section.finish()
    return accept


def parse_cluster(section: Section) -> ClusterConfig:
    d = ClusterConfig()
    backend = section.get("backend", str, d.backend)
    if backend not in BACKENDS:
        raise ConfigError(f"{section.key('backend')}: {backend!r}; use embedded or redis")
    node = section.get("node", str, "") or d.node
    if not _NODE.fullmatch(node):
        raise ConfigError(
            f"{section.key('node')}: {node!r}; letters, digits, _ . - (at most 64, "
            "starting with a letter or digit)"
        )
    prefix = section.get("key_prefix", str, d.key_prefix)
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(f"{section.key('key_prefix')}: letters, digits, _ . : - only")
    fallback = section.get("on_redis_down", str, d.on_redis_down)
    if fallback not in FALLBACKS:
        raise ConfigError(
            f"{section.key('on_redis_down')}: {fallback!r}; use local, open or closed"
        )
    timeout = section.duration("timeout", d.timeout)
    if timeout > 10:
        raise ConfigError(f"{section.key('timeout')}: at most 10s (a Redis call never hangs)")
    url = _url(section) if backend == "redis" else section.get("url", str, "")
    tls = _tls(section.subsection("tls"))
    if url and urlsplit(url).scheme != "rediss" and tls != ClusterTls():
        raise ConfigError(f"{section.name}.tls: set, but the url is not rediss:// (TLS)")
    config = ClusterConfig(
        backend=backend,
        url=url,
        password=_password(section),
        node=node,
        key_prefix=prefix,
        timeout=timeout,
        retry_interval=section.duration("retry_interval", d.retry_interval),
        expected_nodes=section.integer("expected_nodes", d.expected_nodes, 1, 1000),
        on_redis_down=fallback,
        queue_max=section.integer("queue_max", d.queue_max, 100, 10_000_000),
        stream_max=section.integer("stream_max", d.stream_max, 1000, 100_000_000),
        heartbeat=section.duration("heartbeat", d.heartbeat),
        tls=tls,
        auth=_auth(section.subsection("auth"), backend, node),
        accept=_accept(section.subsection("accept")),
    )
    if config.retry_interval > 60 or config.heartbeat > 60:
        raise ConfigError(f"{section.name}: retry_interval and heartbeat are at most 60s")
    section.finish()
    return config


def url_password(url: str) -> str | None:
    password = urlsplit(url).password
    return None if password is None else unquote(password)


def parse_scope(section: Section) -> str:
    """A limit's, quota's or anomaly rule's `scope`: local (this node) or cluster (Redis)."""
    scope = section.get("scope", str, "local")
    if scope not in SCOPES:
        raise ConfigError(f"{section.key('scope')}: {scope!r}; use local or cluster")
    return str(scope)
