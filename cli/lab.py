"""`stockade lab up|down|status`: the network-namespace lab for tests and the demo."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, NoReturn

import click

from stockade.lab import topology


def _fail(message: str, code: int) -> NoReturn:
    """One line on stderr, then exit: 2 for bad input, 1 for a runtime failure."""
    click.echo(f"stockade lab: {message}", err=True)
    raise SystemExit(code)


def _run(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except (topology.InvalidPrefixError, topology.LabExistsError) as exc:
        _fail(str(exc), 2)
    except topology.LabError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        _fail(f"{exc}; run `stockade lab down --prefix PREFIX` to clean up what was left", 1)


def _check_prefix(prefix: str | None) -> None:
    if prefix is not None:
        _run(lambda: topology.check_prefix(prefix))


@click.group("lab", epilog="Examples:\n\n  stockade lab up\n\n  stockade lab down --all")
def lab_group() -> None:
    """Throwaway network namespaces: client, gateway (XDP) and upstream API.

    Every name carries a per-run prefix; `down` removes all of it, also after
    a crash. Addresses come from 198.18.0.0/15 and fd00::/8 only.

    \b
    Examples:
      stockade lab up                 # new lab with a fresh prefix
      stockade lab up --prefix demo1 --json
      stockade lab status
      stockade lab down --prefix demo1
      stockade lab down --all
    """


@lab_group.command(
    "up",
    epilog="Examples:\n\n  stockade lab up\n\n  stockade lab up --prefix demo1 --json",
)
@click.option("--prefix", help="Name prefix, 1-8 of a-z 0-9 (default: a fresh stkXXXX).")
@click.option("--no-upstream", is_flag=True, help="Do not start the upstream HTTP API.")
@click.option("--json", "as_json", is_flag=True, help="Print the lab as JSON.")
def up_command(prefix: str | None, no_upstream: bool, as_json: bool) -> None:
    """Build a lab and print its prefix, namespaces and addresses."""
    _check_prefix(prefix)
    started = time.monotonic()
    lab: topology.Lab = _run(lambda: topology.up(prefix, start_upstream=not no_upstream))
    if as_json:
        click.echo(json.dumps(lab.to_dict(), indent=2, sort_keys=True))
        return
    upstream = (
        f"pid {lab.upstream_pid}, {lab.upstream_url()} and {lab.upstream_url(v6=True)}"
        if lab.upstream_pid
        else "not started"
    )
    click.echo(
        f"lab {lab.prefix} is up ({time.monotonic() - started:.1f}s)\n"
        f"  client   {lab.client_ns:<14} {topology.CLIENT_IF}: "
        f"{', '.join(topology.CLIENT_V4)}\n"
        f"  {'':<23}     {', '.join(topology.CLIENT_V6)}\n"
        f"  gateway  {lab.gateway_ns:<14} {lab.gateway_if}: "
        f"{topology.GATEWAY_V4}, {topology.GATEWAY_V6}  (XDP interface)\n"
        f"  {'':<23} {topology.GATEWAY_UPSTREAM_IF}: "
        f"{topology.GATEWAY_UPSTREAM_V4}, {topology.GATEWAY_UPSTREAM_V6}\n"
        f"  upstream {lab.upstream_ns:<14} {topology.UPSTREAM_IF}: "
        f"{topology.UPSTREAM_V4}, {topology.UPSTREAM_V6}\n"
        f"  upstream API: {upstream}\n"
        f"remove it with: stockade lab down --prefix {lab.prefix}"
    )


@lab_group.command(
    "down",
    epilog="Examples:\n\n  stockade lab down --prefix demo1\n\n  stockade lab down --all",
)
@click.option("--prefix", help="Remove the lab with this prefix.")
@click.option("--all", "all_", is_flag=True, help="Remove every lab recorded in the state dir.")
def down_command(prefix: str | None, all_: bool) -> None:
    """Remove a lab: namespaces, interfaces, upstream process, state file."""
    if (prefix is None) == (not all_):
        _fail("give either --prefix PREFIX or --all (see `stockade lab status`)", 2)
    _check_prefix(prefix)
    done: list[str] = _run(
        topology.down_all if all_ else lambda: topology.down(prefix or ""),
    )
    for line in done:
        click.echo(line)
    if not done:
        click.echo("nothing to remove")


@lab_group.command("status", epilog="Example:\n\n  stockade lab status --json")
@click.option("--json", "as_json", is_flag=True, help="Print the labs as JSON.")
def status_command(as_json: bool) -> None:
    """List the labs recorded in the state dir and whether their parts exist."""
    labs: list[topology.LabStatus] = _run(topology.status)
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in labs], indent=2, sort_keys=True))
        return
    if not labs:
        click.echo("no lab is up")
        return
    for s in labs:
        present = sum(s.namespaces.values())
        health = "up" if present == len(s.namespaces) else f"partial ({present} namespaces)"
        if s.upstream_pid is None:
            upstream = "no upstream"
        elif s.upstream_running:
            upstream = f"upstream pid {s.upstream_pid}"
        else:
            upstream = f"upstream pid {s.upstream_pid} not running"
        click.echo(f"{s.prefix}  {health}  {upstream}")
