"""docs/grafana-dashboard.json: every metric its queries use exists in a real scrape of a
running proxy and controller, and every query runs on a real Prometheus scraping them."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from obs_harness import LIMIT, Controller, Proxy, free_port, running_proxy, samples
from prom_server import running_prometheus, wait_scraped

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"

# A route with the WAF: one blocked request makes stockade_proxy_waf_blocks_total appear,
# once the WAF reports its blocks to the metrics (PENDING_WAF below).
WAF_ROUTE = '[[proxy.routes]]\nname = "search"\npath_prefix = "/search"\npool = "api"\n'
WAF_ROUTE += 'waf = "sqli_xss"\n'
SQLI = "/search?q=1%27%20OR%20%271%27%3D%271"

# Metrics the dashboard uses that this gateway cannot show, and why.
ABSENT_HERE = {
    # the controller here attaches to no interface (tests/integration/test_metrics_lab.py
    # runs one that does, and checks this series)
    "stockade_xdp_attached",
}
# The WAF blocks requests (the fixture checks one) but keeps its counts in its own
# WafCounters, not yet in this metric: allowed to be missing until it has samples,
# checked like every other metric from then on.
PENDING_WAF = {"stockade_proxy_waf_blocks_total"}

PROMQL_WORDS = {
    *("by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"),
    *("and", "or", "unless", "inf", "nan"),
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)  # a collapsed row holds its panels


def queries() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$:.])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        name = match.group()
        if name in PROMQL_WORDS or text[match.end() :].lstrip().startswith("("):
            continue  # an operator word, or a function / aggregation
        names.add(name)
    return names


def test_the_extractor_finds_metric_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(a_bucket{x="y",le!="1"}[$__rate_'
        "interval]))) / on (route) group_left sum without (pid) (b_total offset 5m) "
        "or vector(0) > bool 1"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}


def test_the_dashboard_has_a_datasource_variable_used_by_every_query() -> None:
    data = dashboard()
    (variable,) = [v for v in data["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    uid = "${" + variable["name"] + "}"
    for panel in panels(data):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
    titles = " ".join(p["title"] for p in panels(data)).lower()
    for topic in ("reason", "bans", "latency", "upstream health", "rate-limit", "auth", "waf"):
        assert topic in titles, topic
    assert any("histogram_quantile" in q for q in queries())


@pytest.fixture(scope="module")
def gateway(
    controller: Controller, upstream: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """A proxy that has seen traffic of every kind the dashboard shows, and a ban."""
    home = tmp_path_factory.mktemp("dashboard")
    with running_proxy(home, controller, upstream, extra=WAF_ROUTE) as p:
        assert [p.get(f"/x/{i}") for i in range(5)] == [200] * 5
        bad_key = "X-API-Key: stk_nope_nope\r\n"
        assert [p.get("/login", bad_key) for _ in range(3)] == [401] * 3  # and "brute" acts
        assert [p.get("/limited") for _ in range(LIMIT + 1)][-1] == 429
        assert p.get(SQLI) == 403
        controller.api("ban", target="198.18.0.99", ttl="10m")
        p.wait_counted()
        try:
            yield p
        finally:
            controller.clear()


def scraped_names(proxy: Proxy, controller: Controller) -> set[str]:
    """Sample names with at least one sample (a family with none does not count)."""
    return {name for name, _ in samples(proxy.scrape()) | samples(controller.scrape())}


def test_every_metric_the_dashboard_queries_is_in_a_real_scrape(
    gateway: Proxy, controller: Controller
) -> None:
    used = set().union(*(metric_names(q) for q in queries()))
    assert "stockade_xdp_packets_total" in used and "stockade_bans_active" in used
    assert all(name.startswith("stockade_") for name in used), used
    scraped = scraped_names(gateway, controller)
    missing = used - scraped - ABSENT_HERE
    if not (PENDING_WAF & scraped):
        missing -= PENDING_WAF  # the WAF does not count its blocks yet
    assert not missing, f"the dashboard queries metrics no scrape has: {sorted(missing)}"
    assert used >= ABSENT_HERE  # an exclusion for a metric no longer used must go


def test_every_query_runs_on_prometheus_and_returns_data(
    gateway: Proxy, controller: Controller, tmp_path: Path
) -> None:
    jobs = {
        "stockade-proxy": [f"127.0.0.1:{gateway.admin['port']}"],
        "stockade-controller": [f"127.0.0.1:{controller.metrics_port}"],
    }
    scraped = scraped_names(gateway, controller)
    with running_prometheus(tmp_path / "prometheus", free_port(), jobs) as prometheus:
        wait_scraped(prometheus, jobs)
        before = prometheus.value("sum(stockade_proxy_requests_total)")
        assert [gateway.get(f"/y/{i}") for i in range(5)] == [200] * 5  # while it scrapes
        prometheus.wait_for("sum(stockade_proxy_requests_total)", (before or 0) + 5)
        empty, no_number = [], []
        for expr in queries():
            # Grafana's variables, as it would fill them in for a short range
            promql = expr.replace("$__rate_interval", "5s").replace("$__range", "1m")
            result = prometheus.query(promql)  # a query Prometheus refuses fails here
            if not result and metric_names(expr) <= scraped:
                empty.append(expr)
            overall_latency = "histogram_quantile" in expr and "by (le)" in expr
            if overall_latency and not all(math.isfinite(float(r["value"][1])) for r in result):
                no_number.append(expr)  # requests were just answered: it has a value
        assert not empty, f"queries without data: {empty}"
        assert not no_number, f"latency percentiles that are not numbers: {no_number}"
