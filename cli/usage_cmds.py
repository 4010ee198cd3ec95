"""`stockade usage`: quota usage per consumer and plan, for billing (read from the usage db)."""

from __future__ import annotations

import sqlite3
import time
import zoneinfo

import click

from stockade.cli.context import Context, fail, json_option, pass_ctx
from stockade.cli.output import emit_json, table
from stockade.proxy.quota import DAY, MONTH, period, read_usage


@click.command(
    "usage",
    epilog="Examples:\n\n  stockade usage\n\n  stockade usage --consumer acme --json\n\n"
    "  stockade usage --all --json   # every stored period, for billing",
)
@click.option("--consumer", help="Only this consumer.")
@click.option("--all", "every_period", is_flag=True, help="Every stored period, not just now.")
@json_option
@pass_ctx
def usage(ctx: Context, consumer: str | None, every_period: bool, as_json: bool) -> None:
    """Requests counted against each consumer's daily and monthly quota.

    Read from the usage database the proxy writes every second, so the last
    second's requests may be missing. Periods begin in [proxy.quotas] timezone.
    """
    quotas = ctx.config().proxy.quotas
    zone = zoneinfo.ZoneInfo(quotas.timezone)
    now = time.time()
    current = (period(DAY, now, zone).label, period(MONTH, now, zone).label)
    if not quotas.database.exists():
        fail(f"no usage recorded yet ({quotas.database} does not exist)", None, 1)
    try:
        rows = read_usage(quotas.database, () if every_period else current)
    except sqlite3.Error as exc:
        fail(f"cannot read {quotas.database}: {exc}", "is it a stockade usage database?", 1)
    if consumer is not None:
        rows = [row for row in rows if row.consumer == consumer]
    records = []
    for row in rows:
        plan = quotas.plan(row.plan)
        kind = DAY if len(row.period) == 10 else MONTH
        quota = (plan.per_day if kind == DAY else plan.per_month) if plan is not None else 0
        records.append(
            {
                "consumer": row.consumer,
                "plan": row.plan,
                "period": kind,
                "start": row.period,
                "used": row.count,
                "quota": quota or None,
                "remaining": max(0, quota - row.count) if quota else None,
                "updated": round(row.updated, 3),
            }
        )
    if as_json:
        emit_json({"timezone": quotas.timezone, "usage": records})
        return
    if not records:
        click.echo("no usage" + (f" for {consumer}" if consumer else "") + " in these periods")
        return
    table(
        ("consumer", "plan", "period", "used", "quota", "remaining"),
        [
            (
                r["consumer"],
                r["plan"],
                f"{r['period']} {r['start']}",
                r["used"],
                r["quota"] or "-",
                "-" if r["remaining"] is None else r["remaining"],
            )
            for r in records
        ],
    )
