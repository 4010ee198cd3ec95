"""The rule sets of the engine modes, built once per worker.

sqli_xss: the engine settings below and the shipped libinjection rules
(proxy/waf/rules/sqli_xss.conf). crs: the same settings, a setup equivalent
to CRS's crs-setup.conf (paranoia level, anomaly threshold, the methods and
content types an API uses), then the distribution's request-side rule
files in name order, between Debian's local exclusion files when present.
Only request rules are loaded: the gateway never hands the engine a
response.

A route that changes the mode's rules gets its own sets: its own rules
first (the API profile's, proxy/waf/api_profile.py: they must run before the
CRS rules of their phase), then the mode's rules merged in (shared, not
parsed again), then the changes to those (SecRuleUpdateTargetById,
SecRuleRemoveById). A crs route with the profile has two: one for requests
with a JSON body, one for the rest (which needs no JSON names moved, and so
does not pay for it). Routes that change the same things share the sets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stockade.proxy.waf import api_profile
from stockade.proxy.waf.api_profile import CrsRule, ProfileRules
from stockade.proxy.waf.findings import rule_ids
from stockade.proxy.waf.modsec import Engine, RulesError, RuleSet
from stockade.proxy.waf_settings import CrsConfig, Exclusion, RouteWaf, WafConfig

# Debian's place for an operator's exclusions around CRS (see owasp-crs.load).
CRS_BEFORE = "REQUEST-900-EXCLUSION-RULES-BEFORE-CRS.conf"
CRS_AFTER = "RESPONSE-999-EXCLUSION-RULES-AFTER-CRS.conf"

# As ModSecurity's modsecurity.conf-recommended (rule ids 200000-200002): the
# engine on, bodies read, JSON and XML bodies parsed into ARGS/XML, and a body
# that does not parse as its declared type refused, since what the engine
# could not parse it could not inspect either. An empty body is never refused
# for its Content-Type alone (the XML processor fails on no input at all).
# The Content-Types (matched caseless from the start) whose bodies rules 200000
# and 200001 hand to the XML and JSON processors; fast_pass.py reads them too.
XML_CONTENT_TYPE = r"(?:application(?:/soap\+|/)|text/)xml"
JSON_CONTENT_TYPE = r"application/(?:[a-z0-9.-]+\+)?json"
_JSON_BODY = re.compile(f"(?i){JSON_CONTENT_TYPE}".encode())
_ENGINE = """\
SecRuleEngine On
SecRequestBodyAccess On
SecRequestBodyLimit {limit}
SecRequestBodyNoFilesLimit {limit}
SecRequestBodyLimitAction Reject
SecResponseBodyAccess Off
SecAuditEngine Off
SecRule REQUEST_HEADERS:Content-Type "@rx (?i)^{xml}" \
    "id:200000,phase:1,t:none,pass,nolog,ctl:requestBodyProcessor=XML"
SecRule REQUEST_HEADERS:Content-Type "@rx (?i)^{json}" \
    "id:200001,phase:1,t:none,pass,nolog,ctl:requestBodyProcessor=JSON"
SecRule REQBODY_ERROR "!@eq 0" \
    "id:200002,phase:2,t:none,deny,status:400,log,msg:'Failed to parse request body',\
logdata:'%{{reqbody_error_msg}}',chain"
    SecRule REQUEST_BODY_LENGTH "!@eq 0" "t:none"
