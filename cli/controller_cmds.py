"""Privileged local commands: run the controller, detach and attach the program."""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from stockade import logs
from stockade.cli import output
from stockade.cli.client import ControllerUnavailable, call
from stockade.cli.context import Context, command_help, fail, json_option, pass_ctx
from stockade.config import Config
from stockade.controller import loader, xdp_attach, xdp_state
from stockade.controller.daemon import (
    ACCEPT_BAN_LOSS,
    IFNAME,
    REBUILD_STORE,
    program_settings,
    run,
)
from stockade.protocol import EXIT_CODES, CommandError


@click.group(
    help="The privileged controller: XDP program, maps, ban store, control API.",
    epilog="Example:\n\n  stockade controller run --config /etc/stockade/stockade.toml",
)
def controller() -> None:
    pass


@controller.command(
    "run",
    epilog="Examples:\n\n  stockade controller run --config /etc/stockade/stockade.toml\n\n"
    "  stockade controller run --dry-run     # count, never drop\n\n"
    "  stockade controller run --ebpf        # print the C and flags that would load\n\n"
    "  stockade controller run --rebuild-store-from-maps   # bans.db lost: keep the kernel's bans",
)
@click.option("--dry-run", is_flag=True, help="Monitor mode: evaluate and count, drop nothing.")
@click.option(
    "--mode",
    type=click.Choice([m.value for m in xdp_attach.Mode]),
    help="XDP mode (default from the config: auto = native, generic as a fallback).",
)
@click.option("--ebpf", is_flag=True, help="Print the program source and flags, then exit.")
@click.option(
    "--rebuild-store-from-maps",
    "rebuild",
    is_flag=True,
    help="This start only: put every ban the kernel maps hold and the ban store lacks into "
    "the store (reason rebuilt-from-kernel, the kernel's expiry); a damaged bans.db is "
    "renamed aside, never deleted.",
)
@click.option(
    "--accept-ban-loss",
    "accept_loss",
    is_flag=True,
    help="This start only: make the kernel match the ban store even when that lifts bans "
    "only the kernel has; a damaged bans.db is renamed aside and a new one started.",
)
@pass_ctx
def controller_run(
    ctx: Context, dry_run: bool, mode: str | None, ebpf: bool, rebuild: bool, accept_loss: bool
) -> None:
    """Run in the foreground (systemd-friendly): attach, reconcile, serve the control API.

    Logs go to stderr; SIGTERM stops it cleanly and leaves the XDP program
    enforcing. It refuses to start when the ban store is missing, empty or
    damaged while the kernel maps hold bans, or when reconciling would lift
    more than controller.reconcile_max_removal_share of them; the two
    options above are the ways on (docs/runbook.md).
    """
    if rebuild and accept_loss:
        fail(
            "--rebuild-store-from-maps and --accept-ban-loss exclude each other",
            "keep the kernel's bans (rebuild) or lift them (accept), not both",
            2,
        )
    recovery = REBUILD_STORE if rebuild else ACCEPT_BAN_LOSS if accept_loss else None
    config = ctx.config()
    if ebpf:
        click.echo(loader.describe(program_settings(config)))
        return
    if ctx.socket_override is not None:
        config = replace(config, controller=replace(config.controller, socket=ctx.socket_override))
    # -v keeps debug; otherwise the config's level (a reload applies both again)
    c = config.controller
    logs.use_format(c.log_format, None if ctx.verbose else c.log_level)
    raise SystemExit(
        run(
            config,
            dry_run=dry_run,
            mode=xdp_attach.Mode(mode) if mode else None,
            recovery=recovery,
        )
    )


