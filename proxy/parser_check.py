"""Refuse to serve with aiohttp's pure-Python HTTP parser.

aiohttp falls back to a Python parser when its C extension (llhttp) is
missing or AIOHTTP_NO_EXTENSIONS is set. That parser accepts request
smuggling gadgets llhttp refuses ("Transfer-Encoding: chunked, chunked", a
bare CR in a chunk extension, ...), so the gateway checks at start which one
its server will use.
"""

from __future__ import annotations

import importlib

from aiohttp import http_parser, web_protocol

MESSAGE = (
    "aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS set or the wheel lacks it); "
    "the pure-Python parser accepts request-smuggling gadgets, refusing to start"
)


def require_c_parser() -> None:
    """Raise RuntimeError unless aiohttp's server parses requests with the C parser."""
    try:
        c_parser = importlib.import_module("aiohttp._http_parser").HttpRequestParser
    except (ImportError, AttributeError):
        raise RuntimeError(MESSAGE) from None
    # web_protocol holds its own reference, bound at import: it is the one the
    # server really uses, and http_parser's is what new code would pick up.
    in_use = getattr(web_protocol, "HttpRequestParser", None)
    if in_use is not c_parser or http_parser.HttpRequestParser is not c_parser:
        raise RuntimeError(MESSAGE)
