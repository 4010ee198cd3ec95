"""docs/control-api.md is generated from the command table and must not drift."""

from __future__ import annotations

from pathlib import Path

from stockade.protocol import COMMANDS, render_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "control-api.md"


def test_control_api_doc_matches_the_command_table() -> None:
    assert DOC.read_text() == render_markdown(), (
        "docs/control-api.md is out of date; regenerate it with "
        "`python -m stockade.protocol > docs/control-api.md`"
    )


def test_generated_doc_lists_every_command_and_argument() -> None:
    text = render_markdown()
    for spec in COMMANDS:
        assert f"### `{spec.name}`" in text
        assert spec.usage in text
        assert spec.help in text
        for param in spec.params:
            assert f"| `{param.name}` | {param.kind} |" in text
