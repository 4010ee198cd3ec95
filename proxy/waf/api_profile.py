"""The crs mode's API profile, a route's GraphQL fields and exclusions, as SecLang.

The Core Rule Set was written for web forms. On a JSON API four things
about it misfire, and the profile (on by default for crs routes) fixes each
where it arises, not by switching rules off for the whole route:

1. Argument names. ModSecurity names a JSON member by its path:
   `{"profile": {"bio": "hi"}}` is the argument `json.profile.bio`, and
   every rule that reads ARGS_NAMES reads that path, where the prefix and
   the joining dots are the engine's, not the client's (`.profile` is in
   CRS's list of OS files, so 930120 refuses it; a form field `profile.bio`
   passes). For a request with a JSON body the profile takes ARGS_NAMES
   away from those rules and gives them the names the client wrote: a
   form or query name as it is, and each key of a JSON path on its own
   (the first NAME_DEPTH keys, then the rest of a deeper path joined). A
   path with a character that no identifier has (a key such as
   `../../etc/passwd` or `${jndi:...}`, whose own dots would be cut
   apart) is read whole as well. The names are TX variables
   (TX:stockade_name_<name>; TX names ignore case, so names that differ
   only in case are read once), so a log line shows the key. ModSecurity
   3.0.9 compares a `!ARGS_NAMES:/regex/` exclusion with the key alone,
   whatever the collection, so it would take the JSON values away too:
   hence the whole collection goes and the names come back in TX.
2. 941310 (US-ASCII malformed encoding XSS) matches the bytes 0xBC and
   0xBE, which a browser once read as `<` and `>` on a US-ASCII page. In
   UTF-8 they are continuation bytes: `ü` is C3 BC and the Cyrillic o is D0
   BE, so `Jürgen` followed by a Russian surname matches. The profile runs it on arguments only when
   the value is not valid UTF-8, where a lone 0xBC can only be that trick.
3. Free text. Markdown, comments, addresses and search phrases are prose,
   with newlines and `code spans` before words that are also commands,
   `[links](...)` that look like PHP's variable functions, and addresses
   that start with a number and a word that is also SQL (`4 Insert Road`).
   For arguments whose own name says free text (FIELDS: a JSON member by
   its last key; a search box's form or query field by its name) only the
   rules that prose trips are changed, as each entry says; every other
   rule still reads the field.
4. At paranoia level 2, two rules whose premise an API does not share:
   913101 (a scripting or library User-Agent: what API clients are) is
   off, and 931130 (a URL to another host: a remote file include) does not
   read JSON members, where URLs are webhooks and avatars.

GraphQL (a route's waf_graphql_fields, JSON requests only): the named JSON
members hold GraphQL documents, whose syntax (braces, `$variables`,
`(args)`, `...fragments`) trips GRAPHQL_RULES. Those rules do not read the
document; every rule that reads arguments reads its string literals
instead (TX:stockade_graphql_<n>_<argument>, the first GRAPHQL_LITERALS of them, then
the rest of the document after them), and every other rule still reads
the whole document. The query's variables are JSON members like any other.

A route's waf_exclusions switch rules off for named arguments
(SecRuleUpdateTargetById "!ARGS:<name>", which for a literal name is
exact) or for the route (SecRuleRemoveById). Excluding a rule excludes the
profile's copies of it too.

A copy (variant) of a CRS rule keeps its operator, transformations,
message, severity and scores, and has the id VARIANT_BASE * kind + the
original id (2932100 is 932100 as prose), so a log line still names the
rule. Copies and the profile's own rules are loaded before the CRS files,
so they run before the CRS rules of their phase and their scores count
when REQUEST-949 adds them up; a copy exists only for a rule at or below
the paranoia level. Where a rule's text is not what the profile expects (a
CRS version with another operator), the profile leaves that rule as CRS
has it: a misfire, never a gap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from stockade.proxy.waf_settings import Exclusion

TX_PREFIX = "stockade_"  # the profile's TX variables, which rules read as arguments
NAME_PREFIX = TX_PREFIX + "name_"  # TX:stockade_name_<name>: the names the rules read
GRAPHQL_PREFIX = TX_PREFIX + "graphql_"  # TX:stockade_graphql_<n>_<argument>: literals
NAME_DEPTH = 6  # JSON keys read one by one; a deeper path's rest is read joined
GRAPHQL_LITERALS = 8  # string literals read one by one; the rest of the document after them
VARIANT_BASE = 1_000_000
UTF8_VARIANT, PROSE_VARIANT = 1, 2  # the kinds of copies: the first digit of their id
NAME_RULES = 201000  # ids of the profile's own rules: names from here,
LITERAL_RULES = 201050  # GraphQL literals from here
SESSION_COUNTER = "921170"  # counts parameters by name for 921180; left as it is


@dataclass(frozen=True)
class CrsRule:
    """A SecRule of the loaded rule files that has an id (so the head of a chain)."""

    rule_id: str
    targets: tuple[str, ...]  # as written, split on "|"
    operator: str  # as written between its quotes (escapes kept)
    actions: tuple[str, ...]  # as written, split on the commas between actions
    paranoia: int  # its tag paranoia-level/N; 0 without one
    chained: bool  # the next SecRule is part of it


# SecRule TARGETS "OPERATOR" ["ACTIONS"] (the last rule of a chain may have no actions)
_DIRECTIVE = re.compile(r'^\s*SecRule\s+(\S+)\s+"((?:[^"\\]|\\.)*)"(?:\s+"((?:[^"\\]|\\.)*)")?\s*$')


def _split(text: str, separator: str, quote: str = "'") -> list[str]:
    """Split on `separator` outside `quote`d parts, keeping backslash escapes."""
    out, current, quoted, i = [], [], False, 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if char == quote:
            quoted = not quoted
        if char == separator and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    out.append("".join(current))
    return out


def parse_rules(text: str) -> dict[str, CrsRule]:
    """The rules with an id in SecLang text (continuation lines joined, comments skipped)."""
    joined = re.sub(r"\\\r?\n", " ", text)
    rules: dict[str, CrsRule] = {}
    in_chain = False
    for line in joined.splitlines():
        found = _DIRECTIVE.match(line)
        if found is None:
            continue
        targets, operator, actions_text = found.group(1), found.group(2), found.group(3) or ""
        actions = tuple(a.strip() for a in _split(actions_text, ",") if a.strip())
        ids = [a[3:] for a in actions if a.startswith("id:")]
        if ids and not in_chain:
            level = re.search(r"paranoia-level/(\d)", actions_text)
            rules[ids[0]] = CrsRule(
                rule_id=ids[0],
                targets=tuple(targets.split("|")),
                operator=operator,
                actions=actions,
                paranoia=int(level.group(1)) if level else 0,
                chained="chain" in actions,
            )
        in_chain = "chain" in actions
    return rules


def any_of(patterns: Iterable[str]) -> str:
    """A regex that matches where any of `patterns` does, written without `|`.

    ModSecurity splits a rule's target list on `|`, even inside a /regex/
    selector, so an alternation there does not parse; "not (not A and not
    B)" in lookaheads says the same.
    """
    return "(?!" + "".join(f"(?!{p})" for p in patterns) + ")"


@dataclass(frozen=True)
class FieldKind:
    """Arguments whose name says they hold a kind of free text, and what changes there."""

    name: str
    keys: tuple[str, ...]  # a JSON member's last key (any case)
    excluded: tuple[str, ...]  # rules that do not read these arguments
    # rules that read them as prose: a newline or a backtick is text there, not
    # a command separator (the rule's first group of separators without them)
    as_prose: tuple[str, ...]
    reason: str
    fields: tuple[str, ...] = ()  # form and query fields, by their exact name

    def json_pattern(self) -> str:
        """ARGS names of JSON members whose last key is one of `keys`."""
        return "(?i)^json\\." + any_of(rf"(?:.*\.)?{re.escape(k)}$" for k in self.keys)


_FREE_TEXT_KEYS = (
    "body", "text", "description", "comment", "content", "message", "bio", "notes", "note",
    "summary", "markdown", "about", "details", "caption", "reply",
)  # fmt: skip
_ADDRESS_KEYS = (
    "line1", "line2", "line3", "address", "address1", "address2", "address_line1",
    "address_line2", "street", "street_address",
)  # fmt: skip
_SEARCH_FIELDS = ("q", "query", "search", "term", "terms", "keywords", "phrase")
# The command-injection rules whose separators include a newline and a backtick.
_SEPARATED_COMMANDS = ("932100", "932105", "932110", "932115")
FIELDS: tuple[FieldKind, ...] = (
    FieldKind(
        "free text",
        _FREE_TEXT_KEYS,
        excluded=("932150", "933210", "942190", "942360"),
        as_prose=_SEPARATED_COMMANDS,
        reason="markdown and prose: a line or a `code span` that starts with a word that is "
        "also a command (`cc @ops`, `make test`) reads as a command line to 932100-932115 "
        "(read here with newlines and backticks as text; ; | & $( still separate commands) "
        "and, at the start of the text, to 932150; task lists and numbered lines "
        "(`- [ ] update ...`) look like SQL to 942360, code spans around SQL words "
        "(`select`) like MSSQL to 942190, [links](url) like PHP variable functions to 933210",
    ),
    FieldKind(
        "address line",
        _ADDRESS_KEYS,
        excluded=("942360",),
        as_prose=(),
        reason="a street address starts with a number and a name that may be an SQL word "
        "(`4 Insert Road, Unit 7/2`): 942360's SQL statement after digits",
    ),
    FieldKind(
        "search phrase",
        _SEARCH_FIELDS,
        excluded=("932150",),
        as_prose=(),
        reason="a search phrase may start with a word that is also a command "
        "(`python books`, `echo dot`): 932150's command at the start of a value",
        fields=_SEARCH_FIELDS,
    ),
)

# What GraphQL syntax trips, measured on tests/waf/corpus at PL1-PL3, with the
# siblings of the same families (932105/932110: 932100/932115's other halves;
# 942432: 942430's PL4 form): `{`, `|`, newlines and `$var` as command
# separators, `query ... { ... }` and `(id: $id)` as SQL, and the count of
# special characters in a document.
GRAPHQL_RULES = (
    "920272", "932100", "932105", "932110", "932115", "933161", "942150", "942190",
    "942200", "942410", "942430", "942431", "942432", "942460", "942490",
)  # fmt: skip


# Paranoia level 2 rules whose premise an API does not share, off where it
# does not hold.
API_CLIENTS = (
    "913101",
    "a script or HTTP library as the User-Agent (python-requests, curl, okhttp) is what "
    "an API's clients are",
)
JSON_URLS = (
    "931130",
    "a URL to another host in a JSON member (a webhook, an avatar, a redirect URI) is data "
    "to an API, not a file a PHP include() would fetch",
)


def variant_id(kind: int, rule_id: str) -> str:
    return str(VARIANT_BASE * kind + int(rule_id))


def _variant(
    rule: CrsRule, kind: int, targets: str, operator: str | None = None, only_if: str = ""
) -> str:
    """A copy of a rule under a new id, on other targets (and operator); with
    `only_if`, a chained condition on the matched value that must hold too."""
    scores = [a for a in rule.actions if a.startswith("setvar:")] if only_if else []
    actions = [
        f"id:{variant_id(kind, rule.rule_id)}" if a.startswith("id:") else a
        for a in rule.actions
        if a not in scores
    ]
    text = f'SecRule {targets} "{operator or rule.operator}" "{",".join(actions)}'
    if not only_if:
        return text + '"'
    # the scores move to the chained rule: they count only when both match
    return text + f',chain"\n    SecRule MATCHED_VAR "{only_if}" "t:none,{",".join(scores)}"'


def _first_group(operator: str) -> tuple[int, int] | None:
    """Where the first (?:...) group of an @rx operator is (its contents)."""
    start = operator.find("(?:")
    if not operator.startswith("@rx ") or start < 0:
        return None
    depth, i = 0, start
    while i < len(operator):
        char = operator[i]
        if char == "\\":
            i += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return start + 3, i
        i += 1
    return None


def prose_operator(operator: str) -> str | None:
    """A command rule's operator with newline, CR and backtick taken out of its
    first group of separators; None if it has no such group."""
    where = _first_group(operator)
    if where is None:
        return None
    begin, end = where
    alternatives = _split(operator[begin:end], "|", quote="\0")
    kept = [a for a in alternatives if a not in ("\\n", "\\r", "`")]
    if len(kept) != len(alternatives) - 3:
        return None  # not the separators the profile knows
    return operator[:begin] + "|".join(kept) + operator[end:]


def _update(rule_id: str, target: str) -> str:
    return f'SecRuleUpdateTargetById {rule_id} "{target}"'


@dataclass
class ProfileRules:
    """SecLang for a route's set: `pre` before the mode's rules, `post` after them."""

    pre: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)
    variants: dict[str, list[str]] = field(default_factory=dict)  # rule id -> its copies

    def add_variant(self, rule_id: str, kind: int, text: str) -> None:
        self.pre.append(text)
        self.variants.setdefault(rule_id, []).append(variant_id(kind, rule_id))

    def extend(self, other: ProfileRules) -> None:
        self.pre += other.pre
        self.post += other.post
        for rule_id, copies in other.variants.items():
            self.variants.setdefault(rule_id, []).extend(copies)


def _name_rules() -> list[str]:
    """The rules that put the names a client wrote into TX:stockade_name_<name>."""
    setvar = f"setvar:'tx.{NAME_PREFIX}%{{tx.1}}=%{{tx.1}}'"
    head = "phase:2,pass,nolog,capture,t:none"
    patterns = [r"^(?!json\.)([\s\S]*)$"]  # a form or query name, whole
    patterns += [rf"^json\.(?:[^.]*\.){{{depth}}}([^.]*)" for depth in range(NAME_DEPTH)]
    patterns.append(rf"^json\.(?:[^.]*\.){{{NAME_DEPTH}}}([\s\S]+)$")  # a deeper path's rest
    # A path with ASCII that no identifier has, or an empty key (a key with a
    # dot at either end): whole, since its keys may have dots of their own.
    odd = r"[\x00-\x2c\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f]"
    patterns.append(rf"^json\.((?:\.|[\s\S]*(?:{odd}|\.\.|\.$))[\s\S]*)$")
    return [
        f'SecRule ARGS_NAMES "@rx {p}" "id:{NAME_RULES + i},{head},{setvar}"'
        for i, p in enumerate(patterns)
    ]


def api_profile(
    rules: Mapping[str, CrsRule],
    paranoia: int,
    *,
    json: bool,
    graphql_fields: Iterable[str] = (),
) -> ProfileRules:
    """The profile for these CRS rules at this paranoia level. `json`: for requests
    with a JSON body (the names, the JSON members and GraphQL apply only there)."""
    out = ProfileRules()
    graphql_fields = tuple(graphql_fields) if json else ()
    if json:  # 1. names: the rules on ARGS_NAMES read the client's names
        out.pre += _name_rules()
    if graphql_fields:  # and GraphQL documents' literals
        out.extend(_graphql(rules, paranoia, graphql_fields))
    for rule in rules.values():
        if rule.paranoia > paranoia:
            continue
        names = json and "ARGS_NAMES" in rule.targets and rule.rule_id != SESSION_COUNTER
        literals = bool(graphql_fields) and "ARGS" in rule.targets
        if names:
            out.post.append(_update(rule.rule_id, "!ARGS_NAMES"))
        # one TX target for a rule that reads both: each one is a scan of all of TX
        prefix = TX_PREFIX if names and literals else NAME_PREFIX if names else GRAPHQL_PREFIX
        if names or literals:
            out.post.append(_update(rule.rule_id, f"TX:/^{prefix}/"))
    # 2. 941310 on arguments only when the value is not UTF-8
    utf8 = rules.get("941310")
    if utf8 is not None and utf8.paranoia <= paranoia and not utf8.chained:
        text = _variant(utf8, UTF8_VARIANT, "ARGS", only_if="@validateUtf8Encoding")
        out.add_variant("941310", UTF8_VARIANT, text)
        out.post.append(_update("941310", "!ARGS"))
    # 3. at paranoia level 2: scripted clients, URLs in JSON members
    clients, urls = rules.get(API_CLIENTS[0]), rules.get(JSON_URLS[0])
    if clients is not None and clients.paranoia <= paranoia:
        out.post.append(f"SecRuleRemoveById {clients.rule_id}")
    if json and urls is not None and urls.paranoia <= paranoia:
        out.post.append(_update(urls.rule_id, "!ARGS:/^json\\./"))
    # 4. free text: the rules prose trips, on the arguments named for it
    prose: dict[str, list[str]] = {}
    for kind in FIELDS:
        for rule_id in (*kind.excluded, *kind.as_prose):
            known = rules.get(rule_id)
            if known is None or known.paranoia > paranoia:
                continue
            if rule_id in kind.as_prose:
                if known.chained or prose_operator(known.operator) is None:
                    continue  # not the rule the profile knows: left as it is
                prose.setdefault(rule_id, []).extend(kind.keys)
            if json:
                out.post.append(_update(rule_id, f"!ARGS:/{kind.json_pattern()}/"))
            out.post += [_update(rule_id, f"!ARGS:{name}") for name in kind.fields]
    for rule_id, keys in prose.items() if json else ():
        rule = rules[rule_id]
        pattern = FieldKind("", tuple(dict.fromkeys(keys)), (), (), "").json_pattern()
        operator = prose_operator(rule.operator)
        out.add_variant(
            rule_id, PROSE_VARIANT, _variant(rule, PROSE_VARIANT, f"ARGS:/{pattern}/", operator)
        )
    return out


def graphql_pattern(fields: Iterable[str]) -> str:
    """The ARGS names of the JSON members holding GraphQL documents (a batch: an array)."""
    return r"^json\.(?:array_\d+\.)?" + any_of(rf"{re.escape(f)}$" for f in fields)


def _graphql(rules: Mapping[str, CrsRule], paranoia: int, fields: tuple[str, ...]) -> ProfileRules:
    """GRAPHQL_RULES do not read the documents; rules on arguments read their literals
    (the TX targets are api_profile's)."""
    out = ProfileRules()
    target = f"ARGS:/{graphql_pattern(fields)}/"
    # "..." with \-escapes (a """block""" reads as literals too); a document with
    # more than GRAPHQL_LITERALS of them: the rest after them, whole
    literal = r"\x22((?:[^\x22\x5c]|\x5c[\s\S])*)\x22"
    skip = r"(?:[^\x22]*\x22(?:[^\x22\x5c]|\x5c[\s\S])*\x22)"
    patterns = [rf"^{skip}{{{n}}}[^\x22]*{literal}" for n in range(GRAPHQL_LITERALS)]
    patterns.append(rf"^{skip}{{{GRAPHQL_LITERALS}}}([\s\S]*\x22[\s\S]*)$")
    for n, pattern in enumerate(patterns):
        out.pre.append(
            f'SecRule {target} "@rx {pattern}" "id:{LITERAL_RULES + n},phase:2,pass,nolog,'
            # (named for the document too: a batch has several)
            f"capture,t:none,setvar:'tx.{GRAPHQL_PREFIX}{n}_%{{MATCHED_VAR_NAME}}=%{{tx.1}}'\""
        )
    for rule_id in GRAPHQL_RULES:
        rule = rules.get(rule_id)
        if rule is not None and rule.paranoia <= paranoia:
            out.post.append(_update(rule_id, f"!{target}"))
    return out


def expand(items: Iterable[str], known: Iterable[str]) -> list[str]:
    """Rule ids and "lo-hi" ranges as the loaded rule ids they cover."""
    loaded = sorted({int(i) for i in known})
    out: list[str] = []
    for item in items:
        low, _, high = item.partition("-")
        lo, hi = int(low), int(high or low)
        out += [str(i) for i in loaded if lo <= i <= hi]
    return list(dict.fromkeys(out))


def removal(items: tuple[str, ...], known: Iterable[str], variants: Mapping[str, list[str]]) -> str:
    """SecRuleRemoveById for waf_exclude_rules, the profile's copies of them included."""
    copies = [v for i in expand(items, known) for v in variants.get(i, ())]
    return "SecRuleRemoveById " + " ".join((*items, *copies))


def exclusion_rules(
    exclusions: Iterable[Exclusion], known: Iterable[str], variants: Mapping[str, list[str]]
) -> list[str]:
    """SecLang for waf_exclusions; ValueError names a rule that is not loaded."""
    known = set(known)
    lines = []
    for exclusion in exclusions:
        missing = [r for r in exclusion.rules if not expand([r], known)]
        if missing:
            raise ValueError(f"{', '.join(missing)}: no such rule is loaded")
        ids = expand(exclusion.rules, known)
        ids += [v for i in ids for v in variants.get(i, ())]
        if not exclusion.arguments:
            lines.append("SecRuleRemoveById " + " ".join(ids))
            continue
        lines += [
            _update(rule_id, f"!ARGS:{name}") for rule_id in ids for name in exclusion.arguments
        ]
    return lines
