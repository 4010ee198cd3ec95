"""Run scripts/install and scripts/uninstall into a staging root, read the units.

Everything goes under a temporary DESTDIR: the host's /etc, /opt, /usr/local
and systemd are never touched. Only `systemd-analyze verify` needs the
installed program at its real path (/opt/stockade/bin/stockade in ExecStart);
it runs in a private mount namespace with a tmpfs on /opt and the staged
venv bound there, so the host's /opt is not changed either.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/opt/stockade"
CONFIG = "/etc/stockade/stockade.toml"
UNIT_DIR = "/usr/local/lib/systemd/system"
UNITS = ("stockade-controller.service", "stockade-proxy.service")
SOURCE_UNITS = REPO / "packaging" / "systemd"
INSTALL_TIMEOUT = 900  # a clean machine builds the venv from PyPI


@dataclass(frozen=True)
class Staged:
    """An install under `root` (the DESTDIR)."""

    root: Path

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    @property
    def venv(self) -> Path:
        return self.path(PREFIX)

    @property
    def config(self) -> Path:
        return self.path(CONFIG)

    def unit(self, name: str) -> Path:
        return self.path(f"{UNIT_DIR}/{name}")


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PURGE", None)
    env.update(DESTDIR=str(root), PREFIX=PREFIX, **extra)
    return env


def run_script(name: str, root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """scripts/NAME with DESTDIR=root; fails the test with its output if it fails."""
    result = subprocess.run(
        [str(REPO / "scripts" / name), *args],
        env=_env(root, **env),
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        cwd="/",
    )
    if result.returncode != 0:
        raise AssertionError(
            f"scripts/{name} {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def install(root: Path) -> Staged:
    run_script("install", root)
    return Staged(root)


def in_private_opt(staged: Staged, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """argv in a new mount namespace where PREFIX is the staged venv."""
    script = (
        "set -e; mount --make-rprivate /; mount -t tmpfs tmpfs /opt; "
        f'mkdir -p {PREFIX}; mount --bind {staged.venv} {PREFIX}; exec "$@"'
    )
    return subprocess.run(
        ["unshare", "--mount", "--", "sh", "-c", script, "sh", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        raise AssertionError(
            "systemd-analyze is missing; install the `systemd` package (scripts/bootstrap does)"
        )
    return path


def unit_values(path: Path, key: str) -> list[str]:
    """Every value of `key` in a unit file (a key may repeat), comments skipped."""
    values = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        name, _, value = line.partition("=")
        if name.strip() == key:
            values.append(value.strip())
    return values


def unit_value(path: Path, key: str) -> str:
    values = unit_values(path, key)
    assert len(values) == 1, f"{path.name}: {key}= set {len(values)} times: {values}"
    return values[0]


def unit_words(path: Path, key: str) -> set[str]:
    return {word for value in unit_values(path, key) for word in value.split()}


def capability_names(path: Path, key: str) -> list[str]:
    """CapabilityBoundingSet=/AmbientCapabilities= as setpriv names (cap_bpf -> bpf)."""
    return sorted(
        word.lower().removeprefix("cap_") for word in unit_words(path, key) if word.strip()
    )
