"""What a ModSecurity log line says: the rule, its message, the matched variable.

A line looks like

    ModSecurity: Warning. Matched "Operator `Rx' with parameter `...' against
    variable `ARGS:q' (Value: `...' ) [file "..."] [line "64"] [id "941110"]
    [rev ""] [msg "..."] [data "Matched Data: <script> found within ARGS:q:
    ..."] [severity "2"] ... [uri "..."] [unique_id "..."] [ref "..."]

and the client controls parts of it: the value after `Value:` (shown as
sent, quotes and brackets included), the data field (whose quotes the
engine escapes as \\x22) and the uri. So a client can write a fake
`[id "..."]` into its request. Three defences: the data field of a real
line has no raw quote and no message has `"] [`, so a run of fields must
end where a real one would; every place a run starts is tried (a fake run
cannot hide the real one); and a rule id counts only if it is one of the
loaded rules (known_ids), so ids in counters and metrics come from the rule
files, never from a request.

What reaches the log is the rule id, its message, the variable's name and
its value, each cut short; the value is redacted for credentials
(Authorization, cookies, API keys, arguments named like a password or token).

What reaches the access log (matched(): for `stockade waf tune` and
`stockade replay`) is less: per matching rule its id, the variable's name
and the anomaly points it scored, and the score CRS added up - never a
value (values hold secrets, and where a rule misfires is all tuning needs).
ModSecurity 3 writes one line per rule, naming the last variable it matched,
though each variable scores: the score says how much is unnamed.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from stockade.logs import redact

MAX_FINDINGS = 16  # per request, in the log
MAX_VALUE = 64
MAX_MESSAGE = 120
MAX_VARIABLE = 64
REDACTED = "[redacted]"
MAX_MATCHES = 32  # per request, in the access log
MAX_RECORDED_VARIABLE = 300  # "ARGS:" and an argument name as long as an exclusion takes
CRS_BLOCKING = "949110"  # CRS's inbound anomaly score check: the verdict, not a detection
# CRS 3.3 adds tx.critical/error/warning/notice_anomaly_score (5, 4, 3, 2) for a
# match of a rule of that severity (2, 3, 4, 5 as the log line writes them).
SEVERITY_POINTS = {2: 5, 3: 4, 4: 3, 5: 2}

_FIELDS = re.compile(
    r'\[file "[^"]*"\] \[line "\d+"\] \[id "(\d{1,12})"\] \[rev "[^"]*"\] '
    r'\[msg "((?:(?!"\] \[).)*)"\] \[data "([^"]*)"\] \[severity "(\d{1,2})"\]',
    re.DOTALL,
)
_DATA = re.compile(r"Matched Data: .*? found within ([A-Za-z_]+(?::[^:]{0,256})?): (.*)", re.DOTALL)
_DESCRIPTION = re.compile(r"against variable `([^']{0,256})' \(Value: `(.*?)' \)", re.DOTALL)
_TOTAL_SCORE = re.compile(r"\(Total Score: (\d{1,9})\)")
# Headers whose value is a credential, whatever the request's API-key header is called.
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "x-auth-token"}
)
_SECRET_NAME = re.compile(
    r"pass|secret|token|auth|api[-_]?key|session|sess_?id|cookie|credential|signature|otp",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Finding:
    rule_id: str
    message: str
    variable: str = ""
    value: str = ""

    def __str__(self) -> str:
        where = f" at {self.variable} = {self.value!r}" if self.variable else ""
        return f'{self.rule_id} "{self.message}"{where}'


def clip(text: str, limit: int) -> str:
    """At most `limit` characters, control characters escaped, for one log line."""
    short = text if len(text) <= limit else text[:limit] + "..."
    return short.encode("unicode_escape").decode("ascii") if not short.isprintable() else short


def is_secret(variable: str, secret_headers: Collection[str] = SECRET_HEADERS) -> bool:
    collection, _, name = variable.partition(":")
    collection = collection.upper()
    if collection == "REQUEST_COOKIES":
        return True  # session ids and the like: a cookie's value never reaches a log
    if collection == "REQUEST_HEADERS" and name.lower() in secret_headers:
        return True
    return bool(name) and collection != "REQUEST_COOKIES_NAMES" and bool(_SECRET_NAME.search(name))


def _variable(data: str, line: str, start: int) -> tuple[str, str]:
    match = _DATA.match(data)
    if match is not None:
        return match.group(1), match.group(2)
    described = _DESCRIPTION.search(line, 0, start)
    if described is not None:
        return described.group(1), described.group(2)
    return "", ""


@dataclass(frozen=True)
class _Line:
    rule_id: str
    message: str
    variable: str
    value: str
    severity: int


def _read(line: str, known_ids: Collection[str]) -> _Line | None:
    position = 0
    while (match := _FIELDS.search(line, position)) is not None:
        position = match.start() + 1  # candidates may overlap: a fake one may hide a real one
        rule_id, message, data, severity = match.groups()
        if rule_id not in known_ids:
            continue
        variable, value = _variable(data.replace("\\x22", '"'), line, match.start())
        return _Line(rule_id, message, variable, value, int(severity))
    return None


def parse(
    line: str, known_ids: Collection[str], secret_headers: Collection[str] = SECRET_HEADERS
) -> Finding | None:
    """The finding a log line reports, or None when it names no loaded rule."""
    read = _read(line, known_ids)
    if read is None:
        return None
    value = read.value
    if read.variable and is_secret(read.variable, secret_headers):
        value = REDACTED
    return Finding(
        read.rule_id,
        clip(read.message, MAX_MESSAGE),
        clip(read.variable, MAX_VARIABLE),
        clip(value, MAX_VALUE) if value != REDACTED else value,
    )


def collect(
    lines: Iterable[str], known_ids: Collection[str], secret_headers: Collection[str]
) -> list[Finding]:
    """One finding per rule, in the order the rules matched."""
    found: dict[str, Finding] = {}
    for line in lines:
        finding = parse(line, known_ids, secret_headers)
        if finding is not None and finding.rule_id not in found:
            found[finding.rule_id] = finding
    return list(found.values())


def rule_ids(text: str) -> set[str]:
    """The ids of the rules in a rules file (for `known_ids`)."""
    return set(re.findall(r"\bid\s*:\s*'?(\d{1,12})", text))


@dataclass(frozen=True)
class Match:
    """A rule that matched: where (the variable's name, never its value) and what it scored."""

    rule_id: str
    variable: str  # "ARGS:json.address.line1"; the collection alone when not `named`
    points: int  # anomaly points, from its severity
    named: bool = True  # False: the name was too long, looked like a credential, or unread

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule_id, "var": self.variable, "points": self.points}
        if not self.named:
            out["named"] = False
        return out


