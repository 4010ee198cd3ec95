"""vagrant/Vagrantfile: valid Ruby, a Debian 12 VM, provisioned by the scripts the tests use.

Booting a VM is not possible here; `ruby -c` checks the syntax (the
bootstrap installs ruby), `vagrant validate` runs too where Vagrant is
installed, and the rest is read from the file.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from install_harness import REPO

VAGRANTFILE = REPO / "vagrant" / "Vagrantfile"
TEXT = VAGRANTFILE.read_text()


def make_targets() -> set[str]:
    makefile = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.M))


def test_ruby_syntax() -> None:
    if shutil.which("ruby") is None:
        pytest.fail("ruby is missing; install it (scripts/bootstrap does)", pytrace=False)
    result = subprocess.run(
        ["ruby", "-c", str(VAGRANTFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr


def test_debian_12_with_2_cpus_and_2_gib() -> None:
    assert re.search(r'config\.vm\.box = "debian/bookworm64"', TEXT)
    for provider in ("vb", "lv"):
        assert f"{provider}.cpus = 2" in TEXT
        assert f"{provider}.memory = 2048" in TEXT


def test_provisioning_is_bootstrap_then_tests_then_demo() -> None:
    steps = re.findall(r'^\s*"(\w+)" => "([^"]+)",?$', TEXT, re.M)
    assert steps == [
        ("bootstrap", "./scripts/bootstrap"),
        ("test", "make test"),
        ("demo", "make demo"),
    ]
    assert (REPO / "scripts" / "bootstrap").is_file()
    targets = make_targets()
    for _, command in steps[1:]:
        assert command.split()[1] in targets, command
    # `make test` runs the same bootstrap first
    assert re.search(r"^test: bootstrap\b", (REPO / "Makefile").read_text(), re.M)
    assert "set -euo pipefail" in TEXT and "privileged: true" in TEXT


def test_the_checkout_is_synced_without_host_artefacts() -> None:
    assert 'synced_folder "..", "/home/vagrant/stockade"' in TEXT
    assert '".venv/"' in TEXT


def test_readme_names_targets_that_exist() -> None:
    readme = (REPO / "vagrant" / "README.md").read_text()
    targets = make_targets()
    for target in re.findall(r"(?:`|sudo |^)make (\w+)", readme, re.M):
        assert target in targets, target
    assert "vagrant up" in readme and "vagrant ssh" in readme
