"""docs/runbook.md covers what an operator needs, and its commands exist as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click

from stockade.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "runbook.md"
SECTIONS = (
    "## Ban and unban",
    "## Why was this IP banned?",
    "## Emergency: detach XDP",
    "### `--remove-maps`",
    "## Rollback of a bad config",
    "## Rollback of a bad upgrade",
    "## Reading the dashboard and `stockade top`",
    "## Where logs go",
)
_COMMAND = re.compile(r"^(?:sudo )?stockade ([a-z][^`#|\n]*)", re.M)


def commands() -> list[list[str]]:
    """Every `stockade ...` in the runbook's code blocks and inline code."""
    text = RUNBOOK.read_text()
    spans = re.findall(r"```sh\n(.*?)```", text, re.S) + re.findall(r"`(stockade [^`]+)`", text)
    spans = [line.strip() for span in spans for line in span.splitlines()]
    out = []
    for span in spans:
        for match in _COMMAND.finditer(span):
            line = match.group(1).split("|")[0].split("&&")[0]
            out.append(shlex.split(line.replace("\\", " ")))
    return out


def test_runbook_has_every_topic() -> None:
    text = RUNBOOK.read_text()
    for heading in SECTIONS:
        assert f"\n{heading}\n" in text, heading
    for must in ("stockade explain", "stockade bans", "detach --all", "check-config", "replay"):
        assert must in text, must
    assert "grafana-dashboard.json" in text


def test_readme_links_the_runbook_and_config_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/runbook.md)" in readme
    assert "(docs/config.md)" in readme


def test_runbook_commands_and_options_exist() -> None:
    found = commands()
    assert len(found) > 20
    for words in found:
        command: click.Command = cli
        rest = list(words)
        while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
            if rest[0] not in command.commands:
                break
            command = command.commands[rest.pop(0)]
        assert command is not cli, f"stockade {' '.join(words)}: no such command"
        if isinstance(command, click.Group):
            continue  # a group named in prose, e.g. `stockade allow add CIDR`
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        options |= {"--json", "-h", "--help"} & options
        for word in rest:
            if word.startswith("--"):
                assert word.split("=")[0] in options, f"stockade {' '.join(words)}: {word}"
