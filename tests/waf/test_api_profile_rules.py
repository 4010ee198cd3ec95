"""The SecLang the API profile writes, against the installed CRS and the engine itself."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.proxy.waf import api_profile
from stockade.proxy.waf.api_profile import FIELDS, FieldKind, any_of, graphql_pattern
from stockade.proxy.waf.findings import rule_ids
from stockade.proxy.waf.modsec import Engine, RulesError
from stockade.proxy.waf.rulesets import RuleSets, json_body
from stockade.proxy.waf_settings import _ARGUMENT, Exclusion, RouteWaf, WafConfig

CRS = WafConfig().crs
DOCS = Path(__file__).resolve().parents[2] / "docs" / "proxy.md"


def _crs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(CRS.rules_dir.glob("REQUEST-*.conf")))


@pytest.fixture(scope="module")
def sets() -> Iterator[RuleSets]:
    engine = Engine()
    rule_sets = RuleSets(engine, WafConfig(), 1 << 20)
    rule_sets.get("crs")
    try:
        yield rule_sets
    finally:
        rule_sets.close()
        engine.close()


def test_the_parser_finds_every_rule_of_the_installed_crs() -> None:
    text = _crs_text()
    rules = api_profile.parse_rules(text)
    # every id in the files is a SecRule's, but for the SecActions' and those in comments
    live = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", " ", live).splitlines()
    actions = rule_ids("\n".join(line for line in joined if line.lstrip().startswith("SecAction")))
    assert set(rules) == rule_ids(live) - actions
    assert "912110" in rules  # after a chain whose last rule has no actions
    names = [r for r in rules.values() if "ARGS_NAMES" in r.targets]
    assert len(names) > 100
    assert rules["930120"].targets[-3:] == ("ARGS_NAMES", "ARGS", "XML:/*")
    assert rules["930120"].paranoia == 1 and not rules["930120"].chained
    assert rules["931130"].chained and rules["931130"].paranoia == 2


def test_the_prose_copies_drop_only_newline_and_backtick() -> None:
    rules = api_profile.parse_rules(_crs_text())
    for rule_id in api_profile.FIELDS[0].as_prose:
        operator = rules[rule_id].operator
        prose = api_profile.prose_operator(operator)
        assert prose is not None, rule_id
        # the other separators (; | & $( ...) stay: the engine test is test_api_profile.py's
        assert prose == operator.replace(r"|\n|\r", "", 1).replace("|`", "", 1), rule_id
    # an operator without the known separators is not rewritten: the rule stays as CRS has it
    assert api_profile.prose_operator("@rx (?:;|\\|)\\s*cat") is None
    assert api_profile.prose_operator("@pm cat") is None


KEYS = st.text(alphabet="abcdefgxyz_-.0123", min_size=1, max_size=8)


@given(st.lists(KEYS, min_size=1, max_size=6), st.lists(KEYS, min_size=1, max_size=4))
def test_a_field_kind_matches_a_json_member_by_its_last_key(
    keys: list[str], path: list[str]
) -> None:
    kind = FieldKind("t", tuple(keys), (), (), "")
    name = "json." + ".".join(path)
    # the engine's name is all there is: a key may have dots, so "the last key is k"
    # can only mean "the name ends in .k"
    expected = any(name.lower().endswith("." + k.lower()) for k in keys)
    assert bool(re.search(kind.json_pattern(), name)) == expected
    assert "|" not in kind.json_pattern()  # ModSecurity would split the target there


@given(st.lists(KEYS, min_size=1, max_size=4), KEYS, st.booleans())
def test_graphql_fields_match_the_member_or_a_batch_of_them(
    fields: list[str], name: str, batch: bool
) -> None:
    arg = ("json.array_3." if batch else "json.") + name
    assert bool(re.search(graphql_pattern(fields), arg)) == (name in fields)
    assert "|" not in graphql_pattern(fields)


@given(st.lists(st.sampled_from(["a", "b", "ab", "b$"]), min_size=1, max_size=3), st.text("ab"))
def test_any_of_is_an_alternation(patterns: list[str], text: str) -> None:
    alternation = "(?:" + "|".join(patterns) + ")"
    assert bool(re.match(any_of(patterns), text)) == bool(re.match(alternation, text))


@settings(max_examples=60)
@given(st.from_regex(_ARGUMENT, fullmatch=True).filter(str.isprintable))
def test_any_argument_the_config_takes_loads_into_the_engine(sets: RuleSets, name: str) -> None:
    policy = RouteWaf("crs", exclusions=(Exclusion(("942100",), (name,), "test"),))
    sets.for_route("r", policy)  # a RulesError would fail the example


def test_a_failed_load_does_not_fail_the_next_one() -> None:
    """3.0.9's lexer keeps the state of a load that failed mid-directive; the binding
    puts it back, so one bad route does not break the sets built after it."""
    engine = Engine()
    try:
        for bad in (
            'SecRuleUpdateTargetById 1 "!ARGS:a|b"',
            'SecRuleUpdateTargetById 1 "!ARGS:a"b"',
        ):
            with engine.rule_set() as rules, pytest.raises(RulesError):
                rules.add(bad)
            with engine.rule_set() as rules:
                assert rules.add('SecRule ARGS "@rx ^a{2}$" "id:2,phase:2,pass,nolog"') == 1
        with engine.rule_set() as rules, pytest.raises(RulesError, match="NUL"):
            rules.add('SecRule ARGS "@rx a" "id:3,phase:2,pass,nolog"\0SecRule ...')
    finally:
        engine.close()


def test_an_exclusion_of_a_rule_that_is_not_loaded_names_the_route(sets: RuleSets) -> None:
    policy = RouteWaf("crs", exclusions=(Exclusion(("942999",), ("q",), "typo"),))
    with pytest.raises(RulesError, match=r"route orders: waf_exclusions: 942999: no such rule"):
        sets.for_route("orders", policy)
    empty = RouteWaf("crs", exclusions=(Exclusion(("1-5",), (), "nothing there"),))
    with pytest.raises(RulesError, match="1-5: no such rule"):
        sets.for_route("orders", empty)


def test_routes_share_sets_and_only_the_profile_splits_json(sets: RuleSets) -> None:
    plain = sets.for_route("a", RouteWaf("crs", profile="none"))
    assert plain.json is plain.other is sets.get("crs")
    api = sets.for_route("b", RouteWaf("crs"))
    assert api.json is not api.other
    again = sets.for_route("c", RouteWaf("crs", profile="api"))
    assert (again.json, again.other) == (api.json, api.other)
    sqli = sets.for_route("d", RouteWaf("sqli_xss"))
    assert sqli.json is sqli.other is sets.get("sqli_xss")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"Content-Type", b"application/json")], True),
        ([(b"content-type", b"Application/JSON; charset=utf-8")], True),
        ([(b"Content-Type", b"application/vnd.api+json")], True),
        ([(b"Content-Type", b"text/plain"), (b"Content-Type", b"application/json")], True),
        ([(b"Content-Type", b"application/x-www-form-urlencoded")], False),
        ([(b"Content-Type", b" application/json")], False),  # as rule 200001: from the start
        ([(b"X-Content-Type", b"application/json")], False),
        ([], False),
    ],
)
def test_the_json_set_is_for_what_the_engine_parses_as_json(
    headers: list[tuple[bytes, bytes]], expected: bool
) -> None:
    assert json_body(headers) == expected


def test_a_text_without_a_final_newline_does_not_break_the_next_load() -> None:
    """libmodsecurity 3.0.9's lexer stays inside a SecRuleUpdateTargetById that ends
    the text; the binding ends every text with a newline."""
    engine = Engine()
    try:
        with engine.rule_set() as rules:
            rules.add('SecRuleUpdateTargetById 1 "!ARGS:x"')
            assert rules.add('SecRule ARGS "@rx ^a{2}$" "id:2,phase:2,pass,nolog"') == 1
    finally:
        engine.close()


def test_the_docs_describe_every_rule_the_profile_changes() -> None:
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("### The API profile") :]
    ends = [i for i in (section.find("\n## "), section.find("\n### ", 4)) if i >= 0]
    section = section[: min(ends, default=len(section))]
    changed = {"930120", "941310", api_profile.API_CLIENTS[0], api_profile.JSON_URLS[0]}
    changed |= {r for kind in FIELDS for r in (*kind.excluded, *kind.as_prose)}
    changed |= set(api_profile.GRAPHQL_RULES)
    missing = sorted(r for r in changed if r not in section)
    assert not missing
    for kind in FIELDS:
        for key in kind.keys:
            assert f"`{key}`" in section, key