@dataclass(frozen=True)
class Matches:
    """What the engine found in one request, as the access log records it."""

    matches: tuple[Match, ...]
    score: int | None  # the inbound anomaly score CRS added up; None: no anomaly scoring
    dropped: int = 0  # matches past MAX_MATCHES, not recorded

    def as_json(self, mode: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": mode,
            "score": self.score,
            "matches": [m.as_json() for m in self.matches],
        }
        if self.dropped:
            out["dropped"] = self.dropped
        return out


def _recorded_name(variable: str) -> tuple[str, bool]:
    """A variable's name as the access log may keep it, and whether it is whole."""
    collection = variable.partition(":")[0]
    if not variable:
        return "", False
    if len(variable) > MAX_RECORDED_VARIABLE or not variable.isprintable():
        return collection, False
    if "\ufffd" in variable:  # bytes that were not UTF-8: the engine's name is not this
        return collection, False
    if redact(variable) != variable:  # a JWT or API key sent as an argument name
        return collection, False
    return variable, True


def matched(lines: Iterable[str], known_ids: Collection[str]) -> Matches:
    """Every rule match the log lines report (one line per rule, or per variable with
    multiMatch), with CRS's total from its blocking rule's line."""
    found: list[Match] = []
    score: int | None = None
    dropped = 0
    for line in lines:
        read = _read(line, known_ids)
        if read is None:
            continue
        if read.rule_id == CRS_BLOCKING:
            total = _TOTAL_SCORE.search(read.message)
            score = int(total.group(1)) if total is not None else score
            continue
        if len(found) >= MAX_MATCHES:
            dropped += 1
            continue
        name, whole = _recorded_name(read.variable)
        found.append(Match(read.rule_id, name, SEVERITY_POINTS.get(read.severity, 0), whole))
    return Matches(tuple(found), score, dropped)
