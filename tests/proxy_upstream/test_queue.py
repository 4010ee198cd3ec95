"""maxconn and the pool's queue, and finishes that blame no server (PoolState, no sockets)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from upstream_harness import make_pool, server, usable

from stockade.clock import FakeClock
from stockade.proxy.settings import PassiveCheck
from stockade.proxy.upstream import NoSlot, PoolState, ServerState

PASSIVE = PassiveCheck(max_failures=3, cooldown=10)


def capped(*weights: int, maxconn: int, max_queue: int = 100, timeout: float = 5.0) -> PoolState:
    pool = replace(
        make_pool(*weights, passive=PASSIVE),
        maxconn=maxconn,
        max_queue=max_queue,
        queue_timeout=timeout,
    )
    return PoolState(pool, FakeClock())


def take(state: PoolState) -> ServerState:
    chosen = state.pick()
    assert chosen is not None
    state.begin(chosen)
    return chosen


def test_a_finish_that_blames_nobody_changes_no_count() -> None:
    state = capped(1, maxconn=0)
    a = server(state, "a")
    for ok in (False, False, None, None, None):
        state.begin(a)
        state.finish(a, ok=ok)
    assert (a.failures, a.consecutive_failures, a.outstanding) == (2, 2, 0)
    state.begin(a)
    state.finish(a, ok=False)  # the third failure of the server's own in a row
    assert usable(state) == ""


def test_pick_skips_servers_at_maxconn() -> None:
    state = capped(1, 1, maxconn=2)
    held = [take(state) for _ in range(4)]
    assert sorted(s.outstanding for s in state.servers) == [2, 2]
    assert state.pick() is None
    state.finish(held[0], ok=True)
    assert state.pick() is held[0]


def test_waiters_are_served_first_come_first_served() -> None:
    async def scenario() -> None:
        state = capped(1, maxconn=1)
        a = take(state)
        waiters = [asyncio.create_task(state.wait_for_server()) for _ in range(3)]
        await asyncio.sleep(0)
        assert len(state.queue) == 3 and state.queued == 3
        order = []
        for _ in range(3):
            state.finish(a, ok=True)  # the freed slot goes to the oldest, at once
            assert a.outstanding == 1 and state.pick() is None
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            (first,) = done
            order.append(waiters.index(first))
            waiters[waiters.index(first)] = asyncio.create_task(asyncio.sleep(3600))
        assert order == [0, 1, 2]
        for task in waiters:
            task.cancel()
        assert a.requests == 4

    asyncio.run(scenario())


def test_a_new_request_does_not_jump_the_queue() -> None:
    async def scenario() -> None:
        state = capped(1, maxconn=1)
        a = take(state)
        first = asyncio.create_task(state.wait_for_server())
        await asyncio.sleep(0)
        state.finish(a, ok=True)
        second = asyncio.create_task(state.wait_for_server())
        assert await first is a
        await asyncio.sleep(0)
        assert not second.done()  # it waits behind the first, whose slot it is
        state.finish(a, ok=True)
        assert await second is a

    asyncio.run(scenario())


def test_queue_full_and_queue_timeout() -> None:
    async def scenario() -> None:
        state = capped(1, maxconn=1, max_queue=1, timeout=0.05)
        take(state)
        waiting = asyncio.create_task(state.wait_for_server())
        await asyncio.sleep(0)
        with pytest.raises(NoSlot) as full:
            await state.wait_for_server()
        assert full.value.reason == "queue_full"
        with pytest.raises(NoSlot) as late:
            await waiting
        assert late.value.reason == "queue_timeout"
        assert (state.queue_full, state.queue_timeouts, len(state.queue)) == (1, 1, 0)
        a = server(state, "a")
        assert (a.failures, a.consecutive_failures) == (0, 0)  # the server is not blamed

    asyncio.run(scenario())


def test_no_queue_at_all_with_max_queue_zero() -> None:
    async def scenario() -> None:
        state = capped(1, maxconn=1, max_queue=0)
        take(state)
        with pytest.raises(NoSlot, match="queue_full"):
            await state.wait_for_server()

    asyncio.run(scenario())


def test_a_slot_handed_to_a_cancelled_waiter_goes_on() -> None:
    async def scenario() -> None:
        state = capped(1, maxconn=1)
        a = take(state)
        gone = asyncio.create_task(state.wait_for_server())
        stays = asyncio.create_task(state.wait_for_server())
        await asyncio.sleep(0)
        state.finish(a, ok=True)  # handed to `gone`...
        gone.cancel()  # ...whose client hangs up before it runs
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert await stays is a
        assert a.outstanding == 1

    asyncio.run(scenario())


def test_waiters_fail_at_once_when_the_last_server_leaves_rotation() -> None:
    async def scenario() -> None:
        state = capped(1, maxconn=1)
        a = take(state)
        waiters = [asyncio.create_task(state.wait_for_server()) for _ in range(2)]
        await asyncio.sleep(0)
        state.set_health(a, False)
        assert await asyncio.gather(*waiters) == [None, None]
        assert state.queue_timeouts == 0

    asyncio.run(scenario())


def test_an_ejection_by_its_own_failures_empties_the_queue() -> None:
    async def scenario() -> None:
        state = capped(1, maxconn=3)
        a = server(state, "a")
        held = [take(state) for _ in range(3)]
        waiter = asyncio.create_task(state.wait_for_server())
        await asyncio.sleep(0)
        state.finish(held[0], ok=False)
        assert await waiter is a  # a is still in rotation: the slot is handed over
        for _ in range(2):
            state.finish(a, ok=False)
        assert usable(state) == ""  # three failures in a row: ejected
        later = asyncio.create_task(state.wait_for_server())
        assert await later is None  # nothing left to wait for: no_healthy_server

    asyncio.run(scenario())


def test_a_server_back_in_rotation_takes_waiters() -> None:
    async def scenario() -> None:
        state = capped(1, 1, maxconn=1)
        a, b = server(state, "a"), server(state, "b")
        state.set_health(b, False)
        take(state)
        waiter = asyncio.create_task(state.wait_for_server())
        await asyncio.sleep(0)
        state.set_health(b, True)
        assert await waiter is b
        assert (a.outstanding, b.outstanding) == (1, 1)

    asyncio.run(scenario())


def test_a_retry_waits_only_for_servers_it_has_not_tried() -> None:
    async def scenario() -> None:
        state = capped(1, 1, maxconn=1)
        a, b = server(state, "a"), server(state, "b")
        take(state)
        take(state)
        retry = asyncio.create_task(state.wait_for_server(exclude={a.address}))
        fresh = asyncio.create_task(state.wait_for_server())
        await asyncio.sleep(0)
        state.finish(a, ok=True)  # the retry may not use a: the next in line gets it
        assert await fresh is a
        state.finish(b, ok=True)
        assert await retry is b

    asyncio.run(scenario())


# A random day of a small pool: requests arrive (taking a slot or queueing), finish
# with any verdict, or leave the queue. Whatever the order, no server ever holds more
# than maxconn, no slot is lost or doubled, and the queue is served in arrival order.
# Arrivals outnumber the rest, so that the pool fills and a queue forms.
OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "arrive", "arrive", "finish", "finish", "leave"]),
        st.integers(0, 50),
        st.booleans(),
    ),
    min_size=8,
    max_size=80,
)
QUEUE_OF_THREE = [("arrive", 0, True)] * 4 + [("finish", 0, True)] * 3


@example(servers=1, maxconn=1, operations=QUEUE_OF_THREE)
@given(
    servers=st.integers(1, 2),
    maxconn=st.integers(1, 2),
    operations=OPERATIONS,
)
def test_slots_are_never_exceeded_lost_or_served_out_of_order(
    servers: int, maxconn: int, operations: list[tuple[str, int, bool]]
) -> None:
    async def scenario() -> None:
        state = capped(*([1] * servers), maxconn=maxconn, max_queue=1000)
        holding: list[ServerState] = []  # one entry per request holding a slot
        waiting: list[asyncio.Task[ServerState | None]] = []  # in arrival order
        served_order: list[int] = []
        arrivals = 0

        def collect() -> None:
            for task in list(waiting):
                if task.done():
                    waiting.remove(task)
                    if not task.cancelled():
                        result = task.result()
                        assert result is not None
                        holding.append(result)
                        served_order.append(int(task.get_name()))

        for op, index, ok in operations:
            if op == "arrive":
                chosen = None if state.queue else state.pick()
                if chosen is not None:
                    state.begin(chosen)
                    holding.append(chosen)
                else:
                    task = asyncio.create_task(state.wait_for_server(), name=str(arrivals))
                    waiting.append(task)
                arrivals += 1
            elif op == "finish" and holding:
                state.finish(holding.pop(index % len(holding)), ok=True if ok else None)
            elif op == "leave" and waiting:
                waiting[index % len(waiting)].cancel()
            for _ in range(3):
                await asyncio.sleep(0)
            collect()
            for s in state.servers:
                assert s.outstanding <= maxconn
                assert s.outstanding == sum(1 for h in holding if h is s)
            # a waiter is queued only while every server is full
            if waiting:
                assert all(s.outstanding == maxconn for s in state.servers)
        assert served_order == sorted(served_order)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    asyncio.run(scenario())
