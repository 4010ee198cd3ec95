"""docs/config.md documents every key the configuration accepts, and no other.

The accepted keys are collected by loading examples/stockade.toml (it has one of
each dynamic table) with Section.finish instrumented: every section reports the
keys it read (`Section.known`), so a key added to the code shows up here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stockade.config import load_config
from stockade.config_fields import Section
from stockade.proxy.api_keys import FIELDS as API_KEY_FIELDS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "stockade.toml"
DOC = ROOT / "docs" / "config.md"

# Tables whose keys are names the operator chooses.
_DYNAMIC = re.compile(r"\b(pools|issuers|limits|plans)\.[A-Za-z0-9_-]+")
_INDEX = re.compile(r"\[\d+\]")

# Keys that are read only when present (there is no default to fall back to), so
# loading the example, which leaves them out, cannot see them.
ONLY_WHEN_PRESENT = {
    ("controller.admin", "bearer_token_file"): "no default token; read only when set",
    ("controller.admin", "basic_auth_password_file"): "read only when set (with the user)",
    ("proxy.admin", "bearer_token_file"): "no default token; read only when set",
    ("proxy.admin", "basic_auth_password_file"): "read only when set (with the user)",
    ("proxy.auth", "api_keys_file"): "no default file; read only when set",
    ("proxy.rate_limiting.limits.NAME", "map"): "no default map; read only when set",
    ("proxy.anomaly", "rules_socket"): "absent: [controller] rules_socket is used",
    ("proxy.routes[]", "openapi"): "read only when set (waf = zero_trust needs it)",
}
# Tables not read through Section: [[proxy.auth.api_keys]] entries (proxy/api_keys.py).
OTHER_TABLES = {"proxy.auth.api_keys[]": API_KEY_FIELDS}

_HEADING = re.compile(r"^### `([^`]+)`\s*$")
_ROW = re.compile(r"^\| `([a-z_0-9]+)` \|")


def normalize(section: str) -> str:
    return _INDEX.sub("[]", _DYNAMIC.sub(r"\1.NAME", section))


def code_keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    finish = Section.finish

    def recording_finish(self: Section) -> None:
        seen.setdefault(normalize(self.name), set()).update(self.known)
        finish(self)

    monkeypatch.setattr(Section, "finish", recording_finish)
    load_config(EXAMPLE)
    for (section, key), _reason in ONLY_WHEN_PRESENT.items():
        seen.setdefault(section, set()).add(key)
    for section, fields in OTHER_TABLES.items():
        seen.setdefault(section, set()).update(fields)
    return seen


def doc_keys() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    section: str | None = None
    for line in DOC.read_text().splitlines():
        heading = _HEADING.match(line)
        if heading:
            section = heading.group(1)
            out.setdefault(section, set())
            continue
        row = _ROW.match(line)
        if row and section is not None:
            assert row.group(1) not in out[section], f"{section}.{row.group(1)} twice"
            out[section].add(row.group(1))
    return out


def is_table(sections: dict[str, set[str]], section: str, key: str) -> bool:
    """`key` names a table (or list of tables) that has its own heading."""
    full = f"{section}.{key}"
    return any(name in sections for name in (full, f"{full}[]", f"{full}.NAME"))


def test_every_section_is_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(code_keys(monkeypatch)) == set(doc_keys())


def test_every_key_is_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    code, doc = code_keys(monkeypatch), doc_keys()
    missing = sorted(
        f"{section}.{key}"
        for section, keys in code.items()
        for key in keys
        if key not in doc.get(section, set()) and not is_table(code, section, key)
    )
    assert missing == [], "in the code, not in docs/config.md"


def test_every_documented_key_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    code, doc = code_keys(monkeypatch), doc_keys()
    extra = sorted(
        f"{section}.{key}"
        for section, keys in doc.items()
        for key in keys
        if key not in code.get(section, set())
    )
    assert extra == [], "in docs/config.md, not accepted by the code"


def test_example_reaches_the_dynamic_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    sections = set(code_keys(monkeypatch))
    for name in (
        "proxy.pools.NAME.health",
        "proxy.pools.NAME.servers[]",
        "proxy.listeners[].certificates[]",
        "proxy.auth.issuers.NAME",
        "proxy.rate_limiting.limits.NAME",
        "proxy.quotas.plans.NAME",
        "proxy.anomaly.rules[]",
    ):
        assert name in sections, name
