"""sqli_xss's fast pass: telling, without a transaction, that the engine would pass a request.

The shipped sqli_xss rules (rules/sqli_xss.conf, pinned by RULES_SHA256) run
libinjection's SQLi and XSS checks over the path (REQUEST_FILENAME), its
last segment (REQUEST_BASENAME), the query's argument names and values,
cookie names and values, and the User-Agent and Referer headers, after the
transformations utf8toUnicode, urlDecodeUni, htmlEntityDecode, jsDecode,
cssDecode and removeNulls. Each of those changes only bytes that a *plain*
string does not have: ASCII without %, +, &, \\ and NUL. For a request with
no body and no Content-Type (so no body processor runs and REQBODY_ERROR
stays 0, and no other rule can act), the engine's verdict is therefore
exactly: block when libinjection flags one of those strings.

So for such a request, this module takes the strings as ModSecurity 3.0.9
takes them (Transaction::processURI, extractArguments, the cookie split in
addRequestHeader) and calls the libinjection functions the engine calls,
from the engine's own library. The request passes here only when every
string is plain and libinjection finds nothing in any of them: then no
transaction is made (the engine's setting up and tearing down of one is
most of a small request's cost, and the hand-off to an engine thread the
rest). Anything else - a body, a Content-Type, a string that is not plain,
a string libinjection flags - goes to the engine as before, and the engine
gives the verdict with its rule ids and messages. The check may look at
more strings than the rules do (a REQUEST_BASENAME where the engine has
none), never fewer: an extra string can only send a request to the engine.

A JSON body (one Content-Type that rule 200001 gives the JSON processor)
is taken apart into arguments as RequestBodyProcessor::JSON names them
(json.order.items.array_0.sku); any other body goes to the engine.

tests/waf/test_waf_fast_pass.py holds this to the engine: on randomly built
requests whose strings are all plain, the fast pass and the engine agree
in both directions.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import unquote_to_bytes

from stockade.proxy.waf.modsec import ModSecurityError, library
from stockade.proxy.waf.rulesets import JSON_CONTENT_TYPE, XML_CONTENT_TYPE

log = logging.getLogger("stockade.proxy.waf")

# The sha256 of the rules file the reasoning above is about. A change to the
# shipped rules must revisit this module (a test compares the two).
RULES_SHA256 = "8be039febf75cc99d9ba1f042cd83b2b4d29cf72a9d139fadcefb088e878a035"

# A plain string: bytes 0x01-0x7f except % (0x25), & (0x26), + (0x2b) and \ (0x5c).
_NOT_PLAIN = re.compile(rb"[^\x01-\x24\x27-\x2a\x2c-\x5b\x5d-\x7f]")
_C_SPACE = b" \t\n\v\f\r"  # C's isspace(), with which ModSecurity trims cookie names
_RULE_HEADERS = frozenset({b"user-agent", b"referer"})  # REQUEST_HEADERS:User-Agent|Referer
CACHE_ENTRIES = 8192  # clean strings remembered per worker
CACHE_MAX_LENGTH = 512  # longer strings are checked every time
JSON_MAX_DEPTH = 32  # deeper JSON bodies go to the engine (whose own limit is 10,000)
# The body processors' Content-Types as PCRE reads rules 200000 and 200001
# (caseless ASCII, anchored at the start: re.match).
_XML_TYPE = re.compile(XML_CONTENT_TYPE.encode(), re.IGNORECASE)
_JSON_TYPE = re.compile(JSON_CONTENT_TYPE.encode(), re.IGNORECASE)


def rules_digest(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


def is_plain(value: bytes) -> bool:
    return _NOT_PLAIN.search(value) is None


def _getline_split(value: bytes, separator: bytes) -> list[bytes]:
    """std::getline's tokens, as ModSecurity's ssplit makes them: no trailing empty one."""
    parts = value.split(separator)
    if parts[-1] == b"":
        parts.pop()
    return parts


def query_strings(query: bytes) -> list[bytes]:
    """ARGS_NAMES and ARGS of a query string (Transaction::extractArguments)."""
    strings = []
    for pair in _getline_split(query, b"&"):
        name, _, value = pair.partition(b"=")
        strings.append(_urldecode(name))
        strings.append(_urldecode(value))
    return strings


def _urldecode(value: bytes) -> bytes:
    """urldecode_nonstrict: %XX with two hex digits is decoded, + is a space."""
    value = value.replace(b"+", b" ")
    return unquote_to_bytes(value) if b"%" in value else value


def cookie_strings(header: bytes) -> list[bytes]:
    """REQUEST_COOKIES_NAMES and REQUEST_COOKIES of one Cookie header (addRequestHeader)."""
    cookies = _getline_split(header, b";")
    if cookies:
        cookies[-1] = cookies[-1].rstrip(_C_SPACE)
    strings = []
    for cookie in cookies:
        name, _, value = cookie.partition(b"=")
        name = name.lstrip(_C_SPACE)
        if name:  # a cookie without a name is skipped by the engine
            strings.append(name)
            strings.append(value)
    return strings


def uri_strings(uri: bytes) -> list[bytes] | None:
    """REQUEST_FILENAME, REQUEST_BASENAME and the query's strings; None: not for the fast pass.

    processURI drops a fragment, percent-decodes the whole URI and takes the
    path up to the first ? of the decoded text: with no % in the path that
    is the raw path, split where the raw URI splits.
    """
    if b"\0" in uri:
        return None  # the engine takes the URI as a C string
    if b"#" in uri:
        uri = uri.partition(b"#")[0]
    path, _, query = uri.partition(b"?")
    if b"%" in path:
        return None
    # the basename; or, with no /, the whole path again: more strings, never fewer
    strings = [path, path.rpartition(b"/")[2]]
    if query:
        strings += query_strings(query)
    return strings


class _Object(list[tuple[str, object]]):
    """A JSON object's members in order, duplicates kept (yajl hands on every one)."""


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")  # Python's json takes NaN and Infinity; yajl not


