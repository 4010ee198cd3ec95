"""Bulk operations through the CLI, the real controller and the kernel maps:
`ban --file`, `unban --file`, `unban --all`, `bans --source/--filter`.

A file is all or nothing: one bad line (found by the CLI, or by the
controller against its allowlist and minimum prefix) refuses it with exit 2
and one line, and the store and the kernel maps stay exactly as they were.
"""

from __future__ import annotations

import json
import os
import socket as socketlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_harness import (
    STOCKADE,
    Controller,
    one_line_error,
    require_root,
    run_stockade,
    stockade_env,
)

from stockade.config import load_config
from stockade.control_client import batch_lines
from stockade.controller.daemon import program_settings
from stockade.protocol import MAX_BATCH, request

pytestmark = pytest.mark.kernel

BIG = 16_384  # the ban_v4 map of this module's controller (the harness default is 1024)
LOAD_SECONDS = 5.0  # 10,000 bans from a file, Python's start included ("well under a few s")


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    require_root()
    home = tmp_path_factory.mktemp("clibatch")
    ctl = Controller(home, Path(f"/sys/fs/bpf/stockade-clibatch-{os.getpid()}"))
    ctl.config.write_text(
        ctl.config.read_text().replace("max_bans_v4 = 1024", f"max_bans_v4 = {BIG}")
    )
    ctl.settings = program_settings(load_config(ctl.config))
    ctl.pin_dir = ctl.settings.pin_dir
    try:
        ctl.start()
        yield ctl
        if ctl.proc is not None:
            assert ctl.stop() == 0, ctl.log_tail()
    finally:
        ctl.kill()
        ctl.remove_pins()


@pytest.fixture
def ctl(controller: Controller) -> Iterator[Controller]:
    yield controller
    if controller.proc is not None:  # one request, however many bans
        controller.api("unban.all", force=True)
        for allow in controller.api("allow.list"):
            if allow["source"] != "config":
                controller.api("allow.remove", target=allow["target"])


def addresses(count: int, third: int = 0) -> list[str]:
    return [f"198.18.{third + i // 250}.{i % 250 + 1}" for i in range(count)]


def ban_file(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def ten_thousand() -> list[str]:
    """10,000 targets in every form a file may use, with comments and blank lines."""
    lines = ["# bans from the 03:00 report", ""]
    for i, target in enumerate(addresses(10_000)):
        form = i % 4
        if form == 0:
            lines.append(target)
        elif form == 1:
            lines.append(f"{target}  1h  scanner from the report")
        elif form == 2:
            lines.append(f"{target} - brute force")
        else:
            lines.append(json.dumps({"target": target, "ttl": "7d", "reason": "json line"}))
    return lines


@pytest.fixture
def populated(ctl: Controller) -> Controller:
    ctl.api("ban", target="198.18.250.50", ttl="1h", reason="existing")
    ctl.api("ban", target="fd00:50::/64")
    ctl.api("allow.add", target="198.18.251.0/24", reason="office")
    return ctl


def refused(ctl: Controller, *args: str, code: int = 2, stdin: str | None = None) -> str:
    before = ctl.state()
    assert len(before["kernel"]["ban_v4"]) == 1  # the state compared is not empty
    result = ctl.cli(*args) if stdin is None else _cli_stdin(ctl, stdin, *args)
    assert result.returncode == code, (result.stdout, result.stderr[-2000:])
    assert result.stdout == ""
    line = one_line_error(result)
    assert ctl.state() == before
    return line


def _cli_stdin(ctl: Controller, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STOCKADE, "--config", str(ctl.config), *args],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        env=stockade_env(),
        check=False,
    )


# -- ban --file ---------------------------------------------------------------------------
def test_ten_thousand_bans_from_a_file_load_in_seconds(ctl: Controller, tmp_path: Path) -> None:
    path = ban_file(tmp_path / "bans.txt", ten_thousand())
    started = time.monotonic()
    result = ctl.cli("ban", "--file", str(path), "--json")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "status": "banned",
        "entries": 10_000,
        "targets": 10_000,
        "added": 10_000,
        "updated": 0,
    }
    assert took < LOAD_SECONDS, f"10,000 bans took {took:.1f}s"
    listed = {b["target"]: b for b in ctl.api("bans")}
    assert len(listed) == 10_000
    assert len(ctl.dump_map("ban_v4")) == 10_000
    first, second, third, fourth = addresses(4)
    assert (listed[first]["expires"], listed[first]["reason"]) == (None, "manual ban")
    assert listed[second]["ttl_remaining"] == pytest.approx(3600, abs=30)
    assert listed[second]["reason"] == "scanner from the report"
    assert (listed[third]["expires"], listed[third]["reason"]) == (None, "brute force")
    assert listed[fourth]["ttl_remaining"] == pytest.approx(7 * 86400, abs=30)
    assert listed[fourth]["reason"] == "json line"
    plain = ctl.cli("ban", "--file", str(path))
    assert plain.stdout == (f"banned: 10000 targets from {path} (0 added, 10000 updated)\n"), (
        plain.stderr
    )


