"""`stockade waf tune`: exclusions proposed from what a route's WAF recorded.

Run a route with `waf_action = "detect"`; every request the engine flags is
logged in the access log with its matches (proxy/waf/findings.py: rule id,
variable name, anomaly points, and CRS's total score; never a value). From
those records:

1. A record counts if the route's current config would still flag it: its
   matches minus those the route's exclusions already cover still score
   the anomaly threshold (crs), or still have a match (sqli_xss, whose
   rules deny at the first match). recorded_flagged() is that check;
   `stockade replay` uses it too, so both say the same.
2. Its matches are grouped by (rule, variable). A rule's copies in the API
   profile (id VARIANT_BASE * kind + id) count as the rule: an exclusion of
   the rule covers them.
3. Likely attacks. For a request where rule R matched, the other rules'
   points are its score (less what today's exclusions take) minus R's
   points. If those reach `attack_score` (default twice the anomaly
   threshold: refused with room to spare without R), the request is taken
   for an attack and (R, variable) is not proposed: R fires where attacks
   are sent, and excluding it there would weaken the argument attacked.
4. The narrowest exclusion is the rule on one argument (`ARGS:<name>`).
   A rule whose arguments vary without bound - more than max_arguments
   distinct names, most of them seen in one request only (keys that are
   ids, array positions of long lists) - is proposed for the whole route
   instead, since a list of names would never cover the next request. A
   match on something an argument exclusion cannot name (a header, a
   cookie, an argument's name, the path, a name the log could not keep
   whole) can also only be excluded for the whole rule. Whole-rule
   proposals are shown, and written only for the rules named with --rule.
5. For each proposal: the requests and clients it covers, sample request
   ids, and how many recorded requests it alone would let through; for all
   of them together, which requests stay flagged and why.

ModSecurity 3 logs one line per rule, naming the last variable it matched,
though every variable it matched scores; the record's score says how many
points no line names. They are kept when recomputing, so a request whose
rule also matched an unnamed argument stays flagged (the report says so):
apply, record again, and the next name shows.
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stockade.proxy.waf.api_profile import VARIANT_BASE  # a copy's id: kind * this + id
from stockade.proxy.waf.findings import MAX_MATCHES, MAX_RECORDED_VARIABLE, SEVERITY_POINTS
from stockade.proxy.waf_settings import ENGINE_MODES, Exclusion, RouteWaf

ARGUMENT = "ARGS:"
MAX_ARGUMENTS = 8  # distinct names of one rule before "varies without bound" may apply
SAMPLES = 5
REASON_MAX = 300  # what [[proxy.routes.waf_exclusions]] reason takes
# What an exclusion's `arguments` entry may be (proxy/waf_settings.py checks the same)
_ARGUMENT_NAME = re.compile(r'[^\s"\\|,{}/!][^\s"\\|,{}]{0,255}')
_RULE = re.compile(r"[0-9]{1,12}")
_MAX_POINTS = max(SEVERITY_POINTS.values())


class TuneError(ValueError):
    """Bad input: the route, the options or the config; the message says which."""


class WriteError(RuntimeError):
    """The config could not be rewritten; nothing was changed."""


# -- what the access log recorded ----------------------------------------------------


@dataclass(frozen=True)
class RecordedMatch:
    rule: str  # as logged: a profile copy has its own id
    variable: str
    points: int
    named: bool = True

    @property
    def base_rule(self) -> str:
        number = int(self.rule)
        return str(number % VARIANT_BASE) if number >= VARIANT_BASE else self.rule

    @property
    def argument(self) -> str | None:
        """The ARGS name an exclusion can take, or None."""
        if not self.named or not self.variable.startswith(ARGUMENT):
            return None
        name = self.variable[len(ARGUMENT) :]
        return name if _ARGUMENT_NAME.fullmatch(name) else None


@dataclass(frozen=True)
class RecordedWaf:
    """The `waf` field of an access-log line."""

    mode: str
    score: int | None
    matches: tuple[RecordedMatch, ...]
    dropped: int = 0

    @property
    def unnamed_points(self) -> int:
        """Points of matches no log line names (see the module's last paragraph)."""
        if self.score is None:
            return 0
        return max(0, self.score - sum(m.points for m in self.matches))


def _int(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError("not an integer in range")
    return value


def parse_recorded_waf(raw: Any) -> RecordedWaf | None:
    """The field as written by proxy/access_log.py; None when absent or malformed."""
    if not isinstance(raw, dict):
        return None
    try:
        mode = raw["mode"]
        score = raw.get("score")
        matches = raw["matches"]
        if mode not in ENGINE_MODES or not isinstance(matches, list):
            return None
        if len(matches) > MAX_MATCHES:
            return None
        parsed = []
        for item in matches:
            rule, variable, named = item["rule"], item["var"], item.get("named", True)
            if not isinstance(rule, str) or not _RULE.fullmatch(rule):
                return None
            if not isinstance(variable, str) or len(variable) > MAX_RECORDED_VARIABLE:
                return None
            if not isinstance(named, bool):
                return None
            parsed.append(RecordedMatch(rule, variable, _int(item["points"], 0, 100), named))
        return RecordedWaf(
            mode,
            None if score is None else _int(score, 0, 1_000_000),
            tuple(parsed),
            _int(raw.get("dropped", 0), 0, 1_000_000),
        )
    except (KeyError, TypeError, ValueError):
        return None


def flagged_reason(decision: str, reason: str | None) -> str | None:
    """What the WAF said of a recorded request ("blocked", "bad_body", ...), or None."""
    if decision == "waf":
        return reason or ""
    if reason is not None and reason.startswith("waf_detect:"):
        return reason.removeprefix("waf_detect:")
    return None


# -- exclusions, as the engine applies them ----------------------------------------------


def _in_rules(rule: str, items: Iterable[str]) -> bool:
    number = int(rule)
    for item in items:
        low, _, high = item.partition("-")
        if int(low) <= number <= int(high or low):
            return True
    return False


def covered(match: RecordedMatch, policy: RouteWaf) -> bool:
    """The route's exclusions take this match away (waf_exclude_rules, waf_exclusions)."""
    rule = match.base_rule
    if _in_rules(rule, policy.exclude_rules):
        return True
    argument = match.variable[len(ARGUMENT) :] if match.variable.startswith(ARGUMENT) else None
    for exclusion in policy.exclusions:
        if not _in_rules(rule, exclusion.rules):
            continue
        if not exclusion.arguments:
            return True
        if match.named and argument is not None and argument in exclusion.arguments:
            return True
    return False


def recorded_flagged(recorded: RecordedWaf, policy: RouteWaf, threshold: int) -> bool:
    """Whether the engine would still flag this recorded request under `policy`.

    crs: the recorded score minus the points of the matches now excluded is
    still at the threshold. sqli_xss: a match is left (its rules deny at the
    first one, so what came after it was never run). Matches no line names
    and matches past the record's limit are never taken away.
    """
    if recorded.mode == "crs" and recorded.score is not None:
        taken = sum(m.points for m in recorded.matches if covered(m, policy))
        return recorded.score - taken >= threshold
    left = [m for m in recorded.matches if not covered(m, policy)]
    return bool(left) or recorded.dropped > 0 or not recorded.matches


# -- the proposal ----------------------------------------------------------------------


@dataclass(frozen=True)
class Flagged:
    """A recorded request of the route that the current config would still flag."""

    request_id: str
    client_ip: str
    recorded: RecordedWaf


@dataclass
class Group:
    """Matches of one rule on one variable."""

    rule: str
    variable: str
    argument: str | None  # None: an argument exclusion cannot name it
    requests: list[Flagged] = field(default_factory=list)
    attacks: list[Flagged] = field(default_factory=list)  # other rules scored attack_score

    def add(self, flagged: Flagged, attack: bool) -> None:
        if not self.requests or self.requests[-1] is not flagged:
            self.requests.append(flagged)
            if attack:
                self.attacks.append(flagged)


@dataclass(frozen=True)
class Proposal:
    rule: str
    arguments: tuple[str, ...]  # (): the whole rule, for the route
    requests: int
    clients: int
    samples: tuple[str, ...]
    would_pass: int  # recorded requests this exclusion alone lets through
    why: str
    reason: str  # what --write puts in the config

    @property
    def scope(self) -> str:
        return "argument" if self.arguments else "rule"

    def exclusion(self) -> Exclusion:
        return Exclusion((self.rule,), self.arguments, self.reason)

    def as_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "arguments": list(self.arguments),
            "scope": self.scope,
            "requests": self.requests,
            "clients": self.clients,
            "samples": list(self.samples),
            "would_pass": self.would_pass,
            "why": self.why,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Declined:
    """A (rule, variable) that is not proposed, and why."""

    rule: str
    variable: str
    requests: int
    benign: int  # of them, not likely attacks: misfires the rule stays on for
    samples: tuple[str, ...]
    why: str

    def as_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "variable": self.variable,
            "requests": self.requests,
            "benign": self.benign,
            "samples": list(self.samples),
            "why": self.why,
        }


@dataclass
class Tuning:
    route: str
    mode: str
    action: str
    threshold: int
    attack_score: int
    requests: int = 0  # the route's recorded requests
    flagged: list[Flagged] = field(default_factory=list)  # still flagged today
    already_passing: int = 0  # flagged when recorded, passed by today's exclusions
    unreadable: int = 0  # flagged, but with no readable findings (older logs)
    other_verdicts: Counter[str] = field(default_factory=Counter)  # bad_body and the like
    proposals: list[Proposal] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)
    attacks: list[str] = field(default_factory=list)  # request ids of the likely attacks

    def chosen(self, rules: Collection[str]) -> list[Proposal]:
        """What --write writes: argument proposals, and whole-rule ones named in `rules`."""
        return [
            p
            for p in self.proposals
            if (not rules or p.rule in rules) and (p.arguments or p.rule in rules)
        ]

    def outcome(self, policy: RouteWaf, proposals: Iterable[Proposal]) -> tuple[int, list[str]]:
        """With these proposals added: how many flagged requests pass, and samples of
        those that stay flagged."""
        tuned = with_exclusions(policy, proposals)
        passing, staying = 0, []
        for flagged in self.flagged:
            if recorded_flagged(flagged.recorded, tuned, self.threshold):
                staying.append(flagged.request_id)
            else:
                passing += 1
        return passing, staying

    def as_json(self, policy: RouteWaf, rules: Collection[str]) -> dict[str, Any]:
        chosen = self.chosen(rules)
        passing, staying = self.outcome(policy, chosen)
        return {
            "route": self.route,
            "mode": self.mode,
            "action": self.action,
            "anomaly_threshold": self.threshold,
            "attack_score": self.attack_score,
            "requests": self.requests,
            "flagged": len(self.flagged),
            "already_passing": self.already_passing,
            "without_findings": self.unreadable,
            "other_verdicts": dict(self.other_verdicts),
            "unnamed_points": sum(1 for f in self.flagged if f.recorded.unnamed_points),
            "proposals": [p.as_json() for p in self.proposals],
            "declined": [d.as_json() for d in self.declined],
            "likely_attacks": len(self.attacks),
            "likely_attack_samples": self.attacks[:SAMPLES],
            "chosen": len(chosen),
            "would_pass": passing,
            "still_flagged": len(staying),
            "still_flagged_samples": staying[:SAMPLES],
        }


