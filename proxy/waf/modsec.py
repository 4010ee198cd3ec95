"""A small ctypes binding for libmodsecurity3, ModSecurity v3's C API.

    engine = Engine()                       # msc_init, one per process
    rules = engine.rule_set()               # msc_create_rules_set
    rules.add('SecRuleEngine On ...')       # msc_rules_add: RulesError on a parse error
    with engine.transaction(rules, "id") as tx:
        tx.connection("198.18.0.1", 40000, "198.18.0.2", 443)
        tx.uri(b"/a?q=1", "GET", "1.1")
        tx.add_header(b"Host", b"api.example.com")
        tx.process_headers()
        found = tx.intervention()           # None, or status and log of a disruptive rule
        tx.append_body(b"...")
        tx.process_body()
        found = tx.intervention()
    tx.messages                             # the log lines of the rules that matched

Memory: every object that the library allocates for us is released by the
call made for it, exactly once: a transaction by msc_transaction_cleanup (on
leaving the `with`, or close()), a rule set by msc_rules_cleanup, the
engine by msc_cleanup. The strings msc_intervention and msc_rules_add hand
back (the intervention's log and url, a parse error) are strdup'ed by the
library: they are copied into Python and released with libc's free().

Errors: a library that cannot be loaded, or a call that reports failure,
raises ModSecurityError; rules that do not parse raise RulesError with the
engine's own message.

Threads: ctypes releases the GIL for every call, so transactions run in
parallel in a thread pool. A rule set is only read while transactions use
it; each transaction belongs to one thread at a time. The log callback runs
on the thread of the transaction that logged and takes the GIL.

msc_new_transaction would make a unique id with a freshly seeded
std::random_device for every transaction (about half of the cost of a
small one); we always pass our own id instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

LIBRARY = "libmodsecurity.so.3"
CONNECTOR = b"stockade"

c_void_p, c_char_p = ctypes.c_void_p, ctypes.c_char_p
c_int, c_size_t = ctypes.c_int, ctypes.c_size_t
_ERROR = ctypes.POINTER(c_void_p)  # const char **error: a strdup'ed message, ours to free
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, c_void_p, c_void_p)  # (logCbData, const char *msg)


class ModSecurityError(RuntimeError):
    """The engine could not be loaded, or one of its calls failed."""


class RulesError(ModSecurityError):
    """Rules did not load; the message is the engine's own."""


class _CIntervention(ctypes.Structure):
    # struct ModSecurityIntervention_t in modsecurity/intervention.h
    _fields_ = (
        ("status", c_int),
        ("pause", c_int),
        ("url", c_void_p),  # char *, strdup'ed: free()
        ("log", c_void_p),  # char *, strdup'ed: free()
        ("disruptive", c_int),
    )


@dataclass(frozen=True)
class Intervention:
    """A disruptive action of a rule: the status it asks for and its log line."""

    status: int
    log: str
    url: str | None = None


# (name, return type, argument types) of every function used.
_PROTOTYPES: tuple[tuple[str, type | None, tuple[type, ...]], ...] = (
    ("msc_init", c_void_p, ()),
    ("msc_who_am_i", c_char_p, (c_void_p,)),
    ("msc_set_connector_info", None, (c_void_p, c_char_p)),
    ("msc_set_log_cb", None, (c_void_p, _LOG_CALLBACK)),
    ("msc_cleanup", None, (c_void_p,)),
    ("msc_create_rules_set", c_void_p, ()),
    ("msc_rules_add", c_int, (c_void_p, c_char_p, _ERROR)),
    ("msc_rules_add_file", c_int, (c_void_p, c_char_p, _ERROR)),
    ("msc_rules_merge", c_int, (c_void_p, c_void_p, _ERROR)),
    ("msc_rules_cleanup", c_int, (c_void_p,)),
    ("msc_new_transaction_with_id", c_void_p, (c_void_p, c_void_p, c_char_p, c_void_p)),
    ("msc_process_connection", c_int, (c_void_p, c_char_p, c_int, c_char_p, c_int)),
    ("msc_process_uri", c_int, (c_void_p, c_char_p, c_char_p, c_char_p)),
    ("msc_add_n_request_header", c_int, (c_void_p, c_char_p, c_size_t, c_char_p, c_size_t)),
    ("msc_process_request_headers", c_int, (c_void_p,)),
    ("msc_append_request_body", c_int, (c_void_p, c_char_p, c_size_t)),
    ("msc_process_request_body", c_int, (c_void_p,)),
    ("msc_intervention", c_int, (c_void_p, ctypes.POINTER(_CIntervention))),
    ("msc_transaction_cleanup", None, (c_void_p,)),
)


