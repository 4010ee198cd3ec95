"""The `stockade` command line.

Exit codes: 0 success, 1 runtime failure, 2 bad input; `stockade status`
exits 3 when it printed that bans are not in the kernel. Errors are one line
that names the problem and the next step; `-v` shows details.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click

from stockade import __version__, logs
from stockade.cli import output
from stockade.cli.apikey_cmds import apikey_group
from stockade.cli.ban_batch import ban_file, unban_all, unban_file
from stockade.cli.client import call
from stockade.cli.cluster_status import cluster_lines
from stockade.cli.completion_cmd import completion
from stockade.cli.context import (
    ENV_SOCKET,
    Context,
    check_target,
    command_help,
    fail,
    json_option,
    pass_ctx,
)
from stockade.cli.controller_cmds import attach, controller, detach
from stockade.cli.lab import lab_group
from stockade.cli.proxy_cmds import proxy, run_all
from stockade.cli.reload_cmd import reload_cmd
from stockade.cli.replay_cmd import replay_cmd
from stockade.cli.rules_cmds import explain, rule_group
from stockade.cli.top_cmd import top
from stockade.cli.usage_cmds import usage
from stockade.cli.waf_cmds import waf_group
from stockade.config import ConfigError, ConfigPermissionError, load_config, resolve_path
from stockade.controller.layout import reason_names
from stockade.durations import DurationError, parse_duration
from stockade.protocol import EXIT_CODES, CommandError
from stockade.proxy.status import read_status

# `stockade status`: the controller runs, but bans in the store are not in the kernel.
STATUS_NOT_ENFORCED = 3


class _UsageLine(click.UsageError):
    """A usage error printed like every other error: one line, then the next step."""

    def show(self, file: IO[Any] | None = None) -> None:
        hint = f"; see `{self.ctx.command_path} --help`" if self.ctx is not None else ""
        message = self.format_message().rstrip(".")
        click.echo(f"stockade: {message}{hint}", file=file, err=True)


@contextmanager
def _one_line_usage() -> Iterator[None]:
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # a bare group prints its help
    except _UsageLine:
        raise
    except click.UsageError as exc:
        raise _UsageLine(exc.format_message(), exc.ctx) from None


class _Group(click.Group):
    """The root group: usage errors anywhere below it exit 2 with one line."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_usage():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage():
            return super().invoke(ctx)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Examples:\n\n  stockade ban 198.18.0.7 --ttl 1h --reason scanner\n\n"
    "  stockade bans --json\n\n  stockade controller run --config /etc/stockade/stockade.toml",
)
@click.version_option(__version__, prog_name="stockade")
@click.option(
    "--config",
    "config_path",
    # readable=False: an unreadable file is a permission problem (exit 1), said when read
    type=click.Path(path_type=Path, dir_okay=False, readable=False),
    envvar="STOCKADE_CONFIG",
    help="Config file (default /etc/stockade/stockade.toml).",
)
@click.option(
    "--socket",
    "socket_path",
    # readable=False: a socket is connected to, not read; permission is checked then (exit 1)
    type=click.Path(path_type=Path, dir_okay=False, readable=False),
    envvar=ENV_SOCKET,
    help="Control socket (default from the config: /run/stockade/control.sock).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log details.")
@click.pass_context
def cli(
    ctx: click.Context, config_path: Path | None, socket_path: Path | None, verbose: bool
) -> None:
    """stockade: an edge security gateway with an XDP fast path."""
    logs.setup(verbose)  # text; `controller run` and `proxy run` apply the config's log_format
    ctx.obj = Context(config_path, socket_path, verbose)


