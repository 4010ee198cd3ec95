"""`stockade waf tune` as a user runs it: exit codes, one-line errors, --json, --write.

The access logs here are written by the proxy's own writer (proxy/access_log.py)
from request contexts carrying recorded WAF matches, so they are the lines the
proxy writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_harness import one_line_error, run_stockade

from stockade.proxy.access_log import AccessLog
from stockade.proxy.context import RequestContext
from stockade.proxy.settings import Route
from stockade.proxy.waf.findings import Match, Matches

CONFIG = """\
[proxy]
access_log = "{log}"

[proxy.pools.api]
servers = ["127.0.0.1:9"]

[[proxy.routes]]
name = "api"
path_prefix = "/api/"
pool = "api"
waf = "crs"
waf_action = "detect"

[[proxy.routes]]
name = "rest"
path_prefix = "/"
pool = "api"
"""


def _log(path: Path, requests: list[tuple[str, list[tuple[str, str, int]]]]) -> None:
    """Access-log lines for route api: (client, [(rule, variable, points)]) each."""
    writer = AccessLog(str(path))
    route = Route("api", "api")
    for n, (client, matches) in enumerate(requests):
        ctx = RequestContext(f"req{n}", client, client, False, "https", path="/api/x", route=route)
        ctx.status, ctx.reason = 200, "waf_detect:blocked"
        found = Matches(tuple(Match(r, v, p) for r, v, p in matches), sum(p for *_, p in matches))
        ctx.waf_record = found.as_json("crs")
        writer.write(ctx, "POST")
    plain = RequestContext(
        "plain", "198.18.0.1", "198.18.0.1", False, "https", path="/api/y", route=route
    )
    plain.status = 200
    writer.write(plain, "GET")
    writer.flush()
    writer._out.close()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "access.log"
    config = tmp_path / "stockade.toml"
    config.write_text(CONFIG.format(log=log))
    benign = [(f"198.18.0.{n}", [("942360", "ARGS:json.address.line1", 5)]) for n in range(4)]
    header = [("198.18.1.1", [("920350", "REQUEST_HEADERS:Host", 5)])]
    attack = [
        (
            "198.18.2.2",
            [("942100", "ARGS:json.q", 5), ("942190", "ARGS:json.q", 5), ("942360", "ARGS:q", 5)],
        )
    ]
    _log(log, benign + header + attack)
    return config, log


def _tune(config: Path, *args: str) -> Any:
    return run_stockade("--config", str(config), "waf", "tune", "--route", "api", *args)


def test_json_reports_proposals_and_changes_nothing(setup: tuple[Path, Path]) -> None:
    config, _ = setup
    before = config.read_text()
    result = _tune(config, "--json", "--no-replay")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] == 7 and report["flagged"] == 6
    by_rule = {p["rule"]: p for p in report["proposals"]}
    assert by_rule["942360"]["arguments"] == ["json.address.line1"]
    assert by_rule["942360"]["clients"] == 4 and by_rule["942360"]["would_pass"] == 4
    assert by_rule["920350"]["scope"] == "rule" and by_rule["920350"]["arguments"] == []
    assert report["chosen"] == 1  # the whole-rule one only when asked for with --rule
    assert report["likely_attacks"] == 1 and report["likely_attack_samples"] == ["req5"]
    assert report["written"] is None and report["replay"] is None
    assert config.read_text() == before


def test_the_replay_shows_what_block_mode_would_refuse(setup: tuple[Path, Path]) -> None:
    config, _ = setup
    result = _tune(config, "--json")
    assert result.returncode == 0, result.stderr
    # in block mode with the chosen exclusion: the header misfire and the attack refused
    assert json.loads(result.stdout)["replay"]["by_change"] == {"allowed -> waf:blocked": 2}


def test_write_adds_the_chosen_and_whole_rules_only_when_named(setup: tuple[Path, Path]) -> None:
    config, _ = setup
    result = _tune(config, "--write", "--no-replay")
    assert result.returncode == 0, result.stderr
    text = config.read_text()
    assert text.count("[[proxy.routes.waf_exclusions]]") == 1
    assert 'arguments = ["json.address.line1"]' in text and "920350" not in text
    assert "Written to" in result.stdout
    assert run_stockade("check-config", str(config)).returncode == 0

    named = _tune(config, "--rule", "920350", "--write", "--json", "--no-replay")
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout)["written"]["config"] == str(config)
    text = config.read_text()
    assert text.count("[[proxy.routes.waf_exclusions]]") == 2 and "rules = [920350]" in text
    again = json.loads(_tune(config, "--json", "--no-replay").stdout)
    assert again["proposals"] == [] and again["already_passing"] == 5
    assert len(list(config.parent.glob("stockade.toml.*.bak"))) == 2


def test_a_file_it_cannot_edit_is_left_as_it_was(setup: tuple[Path, Path]) -> None:
    config, log = setup
    inline = (
        f'[proxy]\naccess_log = "{log}"\nroutes = [{{ name = "api", path_prefix = "/", '
        'pool = "api", waf = "crs", waf_action = "detect" }]\n\n'
        '[proxy.pools.api]\nservers = ["127.0.0.1:9"]\n'
    )
    config.write_text(inline)
    result = _tune(config, "--write", "--json", "--no-replay")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "nothing was changed" in one_line_error(result)
    assert config.read_text() == inline
    assert [p.name for p in config.parent.iterdir()] == sorted(["access.log", "stockade.toml"])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--route", "nope"), "no route named 'nope' (routes: api, rest)"),
        (("--route", "rest"), "route 'rest' has waf = \"off\""),
        (("--route", "api", "--rule", "94x"), "--rule '94x' is not a rule id"),
        (("--route", "api", "--log", "/nonexistent/access.log"), "no access log at"),
        (("--route", "api", "--attack-score", "0"), "--attack-score"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    setup: tuple[Path, Path], args: tuple[str, ...], says: str
) -> None:
    config, _ = setup
    before = config.read_text()
    result = run_stockade("--config", str(config), "waf", "tune", *args, "--write", "--json")
    assert result.returncode == 2, result.stderr
    assert says in one_line_error(result)
    assert result.stdout == "" and config.read_text() == before


def test_an_access_log_on_stderr_needs_log(tmp_path: Path) -> None:
    config = tmp_path / "stockade.toml"
    config.write_text(CONFIG.replace('access_log = "{log}"', 'access_log = "-"'))
    result = run_stockade("--config", str(config), "waf", "tune", "--route", "api")
    assert result.returncode == 2
    assert "--log" in one_line_error(result)