def with_exclusions(policy: RouteWaf, proposals: Iterable[Proposal]) -> RouteWaf:
    return replace(policy, exclusions=(*policy.exclusions, *(p.exclusion() for p in proposals)))


def _scores(recorded: RecordedWaf, policy: RouteWaf) -> tuple[int, Counter[str]]:
    """What the request scores under `policy`, and how much of that is each rule's (the
    points no line names count in the total: they are some rule's)."""
    by_rule: Counter[str] = Counter()
    taken = 0
    for match in recorded.matches:
        if covered(match, policy):
            taken += match.points
        else:
            by_rule[match.base_rule] += match.points
    if recorded.score is None:
        return sum(by_rule.values()), by_rule
    return recorded.score - taken, by_rule


def _ids(requests: list[Flagged]) -> tuple[str, ...]:
    return tuple(f.request_id for f in requests[:SAMPLES])


def _clients(requests: list[Flagged]) -> int:
    return len({f.client_ip for f in requests})


@dataclass(frozen=True)
class TuneRecord:
    """An access-log line as tuning needs it (proxy/replay.py reads the file)."""

    request_id: str
    client_ip: str
    route: str | None
    decision: str
    reason: str | None
    waf: RecordedWaf | None


def analyse(
    records: Iterable[TuneRecord],
    route: str,
    policy: RouteWaf,
    threshold: int,
    attack_score: int,
    messages: Mapping[str, str],
    max_arguments: int = MAX_ARGUMENTS,
    today: str | None = None,
) -> Tuning:
    """The proposals for `route` from its records (see the module's docstring)."""
    if policy.mode not in ENGINE_MODES:
        raise TuneError(
            f'route {route!r} has waf = "{policy.mode}": tuning is for "sqli_xss" or "crs"'
        )
    tuning = Tuning(route, policy.mode, policy.action, threshold, attack_score)
    groups: dict[tuple[str, str], Group] = {}
    for record in records:
        if record.route != route:
            continue
        tuning.requests += 1
        verdict = flagged_reason(record.decision, record.reason)
        if verdict is None:
            continue
        if verdict != "blocked":
            tuning.other_verdicts[verdict] += 1  # a body that does not parse: not a rule's doing
            continue
        if record.waf is None or record.waf.mode != policy.mode:
            tuning.unreadable += 1
            continue
        if not recorded_flagged(record.waf, policy, threshold):
            tuning.already_passing += 1
            continue
        flagged = Flagged(record.request_id, record.client_ip, record.waf)
        tuning.flagged.append(flagged)
        total, by_rule = _scores(record.waf, policy)
        for match in record.waf.matches:
            if covered(match, policy):
                continue
            rule = match.base_rule
            shown = match.variable if match.named else f"{match.variable or '?'} (name not kept)"
            key = (rule, shown)
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group(rule, key[1], match.argument)
            group.add(flagged, total - by_rule[rule] >= attack_score)  # other rules' points
    attacks = {id(f): f for g in groups.values() for f in g.attacks}
    tuning.attacks = [f.request_id for f in tuning.flagged if id(f) in attacks]
    stamp = today or datetime.now(UTC).strftime("%Y-%m-%d")
    _propose(tuning, policy, groups, messages, max_arguments, stamp)
    return tuning


