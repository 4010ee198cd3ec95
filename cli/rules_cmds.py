"""`stockade explain TARGET` and `stockade rule ban`: why a target is dropped, rule bans."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from stockade.cli import output
from stockade.cli.context import (
    AsciiNumber,
    Context,
    check_target,
    command_help,
    fail,
    json_option,
    pass_ctx,
)
from stockade.durations import DurationError, format_duration, parse_duration
from stockade.proxy.status import read_status
from stockade.targets import TargetError, covers, parse_target

HEADLINES = {
    "banned": "BANNED: its packets are dropped",
    "allowlisted": "ALLOWLISTED: it always passes, bans or not",
    "not_banned": "not banned",
    "not_in_kernel": "NOT ENFORCED: banned in the store, but no ban that covers it is in the "
    "kernel (a map is full): its packets pass",
}


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + "Z"


def _details(details: Any) -> str:
    # ensure_ascii: nothing recorded can reach the terminal as a control sequence
    return json.dumps(details, sort_keys=True, separators=(", ", ": "))


@click.command(
    help=command_help("explain"),
    epilog="Examples:\n\n  stockade explain 198.18.0.7\n\n  stockade explain fd00:18::/64 --json",
)
@click.argument("target")
@json_option
@pass_ctx
def explain(ctx: Context, target: str, as_json: bool) -> None:
    result = ctx.call("explain", target=check_target(target))
    result["proxy"] = {"penalties": proxy_penalties(ctx, result["target"])}
    if as_json:
        output.emit_json(result)
        return
    headline = f"{result['target']}: {HEADLINES.get(result['verdict'], result['verdict'])}"
    click.secho(headline, fg="red" if result["verdict"] == "not_in_kernel" else None)
    if result["allowed_by"]:
        for allow in result["allowed_by"]:
            click.echo(f"  allowed by {allow['target']} ({allow['source']}: {allow['reason']})")
    else:
        click.echo("  no allowlist entry or management network covers it")
    if not result["bans"]:
        click.echo("  no active ban covers it")
    for ban in result["bans"]:
        by = f"rule {ban['rule']}" if ban["rule"] else f"source {ban['source']}"
        click.echo(
            f"  banned as {ban['target']} ({ban['match']}) by {by}, "
            f"expires {output.expiry(ban['expires'])}"
        )
        if not ban.get("in_kernel", True):
            click.secho(
                "    NOT IN THE KERNEL: its map is full; the sweep adds it when room appears",
                fg="red",
            )
        click.echo(f"    reason:  {ban['reason']}")
        if ban["details"] is not None:
            click.echo(f"    details: {_details(ban['details'])}")
    for penalty in result["proxy"]["penalties"]:
        click.echo(
            f"  proxy: rule {penalty['rule']} ({penalty['action']}) on {penalty['subject']} "
            f"until {_when(penalty['until'])}: {_details(penalty['counters'])}"
        )
    history = result["history"]
    if not history:
        click.echo("history: none")
        return
    click.echo(f"history (newest first, last {len(history)}):")
    for event in history:
        by = f"rule {event['rule']}" if event["rule"] else event["source"]
        ttl = ""
        if event["action"] == "ban":
            ttl = " permanent" if event["ttl"] is None else f" for {format_duration(event['ttl'])}"
        click.echo(f"  {_when(event['at'])}  {event['action']}{ttl} ({by}): {event['reason']}")


def proxy_penalties(ctx: Context, target: str) -> list[dict[str, Any]]:
    """What the proxy's anomaly rules are doing to addresses inside `target` now
    (from the workers' status files; empty when the proxy is not running)."""
    net = parse_target(target)
    now = time.time()
    found = []
    for worker in read_status(ctx.config().proxy.status_dir):
        for firing in worker.get("anomaly", {}).get("recent", []):
            try:
                inside = covers(net, parse_target(firing["subject"]))
            except TargetError:  # a consumer, not an address
                continue
            if inside and firing["until"] > now:
                found.append(firing)
    return sorted(found, key=lambda f: f["at"], reverse=True)


@click.group(
    "rule",
    help="Bans as the proxy's anomaly rules push them (repeat offenders get longer bans).",
    epilog="Example:\n\n  stockade rule ban 198.18.0.7 --ttl 10m --rule scanner",
)
def rule_group() -> None:
    pass


def _check_duration(name: str, text: str | None) -> None:
    if text is not None:
        try:
            parse_duration(text)
        except DurationError as exc:
            fail(f"{name}: {exc}", None, 2)


@rule_group.command(
    "ban",
    help=command_help("rule.ban"),
    epilog="Examples:\n\n  stockade rule ban 198.18.0.7 --ttl 10m --rule scanner\n\n"
    "  stockade rule ban 198.18.0.7 --ttl 10m --rule scanner --factor 3 --max-ttl 7d "
    "--details '{\"distinct_404_paths\": 31}'",
)
@click.argument("target")
@click.option("--ttl", required=True, help="The ban of a first offence: 90s, 15m, 1h, 7d.")
@click.option("--rule", required=True, help="The rule's name.")
@click.option("--reason", help="Why; default `rule NAME`.")
@click.option("--details", help="A JSON object kept with the ban (what fired the rule).")
@click.option("--factor", type=AsciiNumber(), help="Growth per earlier offence (default 2).")
@click.option("--max-ttl", help="The longest ban escalation gives (default 1d).")
@click.option("--memory", help="How far back earlier rule bans count (default 7d).")
@json_option
@pass_ctx
def rule_ban(
    ctx: Context,
    target: str,
    ttl: str,
    rule: str,
    reason: str | None,
    details: str | None,
    factor: float | None,
    max_ttl: str | None,
    memory: str | None,
    as_json: bool,
) -> None:
    canonical = check_target(target)
    for name, value in (("ttl", ttl), ("max_ttl", max_ttl), ("memory", memory)):
        _check_duration(name, value)
    recorded: Any = None
    if details is not None:
        try:
            recorded = json.loads(details)
        except (json.JSONDecodeError, RecursionError):
            fail("--details is not valid JSON", "give an object such as '{\"hits\": 3}'", 2)
        if not isinstance(recorded, dict):
            fail("--details must be a JSON object", "give an object such as '{\"hits\": 3}'", 2)
    result = ctx.call(
        "rule.ban",
        target=canonical,
        ttl=ttl,
        rule=rule,
        reason=reason,
        details=recorded,
        factor=factor,
        max_ttl=max_ttl,
        memory=memory,
    )
    if as_json:
        output.emit_json(result)
        return
    status = result["status"]
    if status == "allowlisted":
        click.echo(f"allowlisted: {result['target']} is inside {result['allowed_by']}; not banned")
    elif status == "already_banned":
        click.echo(
            f"already banned: {result['target']} is covered by {result['banned_by']}, "
            f"which expires {output.expiry(result['expires'])}; kept"
        )
    else:
        click.echo(
            f"{status}: {result['target']} banned for {format_duration(result['ttl'])} "
            f"(offence {result['offence']}), expires {output.expiry(result['expires'])}"
        )
