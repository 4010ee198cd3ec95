"""A real Prometheus server scrapes the proxy's and the controller's admin listeners: the
series are there, with the values the traffic and the bans made."""

from __future__ import annotations

from pathlib import Path

from obs_harness import LIMIT, Controller, free_port, running_proxy, samples, total
from prom_server import running_prometheus, wait_scraped

ALLOWED = 12  # to /x/N: route "api"
REFUSED = 3  # over the limit of route "limited"
WORKERS = 3


def test_prometheus_scrapes_both_listeners_with_the_right_values(
    ctl: Controller, upstream: int, tmp_path: Path
) -> None:
    with running_proxy(tmp_path / "proxy", ctl, upstream, workers=WORKERS) as proxy:
        jobs = {
            "stockade-proxy": [f"127.0.0.1:{proxy.admin['port']}"],
            "stockade-controller": [f"127.0.0.1:{ctl.metrics_port}"],
        }
        with running_prometheus(tmp_path / "prometheus", free_port(), jobs) as prometheus:
            wait_scraped(prometheus, jobs)
            bans_before = total(
                samples(ctl.scrape()), "stockade_ban_events_total", action="ban", source="cli"
            )

            assert [proxy.get(f"/x/{i}") for i in range(ALLOWED)] == [200] * ALLOWED
            statuses = [proxy.get("/limited") for _ in range(LIMIT + REFUSED)]
            assert statuses == [200] * LIMIT + [429] * REFUSED
            ctl.api("ban", target="198.18.0.61", ttl="10m")
            ctl.api("ban", target="fd00:61::/64")

            sent = ALLOWED + LIMIT + REFUSED
            prometheus.wait_for("sum(stockade_proxy_requests_total)", sent)
            prometheus.wait_for("sum(stockade_bans_active)", 2)

            def value(expr: str) -> float | None:
                return prometheus.value(expr)

            requests = 'sum(stockade_proxy_requests_total{job="stockade-proxy",%s})'
            assert value(requests % 'route="api",decision="allowed",status="2xx"') == ALLOWED
            assert value(requests % 'route="limited",decision="allowed"') == LIMIT
            assert value(requests % 'route="limited",decision="ratelimit",status="4xx"') == 3
            assert value('stockade_proxy_rate_limited_total{limit="per_ip"}') == REFUSED
            assert value("sum(stockade_proxy_request_duration_seconds_count)") == sent
            assert value('sum(stockade_proxy_request_duration_seconds_bucket{le="+Inf"})') == sent
            assert value("sum(stockade_proxy_upstream_duration_seconds_count)") == ALLOWED + LIMIT
            assert value('stockade_proxy_upstream_up{pool="api"}') == 1
            assert value("stockade_proxy_requests_in_flight") == 0
            # added up across the workers: one series per label set, no pid label
            series = prometheus.query("stockade_proxy_requests_total")
            assert len(series) == 3 and all("pid" not in s["metric"] for s in series)

            active = 'stockade_bans_active{job="stockade-controller",source="cli",%s}'
            assert value(active % 'kind="exact",family="ipv4"') == 1
            assert value(active % 'kind="prefix",family="ipv6"') == 1
            events = 'sum(stockade_ban_events_total{action="ban",source="cli"})'
            assert value(events) == bans_before + 2
            assert value('stockade_xdp_monitor_mode{job="stockade-controller"}') == 0
            reasons = prometheus.query('stockade_xdp_packets_total{verdict="drop"}')
            assert {s["metric"]["reason"] for s in reasons} == {"drop_ban", "drop_rate"}

            builds = prometheus.query("stockade_build_info")
            assert {s["metric"]["job"] for s in builds} == set(jobs)
            assert all(s["value"][1] == "1" for s in builds)
            assert value('min(up{job=~"stockade-.*"})') == 1
