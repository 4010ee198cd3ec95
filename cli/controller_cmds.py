"""Privileged local commands: run the controller, detach the program."""

from __future__ import annotations

import os
from dataclasses import replace

import click

from stockade import logs
from stockade.cli.context import Context, fail, pass_ctx
from stockade.controller import loader, xdp_attach
from stockade.controller.daemon import lock_pin_dir, program_settings, run


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
    "  stockade controller run --ebpf        # print the C and flags that would load",
)
@click.option("--dry-run", is_flag=True, help="Monitor mode: evaluate and count, drop nothing.")
@click.option(
    "--mode",
    type=click.Choice([m.value for m in xdp_attach.Mode]),
    help="XDP mode (default from the config: auto = native, generic as a fallback).",
)
@click.option("--ebpf", is_flag=True, help="Print the program source and flags, then exit.")
@pass_ctx
def controller_run(ctx: Context, dry_run: bool, mode: str | None, ebpf: bool) -> None:
    """Run in the foreground (systemd-friendly): attach, reconcile, serve the control API.

    Logs go to stderr; SIGTERM stops it cleanly and leaves the XDP program
    enforcing.
    """
    config = ctx.config()
    if ebpf:
        click.echo(loader.describe(program_settings(config)))
        return
    if ctx.socket_override is not None:
        config = replace(config, controller=replace(config.controller, socket=ctx.socket_override))
    # -v keeps debug; otherwise the config's level (a reload applies both again)
    c = config.controller
    logs.use_format(c.log_format, None if ctx.verbose else c.log_level)
    raise SystemExit(run(config, dry_run=dry_run, mode=xdp_attach.Mode(mode) if mode else None))


@click.command(
    epilog="Examples:\n\n  stockade detach eth0\n\n  stockade detach --all --remove-maps",
)
@click.argument("interfaces", nargs=-1)
@click.option("--all", "all_interfaces", is_flag=True, help="Every interface in the config.")
@click.option("--netns", help="Network namespace of the interfaces.")
@click.option(
    "--remove-maps",
    is_flag=True,
    help="Also unpin the maps (bans stay in the store and return on the next start).",
)
@pass_ctx
def detach(
    ctx: Context,
    interfaces: tuple[str, ...],
    all_interfaces: bool,
    netns: str | None,
    remove_maps: bool,
) -> None:
    """Remove the XDP program from interfaces; traffic is no longer filtered there."""
    config = ctx.config()
    names = list(interfaces)
    if all_interfaces:
        names += [n for n in config.xdp.interfaces if n not in names]
    if not names and not remove_maps:
        fail("name an interface or use --all", "see `stockade detach --help`", 2)
    for name in names:
        try:
            xdp_attach.detach(name, netns or config.controller.netns)
        except xdp_attach.AttachError as exc:
            fail(str(exc), None, 1)
        click.echo(f"detached: {name}")
    if remove_maps:
        settings = program_settings(config)
        if settings.pin_dir.exists():
            try:
                lock_fd = lock_pin_dir(settings.pin_dir)
            except RuntimeError as exc:
                fail(str(exc), None, 1)
            os.close(lock_fd)
        for path in loader.remove_pins(settings):
            click.echo(f"unpinned: {path}")
