"""`stockade completion SHELL`: the shell completion script (click's own)."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

SHELLS = ("bash", "zsh", "fish")


@click.command(
    "completion",
    epilog="Examples:\n\n  stockade completion bash > /etc/bash_completion.d/stockade\n\n"
    '  eval "$(stockade completion zsh)"   # in ~/.zshrc',
)
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL: commands, options and their choices."""
    root = ctx.find_root().command
    cls = get_completion_class(shell)
    assert cls is not None, "click knows every shell in SHELLS"
    script = cls(root, {}, "stockade", "_STOCKADE_COMPLETE").source()
    click.echo(script)
