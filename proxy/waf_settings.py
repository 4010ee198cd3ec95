"""The [proxy.waf] part of the configuration, and each route's WAF policy.

[proxy.waf]
body_limit = "128KiB"           # request bodies are inspected up to this size
body_over_limit = "reject"      # a larger body: "reject" (413) or "pass" (uninspected)
compressed = "inspect"          # gzip/deflate/br bodies: "inspect" (decompressed) or "reject"
decompressed_limit = "1MiB"     # the bomb limit for a decompressed body
timeout = "1s"                  # the time budget of one request's inspection
threads = 2                     # engine threads per worker
max_pending = 64                # inspections waiting for a thread, per worker (more: 503)
inline_max = 0                 # sqli_xss/zero_trust requests up to this size run on the loop
fast_pass = true                # sqli_xss: pass what the engine certainly would, without it

[proxy.waf.crs]
rules_dir = "/usr/share/modsecurity-crs/rules"
paranoia_level = 1
anomaly_threshold = 5

[[proxy.routes]]
waf = "crs"                     # off, sqli_xss, crs or zero_trust
waf_action = "block"            # or "detect": log and count, let the request pass
waf_exclude_rules = [942100, "920300-920399"]
waf_profile = "api"             # crs: "api" (the default) or "none" (proxy/waf/api_profile.py)
waf_graphql_fields = ["query"]  # crs: JSON members that hold GraphQL documents

[[proxy.routes.waf_exclusions]]  # rules off for named arguments of this route
rules = [942360]
arguments = ["json.address.line1"]  # as the engine names them; absent: the whole route
reason = "street addresses look like SQL"
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from stockade.config_fields import ConfigError, Section

WAF_MODES = ("off", "sqli_xss", "crs", "zero_trust")
ENGINE_MODES = ("sqli_xss", "crs")  # the modes that run ModSecurity
WAF_ACTIONS = ("block", "detect")
WAF_PROFILES = ("api", "none")  # crs only: proxy/waf/api_profile.py
OVER_LIMIT_ACTIONS = ("reject", "pass")
COMPRESSED_ACTIONS = ("inspect", "reject")
SHIPPED_RULES = Path(__file__).resolve().parent / "waf" / "rules" / "sqli_xss.conf"
CRS_RULES = Path("/usr/share/modsecurity-crs/rules")
CRS_EXCLUSIONS = Path("/etc/modsecurity/crs")  # Debian's place for local exclusion files
# CRS allows only GET HEAD POST OPTIONS by default (rule 911100); an API needs its verbs.
API_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# CRS 3.3's default list (rule 920420), plus the JSON types APIs use for patches.
CONTENT_TYPES = (
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "multipart/related",
    "text/xml",
    "application/xml",
    "application/soap+xml",
    "application/json",
    "application/merge-patch+json",
    "application/json-patch+json",
    "application/octet-stream",
    "application/csp-report",
    "text/plain",
)
_RULE_IDS = re.compile(r"[0-9]{1,9}(-[0-9]{1,9})?")
_METHOD = re.compile(r"[A-Z]{1,20}")
_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,64}")
# An argument as the engine names it (json.a.b, a form or query name), written
# into "!ARGS:<name>": no space, quote, backslash, `|`, `,` or braces (SecLang
# would read them as syntax), no control character, and no leading `/` or `!`
# (a regex, a negation).
_ARGUMENT = re.compile(r'[^\s"\\|,{}/!\x00-\x1f\x7f][^\s"\\|,{}\x00-\x1f\x7f]{0,255}')
_GRAPHQL_FIELD = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}")
_REASON_MAX = 300
_BASE_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


@dataclass(frozen=True)
class CrsConfig:
    rules_dir: Path = CRS_RULES  # the REQUEST-*.conf files are loaded, in name order
    exclusions_dir: Path = CRS_EXCLUSIONS  # its REQUEST-900/RESPONSE-999 files, if present
    paranoia_level: int = 1
    anomaly_threshold: int = 5  # inbound anomaly score that blocks
    allowed_methods: tuple[str, ...] = API_METHODS
    allowed_content_types: tuple[str, ...] = CONTENT_TYPES


@dataclass(frozen=True)
class WafConfig:
    library: str = "libmodsecurity.so.3"
    sqli_xss_rules: Path = SHIPPED_RULES
    crs: CrsConfig = field(default_factory=CrsConfig)
    body_limit: int = 128 * 1024
    body_over_limit: str = "reject"
    compressed: str = "inspect"
    decompressed_limit: int = 1024 * 1024
    timeout: float = 1.0
    threads: int = 2
    max_pending: int = 64
    inline_max: int = 0  # off: measured, the threads are cheaper under load
    fast_pass: bool = True  # sqli_xss: proxy/waf/fast_pass.py


@dataclass(frozen=True)
class RouteWaf:
    mode: str = "off"
    action: str = "block"
    exclude_rules: tuple[str, ...] = ()  # rule ids and ranges, as SecRuleRemoveById takes them
    openapi: Path | None = None  # the zero_trust mode's OpenAPI 3 document
    body_limit: int = WafConfig.body_limit
    body_over_limit: str = WafConfig.body_over_limit
    # zero_trust: the document's paths are matched under this path instead of its servers'
    openapi_base_path: str | None = None
    profile: str = "api"  # crs: "api" or "none" (other modes have no profile)
    graphql_fields: tuple[str, ...] = ()  # JSON members holding GraphQL documents
    exclusions: tuple[Exclusion, ...] = ()  # rules off for named arguments, with a reason

    @property
    def api_profile(self) -> bool:
        """The crs mode's API profile applies (proxy/waf/api_profile.py)."""
        return self.mode == "crs" and self.profile == "api"


