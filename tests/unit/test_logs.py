"""Log lines: the JSON and text formats (stockade/logs.py), secrets kept out of both, the
config key that picks one, and the access log's fields (which `stockade replay` reads)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from stockade.config import ConfigError, parse_config
from stockade.logs import MASK, JsonFormatter, TextFormatter, redact, rfc3339
from stockade.proxy.access_log import AccessLog
from stockade.proxy.context import RequestContext
from stockade.proxy.replay import read_log

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def record(
    message: str,
    *args: object,
    extra: dict[str, Any] | None = None,
    exc: bool = False,
    level: int = logging.WARNING,
) -> logging.LogRecord:
    """A record as `logging.getLogger("stockade.test").warning(message, *args, extra=...)`
    makes it (with the exception being handled, when `exc`)."""
    logger = logging.getLogger("stockade.test")
    exc_info = None
    if exc:
        try:
            raise RuntimeError("upstream said password=hunter2-in-a-traceback")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logger.makeRecord(logger.name, level, __file__, 1, message, args, exc_info, extra=extra)


def as_json(rec: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter().format(rec)
    assert "\n" not in line  # one object, one line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_a_json_line_has_the_common_fields_then_the_extras() -> None:
    rec = record("waf blocked request %s", "r-1", extra={"request_id": "r-1", "where": Path("/x")})
    line = as_json(rec)
    assert list(line)[:5] == ["time", "level", "logger", "message", "pid"]
    assert RFC3339.fullmatch(line["time"])
    when = datetime.fromisoformat(line["time"]).timestamp()
    assert when == pytest.approx(rec.created, abs=0.001)
    assert (line["level"], line["logger"], line["pid"]) == ("warning", "stockade.test", os.getpid())
    assert line["message"] == "waf blocked request r-1"
    assert (line["request_id"], line["where"]) == ("r-1", "/x")  # not JSON: as text
    assert "exception" not in line


def test_an_extra_never_hides_a_common_field() -> None:
    line = as_json(record("hello", extra={"time": "yesterday", "level": "none", "pid": 0}))
    assert RFC3339.fullmatch(line["time"]) and line["level"] == "warning"
    assert line["pid"] == os.getpid()


def test_an_exception_goes_into_its_own_field() -> None:
    line = as_json(record("request failed", exc=True, level=logging.ERROR))
    assert line["level"] == "error"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError" in line["exception"]


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1_800_000_000.1234) == "2027-01-15T08:00:00.123Z"
    assert rfc3339(1_800_000_001.999) == "2027-01-15T08:00:01.999Z"  # same second cached
    assert rfc3339(1_800_000_000.5) == "2027-01-15T08:00:00.500Z"  # and a second back


def test_text_lines_are_as_they_were() -> None:
    text = TextFormatter().format(record("rule %s fired", "brute", extra={"rule": "brute"}))
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING stockade.test: rule brute fired", text
    )  # the extras are for the JSON lines
    failed = TextFormatter().format(record("failed", exc=True, extra={"request_id": "r-2"}))
    first, rest = failed.split("\n", 1)
    assert first.endswith("stockade.test: failed") and rest.startswith("Traceback")


# -- secrets ---------------------------------------------------------------------------
SECRETS = ("s3cr3t-t0ken-value", "hunter2", "dXNlcjpwYXNzd29yZA==", "SECRETPART123")

CASES = [
    # message
    record("refused: Authorization: Bearer s3cr3t-t0ken-value from 198.18.0.7"),
    record("headers %s", {"Authorization": "Basic dXNlcjpwYXNzd29yZA==", "Host": "t"}),
    record("login with password=hunter2&user=bob"),
    record("key stk_abcdefgh_SECRETPART123 refused"),
    record("redis at redis://:hunter2@198.18.1.5:6379 is down"),
    record("token %s", "Bearer s3cr3t-t0ken-value"),
    # extras: by their name, and by what their value holds
    record("auth", extra={"password": "hunter2", "token": "s3cr3t-t0ken-value"}),
    record("auth", extra={"authorization": "Basic dXNlcjpwYXNzd29yZA=="}),
    record("auth", extra={"headers": {"Authorization": "Bearer s3cr3t-t0ken-value"}}),
    record("auth", extra={"headers": [("x-api-key", "stk_abcdefgh_SECRETPART123")]}),
    record("auth", extra={"sent": "Authorization: Bearer s3cr3t-t0ken-value"}),
    record("auth", extra={"api_key": "stk_abcdefgh_SECRETPART123", "client_secret": "hunter2"}),
    # a traceback
    record("upstream failed", exc=True),
]


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
@pytest.mark.parametrize("rec", CASES, ids=range(len(CASES)))
def test_secrets_never_reach_a_line(formatter: logging.Formatter, rec: logging.LogRecord) -> None:
    line = formatter.format(rec)
    for secret in SECRETS:
        assert secret not in line
    # masked where it was; text lines leave the extras out altogether
    held = rec.getMessage() + (str(rec.exc_info[1]) if rec.exc_info else "")
    if isinstance(formatter, JsonFormatter) or any(secret in held for secret in SECRETS):
        assert MASK in line


def test_what_is_no_secret_is_left_alone() -> None:
    for text in (
        "the admin token file /etc/stockade/metrics.token is empty",
        "basic_auth_user and basic_auth_password_file go together",
        'WWW-Authenticate: Bearer realm="stockade"',
        "rate limiter token bucket full; 3 usable keys",
        "key stk_abcdefgh_ is malformed",
    ):
        assert redact(text) == text
    # what says which credential it was stays: the scheme, the key's id, the user
    assert redact("Authorization: Bearer abc") == f"Authorization: Bearer {MASK}"
    assert redact("stk_abcdefgh_xyz") == f"stk_abcdefgh_{MASK}"
    assert redact("https://bob:pw@h/") == f"https://bob:{MASK}@h/"
    assert redact('{"password": "a b"}') == f'{{"password": "{MASK}"}}'


LOGGING_SCRIPT = """
import logging, sys
from stockade import logs
logs.setup(False)
logs.use_format(sys.argv[1])
log = logging.getLogger("stockade.proxy")
log.info("serving %d workers", 2, extra={"workers": 2})
log.warning("refused Authorization: Bearer s3cr3t-t0ken-value", extra={"password": "hunter2"})
logging.getLogger("aiohttp.server").error("not ours, same format")
"""


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_cli_handler_writes_the_chosen_format(fmt: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOGGING_SCRIPT, fmt],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and not any(s in result.stderr for s in SECRETS)
    if fmt == "json":
        parsed = [json.loads(line) for line in lines]
        assert [p["logger"] for p in parsed] == [
            "stockade.proxy",
            "stockade.proxy",
            "aiohttp.server",
        ]
        assert parsed[0]["message"] == "serving 2 workers" and parsed[0]["workers"] == 2
        assert parsed[1]["password"] == MASK and parsed[2]["level"] == "error"
    else:
        assert lines[0].endswith("INFO stockade.proxy: serving 2 workers")
        assert lines[2].endswith("ERROR aiohttp.server: not ours, same format")


# -- the config key ------------------------------------------------------------------
def test_log_format_is_text_unless_the_config_says_json() -> None:
    default = parse_config({})
    assert default.controller.log_format == "text" and default.proxy.log_format == "text"
    both = parse_config({"controller": {"log_format": "json"}, "proxy": {"log_format": "json"}})
    assert both.controller.log_format == "json" and both.proxy.log_format == "json"


@pytest.mark.parametrize("section", ["controller", "proxy"])
def test_an_unknown_log_format_names_the_key(section: str) -> None:
    with pytest.raises(
        ConfigError, match=rf'^{section}\.log_format: \'xml\': use "text" or "json"'
    ):
        parse_config({section: {"log_format": "xml"}})


# -- the access log ------------------------------------------------------------------
def test_access_log_lines_name_their_fields_as_the_other_logs(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access = AccessLog(str(path))
    ctx = RequestContext("r-7", "198.18.0.10", "198.18.0.10", False, "http", path="/a", host="t")
    ctx.status, ctx.decision = 200, "allowed"
    access.write(ctx, "GET")
    asyncio.run(access.close())
    line = json.loads(path.read_text())
    assert list(line)[:4] == ["time", "logger", "pid", "request_id"]
    assert RFC3339.fullmatch(line["time"]) and "level" not in line
    assert (line["logger"], line["pid"], line["request_id"]) == (
        "stockade.access",
        os.getpid(),
        "r-7",
    )
    assert line["client_ip"] == "198.18.0.10"
    (replayed,) = list(read_log([path.read_text()]))  # `stockade replay` reads it
    assert replayed is not None
    assert replayed.time == pytest.approx(datetime.fromisoformat(line["time"]).timestamp())


def test_replay_reads_both_times_and_skips_other_lines() -> None:
    base = {"client_ip": "198.18.0.10", "method": "GET", "path": "/", "status": 200}
    lines = [
        json.dumps({**base, "time": "2027-01-15T08:00:00.250Z", "decision": "allowed"}),
        json.dumps({**base, "time": 1_800_000_000.25, "decision": "allowed"}),  # older logs
        json.dumps({**base, "time": "2027-01-15T08:00:00", "decision": "allowed"}),  # no zone
        json.dumps({"time": "2027-01-15T08:00:00.250Z", "level": "info", "logger": "x"}),
    ]
    new, old, naive, app = read_log(lines)
    assert new is not None and old is not None
    assert new.time == old.time == 1_800_000_000.25
    assert naive is None and app is None  # not request records: counted as skipped
