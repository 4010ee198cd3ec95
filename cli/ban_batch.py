"""`stockade ban --file`, `stockade unban --file` and `stockade unban --all`.

A file is checked whole before anything is sent (one bad line refuses it),
then sent as one batch: the controller checks it again against its state
(allowlist, minimum prefix, map room) and applies all of it or nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

import click

from stockade.cli import output
from stockade.cli.ban_files import BanFile, parse_lines, read_lines
from stockade.cli.context import Context, fail
from stockade.control_client import call_batch
from stockade.protocol import EXIT_CODES, CommandError

SHOWN = 3  # refused lines named in the one-line error (-v lists all)


@contextlib.contextmanager
def _opened(path: str) -> Iterator[IO[bytes]]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        stream = Path(path).open("rb")  # noqa: SIM115 - closed by the `with` below
    except FileNotFoundError:
        fail(f"{path}: no such file", None, 2)
    except IsADirectoryError:
        fail(f"{path}: is a directory", None, 2)
    except PermissionError:
        fail(f"permission denied reading {path}", "run as root, or fix its permissions", 1)
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", None, 1)
    with stream:
        yield stream


def _read(path: str, **kwargs: Any) -> BanFile:
    name = "stdin" if path == "-" else path
    with _opened(path) as stream:
        parsed = parse_lines(name, read_lines(stream), **kwargs)
    if parsed.refused:
        _refused(
            parsed,
            [(line, None, why) for line, why in parsed.refused],
            parsed.read,
            "lines",
            "nothing was sent",
            2,
        )
    if not parsed.entries:
        fail(f"{name}: no targets in it", "one target a line; see `stockade ban --help`", 2)
    for line, note in parsed.mapped[:SHOWN]:
        click.echo(f"stockade: note: {name}:{line}: {note}", err=True)
    if len(parsed.mapped) > SHOWN:
        click.echo(
            f"stockade: note: {len(parsed.mapped) - SHOWN} more IPv4-mapped targets in {name} "
            "are taken as IPv4",
            err=True,
        )
    return parsed


def _refused(
    parsed: BanFile,
    rows: list[tuple[int | None, str | None, str]],
    total: int,
    unit: str,
    outcome: str,
    code: int,
    count: int | None = None,
) -> NoReturn:
    """One line naming the first refused lines (every one above it with -v), then exit.

    `count`: how many were refused, when `rows` holds only the first of them.
    """
    verbose = click.get_current_context().find_object(Context)
    if verbose is not None and verbose.verbose:
        for line, target, why in rows:
            where = f"{parsed.name}:{line}" if line is not None else parsed.name
            click.echo(f"stockade: {where}: {f'{target}: ' if target else ''}{why}", err=True)
    shown = "; ".join(
        f"line {line}{f' ({target})' if target else ''}: {why}"
        for line, target, why in rows[:SHOWN]
    )
    refused = max(len(rows), count or 0)
    more = f"; and {refused - SHOWN} more" if refused > SHOWN else ""
    fail(
        f"{parsed.name}: {refused} of {total} {unit} refused, {outcome}: {shown}{more}",
        "fix or remove them and run it again (-v lists every one)",
        code,
    )


def _send(ctx: Context, parsed: BanFile, command: str, outcome: str, **args: Any) -> Any:
    try:
        return call_batch(ctx.socket, command, parsed.entries, **args)
    except CommandError as exc:
        code = EXIT_CODES.get(exc.kind, 1)
        if not exc.refused:
            fail(f"{parsed.name}: {exc.message}", exc.hint, code)
        rows = [
            (
                parsed.line_of(int(r.get("entry", 0))),
                str(r.get("target")) if r.get("target") else None,
                str(r.get("error", "refused")),
            )
            for r in exc.refused
        ]
        _refused(parsed, rows, len(parsed.entries), "targets", outcome, code, exc.refused_total)


def ban_file(
    ctx: Context, path: str, ttl: str | None, reason: str | None, force: bool, as_json: bool
) -> None:
    parsed = _read(path, ttl=ttl, reason=reason)
    result = _send(ctx, parsed, "ban.batch", "nothing was banned", force=force or None)
    if as_json:
        output.emit_json(result)
        return
    click.echo(
        f"banned: {result['targets']} targets from {parsed.name} "
        f"({result['added']} added, {result['updated']} updated)"
    )


def unban_file(ctx: Context, path: str, as_json: bool) -> None:
    parsed = _read(path, targets_only=True)
    result = _send(ctx, parsed, "unban.batch", "nothing was unbanned")
    if as_json:
        output.emit_json(result)
        return
    click.echo(f"removed: {result['targets']} targets from {parsed.name} are no longer banned")


def unban_all(
    ctx: Context, source: str | None, reason_match: str | None, force: bool, as_json: bool
) -> None:
    result = ctx.call("unban.all", source=source, reason_match=reason_match, force=force or None)
    if as_json:
        output.emit_json(result)
        return
    which = [f"source {source}"] if source is not None else []
    which += [f"reason matching {reason_match!r}"] if reason_match is not None else []
    click.echo(
        f"removed: {result['count']} bans" + (f" ({', '.join(which)})" if which else " (all)")
    )