"""

# What crs-setup.conf sets (rule ids 900000-900990 are reserved for it). CRS
# restricts Content-Encoding only because ModSecurity cannot read a compressed
# body; the WAF decompresses it first (or refuses it), so it is allowed here.
_CRS_SETUP = """\
SecDefaultAction "phase:1,log,auditlog,pass"
SecDefaultAction "phase:2,log,auditlog,pass"
SecAction "id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level={paranoia}"
SecAction "id:900110,phase:1,nolog,pass,t:none,\
setvar:tx.inbound_anomaly_score_threshold={threshold},\
setvar:tx.outbound_anomaly_score_threshold=4"
SecAction "id:900200,phase:1,nolog,pass,t:none,setvar:'tx.allowed_methods={methods}'"
SecAction "id:900220,phase:1,nolog,pass,t:none,\
setvar:'tx.allowed_request_content_type={content_types}'"
SecAction "id:900250,phase:1,nolog,pass,t:none,\
setvar:'tx.restricted_headers=/accept-charset/ /proxy/ /lock-token/ /content-range/ /if/'"
SecAction "id:900990,phase:1,nolog,pass,t:none,setvar:tx.crs_setup_version=334"
"""


def engine_settings(body_limit: int) -> str:
    # The engine's own body limit is only a backstop: the WAF never appends more.
    return _ENGINE.format(
        limit=max(body_limit, 1), xml=XML_CONTENT_TYPE, json=JSON_CONTENT_TYPE
    )


def crs_setup(crs: CrsConfig) -> str:
    return _CRS_SETUP.format(
        paranoia=crs.paranoia_level,
        threshold=crs.anomaly_threshold,
        methods=" ".join(crs.allowed_methods),
        content_types=" ".join(f"|{t}|" for t in crs.allowed_content_types),
    )


def crs_files(crs: CrsConfig) -> list[Path]:
    """The CRS rule files to load, in order; an empty list if the rules are missing."""
    rules = sorted(crs.rules_dir.glob("REQUEST-*.conf"))
    if not rules:
        return []
    before, after = crs.exclusions_dir / CRS_BEFORE, crs.exclusions_dir / CRS_AFTER
    return [
        *([before] if before.is_file() else []),
        *rules,
        *([after] if after.is_file() else []),
    ]


# Headers the engine itself reads, whatever the rules: the body processors
# (Content-Type), REQUEST_COOKIES (Cookie), and the body's declared length.
ENGINE_HEADERS = frozenset({"content-type", "cookie", "content-length"})
_ALL_HEADERS = re.compile(r"REQUEST_HEADERS(?![:A-Z_])|REQUEST_HEADERS_NAMES|REQUEST_HEADERS:/")
_NAMED_HEADER = re.compile(r"REQUEST_HEADERS:([A-Za-z0-9_-]+)")


def headers_read(text: str) -> frozenset[str] | None:
    """The request headers rules can see (lowercase), or None for all of them.

    A rule on the whole collection (REQUEST_HEADERS, its names, a /regex/
    selector) sees every header; one on REQUEST_HEADERS:User-Agent only
    that one. The WAF hands the engine only these: each header costs a call
    and the engine's bookkeeping, and a header no rule reads cannot change
    a verdict.
    """
    if _ALL_HEADERS.search(text):
        return None
    return ENGINE_HEADERS | {name.lower() for name in _NAMED_HEADER.findall(text)}


def json_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the engine will parse the body as JSON: a Content-Type rule 200001
    matches (any of them, as REQUEST_HEADERS:Content-Type reads every one)."""
    return any(
        name.lower() == b"content-type" and _JSON_BODY.match(value) for name, value in headers
    )


@dataclass(frozen=True)
class SetKey:
    """What a rule set is: a mode's rules and a route's changes to them."""

    mode: str
    exclude_rules: tuple[str, ...] = ()  # waf_exclude_rules
    profile: bool = False  # the API profile
    json: bool = False  # the profile's and GraphQL's parts for a JSON body
    graphql_fields: tuple[str, ...] = ()
    exclusions: tuple[Exclusion, ...] = ()

    @classmethod
    def of(cls, policy: RouteWaf, json: bool) -> SetKey:
        graphql = policy.graphql_fields if policy.api_profile else ()
        return cls(
            policy.mode,
            policy.exclude_rules,
            policy.api_profile,
            json and policy.api_profile,
            graphql if json else (),
            policy.exclusions,
        )

    @property
    def base(self) -> bool:
        return self == SetKey(self.mode)


@dataclass(frozen=True)
class RouteRules:
    """A route's rule sets: for requests with a JSON body, and for the others."""

    json: RuleSet
    other: RuleSet

    def for_request(self, headers: Iterable[tuple[bytes, bytes]]) -> RuleSet:
        if self.json is self.other:
            return self.other
        return self.json if json_body(headers) else self.other


