"""`stockade waf tune`'s parts: what is recorded, the recompute, the proposals, the edit."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockade.proxy.waf.findings import MAX_MATCHES, Matches, matched
from stockade.proxy.waf.modsec import Engine, RuleSet
from stockade.proxy.waf.rulesets import RuleSets
from stockade.proxy.waf.tuning import (
    Proposal,
    RecordedMatch,
    RecordedWaf,
    TuneRecord,
    WriteError,
    analyse,
    insert_exclusions,
    parse_recorded_waf,
    recorded_flagged,
    rule_messages,
    toml_string,
    with_exclusions,
    write_config,
)
from stockade.proxy.waf_settings import Exclusion, RouteWaf, WafConfig

CRS = RouteWaf(mode="crs", action="detect")


# -- what the engine's lines give -------------------------------------------------------


@pytest.fixture(scope="module")
def crs() -> Iterator[tuple[Engine, RuleSets, RuleSet]]:
    engine = Engine()
    sets = RuleSets(engine, WafConfig(), 1 << 20)
    try:
        yield engine, sets, sets.get("crs")
    finally:
        sets.close()
        engine.close()


def _run(setup: tuple[Engine, RuleSets, RuleSet], uri: bytes, body: bytes = b"") -> Matches:
    engine, sets, rules = setup
    with engine.transaction(rules, "tune-test") as tx:
        tx.connection("198.18.0.1", 40000, "198.18.0.2", 443)
        tx.uri(uri, "POST", "1.1")
        tx.add_headers(
            [
                (b"Host", b"api.example.com"),
                (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64)"),
                (b"Accept", b"application/json"),
                (b"Content-Type", b"application/json"),
                (b"Content-Length", str(len(body)).encode()),
            ]
        )
        tx.process_headers()
        found = tx.intervention()
        if found is None:
            tx.append_body(body)
            tx.process_body()
            found = tx.intervention()
        assert found is not None
        return matched([*tx.messages, found.log], sets.known_ids)


def test_matches_name_rule_variable_points_and_the_total(
    crs: tuple[Engine, RuleSets, RuleSet],
) -> None:
    found = _run(crs, b"/api/orders", json.dumps({"shipTo": {"where": "4 Insert Road"}}).encode())
    assert found.score == 5
    assert [(m.rule_id, m.variable, m.points, m.named) for m in found.matches] == [
        ("942360", "ARGS:json.shipTo.where", 5, True)
    ]
    record = found.as_json("crs")
    assert "4 Insert Road" not in json.dumps(record)  # a name, never the value
    parsed = parse_recorded_waf(json.loads(json.dumps(record)))
    assert parsed is not None and parsed.score == 5 and parsed.unnamed_points == 0


def test_the_points_add_up_to_crs_total(crs: tuple[Engine, RuleSets, RuleSet]) -> None:
    """Two variables of one rule each score: with multiMatch each has its line."""
    body = json.dumps({"a": "1 union select 1", "b": "x or 1=1 --"}).encode()
    found = _run(crs, b"/api/orders", body)
    assert found.score == sum(m.points for m in found.matches) == 20
    assert {(m.rule_id, m.variable) for m in found.matches} >= {
        ("942100", "ARGS:json.a"),
        ("942100", "ARGS:json.b"),
    }


def test_a_rule_that_matched_several_variables_leaves_points_unnamed(
    crs: tuple[Engine, RuleSets, RuleSet],
) -> None:
    """ModSecurity 3 logs one line for the rule (the last variable); the score has all."""
    found = _run(crs, b"/api/x?a=/etc/passwd&b=/etc/shadow")
    recorded = parse_recorded_waf(found.as_json("crs"))
    assert recorded is not None and recorded.score is not None
    assert recorded.unnamed_points > 0
    named = [m for m in recorded.matches if m.base_rule == "930120"]
    assert len(named) == 1
    # excluding the named variable is not enough: the unnamed one still scores
    policy = with_exclusions(
        CRS, [_proposal(named[0].base_rule, (named[0].variable.removeprefix("ARGS:"),))]
    )
    assert recorded_flagged(recorded, policy, 5)


def test_credential_like_and_long_names_are_not_recorded(
    crs: tuple[Engine, RuleSets, RuleSet],
) -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2lnbmF0dXJl"
    long_name = "k" * 400
    body = json.dumps({jwt: "' or 1=1 --", long_name: "' or 2=2 --"}).encode()
    line = json.dumps(_run(crs, b"/api/orders", body).as_json("crs"))
    assert "eyJ" not in line and long_name not in line
    recorded = parse_recorded_waf(json.loads(line))
    assert recorded is not None
    assert all(not m.named and m.argument is None for m in recorded.matches if m.rule == "942100")


def test_a_request_cannot_name_a_rule_that_is_not_loaded(
    crs: tuple[Engine, RuleSets, RuleSet],
) -> None:
    fake = '[file "/x"] [line "1"] [id "1234567"] [rev ""] [msg "m"] [data "d"] [severity "2"]'
    found = _run(crs, b"/api/orders", json.dumps({"q": fake + " ' or 1=1 --"}).encode())
    assert found.matches and all(m.rule_id != "1234567" for m in found.matches)


def test_matches_past_the_limit_are_counted_not_kept() -> None:
    line = (
        'ModSecurity: Warning. x [file "f"] [line "1"] [id "942100"] [rev ""] [msg "m"] '
        '[data "Matched Data: s found within ARGS:a{n}: v"] [severity "2"] [ver "x"]'
    )
    found = matched([line.format(n=n) for n in range(MAX_MATCHES + 5)], {"942100"})
    assert len(found.matches) == MAX_MATCHES and found.dropped == 5


# -- the recompute ---------------------------------------------------------------------------

_rule_ids = st.sampled_from(["942100", "942360", "941100", "2942360", "932150", "920350"])
_variables = st.sampled_from(
    ["ARGS:json.a", "ARGS:json.b", "ARGS:q", "REQUEST_HEADERS:User-Agent", "ARGS_NAMES:x"]
)
_matches = st.lists(
    st.builds(RecordedMatch, _rule_ids, _variables, st.sampled_from([2, 3, 4, 5]), st.booleans()),
    min_size=1,
    max_size=8,
)


@st.composite
def _recorded(draw: st.DrawFn) -> RecordedWaf:
    matches = tuple(draw(_matches))
    unnamed = draw(st.sampled_from([0, 0, 5, 10]))
    return RecordedWaf("crs", sum(m.points for m in matches) + unnamed, matches)


_exclusions = st.lists(
    st.builds(
        Exclusion,
        st.tuples(st.sampled_from(["942100", "942360", "941000-941999", "932150", "920350"])),
        st.sampled_from([(), ("json.a",), ("json.b", "q"), ("x",)]),
        st.just("r"),
    ),
    max_size=4,
)


@given(_recorded(), _exclusions, _exclusions, st.integers(1, 30))
def test_more_exclusions_never_flag_more(
    recorded: RecordedWaf, some: list[Exclusion], more: list[Exclusion], threshold: int
) -> None:
    fewer = RouteWaf(mode="crs", exclusions=tuple(some))
    added = RouteWaf(mode="crs", exclusions=(*some, *more))
    if not recorded_flagged(recorded, fewer, threshold):
        assert not recorded_flagged(recorded, added, threshold)


@given(_recorded(), _exclusions, st.integers(1, 30))
def test_the_recompute_keeps_what_it_cannot_see(
    recorded: RecordedWaf, exclusions: list[Exclusion], threshold: int
) -> None:
    policy = RouteWaf(mode="crs", exclusions=tuple(exclusions))
    if recorded.score is not None and recorded.unnamed_points >= threshold:
        assert recorded_flagged(recorded, policy, threshold)
    # no exclusion: exactly the recorded verdict
    assert recorded_flagged(recorded, RouteWaf(mode="crs"), threshold) == (
        (recorded.score or 0) >= threshold
    )


def test_an_argument_exclusion_takes_only_that_argument() -> None:
    recorded = RecordedWaf(
        "crs",
        10,
        (
            RecordedMatch("942360", "ARGS:json.a", 5),
            RecordedMatch("2942360", "ARGS:json.b", 5),  # the API profile's copy of 942360
        ),
    )
    only_a = RouteWaf(mode="crs", exclusions=(Exclusion(("942360",), ("json.a",), "r"),))
    assert recorded_flagged(recorded, only_a, 6) is False
    assert recorded_flagged(recorded, only_a, 5) is True
    both = RouteWaf(mode="crs", exclusions=(Exclusion(("942000-942999",), (), "r"),))
    assert recorded_flagged(recorded, both, 1) is False
    old_key = RouteWaf(mode="crs", exclude_rules=("942360",))
    assert recorded_flagged(recorded, old_key, 1) is False


def test_sqli_xss_passes_only_when_every_match_is_excluded() -> None:
    recorded = RecordedWaf("sqli_xss", None, (RecordedMatch("42100", "ARGS:q", 5),), dropped=0)
    policy = RouteWaf(mode="sqli_xss", exclusions=(Exclusion(("42100",), ("q",), "r"),))
    assert recorded_flagged(recorded, policy, 5) is False
    assert recorded_flagged(RecordedWaf("sqli_xss", None, recorded.matches, 1), policy, 5)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=12,
    )
)
def test_a_malformed_record_is_ignored_never_an_error(raw: Any) -> None:
    parsed = parse_recorded_waf(raw)
    assert parsed is None or isinstance(parsed, RecordedWaf)


@pytest.mark.parametrize(
    "raw",
    [
        {"mode": "zero_trust", "score": 5, "matches": []},
        {"mode": "crs", "score": 5, "matches": [{"rule": "94x", "var": "ARGS:a", "points": 5}]},
        {"mode": "crs", "score": 5, "matches": [{"rule": "1", "var": "ARGS:a", "points": True}]},
        {"mode": "crs", "score": -1, "matches": []},
        {"mode": "crs", "score": 5, "matches": [{"rule": "1", "var": 3, "points": 5}]},
        {"mode": "crs", "score": 5, "matches": [{"rule": "1", "var": "a", "points": 5}] * 40},
    ],
)
def test_records_that_are_not_what_the_proxy_writes_are_refused(raw: dict[str, Any]) -> None:
    assert parse_recorded_waf(raw) is None


# -- the proposals ---------------------------------------------------------------------------


def _proposal(rule: str, arguments: tuple[str, ...]) -> Proposal:
    return Proposal(rule, arguments, 1, 1, ("x",), 1, "why", "reason")


def _record(
    n: int, matches: list[tuple[str, str, int]], score: int | None = None, client: str = ""
) -> TuneRecord:
    recorded = RecordedWaf(
        "crs",
        score if score is not None else sum(p for _, _, p in matches),
        tuple(RecordedMatch(r, v, p) for r, v, p in matches),
    )
    return TuneRecord(
        f"req{n}", client or f"198.18.0.{n % 200}", "api", "allowed", "waf_detect:blocked", recorded
    )


def _tune(records: list[TuneRecord], policy: RouteWaf = CRS, **kw: Any) -> Any:
    return analyse(records, "api", policy, 5, 10, {"942360": "SQL after digits"}, **kw)


def test_benign_misfires_get_the_rule_on_the_argument() -> None:
    records = [_record(n, [("942360", "ARGS:json.address.line1", 5)]) for n in range(6)]
    records.append(TuneRecord("plain", "198.18.0.9", "api", "allowed", None, None))
    tuning = _tune(records)
    assert tuning.requests == 7 and len(tuning.flagged) == 6
    [proposal] = tuning.proposals
    assert (proposal.rule, proposal.arguments, proposal.requests) == (
        "942360",
        ("json.address.line1",),
        6,
    )
    assert proposal.would_pass == 6 and proposal.samples == tuple(f"req{n}" for n in range(5))
    assert "SQL after digits" in proposal.reason and proposal.reason.isprintable()
    assert tuning.outcome(CRS, tuning.chosen(()))[0] == 6


def test_a_rule_that_also_fired_on_attacks_is_not_proposed_there() -> None:
    benign = [_record(n, [("942360", "ARGS:json.q", 5)]) for n in range(4)]
    attack = _record(
        9,
        [("942360", "ARGS:json.q", 5), ("942100", "ARGS:json.q", 5), ("942190", "ARGS:json.q", 5)],
    )
    other_arg = [_record(20 + n, [("942360", "ARGS:json.note", 5)]) for n in range(2)]
    tuning = _tune([*benign, attack, *other_arg])
    assert [(p.rule, p.arguments) for p in tuning.proposals] == [("942360", ("json.note",))]
    declined = {(d.rule, d.variable): d for d in tuning.declined}
    assert declined[("942360", "ARGS:json.q")].samples == ("req9",)
    assert ("942100", "ARGS:json.q") in declined and ("942190", "ARGS:json.q") in declined
    _, staying = tuning.outcome(CRS, tuning.chosen(()))
    assert "req9" in staying


def test_two_misfiring_rules_on_one_value_are_not_an_attack() -> None:
    records = [
        _record(n, [("942360", "ARGS:json.a", 5), ("932150", "ARGS:json.a", 5)]) for n in range(3)
    ]
    tuning = _tune(records)
    assert {p.rule for p in tuning.proposals} == {"942360", "932150"}
    # each alone lets nothing through (the other still scores 5); both together do
    assert all(p.would_pass == 0 for p in tuning.proposals)
    assert tuning.outcome(CRS, tuning.chosen(()))[0] == 3


def test_arguments_that_vary_without_bound_get_the_whole_rule() -> None:
    records = [_record(n, [("942360", f"ARGS:json.prices.sku{n}", 5)]) for n in range(12)]
    tuning = _tune(records)
    [proposal] = tuning.proposals
    assert proposal.arguments == () and proposal.scope == "rule"
    assert "vary without bound" in proposal.why
    assert tuning.chosen(()) == []  # written only when asked for by rule
    assert tuning.chosen({"942360"}) == [proposal]


def test_many_arguments_that_repeat_are_still_named() -> None:
    records = [
        _record(n, [("942360", f"ARGS:json.items.array_{n % 10}.note", 5)]) for n in range(40)
    ]
    tuning = _tune(records)
    assert len(tuning.proposals) == 10 and all(p.arguments for p in tuning.proposals)


def test_what_no_argument_names_can_only_be_the_whole_rule() -> None:
    records = [_record(n, [("920350", "REQUEST_HEADERS:Host", 5)]) for n in range(3)]
    records.append(_record(7, [("942360", "ARGS_NAMES:json.x", 5)]))
    tuning = _tune(records)
    assert {(p.rule, p.scope) for p in tuning.proposals} == {
        ("920350", "rule"),
        ("942360", "rule"),
    }
    assert "cannot name" in tuning.proposals[0].why


def test_whole_rule_is_not_proposed_where_the_rule_met_attacks() -> None:
    attack = _record(1, [("942360", "ARGS:q", 5), ("942100", "ARGS:q", 5), ("942190", "ARGS:q", 5)])
    header = _record(2, [("942360", "REQUEST_HEADERS:Referer", 5)])
    tuning = _tune([attack, header])
    assert all(p.rule != "942360" for p in tuning.proposals)
    assert any(d.variable == "REQUEST_HEADERS:Referer" for d in tuning.declined)


def test_what_today_excludes_already_is_not_proposed_again() -> None:
    records = [_record(n, [("942360", "ARGS:json.a", 5)]) for n in range(3)]
    policy = RouteWaf(mode="crs", exclusions=(Exclusion(("942360",), ("json.a",), "done"),))
    tuning = _tune(records, policy)
    assert tuning.already_passing == 3 and tuning.proposals == [] and tuning.flagged == []


def test_other_verdicts_and_other_routes_are_left_alone() -> None:
    records = [
        TuneRecord("b", "198.18.0.1", "api", "waf", "bad_body", None),
        TuneRecord("t", "198.18.0.1", "api", "waf", "waf_timeout", None),
        TuneRecord("old", "198.18.0.1", "api", "allowed", "waf_detect:blocked", None),
        TuneRecord(
            "o",
            "198.18.0.1",
            "other",
            "allowed",
            "waf_detect:blocked",
            RecordedWaf("crs", 5, (RecordedMatch("942360", "ARGS:a", 5),)),
        ),
    ]
    tuning = _tune(records)
    assert tuning.requests == 3 and tuning.unreadable == 1
    assert tuning.other_verdicts == {"bad_body": 1, "waf_timeout": 1}
    assert tuning.proposals == []


def test_a_zero_trust_route_is_refused() -> None:
    from stockade.proxy.waf.tuning import TuneError

    with pytest.raises(TuneError, match="zero_trust"):
        analyse([], "api", RouteWaf(mode="zero_trust"), 5, 10, {})


def test_rule_messages_come_from_the_rule_text() -> None:
    text = (
        'SecRule ARGS "@rx x" \\\n    "id:942360,\\\n    phase:2,\\\n'
        "    msg:'Detects concatenated basic SQL injection',\\\n    severity:'CRITICAL'\"\n"
        'SecRule ARGS "@rx y" "id:1,phase:2,pass,nolog"\n'
        'SecRule ARGS "@rx z" "id:2,phase:2,msg:\'two\'"\n'
    )
    assert rule_messages([text]) == {
        "942360": "Detects concatenated basic SQL injection",
        "2": "two",
    }


# -- the edit --------------------------------------------------------------------------------

CONFIG = """\
# stockade, with comments that must stay
[proxy]
access_log = "/var/log/stockade/access.log"   # the log tune reads

