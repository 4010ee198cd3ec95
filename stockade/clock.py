"""Injectable time: expiry and rates take a clock, tests use a fake one."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall(self) -> float:
        """Seconds since the epoch (stored in the ban store)."""
        ...

    def monotonic_ns(self) -> int:
        """CLOCK_MONOTONIC in ns: the clock bpf_ktime_get_ns() reads."""
        ...


class SystemClock:
    def wall(self) -> float:
        return time.time()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


class FakeClock:
    def __init__(self, wall: float = 1_800_000_000.0, monotonic_ns: int = 10**12) -> None:
        self._wall = wall
        self._mono = monotonic_ns

    def wall(self) -> float:
        return self._wall

    def monotonic_ns(self) -> int:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += int(seconds * 1e9)