class _Library:
    """libmodsecurity and libc's free(), with every prototype declared."""

    def __init__(self, name: str) -> None:
        try:
            self.msc = ctypes.CDLL(name)
        except OSError as exc:
            raise ModSecurityError(
                f"cannot load {name}: {exc}; install the libmodsecurity3 package"
            ) from None
        for function, restype, argtypes in _PROTOTYPES:
            try:
                call = getattr(self.msc, function)
            except AttributeError:
                raise ModSecurityError(f"{name} has no {function}: not ModSecurity v3") from None
            call.restype = restype
            call.argtypes = argtypes
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self.free = libc.free
        self.free.restype = None
        self.free.argtypes = (c_void_p,)

    def take_string(self, pointer: int | None) -> str | None:
        """Copy a string the library strdup'ed for us, then free it."""
        if not pointer:
            return None
        try:
            return ctypes.string_at(pointer).decode("utf-8", "replace")
        finally:
            self.free(pointer)


_LIBRARIES: dict[str, _Library] = {}
_LOAD_LOCK = threading.Lock()


def library(name: str) -> _Library:
    """The library loaded once per process, with its prototypes declared."""
    with _LOAD_LOCK:
        if name not in _LIBRARIES:
            _LIBRARIES[name] = _Library(name)
        return _LIBRARIES[name]


class Engine:
    """One ModSecurity instance (msc_init); rule sets and transactions hang off it."""

    def __init__(self, library_name: str = LIBRARY) -> None:
        self._lib = library(library_name)
        msc = self._lib.msc
        pointer = msc.msc_init()
        if not pointer:
            raise ModSecurityError("msc_init failed")
        self._ptr: int | None = pointer
        msc.msc_set_connector_info(pointer, CONNECTOR)
        # Log lines of a transaction, by the token it was created with (logCbData).
        self._logs: dict[int, list[str]] = {}
        self._tokens = itertools.count(1)
        self._callback = _LOG_CALLBACK(self._on_log)  # referenced for as long as the engine
        msc.msc_set_log_cb(pointer, self._callback)

    @property
    def version(self) -> str:
        text = self._lib.msc.msc_who_am_i(self._pointer())
        return bytes(text).decode() if text else "ModSecurity"

    def _pointer(self) -> int:
        if self._ptr is None:
            raise ModSecurityError("the engine is closed")
        return self._ptr

    def _on_log(self, data: int | None, message: int | None) -> None:
        if not message:
            return
        lines = self._logs.get(data or 0)
        if lines is not None:
            lines.append(ctypes.string_at(message).decode("utf-8", "replace"))

    def rule_set(self) -> RuleSet:
        self._pointer()
        return RuleSet(self._lib)

    def transaction(self, rules: RuleSet, transaction_id: str) -> Transaction:
        return Transaction(self, rules, transaction_id)

    def close(self) -> None:
        """Release the engine; its rule sets and transactions must be released first."""
        if self._ptr is not None:
            self._lib.msc.msc_cleanup(self._ptr)
            self._ptr = None


# libmodsecurity's SecLang parser keeps global state: two threads loading rules
# at once can crash the process, so every load and merge takes this lock.
_PARSER = threading.Lock()
# A load that fails can leave that state (3.0.9's lexer) mid-directive, and the
# next load then fails too, whatever it is: after a failure, a throwaway rule is
# loaded into a scratch set until one loads, which puts the lexer back.
_DRAIN = b'SecRule ARGS "@rx x" "id:1,phase:2,pass,nolog"\n'


def _drain_parser(lib: _Library) -> None:
    """Reset the parser after a failed load (the caller holds _PARSER)."""
    for _ in range(3):
        scratch = lib.msc.msc_create_rules_set()
        if not scratch:
            return
        error = c_void_p()
        try:
            loaded = lib.msc.msc_rules_add(scratch, _DRAIN, ctypes.byref(error))
        finally:
            lib.take_string(error.value)
            lib.msc.msc_rules_cleanup(scratch)
        if loaded >= 0:
            return