# -- bans -------------------------------------------------------------------
@cli.command(
    help=command_help("ban"),
    epilog="Examples:\n\n  stockade ban 198.18.0.7 --ttl 15m\n\n"
    "  stockade ban 198.18.4.0/24 --reason 'botnet range'\n\n  stockade ban fd00:18::/64 --ttl 7d",
)
@click.argument("target", required=False)
@click.option("--ttl", help="How long: 90s, 15m, 1h, 7d. Default: permanent.")
@click.option("--reason", help="Why; shown in `stockade bans`.")
@click.option(
    "--file",
    "file",
    metavar="FILE",
    help="Ban every target in FILE (`-`: stdin), all or nothing: a target a line, "
    "optionally a TTL (`-`: --ttl) and a reason, or JSON lines; --ttl and --reason are "
    "the defaults.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Accept a prefix broader than xdp.min_prefix_v4/v6 (default /8, /16).",
)
@json_option
@pass_ctx
def ban(
    ctx: Context,
    target: str | None,
    ttl: str | None,
    reason: str | None,
    file: str | None,
    force: bool,
    as_json: bool,
) -> None:
    if (target is None) == (file is None):
        fail("give a TARGET or --file FILE", "see `stockade ban --help`", 2)
    if ttl is not None:
        try:
            parse_duration(ttl)
        except DurationError as exc:
            fail(str(exc), None, 2)
    if file is not None:
        ban_file(ctx, file, ttl, reason, force, as_json)
        return
    assert target is not None
    canonical = check_target(target)
    result = ctx.call("ban", target=canonical, ttl=ttl, reason=reason, force=force or None)
    if as_json:
        output.emit_json(result)
        return
    click.echo(
        f"{result['status']}: {result['target']} banned, expires {output.expiry(result['expires'])}"
    )


@cli.command(
    help=command_help("unban"),
    epilog="Examples:\n\n  stockade unban 198.18.0.7\n\n  stockade unban --file bans.txt\n\n"
    "  stockade unban --all --source proxy\n\n  stockade unban --all --reason-match scanner",
)
@click.argument("target", required=False)
@click.option(
    "--file",
    "file",
    metavar="FILE",
    help="Lift the ban on every target in FILE (`-`: stdin; the format of `ban --file`), "
    "all or nothing: each must be banned.",
)
@click.option("--all", "all_bans", is_flag=True, help="Lift every ban that matches the filters.")
@click.option("--source", help="With --all: only bans from this source (cli, proxy, rule, ...).")
@click.option("--reason-match", help="With --all: only bans whose reason contains this (any case).")
@click.option("--force", is_flag=True, help="With --all and no filter: lift every ban.")
@json_option
@pass_ctx
def unban(
    ctx: Context,
    target: str | None,
    file: str | None,
    all_bans: bool,
    source: str | None,
    reason_match: str | None,
    force: bool,
    as_json: bool,
) -> None:
    if sum((target is not None, file is not None, all_bans)) != 1:
        fail("give a TARGET, --file FILE or --all", "see `stockade unban --help`", 2)
    if not all_bans and (source is not None or reason_match is not None or force):
        fail("--source, --reason-match and --force go with --all", None, 2)
    if file is not None:
        unban_file(ctx, file, as_json)
        return
    if all_bans:
        unban_all(ctx, source, reason_match, force, as_json)
        return
    assert target is not None
    result = ctx.call("unban", target=check_target(target))
    if as_json:
        output.emit_json(result)
        return
    click.echo(f"removed: {result['target']} is no longer banned")


@cli.command(
    help=command_help("bans"),
    epilog="Examples:\n\n  stockade bans --json | jq '.[].target'\n\n"
    "  stockade bans --source rule --filter 198.18.",
)
@click.option("--source", help="Only bans from this source (cli, proxy, cluster, rule).")
@click.option(
    "--filter", "filter", metavar="TEXT", help="Only bans whose target or reason contains TEXT."
)
@json_option
@pass_ctx
def bans(ctx: Context, source: str | None, filter: str | None, as_json: bool) -> None:
    result = ctx.call("bans", source=source, filter=filter)
    if as_json:
        output.emit_json(result)
        return
    if not result:
        click.echo("no bans")
        return
    output.table(
        ("target", "expires", "kernel", "packets", "bytes", "source", "reason"),
        [
            (
                b["target"],
                output.expiry(b["expires"]),
                "yes" if b.get("in_kernel", True) else "NO",
                output.count(b["packets"]),
                output.count(b["bytes"]),
                b["source"],
                b["reason"],
            )
            for b in result
        ],
    )
    missing = sum(1 for b in result if not b.get("in_kernel", True))
    if missing:
        click.secho(
            f"{missing} of these bans are NOT in the kernel (KERNEL = NO: a map is full): "
            "their packets pass; see `stockade status`",
            fg="red",
        )


# -- allowlist ----------------------------------------------------------------
@cli.group(
    help="Addresses that always pass, even when banned.",
    epilog="Examples:\n\n  stockade allow add 198.18.0.0/28 --reason office\n\n"
    "  stockade allow list --json",
)
def allow() -> None:
    pass


