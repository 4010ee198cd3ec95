"""`stockade proxy run` and `stockade run` (controller and proxy together)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import click

from stockade import logs
from stockade.cli.context import Context, pass_ctx


@click.group(
    help="The L7 reverse proxy: TLS, routes, upstream pools.",
    epilog="Example:\n\n  stockade proxy run",
)
def proxy() -> None:
    pass


@proxy.command(
    "run",
    epilog="Examples:\n\n  stockade proxy run\n\n  stockade --config ./stockade.toml proxy run",
)
@pass_ctx
def proxy_run(ctx: Context) -> None:
    """Serve the [proxy] listeners in the foreground (master + workers).

    SIGTERM drains in-flight requests; SIGHUP reloads TLS certificates.
    """
    from stockade.proxy.workers import run

    config = ctx.config()
    if ctx.socket_override is not None:  # where the status page asks the controller
        config = replace(config, controller=replace(config.controller, socket=ctx.socket_override))
    logs.use_format(config.proxy.log_format)  # the workers inherit it
    code = run(config)
    # Everything is closed and flushed by now; skip the interpreter's teardown of the
    # proxy's many modules (up to a second on a busy host), so a SIGTERM stops it at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@click.command(
    "run",
    epilog="Examples:\n\n  stockade run\n\n  stockade --config ./stockade.toml run",
)
@pass_ctx
def run_all(ctx: Context) -> None:
    """Run the controller and the proxy together (for systemd and the demo).

    Both run as child processes; SIGTERM and SIGHUP are passed on. If either
    exits, the other is stopped and this command exits with its code, so a
    supervisor restarts the pair.
    """
    ctx.config()  # refuse a bad config before starting anything
    base = [sys.executable, "-m", "stockade.cli.main"]
    if ctx.config_path is not None:
        base += ["--config", str(ctx.config_path)]
    children = {
        "controller": subprocess.Popen([*base, "controller", "run"]),
        "proxy": subprocess.Popen([*base, "proxy", "run"]),
    }
    forwarded = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    code = 0
    try:
        while True:
            info = signal.sigtimedwait(forwarded, 0.5)
            if info is not None:
                sig = signal.SIGTERM if info.si_signo == signal.SIGINT else info.si_signo
                for child in children.values():
                    if child.poll() is None:
                        os.kill(child.pid, sig)
                if sig == signal.SIGTERM:
                    break
            exited = [(name, c.returncode) for name, c in children.items() if c.poll() is not None]
            if exited:
                name, code = exited[0]
                click.echo(f"stockade: the {name} exited with {code}; stopping", err=True)
                for child in children.values():
                    if child.poll() is None:
                        os.kill(child.pid, signal.SIGTERM)
                break
    finally:
        deadline = time.monotonic() + 60
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    raise SystemExit(code)
