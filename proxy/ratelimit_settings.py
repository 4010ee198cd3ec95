"""The [proxy.rate_limiting] and [proxy.quotas] parts of the configuration.

[proxy.rate_limiting]
response_headers = true            # RateLimit-* on allowed responses too
[proxy.rate_limiting.limits.per_ip]
rate = "100/min"                   # N/s, N/min, N/hour, N/day or N/<duration>
key = "ip"                         # ip, consumer, api_key, header:NAME, query:NAME
map = "/etc/stockade/per_ip.map"   # optional: per-key rates, reloaded on change
all_routes = true                  # else only routes that name it in rate_limits
scope = "local"                    # or "cluster": counted in Redis across the nodes

[proxy.quotas]
timezone = "Europe/Berlin"         # where days and months begin
plan_claim = "plan"                # the JWT claim naming a consumer's plan
default_plan = "free"              # for consumers without one
scope = "local"                    # or "cluster": quotas counted and kept in Redis
[proxy.quotas.plans.free]
rates = ["10/s"]
per_day = 1000
per_month = 0                      # 0 = no quota for that period
"""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass
from pathlib import Path

from stockade.cluster_settings import parse_scope
from stockade.config_fields import ConfigError, Section
from stockade.durations import DurationError, parse_duration

KEY_KINDS = ("ip", "consumer", "api_key", "header", "query")
# Keys known before authentication: their limits run before the (costly) auth stage.
PRE_AUTH_KINDS = ("ip", "header", "query")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_FIELD = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RATE = re.compile(r"\s*([0-9]{1,12})\s*/\s*(\S+)\s*", re.ASCII)  # no Unicode digits
_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
MAX_WINDOW = 31 * 86400.0


class RateError(ValueError):
    pass


@dataclass(frozen=True)
class Rate:
    count: int
    window: float  # seconds
    text: str

    @property
    def policy(self) -> str:
        """As in the IETF RateLimit-Policy header: `100;w=60`."""
        return f"{self.count};w={round(self.window)}"


def parse_rate(text: str) -> Rate:
    match = _RATE.fullmatch(text) if text.isascii() else None
    if match is None:
        raise RateError(f"invalid rate {text!r}; use e.g. 100/min, 10/s, 5000/day or 20/10s")
    count, unit = int(match.group(1)), match.group(2).lower()
    window = _UNITS.get(unit)
    if window is None:
        try:
            window = float(parse_duration(unit))
        except DurationError:
            raise RateError(f"invalid rate {text!r}: unknown window {unit!r}") from None
    if count < 1 or count > 1_000_000_000:
        raise RateError(f"invalid rate {text!r}: the count must be 1..1000000000")
    if not 0.1 <= window <= MAX_WINDOW:
        raise RateError(f"invalid rate {text!r}: the window must be 100ms..31d")
    return Rate(count, window, f"{count}/{match.group(2)}")


@dataclass(frozen=True)
class LimitRule:
    name: str
    rate: Rate
    key: str  # one of KEY_KINDS
    field: str = ""  # the header or query parameter for those kinds
    map_file: Path | None = None
    all_routes: bool = False
    scope: str = "local"  # "cluster": counted in Redis, shared by every node

    @property
    def pre_auth(self) -> bool:
        return self.key in PRE_AUTH_KINDS


@dataclass(frozen=True)
class RateLimitConfig:
    limits: tuple[LimitRule, ...] = ()
    response_headers: bool = True
    max_keys: int = 100_000  # counters in shared memory (120 bytes each)

    def limit(self, name: str) -> LimitRule:
        for rule in self.limits:
            if rule.name == name:
                return rule
        raise KeyError(name)


@dataclass(frozen=True)
class Plan:
    name: str
    rates: tuple[Rate, ...] = ()
    per_day: int = 0
    per_month: int = 0


@dataclass(frozen=True)
class QuotaConfig:
    plans: tuple[Plan, ...] = ()
    timezone: str = "UTC"
    plan_claim: str = "plan"
    default_plan: str | None = None
    database: Path = Path("/var/lib/stockade/usage.db")
    max_consumers: int = 100_000
    scope: str = "local"  # "cluster": counted and kept in Redis, shared by every node

    def plan(self, name: str | None) -> Plan | None:
        wanted = name or self.default_plan
        for plan in self.plans:
            if plan.name == wanted:
                return plan
        return None