@allow.command(
    "add", help=command_help("allow.add"), epilog="Example:\n\n  stockade allow add 198.18.0.0/28"
)
@click.argument("target")
@click.option("--reason", help="Why; shown in `stockade allow list`.")
@click.option(
    "--force",
    is_flag=True,
    help="Accept a prefix broader than xdp.min_prefix_v4/v6 (default /8, /16).",
)
@json_option
@pass_ctx
def allow_add(ctx: Context, target: str, reason: str | None, force: bool, as_json: bool) -> None:
    result = ctx.call("allow.add", target=check_target(target), reason=reason, force=force or None)
    if as_json:
        output.emit_json(result)
        return
    click.echo(f"{result['status']}: {result['target']} always passes")
    if result["shadowed_bans"]:
        click.echo(f"note: these bans no longer apply: {', '.join(result['shadowed_bans'])}")


@allow.command(
    "remove",
    help=command_help("allow.remove"),
    epilog="Example:\n\n  stockade allow remove 198.18.0.0/28",
)
@click.argument("target")
@json_option
@pass_ctx
def allow_remove(ctx: Context, target: str, as_json: bool) -> None:
    result = ctx.call("allow.remove", target=check_target(target))
    if as_json:
        output.emit_json(result)
        return
    click.echo(f"removed: {result['target']} is no longer allowlisted")


@allow.command(
    "list", help=command_help("allow.list"), epilog="Example:\n\n  stockade allow list --json"
)
@json_option
@pass_ctx
def allow_list(ctx: Context, as_json: bool) -> None:
    result = ctx.call("allow.list")
    if as_json:
        output.emit_json(result)
        return
    if not result:
        click.echo("allowlist is empty")
        return
    output.table(
        ("target", "packets", "source", "reason"),
        [(a["target"], output.count(a["packets"]), a["source"], a["reason"]) for a in result],
    )


# -- observing ------------------------------------------------------------------
@cli.command(help=command_help("stats"), epilog="Example:\n\n  stockade stats --json")
@json_option
@pass_ctx
def stats(ctx: Context, as_json: bool) -> None:
    result = ctx.call("stats")
    if as_json:
        output.emit_json(result)
        return
    reasons = result["reasons"]
    order = [name for name in reason_names() if name in reasons]
    order += sorted(set(reasons) - set(order))
    output.table(
        ("reason", "packets", "bytes"),
        [(name, reasons[name]["packets"], reasons[name]["bytes"]) for name in order],
    )
    click.echo(f"SYN-rate events: {result['events']['syn_rate']}, lost: {result['events']['lost']}")


@cli.command(help=command_help("status"), epilog="Example:\n\n  stockade status --json")
@json_option
@pass_ctx
def status(ctx: Context, as_json: bool) -> None:
    workers = read_status(ctx.config().proxy.status_dir)
    try:
        result = call(ctx.socket, "status")
    except CommandError as exc:
        # The proxy's state is still worth showing when the controller is away.
        if workers and not as_json:
            _print_proxy_status(workers)
        fail(exc.message, exc.hint, EXIT_CODES.get(exc.kind, 1))
    result["proxy"] = {"workers": workers}
    if as_json:
        output.emit_json(result)
        if result["bans"].get("not_in_kernel", 0):
            sys.exit(STATUS_NOT_ENFORCED)
        return
    program = result["program"]
    click.echo(f"controller: running (pid {result['pid']}, version {result['version']})")
    click.echo(f"program:    id {program['id']}, maps in {program['pin_dir']}")
    click.echo(f"mode:       {'MONITOR (nothing dropped)' if result['monitor'] else 'enforcing'}")
    for iface in result["interfaces"]:
        if "error" in iface:
            click.echo(f"interface:  {iface['name']}: {iface['error']}")
        elif iface.get("detached") and not iface["ours"]:
            name = iface["name"]
            click.echo(
                f"interface:  {name}: DETACHED on purpose (`stockade detach`), NOT filtered; "
                f"`stockade attach {name}` re-attaches it"
            )
        else:
            mark = "" if iface["ours"] else " (NOT our program)"
            click.echo(
                f"interface:  {iface['name']}: {iface['mode']} XDP, prog {iface['prog_id']}{mark}"
            )
    b = result["bans"]
    click.echo(
        f"bans:       {b['total']} ({b['exact']} exact, {b['prefix']} prefix; "
        f"{b['ipv4']} IPv4, {b['ipv6']} IPv6)"
    )
    missing = b.get("not_in_kernel", 0)
    if missing:
        click.secho(
            f"            {missing} NOT IN THE KERNEL: their packets pass (a map is full; "
            "`stockade bans` marks them, the sweep adds them as room appears)",
            fg="red",
        )
    maps = result.get("maps", {})
    if maps:
        click.echo("maps:       " + ", ".join(_map_fill(name, m) for name, m in maps.items()))
    click.echo(f"allowlist:  {result['allows']} entries")
    r = result["syn_rate"]
    rate = f"{r['rate']}/s burst {r['burst']}" if r["rate"] else "off"
    click.echo(f"SYN rate:   {rate}, IPv6 grouped by /{r['ipv6_prefix']}, {r['events']} events")
    for line in cluster_lines(result["cluster"]):
        click.echo(line)
    _print_proxy_status(workers)
    if missing:
        sys.exit(STATUS_NOT_ENFORCED)


