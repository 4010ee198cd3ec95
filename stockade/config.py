"""The TOML configuration, validated at load into typed, frozen objects.

Every error names the key and the problem. Unknown keys are refused with a
did-you-mean, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.admin_http import AdminConfig, parse_admin
from stockade.cluster_settings import ClusterConfig, parse_cluster
from stockade.config_fields import ConfigError, Section
from stockade.logs import parse_log_format
from stockade.proxy.settings import ProxyConfig, parse_proxy

__all__ = [
    "Config",
    "ConfigError",
    "ConfigPermissionError",
    "ControllerConfig",
    "XdpConfig",
    "load_config",
    "parse_config",
]
from stockade.targets import (
    DEFAULT_MIN_PREFIX_V4,
    DEFAULT_MIN_PREFIX_V6,
    Network,
    PrefixFloor,
)

DEFAULT_PATH = Path("/etc/stockade/stockade.toml")
CONTROLLER_METRICS_PORT = 9461  # the proxy's admin listener defaults to 9460
ENV_PATH = "STOCKADE_CONFIG"
XDP_MODES = ("auto", "native", "generic")
_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_NETNS = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_HISTORY_RETENTION = 10 * 365 * 86400.0


@dataclass(frozen=True)
class ControllerConfig:
    socket: Path = Path("/run/stockade/control.sock")
    state_dir: Path = Path("/var/lib/stockade")
    pin_root: Path = Path("/sys/fs/bpf/stockade")
    # Network namespace that holds the interfaces (the lab's gateway); the
    # controller joins it at start and keeps its own mount namespace.
    netns: str | None = None
    sweep_interval: float = 1.0
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object a line (stockade/logs.py)
    # The proxy's socket: accepts only `rule.ban`. Default: rules.sock next to `socket`.
    rules_socket: Path = Path("/run/stockade/rules.sock")
    # None: root only (0600); a group name: that group may push rule bans (0660).
    rules_group: str | None = None
    # Ban events older than this are forgotten (escalation cannot look further back).
    history_retention: float = 30 * 86400.0
    # A reconcile (at start or on reload) that would lift more than this share of
    # the kernel's bans is refused; lifting up to `reconcile_removal_allowance`
    # bans is always allowed. 1.0 turns the share check off.
    reconcile_max_removal_share: float = 0.5
    reconcile_removal_allowance: int = 10
    # Prometheus metrics of the kernel side and the bans (the proxy has its own).
    admin: AdminConfig = field(default_factory=lambda: AdminConfig(port=CONTROLLER_METRICS_PORT))

    @property
    def ban_db(self) -> Path:
        return self.state_dir / "bans.db"


@dataclass(frozen=True)
class XdpConfig:
    interfaces: tuple[str, ...] = ()
    mode: str = "auto"
    monitor: bool = False
    # Always allowlisted, so an operator can never ban themselves out.
    management_networks: tuple[Network, ...] = ()
    syn_rate: int = 200  # new connections per second per source; 0 = off
    syn_burst: int = 400
    ipv6_rate_prefix: int = 64
    max_bans_v4: int = 262_144
    max_bans_v6: int = 262_144
    max_prefix_bans: int = 65_536
    max_allow: int = 4_096
    max_rate_sources: int = 262_144
    # The broadest ban or allowlist entry accepted without --force (rule and
    # cluster bans never have it); management_networks must respect it too.
    min_prefix_v4: int = DEFAULT_MIN_PREFIX_V4
    min_prefix_v6: int = DEFAULT_MIN_PREFIX_V6

    @property
    def prefix_floor(self) -> PrefixFloor:
        return PrefixFloor(self.min_prefix_v4, self.min_prefix_v6)


@dataclass(frozen=True)
class Config:
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    xdp: XdpConfig = field(default_factory=XdpConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    path: Path | None = None


def _controller(section: Section) -> ControllerConfig:
    netns = section.get("netns", str, "") or None
    if netns is not None and not _NETNS.fullmatch(netns):
        raise ConfigError(f"{section.key('netns')}: invalid namespace name {netns!r}")
    level = section.get("log_level", str, "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{section.key('log_level')}: use debug, info, warning or error")
    sweep = section.duration("sweep_interval", 1.0)
    if sweep > 60:
        raise ConfigError(f"{section.key('sweep_interval')}: at most 60s")
    socket = section.path("socket", ControllerConfig.socket)
    rules_socket = section.path("rules_socket", socket.parent / "rules.sock")
    if rules_socket == socket:
        raise ConfigError(
            f"{section.key('rules_socket')}: must differ from {section.key('socket')} "
            f"({socket}); the proxy's socket accepts only rule bans"
        )
    rules_group = section.get("rules_group", str, "") or None
    if rules_group is not None:
        try:
            grp.getgrnam(rules_group)
        except KeyError:
            raise ConfigError(
                f"{section.key('rules_group')}: no group {rules_group!r} on this host; "
                f"create it (groupadd {rules_group}) or leave the key out (root only)"
            ) from None
    retention = section.duration("history_retention", ControllerConfig.history_retention)
    if retention > MAX_HISTORY_RETENTION:
        raise ConfigError(f"{section.key('history_retention')}: at most 3650d")
    share = section.get(
        "reconcile_max_removal_share", (int, float), ControllerConfig.reconcile_max_removal_share
    )
    if not 0 < share <= 1:  # NaN fails this too
        raise ConfigError(
            f"{section.key('reconcile_max_removal_share')}: {share} is out of range "
            "(above 0, at most 1; 1 turns the check off)"
        )
    allowance = section.integer(
        "reconcile_removal_allowance", ControllerConfig.reconcile_removal_allowance, 0, 1_000_000
    )
    config = ControllerConfig(
        socket=socket,
        state_dir=section.path("state_dir", ControllerConfig.state_dir),
        pin_root=section.path("pin_root", ControllerConfig.pin_root),
        netns=netns,
        sweep_interval=sweep,
        log_level=level,
        log_format=parse_log_format(section),
        rules_socket=rules_socket,
        rules_group=rules_group,
        history_retention=retention,
        reconcile_max_removal_share=float(share),
        reconcile_removal_allowance=allowance,
        admin=parse_admin(section.subsection("admin"), AdminConfig(port=CONTROLLER_METRICS_PORT)),
    )
    section.finish()
    return config


def _xdp(section: Section) -> XdpConfig:
    d = XdpConfig()
    interfaces = section.get("interfaces", list, [])
    for name in interfaces:
        if not isinstance(name, str) or not _IFNAME.fullmatch(name):
            raise ConfigError(f"{section.key('interfaces')}: invalid interface name {name!r}")
    if len(set(interfaces)) != len(interfaces):
        raise ConfigError(f"{section.key('interfaces')}: an interface is listed twice")
    mode = section.get("mode", str, d.mode)
    if mode not in XDP_MODES:
        raise ConfigError(f"{section.key('mode')}: {mode!r} is not one of {', '.join(XDP_MODES)}")
    networks = section.networks("management_networks")
    floor = PrefixFloor(
        section.integer("min_prefix_v4", d.min_prefix_v4, 0, 32),
        section.integer("min_prefix_v6", d.min_prefix_v6, 0, 128),
    )
    for net in networks:
        if floor.too_broad(net):
            raise ConfigError(
                f"{section.key('management_networks')}: {floor.refusal(net, 'allow')}; "
                "lower the minimum if you mean it"
            )
    config = XdpConfig(
        interfaces=tuple(interfaces),
        mode=mode,
        monitor=section.get("monitor", bool, d.monitor),
        management_networks=networks,
        syn_rate=section.integer("syn_rate", d.syn_rate, 0, 1_000_000),
        syn_burst=section.integer("syn_burst", d.syn_burst, 1, 10_000_000),
        ipv6_rate_prefix=section.integer("ipv6_rate_prefix", d.ipv6_rate_prefix, 1, 128),
        max_bans_v4=section.integer("max_bans_v4", d.max_bans_v4, 1, 16_777_216),
        max_bans_v6=section.integer("max_bans_v6", d.max_bans_v6, 1, 16_777_216),
        max_prefix_bans=section.integer("max_prefix_bans", d.max_prefix_bans, 1, 1_048_576),
        max_allow=section.integer("max_allow", d.max_allow, 1, 1_048_576),
        max_rate_sources=section.integer("max_rate_sources", d.max_rate_sources, 1, 16_777_216),
        min_prefix_v4=floor.v4,
        min_prefix_v6=floor.v6,
    )
    section.finish()
    return config


_SECTIONS = ("controller", "xdp", "proxy", "cluster")


def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], _SECTIONS, n=1)
        hint = f"; did you mean [{close[0]}]?" if close else ""
        raise ConfigError(f"unknown section [{unknown[0]}]{hint}")
    controller = _controller(Section("controller", data.get("controller", {})))
    proxy = parse_proxy(Section("proxy", data.get("proxy", {})))
    if proxy.anomaly.rules_socket is None:  # the proxy pushes rule bans to this controller
        anomaly = dataclasses.replace(proxy.anomaly, rules_socket=controller.rules_socket)
        proxy = dataclasses.replace(proxy, anomaly=anomaly)
    cluster = parse_cluster(Section("cluster", data.get("cluster", {})))
    _check_scopes(proxy, cluster)
    return Config(
        controller=controller,
        xdp=_xdp(Section("xdp", data.get("xdp", {}))),
        proxy=dataclasses.replace(proxy, cluster=cluster),  # the workers count in Redis
        cluster=cluster,
        path=path,
    )


def _check_scopes(proxy: ProxyConfig, cluster: ClusterConfig) -> None:
    """`scope = "cluster"` anywhere needs a cluster to count in."""
    if cluster.enabled:
        return
    scoped = [
        f"proxy.rate_limiting.limits.{rule.name}"
        for rule in proxy.rate_limiting.limits
        if rule.scope == "cluster"
    ]
    if proxy.quotas.scope == "cluster":
        scoped.append("proxy.quotas")
    scoped += [f"proxy.anomaly.rules.{r.name}" for r in proxy.anomaly.rules if r.scope == "cluster"]
    if scoped:
        raise ConfigError(
            f'{scoped[0]}.scope: "cluster" needs [cluster] backend = "redis"; '
            'set it up or use scope = "local"'
        )


class ConfigPermissionError(ConfigError):
    """The config file exists but this user may not read it: a runtime failure, not bad input."""


def resolve_path(explicit: Path | None) -> tuple[Path, bool]:
    """The config path to read, and whether the user asked for it explicitly."""
    if explicit is not None:
        return explicit, True
    env = os.environ.get(ENV_PATH)
    if env:
        return Path(env), True
    return DEFAULT_PATH, False


def load_config(explicit: Path | None = None) -> Config:
    """Read and validate the config; the default path may be absent."""
    path, asked = resolve_path(explicit)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if asked:
            raise ConfigError(f"config file {path} does not exist") from None
        return Config()
    except PermissionError:
        raise ConfigPermissionError(
            f"permission denied reading the config file {path}; run as root"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return parse_config(data, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
