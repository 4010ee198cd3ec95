"""`stockade reload`: the controller over its socket, the proxy's master by signal."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import click

from stockade.cli import output
from stockade.cli.client import ControllerUnavailable, call
from stockade.cli.context import Context, command_help, fail, json_option, pass_ctx
from stockade.protocol import EXIT_CODES, CommandError
from stockade.proxy.status import MASTER_FILE, RELOAD_FILE

PROXY_RELOAD_WAIT = 15.0  # the master checks the new config before answering


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_proxy_master(pid: int) -> bool:
    """Never signal a recycled pid: it must be a `stockade ... proxy run` (or `run`)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"stockade" in a for a in argv) and b"run" in argv


def reload_proxy(status_dir: Path) -> dict[str, Any]:
    master = _read(status_dir / MASTER_FILE)
    if master is None or not isinstance(master.get("pid"), int):
        return {"status": "not_running"}
    pid = master["pid"]
    if not _is_proxy_master(pid):
        return {"status": "not_running"}
    before = _read(status_dir / RELOAD_FILE) or {}
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + PROXY_RELOAD_WAIT
    while time.monotonic() < deadline:
        after = _read(status_dir / RELOAD_FILE)
        if after is not None and after.get("generation") != before.get("generation"):
            if after.get("ok"):
                return {"status": "reloaded"}
            return {"status": "refused", "error": after.get("error")}
        time.sleep(0.1)
    return {"status": "no_answer"}


@click.command(
    "reload",
    help=command_help("reload"),
    epilog="Examples:\n\n  stockade reload\n\n  stockade --config /etc/stockade/stockade.toml "
    "reload --json\n\n  systemctl reload stockade-controller stockade-proxy  # the same",
)
@json_option
@pass_ctx
def reload_cmd(ctx: Context, as_json: bool) -> None:
    result: dict[str, Any] = {}
    try:
        result["controller"] = call(ctx.socket, "reload")
    except ControllerUnavailable as exc:
        result["controller"] = {"status": "not_running", "error": exc.message}
    except CommandError as exc:
        # the controller refused (the config does not load, or the reload would lift
        # the kernel's bans): nothing changed there, so the proxy is left alone too
        fail(exc.message, exc.hint, EXIT_CODES.get(exc.kind, 1))
    result["proxy"] = reload_proxy(ctx.config().proxy.status_dir)
    if as_json:
        output.emit_json(result)
    else:
        controller = result["controller"]
        line = f"controller: {controller['status']}"
        if controller.get("needs_restart"):
            line += f" (needs a restart to change: {', '.join(controller['needs_restart'])})"
        click.echo(line)
        proxy = result["proxy"]
        click.echo(
            f"proxy:      {proxy['status']}" + (f": {proxy['error']}" if "error" in proxy else "")
        )
    if result["proxy"]["status"] == "refused":
        raise SystemExit(2)
    if "reloaded" not in (result["controller"]["status"], result["proxy"]["status"]):
        fail("nothing was reloaded: neither the controller nor the proxy is running", None, 1)
