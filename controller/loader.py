"""Compile the XDP program with bcc against pinned maps.

The C lives in files (bpf/); constants reach it as -D flags built from
validated settings, never by editing the source. Maps are pinned under
<pin_root>/v<layout version>/ so a new load reuses them: a restart or an
upgrade keeps every ban and counter.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.bpf import BPF_DIR, XDP_SOURCE
from stockade.controller import layout, libbpf

DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/stockade")
BPFFS = Path("/sys/fs/bpf")
BPF_FS_MAGIC = 0xCAFE4A11
XDP_FUNCTION = "xdp_stockade"


class LoadError(RuntimeError):
    """The program could not be compiled, verified or bound to its maps."""


@dataclass(frozen=True)
class ProgramSettings:
    """Sizes baked into the program at load time (validated by config)."""

    pin_root: Path = DEFAULT_PIN_ROOT
    max_bans_v4: int = 262_144
    max_bans_v6: int = 262_144
    max_prefix_bans: int = 65_536
    max_allow: int = 4_096
    max_rate_sources: int = 262_144
    extra_cflags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def pin_dir(self) -> Path:
        return self.pin_root / f"v{layout.layout_version()}"

    def map_sizes(self) -> dict[str, int]:
        return {
            "ban_v4": self.max_bans_v4,
            "ban_v6": self.max_bans_v6,
            "ban_prefix_v4": self.max_prefix_bans,
            "ban_prefix_v6": self.max_prefix_bans,
            "allow_v4": self.max_allow,
            "allow_v6": self.max_allow,
            "syn_buckets": self.max_rate_sources,
            "counters": layout.counters_size(),
        }

    def cflags(self) -> list[str]:
        return [
            f"-I{BPF_DIR}",
            f'-DPIN_DIR="{self.pin_dir}"',
            f"-DMAX_BANS_V4={self.max_bans_v4}",
            f"-DMAX_BANS_V6={self.max_bans_v6}",
            f"-DMAX_PREFIX_BANS={self.max_prefix_bans}",
            f"-DMAX_ALLOW={self.max_allow}",
            f"-DMAX_RATE_SOURCES={self.max_rate_sources}",
            "-Wno-macro-redefined",
            *self.extra_cflags,
        ]


@dataclass
class LoadedProgram:
    """A compiled, verified program and its (pinned) maps."""

    bpf: Any  # bcc.BPF
    fd: int
    prog_id: int
    settings: ProgramSettings

    def table(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def close(self) -> None:
        """Release this process's references; attached programs stay."""
        self.bpf.cleanup()


def describe(settings: ProgramSettings) -> str:
    """What would be loaded: flags and source (for `--ebpf`)."""
    return (
        f"// source: {XDP_SOURCE}\n// cflags: {' '.join(settings.cflags())}\n"
        f"{XDP_SOURCE.read_text()}"
    )


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf when missing, as systemd would."""
    if _is_bpffs(BPFFS):
        return
    BPFFS.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise LoadError(f"cannot mount bpffs at {BPFFS}: {result.stderr.strip()}")


def _is_bpffs(path: Path) -> bool:
    class StatFs(ctypes.Structure):
        _fields_ = (("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15))

    libc = ctypes.CDLL(None, use_errno=True)
    buf = StatFs()
    if libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        return False
    return int(buf.f_type) & 0xFFFFFFFF == BPF_FS_MAGIC


def check_pinned_maps(settings: ProgramSettings) -> None:
    """Refuse to load over pinned maps whose shape differs from the settings.

    bcc reuses a pinned map without comparing it with the definition, so a
    changed size or struct would silently keep the old map.
    """
    sizes = settings.map_sizes()
    for name, (key_type, value_type) in layout.MAP_MIRRORS.items():
        path = settings.pin_dir / name
        if not path.exists():
            continue
        fd = libbpf.pinned_fd(str(path))
        try:
            info = libbpf.map_info(fd)
        finally:
            os.close(fd)
        want_key, want_value = ctypes.sizeof(key_type), ctypes.sizeof(value_type)
        if (info.key_size, info.value_size) != (want_key, want_value):
            raise LoadError(
                f"pinned map {path} has key/value size {info.key_size}/{info.value_size}, "
                f"expected {want_key}/{want_value}; remove it with "
                "`stockade detach --all --remove-maps` (bans are restored from the store)"
            )
        expected = sizes.get(name)
        if expected is not None and info.max_entries != expected:
            raise LoadError(
                f"pinned map {path} holds {info.max_entries} entries but the config asks for "
                f"{expected}; keep the old size or remove the maps with "
                "`stockade detach --all --remove-maps` (bans are restored from the store)"
            )


def load(settings: ProgramSettings) -> LoadedProgram:
    """Compile and verify the XDP program, creating or reusing pinned maps."""
    from bcc import BPF  # deferred: importing bcc is slow and needs root to be useful

    ensure_bpffs()
    settings.pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_pinned_maps(settings)
    try:
        bpf = BPF(
            src_file=str(XDP_SOURCE).encode(),
            cflags=settings.cflags(),
        )
        fn = bpf.load_func(XDP_FUNCTION.encode(), BPF.XDP)
    except Exception as exc:  # bcc raises bare Exception for compile/verify errors
        raise LoadError(f"cannot load {XDP_SOURCE.name}: {exc}") from exc
    return LoadedProgram(bpf=bpf, fd=fn.fd, prog_id=libbpf.prog_id(fn.fd), settings=settings)


def remove_pins(settings: ProgramSettings) -> list[Path]:
    """Unpin every map of this layout; returns what was removed."""
    removed = []
    for name in layout.PINNED_MAPS:
        path = settings.pin_dir / name
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    try:
        settings.pin_dir.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY):
            raise
    return removed
