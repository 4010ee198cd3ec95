"""The [proxy.anomaly] part of the configuration: behaviour rules and their actions.

[proxy.anomaly]
rules_socket = "/run/stockade/rules.sock"   # default: the controller's rules_socket
tarpit_max = 64                              # tarpitted requests at once, per worker
user_agents_file = "/usr/share/modsecurity-crs/rules/scanners-user-agents.data"

[[proxy.anomaly.rules]]
name = "scanner"
when = "distinct_404_paths > 30 in 1m"       # terms joined by `and` (or `with`)
key = "ip"                                   # or "consumer"
action = "ban"                               # log, deny, tarpit or ban
duration = "10m"                             # how long deny/tarpit last; a first ban's TTL
ban_factor = 2.0                             # a repeat offender's ban lasts this much longer
ban_max = "1d"                               # but never longer than this
scope = "local"                              # or "cluster": counters in Redis, all nodes

[[proxy.anomaly.rules]]
name = "scanner-agents"
user_agents = true                           # the request's User-Agent is on the list
action = "deny"
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from stockade.cluster_settings import parse_scope
from stockade.config_fields import ConfigError, Section
from stockade.durations import DurationError, parse_duration

ACTIONS = ("log", "deny", "tarpit", "ban")
KEYS = ("ip", "consumer")
# What a rule can count, per source, over its window.
METRICS = (
    "requests",
    "status_4xx",
    "status_5xx",
    "errors",  # 4xx + 5xx
    "err_ratio",  # errors / requests
    "distinct_paths",
    "distinct_404_paths",
    "auth_failures",  # 401 and 403
    "auth_failures_same_path",  # 401 and 403 on the path of this request
    "bytes_out",
    "new_connections",  # per client IP only
    "rate_limited",  # 429s answered
    "waf_blocks",  # requests the WAF refused (detect mode refuses none)
)
OPERATORS = (">=", "<=", "==", ">", "<")
DEFAULT_USER_AGENTS = Path("/usr/share/modsecurity-crs/rules/scanners-user-agents.data")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TERM = re.compile(r"\s*([a-z_0-9]+)\s*(>=|<=|==|>|<)\s*([0-9]+(?:\.[0-9]+)?)\s*")


@dataclass(frozen=True)
class Term:
    metric: str
    operator: str
    value: float

    def holds(self, observed: float) -> bool:
        op = self.operator
        if op == ">":
            return observed > self.value
        if op == ">=":
            return observed >= self.value
        if op == "<":
            return observed < self.value
        if op == "<=":
            return observed <= self.value
        return observed == self.value

    def __str__(self) -> str:
        return f"{self.metric} {self.operator} {self.value:g}"


@dataclass(frozen=True)
class Condition:
    terms: tuple[Term, ...]
    window: float

    def __str__(self) -> str:
        return " and ".join(map(str, self.terms)) + f" in {self.window:g}s"


def parse_condition(text: str) -> Condition:
    """`err_ratio > 0.5 with requests > 50 in 5m` -> terms and a window."""
    body, sep, window_text = text.rpartition(" in ")
    if not sep:
        raise ValueError(f"{text!r}: end with the window, e.g. `... in 1m`")
    try:
        window = float(parse_duration(window_text.strip()))
    except DurationError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if not 1 <= window <= 86400:
        raise ValueError(f"{text!r}: the window must be 1s..1d")
    terms = []
    for part in re.split(r"\s+(?:and|with)\s+", body.strip()):
        match = _TERM.fullmatch(part)
        if match is None:
            raise ValueError(f"{text!r}: {part!r} is not `METRIC OP NUMBER`")
        metric, operator, value = match.groups()
        if metric not in METRICS:
            raise ValueError(f"{text!r}: unknown metric {metric!r} (known: {', '.join(METRICS)})")
        terms.append(Term(metric, operator, float(value)))
    return Condition(tuple(terms), window)


@dataclass(frozen=True)
class AnomalyRule:
    name: str
    action: str
    key: str = "ip"
    condition: Condition | None = None  # None: a User-Agent rule
    user_agents: bool = False
    duration: float = 600.0
    ban_factor: float = 2.0
    ban_max: float = 86400.0
    tarpit_delay: float = 5.0
    scope: str = "local"  # "cluster": counted in Redis, so a scan spread over nodes adds up

    @property
    def metrics(self) -> set[str]:
        return {t.metric for t in self.condition.terms} if self.condition else set()


@dataclass(frozen=True)
class AnomalyConfig:
    rules: tuple[AnomalyRule, ...] = ()
    rules_socket: Path | None = None  # None: the controller's [controller] rules_socket
    tarpit_max: int = 64
    user_agents_file: Path = DEFAULT_USER_AGENTS
    max_keys: int = 100_000  # counters in shared memory


def _rule(section: Section) -> AnomalyRule:
    name = section.get("name", str, "")
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{section.key('name')}: required, letters, digits, _ . - only")
    action = section.get("action", str, "")
    if action not in ACTIONS:
        raise ConfigError(f"{section.key('action')}: use one of {', '.join(ACTIONS)}")
    key = section.get("key", str, "ip")
    if key not in KEYS:
        raise ConfigError(f"{section.key('key')}: use ip or consumer")
    if action == "ban" and key != "ip":
        raise ConfigError(f"{section.key('action')}: only a rule keyed by ip can ban")
    when = section.get("when", str, None)
    user_agents = section.get("user_agents", bool, False)
    if (when is None) == (not user_agents):
        raise ConfigError(f"{section.name}: give exactly one of `when` or `user_agents = true`")
    condition = None
    if when is not None:
        try:
            condition = parse_condition(when)
        except ValueError as exc:
            raise ConfigError(f"{section.key('when')}: {exc}") from None
        if key == "consumer" and "new_connections" in {t.metric for t in condition.terms}:
            raise ConfigError(f"{section.key('when')}: new_connections is counted per IP only")
    factor = section.get("ban_factor", (int, float), 2.0)
    if not 1.0 <= factor <= 100.0:
        raise ConfigError(f"{section.key('ban_factor')}: 1..100")
    rule = AnomalyRule(
        name=name,
        action=action,
        key=key,
        condition=condition,
        user_agents=user_agents,
        duration=section.duration("duration", 600.0),
        ban_factor=float(factor),
        ban_max=section.duration("ban_max", 86400.0),
        tarpit_delay=section.duration("tarpit_delay", 5.0),
        scope=parse_scope(section),
    )
    if rule.tarpit_delay > 60:
        raise ConfigError(f"{section.key('tarpit_delay')}: at most 60s")
    if rule.scope == "cluster" and rule.condition is None:
        raise ConfigError(f"{section.key('scope')}: a User-Agent rule counts nothing to share")
    if rule.scope == "cluster" and "new_connections" in rule.metrics:
        raise ConfigError(f"{section.key('scope')}: new_connections is counted per node only")
    if rule.ban_max < rule.duration:
        raise ConfigError(f"{section.key('ban_max')}: shorter than the duration")
    section.finish()
    return rule


def parse_anomaly(section: Section) -> AnomalyConfig:
    d = AnomalyConfig()
    rules = tuple(
        _rule(Section(f"{section.key('rules')}[{i}]", raw))
        for i, raw in enumerate(section.get("rules", list, []))
    )
    if len({r.name for r in rules}) != len(rules):
        raise ConfigError(f"{section.key('rules')}: two rules have the same name")
    config = AnomalyConfig(
        rules=rules,
        rules_socket=section.path("rules_socket", Path())
        if "rules_socket" in section.table
        else None,
        tarpit_max=section.integer("tarpit_max", d.tarpit_max, 0, 100_000),
        user_agents_file=section.path("user_agents_file", d.user_agents_file),
        max_keys=section.integer("max_keys", d.max_keys, 1024, 50_000_000),
    )
    section.finish()
    return config