def _map_fill(name: str, fill: dict[str, int]) -> str:
    entries, size = fill["entries"], fill["max_entries"]
    return f"{name} {entries}/{size}" + (" FULL" if entries >= size else "")


def _print_proxy_status(workers: list[dict[str, Any]]) -> None:
    if not workers:
        click.echo("proxy:      not running")
        return
    click.echo(
        f"proxy:      {len(workers)} workers (pids {', '.join(str(w['pid']) for w in workers)})"
    )
    # Every worker checks every server; a server is shown healthy when all agree.
    pools: dict[str, dict[str, dict[str, Any]]] = {}
    for worker in workers:
        for pool, servers in worker["pools"].items():
            for server in servers:
                row = pools.setdefault(pool, {}).setdefault(
                    server["address"], {"healthy": True, "ejected": False, "requests": 0}
                )
                row["healthy"] = row["healthy"] and server["healthy"]
                row["ejected"] = row["ejected"] or server["ejected"] > 0
                row["requests"] += server["requests"]
    for pool, servers in sorted(pools.items()):
        for address, row in servers.items():
            state = "UP" if row["healthy"] and not row["ejected"] else "DOWN"
            if row["healthy"] and row["ejected"]:
                state = "EJECTED"
            click.echo(f"  pool {pool}: {address} {state}, {row['requests']} requests")


@cli.command(
    "check-config",
    epilog="Examples:\n\n  stockade check-config\n\n"
    "  stockade check-config /etc/stockade/stockade.toml.new\n\n"
    "  stockade --config ./stockade.toml check-config",
)
@click.argument("file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@pass_ctx
def check_config(ctx: Context, file: Path | None) -> None:
    """Validate a config file without starting anything: syntax, types, unknown keys,
    CIDRs, and every file it names - certificates matching their keys, API keys, JWT
    keys, rate maps, the User-Agent list, WAF rules and OpenAPI documents (exit 2 on
    the first problem). FILE defaults to the --config file."""
    target = file if file is not None else ctx.config_path
    path, asked = resolve_path(target)
    try:
        config = load_config(target)
    except ConfigPermissionError as exc:
        fail(str(exc), None, 1)
    except ConfigError as exc:
        fail(str(exc), None, 2)
    # deferred: the proxy's modules (aiohttp, ModSecurity, openapi-core) are slow to import
    from stockade.proxy.preflight import check_as_worker
    from stockade.proxy.workers import ProxyStartupError, validate

    try:  # what the proxy's master checks before it starts or reloads
        if config.proxy.user is not None and os.geteuid() == 0:
            # as the workers' user, as the master does: a file only root can open fails here
            check_as_worker(config.proxy, validate, lambda: False)
        else:
            validate(config.proxy)
    except ProxyStartupError as exc:
        fail(str(exc), "fix what it names", 2)
    if asked or path.exists():
        click.echo(f"ok: {path} is valid")
    else:
        click.echo(f"ok: no config at {path}; the defaults apply")


cli.add_command(explain)
cli.add_command(rule_group, "rule")
cli.add_command(controller)
cli.add_command(detach)
cli.add_command(attach)
cli.add_command(proxy)
cli.add_command(run_all)
cli.add_command(apikey_group, "apikey")
cli.add_command(usage)
cli.add_command(reload_cmd)
cli.add_command(replay_cmd)
cli.add_command(completion)
cli.add_command(lab_group, "lab")
cli.add_command(top)
cli.add_command(waf_group, "waf")


def main() -> None:
    try:
        cli(prog_name="stockade")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
