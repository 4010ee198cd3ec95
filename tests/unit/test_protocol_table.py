"""One command table: the control API, the CLI and the docs all follow it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from stockade.cli.main import cli
from stockade.clock import FakeClock
from stockade.config import Config
from stockade.controller.daemon import Controller
from stockade.controller.maps import DryRunMaps
from stockade.controller.service import BanService
from stockade.controller.store import BanStore
from stockade.protocol import (
    BAD_INPUT,
    COMMANDS,
    COMMANDS_BY_NAME,
    EXIT_CODES,
    NOT_FOUND,
    RUNTIME,
    CommandError,
    decode_request,
    encode,
    request,
)
from stockade.targets import parse_target


@pytest.fixture
def controller() -> Iterator[Controller]:
    ctl = Controller(Config())
    try:
        yield ctl
    finally:
        ctl.close()


def test_command_names_are_unique() -> None:
    assert len(COMMANDS_BY_NAME) == len(COMMANDS)


def test_every_command_has_a_handler_and_every_handler_a_command(controller: Controller) -> None:
    # Built without start(): no kernel, no socket.
    assert set(controller.handlers()) == {spec.name for spec in COMMANDS}


def _cli_command(name: str) -> click.Command | None:
    command: click.Command | None = cli
    for word in name.split("."):
        if not isinstance(command, click.Group):
            return None
        command = command.commands.get(word)
    return command


# Options that only the CLI has: reading a file (sent as a batch), picking the
# command `unban --all` sends, and what `detach` does without a controller.
CLI_ONLY = {"as_json", "file", "all_bans", "netns", "remove_maps"}


@pytest.mark.parametrize("spec", COMMANDS, ids=lambda s: s.name)
def test_every_command_has_a_cli_command(spec: Any) -> None:
    name = spec.cli or spec.name
    command = _cli_command(name)
    assert command is not None, f"no CLI command for {spec.name}"
    assert spec.usage.startswith("stockade " + " ".join(name.split(".")))
    # Every argument the CLI can set exists in a command it sends (`source` is for the proxy).
    sent = [s for s in COMMANDS if (s.cli or s.name) == name]
    cli_params = {p.name for p in command.params} - CLI_ONLY
    assert cli_params <= {p.name for s in sent for p in s.params}
    if "--json" in spec.usage:
        assert "as_json" in {p.name for p in command.params}
    if spec.cli:  # an option of another command (`ban --file` sends ban.batch)
        return
    # The CLI's help text is the table's help text.
    assert command.help == spec.help
    required = {p.name for p in spec.params if p.required}
    assert required <= {p.name for p in command.params}


def test_exit_codes() -> None:
    assert EXIT_CODES == {BAD_INPUT: 2, NOT_FOUND: 1, RUNTIME: 1}


def test_request_drops_unset_arguments() -> None:
    line = request("ban", target="198.18.0.7", ttl=None, reason="x")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"command": "ban", "args": {"target": "198.18.0.7", "reason": "x"}}


def test_decode_valid_request() -> None:
    spec, args = decode_request(request("ban", target="198.18.0.7", ttl="1h"))
    assert spec is COMMANDS_BY_NAME["ban"]
    assert args == {"target": "198.18.0.7", "ttl": "1h"}


def test_args_may_be_omitted() -> None:
    spec, args = decode_request(b'{"command": "bans"}\n')
    assert spec.name == "bans"
    assert args == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json\n", "request is not valid JSON"),
        (b"\xff\xfe\n", "request is not valid JSON"),
        (b"", "request is not valid JSON"),
        (b'["ban"]\n', "request must be a JSON object"),
        (b'"ban"\n', "request must be a JSON object"),
        (b"null\n", "request must be a JSON object"),
        (b'{"command": "explode"}\n', "unknown command 'explode'"),
        (b'{"command": 7}\n', "unknown command 7"),
        (b'{"args": {}}\n', "unknown command None"),
        (b'{"command": "ban", "args": []}\n', "args must be a JSON object"),
        (b'{"command": "ban", "args": null}\n', "args must be a JSON object"),
        (b'{"command": "ban", "args": {}}\n', "ban: missing argument 'target'"),
        (b'{"command": "ban", "args": {"target": null}}\n', "ban: missing argument 'target'"),
        (
            b'{"command": "ban", "args": {"target": "198.18.0.7", "ttk": "1h"}}\n',
            "ban: unknown argument 'ttk'",
        ),
        (b'{"command": "bans", "args": {"all": "yes"}}\n', "bans: unknown argument 'all'"),
        (b'{"command": "ban", "args": {"target": 7}}\n', "ban: target must be a string"),
        (
            b'{"command": "ban", "args": {"target": "198.18.0.7", "ttl": 3600}}\n',
            "ban: ttl must be a string",
        ),
        (
            b'{"command": "allow.add", "args": {"target": ["198.18.0.7"]}}\n',
            "allow.add: target must be a string",
        ),
    ],
)
def test_malformed_requests_are_bad_input(line: bytes, message: str) -> None:
    with pytest.raises(CommandError) as info:
        decode_request(line)
    assert info.value.kind == BAD_INPUT
    assert info.value.message == message


def test_error_wire_round_trip() -> None:
    error = CommandError(BAD_INPUT, "invalid target 'x'", "give an address")
    wire = json.loads(error.to_wire_bytes())
    assert wire == {
        "ok": False,
        "error": {"kind": "bad_input", "message": "invalid target 'x'", "hint": "give an address"},
    }
    back = CommandError.from_wire(wire["error"])
    assert (back.kind, back.message, back.hint) == (
        BAD_INPUT,
        "invalid target 'x'",
        "give an address",
    )


def test_unknown_error_kind_from_the_wire_is_runtime() -> None:
    back = CommandError.from_wire({"kind": "weird", "message": "m"})
    assert (back.kind, back.message, back.hint) == (RUNTIME, "m", None)
    assert CommandError.from_wire({}).message == "unknown error"


def test_encode_is_one_sorted_line() -> None:
    assert encode({"b": 1, "a": "x\ny"}) == b'{"a":"x\\ny","b":1}\n'


# -- dispatch through the handler table, without a kernel ----------------------
@pytest.fixture
def wired(controller: Controller, tmp_path: Path) -> Iterator[tuple[Controller, DryRunMaps]]:
    store = BanStore(tmp_path / "bans.db")
    maps = DryRunMaps()
    controller.store = store
    controller.service = BanService(store, maps, FakeClock(), [parse_target("198.18.200.0/24")])
    yield controller, maps


def dispatch(controller: Controller, command: str, **args: Any) -> dict[str, Any]:
    reply = controller.dispatch(request(command, **args))
    # Every reply is JSON-serialisable in the one reply shape.
    assert json.loads(encode(reply)) == reply
    assert set(reply) in ({"ok", "result"}, {"ok", "error"})
    return reply


def test_dispatch_before_start_is_a_runtime_error(controller: Controller) -> None:
    reply = dispatch(controller, "bans")
    assert reply["ok"] is False
    assert reply["error"]["kind"] == RUNTIME


def test_dispatch_malformed_is_bad_input(controller: Controller) -> None:
    reply = controller.dispatch(b"{nope\n")
    assert reply == {
        "ok": False,
        "error": {"kind": "bad_input", "message": "request is not valid JSON", "hint": None},
    }


def test_dispatch_passes_every_argument(wired: tuple[Controller, DryRunMaps]) -> None:
    controller, maps = wired
    reply = dispatch(
        controller, "ban", target="198.18.0.7/32", ttl="1h", reason="scanner", source="proxy"
    )
    assert reply["ok"] is True
    result = reply["result"]
    assert (result["target"], result["reason"], result["source"]) == (
        "198.18.0.7",
        "scanner",
        "proxy",
    )
    assert result["ttl_remaining"] == 3600
    assert parse_target("198.18.0.7") in maps.bans()

    assert [b["target"] for b in dispatch(controller, "bans")["result"]] == ["198.18.0.7"]
    assert dispatch(controller, "allow.add", target="198.18.9.0/24", reason="office")["ok"]
    listed = dispatch(controller, "allow.list")["result"]
    assert [(a["target"], a["reason"]) for a in listed] == [
        ("198.18.200.0/24", "management network (config)"),
        ("198.18.9.0/24", "office"),
    ]
    assert dispatch(controller, "allow.remove", target="198.18.9.0/24")["ok"]
    assert dispatch(controller, "unban", target="198.18.0.7")["result"] == {
        "target": "198.18.0.7",
        "status": "removed",
    }
    missing = dispatch(controller, "unban", target="198.18.0.7")
    assert missing["error"]["kind"] == NOT_FOUND
    refused = dispatch(controller, "ban", target="198.18.200.9")
    assert refused["error"]["kind"] == BAD_INPUT
    assert maps.bans() == {}
