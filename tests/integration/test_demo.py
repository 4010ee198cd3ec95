"""`make demo` runs end to end and shows what it promises."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from pyroute2 import netns

pytestmark = [pytest.mark.kernel, pytest.mark.netns]


def test_demo_bans_one_client_and_cleans_up() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stockade.lab.demo"], capture_output=True, text=True, timeout=180
    )
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    banned_part, _, after_unban = out.partition("Unban ")
    before_ban, _, while_banned = banned_part.partition("Ban 198.18.0.10")
    assert before_ban.count("HTTP 200") == 2
    assert "[client 198.18.0.10]" in while_banned and "no answer" in while_banned
    assert 'HTTP 200 {"client": "198.18.0.11"' in while_banned
    assert re.search(r"drop_ban\s+[1-9]", while_banned)
    assert 'HTTP 200 {"client": "198.18.0.10"' in after_unban
    match = re.search(r"Lab (\w+) is up", out)
    assert match
    prefix = match.group(1)
    assert not [name for name in netns.listnetns() if name.startswith(f"{prefix}-")]
