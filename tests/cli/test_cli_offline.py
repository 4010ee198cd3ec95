"""The CLI without a controller: help, version, config errors, controller down."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from cli_harness import one_line_error, run_stockade
from click.testing import CliRunner

from stockade import __version__
from stockade.cli.main import cli


def all_commands(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*path, name))


# `stockade lab` (cli/lab.py) is the lab's own tool and tested with the lab.
COMMAND_PATHS = [path for path, _ in all_commands(cli)]


def test_the_walk_finds_the_commands() -> None:
    for expected in [("ban",), ("unban",), ("bans",), ("allow", "add"), ("controller", "run")]:
        assert expected in COMMAND_PATHS


def test_top_level_help_has_examples() -> None:
    result = run_stockade("--help")
    assert result.returncode == 0
    assert "Examples:" in result.stdout
    assert "stockade ban 198.18.0.7" in result.stdout
    assert run_stockade("-h").stdout == result.stdout


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=" ".join)
def test_every_subcommand_help_has_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="stockade")
    assert result.exit_code == 0, result.output
    assert f"Usage: stockade {' '.join(path)}" in result.stdout
    assert "Example" in result.stdout
    assert "  stockade " in result.stdout.split("Example", 1)[1]


def test_version() -> None:
    result = run_stockade("--version")
    assert result.returncode == 0
    assert result.stdout == f"stockade, version {__version__}\n"


@pytest.fixture
def dead_socket(tmp_path: Path) -> Path:
    """A socket file nothing listens on (a controller that died)."""
    path = tmp_path / "control.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return path


COMMANDS_NEEDING_THE_CONTROLLER = [
    ["bans"],
    ["bans", "--json"],
    ["ban", "198.18.0.7", "--ttl", "1h"],
    ["unban", "198.18.0.7"],
    ["allow", "list"],
    ["stats", "--json"],
    ["status"],
]


@pytest.mark.parametrize("args", COMMANDS_NEEDING_THE_CONTROLLER, ids=" ".join)
@pytest.mark.parametrize("where", ["missing", "nothing-listens"])
def test_controller_not_running(
    args: list[str], where: str, tmp_path: Path, dead_socket: Path
) -> None:
    path = tmp_path / "no" / "control.sock" if where == "missing" else dead_socket
    result = run_stockade("--socket", str(path), *args)
    assert result.returncode == 1
    assert result.stdout == ""
    line = one_line_error(result)
    assert line.startswith("stockade: the controller is not running (")
    assert str(path) in line
    assert "start it with `systemctl start stockade-controller` or `stockade controller run`" in (
        line
    )


def test_socket_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.sock"
    result = run_stockade("bans", env={"STOCKADE_SOCKET": str(path)})
    assert result.returncode == 1
    assert f"the controller is not running (no socket at {path})" in one_line_error(result)


def test_missing_config_file_is_bad_input(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = run_stockade("--config", str(missing), "bans")
    assert result.returncode == 2
    assert one_line_error(result) == (
        f"stockade: config file {missing} does not exist; check it with `stockade check-config`"
    )


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "stockade.toml"
    path.write_text('[xdp]\nmax_bans_v4 = "lots"\n')
    result = run_stockade("--config", str(path), "bans")
    assert result.returncode == 2
    assert "xdp.max_bans_v4: expected an integer, got str" in one_line_error(result)


def test_check_config(tmp_path: Path) -> None:
    path = tmp_path / "stockade.toml"
    path.write_text('[xdp]\nmanagement_networks = ["198.18.200.0/24"]\n')
    good = run_stockade("--config", str(path), "check-config")
    assert (good.returncode, good.stdout, good.stderr) == (0, f"ok: {path} is valid\n", "")
    path.write_text('[xdp]\nmanagement_networks = ["198.18.200.1/24"]\n')
    bad = run_stockade("--config", str(path), "check-config")
    assert bad.returncode == 2
    assert "did you mean 198.18.200.0/24?" in one_line_error(bad)
    path.write_text("[xdp]\nmonitr = true\n")
    typo = run_stockade("--config", str(path), "check-config")
    assert typo.returncode == 2
    assert "unknown key xdp.monitr; did you mean xdp.monitor?" in one_line_error(typo)


def test_bad_target_is_refused_before_contacting_the_controller(tmp_path: Path) -> None:
    # exit 2 (bad input), not 1 (controller down): input is checked first
    result = run_stockade("--socket", str(tmp_path / "none.sock"), "ban", "198.18.0.7/24")
    assert result.returncode == 2
    assert "did you mean 198.18.0.0/24?" in one_line_error(result)


def test_bare_group_prints_its_help() -> None:
    result = CliRunner().invoke(cli, ["allow"], prog_name="stockade")
    assert "Commands:" in result.output
    assert "add" in result.output