class RuleSets:
    """A worker's rule sets, by SetKey; built when first asked for."""

    def __init__(self, engine: Engine, config: WafConfig, body_limit: int) -> None:
        self.engine = engine
        self.config = config
        self.body_limit = body_limit  # the most the WAF hands the engine
        self._sets: dict[SetKey, RuleSet] = {}
        self.known_ids: set[str] = set()  # of every rule loaded: what a log line may name
        self._texts: dict[str, list[str]] = {}  # by mode: the rule text loaded
        self._ids: dict[str, set[str]] = {}  # by mode: the ids of its rules
        self._crs_rules: dict[str, CrsRule] | None = None  # parsed when a profile needs them

    def get(self, mode: str, exclusions: tuple[str, ...] = ()) -> RuleSet:
        """A mode's rules, less the rules in waf_exclude_rules."""
        return self._get(SetKey(mode, exclusions))

    def for_route(self, name: str, policy: RouteWaf) -> RouteRules:
        """A route's sets; RulesError names the route if its changes do not load."""
        try:
            return RouteRules(
                self._get(SetKey.of(policy, json=True)), self._get(SetKey.of(policy, json=False))
            )
        except (RulesError, ValueError) as exc:
            raise RulesError(f"route {name}: {exc}") from None

    def _get(self, key: SetKey) -> RuleSet:
        found = self._sets.get(key)
        if found is None:
            found = self._build(key)
            self._sets[key] = found
        return found

    def _build(self, key: SetKey) -> RuleSet:
        rules = self.engine.rule_set()
        try:
            if key.base:
                self._add(rules, engine_settings(self.body_limit), "engine settings", key.mode)
                self._load_mode(rules, key.mode)
            else:
                base = self._get(SetKey(key.mode))
                tuning = self._tuning(key)
                if tuning.pre:
                    text = "\n".join(tuning.pre)
                    rules.add(text, "the API profile")
                    self.known_ids |= rule_ids(text)  # (not the mode's: see headers_read)
                rules.merge(base)
                post = list(tuning.post)
                known = self._ids[key.mode] | {v for c in tuning.variants.values() for v in c}
                try:
                    post += api_profile.exclusion_rules(key.exclusions, known, tuning.variants)
                except ValueError as exc:
                    raise RulesError(f"waf_exclusions: {exc}") from None
                if key.exclude_rules:
                    post.append(api_profile.removal(key.exclude_rules, known, tuning.variants))
                if post:
                    rules.add("\n".join(post), "the route's changes to its rules")
        except BaseException:
            rules.close()
            raise
        return rules

    def _tuning(self, key: SetKey) -> ProfileRules:
        """The profile's and GraphQL's rules for a set (none outside crs)."""
        out = ProfileRules()
        if key.mode != "crs" or not key.profile:
            return out
        level = self.config.crs.paranoia_level
        out.extend(
            api_profile.api_profile(
                self._parsed_crs(), level, json=key.json, graphql_fields=key.graphql_fields
            )
        )
        return out

    def _parsed_crs(self) -> dict[str, CrsRule]:
        if self._crs_rules is None:
            self._crs_rules = api_profile.parse_rules("\n".join(self._texts["crs"]))
        return self._crs_rules

    def _load_mode(self, rules: RuleSet, mode: str) -> None:
        if mode == "sqli_xss":
            self._add_file(rules, self.config.sqli_xss_rules, mode)
        elif mode == "crs":
            crs = self.config.crs
            files = crs_files(crs)
            if not files:
                raise RulesError(
                    f"no REQUEST-*.conf rule files in {crs.rules_dir}; install modsecurity-crs "
                    "or set [proxy.waf.crs] rules_dir"
                )
            self._add(rules, crs_setup(crs), "CRS setup", mode)
            for path in files:
                self._add_file(rules, path, mode)
        else:
            raise ValueError(f"{mode!r} is not an engine mode")

    def headers_read(self, mode: str) -> frozenset[str] | None:
        """The headers the mode's rules read (None: all); its rules must be loaded."""
        return headers_read("\n".join(self._texts[mode]))

    def _add(self, rules: RuleSet, text: str, origin: str, mode: str) -> None:
        rules.add(text, origin)
        self._loaded(text, mode)

    def _add_file(self, rules: RuleSet, path: Path, mode: str) -> None:
        rules.add_file(path)  # the engine's error names a missing or unreadable file
        self._loaded(path.read_text(encoding="utf-8", errors="replace"), mode)

    def _loaded(self, text: str, mode: str) -> None:
        ids = rule_ids(text)
        self.known_ids |= ids
        self._ids.setdefault(mode, set()).update(ids)
        self._texts.setdefault(mode, []).append(text)

    def close(self) -> None:
        # sets merged into others are shared: release the routes' own sets first
        for key in sorted(self._sets, key=lambda k: k.base):
            self._sets.pop(key).close()
