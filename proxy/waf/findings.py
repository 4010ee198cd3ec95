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
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

MAX_FINDINGS = 16  # per request, in the log
MAX_VALUE = 64
MAX_MESSAGE = 120
MAX_VARIABLE = 64
REDACTED = "[redacted]"

_FIELDS = re.compile(
    r'\[file "[^"]*"\] \[line "\d+"\] \[id "(\d{1,12})"\] \[rev "[^"]*"\] '
    r'\[msg "((?:(?!"\] \[).)*)"\] \[data "([^"]*)"\] \[severity "\d+"\]',
    re.DOTALL,
)
_DATA = re.compile(r"Matched Data: .*? found within ([A-Za-z_]+(?::[^:]{0,256})?): (.*)", re.DOTALL)
_DESCRIPTION = re.compile(r"against variable `([^']{0,256})' \(Value: `(.*?)' \)", re.DOTALL)
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


def parse(
    line: str, known_ids: Collection[str], secret_headers: Collection[str] = SECRET_HEADERS
) -> Finding | None:
    """The finding a log line reports, or None when it names no loaded rule."""
    position = 0
    while (match := _FIELDS.search(line, position)) is not None:
        position = match.start() + 1  # candidates may overlap: a fake one may hide a real one
        rule_id, message, data = match.groups()
        if rule_id not in known_ids:
            continue
        variable, value = _variable(data.replace("\\x22", '"'), line, match.start())
        if variable and is_secret(variable, secret_headers):
            value = REDACTED
        return Finding(
            rule_id,
            clip(message, MAX_MESSAGE),
            clip(variable, MAX_VARIABLE),
            clip(value, MAX_VALUE) if value != REDACTED else value,
        )
    return None


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