def _reason(
    rule: str, messages: Mapping[str, str], where: str, group_size: int, clients: int, stamp: str
) -> str:
    message = messages.get(rule, "")
    head = f"{rule} ({message[:90]})" if message else rule
    text = (
        f"stockade waf tune {stamp}: {head} matched {where} in {group_size} benign-looking "
        f"requests from {clients} clients"
    )
    text = "".join(c if c.isprintable() else " " for c in text)
    return text[:REASON_MAX]


def _propose(
    tuning: Tuning,
    policy: RouteWaf,
    groups: Mapping[tuple[str, str], Group],
    messages: Mapping[str, str],
    max_arguments: int,
    stamp: str,
) -> None:
    by_rule: dict[str, list[Group]] = {}
    for group in groups.values():
        by_rule.setdefault(group.rule, []).append(group)

    def alone(proposal: Proposal) -> int:
        return tuning.outcome(policy, [proposal])[0]

    for rule in sorted(by_rule, key=int):
        rule_groups = sorted(by_rule[rule], key=lambda g: (-len(g.requests), g.variable))
        contested = [g for g in rule_groups if g.attacks]
        for group in contested:
            tuning.declined.append(
                Declined(
                    rule,
                    group.variable,
                    len(group.requests),
                    len(group.requests) - len(group.attacks),
                    _ids(group.attacks),
                    f"fired on {len(group.attacks)} likely attacks: other rules scored "
                    f">= {tuning.attack_score} there",
                )
            )
        open_groups = [g for g in rule_groups if not g.attacks]
        named = [g for g in open_groups if g.argument is not None]
        unnamed = [g for g in open_groups if g.argument is None]
        singles = sum(1 for g in named if len(g.requests) == 1)
        unbounded = len(named) > max_arguments and singles * 2 > len(named)
        whole: list[Group] = unnamed + (named if unbounded else [])
        if whole and contested:
            for group in whole:  # a whole-rule exclusion would also cover the attacks
                tuning.declined.append(
                    Declined(
                        rule,
                        group.variable,
                        len(group.requests),
                        len(group.requests),
                        _ids(group.requests),
                        "only the whole rule could be excluded here, and it also fired on "
                        "likely attacks",
                    )
                )
            whole = []
        if not unbounded:
            for group in named:
                assert group.argument is not None
                draft = Proposal(
                    rule,
                    (group.argument,),
                    len(group.requests),
                    _clients(group.requests),
                    _ids(group.requests),
                    0,
                    "the rule on this argument only",
                    _reason(
                        rule,
                        messages,
                        group.argument,
                        len(group.requests),
                        _clients(group.requests),
                        stamp,
                    ),
                )
                tuning.proposals.append(replace(draft, would_pass=alone(draft)))
        if whole:
            requests = _unique(r for g in whole for r in g.requests)
            if unbounded:
                why = (
                    f"the rule matched {len(named)} different arguments, {singles} of them in "
                    "one request only: the names vary without bound, so a list of them would "
                    "not cover the next request"
                )
                where = f"{len(named)} different arguments"
            else:
                shown = ", ".join(g.variable for g in unnamed[:3])
                why = f"matched {shown}, which an exclusion by argument cannot name"
                where = shown
            draft = Proposal(
                rule,
                (),
                len(requests),
                _clients(requests),
                _ids(requests),
                0,
                why + "; the whole rule for this route, written only with --rule " + rule,
                _reason(rule, messages, where, len(requests), _clients(requests), stamp),
            )
            tuning.proposals.append(replace(draft, would_pass=alone(draft)))