def test_defaults_from_the_command_line_and_stdin(ctl: Controller) -> None:
    text = "198.18.0.1\n198.18.0.2 - own reason\n198.18.0.3 1m\n"
    result = _cli_stdin(ctl, text, "ban", "--file", "-", "--ttl", "2h", "--reason", "default")
    assert result.returncode == 0, result.stderr
    listed = {b["target"]: b for b in ctl.api("bans")}
    assert listed["198.18.0.1"]["reason"] == "default"
    assert listed["198.18.0.1"]["ttl_remaining"] == pytest.approx(7200, abs=30)
    assert listed["198.18.0.2"]["reason"] == "own reason"
    assert listed["198.18.0.3"]["ttl_remaining"] == pytest.approx(60, abs=30)


BAD_LINES = [
    ("198.18.0.300", "invalid target '198.18.0.300'"),
    ("fd00::12%x", "zone id"),
    ("198.18.0.9 ٣s", "invalid duration"),
    ("198.18.0.9 1x", "invalid duration '1x'"),
    ("198.18.0.9 99999d", "at most"),
    ('{"target": "198.18.0.9", "ttl": 60}', "ttl must be a string"),
    ('{"target": "198.18.0.9", "oops": 1}', "unknown field 'oops'"),
    ("{not json", "not a valid JSON object"),
    ("198.18.0.9 1h " + "x" * 201, "at most 200"),
    ("198.18.0.9 " + "1" * 5000, "longer than 4096 bytes"),
]


@pytest.mark.parametrize(("bad", "error"), BAD_LINES, ids=lambda v: repr(v)[:40])
def test_one_bad_line_refuses_the_file(
    populated: Controller, tmp_path: Path, bad: str, error: str
) -> None:
    lines = ten_thousand()
    lines[7_777] = bad  # file line 7778 (the list starts at line 1)
    path = ban_file(tmp_path / "bans.txt", lines)
    line = refused(populated, "ban", "--file", str(path))
    assert line.startswith(f"stockade: {path}: 1 of 10000 lines refused, nothing was sent: ")
    assert "line 7778: " in line and error in line


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("198.18.251.7", "inside 198.18.251.0/24, in the allowlist"),
        ("198.18.200.9 1h", "a management network in the config"),
        ("0.0.0.0/0", "refusing to ban 0.0.0.0/0"),
        ("::/0 - everything", "refusing to ban ::/0"),
    ],
)
def test_the_controller_refuses_the_whole_file_for_one_line(
    populated: Controller, tmp_path: Path, bad: str, error: str
) -> None:
    lines = ten_thousand()
    lines[5_000] = bad
    path = ban_file(tmp_path / "bans.txt", lines)
    line = refused(populated, "ban", "--file", str(path))
    assert line.startswith(f"stockade: {path}: 1 of 10000 targets refused, nothing was banned: ")
    assert "line 5001 (" in line and error in line


def test_force_lets_a_broad_prefix_in_a_file(ctl: Controller, tmp_path: Path) -> None:
    path = ban_file(tmp_path / "bans.txt", ["10.0.0.0/7", "198.18.0.1"])
    assert ctl.cli("ban", "--file", str(path)).returncode == 2
    assert ctl.ok_json("ban", "--file", str(path), "--force")["targets"] == 2


def test_verbose_lists_every_refused_line(populated: Controller, tmp_path: Path) -> None:
    path = ban_file(tmp_path / "bans.txt", ["198.18.0.1", "bad-1", "198.18.0.2", "bad-2"] * 3)
    before = populated.state()
    result = populated.cli("-v", "ban", "--file", str(path))
    assert result.returncode == 2
    listed = [line for line in result.stderr.splitlines() if line.startswith(f"stockade: {path}:")]
    assert [line.split(":")[2] for line in listed[:-1]] == ["2", "4", "6", "8", "10", "12"]
    assert "6 of 12 lines refused" in listed[-1] and "and 3 more" in listed[-1]
    assert populated.state() == before


@pytest.mark.parametrize(
    ("args", "error", "code"),
    [
        (["ban", "--file", "/nonexistent/bans.txt"], "no such file", 2),
        (["ban", "198.18.0.1", "--file", "x"], "give a TARGET or --file FILE", 2),
        (["unban", "198.18.0.1", "--all"], "give a TARGET, --file FILE or --all", 2),
        (["unban", "--source", "cli", "198.18.0.1"], "go with --all", 2),
    ],
)
def test_bad_invocations(populated: Controller, args: list[str], error: str, code: int) -> None:
    assert error in refused(populated, *args, code=code)


def test_an_empty_file_is_refused(populated: Controller, tmp_path: Path) -> None:
    path = ban_file(tmp_path / "bans.txt", ["# nothing", ""])
    assert "no targets in it" in refused(populated, "ban", "--file", str(path))