[proxy.pools.api]
servers = ["127.0.0.1:9"]

[[proxy.routes]]
name = "first"
path_prefix = "/a/"
pool = "api"

[[proxy.routes]]
name = "api"
path_prefix = "/api/"
pool = "api"
waf = "crs"
waf_action = "detect"   # rolling out

[[proxy.routes.waf_exclusions]]
rules = [920350]
reason = "clients send an IP as Host"

[proxy.routes.limits]
x = 1

# the last route, with its own comment
[[proxy.routes]]
name = "last"
path_prefix = "/"
pool = "api"
"""


def test_exclusions_go_after_the_route_and_nothing_else_moves() -> None:
    proposal = Proposal("942360", ("json.a.b", 'we"ird'), 3, 2, ("r1", "r2"), 3, "w", "a \\ b")
    updated = insert_exclusions(CONFIG, "api", [proposal])
    old_lines, new_lines = CONFIG.splitlines(), updated.splitlines()
    # every old line is still there, in order, and only lines were added
    it = iter(new_lines)
    assert all(any(line == new for new in it) for line in old_lines)
    data = tomllib.loads(updated)
    route = data["proxy"]["routes"][1]
    assert route["waf_exclusions"][-1] == {
        "rules": [942360],
        "arguments": ["json.a.b", 'we"ird'],
        "reason": "a \\ b",
    }
    assert route["limits"] == {"x": 1} and data["proxy"]["routes"][2]["name"] == "last"
    # after the route's own tables, before the next route's comment
    assert updated.index("[[proxy.routes.waf_exclusions]]  #") > updated.index("x = 1")
    assert updated.index("rules = [942360]") < updated.index("# the last route")


def test_the_last_route_and_crlf_files() -> None:
    text = CONFIG.replace("\n", "\r\n").rstrip("\r\n")  # no newline at the end either
    updated = insert_exclusions(text, "last", [_proposal("942360", ("q",))])
    assert "\r\n" in updated and "\n" not in updated.replace("\r\n", "")
    assert tomllib.loads(updated)["proxy"]["routes"][2]["waf_exclusions"][0]["arguments"] == ["q"]


@pytest.mark.parametrize(
    "text",
    [
        # routes written inline: no table to append to
        '[proxy]\nroutes = [{name = "api", pool = "api", waf = "crs"}]\n',
        # an inline array of exclusions cannot take [[...]] tables after it
        '[[proxy.routes]]\nname = "api"\nwaf_exclusions = []\n',
        # a route header in a string: the tables would land inside the string
        '[[proxy.routes]]\nname = "api"\nnote = """\n[[proxy.routes]]\n"""\n',
        # a route header hidden in a string throws the count off
        'x = """\n[[proxy.routes]]\n"""\n[[proxy.routes]]\nname = "api"\n',
    ],
)
def test_a_file_it_cannot_edit_safely_is_refused(text: str) -> None:
    with pytest.raises(WriteError):
        insert_exclusions(text, "api", [_proposal("942360", ("q",))])


@given(
    st.lists(st.sampled_from(["# c", "", "k = 1", "[proxy.routes.t]", "z = 'x'"]), max_size=6),
    st.integers(0, 2),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=30),
)
def test_any_route_layout_gets_exactly_the_new_tables(
    filler: list[str], which: int, reason: str
) -> None:
    body = "\n".join(filler)
    parts = [f'[[proxy.routes]]\nname = "r{i}"\n{body}\n' for i in range(3)]
    text = "# head\n" + "\n".join(parts)
    try:
        original = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # (a filler repeated a key)
    proposal = Proposal("1", ("a",), 1, 1, (), 1, "w", reason)
    updated = insert_exclusions(text, f"r{which}", [proposal])
    parsed = tomllib.loads(updated)
    routes = original["proxy"]["routes"]
    routes[which].setdefault("waf_exclusions", []).append(
        {"rules": [1], "arguments": ["a"], "reason": reason}
    )
    assert parsed == original


def test_toml_strings_round_trip() -> None:
    for text in ['a"b\\c', "tab\there", "nl\nx", "del\x7f", "snow ☃ and 😀"]:
        assert tomllib.loads(f"v = {toml_string(text)}")["v"] == text


def test_write_keeps_a_backup_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "stockade.toml"
    path.write_text(CONFIG)
    path.chmod(0o640)
    checked: list[Path] = []
    written = write_config(path, "api", [_proposal("942360", ("q",))], checked.append)
    assert written.backup.read_text() == CONFIG
    assert checked[0].parent == tmp_path  # checked beside the original
    assert 'arguments = ["q"]' in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["stockade.toml", written.backup.name]
    )


def test_a_check_that_refuses_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "stockade.toml"
    path.write_text(CONFIG)

    def refuse(_: Path) -> None:
        raise WriteError("no")

    with pytest.raises(WriteError):
        write_config(path, "api", [_proposal("942360", ("q",))], refuse)
    assert path.read_text() == CONFIG
    assert [p.name for p in tmp_path.iterdir()] == ["stockade.toml"]


def test_a_file_changed_meanwhile_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "stockade.toml"
    path.write_text(CONFIG)

    def someone_else_edits(_: Path) -> None:
        path.write_text(CONFIG + "\n# edited\n")

    with pytest.raises(WriteError, match="changed"):
        write_config(path, "api", [_proposal("942360", ("q",))], someone_else_edits)
    assert path.read_text().endswith("# edited\n")
    assert len(os.listdir(tmp_path)) == 1


_names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(
    st.lists(
        st.tuples(st.sampled_from(["942100", "2942360", "920350"]), _names, st.booleans()),
        max_size=6,
    ),
    st.one_of(st.none(), st.integers(0, 200)),
)
def test_an_access_log_line_stays_one_json_line_whatever_the_names(
    tmp_path_factory: pytest.TempPathFactory,
    matches: list[tuple[str, str, bool]],
    score: int | None,
) -> None:
    """Argument names come from clients: quotes, newlines, any Unicode."""
    from stockade.proxy.access_log import AccessLog
    from stockade.proxy.context import RequestContext
    from stockade.proxy.settings import Route
    from stockade.proxy.waf.findings import Match

    path = tmp_path_factory.mktemp("log") / "access.log"
    writer = AccessLog(str(path))
    ctx = RequestContext("r1", "198.18.0.1", "198.18.0.1", False, "https", path="/api/x")
    ctx.route = Route("api", "api")
    found = Matches(tuple(Match(r, f"ARGS:{n}", 5, named) for r, n, named in matches), score)
    ctx.waf_record = found.as_json("crs")
    writer.write(ctx, "POST")
    writer.flush()
    writer._out.close()
    [line] = path.read_text(encoding="utf-8").splitlines()
    recorded = parse_recorded_waf(json.loads(line)["waf"])
    assert recorded is not None and recorded.score == score
    assert [(m.rule, m.variable, m.named) for m in recorded.matches] == [
        (r, f"ARGS:{n}", named) for r, n, named in matches
    ]


def test_points_already_excluded_do_not_make_an_attack() -> None:
    """Today's exclusions took 942100 and 942190 off json.q: 942360 there is a misfire."""
    records = [
        _record(
            n,
            [
                ("942360", "ARGS:json.q", 5),
                ("942100", "ARGS:json.q", 5),
                ("942190", "ARGS:json.q", 5),
            ],
        )
        for n in range(3)
    ]
    policy = RouteWaf(mode="crs", exclusions=(Exclusion(("942100", "942190"), ("json.q",), "r"),))
    tuning = _tune(records, policy)
    assert [(p.rule, p.arguments) for p in tuning.proposals] == [("942360", ("json.q",))]
    assert tuning.attacks == []


def test_each_write_keeps_its_own_backup_and_a_symlink_stays(tmp_path: Path) -> None:
    real = tmp_path / "conf" / "stockade.toml"
    real.parent.mkdir()
    real.write_text(CONFIG)
    link = tmp_path / "stockade.toml"
    link.symlink_to(real)
    first = write_config(link, "api", [_proposal("942360", ("a",))], lambda _: None)
    second = write_config(link, "api", [_proposal("942360", ("b",))], lambda _: None)
    assert link.is_symlink() and first.backup != second.backup
    assert first.backup.read_text() == CONFIG
    assert 'arguments = ["a"]' in second.backup.read_text()
    assert 'arguments = ["b"]' in real.read_text() and 'arguments = ["a"]' in real.read_text()