def _unique(requests: Iterable[Flagged]) -> list[Flagged]:
    seen: dict[int, Flagged] = {}
    for request in requests:
        seen.setdefault(id(request), request)
    return list(seen.values())


# -- rule messages, for the reasons ----------------------------------------------------------

_RULE_TEXT = re.compile(r"id:'?(\d{1,12})'?(?:(?!\bid:)[^\n])*?msg:'((?:[^'\\]|\\.)*)'")


def rule_messages(texts: Iterable[str]) -> dict[str, str]:
    """Rule id -> its msg, from SecLang text (continuation lines joined)."""
    out: dict[str, str] = {}
    for text in texts:
        joined = re.sub(r"\\\r?\n\s*", "", text)
        for rule_id, message in _RULE_TEXT.findall(joined):
            out.setdefault(rule_id, message)
    return out


# -- writing the config ---------------------------------------------------------------------

_ROUTE_HEADER = re.compile(r"\s*\[\[\s*proxy\s*\.\s*routes\s*\]\]\s*(?:#.*)?")
_ANY_HEADER = re.compile(r"\s*\[\[?\s*([A-Za-z0-9_.\s\"'-]+?)\s*\]\]?\s*(?:#.*)?")
_ROUTE_PART = re.compile(r"proxy\s*\.\s*routes\s*\.")


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char < " " or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def exclusion_table(proposal: Proposal) -> str:
    lines = [
        f"[[proxy.routes.waf_exclusions]]  # requests: {proposal.requests}, clients: "
        f"{proposal.clients}, e.g. {', '.join(proposal.samples[:2])}",
        f"rules = [{proposal.rule}]",
    ]
    if proposal.arguments:
        lines.append(f"arguments = [{', '.join(toml_string(a) for a in proposal.arguments)}]")
    lines.append(f"reason = {toml_string(proposal.reason)}")
    return "\n".join(lines) + "\n"


