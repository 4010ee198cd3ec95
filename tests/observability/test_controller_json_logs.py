"""The real controller with `log_format = "json"`: one JSON object a line from its start
to its reload, with the common fields and no secret; a reload to "text" switches it."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from obs_harness import require_root, running_controller

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TEXT = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ stockade[.\w]*: .*")


def test_json_until_a_reload_says_text(tmp_path_factory: pytest.TempPathFactory) -> None:
    require_root()
    home = tmp_path_factory.mktemp("json-controller")
    with running_controller(home, 'log_format = "json"') as ctl:
        # an operator typed a password into a reason: it must not reach the log
        ctl.api("ban", target="198.18.0.9", ttl="1m", reason="password=hunter2")
        ctl.config.write_text(ctl.config.read_text().replace('"json"', '"text"'))
        ctl.api("reload")
        ctl.api("unban", target="198.18.0.9")
        pid = ctl.proc.pid
    text = (home / "controller.log").read_text()
    assert "hunter2" not in text
    lines = text.splitlines()
    first_text = next(i for i, line in enumerate(lines) if not line.startswith("{"))
    before: list[dict[str, Any]] = [json.loads(line) for line in lines[:first_text]]
    after = lines[first_text:]

    assert len(before) >= 3  # the start, the reconcile, the ban
    for line in before:
        assert list(line)[:5] == ["time", "level", "logger", "message", "pid"], line
        assert RFC3339.fullmatch(line["time"]) and line["pid"] == pid
        assert line["logger"].startswith("stockade.")
    (ban,) = [line for line in before if line["message"].startswith("ban added 198.18.0.9")]
    assert (ban["level"], ban["logger"]) == ("info", "stockade.controller.service")
    assert "[redacted]" in ban["message"]

    assert all(TEXT.fullmatch(line) for line in after), after
    assert any("config reloaded" in line for line in after)
    assert any(
        line.endswith("INFO stockade.controller.service: unban 198.18.0.9") for line in after
    )