def _rate(section: Section, key: str, text: object) -> Rate:
    if not isinstance(text, str):
        raise ConfigError(f'{section.key(key)}: expected a string such as "100/min"')
    try:
        return parse_rate(text)
    except RateError as exc:
        raise ConfigError(f"{section.key(key)}: {exc}") from None


def _limit(name: str, section: Section) -> LimitRule:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{section.name}: invalid limit name")
    if "rate" not in section.table:
        raise ConfigError(f'{section.key("rate")}: required, e.g. "100/min"')
    rate = _rate(section, "rate", section.get("rate", str, ""))
    key_text = section.get("key", str, "ip")
    kind, _, field = key_text.partition(":")
    if kind not in KEY_KINDS:
        raise ConfigError(
            f"{section.key('key')}: {key_text!r}; use ip, consumer, api_key, header:NAME "
            "or query:NAME"
        )
    if (kind in ("header", "query")) != bool(field) or (field and not _FIELD.fullmatch(field)):
        raise ConfigError(f"{section.key('key')}: {key_text!r}; header and query need a name")
    rule = LimitRule(
        name=name,
        rate=rate,
        key=kind,
        field=field.lower() if kind == "header" else field,
        map_file=section.path("map", Path()) if "map" in section.table else None,
        all_routes=section.get("all_routes", bool, False),
        scope=parse_scope(section),
    )
    section.finish()
    return rule


def parse_rate_limiting(section: Section) -> RateLimitConfig:
    d = RateLimitConfig()
    limits_section = section.subsection("limits")
    limits = tuple(
        _limit(name, limits_section.subsection(name)) for name in sorted(limits_section.table)
    )
    limits_section.known.update(limits_section.table)
    config = RateLimitConfig(
        limits=limits,
        response_headers=section.get("response_headers", bool, d.response_headers),
        max_keys=section.integer("max_keys", d.max_keys, 1024, 50_000_000),
    )
    section.finish()
    return config


def _plan(name: str, section: Section) -> Plan:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{section.name}: invalid plan name")
    rates = section.get("rates", list, [])
    plan = Plan(
        name=name,
        rates=tuple(_rate(section, f"rates[{i}]", text) for i, text in enumerate(rates)),
        per_day=section.integer("per_day", 0, 0, 1 << 40),
        per_month=section.integer("per_month", 0, 0, 1 << 40),
    )
    section.finish()
    return plan


def parse_quotas(section: Section) -> QuotaConfig:
    d = QuotaConfig()
    plans_section = section.subsection("plans")
    plans = tuple(
        _plan(name, plans_section.subsection(name)) for name in sorted(plans_section.table)
    )
    plans_section.known.update(plans_section.table)
    timezone = section.get("timezone", str, d.timezone)
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{section.key('timezone')}: unknown time zone {timezone!r}") from None
    default_plan = section.get("default_plan", str, "") or None
    if default_plan is not None and default_plan not in {p.name for p in plans}:
        raise ConfigError(f"{section.key('default_plan')}: no plan named {default_plan!r}")
    plan_claim = section.get("plan_claim", str, d.plan_claim)
    if not _FIELD.fullmatch(plan_claim):
        raise ConfigError(f"{section.key('plan_claim')}: invalid claim name")
    config = QuotaConfig(
        plans=plans,
        timezone=timezone,
        plan_claim=plan_claim,
        default_plan=default_plan,
        database=section.path("database", d.database),
        max_consumers=section.integer("max_consumers", d.max_consumers, 16, 10_000_000),
        scope=parse_scope(section),
    )
    section.finish()
    return config


def route_limits(section: Section, config: RateLimitConfig) -> tuple[str, ...]:
    """A route's `rate_limits = [...]`: names of limits in [proxy.rate_limiting.limits]."""
    names = section.get("rate_limits", list, [])
    known = {rule.name for rule in config.limits}
    for name in names:
        if name not in known:
            raise ConfigError(
                f"{section.key('rate_limits')}: no limit named {name!r} "
                f"(defined: {', '.join(sorted(known)) or 'none'})"
            )
    return tuple(dict.fromkeys(names))
