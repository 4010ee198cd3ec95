"""The shell scripts that set up hosts: one apt list, shellcheck-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from install_harness import REPO

SCRIPTS = REPO / "scripts"
LIB = SCRIPTS / "lib" / "debian.sh"
SHELL_SCRIPTS = [
    SCRIPTS / "bootstrap",
    SCRIPTS / "install",
    SCRIPTS / "uninstall",
    SCRIPTS / "typecheck",
    LIB,
]


def bash(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; . {LIB}; {script}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def package_list(name: str) -> list[str]:
    result = bash(f'printf "%s\\n" "${{{name}[@]}}"')
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing; install it (scripts/bootstrap does)", pytrace=False)
    result = subprocess.run(
        ["shellcheck", "-x", str(script)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS[:3], ids=lambda p: p.name)
def test_strict_mode(script: Path) -> None:
    assert "\nset -euo pipefail\n" in script.read_text()


def test_one_package_list_for_bootstrap_and_install() -> None:
    runtime = package_list("STOCKADE_RUNTIME_PACKAGES")
    dev = package_list("STOCKADE_DEV_PACKAGES")
    assert {"python3-bpfcc", "python3-venv", "linux-headers-amd64", "libmodsecurity3"} <= set(
        runtime
    )
    assert {"systemd", "shellcheck"} <= set(dev)
    for name, wanted in (("bootstrap", ("RUNTIME", "DEV")), ("install", ("RUNTIME",))):
        text = (SCRIPTS / name).read_text()
        assert '. "$ROOT/scripts/lib/debian.sh"' in text, name
        calls = re.findall(r"^stockade_apt_ensure .*$", text, re.M)
        assert len(calls) == 1, (name, calls)
        for kind in wanted:
            assert f"STOCKADE_{kind}_PACKAGES" in calls[0], (name, calls)
        # no second list of packages hidden in the script (prometheus is the one
        # exception: installed without recommends, its service disabled)
        for line in text.splitlines():
            if "apt-get install" in line:
                assert name == "bootstrap" and line.rstrip(" \\").endswith("prometheus"), line


def test_every_listed_package_is_installed_here() -> None:
    """The bootstrap ran before the tests: nothing on either list is missing."""
    result = bash(
        'stockade_missing_packages "${STOCKADE_RUNTIME_PACKAGES[@]}" "${STOCKADE_DEV_PACKAGES[@]}"'
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", f"not installed: {result.stdout.split()}"


def test_missing_packages_names_only_the_missing() -> None:
    result = bash("stockade_missing_packages bash stockade-no-such-package coreutils")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["stockade-no-such-package"]


def test_apt_ensure_does_nothing_when_all_are_installed(tmp_path: Path) -> None:
    ran = tmp_path / "apt-get-ran"
    fake = tmp_path / "apt-get"
    fake.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    fake.chmod(0o755)
    result = subprocess.run(
        ["bash", "-c", f"set -euo pipefail; . {LIB}; stockade_apt_ensure test bash coreutils"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": f"{tmp_path}:/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert not ran.exists(), "apt-get ran although every package was installed"
    # and a missing package does go to apt-get (the fake one, which fails)
    result = subprocess.run(
        ["bash", "-c", f"set -euo pipefail; . {LIB}; stockade_apt_ensure test no-such-pkg-x"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": f"{tmp_path}:/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    assert ran.exists()
    assert result.returncode != 0
    assert "installing apt packages: no-such-pkg-x" in result.stdout
