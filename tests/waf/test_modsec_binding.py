"""The ctypes binding for libmodsecurity3: rules, transactions, errors, memory."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from stockade.proxy.waf.modsec import Engine, ModSecurityError, RulesError, Transaction

RULES = """\
SecRuleEngine On
SecRequestBodyAccess On
SecRule REQUEST_HEADERS:Content-Type "@rx ^application/json" \
    "id:1,phase:1,pass,nolog,ctl:requestBodyProcessor=JSON"
SecRule REQUEST_HEADERS:X-Early "@streq stop" "id:2,phase:1,deny,status:406,log,msg:'early'"
SecRule ARGS "@detectSQLi" "id:3,phase:2,deny,status:403,log,msg:'sqli'"
SecRule ARGS:note "@contains hello" "id:4,phase:2,pass,log,msg:'noted'"
"""
# Transactions in the memory test: enough to show a leak of a few bytes per
# transaction as megabytes, in about ten seconds; bench/waf.py runs the full
# million (`python -m bench.waf --leak-only`).
LEAK_TRANSACTIONS = int(os.environ.get("STOCKADE_WAF_LEAK_TRANSACTIONS", "150000"))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


def run(
    engine: Engine,
    rules_text: str,
    uri: bytes,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    body: bytes = b"",
) -> tuple[int | None, list[str]]:
    with engine.rule_set() as rules:
        rules.add(rules_text)
        with engine.transaction(rules, "t-1") as tx:
            return _drive(tx, uri, headers, body)


def _drive(
    tx: Transaction, uri: bytes, headers: tuple[tuple[bytes, bytes], ...], body: bytes
) -> tuple[int | None, list[str]]:
    tx.connection("198.18.0.1", 40000, "198.18.0.2", 443)
    tx.uri(uri, "POST" if body else "GET", "1.1")
    for name, value in ((b"Host", b"api.example.com"), *headers):
        tx.add_header(name, value)
    tx.process_headers()
    found = tx.intervention()
    if found is None:
        if body:
            tx.append_body(body)
        tx.process_body()
        found = tx.intervention()
    return (found.status if found else None), list(tx.messages)


def test_the_engine_says_what_it_is(engine: Engine) -> None:
    assert engine.version.startswith("ModSecurity v3")


def test_rules_load_from_text_and_from_a_file(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "rules.conf"
    path.write_text(RULES)
    with engine.rule_set() as from_text, engine.rule_set() as from_file:
        assert from_text.add(RULES) == 4  # SecRule/SecAction lines; directives are not counted
        assert from_file.add_file(path) == 4


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("SecNoSuchDirective On", "Invalid input"),
        ('SecRule ARGS "@detectSQLi" "phase:2,deny"', "Rules must have an ID"),
        ('SecRule ARGS "@rx a" "id:9,phase:2,deny,nosuchaction"', "nosuchaction"),
        ('SecRule ARGS "@pmFromFile /nonexistent/list.data" "id:9,phase:2,deny"', "Failed to open"),
    ],
)
def test_rules_that_do_not_parse_raise_the_engines_message(
    engine: Engine, text: str, says: str
) -> None:
    with engine.rule_set() as rules, pytest.raises(RulesError, match=says) as caught:
        rules.add(text, "my.conf")
    assert str(caught.value).startswith("my.conf: ")


def test_a_duplicate_rule_id_and_a_missing_file_are_errors(engine: Engine) -> None:
    with engine.rule_set() as rules:
        rules.add('SecRule ARGS "@detectSQLi" "id:7,phase:2,deny"')
        with pytest.raises(RulesError, match="Rule id: 7 is duplicated"):
            rules.add('SecRule ARGS "@detectXSS" "id:7,phase:2,deny"')
        with pytest.raises(RulesError, match=r"/nonexistent/rules\.conf"):
            rules.add_file(Path("/nonexistent/rules.conf"))


def test_a_missing_library_is_a_clear_error() -> None:
    with pytest.raises(ModSecurityError, match=r"cannot load libnosuch\.so\.3.*libmodsecurity3"):
        Engine("libnosuch.so.3")


def test_a_clean_request_passes_and_logs_nothing(engine: Engine) -> None:
    assert run(engine, RULES, b"/api/items?q=hello+world&page=2") == (None, [])


def test_an_attack_gives_the_rules_status_and_log(engine: Engine) -> None:
    with engine.rule_set() as rules:
        rules.add(RULES)
        with engine.transaction(rules, "tx-42") as tx:
            status, _ = _drive(tx, b"/a?id=1%27%20or%20%271%27=%271", (), b"")
            assert status == 403
    # the log line of the disruptive rule, with our transaction id
    with engine.rule_set() as rules:
        rules.add(RULES)
        with engine.transaction(rules, "tx-43") as tx:
            tx.connection("198.18.0.1", 1, "198.18.0.2", 80)
            tx.uri(b"/a?id=1%27%20or%20%271%27=%271", "GET", "1.1")
            tx.process_headers()
            assert tx.intervention() is None
            tx.process_body()
            found = tx.intervention()
            assert found is not None and found.status == 403
            assert '[id "3"]' in found.log and '[unique_id "tx-43"]' in found.log
            assert tx.intervention() is None  # reported once


def test_a_phase_one_rule_stops_before_the_body(engine: Engine) -> None:
    status, _ = run(engine, RULES, b"/a", ((b"X-Early", b"stop"),))
    assert status == 406


def test_json_bodies_are_parsed_into_arguments(engine: Engine) -> None:
    headers = ((b"Content-Type", b"application/json"),)
    attack = b'{"user": {"name": "x\' or 1=1 --"}}'
    assert run(engine, RULES, b"/a", headers, attack)[0] == 403
    assert run(engine, RULES, b"/a", headers, b'{"user": {"name": "O\'Brien"}}')[0] is None


def test_log_lines_of_passing_rules_reach_their_own_transaction(engine: Engine) -> None:
    """Two threads, each with its own transactions: no line lands in the other's list."""
    failures: list[str] = []

    def worker(word: str) -> None:
        with engine.rule_set() as rules:
            rules.add(RULES)
            for _ in range(200):
                with engine.transaction(rules, word) as tx:
                    _drive(tx, f"/a?note=hello-{word}".encode(), (), b"")
                    if len(tx.messages) != 1 or f"hello-{word}" not in tx.messages[0]:
                        failures.append(repr(tx.messages))

    threads = [threading.Thread(target=worker, args=(w,)) for w in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_a_closed_transaction_or_rule_set_refuses_calls(engine: Engine) -> None:
    rules = engine.rule_set()
    rules.add(RULES)
    tx = engine.transaction(rules, "t")
    tx.close()
    tx.close()  # twice is harmless
    with pytest.raises(ModSecurityError, match="closed"):
        tx.process_headers()
    rules.close()
    with pytest.raises(ModSecurityError, match="closed"):
        rules.add(RULES)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_stays_flat_over_many_transactions(engine: Engine) -> None:
    """Clean and blocked transactions (whose intervention strings must be freed), and
    rule sets that fail to parse (whose error strings must be freed): after a warm-up,
    resident memory stays where it was."""
    headers = ((b"User-Agent", b"bench"), (b"Content-Type", b"application/json"))
    with engine.rule_set() as rules:
        rules.add(RULES)

        def batch(count: int) -> None:
            for i in range(count):
                with engine.transaction(rules, f"t{i}") as tx:
                    if i % 2:
                        _drive(tx, b"/a?q=1%27%20or%20%271%27=%271", headers, b"")
                    else:
                        _drive(tx, b"/a?note=hello", headers, b'{"a": [1, 2, {"b": "c"}]}')
            for _ in range(count // 1000):
                with engine.rule_set() as broken, pytest.raises(RulesError):
                    broken.add("SecNoSuchDirective On")

        batch(LEAK_TRANSACTIONS // 5)
        before = _rss_kib()
        batch(LEAK_TRANSACTIONS)
        after = _rss_kib()
    # A leak of 16 bytes per transaction would show as 2.3 MiB here.
    assert after - before < 1536, f"RSS grew from {before} to {after} KiB"