class _TooDeep(Exception):
    pass


@dataclass
class _Container:
    name: str
    is_array: bool
    count: int = 0  # an array's elements so far


class _JsonArguments:
    """The ARGS a JSON body becomes (RequestBodyProcessor::JSON's yajl callbacks).

    A value's name is the containers' names joined - an array's as
    NAME.array_N, a map's as NAME. - then the current key (or nothing in an
    array), the top level being "json" and an empty key "empty-key", as
    getCurrentKey() has it.
    """

    def __init__(self) -> None:
        self.containers: list[_Container] = []
        self.key = ""
        self.strings: list[str] = []  # names and values

    def _current_key(self) -> str:
        if not self.containers:
            return "json"
        if not self.key:
            return "" if self.containers[-1].is_array else "empty-key"
        key, self.key = self.key, ""
        return key

    def _add(self, value: str) -> None:
        path = "".join(
            f"{c.name}.array_{c.count}" if c.is_array else f"{c.name}." for c in self.containers
        )
        last = self.containers[-1] if self.containers else None
        if last is not None and last.is_array:
            last.count += 1
            name = ""
        else:
            name = self._current_key()
        self.strings += (path + name, value)

    def _end(self) -> None:
        self.containers.pop()
        if self.containers and self.containers[-1].is_array:
            self.containers[-1].count += 1

    def value(self, value: object, depth: int = 0) -> None:
        if depth > JSON_MAX_DEPTH:
            raise _TooDeep
        if isinstance(value, _Object):
            self.containers.append(_Container(self._current_key(), False))
            for key, item in value:
                self.key = key
                self.value(item, depth + 1)
            self._end()
        elif isinstance(value, list):
            self.containers.append(_Container(self._current_key(), True))
            for item in value:
                self.value(item, depth + 1)
            self._end()
        elif value is None:
            self._add("")
        elif isinstance(value, bool):
            self._add("true" if value else "false")
        else:
            self._add(str(value))  # a string, or a number's text as it came


def json_strings(body: bytes) -> list[bytes] | None:
    """ARGS_NAMES and ARGS of an ASCII JSON body, or None: not for the fast pass.

    Python's json parses it (numbers kept as their text, NaN and Infinity
    refused, objects as ordered pairs); what it takes, yajl takes too for
    ASCII input, and what it refuses goes to the engine, which may answer
    400 for a body that does not parse.
    """
    if not body.isascii():
        return None
    try:
        document = json.loads(
            body.decode("ascii"),
            object_pairs_hook=_Object,
            parse_float=str,
            parse_int=str,
            parse_constant=_no_constant,
        )
        arguments = _JsonArguments()
        arguments.value(document)
        return [text.encode("utf-8") for text in arguments.strings]
    except (ValueError, RecursionError, _TooDeep, UnicodeEncodeError):
        return None  # a lone surrogate from \\uD800 cannot be UTF-8: the engine's business


