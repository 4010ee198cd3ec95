"""Pushing rule bans from a proxy worker to the controller's rules socket.

One `BanClient` per worker keeps one connection to the socket
(`controller.rules_socket`, which accepts only `rule.ban`) and reconnects
when it breaks. Callers are served one at a time on that connection (one
request line, one reply line). Every call is bounded by `timeout`, lock
wait included, and fails only with `BanPushError`, so the request path
never hangs on the controller or crashes because of it; what to do then
(deny locally, retry later) is the caller's choice.

    bans = BanClient(Path("/run/stockade/rules.sock"))
    try:
        result = await bans.rule_ban("198.18.0.7", ttl=600, rule="scanner")
    except BanPushError as exc:
        ...  # exc.kind, exc.retryable
    result["status"]  # "added", "updated", "allowlisted" or "already_banned"
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stockade.protocol import BAD_INPUT, MAX_LINE, RUNTIME, CommandError, request

log = logging.getLogger("stockade.proxy")

DEFAULT_TIMEOUT = 1.0
# BanPushError kinds besides the control API's error kinds (bad_input, not_found, runtime).
UNAVAILABLE = "unavailable"  # no controller, or the connection broke
TIMEOUT = "timeout"  # no reply within the timeout

Duration = str | float  # "10m", or seconds


class BanPushError(Exception):
    """A rule ban was not applied; the only exception `BanClient` raises.

    `kind`: "unavailable" or "timeout" (the controller may not have seen it;
    `retryable` is true), or the kind of the controller's error reply:
    "bad_input" (the request is wrong and will stay wrong) or "runtime"
    (permission denied, map full, store error). `hint` says what to do.
    """

    def __init__(self, kind: str, message: str, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message}; {hint}")
        self.kind = kind
        self.message = message
        self.hint = hint

    @property
    def retryable(self) -> bool:
        return self.kind in (UNAVAILABLE, TIMEOUT)


def wire_duration(value: Duration) -> str:
    """A duration as the wire spells it: text as is, seconds as whole milliseconds."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BanPushError(BAD_INPUT, f"invalid duration {value!r}: give seconds or text")
    return f"{round(value * 1000)}ms"


class BanClient:
    def __init__(self, path: Path | str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def rule_ban(
        self,
        target: str,
        ttl: Duration,
        rule: str,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        factor: float | None = None,
        max_ttl: Duration | None = None,
        memory: Duration | None = None,
    ) -> dict[str, Any]:
        """Ask for a ban of `target`; the controller escalates repeat offenders.

        Returns the controller's result: "status" is "added" or "updated"
        (with "ttl" in seconds, "offence", "expires"), "allowlisted" (not
        banned: the allowlist always wins) or "already_banned" (a ban at
        least as long covers the target; it is kept). See docs/cli-json.md.
        """
        args: dict[str, Any] = {
            "target": target,
            "ttl": wire_duration(ttl),
            "rule": rule,
            "reason": reason,
            "details": None if details is None else dict(details),
            "factor": factor,
            "max_ttl": None if max_ttl is None else wire_duration(max_ttl),
            "memory": None if memory is None else wire_duration(memory),
        }
        try:
            line = request("rule.ban", **args)
        except (TypeError, ValueError, RecursionError) as exc:
            raise BanPushError(BAD_INPUT, f"cannot encode the rule ban: {exc}") from None
        if len(line) > MAX_LINE:
            raise BanPushError(BAD_INPUT, f"the rule ban is longer than {MAX_LINE} bytes")
        result = await self._call(line)
        if not isinstance(result, dict):
            raise BanPushError(RUNTIME, "the controller sent an invalid reply")
        return result

    async def close(self) -> None:
        writer = self._writer
        self._drop()
        if writer is not None:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> BanClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # -- one request, one reply ------------------------------------------------------
    async def _call(self, line: bytes) -> Any:
        try:
            async with asyncio.timeout(self.timeout), self._lock:
                try:
                    reply = await self._exchange(line)
                except BaseException:
                    # Unknown state (a reply may still come): never reuse it.
                    self._drop()
                    raise
                return self._result(reply)  # an error reply leaves the connection usable
        except TimeoutError:
            raise BanPushError(
                TIMEOUT,
                f"the controller did not answer within {self.timeout:g}s on {self.path}",
                "check `journalctl -u stockade-controller`",
            ) from None

    async def _exchange(self, line: bytes) -> bytes:
        if self._reader is not None and (
            self._reader.at_eof() or self._writer is None or self._writer.is_closing()
        ):
            self._drop()  # closed by the controller (idle, or it restarted)
        reused = self._reader is not None
        try:
            reply = await self._send(line)
        except OSError as exc:
            self._drop()
            if not reused:
                raise BanPushError(
                    UNAVAILABLE, f"lost the connection to the controller on {self.path}: {exc}"
                ) from None
            # A kept connection that broke before any reply byte: the controller
            # went away in between (a restart); the request was not read.
            log.debug("connection to %s broke (%s); reconnecting", self.path, exc)
            try:
                reply = await self._send(line)
            except OSError as again:
                self._drop()
                raise BanPushError(
                    UNAVAILABLE, f"lost the connection to the controller on {self.path}: {again}"
                ) from None
        return reply

    async def _send(self, line: bytes) -> bytes:
        if self._reader is None or self._writer is None:
            await self._connect()
        assert self._reader is not None and self._writer is not None
        self._writer.write(line)
        await self._writer.drain()
        try:
            reply = await self._reader.readline()
        except ValueError:  # a line over the limit
            raise BanPushError(RUNTIME, "the controller sent an invalid reply") from None
        if not reply.endswith(b"\n"):  # EOF, with or without a partial line
            raise ConnectionResetError("the controller closed the connection")
        return reply

    async def _connect(self) -> None:
        where = str(self.path)
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(where, limit=MAX_LINE)
        except FileNotFoundError:
            raise BanPushError(
                UNAVAILABLE, f"the controller is not running (no socket at {where})"
            ) from None
        except ConnectionRefusedError:
            raise BanPushError(
                UNAVAILABLE, f"the controller is not running (nothing listens on {where})"
            ) from None
        except PermissionError:
            raise BanPushError(
                RUNTIME,
                f"permission denied on {where}",
                "set controller.rules_group to a group of the proxy's user",
            ) from None
        except OSError as exc:
            raise BanPushError(
                UNAVAILABLE, f"cannot reach the controller on {where}: {exc}"
            ) from None

    def _result(self, reply: bytes) -> Any:
        try:
            message = json.loads(reply)
        except (ValueError, RecursionError):
            message = None
        if not isinstance(message, dict):
            self._drop()
            raise BanPushError(RUNTIME, "the controller sent an invalid reply")
        if message.get("ok") is True:
            return message.get("result")
        error = message.get("error")
        wire = CommandError.from_wire(error if isinstance(error, dict) else {})
        raise BanPushError(wire.kind, wire.message, wire.hint)

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
