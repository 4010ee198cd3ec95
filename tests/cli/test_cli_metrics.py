"""The controller's Prometheus metrics: the kernel's counters and the bans, at scrape time."""

from __future__ import annotations

import subprocess
import urllib.request

from cli_harness import Controller
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(ctl: Controller) -> str:
    where = ctl.api("status")["metrics"]
    url = f"http://{where['address']}:{where['port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
        return text


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_bans_and_ban_events_are_counted_by_source(ctl: Controller) -> None:
    before = samples(scrape(ctl))
    key_cli = ("stockade_bans_active", (("family", "ipv4"), ("kind", "exact"), ("source", "cli")))
    key_rule = (
        "stockade_bans_active",
        (("family", "ipv6"), ("kind", "prefix"), ("source", "rule")),
    )
    event_cli = ("stockade_ban_events_total", (("action", "ban"), ("source", "cli")))
    event_unban = ("stockade_ban_events_total", (("action", "unban"), ("source", "cli")))
    ctl.api("ban", target="198.18.0.77", ttl="5m")
    ctl.api("ban", target="198.18.0.78")
    ctl.api("rule.ban", target="fd00:77::/64", ttl="5m", rule="scanner")
    ctl.api("unban", target="198.18.0.78")
    after = samples(scrape(ctl))
    assert after[key_cli] - before.get(key_cli, 0) == 1
    assert after[key_rule] - before.get(key_rule, 0) == 1
    assert after[event_cli] - before.get(event_cli, 0) == 2
    assert after[event_unban] - before.get(event_unban, 0) == 1
    for reason in ("pass", "allow", "drop_ban", "drop_rate", "malformed", "non_ip"):
        verdict = "drop" if reason.startswith("drop") else "pass"
        # no interface here: the counters are there, as interface "other"
        labels = (("interface", "other"), ("reason", reason), ("verdict", verdict))
        assert ("stockade_xdp_packets_total", labels) in after
    assert after[("stockade_xdp_monitor_mode", ())] == 0
    assert any(name == "stockade_build_info" for name, _ in after)
    ctl.api("unban", target="198.18.0.77")
    ctl.api("unban", target="fd00:77::/64")


def test_promtool_accepts_the_controllers_metrics(ctl: Controller) -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=scrape(ctl),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
