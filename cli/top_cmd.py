"""`stockade top`: a live view of the gateway, refreshed every second.

On a terminal: the alternate screen, redrawn each interval, `q` or Ctrl-C
to leave (the terminal is restored either way). Otherwise (a pipe, a
file) or with `--once`: plain frames without escape codes. Sources: see
top_sources.py.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import asdict
from types import FrameType
from typing import IO, NoReturn

import click
from rich.console import Console
from rich.live import Live

from stockade.cli import output
from stockade.cli.context import AsciiNumber, Context, fail, json_option, pass_ctx
from stockade.cli.top_sources import take_sample
from stockade.cli.top_view import View
from stockade.stats_view import Frame, Sample, build

PLAIN_WIDTH = 160  # wide enough that no column is cut in a pipe


class Keys:
    """Single key presses from a terminal on stdin (cbreak: Ctrl-C still interrupts)."""

    def __init__(self, stream: IO[str]) -> None:
        self.fd = stream.fileno()
        self.tty = stream.isatty()
        self.closed = False  # stdin at EOF: nothing more to read

    @contextlib.contextmanager
    def active(self) -> Iterator[Keys]:
        if not self.tty:
            yield self
            return
        saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        try:
            yield self
        finally:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    def quit_within(self, timeout: float) -> bool:
        """Wait up to `timeout`; True as soon as q is pressed."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.tty or self.closed:
                time.sleep(left)
                return False
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                key = os.read(self.fd, 1)
                if key in (b"q", b"Q"):
                    return True
                self.closed = key == b""
        return False


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt  # SIGTERM leaves like Ctrl-C: through every `finally`


class Top:
    def __init__(self, ctx: Context, interval: float) -> None:
        self.socket = ctx.socket
        self.proxy_config = ctx.config().proxy
        self.interval = interval

    def sample(self) -> Sample:
        return take_sample(self.socket, self.proxy_config)

    def first(self) -> Sample:
        sample = self.sample()
        if sample.kernel is None:  # nothing to watch: say so and how to fix it
            fail(sample.kernel_error or "the controller did not answer")
        return sample

    def once(self, as_json: bool) -> None:
        before = self.first()
        time.sleep(self.interval)  # rates need two samples
        frame = build(self.sample(), before)
        if frame.controller is None:
            fail(frame.controller_error or "the controller did not answer")
        if as_json:
            output.emit_json(asdict(frame))
        else:
            self.plain_console().print(View(True).render(frame))

    def plain_console(self) -> Console:
        if sys.stdout.isatty():
            return Console(highlight=False)
        return Console(highlight=False, color_system=None, width=PLAIN_WIDTH)

    def frames(self) -> Iterator[Frame]:
        prev = self.first()
        yield build(prev)
        while True:
            cur = self.sample()
            yield build(cur, prev)
            prev = cur

    def live(self) -> None:
        console = Console(highlight=False)
        view = View(False)
        frames = self.frames()
        with Keys(sys.stdin).active() as keys:
            with Live(console=console, screen=True, auto_refresh=False) as screen:
                for frame in frames:
                    screen.update(view.render(frame), refresh=True)
                    if keys.quit_within(self.interval):
                        return

    def batch(self) -> None:
        """Not a terminal and no --once: a plain frame every interval, like `top -b`."""
        console = self.plain_console()
        view = View(True)
        for i, frame in enumerate(self.frames()):
            if i:
                time.sleep(self.interval)
                console.print()
            console.print(view.render(frame))
            sys.stdout.flush()


@click.command(
    "top",
    epilog="Examples:\n\n  stockade top\n\n  stockade top --once\n\n"
    "  stockade top --once --json | jq '.reasons'\n\n  stockade top --interval 5",
)
@click.option("--once", is_flag=True, help="Print one plain frame (rates over --interval), exit.")
@click.option(
    "--interval",
    type=AsciiNumber(0.1, 3600),
    default=1.0,
    show_default=True,
    help="Seconds between frames.",
)
@json_option
@pass_ctx
def top(ctx: Context, once: bool, interval: float, as_json: bool) -> None:
    """A live view: kernel drops by reason, bans, requests per route, latency, upstreams.

    Kernel counters and bans come from the controller's control socket; the
    proxy's requests, latency (p50/p99 over the interval) and upstream
    health from its admin listener (where proxy.status_dir/admin.json says).
    A proxy that is not running is shown as such. Press q or Ctrl-C to quit.
    `--json` prints one frame as JSON (implies --once).
    """
    watcher = Top(ctx, interval)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if once or as_json:
            watcher.once(as_json)
        elif sys.stdout.isatty():
            watcher.live()
        else:
            watcher.batch()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves: exit 0
    except BrokenPipeError:  # `stockade top | head`: the reader is done
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
