"""The rule sets' derived facts, and reading the engine's log lines safely."""

from __future__ import annotations

import pytest

from stockade.proxy.waf.findings import REDACTED, clip, collect, is_secret, parse
from stockade.proxy.waf.modsec import Engine
from stockade.proxy.waf.rulesets import RuleSets, headers_read
from stockade.proxy.waf_settings import WafConfig

KNOWN = {"941110", "942100", "949110"}
REAL = (
    "ModSecurity: Warning. Matched \"Operator `Rx' with parameter `(?i)<script[^>]*>' against "
    "variable `ARGS:q' (Value: `{value}' ) [file \"/usr/share/modsecurity-crs/rules/REQUEST-941"
    '.conf"] [line "64"] [id "941110"] [rev ""] [msg "XSS Filter - Category 1: Script Tag Vector"'
    '] [data "Matched Data: <script> found within ARGS:q: {data}"] [severity "2"] '
    '[ver "OWASP_CRS/3.3.4"] [maturity "0"] [accuracy "0"] [hostname "198.18.0.2"] '
    '[uri "/api"] [unique_id "abc"] [ref "o0,8"]'
)


def test_headers_read_follows_the_rules() -> None:
    assert headers_read('SecRule REQUEST_HEADERS:User-Agent "@rx x" "id:1"') == {
        "user-agent",
        "content-type",
        "cookie",
        "content-length",
    }
    for text in (
        'SecRule REQUEST_HEADERS "@rx x" "id:1"',
        'SecRule ARGS|REQUEST_HEADERS|!REQUEST_HEADERS:Referer "@rx x" "id:1"',
        'SecRule REQUEST_HEADERS_NAMES "@rx x" "id:1"',
        'SecRule REQUEST_HEADERS:/^x-/ "@rx x" "id:1"',
    ):
        assert headers_read(text) is None, text


def test_the_shipped_sets_read_what_they_need() -> None:
    engine = Engine()
    sets = RuleSets(engine, WafConfig(), 1 << 20)
    try:
        sets.get("sqli_xss")
        sets.get("crs")
        assert sets.headers_read("sqli_xss") == {
            "user-agent",
            "referer",
            "cookie",
            "content-type",
            "content-length",
        }
        assert sets.headers_read("crs") is None  # CRS looks at every header
        assert {"42100", "41100", "200002", "942100", "949110"} <= sets.known_ids
    finally:
        sets.close()
        engine.close()


def test_a_log_line_gives_rule_message_and_variable() -> None:
    found = parse(REAL.format(value="<script>x", data="<script>x"), KNOWN)
    assert found is not None
    assert (found.rule_id, found.variable, found.value) == ("941110", "ARGS:q", "<script>x")
    assert found.message == "XSS Filter - Category 1: Script Tag Vector"


def test_a_fake_rule_in_the_value_is_not_believed() -> None:
    """The Value is shown as sent; the data field has its quotes escaped (\\x22)."""
    fake = '\' ) [file "/x"] [line "1"] [id "1234"] [rev ""] [msg "fake"] [data "zz'
    line = REAL.format(value=fake, data=fake.replace('"', "\\x22"))
    found = parse(line, KNOWN)
    assert found is not None and found.rule_id == "941110" and found.message != "fake"


def test_ids_that_no_loaded_rule_has_are_ignored() -> None:
    line = REAL.format(value="x", data="x").replace('[id "941110"]', '[id "555"]')
    assert parse(line, KNOWN) is None
    assert collect([line, REAL.format(value="a", data="a")], KNOWN, set())[0].rule_id == "941110"


@pytest.mark.parametrize(
    ("variable", "secret"),
    [
        ("REQUEST_HEADERS:Authorization", True),
        ("REQUEST_HEADERS:x-api-key", True),
        ("REQUEST_COOKIES:theme", True),
        ("REQUEST_COOKIES_NAMES:theme", False),
        ("ARGS:password", True),
        ("ARGS:json.user.access_token", True),
        ("ARGS:q", False),
        ("REQUEST_HEADERS:User-Agent", False),
    ],
)
def test_secrets_are_recognised(variable: str, secret: bool) -> None:
    assert is_secret(variable) is secret


def test_a_secret_value_is_redacted_and_others_clipped() -> None:
    line = REAL.format(value="x", data="x").replace("ARGS:q", "ARGS:password")
    found = parse(line, KNOWN)
    assert found is not None and found.value == REDACTED
    assert clip("a\nb" + "c" * 100, 10) == "a\\nbccccccc..."
