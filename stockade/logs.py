"""Log lines of the controller and the proxy: text for people, or one JSON object a line.

Both formats come from here, so every line names its fields the same way:

  time      RFC 3339 in UTC with milliseconds, "2025-01-31T12:00:00.123Z"
  level     debug, info, warning, error or critical
  logger    the logger's name: stockade.controller, stockade.proxy, stockade.proxy.waf, ...
  message   the message, formatted
  pid       the process (the proxy's master and each worker differ)
  ...       what the code passed in `extra=`, named as in the access log where the
            same thing is meant (request_id, client_ip, route, method, path)
  exception the traceback, when there is one

The access log (stockade.proxy.access_log) writes its own lines for speed,
with the same `time`, `logger` and `pid`, and no `level`.

Secrets never reach a line, in either format: extras whose key looks like a
secret (password, token, authorization, cookie, api_key, ...) are replaced,
and messages, extras and tracebacks are masked where they hold an
Authorization, Cookie or API-key header value, Bearer or Basic credentials,
`password=`-style pairs, a JWT, a stockade API key's secret or a password in
a URL.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from stockade.config_fields import ConfigError, Section

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HANDLER_NAME = "stockade"  # the stderr handler the CLI installs; use_format() swaps its formatter
MASK = "[redacted]"

# Extras with one of these in their key are never printed, whatever their value.
SECRET_KEY_PARTS = (
    *("password", "passwd", "passphrase", "secret", "token", "authorization", "cookie"),
    *("api_key", "apikey", "api-key", "credential", "private_key", "private-key"),
)

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

_Sub = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _keep(*groups: str) -> Callable[[re.Match[str]], str]:
    """A replacement that keeps the named groups and masks what follows them."""
    return lambda m: "".join(m.group(g) or "" for g in groups) + MASK


def _quoted(m: re.Match[str]) -> str:
    value = m.group("value")
    quote = value[0] if value[:1] in ("'", '"') else ""
    return m.group("name") + m.group("sep") + quote + MASK + quote


_SUBSTITUTIONS: tuple[_Sub, ...] = (
    # a header's value, to the end of the line or the quote: `Authorization: Bearer x`,
    # `{'Cookie': 'a=b; c=d'}`; the scheme stays, it says what kind of credential it was
    (
        re.compile(
            r"(?P<name>(?<![\w-])(?:proxy-)?authorization|(?<![\w-])(?:set-)?cookie"
            r"|(?<![\w-])x-api-key)(?P<sep>[\"']?\s*[:=]\s*[\"']?)"
            r"(?P<scheme>(?:bearer|basic|digest|negotiate|token)\s+)?[^\r\n\"']*",
            re.IGNORECASE,
        ),
        _keep("name", "sep", "scheme"),
    ),
    # password=..., "client_secret": "...", api_key: ..., ?token=... (one value)
    (
        re.compile(
            r"(?P<name>(?<![\w-])[\w-]*(?:password|passwd|passphrase|secret|token"
            r"|api[_-]?key|private[_-]?key)[\"']?)(?![\w-])(?P<sep>\s*[:=]\s*)"
            r"(?!\[redacted\])(?P<value>\"[^\"\r\n]*\"|'[^'\r\n]*'|[^\s\"'&,;)}\]]+)",
            re.IGNORECASE,
        ),
        _quoted,
    ),
    # credentials without their header's name (case-sensitive: "basic auth" is English)
    (re.compile(r"(?P<scheme>\b(?:Bearer|Basic) )[A-Za-z0-9._~+/-]{8,}=*"), _keep("scheme")),
    # a JWT wherever it appears (header.payload.signature, both JSON objects)
    (
        re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
        lambda m: MASK,
    ),
    # a stockade API key: stk_<id>_<secret>; the id is no secret and says which key
    (re.compile(r"(?P<id>\bstk_[a-z0-9]{8,32}_)[A-Za-z0-9_-]+"), _keep("id")),
    # a password in a URL: redis://:secret@host, https://user:secret@host
    (re.compile(r"(?P<user>://[^/\s:@]*:)[^/\s@]+(?=@)"), _keep("user")),
)


def redact(text: str) -> str:
    """`text` with every credential it visibly holds masked."""
    for pattern, replace in _SUBSTITUTIONS:
        text = pattern.sub(replace, text)
    return text


def secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(part in lowered for part in SECRET_KEY_PARTS)


def _clean(key: str, value: Any) -> Any:
    """An extra's value, fit for a line: secrets masked, JSON types only."""
    if secret_key(key):
        return MASK
    if isinstance(value, dict):
        return {str(k): _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean("", v) for v in value]
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """What the code passed in `extra=`, cleaned."""
    return {
        key: _clean(key, value)
        for key, value in record.__dict__.items()
        if key not in _STANDARD and not key.startswith("_")
    }


class _Seconds:
    """RFC 3339 UTC time, the seconds part formatted once per second (the access log
    asks for it on every request)."""

    def __init__(self) -> None:
        self.cached: tuple[int, str] = (-1, "")

    def __call__(self, at: float) -> str:
        whole = int(at)
        cached = self.cached
        if cached[0] != whole:
            cached = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
            self.cached = cached  # one tuple: a thread that races only formats it again
        return f"{cached[1]}.{int((at - whole) * 1000):03d}Z"


rfc3339 = _Seconds()


class TextFormatter(logging.Formatter):
    """`<local time> LEVEL logger: message`, then the traceback.

    Extras are left out: a message is written to be read on its own, and the
    extras repeat what it says for machines (the JSON lines).
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object a line; see the module's docstring for the fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            "pid": record.process,
        }
        for key, value in extras(record).items():
            line.setdefault(key, value)  # an extra never hides a standard field
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False, default=str)


def parse_log_format(section: Section) -> str:
    """`log_format` in [controller] or [proxy]: "text" (the default) or "json"."""
    name = section.get("log_format", str, "text")
    if name not in FORMATS:
        raise ConfigError(f'{section.key("log_format")}: {name!r}: use "text" or "json"')
    return str(name)


def formatter(name: str) -> logging.Formatter:
    return JsonFormatter() if name == "json" else TextFormatter()


def setup(verbose: bool) -> None:
    """The CLI's logging: stderr, text until a daemon's config says otherwise.

    Like logging.basicConfig, nothing changes when the root logger has a handler
    already (a test harness's, for one).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(TextFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def use_format(name: str, level: str | None = None) -> None:
    """Switch the CLI's handler to `name` ("text" or "json"), and the stockade loggers to
    `level` when given (the config's; `-v` passes None to keep debug)."""
    for handler in logging.getLogger().handlers:
        if handler.get_name() == HANDLER_NAME:
            handler.setFormatter(formatter(name))
    if level is not None:
        logging.getLogger("stockade").setLevel(level.upper())
