"""The gateway refuses to start on aiohttp's pure-Python HTTP parser."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from unittest import mock

import pytest
from aiohttp import http_parser, web_protocol
from aiohttp.http_exceptions import BadHttpMessage

from stockade.proxy.parser_check import MESSAGE, require_c_parser

GADGET = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"


def test_passes_with_the_c_parser() -> None:
    require_c_parser()


def test_refuses_when_the_server_would_use_the_python_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What aiohttp's import does when the extension is missing or disabled.
    monkeypatch.setattr(web_protocol, "HttpRequestParser", http_parser.HttpRequestParserPy)
    monkeypatch.setattr(http_parser, "HttpRequestParser", http_parser.HttpRequestParserPy)
    with pytest.raises(RuntimeError, match="C HTTP parser is not in use"):
        require_c_parser()


def test_refuses_when_only_the_server_module_has_the_python_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(web_protocol, "HttpRequestParser", http_parser.HttpRequestParserPy)
    with pytest.raises(RuntimeError, match="refusing to start"):
        require_c_parser()


def test_refuses_when_the_extension_cannot_be_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiohttp._http_parser", None)  # import raises ImportError
    with pytest.raises(RuntimeError) as excinfo:
        require_c_parser()
    assert str(excinfo.value) == MESSAGE


def test_refuses_with_aiohttp_no_extensions_set() -> None:
    env = dict(os.environ, AIOHTTP_NO_EXTENSIONS="1")
    code = "from stockade.proxy.parser_check import require_c_parser; require_c_parser()"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "AIOHTTP_NO_EXTENSIONS set or the wheel lacks it" in result.stderr


def test_why_python_parser_accepts_a_gadget_the_c_parser_refuses() -> None:
    loop = asyncio.new_event_loop()
    try:
        lax = http_parser.HttpRequestParserPy(mock.Mock(), loop, 2**16)
        messages, _, _ = lax.feed_data(GADGET)
        assert len(messages) == 1
        strict = http_parser.HttpRequestParserC(mock.Mock(), loop, 2**16)
        with pytest.raises(BadHttpMessage):
            strict.feed_data(GADGET)
    finally:
        loop.close()
