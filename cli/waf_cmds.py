"""`stockade waf tune`: exclusions proposed from what a route's WAF recorded (see
proxy/waf/tuning.py for how they are chosen)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from stockade.cli.context import Context, fail, json_option, pass_ctx
from stockade.cli.output import emit_json, table
from stockade.config import ConfigError, ConfigPermissionError, load_config, resolve_path
from stockade.proxy.settings import ProxyConfig, Route
from stockade.proxy.waf.tuning import (
    MAX_ARGUMENTS,
    Proposal,
    TuneError,
    TuneRecord,
    Tuning,
    WriteError,
    analyse,
    exclusion_table,
    rule_messages,
    with_exclusions,
    write_config,
)
from stockade.proxy.waf_settings import ENGINE_MODES


@click.group(
    "waf",
    epilog="Examples:\n\n  stockade waf tune --route api --log /var/log/stockade/access.log\n\n"
    "  stockade waf tune --route api --write",
)
def waf_group() -> None:
    """The web application firewall: tune a route from what detect mode recorded."""


def _route(proxy: ProxyConfig, name: str) -> Route:
    for route in proxy.routes:
        if route.name == name:
            if route.waf.mode not in ENGINE_MODES:
                fail(
                    f'route {name!r} has waf = "{route.waf.mode}"',
                    'tuning is for routes with waf = "crs" or "sqli_xss"',
                    2,
                )
            return route
    names = ", ".join(r.name for r in proxy.routes) or "none"
    fail(f"no route named {name!r} (routes: {names})", None, 2)


def _log_path(proxy: ProxyConfig, given: Path | None) -> Path:
    if given is not None:
        return given
    if proxy.access_log == "-":
        fail(
            'the access log goes to stderr ([proxy] access_log = "-")',
            "save it to a file (journalctl -u stockade-proxy -o cat > access.log) and pass "
            "--log access.log",
            2,
        )
    return Path(proxy.access_log)


def _records(path: Path) -> Iterator[TuneRecord]:
    from stockade.proxy.replay import read_log  # aiohttp: only when needed

    with path.open(encoding="utf-8", errors="replace") as lines:
        for record in read_log(lines):
            if record is not None:
                yield record.for_tuning()


def _messages(proxy: ProxyConfig, mode: str) -> dict[str, str]:
    """Rule id -> msg of the mode's rule files (for the reasons written); best effort."""
    from stockade.proxy.waf.rulesets import crs_files

    files = crs_files(proxy.waf.crs) if mode == "crs" else [proxy.waf.sqli_xss_rules]
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    return rule_messages(texts)


def _tuned(proxy: ProxyConfig, route: Route, proposals: list[Proposal]) -> ProxyConfig:
    """The config with the proposals added and the route blocking (what the replay shows)."""
    policy = replace(with_exclusions(route.waf, proposals), action="block")
    routes = tuple(replace(r, waf=policy) if r.name == route.name else r for r in proxy.routes)
    return replace(proxy, routes=routes)


def _check_written(route: str, count: int) -> Any:
    def check(path: Path) -> None:
        try:
            config = load_config(path)
        except ConfigError as exc:
            raise WriteError(f"the edited config does not load: {exc}") from None
        tuned = [r for r in config.proxy.routes if r.name == route]
        if len(tuned) != 1 or len(tuned[0].waf.exclusions) < count:
            raise WriteError("the edited config does not have the new exclusions")
        from stockade.proxy.waf.firewall import WafLoadError, check_waf

        try:
            check_waf(config.proxy)
        except WafLoadError as exc:
            raise WriteError(f"the edited config's rules do not load: {exc}") from None

    return check


@waf_group.command(
    "tune",
    epilog="Examples:\n\n  stockade waf tune --route api --log /var/log/stockade/access.log\n\n"
    "  stockade waf tune --route api --json\n\n"
    "  stockade waf tune --route api --write\n\n"
    "  stockade waf tune --route api --rule 942360 --write   # only 942360, whole-rule too",
)
@click.option("--route", "route_name", required=True, help="The route to tune.")
@click.option(
    "--log",
    "log_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The JSON access log (default: [proxy] access_log).",
)
@click.option(
    "--attack-score",
    type=click.IntRange(1, 100_000),
    help="Other rules' points that mark a request as a likely attack "
    "(default: twice the anomaly threshold).",
)
@click.option(
    "--max-arguments",
    default=MAX_ARGUMENTS,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Distinct arguments of a rule before its names may count as unbounded.",
)
@click.option(
    "--rule",
    "rules",
    multiple=True,
    help="Only this rule id (repeatable); a whole-rule proposal is written only when named.",
)
@click.option("--write", is_flag=True, help="Add the proposals to the config file.")
@click.option(
    "--replay/--no-replay",
    default=True,
    show_default=True,
    help="Replay the log through the tuned config (route in block mode).",
)
@json_option
@pass_ctx
def tune(
    ctx: Context,
    route_name: str,
    log_path: Path | None,
    attack_score: int | None,
    max_arguments: int,
    rules: tuple[str, ...],
    write: bool,
    replay: bool,
    as_json: bool,
) -> None:
    """Propose WAF exclusions for a route from the findings its detect mode recorded.

    Reads the access log's `waf` records of the route (rule, variable, points; never a
    value), groups them by rule and argument, and proposes the narrowest exclusion
    that lets the benign-looking requests through: the rule on one argument; the whole
    rule only where arguments vary without bound or the variable is not an argument.
    A (rule, variable) that also fired on likely attacks (other rules scored at least
    --attack-score) is never proposed. With --write the proposals are added to the
    config as [[proxy.routes.waf_exclusions]] tables after the route (the file is
    checked, backed up and replaced atomically); `stockade reload` applies them.
    See docs/proxy.md, "Tuning".
    """
    for rule in rules:
        if not rule.isascii() or not rule.isdigit() or len(rule) > 12:
            fail(f"--rule {rule!r} is not a rule id", "give the number, e.g. --rule 942360", 2)
    config = ctx.config()
    proxy = config.proxy
    route = _route(proxy, route_name)
    threshold = proxy.waf.crs.anomaly_threshold
    log = _log_path(proxy, log_path)
    try:
        tuning = analyse(
            _records(log),
            route.name,
            route.waf,
            threshold,
            attack_score or 2 * threshold,
            _messages(proxy, route.waf.mode),
            max_arguments,
        )
    except FileNotFoundError:
        fail(f"no access log at {log}", "pass --log FILE", 2)
    except OSError as exc:
        fail(f"cannot read {log}: {exc.strerror}", None, 2 if log_path is not None else 1)
    except TuneError as exc:
        fail(str(exc), None, 2)
    if rules:
        tuning.proposals = [p for p in tuning.proposals if p.rule in rules]
    chosen = tuning.chosen(set(rules))
    result = tuning.as_json(route.waf, set(rules))
    replayed = _replayed(proxy, route, chosen, log, ctx.verbose) if replay and chosen else None
    result["replay"] = replayed
    result["written"] = None
    if write and chosen:
        path, _ = resolve_path(ctx.config_path)
        try:
            check = _check_written(route.name, len(route.waf.exclusions) + len(chosen))
            written = write_config(path, route.name, chosen, check)
        except ConfigPermissionError as exc:
            fail(str(exc), None, 1)
        except WriteError as exc:
            fail(str(exc), f"nothing was changed; add the tables by hand ({path})", 1)
        except OSError as exc:
            fail(f"cannot write {path}: {exc.strerror}", "nothing was changed", 1)
        result["written"] = {"config": str(written.config), "backup": str(written.backup)}
    if as_json:
        emit_json(result)
        return
    _print(tuning, result, chosen, write)


