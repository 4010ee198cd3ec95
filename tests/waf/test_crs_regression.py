"""The CRS regression corpus (tests/waf/corpus/crs_regression.jsonl) through the
proxy's engine: each rule under test fires, clean requests fire nothing, and at CRS
3.3.4 exactly the recorded rules fire. And over every corpus, the points recorded per
match (proxy/waf/findings.py) never add up to more than CRS's own score.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is not an installed package: import it from the tree
    sys.path.insert(0, str(REPO))

from bench.waf_engines import REGRESSION, CtypesDriver, corpus, evaluate, findings  # noqa: E402

CASES = [json.loads(line) for line in REGRESSION.read_text().splitlines()]
CRS_334 = "OWASP_CRS/3.3.4" in Path(
    "/usr/share/modsecurity-crs/rules/REQUEST-942-APPLICATION-ATTACK-SQLI.conf"
).read_text(errors="replace")


@pytest.fixture(scope="module")
def engine() -> Iterator[CtypesDriver]:
    driver = CtypesDriver()
    try:
        yield driver
    finally:
        driver.close()


def test_the_corpus_covers_the_rule_families() -> None:
    families = {case["rule"][:3] for case in CASES if case["rule"]}
    assert families >= {"911", "913", "920", "921", "930", "931", "932", "933", "934", "941"}
    assert families >= {"942", "943", "944"}
    assert sum(1 for case in CASES if case["rule"] is None) >= 5


@pytest.mark.parametrize("case", CASES, ids=[f"{c['id']}-{c['rule']}" for c in CASES])
def test_each_rule_under_test_fires(engine: CtypesDriver, case: dict[str, Any]) -> None:
    status, fired = evaluate(engine, case)
    if case["rule"] is None:
        assert (status, fired) == (0, [])
    else:
        assert case["rule"] in fired
    if CRS_334:  # (a warning alone stays under the anomaly threshold: status 0)
        assert (status, fired) == (case["status"], case["fires"])


def test_recorded_points_never_exceed_the_engines_score(engine: CtypesDriver) -> None:
    exact = scored = 0
    for request in corpus():
        result = findings(engine, request)
        points = sum(p for _, _, p in result["matches"])
        if result["score"] is None:
            assert result["status"] in (0, 400), request["id"]
            continue
        assert points <= result["score"], request["id"]
        scored += 1
        exact += points == result["score"]
    # most: every point named (the rest: a rule that matched several variables)
    assert scored > 600 and exact > 0.8 * scored
