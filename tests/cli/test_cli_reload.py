"""`stockade reload` and SIGHUP for the controller: what applies, what needs a restart,
and a broken config that changes nothing."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_harness import Controller, one_line_error, require_root

from stockade.protocol import CommandError

pytestmark = pytest.mark.kernel


@pytest.fixture
def own(tmp_path: Path) -> Iterator[Controller]:
    """A controller of this test's own: the test rewrites its config."""
    require_root()
    ctl = Controller(tmp_path, Path(f"/sys/fs/bpf/stockade-reload-{os.getpid()}"))
    try:
        ctl.start()
        yield ctl
        if ctl.proc is not None:
            assert ctl.stop() == 0, ctl.log_tail()
    finally:
        ctl.kill()
        ctl.remove_pins()


def edit(ctl: Controller, old: str, new: str) -> None:
    text = ctl.config.read_text()
    assert old in text
    ctl.config.write_text(text.replace(old, new))


def test_reload_applies_runtime_settings_and_reports_the_rest(own: Controller) -> None:
    assert own.ok_json("status")["syn_rate"]["rate"] == 200
    edit(own, "[xdp]\n", "[xdp]\nsyn_rate = 50\nsyn_burst = 60\n")
    edit(
        own,
        'management_networks = ["198.18.200.0/24"]',
        'management_networks = ["198.18.200.0/24", "198.18.201.0/24"]',
    )
    edit(own, "max_bans_v4 = 1024", "max_bans_v4 = 2048")  # only with a restart
    result = own.ok_json("reload")
    assert result["controller"]["status"] == "reloaded"
    assert result["controller"]["needs_restart"] == ["xdp map sizes"]
    assert result["proxy"] == {"status": "not_running"}
    status = own.ok_json("status")
    assert (status["syn_rate"]["rate"], status["syn_rate"]["burst"]) == (50, 60)
    allowed = {entry["target"] for entry in own.ok_json("allow", "list")}
    assert "198.18.201.0/24" in allowed


def test_a_broken_config_is_refused_and_nothing_changes(own: Controller) -> None:
    before = own.ok_json("status")
    edit(own, "[xdp]\n", "[xdp]\nsyn_rate = 50\nsyn_rate_typo = 1\n")
    refused = own.cli("reload")  # the CLI reads the file first and refuses it itself
    assert refused.returncode == 2
    assert "did you mean xdp.syn_rate?" in one_line_error(refused)
    with pytest.raises(CommandError) as controller_refused:  # and so does the controller
        own.api("reload")
    assert controller_refused.value.kind == "bad_input"
    assert "reload refused" in controller_refused.value.message
    edit(own, "syn_rate_typo = 1\n", "")
    after = json.loads(own.cli("--socket", str(own.socket), "status", "--json").stdout)
    assert after["syn_rate"] == before["syn_rate"]
    assert own.proc is not None and own.proc.poll() is None  # still running


def test_sighup_reloads_too(own: Controller) -> None:
    edit(own, "[xdp]\n", "[xdp]\nsyn_rate = 77\n")
    os.kill(own.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if own.ok_json("status")["syn_rate"]["rate"] == 77:
            break
        time.sleep(0.1)
    assert own.ok_json("status")["syn_rate"]["rate"] == 77
    assert "config reloaded" in own.log.read_text()
    assert json.loads(own.cli("status", "--json").stdout)["pid"] == own.pid
