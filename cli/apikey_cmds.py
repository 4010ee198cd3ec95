"""`stockade apikey create` and `stockade apikey check`: API keys, offline."""

from __future__ import annotations

from pathlib import Path

import click

from stockade.cli.context import fail, json_option
from stockade.cli.output import emit_json
from stockade.proxy.api_keys import (
    ApiKeyError,
    check_name,
    entry_to_toml,
    generate_key,
    load_api_keys_file,
)


@click.group(
    "apikey",
    help="API keys for the proxy: create one, check a keys file.",
    epilog="Examples:\n\n  stockade apikey create --consumer acme --plan gold\n\n"
    "  stockade apikey check --file /etc/stockade/api_keys.toml",
)
def apikey_group() -> None:
    pass


@apikey_group.command(
    "create",
    epilog="Examples:\n\n  stockade apikey create --consumer acme --plan gold\n\n"
    "  stockade apikey create --consumer acme --plan gold --json",
)
@click.option("--consumer", required=True, help="Consumer id forwarded upstream.")
@click.option("--plan", required=True, help="Plan for rate limits and quotas.")
@json_option
def create(consumer: str, plan: str, as_json: bool) -> None:
    """Create a key: print it once, and the [[keys]] entry to add to the keys file.

    Only the entry (a salted SHA-256 of the secret) is stored; the key itself
    cannot be recovered later, so hand it to the consumer now.
    """
    try:
        check_name("consumer", consumer)
        check_name("plan", plan)
    except ApiKeyError as exc:
        fail(str(exc), None, 2)
    key, entry = generate_key(consumer, plan)
    toml = entry_to_toml(entry)
    if as_json:
        emit_json({"key": key, "key_id": entry.key_id, "entry_toml": toml})
        return
    click.echo(f"key (shown once, give it to {consumer}):\n\n  {key}\n")
    click.echo("add to the keys file:\n")
    click.echo(toml, nl=False)


@apikey_group.command(
    "check",
    epilog="Example:\n\n  stockade apikey check --file /etc/stockade/api_keys.toml",
)
@click.option(
    "--file",
    "path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Keys file of [[keys]] tables.",
)
def check(path: Path) -> None:
    """Validate a keys file: every field, no duplicate key ids (exit 0 ok, 2 bad)."""
    try:
        entries = load_api_keys_file(path)
    except ApiKeyError as exc:
        fail(str(exc), None, 2)
    click.echo(f"{path}: {len(entries)} key(s) ok")