def _replayed(
    proxy: ProxyConfig, route: Route, chosen: list[Proposal], log: Path, verbose: bool
) -> dict[str, Any]:
    from stockade.proxy.replay import ReplayError, replay_file

    # the replay builds a whole gateway: its start-up lines are not this command's output
    quiet = logging.getLogger("stockade.proxy")
    level = quiet.level
    if not verbose:
        quiet.setLevel(logging.WARNING)
    try:
        report = replay_file(_tuned(proxy, route, chosen), log)
    except ReplayError as exc:
        fail(str(exc), None, 1)
    finally:
        quiet.setLevel(level)
    return report.as_json(20)


def _print(tuning: Tuning, result: dict[str, Any], chosen: list[Proposal], write: bool) -> None:
    click.echo(
        f"route {tuning.route} ({tuning.mode}, {tuning.action}): {tuning.requests} requests "
        f"recorded, {len(tuning.flagged)} flagged under the current config "
        f"(anomaly threshold {tuning.threshold}, likely attacks: other rules >= "
        f"{tuning.attack_score})"
    )
    if tuning.already_passing:
        click.echo(f"  {tuning.already_passing} flagged when recorded pass with today's exclusions")
    if tuning.unreadable:
        click.echo(f"  {tuning.unreadable} flagged without recorded matches (older log lines)")
    if result["unnamed_points"]:
        click.echo(
            f"  {result['unnamed_points']} scored on variables the engine's log does not name "
            "(a rule that matched several); after applying, record again and re-run"
        )
    if tuning.proposals:
        click.echo("\nProposed:")
        table(
            ("rule", "scope", "argument", "requests", "clients", "passes", "samples"),
            [
                (
                    p.rule,
                    p.scope,
                    ", ".join(p.arguments) or "(all)",
                    p.requests,
                    p.clients,
                    p.would_pass,
                    " ".join(p.samples[:3]),
                )
                for p in tuning.proposals
            ],
        )
        for p in tuning.proposals:
            if not p.arguments:
                click.echo(f"  {p.rule}: {p.why}")
    else:
        click.echo("\nNothing to propose.")
    contested = [d for d in tuning.declined if d.benign]
    if contested:
        click.echo("\nNot proposed, though they misfired:")
        table(
            ("rule", "variable", "benign", "requests", "why", "samples"),
            [
                (d.rule, d.variable[:60], d.benign, d.requests, d.why, " ".join(d.samples[:2]))
                for d in contested
            ],
        )
    if tuning.attacks:
        click.echo(
            f"\n{len(tuning.attacks)} likely attacks (other rules scored >= "
            f"{tuning.attack_score}) stay flagged: {' '.join(tuning.attacks[:3])}"
            + (" ..." if len(tuning.attacks) > 3 else "")
        )
    if write and not chosen:
        click.echo("\nNothing to write.")
    if chosen:
        click.echo(
            f"\nWith the {len(chosen)} chosen: {result['would_pass']} of the flagged requests "
            f"pass, {result['still_flagged']} stay flagged"
            + (f" ({' '.join(result['still_flagged_samples'])})" if result["still_flagged"] else "")
        )
        replayed = result["replay"]
        if replayed is not None:
            changes = ", ".join(f"{k}: {v}" for k, v in replayed["by_change"].items()) or "none"
            click.echo(f'Replayed with them and waf_action = "block": changes {changes}')
        written = result["written"]
        if written is not None:
            click.echo(
                f"\nWritten to {written['config']} (backup {written['backup']}); "
                "apply with `stockade reload`"
            )
        elif not write:
            click.echo("\n--write adds:\n")
            for proposal in chosen:
                click.echo(exclusion_table(proposal))
