"""`stockade check-config [FILE]`: everything that would stop a start, found beforehand;
and `stockade completion`."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from cli_harness import one_line_error, run_stockade

BASE = """
[proxy.pools.api]
servers = ["127.0.0.1:9"]
[[proxy.routes]]
pool = "api"
"""


def certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    ca = trustme.CA()
    issued = ca.issue_cert(name)
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def check(path: Path) -> tuple[int, str]:
    result = run_stockade("check-config", str(path))
    return result.returncode, result.stdout + result.stderr


def test_a_good_file_given_as_argument(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path, "api.test")
    path = tmp_path / "new.toml"
    path.write_text(
        f'[[proxy.listeners]]\nport = 8443\ncertificates = [{{ cert = "{cert}", key = "{key}" }}]'
        + BASE
    )
    code, out = check(path)
    assert (code, out.strip()) == (0, f"ok: {path} is valid")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('[xdp]\nmanagement_networks = ["198.18.0.1/24"]\n', "host bits are set"),
        ("[proxy]\nworkres = 2\n", "did you mean proxy.workers"),
        ('[proxy]\nworkers = "two"\n', "expected an integer"),
        ("[proxy\n", "stockade.toml"),
    ],
    ids=["cidr-host-bits", "unknown-key", "type", "syntax"],
)
def test_config_level_problems(tmp_path: Path, extra: str, expected: str) -> None:
    path = tmp_path / "stockade.toml"
    path.write_text(extra + BASE)
    code, out = check(path)
    assert code == 2 and expected in out


def test_files_it_names_must_load(tmp_path: Path) -> None:
    cert, _ = certificate(tmp_path, "api.test")
    _, other_key = certificate(tmp_path, "other.test")
    mismatched = tmp_path / "mismatch.toml"
    mismatched.write_text(
        f'[[proxy.listeners]]\nport = 8443\ncertificates = [{{ cert = "{cert}", '
        f'key = "{other_key}" }}]' + BASE
    )
    code, out = check(mismatched)
    assert code == 2 and "does not match" in out

    missing = tmp_path / "missing.toml"
    missing.write_text(
        f'[[proxy.listeners]]\nport = 8443\ncertificates = [{{ cert = "{tmp_path}/nope.pem", '
        f'key = "{tmp_path}/nope.key" }}]' + BASE
    )
    code, out = check(missing)
    assert code == 2 and "nope.pem" in out

    rate_map = tmp_path / "tenants.map"
    rate_map.write_text("gold lots\n")
    bad_map = tmp_path / "map.toml"
    bad_map.write_text(
        f'[proxy.rate_limiting.limits.t]\nrate = "1/s"\nkey = "header:X-T"\nmap = "{rate_map}"\n'
        + BASE
    )
    code, out = check(bad_map)
    assert code == 2 and f"{rate_map}:1" in out
    result = run_stockade("check-config", str(bad_map))
    assert one_line_error(result).startswith("stockade: ")


def test_completion_scripts() -> None:
    for shell, marker in (("bash", "complete -o"), ("zsh", "compdef"), ("fish", "complete ")):
        result = run_stockade("completion", shell)
        assert result.returncode == 0, result.stderr
        assert "_STOCKADE_COMPLETE" in result.stdout and marker in result.stdout
    assert run_stockade("completion", "tcsh").returncode == 2
