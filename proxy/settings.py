"""The [proxy] part of the configuration: listeners, routes, upstream pools.

[proxy]
workers = 2
[[proxy.listeners]]
address = "0.0.0.0"
port = 443
certificates = [{ cert = "/etc/stockade/api.pem", key = "/etc/stockade/api.key" }]
[[proxy.listeners]]
port = 80
redirect_to_https = 443
[proxy.pools.api]
servers = ["198.18.1.10:8080", { address = "198.18.1.11:8080", weight = 2 }]
balance = "least_outstanding"
[proxy.pools.api.health]
path = "/health"
[[proxy.routes]]
host = "api.example.com"
path_prefix = "/api/"
pool = "api"
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.admin_http import AdminConfig, parse_admin
from stockade.cluster_settings import ClusterConfig
from stockade.config_fields import ConfigError, Section
from stockade.logs import parse_log_format
from stockade.proxy.anomaly_settings import AnomalyConfig, parse_anomaly
from stockade.proxy.auth_settings import AuthConfig, RouteAuth, parse_auth, parse_route_auth
from stockade.proxy.normalize import BadPath, normalize_path
from stockade.proxy.ratelimit_settings import (
    QuotaConfig,
    RateLimitConfig,
    parse_quotas,
    parse_rate_limiting,
    route_limits,
)
from stockade.proxy.waf_settings import RouteWaf, WafConfig, parse_route_waf, parse_waf
from stockade.targets import Network

BALANCE_POLICIES = ("round_robin", "least_outstanding")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HOST = re.compile(r"(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    certificates: tuple[Certificate, ...] = ()  # non-empty: HTTPS, chosen by SNI
    redirect_to_https: int | None = None  # an HTTP listener that only redirects

    @property
    def tls(self) -> bool:
        return bool(self.certificates)

    @property
    def name(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class HealthCheck:
    enabled: bool = True
    path: str = "/health"
    interval: float = 2.0
    timeout: float = 1.0
    expect_status: int = 200
    rise: int = 2  # consecutive successes to come back
    fall: int = 3  # consecutive failures to be taken out


@dataclass(frozen=True)
class PassiveCheck:
    max_failures: int = 3  # consecutive connection errors or 5xx
    cooldown: float = 10.0  # seconds out of rotation


@dataclass(frozen=True)
class Pool:
    name: str
    servers: tuple[Server, ...]
    balance: str = "round_robin"
    health: HealthCheck = HealthCheck()
    passive: PassiveCheck = PassiveCheck()
    slow_start: float = 0.0  # seconds to ramp a recovered server's weight up
    max_connections_per_server: int = 100  # idle keep-alive connections kept, per worker
    keepalive_timeout: float = 30.0
    # Per server and worker: requests in flight at once (so upstream connections in
    # use); 0 = unlimited. Beyond it requests wait in the pool's queue (HAProxy's
    # server maxconn and timeout queue), at most max_queue of them, each queue_timeout.
    maxconn: int = 100
    max_queue: int = 1000
    queue_timeout: float = 10.0


@dataclass(frozen=True)
class Route:
    name: str
    pool: str
    host: str | None = None  # None: any host; "*.example.com" matches subdomains
    path_prefix: str = "/"
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    total_timeout: float = 60.0
    retries: int = 1  # idempotent methods only, before the upstream got the body
    max_body_size: int = 10 * 1024 * 1024
    allow_encoded_slash: bool = False  # %2F in the path
    allow_encoded_dots: bool = False  # %2E segments such as %2e%2e
    allow_path_params: bool = False  # ";params" in a segment, matched without them
    case_insensitive: bool = False  # the backend folds case: match the path in lowercase
    auth: RouteAuth = field(default_factory=RouteAuth)
    rate_limits: tuple[str, ...] = ()  # names in [proxy.rate_limiting.limits]
    waf: RouteWaf = field(default_factory=RouteWaf)


@dataclass(frozen=True)
class ProxyConfig:
    listeners: tuple[Listener, ...] = ()
    routes: tuple[Route, ...] = ()
    pools: tuple[Pool, ...] = ()
    workers: int = 0  # 0: one per CPU
    user: str | None = None  # drop privileges to this user after binding
    group: str | None = None
    access_log: str = "-"  # "-" = stderr, else a file path
    log_format: str = "text"  # the master's and workers' own lines: "text" or "json"
    trusted_proxies: tuple[Network, ...] = ()
    max_header_size: int = 8190  # one request line or header line
    max_headers: int = 100
    max_url_length: int = 8190
    header_timeout: float = 10.0  # whole request head (slowloris)
    body_idle_timeout: float = 30.0  # between body chunks (slow POST)
    # The whole body (slow POST at a trickle): time spent waiting for it, at most
    # body_timeout (0 = no bound), and at least body_min_rate bytes/s after
    # body_rate_grace (0 = no bound; Apache mod_reqtimeout's body=20,MinRate=500).
    body_timeout: float = 300.0
    body_min_rate: int = 500
    body_rate_grace: float = 20.0
    keepalive_timeout: float = 60.0
    max_connections: int = 10_000  # per worker
    drain_timeout: float = 30.0  # in-flight requests get this long on SIGTERM
    status_dir: Path = Path("/run/stockade/proxy")  # per-worker state for `stockade status`
    auth: AuthConfig = field(default_factory=AuthConfig)
    rate_limiting: RateLimitConfig = field(default_factory=RateLimitConfig)
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    waf: WafConfig = field(default_factory=WafConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    metrics_dir: Path = Path("/run/stockade/proxy-metrics")  # the workers' metric files
    # The top-level [cluster] section, copied in by stockade.config (workers count in Redis).
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    def pool(self, name: str) -> Pool:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)


def _port(section: Section, key: str, default: int | None) -> int | None:
    value: int | None = section.get(key, int, default)
    if value is not None and not 1 <= value <= 65535:
        raise ConfigError(f"{section.key(key)}: {value} is not a port (1..65535)")
    return value


def _listener(section: Section) -> Listener:
    address = section.get("address", str, "0.0.0.0")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"{section.key('address')}: {address!r} is not an IP address") from None
    port = _port(section, "port", None)
    if port is None:
        raise ConfigError(f"{section.key('port')}: required")
    certificates = []
    for i, raw in enumerate(section.get("certificates", list, [])):
        cert_section = Section(f"{section.key('certificates')}[{i}]", raw)
        cert = cert_section.path("cert", Path())
        key = cert_section.path("key", Path())
        if cert == Path() or key == Path():
            raise ConfigError(f"{cert_section.name}: both cert and key are required")
        cert_section.finish()
        certificates.append(Certificate(cert, key))
    redirect = _port(section, "redirect_to_https", None)
    if redirect is not None and certificates:
        raise ConfigError(f"{section.key('redirect_to_https')}: only for a listener without TLS")
    section.finish()
    return Listener(address, port, tuple(certificates), redirect)


def _server(where: str, raw: Any) -> Server:
    weight = 1
    if isinstance(raw, dict):
        section = Section(where, raw)
        text = section.get("address", str, "")
        weight = section.integer("weight", 1, 1, 1000)
        section.finish()
    elif isinstance(raw, str):
        text = raw
    else:
        raise ConfigError(f'{where}: expected "host:port" or {{ address = ..., weight = ... }}')
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    # isascii: str.isdigit() is true for any script's digits (and "²", which int() refuses)
    port_ok = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
    if not sep or not host or not port_ok or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: {text!r} is not host:port (IPv6 as [addr]:port)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST.fullmatch(host):
            raise ConfigError(f"{where}: {host!r} is not an IP address or host name") from None
    return Server(host, int(port_text), weight)


def _health(section: Section) -> HealthCheck:
    d = HealthCheck()
    path = section.get("path", str, d.path)
    if not path.startswith("/"):
        raise ConfigError(f"{section.key('path')}: must start with /")
    check = HealthCheck(
        enabled=section.get("enabled", bool, d.enabled),
        path=path,
        interval=section.duration("interval", d.interval),
        timeout=section.duration("timeout", d.timeout),
        expect_status=section.integer("expect_status", d.expect_status, 100, 599),
        rise=section.integer("rise", d.rise, 1, 100),
        fall=section.integer("fall", d.fall, 1, 100),
    )
    section.finish()
    if check.timeout > check.interval:
        raise ConfigError(f"{section.key('timeout')}: must not be longer than the interval")
    return check


def _passive(section: Section) -> PassiveCheck:
    d = PassiveCheck()
    check = PassiveCheck(
        max_failures=section.integer("max_failures", d.max_failures, 1, 1000),
        cooldown=section.duration("cooldown", d.cooldown),
    )
    section.finish()
    return check


def _pool(name: str, section: Section) -> Pool:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{section.name}: invalid pool name")
    raw_servers = section.get("servers", list, [])
    if not raw_servers:
        raise ConfigError(f"{section.key('servers')}: a pool needs at least one server")
    servers = tuple(
        _server(f"{section.key('servers')}[{i}]", raw) for i, raw in enumerate(raw_servers)
    )
    if len({s.address for s in servers}) != len(servers):
        raise ConfigError(f"{section.key('servers')}: a server is listed twice")
    balance = section.get("balance", str, "round_robin")
    if balance not in BALANCE_POLICIES:
        raise ConfigError(
            f"{section.key('balance')}: {balance!r} is not one of {', '.join(BALANCE_POLICIES)}"
        )
    d = Pool(name, servers)
    slow_start = section.duration("slow_start", 0.0, allow_zero=True)  # off unless given
    pool = Pool(
        name=name,
        servers=servers,
        balance=balance,
        health=_health(section.subsection("health")),
        passive=_passive(section.subsection("passive")),
        slow_start=slow_start,
        max_connections_per_server=section.integer(
            "max_connections_per_server", d.max_connections_per_server, 1, 10_000
        ),
        keepalive_timeout=section.duration("keepalive_timeout", d.keepalive_timeout),
        maxconn=section.integer("maxconn", d.maxconn, 0, 100_000),
        max_queue=section.integer("max_queue", d.max_queue, 0, 1_000_000),
        queue_timeout=section.duration("queue_timeout", d.queue_timeout),
    )
    section.finish()
    return pool


def _route(
    index: int,
    section: Section,
    pools: set[str],
    auth: AuthConfig,
    limits: RateLimitConfig,
    waf: WafConfig,
) -> Route:
    pool = section.get("pool", str, "")
    if pool not in pools:
        known = ", ".join(sorted(pools)) or "none defined"
        raise ConfigError(f"{section.key('pool')}: unknown pool {pool!r} (pools: {known})")
    host = section.get("host", str, None)
    if host is not None:
        host = host.lower().rstrip(".")
        if not _HOST.fullmatch(host):
            raise ConfigError(f"{section.key('host')}: {host!r} is not a host name")
    prefix = section.get("path_prefix", str, "/")
    if not prefix.startswith("/") or any(c in prefix for c in "?#%;\0"):
        raise ConfigError(f"{section.key('path_prefix')}: must start with / (no ?, #, %, ;)")
    try:  # a prefix no normalized path can start with would never match
        normal = normalize_path(prefix) == prefix
    except BadPath:
        normal = False
    if not normal:
        raise ConfigError(
            f"{section.key('path_prefix')}: {prefix!r} is not a normalized path "
            "(no //, dot-segments, segments ending in a dot, spaces or non-ASCII)"
        )
    d = Route(name="", pool=pool)
    route = Route(
        name=section.get("name", str, f"route{index}"),
        pool=pool,
        host=host,
        path_prefix=prefix,
        connect_timeout=section.duration("connect_timeout", d.connect_timeout),
        read_timeout=section.duration("read_timeout", d.read_timeout),
        total_timeout=section.duration("total_timeout", d.total_timeout),
        retries=section.integer("retries", d.retries, 0, 10),
        max_body_size=section.size("max_body_size", d.max_body_size, 0, 1 << 40),
        allow_encoded_slash=section.get("allow_encoded_slash", bool, d.allow_encoded_slash),
        allow_encoded_dots=section.get("allow_encoded_dots", bool, d.allow_encoded_dots),
        allow_path_params=section.get("allow_path_params", bool, d.allow_path_params),
        case_insensitive=section.get("case_insensitive", bool, d.case_insensitive),
        auth=parse_route_auth(section, auth),
        rate_limits=route_limits(section, limits),
        waf=parse_route_waf(section, waf),
    )
    section.finish()
    return route


def parse_proxy(section: Section) -> ProxyConfig:
    d = ProxyConfig()
    pools_section = section.subsection("pools")
    pools = tuple(
        _pool(name, pools_section.subsection(name)) for name in sorted(pools_section.table)
    )
    pools_section.known.update(pools_section.table)
    listeners = tuple(
        _listener(Section(f"{section.key('listeners')}[{i}]", raw))
        for i, raw in enumerate(section.get("listeners", list, []))
    )
    if len({(li.address, li.port) for li in listeners}) != len(listeners):
        raise ConfigError(f"{section.key('listeners')}: two listeners on the same address:port")
    names = {p.name for p in pools}
    auth = parse_auth(section.subsection("auth"))
    rate_limiting = parse_rate_limiting(section.subsection("rate_limiting"))
    waf = parse_waf(section.subsection("waf"))
    routes = tuple(
        _route(i, Section(f"{section.key('routes')}[{i}]", raw), names, auth, rate_limiting, waf)
        for i, raw in enumerate(section.get("routes", list, []))
    )
    if len({r.name for r in routes}) != len(routes):
        raise ConfigError(f"{section.key('routes')}: two routes have the same name")
    user = section.get("user", str, "") or None
    group = section.get("group", str, "") or None
    for key, value in (("user", user), ("group", group)):
        if value is not None and not _USER.fullmatch(value):
            raise ConfigError(f"{section.key(key)}: invalid name {value!r}")
    config = ProxyConfig(
        listeners=listeners,
        routes=routes,
        pools=pools,
        workers=section.integer("workers", d.workers, 0, 256),
        user=user,
        group=group,
        access_log=section.get("access_log", str, d.access_log),
        log_format=parse_log_format(section),
        trusted_proxies=section.networks("trusted_proxies"),
        max_header_size=section.integer("max_header_size", d.max_header_size, 256, 1 << 20),
        max_headers=section.integer("max_headers", d.max_headers, 8, 10_000),
        max_url_length=section.integer("max_url_length", d.max_url_length, 64, 1 << 20),
        header_timeout=section.duration("header_timeout", d.header_timeout),
        body_idle_timeout=section.duration("body_idle_timeout", d.body_idle_timeout),
        body_timeout=section.duration("body_timeout", d.body_timeout, allow_zero=True),
        body_min_rate=section.size("body_min_rate", d.body_min_rate, 0, 1 << 40),
        body_rate_grace=section.duration("body_rate_grace", d.body_rate_grace, allow_zero=True),
        keepalive_timeout=section.duration("keepalive_timeout", d.keepalive_timeout),
        max_connections=section.integer("max_connections", d.max_connections, 1, 1_000_000),
        drain_timeout=section.duration("drain_timeout", d.drain_timeout),
        status_dir=section.path("status_dir", d.status_dir),
        auth=auth,
        rate_limiting=rate_limiting,
        quotas=parse_quotas(section.subsection("quotas")),
        anomaly=parse_anomaly(section.subsection("anomaly")),
        waf=waf,
        admin=parse_admin(section.subsection("admin"), AdminConfig()),
        metrics_dir=section.path("metrics_dir", d.metrics_dir),
    )
    section.finish()
    if config.access_log != "-" and not config.access_log.startswith("/"):
        raise ConfigError(f'{section.key("access_log")}: "-" (stderr) or an absolute path')
    return config