def _route_index(data: dict[str, Any], route: str) -> int:
    routes = data.get("proxy", {}).get("routes", [])
    for index, table in enumerate(routes if isinstance(routes, list) else []):
        if isinstance(table, dict) and table.get("name") == route:
            return index
    raise WriteError(f"no [[proxy.routes]] table named {route!r} in the file")


def _as_table(proposal: Proposal) -> dict[str, Any]:
    table: dict[str, Any] = {"rules": [int(proposal.rule)], "reason": proposal.reason}
    if proposal.arguments:
        table["arguments"] = list(proposal.arguments)
    return table


def insert_exclusions(text: str, route: str, proposals: list[Proposal]) -> str:
    """The config text with the exclusions added after the route's tables.

    Only lines are added, after the last key of the route's own tables
    (`[[proxy.routes]]` and the `[proxy.routes.*]` ones that follow it), so
    comments and formatting stay as they were; the result must parse to the
    old config plus exactly these tables, or WriteError.
    """
    tables = [exclusion_table(p) for p in proposals]
    old = tomllib.loads(text)
    index = _route_index(old, route)
    lines = text.splitlines(keepends=True)
    headers = [i for i, line in enumerate(lines) if _ROUTE_HEADER.fullmatch(line.rstrip("\r\n"))]
    if index >= len(headers):
        raise WriteError("the route is not written as a [[proxy.routes]] table")
    start = headers[index]
    end = len(lines)
    for i in range(start + 1, len(lines)):
        header = _ANY_HEADER.fullmatch(lines[i].rstrip("\r\n"))
        if header is not None and not _ROUTE_PART.match(header.group(1)):
            end = i
            break
    # leave the comments and blank lines before the next table with it
    last = end - 1
    while last > start and (not lines[last].strip() or lines[last].lstrip().startswith("#")):
        last -= 1
    newline = "\r\n" if lines[start].endswith("\r\n") else "\n"
    block = "".join(newline + t.replace("\n", newline) for t in tables)
    head = "".join(lines[: last + 1])
    if not head.endswith(("\n", "\r\n")):
        head += newline
    updated = head + block + "".join(lines[last + 1 :])
    expected = tomllib.loads(text)
    route_table = expected["proxy"]["routes"][index]
    route_table["waf_exclusions"] = [
        *route_table.get("waf_exclusions", []),
        *(_as_table(p) for p in proposals),
    ]
    try:
        parsed = tomllib.loads(updated)
    except tomllib.TOMLDecodeError as exc:
        raise WriteError(f"the edited file would not parse ({exc})") from None
    if parsed != expected:
        raise WriteError("the exclusions could not be placed after the route's tables")
    return updated


