"""`stockade apikey create` and `stockade apikey check` through click's CliRunner."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from stockade.cli.apikey_cmds import apikey_group
from stockade.proxy.api_keys import ApiKeyStore, load_api_keys_file, parse_entries


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(apikey_group, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_create_prints_key_and_entry_that_verify(tmp_path: Path) -> None:
    code, out, err = invoke("create", "--consumer", "acme", "--plan", "gold")
    assert (code, err) == (0, "")
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith("stk_"))
    toml = out[out.index("[[keys]]") :]
    path = tmp_path / "keys.toml"
    path.write_text(toml)
    entries = load_api_keys_file(path)
    assert [(e.consumer, e.plan) for e in entries] == [("acme", "gold")]
    assert ApiKeyStore(entries).verify(key) == entries[0]
    assert key.split("_", 2)[2] not in toml

    code, out, err = invoke("check", "--file", str(path))
    assert (code, out, err) == (0, f"{path}: 1 key(s) ok\n", "")


def test_create_json() -> None:
    code, out, _ = invoke("create", "--consumer", "acme.eu", "--plan", "free_1", "--json")
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"key", "key_id", "entry_toml"}
    entries = parse_entries(tomllib.loads(doc["entry_toml"])["keys"], "json")
    assert entries[0].key_id == doc["key_id"]
    assert ApiKeyStore(entries).verify(doc["key"]) == entries[0]


@pytest.mark.parametrize(("consumer", "plan"), [("a b", "gold"), ("acme", ""), ("x" * 65, "p")])
def test_create_bad_name_exits_2(consumer: str, plan: str) -> None:
    code, out, err = invoke("create", "--consumer", consumer, "--plan", plan)
    assert code == 2 and out == ""
    assert err.startswith("stockade: bad ") and err.count("\n") == 1


def test_check_bad_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nkey_id = "abcd1234"\n')
    code, out, err = invoke("check", "--file", str(path))
    assert (code, out) == (2, "")
    assert err == f"stockade: {path} entry 0: missing salt, digest, consumer, plan\n"


def test_check_missing_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "none.toml"
    code, _, err = invoke("check", "--file", str(path))
    assert code == 2
    assert err.startswith(f"stockade: {path}: cannot read") and err.count("\n") == 1


@pytest.mark.parametrize("args", [[], ["create"], ["check"]])
def test_help_ends_with_examples(args: list[str]) -> None:
    code, out, _ = invoke(*args, "--help")
    assert code == 0
    assert "Example" in out
    assert "stockade apikey" in out[out.index("Example") :]
