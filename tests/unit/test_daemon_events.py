"""SYN-rate events from the ring buffer: recorded, and logged within a budget."""

from __future__ import annotations

import ctypes
import logging

import pytest

from stockade.config import Config
from stockade.controller import daemon, layout


def event(last_octet: int, v6: bool = False) -> layout.RateEvent:
    ev = layout.RateEvent(type=layout.EVENT_SYN_RATE, dropped=7, ts_ns=1)
    if v6:
        ev.family = layout.AF_INET6
        raw = bytes.fromhex("fd000018000000000000000000000000")
    else:
        ev.family = layout.AF_INET
        raw = bytes([198, 18, 0, last_octet]) + bytes(12)
    ctypes.memmove(ctypes.addressof(ev.addr), raw, 16)
    return ev


def test_events_are_recorded_and_log_lines_are_bounded_per_second(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    monkeypatch.setattr(daemon.time, "monotonic", lambda: now[0])
    controller = daemon.Controller(Config())
    with caplog.at_level(logging.WARNING, logger="stockade.controller"):
        for i in range(50):
            ev = event(i)
            controller._on_event(None, ctypes.addressof(ev), ctypes.sizeof(ev))
        now[0] += 1.0
        ev = event(200)
        controller._on_event(None, ctypes.addressof(ev), ctypes.sizeof(ev))
    controller.close()

    messages = [r.getMessage() for r in caplog.records]
    per_source = [m for m in messages if m.startswith("SYN rate exceeded by 198.18.0.")]
    assert len(per_source) == daemon.EVENT_LOGS_PER_SECOND + 1  # 10 in the first second, 1 after
    assert "SYN rate exceeded by 40 more sources" in messages
    assert controller.state.syn_events == 51
    assert [r.source for r in controller.state.recent][:2] == ["198.18.0.0", "198.18.0.1"]


def test_ipv6_event_names_the_rate_prefix() -> None:
    controller = daemon.Controller(Config())
    ev = event(0, v6=True)
    controller._on_event(None, ctypes.addressof(ev), ctypes.sizeof(ev))
    controller.close()
    assert controller.state.recent[-1].source == "fd00:18::/64"
