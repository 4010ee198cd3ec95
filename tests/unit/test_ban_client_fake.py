"""BanClient against small fake controllers: wire format, errors, timeouts, reconnects, locking."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from stockade.proxy.ban_client import (
    TIMEOUT,
    UNAVAILABLE,
    BanClient,
    BanPushError,
    wire_duration,
)

Handler = Callable[[dict[str, Any]], Awaitable[bytes | None]]


class FakeController:
    """A unix socket server answering each request line with `handler(request)`.

    `handler` returns the reply line, or None to hang up without answering.
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while line := await reader.readline():
                message = json.loads(line)
                self.requests.append(message)
                reply = await self.handler(message)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def ok(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}).encode() + b"\n"


async def echo(message: dict[str, Any]) -> bytes:
    await asyncio.sleep(random.uniform(0, 0.002))  # tempt interleaving
    return ok({"status": "added", "target": message["args"]["target"]})


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def test_the_request_on_the_wire(tmp_path: Path) -> None:
    async def scenario() -> None:
        fake = FakeController(tmp_path / "rules.sock", echo)
        await fake.start()
        async with BanClient(fake.path) as client:
            result = await client.rule_ban(
                "198.18.0.7",
                ttl=600,
                rule="scanner",
                reason="rule scanner: 404s",
                details={"counters": {"distinct_404_paths": 31.0}},
                factor=3,
                max_ttl=86400.5,
                memory="7d",
            )
            await client.rule_ban("198.18.0.8", ttl="90s", rule="scanner")
        await fake.stop()
        assert result == {"status": "added", "target": "198.18.0.7"}
        assert fake.requests == [
            {
                "command": "rule.ban",
                "args": {
                    "target": "198.18.0.7",
                    "ttl": "600000ms",
                    "rule": "scanner",
                    "reason": "rule scanner: 404s",
                    "details": {"counters": {"distinct_404_paths": 31.0}},
                    "factor": 3,
                    "max_ttl": "86400500ms",
                    "memory": "7d",
                },
            },
            # unset arguments are left out: the controller applies its defaults
            {
                "command": "rule.ban",
                "args": {"target": "198.18.0.8", "ttl": "90s", "rule": "scanner"},
            },
        ]
        assert fake.connections == 1

    run(scenario())


def test_an_error_reply_is_a_ban_push_error_with_its_kind(tmp_path: Path) -> None:
    async def refuse(_message: dict[str, Any]) -> bytes:
        error = {"kind": "bad_input", "message": "invalid rule name 'x y'", "hint": None}
        return json.dumps({"ok": False, "error": error}).encode() + b"\n"

    async def scenario() -> None:
        fake = FakeController(tmp_path / "rules.sock", refuse)
        await fake.start()
        client = BanClient(fake.path)
        with pytest.raises(BanPushError) as info:
            await client.rule_ban("198.18.0.7", ttl=60, rule="x y")
        assert (info.value.kind, info.value.message) == ("bad_input", "invalid rule name 'x y'")
        assert not info.value.retryable
        # the connection stays usable after an error reply
        with pytest.raises(BanPushError):
            await client.rule_ban("198.18.0.7", ttl=60, rule="x y")
        assert fake.connections == 1
        await client.close()
        await fake.stop()

    run(scenario())


def test_no_controller_is_unavailable_and_retryable(tmp_path: Path) -> None:
    async def scenario() -> None:
        client = BanClient(tmp_path / "absent.sock")
        with pytest.raises(BanPushError) as info:
            await client.rule_ban("198.18.0.7", ttl=60, rule="r")
        assert info.value.kind == UNAVAILABLE and info.value.retryable
        assert "not running (no socket at" in info.value.message
        (tmp_path / "stale.sock").touch()  # not a socket
        with pytest.raises(BanPushError) as info:
            await BanClient(tmp_path / "stale.sock").rule_ban("198.18.0.7", ttl=60, rule="r")
        assert info.value.kind == UNAVAILABLE

    run(scenario())


