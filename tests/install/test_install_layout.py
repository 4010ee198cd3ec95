"""scripts/install into a staging root: layout, idempotence, the units verify, uninstall."""

from __future__ import annotations

import json
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from install_harness import (
    CONFIG,
    PREFIX,
    REPO,
    UNIT_DIR,
    UNITS,
    Staged,
    in_private_opt,
    install,
    run_script,
    systemd_analyze,
    unit_value,
)

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Staged]:
    root = tmp_path_factory.mktemp("destdir")
    yield install(root)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_program_is_a_venv_from_the_system_python(staged: Staged) -> None:
    cfg = (staged.venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg
    assert re.search(r"^home = /usr/bin$", cfg, re.M), cfg
    # bcc comes from Debian's python3-bpfcc, through the system site packages
    result = subprocess.run(
        [
            str(staged.venv / "bin" / "python"),
            "-c",
            "import bcc, stockade; print(stockade.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(staged.venv / "lib")), result.stdout


def test_stockade_is_installed_as_a_wheel_not_editable(staged: Staged) -> None:
    (dist,) = staged.venv.glob("lib/python3*/site-packages/stockade-*.dist-info")
    direct_url = dist / "direct_url.json"
    if direct_url.exists():
        assert not json.loads(direct_url.read_text()).get("dir_info", {}).get("editable")
    site = dist.parent
    assert (site / "stockade" / "controller" / "daemon.py").is_file()
    assert (site / "stockade" / "bpf" / "stockade_xdp.c").is_file()
    assert not list(site.glob("__editable__*")), "an editable install"


def test_installed_stockade_version_runs(staged: Staged) -> None:
    result = subprocess.run(
        [str(staged.venv / "bin" / "stockade"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"\b\d+\.\d+\.\d+\b", result.stdout), result.stdout


def test_the_command_is_a_symlink_into_the_venv(staged: Staged) -> None:
    link = staged.path("/usr/local/bin/stockade")
    assert link.is_symlink()
    assert str(link.readlink()) == f"{PREFIX}/bin/stockade"


def test_config_state_and_docs(staged: Staged) -> None:
    assert staged.config.read_text() == (REPO / "packaging" / "stockade.toml").read_text()
    assert mode(staged.config) == 0o640
    assert mode(staged.config.parent) == 0o750
    state = staged.path("/var/lib/stockade")
    assert state.is_dir() and mode(state) == 0o700
    assert state.stat().st_uid == 0
    # the units' Documentation= and the config's comments point here
    assert (staged.venv / "doc" / "install.md").is_file()
    assert (staged.venv / "doc" / "examples" / "stockade.toml").is_file()
    assert (staged.venv / "doc" / "stockade.toml.default").is_file()


def test_units_are_installed_with_the_prefix(staged: Staged) -> None:
    for name in UNITS:
        unit = staged.unit(name)
        text = unit.read_text()
        assert not re.search(r"@[A-Z]+@", text), f"{name}: a placeholder was left"
        exec_start = unit_value(unit, "ExecStart")
        assert exec_start.startswith(f"{PREFIX}/bin/stockade --config {CONFIG} ")
        assert mode(unit) == 0o644


def test_units_pass_systemd_analyze_verify(staged: Staged) -> None:
    paths = [str(staged.unit(name)) for name in UNITS]
    result = in_private_opt(staged, [systemd_analyze(), "verify", *paths])
    assert result.returncode == 0, result.stdout + result.stderr
    # verify only warns about unknown keys or bad values, and still exits 0
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "stockade" in line or UNIT_DIR in line
    ]
    assert ours == [], "\n".join(ours)


@pytest.mark.parametrize(("name", "threshold"), [(UNITS[0], 4.0), (UNITS[1], 2.0)])
def test_units_stay_confined(staged: Staged, name: str, threshold: float) -> None:
    """systemd's own exposure score: a regression in hardening fails here."""
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager", str(staged.unit(name))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= threshold, result.stdout


def test_a_second_install_keeps_the_config_and_upgrades(staged: Staged) -> None:
    edited = staged.config.read_text() + "\n# the operator was here\n"
    staged.config.write_text(edited)
    stockade_py = next(staged.venv.glob("lib/python3*/site-packages/stockade/__init__.py"))
    stockade_py.write_text(stockade_py.read_text() + "\n# stale\n")
    result = run_script("install", staged.root)
    assert staged.config.read_text() == edited
    assert f"keeping {CONFIG}" in result.stdout
    # the package itself is replaced even though the version did not change
    assert "# stale" not in stockade_py.read_text()
    assert staged.path("/usr/local/bin/stockade").is_symlink()


def test_uninstall_keeps_config_and_state_and_purge_removes_them(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    staged = install(tmp_path_factory.mktemp("uninstall"))
    (staged.path("/var/lib/stockade") / "bans.db").write_text("a ban store")
    result = run_script("uninstall", staged.root)
    assert "kept /etc/stockade" in result.stdout
    assert not staged.venv.exists()
    assert not staged.path("/usr/local/bin/stockade").is_symlink()
    assert not any(staged.unit(name).exists() for name in UNITS)
    assert staged.config.is_file()
    assert (staged.path("/var/lib/stockade") / "bans.db").read_text() == "a ban store"

    run_script("uninstall", staged.root)  # again: nothing left to do, still fine
    assert staged.config.is_file()

    run_script("uninstall", staged.root, PURGE="1")
    assert not staged.path("/etc/stockade").exists()
    assert not staged.path("/var/lib/stockade").exists()
    run_script("uninstall", staged.root, "--purge")  # idempotent too


def test_uninstall_refuses_unknown_arguments(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(REPO / "scripts" / "uninstall"), "--purgee"],
        env={"DESTDIR": str(tmp_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "unknown argument '--purgee'" in result.stderr
