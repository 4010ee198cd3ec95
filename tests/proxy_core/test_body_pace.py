"""BodyPace: the whole-body bounds' decision (when a body is too slow), and 100 Continue."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from stockade.proxy.limits import CONTINUE, BodyAborted, BodyBounds, BodyPace, bounded_body


def run_client(pace: BodyPace, chunk: int, speed: float, chunks: int) -> float | None:
    """A client that sends `chunk` bytes every chunk/speed seconds, as bounded_body reads
    it: the waited time at which the pace cuts it, or None if the whole body got through."""
    interval = chunk / speed
    for _ in range(chunks):
        if interval > pace.time_left():
            return pace.waited + max(0.0, pace.time_left())
        pace.waited += interval
        pace.received += chunk
    return None


RATES = st.integers(1, 100_000)
GRACES = st.floats(1, 60)
STEPS = 20_000  # reads simulated at most, per example


@given(rate=RATES, grace=GRACES, factor=st.floats(1, 100), chunks=st.integers(1, 500))
def test_a_client_at_the_minimum_rate_or_faster_is_never_cut(
    rate: int, grace: float, factor: float, chunks: int
) -> None:
    speed = rate * factor
    chunk = int(speed * grace)  # its pieces come at least once per grace period (>= 1 byte)
    pace = BodyPace(BodyBounds(min_rate=rate, grace=grace))
    assert run_client(pace, chunk, speed, chunks) is None


@given(rate=RATES, grace=GRACES, slowness=st.floats(2, 1000), chunk=st.integers(1, 4096))
def test_a_client_at_half_the_rate_or_slower_is_cut_by_twice_the_grace(
    rate: int, grace: float, slowness: float, chunk: int
) -> None:
    speed = rate / slowness
    interval = chunk / speed
    assume(2 * grace * speed / chunk < STEPS)  # cut within the reads simulated
    pace = BodyPace(BodyBounds(min_rate=rate, grace=grace))
    cut = run_client(pace, chunk, speed, chunks=STEPS)
    assert cut is not None
    assert cut <= 2 * grace + interval


@given(total=st.floats(0.1, 600), chunk=st.integers(1, 65536), speed=st.floats(1, 1e7))
def test_body_timeout_cuts_at_the_total_and_not_before(
    total: float, chunk: int, speed: float
) -> None:
    pace = BodyPace(BodyBounds(total=total))
    chunks = 1000
    cut = run_client(pace, chunk, speed, chunks)
    if chunk / speed * chunks <= total:
        assert cut is None
    else:
        assert cut == pytest.approx(total)


def test_no_bounds_never_cut() -> None:
    pace = BodyPace(BodyBounds())
    assert not pace.bounds.active
    assert run_client(pace, 1, 0.001, chunks=100) is None


class FakeTransport:
    def __init__(self, closing: bool = False) -> None:
        self.written: list[bytes] = []
        self.closing = closing

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_100_continue_is_sent_once_and_only_to_a_live_connection() -> None:
    transport = FakeTransport()
    pace = BodyPace(BodyBounds(), transport)  # type: ignore[arg-type]
    assert pace.continue_pending
    pace.start()
    pace.start()
    assert transport.written == [CONTINUE] == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert not pace.continue_pending
    gone = FakeTransport(closing=True)
    pace = BodyPace(BodyBounds(), gone)  # type: ignore[arg-type]
    pace.start()
    assert gone.written == []


class FailedStream:
    """A body whose connection was lost: aiohttp fails its reads with the loss."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def read(self, n: int) -> bytes:
        raise self.exc


@pytest.mark.parametrize("exc", [ConnectionResetError("Connection lost"), BrokenPipeError()])
def test_a_lost_connection_is_an_abort_not_a_limit(exc: BaseException) -> None:
    async def scenario() -> None:
        body: Any = bounded_body(FailedStream(exc), 1000, 1.0)  # type: ignore[arg-type]
        with pytest.raises(BodyAborted) as info:
            await body.__anext__()
        assert info.value.phase == "during_request_body"

    asyncio.run(scenario())