def test_a_silent_controller_times_out_and_the_connection_is_dropped(tmp_path: Path) -> None:
    answer = asyncio.Event()

    async def stall(message: dict[str, Any]) -> bytes:
        if not answer.is_set():
            await asyncio.sleep(10)
        return await echo(message)

    async def scenario() -> None:
        fake = FakeController(tmp_path / "rules.sock", stall)
        await fake.start()
        client = BanClient(fake.path, timeout=0.2)
        started = time.monotonic()
        # three callers queue on the lock: each one's wait counts against its timeout
        results = await asyncio.gather(
            *(client.rule_ban(f"198.18.0.{i}", ttl=60, rule="r") for i in range(3)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        assert elapsed < 1.0
        for result in results:
            assert isinstance(result, BanPushError)
            assert result.kind == TIMEOUT and result.retryable
            assert "did not answer within 0.2s" in result.message
        # a late reply can never be taken for the next request's: a new connection
        answer.set()
        assert (await client.rule_ban("198.18.0.9", ttl=60, rule="r"))["target"] == "198.18.0.9"
        assert fake.connections == 2
        await client.close()
        await fake.stop()

    run(scenario())


def test_a_connection_closed_by_the_controller_is_replaced(tmp_path: Path) -> None:
    async def answer_once(message: dict[str, Any]) -> bytes:
        return await echo(message)

    async def scenario() -> None:
        fake = FakeController(tmp_path / "rules.sock", answer_once)
        await fake.start()
        client = BanClient(fake.path)
        assert (await client.rule_ban("198.18.0.1", ttl=60, rule="r"))["target"] == "198.18.0.1"
        # the controller drops idle connections, and a restart drops them all
        for writer in fake.writers:
            writer.close()
        await asyncio.sleep(0.01)
        assert (await client.rule_ban("198.18.0.2", ttl=60, rule="r"))["target"] == "198.18.0.2"
        await fake.stop()
        fake = FakeController(tmp_path / "rules.sock", answer_once)
        await fake.start()
        assert (await client.rule_ban("198.18.0.3", ttl=60, rule="r"))["target"] == "198.18.0.3"
        assert [r["args"]["target"] for r in fake.requests] == ["198.18.0.3"]
        await client.close()
        await fake.stop()

    run(scenario())


def test_a_kept_connection_that_breaks_under_a_request_is_retried_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        fake = FakeController(tmp_path / "rules.sock", echo)
        await fake.start()
        client = BanClient(fake.path)
        assert (await client.rule_ban("198.18.0.1", ttl=60, rule="r"))["target"] == "198.18.0.1"
        for writer in fake.writers:
            writer.close()  # and no await: the client has not seen it when it sends
        assert (await client.rule_ban("198.18.0.2", ttl=60, rule="r"))["target"] == "198.18.0.2"
        assert [r["args"]["target"] for r in fake.requests] == ["198.18.0.1", "198.18.0.2"]
        assert fake.connections == 2
        await client.close()
        await fake.stop()

    with caplog.at_level(logging.DEBUG, logger="stockade.proxy"):
        run(scenario())
    assert any("reconnecting" in r.getMessage() for r in caplog.records)


def test_a_hang_up_without_a_reply_on_a_new_connection_is_not_retried(tmp_path: Path) -> None:
    async def hang_up(_message: dict[str, Any]) -> None:
        return None

    async def scenario() -> None:
        fake = FakeController(tmp_path / "rules.sock", hang_up)
        await fake.start()
        client = BanClient(fake.path)
        with pytest.raises(BanPushError) as info:
            await client.rule_ban("198.18.0.1", ttl=60, rule="r")
        assert info.value.kind == UNAVAILABLE
        assert len(fake.requests) == 1  # sent once: the controller may have acted on it
        await fake.stop()

    run(scenario())


def test_concurrent_callers_each_get_their_own_reply(tmp_path: Path) -> None:
    async def scenario() -> None:
        fake = FakeController(tmp_path / "rules.sock", echo)
        await fake.start()
        client = BanClient(fake.path)
        targets = [f"198.18.1.{i}" for i in range(40)]
        results = await asyncio.gather(*(client.rule_ban(t, ttl=60, rule="r") for t in targets))
        assert [r["target"] for r in results] == targets
        assert fake.connections == 1
        await client.close()
        await fake.stop()

    run(scenario())


@pytest.mark.parametrize(
    "reply",
    [b"not json\n", b"[1, 2]\n", ok([1, 2]), b'{"ok": false, "error": "x"}\n'],
)
def test_an_invalid_reply_is_a_runtime_error(tmp_path: Path, reply: bytes) -> None:
    async def garbage(_message: dict[str, Any]) -> bytes:
        return reply

    async def scenario() -> None:
        fake = FakeController(tmp_path / "rules.sock", garbage)
        await fake.start()
        client = BanClient(fake.path)
        with pytest.raises(BanPushError) as info:
            await client.rule_ban("198.18.0.1", ttl=60, rule="r")
        assert info.value.kind == "runtime"
        await client.close()
        await fake.stop()

    run(scenario())


def test_what_cannot_be_sent_fails_before_any_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        client = BanClient(tmp_path / "absent.sock")
        cases: list[dict[str, Any]] = [
            {"details": {"x": {1, 2}}},  # a set is not JSON
            {"ttl": float("inf")},
            {"max_ttl": True},
            {"details": {"blob": "x" * 70_000}},  # longer than a request line may be
        ]
        for case in cases:
            args: dict[str, Any] = {"target": "198.18.0.1", "ttl": 60, "rule": "r", **case}
            with pytest.raises(BanPushError) as info:
                await client.rule_ban(**args)
            assert info.value.kind == "bad_input", case

    run(scenario())


def test_wire_duration() -> None:
    assert wire_duration("10m") == "10m"
    assert wire_duration(600) == "600000ms"
    assert wire_duration(0.25) == "250ms"
    with pytest.raises(BanPushError):
        wire_duration(float("nan"))
