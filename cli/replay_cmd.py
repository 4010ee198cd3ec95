"""`stockade replay ACCESS_LOG --config NEW.toml`: test a policy before deploying it."""

from __future__ import annotations

from pathlib import Path

import click

from stockade.cli.context import Context, fail, json_option, pass_ctx
from stockade.cli.output import emit_json, table
from stockade.config import ConfigError, load_config


@click.command(
    "replay",
    epilog="Examples:\n\n  stockade replay /var/log/stockade/access.log --config new.toml\n\n"
    "  stockade replay access.log --config new.toml --json --examples 100",
)
@click.argument("access_log", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--config",
    "new_config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The config to test (default: the one in use).",
)
@click.option("--examples", default=20, show_default=True, help="Changed requests to list.")
@json_option
@pass_ctx
def replay_cmd(
    ctx: Context, access_log: Path, new_config: Path | None, examples: int, as_json: bool
) -> None:
    """Replay recorded requests (the JSON access log) through the policy stages of a
    config, sending nothing upstream, and report which requests would now be treated
    differently and by which stage and rule.

    Headers, query strings and bodies are not in the log, so they cannot be replayed;
    authentication is taken from the consumer the log recorded. See docs/operations.md.
    """
    if examples < 0:
        fail("--examples must be 0 or more", None, 2)
    try:
        config = load_config(new_config) if new_config is not None else ctx.config()
    except ConfigError as exc:
        fail(str(exc), "check it with `stockade check-config`", 2)
    from stockade.proxy.replay import ReplayError, replay_file  # aiohttp: only when needed

    try:
        report = replay_file(config.proxy, access_log)
    except ReplayError as exc:
        fail(str(exc), None, 2)
    result = report.as_json(examples)
    if as_json:
        emit_json(result)
        return
    click.echo(
        f"{result['requests']} requests replayed ({result['skipped_lines']} lines skipped); "
        f"{result['changed']} would be treated differently"
    )
    if result["by_change"]:
        table(("change", "requests"), list(result["by_change"].items()))
    if result["examples"]:
        click.echo("")
        table(
            ("line", "client", "method", "path", "was", "now"),
            [
                (e["line"], e["client_ip"], e["method"], e["path"][:60], e["was"], e["now"])
                for e in result["examples"]
            ],
        )
    for ban in result["would_ban"]:
        click.echo(f"rule {ban['rule']} would ban {ban['target']}")
