"""`stockade usage`: what the proxy stored, per consumer and plan."""

from __future__ import annotations

import json
import time
import zoneinfo
from pathlib import Path

from cli_harness import run_stockade

from stockade.proxy.quota import DAY, MONTH, QuotaCounters, UsageWriter, period, prepare_database

CONFIG = """
[proxy.quotas]
database = "{db}"
timezone = "Europe/Berlin"
[proxy.quotas.plans.free]
per_day = 100
per_month = 1000
[proxy.quotas.plans.pro]
per_day = 0
per_month = 50000
"""


def test_usage_reports_current_periods(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    config = tmp_path / "stockade.toml"
    config.write_text(CONFIG.format(db=db))
    prepare_database(db)
    zone = zoneinfo.ZoneInfo("Europe/Berlin")
    now = time.time()
    today, month = period(DAY, now, zone).label, period(MONTH, now, zone).label
    writer = UsageWriter(db, QuotaCounters(64, zone))
    writer.write(
        [
            ("acme", today, "free", 42),
            ("acme", month, "free", 420),
            ("bigco", month, "pro", 7),
            ("acme", "2020-01-01", "free", 99),  # long past: only with --all
        ]
    )
    result = run_stockade("--config", str(config), "usage", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["timezone"] == "Europe/Berlin"
    rows = {(r["consumer"], r["period"]): r for r in data["usage"]}
    assert set(rows) == {("acme", "day"), ("acme", "month"), ("bigco", "month")}
    assert rows[("acme", "day")] | {"updated": 0} == {
        "consumer": "acme",
        "plan": "free",
        "period": "day",
        "start": today,
        "used": 42,
        "quota": 100,
        "remaining": 58,
        "updated": 0,
    }
    assert rows[("bigco", "month")]["remaining"] == 50000 - 7

    one = run_stockade("--config", str(config), "usage", "--consumer", "bigco")
    assert one.returncode == 0 and "bigco" in one.stdout and "acme" not in one.stdout
    every = json.loads(run_stockade("--config", str(config), "usage", "--all", "--json").stdout)
    assert any(r["start"] == "2020-01-01" for r in every["usage"])


def test_usage_without_a_database_says_so(tmp_path: Path) -> None:
    config = tmp_path / "stockade.toml"
    config.write_text(CONFIG.format(db=tmp_path / "none.db"))
    result = run_stockade("--config", str(config), "usage")
    assert result.returncode == 1
    assert "no usage recorded yet" in result.stderr