@dataclass(frozen=True)
class Exclusion:
    """Rules a route does not run on some arguments (or at all), and why."""

    rules: tuple[str, ...]  # ids and "lo-hi" ranges
    arguments: tuple[str, ...] = ()  # ARGS names as the engine names them; (): the route
    reason: str = ""


def _choice(section: Section, key: str, choices: tuple[str, ...], default: str) -> str:
    value: str = section.get(key, str, default)
    if value not in choices and not (value == default == ""):
        raise ConfigError(f"{section.key(key)}: {value!r} is not one of {', '.join(choices)}")
    return value


def _words(
    section: Section, key: str, pattern: re.Pattern[str], default: tuple[str, ...]
) -> tuple[str, ...]:
    values = section.get(key, list, list(default))
    for value in values:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ConfigError(f"{section.key(key)}: invalid entry {value!r}")
    return tuple(values)


def _crs(section: Section) -> CrsConfig:
    d = CrsConfig()
    config = CrsConfig(
        rules_dir=section.path("rules_dir", d.rules_dir),
        exclusions_dir=section.path("exclusions_dir", d.exclusions_dir),
        paranoia_level=section.integer("paranoia_level", d.paranoia_level, 1, 4),
        anomaly_threshold=section.integer("anomaly_threshold", d.anomaly_threshold, 1, 10_000),
        allowed_methods=_words(section, "allowed_methods", _METHOD, d.allowed_methods),
        allowed_content_types=_words(
            section, "allowed_content_types", _MEDIA_TYPE, d.allowed_content_types
        ),
    )
    section.finish()
    return config


def parse_waf(section: Section) -> WafConfig:
    d = WafConfig()
    library = section.get("library", str, d.library)
    if not library or any(c in library for c in "\0\n"):
        raise ConfigError(f"{section.key('library')}: a library name or path")
    config = WafConfig(
        library=library,
        sqli_xss_rules=section.path("sqli_xss_rules", d.sqli_xss_rules),
        crs=_crs(section.subsection("crs")),
        body_limit=section.size("body_limit", d.body_limit, 0, 1 << 30),
        body_over_limit=_choice(section, "body_over_limit", OVER_LIMIT_ACTIONS, d.body_over_limit),
        compressed=_choice(section, "compressed", COMPRESSED_ACTIONS, d.compressed),
        decompressed_limit=section.size("decompressed_limit", d.decompressed_limit, 0, 1 << 30),
        timeout=section.duration("timeout", d.timeout),
        threads=section.integer("threads", d.threads, 1, 64),
        max_pending=section.integer("max_pending", d.max_pending, 1, 100_000),
        inline_max=section.size("inline_max", d.inline_max, 0, 1 << 20),
        fast_pass=section.get("fast_pass", bool, d.fast_pass),
    )
    section.finish()
    return config


def _rule_ids(section: Section, key: str = "waf_exclude_rules") -> tuple[str, ...]:
    values = section.get(key, list, [])
    out = []
    for value in values:
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not _RULE_IDS.fullmatch(text):
            raise ConfigError(
                f"{section.key(key)}: {value!r} is not a rule id or a range "
                'such as "942100-942199"'
            )
        low, _, high = text.partition("-")
        if high and int(high) < int(low):
            raise ConfigError(f"{section.key(key)}: {text!r} is an empty range")
        out.append(text)
    return tuple(dict.fromkeys(out))


