"""What the benchmarks share: statistics, the machine, results files, BPF pins."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stockade.controller import loader

BENCH_DIR = Path(__file__).resolve().parent
# STOCKADE_BENCH_OUT=DIR sends the results, the README and the plots to DIR
# instead of bench/: a trial run that must not replace the committed ones.
OUT_DIR = Path(os.environ.get("STOCKADE_BENCH_OUT") or BENCH_DIR)
RESULTS_DIR = OUT_DIR / "results"
PACKAGES = ("python3-bpfcc", "xdp-tools", "nftables", "netsniff-ng", "bpftool")
# what the kernel benchmarks measure; the L7 one passes its own folders
KERNEL_SOURCES = ("bpf", "controller", "lab", "stockade")


class BenchError(RuntimeError):
    """The benchmark cannot run or its set-up did not behave as expected."""


@dataclass(frozen=True)
class Summary:
    """Median and spread of one variant's samples."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))


def machine(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """A description of this host, written next to every result."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    debian = Path("/etc/debian_version")
    return {
        "cpu": f"{model}, {os.cpu_count()} CPUs",
        "memory": f"{mem_kib / 2**20:.0f} GiB",
        "kernel": platform.release(),
        "os": f"Debian {debian.read_text().strip()}" if debian.exists() else platform.platform(),
        "python": platform.python_version(),
        "packages": ", ".join(f"{name} {package_version(name)}" for name in packages),
    }


def package_version(name: str) -> str:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else "not installed"


def source_revision(sources: Sequence[str] = KERNEL_SOURCES) -> str:
    """The commit measured, marked when the code under `sources` had local changes."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(BENCH_DIR.parent), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", *sources)
    return f"{commit} with local changes" if dirty else commit


def now_iso() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")


def save_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def load_results(name: str, directory: Path = RESULTS_DIR) -> dict[str, Any] | None:
    path = directory / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@contextmanager
def pin_root(name: str) -> Iterator[Path]:
    """A private bpffs directory for this run's maps, removed afterwards.

    Each program loaded under it unpins its own maps (loader.remove_pins)
    before this removes the directories that are left.
    """
    loader.ensure_bpffs()
    root = loader.BPFFS / f"stockade-bench-{name}-{os.getpid()}"
    root.mkdir(mode=0o700)
    try:
        yield root
    finally:
        for path in sorted(root.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            try:
                path.rmdir()
            except OSError as exc:
                print(f"bench: could not remove {path}: {exc}; remove it by hand")


@contextmanager
def stockade_program(settings: loader.ProgramSettings) -> Iterator[loader.LoadedProgram]:
    """Load stockade's program over fresh pinned maps; close it and unpin them after."""
    if settings.pin_dir.exists():
        raise BenchError(f"{settings.pin_dir} exists; a benchmark must start from empty maps")
    try:
        program = loader.load(settings)
    except BaseException:
        loader.remove_pins(settings)
        raise
    try:
        yield program
    finally:
        program.close()
        loader.remove_pins(settings)


REFERENCE_SOURCE = BENCH_DIR / "xdp_ref.c"
REFERENCE_PROGRAMS = ("xdp_ref_pass", "xdp_ref_clock", "xdp_ref_drop")


@contextmanager
def reference_programs() -> Iterator[dict[str, int]]:
    """Load bench/xdp_ref.c; yields program name -> fd, released afterwards."""
    from bcc import BPF  # deferred, as in the loader: importing bcc is slow

    try:
        bpf = BPF(src_file=str(REFERENCE_SOURCE).encode())
        fds = {name: bpf.load_func(name.encode(), BPF.XDP).fd for name in REFERENCE_PROGRAMS}
    except Exception as exc:  # bcc raises bare Exception for compile/verify errors
        raise BenchError(f"cannot load {REFERENCE_SOURCE.name}: {exc}") from exc
    try:
        yield fds
    finally:
        bpf.cleanup()