@click.command(
    help=command_help("detach"),
    epilog="Examples:\n\n  stockade detach eth0\n\n  stockade detach --all\n\n"
    "  stockade detach --all --remove-maps   # controller stopped: also unpin the maps\n\n"
    "With a controller running, it does the detach (logged, kept across its restarts "
    "until `stockade attach IFACE`). Without one, only stockade's program is removed (by "
    "name and tag, as the controller recognises it) unless --force, and the controller "
    "attaches it again when it starts.",
)
@click.argument("interfaces", nargs=-1)
@click.option("--all", "all", is_flag=True, help="Every interface in the config.")
@click.option("--netns", help="Network namespace of the interfaces (no controller running).")
@click.option(
    "--remove-maps",
    is_flag=True,
    help="Also unpin the maps (bans stay in the store and return on the next start); "
    "refused while a controller runs.",
)
@click.option("--force", is_flag=True, help="Also remove an XDP program that is not stockade's.")
@json_option
@pass_ctx
def detach(
    ctx: Context,
    interfaces: tuple[str, ...],
    all: bool,  # the wire argument's name
    netns: str | None,
    remove_maps: bool,
    force: bool,
    as_json: bool,
) -> None:
    config = ctx.config()
    names = list(dict.fromkeys(interfaces))
    if all and names:
        fail("name interfaces or use --all, not both", "see `stockade detach --help`", 2)
    if not names and not all and not remove_maps:
        fail("name an interface or use --all", "see `stockade detach --help`", 2)
    bad = [n for n in names if not IFNAME.fullmatch(n)]
    if bad:
        fail(f"invalid interface name {bad[0]!r}", None, 2)
    settings = program_settings(config)
    # Everything that can refuse is checked before anything changes.
    lock = _try_lock(settings.pin_dir)
    if lock is HELD:
        if remove_maps:
            fail(
                f"a stockade controller is running and holds {settings.pin_dir}: the maps "
                "cannot be removed under it; nothing was detached",
                "stop it first (`systemctl stop stockade-controller`), or detach without "
                "--remove-maps",
                2,
            )
        if netns is not None and netns != config.controller.netns:
            fail(
                f"the running controller manages the interfaces of "
                f"{config.controller.netns or 'its own network namespace'}, not {netns}",
                "leave out --netns",
                2,
            )
        result = ctx.call("detach", interfaces=names or None, all=all or None, force=force or None)
        _print_detached(result, as_json)
        return
    try:
        result = _detach_here(config, names, all, netns or config.controller.netns, force)
        if remove_maps:
            result["unpinned"] = [str(p) for p in loader.remove_pins(settings)]
    finally:
        if isinstance(lock, int):
            os.close(lock)
    _print_detached(result, as_json)


@click.command(
    help=command_help("attach"),
    epilog="Example:\n\n  stockade attach eth0",
)
@click.argument("interfaces", nargs=-1, required=True)
@json_option
@pass_ctx
def attach(ctx: Context, interfaces: tuple[str, ...], as_json: bool) -> None:
    names = list(dict.fromkeys(interfaces))
    try:
        result = call(ctx.socket, "attach", interfaces=names)
    except ControllerUnavailable as exc:
        fail(
            exc.message,
            "only the controller attaches: start it, then run `stockade attach "
            f"{' '.join(names)}` (an interface detached on purpose stays so until then)",
            1,
        )
    except CommandError as exc:
        fail(exc.message, exc.hint, EXIT_CODES.get(exc.kind, 1))
    if as_json:
        output.emit_json(result)
        return
    for row in result["interfaces"]:
        click.echo(f"attached: {row['name']} ({row['mode']} XDP, program {row['prog_id']})")


HELD = object()  # the pin directory's lock is held: a controller runs


def _try_lock(pin_dir: Path) -> int | object | None:
    """The pin directory's lock (an fd to close), HELD, or None when there is no directory
    (no controller ever ran with these pins). Never creates anything."""
    try:
        fd = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        fail(f"permission denied on {pin_dir}", "run as root", 1)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return HELD
        fail(f"cannot lock {pin_dir}: {exc.strerror}", None, 1)
    return fd


def _detach_here(
    config: Config,
    names: list[str],
    all: bool,
    netns: str | None,
    force: bool,
) -> dict[str, Any]:
    """No controller runs: detach stockade's program ourselves, every interface checked
    first. Nothing is recorded: the controller attaches its program when it starts (the
    filter back on is the safe default; a detach through the controller is what lasts)."""
    wanted = list(config.xdp.interfaces) if all else names
    state = xdp_state.read_state(config.controller.state_dir)
    found = []
    for ifname in wanted:
        try:
            current = xdp_attach.query(ifname, netns)
            if current.prog_id and not force:
                info = xdp_attach.program_info(current.prog_id)
                if not state.is_stockade(info):
                    fail(
                        f"refusing to detach {ifname}: its XDP program (id {info.prog_id}, "
                        f"name {info.name or '(none)'}, tag {info.tag}) is not stockade's; "
                        "nothing was detached",
                        "add --force to remove it anyway",
                        2,
                    )
        except xdp_attach.AttachError as exc:
            fail(str(exc), None, 2 if "not found" in str(exc) else 1)
        found.append(current)
    rows = []
    for current in found:
        row: dict[str, Any] = {
            "name": current.ifname,
            "prog_id": current.prog_id,
            "status": "not_attached",
        }
        if current.prog_id:
            try:
                xdp_attach.detach(current.ifname, netns, expected_prog_id=current.prog_id)
            except xdp_attach.AttachError as exc:
                fail(str(exc), None, 1)
            row["status"] = "detached"
        rows.append(row)
    return {"interfaces": rows}


def _print_detached(result: dict[str, Any], as_json: bool) -> None:
    result.setdefault("unpinned", [])
    if as_json:
        output.emit_json(result)
        return
    for row in result["interfaces"]:
        if row["status"] == "detached":
            click.echo(f"detached: {row['name']} (program {row['prog_id']})")
        else:
            click.echo(f"not attached: {row['name']}")
    for path in result["unpinned"]:
        click.echo(f"unpinned: {path}")