def _new_backup(path: Path, stamp: str, content: bytes) -> Path:
    """A backup beside `path` that overwrites nothing (a second run within the second
    gets its own)."""
    for n in range(100):
        backup = path.with_name(f"{path.name}.{stamp}{f'.{n}' if n else ''}.bak")
        try:
            with open(backup, "xb") as copy:
                copy.write(content)
                copy.flush()
                os.fsync(copy.fileno())
        except FileExistsError:
            continue
        return backup
    raise WriteError(f"too many backups of {path} named {stamp}")


@dataclass(frozen=True)
class Written:
    config: Path
    backup: Path


def write_config(
    path: Path, route: str, proposals: list[Proposal], check: Callable[[Path], None]
) -> Written:
    """Add the exclusions to the config file: edit the text, check the result with
    `check` (the config loader and the WAF's rule sets; it raises to refuse) on a
    file beside the original, keep a backup, then replace the file atomically (the
    file a symlink points to: the link stays)."""
    given, path = path, Path(os.path.realpath(path))
    try:
        original = path.read_bytes()
    except OSError as exc:
        raise WriteError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = original.decode("utf-8")
        updated = insert_exclusions(text, route, proposals)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise WriteError(f"{path} is not valid TOML: {exc}") from None
    directory = path.parent
    stat = path.stat()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tune", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(updated.encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, stat.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.chown(temporary, stat.st_uid, stat.st_gid)
        check(Path(temporary))  # beside the original: relative paths resolve the same
        if path.read_bytes() != original:
            raise WriteError(f"{path} changed while it was being edited; run again")
        backup = _new_backup(path, stamp, original)
        os.chmod(backup, stat.st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return Written(given, backup)