class RuleSet:
    """Rules in the engine's own language (SecLang), loaded from text or files."""

    def __init__(self, lib: _Library) -> None:
        self._lib = lib
        pointer = lib.msc.msc_create_rules_set()
        if not pointer:
            raise ModSecurityError("msc_create_rules_set failed")
        self._ptr: int | None = pointer

    @property
    def pointer(self) -> int:
        if self._ptr is None:
            raise ModSecurityError("the rule set is closed")
        return self._ptr

    def _checked(self, count: int, error: ctypes.c_void_p, what: str) -> int:
        message = self._lib.take_string(error.value)
        if count < 0:
            detail = (message or "unknown error").strip()
            raise RulesError(f"{what}: {detail}")
        return count

    def add(self, text: str, origin: str = "rules") -> int:
        """Load rules from text; the number of rules added."""
        if "\0" in text:  # the C string would end there: the rest would silently not load
            raise RulesError(f"{origin}: a NUL character in the rules")
        # libmodsecurity 3.0.9's lexer is left mid-directive by a text whose last
        # line (a SecRuleUpdateTargetById) has no newline, and the next load fails
        if not text.endswith("\n"):
            text += "\n"
        error = c_void_p()
        with _PARSER:
            count = self._lib.msc.msc_rules_add(self.pointer, text.encode(), ctypes.byref(error))
            if count < 0:
                _drain_parser(self._lib)
        return self._checked(count, error, origin)

    def add_file(self, path: Path) -> int:
        """Load a rules file; Include and @pmFromFile paths are relative to it."""
        error = c_void_p()
        with _PARSER:
            count = self._lib.msc.msc_rules_add_file(
                self.pointer, str(path).encode(), ctypes.byref(error)
            )
            if count < 0:
                _drain_parser(self._lib)
        return self._checked(count, error, str(path))

    def merge(self, other: RuleSet) -> int:
        """Add another set's rules (shared, not copied) and settings to this one."""
        error = c_void_p()
        with _PARSER:
            count = self._lib.msc.msc_rules_merge(self.pointer, other.pointer, ctypes.byref(error))
        return self._checked(count, error, "merging rule sets")

    def close(self) -> None:
        if self._ptr is not None:
            self._lib.msc.msc_rules_cleanup(self._ptr)
            self._ptr = None

    def __enter__(self) -> RuleSet:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Transaction:
    """One request through the engine. Use it in a `with` block, or close() it."""

    __slots__ = ("_engine", "_msc", "_ptr", "_token", "messages")

    def __init__(self, engine: Engine, rules: RuleSet, transaction_id: str) -> None:
        self._engine = engine
        self._msc = engine._lib.msc
        self._token = next(engine._tokens)
        self.messages: list[str] = []  # filled by the log callback while rules run
        engine._logs[self._token] = self.messages
        pointer = self._msc.msc_new_transaction_with_id(
            engine._pointer(), rules.pointer, transaction_id.encode(), self._token
        )
        if not pointer:
            del engine._logs[self._token]
            raise ModSecurityError("msc_new_transaction_with_id failed")
        self._ptr: int | None = pointer

    def _call_ok(self, result: int, what: str) -> None:
        if result != 1:
            raise ModSecurityError(f"{what} failed")

    def _pointer(self) -> int:
        if self._ptr is None:
            raise ModSecurityError("the transaction is closed")
        return self._ptr

    def connection(self, client: str, client_port: int, server: str, server_port: int) -> None:
        self._call_ok(
            self._msc.msc_process_connection(
                self._pointer(), client.encode(), client_port, server.encode(), server_port
            ),
            "msc_process_connection",
        )

    def uri(self, uri: bytes, method: str, http_version: str) -> None:
        self._call_ok(
            self._msc.msc_process_uri(self._pointer(), uri, method.encode(), http_version.encode()),
            "msc_process_uri",
        )

    def add_header(self, name: bytes, value: bytes) -> None:
        self._call_ok(
            self._msc.msc_add_n_request_header(self._pointer(), name, len(name), value, len(value)),
            "msc_add_n_request_header",
        )

    def add_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """add_header for each pair, with the lookups done once (the hot path)."""
        add, pointer = self._msc.msc_add_n_request_header, self._pointer()
        for name, value in headers:
            if add(pointer, name, len(name), value, len(value)) != 1:
                raise ModSecurityError("msc_add_n_request_header failed")

    def process_headers(self) -> None:
        """Phase 1: the rules on the request line and headers."""
        self._call_ok(self._msc.msc_process_request_headers(self._pointer()), "request headers")

    def append_body(self, data: bytes) -> None:
        if self._msc.msc_append_request_body(self._pointer(), data, len(data)) != 1:
            raise ModSecurityError("the body is over the engine's SecRequestBodyLimit")

    def process_body(self) -> None:
        """Phase 2: the rules on arguments and the body (run also when there is none)."""
        self._call_ok(self._msc.msc_process_request_body(self._pointer()), "request body")

    def intervention(self) -> Intervention | None:
        """What a disruptive rule asked for so far, or None."""
        found = _CIntervention(200, 0, None, None, 0)
        disruptive = self._msc.msc_intervention(self._pointer(), ctypes.byref(found))
        take = self._engine._lib.take_string
        log, url = take(found.log), take(found.url)  # always freed, disruptive or not
        if not disruptive:
            return None
        return Intervention(found.status, log or "", url)

    def close(self) -> None:
        if self._ptr is not None:
            self._msc.msc_transaction_cleanup(self._ptr)
            self._ptr = None
            self._engine._logs.pop(self._token, None)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