def _exclusion(section: Section) -> Exclusion:
    rules = _rule_ids(section, "rules")
    if not rules:
        raise ConfigError(f"{section.key('rules')}: at least one rule id or range")
    arguments = section.get("arguments", list, [])
    for name in arguments:
        if not isinstance(name, str) or not _ARGUMENT.fullmatch(name) or not name.isprintable():
            raise ConfigError(
                f"{section.key('arguments')}: {name!r} is not an argument name as the engine "
                'names it (such as "json.address.line1" or "q"; no spaces, quotes, '
                "backslashes, |, commas or braces)"
            )
    reason = section.get("reason", str, "").strip()
    if not reason or len(reason) > _REASON_MAX or not reason.isprintable():
        raise ConfigError(
            f"{section.key('reason')}: required: one line (up to {_REASON_MAX} characters) "
            "saying why the rules misfire here"
        )
    section.finish()
    return Exclusion(rules, tuple(dict.fromkeys(arguments)), reason)


def _exclusions(section: Section) -> tuple[Exclusion, ...]:
    tables = section.get("waf_exclusions", list, [])
    out = []
    for i, raw in enumerate(tables):
        if not isinstance(raw, dict):
            raise ConfigError(f"{section.key('waf_exclusions')}[{i}]: must be a table")
        out.append(_exclusion(Section(f"{section.key('waf_exclusions')}[{i}]", raw)))
    return tuple(out)


def _graphql_fields(section: Section) -> tuple[str, ...]:
    values = section.get("waf_graphql_fields", list, [])
    for value in values:
        if not isinstance(value, str) or not _GRAPHQL_FIELD.fullmatch(value):
            raise ConfigError(
                f"{section.key('waf_graphql_fields')}: {value!r} is not a JSON member "
                'name or dotted path such as "query" or "data.query"'
            )
    return tuple(dict.fromkeys(values))


def valid_base_path(value: str) -> bool:
    """A path a route may put its OpenAPI document's paths under: "/" or "/api/v3"."""
    return bool(_BASE_PATH.fullmatch(value)) and "//" not in value


def _base_path(section: Section) -> str | None:
    value: str = section.get("openapi_base_path", str, "")
    if "openapi_base_path" not in section.table:
        return None  # the document's servers
    if not valid_base_path(value):
        raise ConfigError(
            f"{section.key('openapi_base_path')}: {value!r} is not a path such as \"/api/v3\" "
            "(no query, no template variables)"
        )
    return value.rstrip("/") or "/"


def parse_route_waf(section: Section, waf: WafConfig) -> RouteWaf:
    """A route's waf, waf_action, waf_exclude_rules, openapi, openapi_base_path,
    waf_body_limit, waf_body_over_limit, waf_profile, waf_graphql_fields and
    waf_exclusions."""
    mode = _choice(section, "waf", WAF_MODES, "off")
    action = _choice(section, "waf_action", WAF_ACTIONS, "block")
    excluded = _rule_ids(section)
    if excluded and mode not in ENGINE_MODES:
        raise ConfigError(f'{section.key("waf_exclude_rules")}: only for waf = "sqli_xss" or "crs"')
    openapi = section.path("openapi", Path()) if "openapi" in section.table else None
    if (mode == "zero_trust") != (openapi is not None):
        raise ConfigError(
            f'{section.key("openapi")}: waf = "zero_trust" needs an OpenAPI document '
            '(openapi = "/etc/stockade/api.yaml"), and only it takes one'
        )
    base_path = _base_path(section)
    if base_path is not None and mode != "zero_trust":
        raise ConfigError(f'{section.key("openapi_base_path")}: only for waf = "zero_trust"')
    if "waf_profile" in section.table and mode != "crs":
        raise ConfigError(f'{section.key("waf_profile")}: only for waf = "crs"')
    profile = _choice(section, "waf_profile", WAF_PROFILES, "api")
    graphql_fields = _graphql_fields(section)
    if graphql_fields and (mode != "crs" or profile == "none"):
        raise ConfigError(
            f'{section.key("waf_graphql_fields")}: part of the API profile: waf = "crs" '
            'without waf_profile = "none"'
        )
    exclusions = _exclusions(section)
    if exclusions and mode not in ENGINE_MODES:
        raise ConfigError(f'{section.key("waf_exclusions")}: only for waf = "sqli_xss" or "crs"')
    over_limit = _choice(section, "waf_body_over_limit", OVER_LIMIT_ACTIONS, "")
    if mode == "zero_trust":
        # a positive model cannot let through what it has not seen
        if over_limit == "pass":
            raise ConfigError(
                f"{section.key('waf_body_over_limit')}: zero_trust never passes an uninspected body"
            )
        over_limit = "reject"
    return RouteWaf(
        mode=mode,
        action=action,
        exclude_rules=excluded,
        openapi=openapi,
        openapi_base_path=base_path,
        body_limit=section.size("waf_body_limit", waf.body_limit, 0, 1 << 30),
        body_over_limit=over_limit or waf.body_over_limit,
        profile=profile,
        graphql_fields=graphql_fields,
        exclusions=exclusions,
    )