# -- unban --file and --all ------------------------------------------------------------------
def test_unban_file_takes_the_ban_file_and_is_all_or_nothing(
    populated: Controller, tmp_path: Path
) -> None:
    path = ban_file(tmp_path / "bans.txt", ten_thousand())
    assert populated.ok_json("ban", "--file", str(path))["targets"] == 10_000
    stray = ban_file(tmp_path / "stray.txt", [*ten_thousand(), "198.18.99.99"])
    line = refused_unban(populated, stray)
    assert "1 of 10000" not in line and "line 10003 (198.18.99.99): not banned" in line
    result = populated.ok_json("unban", "--file", str(path))
    assert (result["status"], result["targets"]) == ("removed", 10_000)
    assert [b["target"] for b in populated.api("bans")] == ["198.18.250.50", "fd00:50::/64"]
    assert len(populated.dump_map("ban_v4")) == 1


def refused_unban(ctl: Controller, path: Path) -> str:
    before = ctl.state()
    result = ctl.cli("unban", "--file", str(path))
    assert result.returncode == 1, result.stderr  # not banned: as `stockade unban` says it
    assert result.stdout == ""
    assert ctl.state() == before
    return one_line_error(result)


def test_unban_all_with_filters(ctl: Controller) -> None:
    ctl.api("ban", target="198.18.0.1", reason="Scanner (nightly)")
    ctl.api("ban", target="198.18.0.2", reason="brute force")
    ctl.api("ban", target="198.18.0.3", reason="scanner", source="proxy")
    ctl.api("rule.ban", target="198.18.0.4", ttl="10m", rule="probe")
    assert ctl.ok_json("unban", "--all", "--source", "proxy")["count"] == 1
    assert ctl.ok_json("unban", "--all", "--reason-match", "SCANNER")["count"] == 1
    assert sorted(b["target"] for b in ctl.api("bans")) == ["198.18.0.2", "198.18.0.4"]
    keys = sorted(e["formatted"]["key"]["addr"][3] for e in ctl.dump_map("ban_v4"))
    assert keys == [2, 4]
    plain = ctl.cli("unban", "--all", "--source", "rule")
    assert plain.stdout == "removed: 1 bans (source rule)\n"


def test_unban_all_without_a_filter_needs_force(populated: Controller) -> None:
    line = refused(populated, "unban", "--all")
    assert "lifts every ban (2)" in line and line.endswith("add --force if you mean it")
    assert populated.ok_json("unban", "--all", "--force")["count"] == 2
    assert populated.api("bans") == [] and populated.dump_map("ban_v4") == []
    assert [a["target"] for a in populated.api("allow.list")][-1] == "198.18.251.0/24"


def test_bans_filters(ctl: Controller) -> None:
    ctl.api("ban", target="198.18.0.1", reason="Scanner")
    ctl.api("ban", target="198.18.4.0/24", reason="botnet")
    ctl.api("ban", target="fd00::7", reason="scanner", source="proxy")
    assert [b["target"] for b in ctl.ok_json("bans", "--filter", "scan")] == [
        "198.18.0.1",
        "fd00::7",
    ]
    assert [b["target"] for b in ctl.ok_json("bans", "--source", "proxy")] == ["fd00::7"]
    assert [b["target"] for b in ctl.ok_json("bans", "--filter", "198.18.4.")] == ["198.18.4.0/24"]
    assert ctl.ok_json("bans", "--source", "rule") == []
    result = run_stockade("--config", str(ctl.config), "bans", "--source", "nobody")
    assert result.returncode == 2 and "unknown source 'nobody'" in one_line_error(result)


def test_staging_is_bounded_across_connections_and_freed_when_one_closes(
    populated: Controller, tmp_path: Path
) -> None:
    # another connection stages all but a few entries of the budget and stays open
    held = [{"target": "198.18.0.1"}] * (MAX_BATCH - 5)
    other = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    with other, other.makefile("rb") as replies:  # both: the file holds the socket open
        other.settimeout(60)
        other.connect(str(populated.socket))
        staged = 0
        for _, line in batch_lines("ban.batch", held)[:-1]:  # never the commit
            other.sendall(line)
            staged = json.loads(replies.readline())["result"]["staged"]
        other.sendall(request("ban.batch", entries=held[: MAX_BATCH - 5 - staged]))
        assert json.loads(replies.readline())["result"]["staged"] == MAX_BATCH - 5
        path = ban_file(tmp_path / "bans.txt", addresses(20, 100))
        line = refused(populated, "ban", "--file", str(path), code=1)
        assert "other connections hold" in line and "nothing was changed" in line
    # that connection closed: what it staged is gone, and the budget with it
    deadline = time.monotonic() + 10
    while (result := populated.cli("ban", "--file", str(path))).returncode != 0:
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.1)  # the controller drops the staged batch as it sees the hang-up
    assert len(populated.api("bans")) == 2 + 20