class FastPass:
    """The check, with the library's libinjection and a cache of strings found clean."""

    def __init__(self, library_name: str) -> None:
        msc = library(library_name).msc
        try:
            self._sqli = msc.libinjection_sqli
            self._xss = msc.libinjection_xss
        except AttributeError:
            raise ModSecurityError(
                f"{library_name} does not export libinjection_sqli/libinjection_xss"
            ) from None
        self._sqli.restype = ctypes.c_int
        self._sqli.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p)
        self._xss.restype = ctypes.c_int
        self._xss.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
        self._local = threading.local()  # libinjection writes a fingerprint: one per thread
        self._clean: dict[bytes, None] = {}

    def _fingerprint(self) -> ctypes.Array[ctypes.c_char]:
        buffer: ctypes.Array[ctypes.c_char] | None = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = ctypes.create_string_buffer(8)
        return buffer

    def forget(self) -> None:
        """Drop the remembered clean strings (the benchmark's uncached case)."""
        self._clean.clear()

    def flagged(self, value: bytes) -> bool:
        """libinjection's verdict on one string, as @detectSQLi and @detectXSS call it."""
        size = len(value)
        return bool(self._sqli(value, size, self._fingerprint()) or self._xss(value, size))

    def clean(self, values: Iterable[bytes]) -> bool:
        """Every string plain and unflagged (the clean ones are remembered)."""
        known = self._clean
        for value in values:
            if not value or value in known:
                continue  # libinjection finds nothing in an empty string (a test checks)
            if _NOT_PLAIN.search(value) is not None or self.flagged(value):
                return False
            self._remember(value)
        return True

    def _remember(self, key: bytes) -> None:
        known = self._clean
        if len(key) <= CACHE_MAX_LENGTH:
            if len(known) >= CACHE_ENTRIES:
                known.clear()  # simple and bounded; the common strings come back at once
            known[key] = None

    def passes(
        self, uri: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes | None
    ) -> bool:
        """True: the sqli_xss engine would pass this request. False: ask the engine.

        Of the headers, the rules read User-Agent, Referer and the cookies
        (any letter case); Content-Type chooses the body processor. A whole
        Cookie header or URI found clean is remembered under a key that
        starts with NUL, which no remembered string has (NUL is not plain).
        """
        known, clean = self._clean, self.clean
        content_types: list[bytes] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered in _RULE_HEADERS:
                if not clean((value,)):
                    return False
            elif lowered == b"content-type":
                content_types.append(value)
            elif lowered == b"cookie":
                key = b"\0cookie\0" + value
                if key not in known:
                    if not clean(cookie_strings(value)):
                        return False
                    self._remember(key)
        if (content_types or body) and not self._body_clean(content_types, body):
            return False
        key = b"\0uri\0" + uri
        if key in known:
            return True
        strings = uri_strings(uri)
        if strings is None or not clean(strings):
            return False
        self._remember(key)
        return True

    def _body_clean(self, content_types: list[bytes], body: bytes | None) -> bool:
        """A JSON body (one Content-Type, the JSON processor's) whose strings are clean;
        or none at all under that Content-Type. Any other body or type: the engine."""
        if len(content_types) != 1:
            return False
        content_type = content_types[0]
        if not _JSON_TYPE.match(content_type) or _XML_TYPE.match(content_type):
            return False
        if not body:
            return True  # the engine ignores the JSON parser's error on an empty body
        strings = json_strings(body)
        return strings is not None and self.clean(strings)


def fast_pass_for(rules_file: Path, library_name: str) -> FastPass | None:
    """A FastPass when the sqli_xss rules are the ones it was written for, else None."""
    try:
        text = rules_file.read_bytes()
    except OSError:
        return None  # the engine reports the file when it loads it
    if rules_digest(text) != RULES_SHA256:
        log.info("waf: sqli_xss rules %s are not the shipped ones: no fast pass", rules_file)
        return None
    try:
        return FastPass(library_name)
    except ModSecurityError as exc:
        log.warning("waf: no fast pass for sqli_xss: %s", exc)
        return None
