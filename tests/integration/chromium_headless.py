"""Headless Chromium for the tests: load a page, dump its DOM, take a screenshot, or keep a
page open; and read the tables of a dumped page.

Debian's `chromium` (scripts/bootstrap installs it; without it the tests
skip, except in CI, where they fail). Each run has a throwaway profile,
runs in a session of its own (Chromium starts helpers: zygote, renderer,
GPU) and is bounded in time; it is stopped by its PID, and its process
group, which is ours, is killed afterwards so that no helper outlives it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from stockade.lab.netns_exec import nsenter_argv

TIMEOUT = 45.0  # a page on loopback loads in about a second
ARTIFACTS_ENV = "STOCKADE_TEST_ARTIFACTS"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed: run ./scripts/bootstrap (Debian's chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)  # in CI the bootstrap installed it
        pytest.skip(message)
    return path


def _argv(profile: Path, args: list[str], url: str, netns: str | None) -> list[str]:
    argv = [
        chromium(),
        "--headless",
        "--no-sandbox",  # as root, Chromium's own sandbox refuses to start
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",  # nothing but the page: no update checks
        "--disable-component-update",
        "--disable-sync",
        "--disable-breakpad",
        f"--user-data-dir={profile}",
        *args,
        url,
    ]
    return nsenter_argv(netns, argv) if netns is not None else argv


def _env(profile: Path) -> dict[str, str]:
    # caches and config of a throwaway profile, not the user's
    home = {"HOME": str(profile), "XDG_CONFIG_HOME": str(profile), "XDG_CACHE_HOME": str(profile)}
    return {**os.environ, **home}


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Chromium shuts its helpers down itself
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # our session's stragglers, if any


def run(
    profile: Path, args: list[str], url: str, netns: str | None = None, timeout: float = TIMEOUT
) -> str:
    """Chromium with `args` on `url`, to completion; its stdout."""
    proc = subprocess.Popen(
        _argv(profile, args, url, netns),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(profile),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise AssertionError(f"chromium did not finish with {url} within {timeout:.0f}s") from None
    finally:
        _stop(proc)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{err[-3000:]}"
    return out


def dump_dom(profile: Path, url: str, netns: str | None = None) -> str:
    """The page's DOM once it has loaded, serialized."""
    return run(profile, ["--dump-dom"], url, netns)


def screenshot(
    profile: Path, url: str, png: Path, size: tuple[int, int], netns: str | None = None
) -> None:
    run(
        profile,
        [f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", "--hide-scrollbars"],
        url,
        netns,
    )


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header (its first chunk is IHDR)."""
    data = path.read_bytes()[:24]
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@contextlib.contextmanager
def open_page(profile: Path, url: str, netns: str | None = None) -> Iterator[None]:
    """Chromium with `url` open (and doing what the page does) until the block ends."""
    proc = subprocess.Popen(
        _argv(profile, [], url, netns),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(profile),
        start_new_session=True,
    )
    try:
        yield
    finally:
        _stop(proc)


def keep_artifact(path: Path) -> None:
    """Copies `path` to $STOCKADE_TEST_ARTIFACTS (CI uploads that directory), if set."""
    target = os.environ.get(ARTIFACTS_ENV)
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(target) / path.name)


# -- reading a dumped page ------------------------------------------------------------
Row = dict[str, str]


class _Tables(HTMLParser):
    """Every <table id=...>: its rows as {column header: cell text}, and its footer's;
    and the text of every element with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[Row]] = {}
        self.footers: dict[str, Row] = {}
        self.texts: dict[str, str] = {}
        self.metas: list[dict[str, str]] = []
        self.elements: list[str] = []  # every start tag, in order
        self._table: str | None = None
        self._headers: list[str] = []
        self._cells: list[str] | None = None
        self._cell: list[str] | None = None
        self._section = ""
        self._ids: list[tuple[str, str, list[str]]] = []  # (tag, id, text) being read

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(tag)
        found = {k: v or "" for k, v in attrs}
        if tag == "meta":
            self.metas.append(found)
        if "id" in found:
            self._ids.append((tag, found["id"], []))
        if tag == "table":
            self._table, self._headers = found.get("id", ""), []
            self.tables[self._table] = []
        elif tag in ("thead", "tbody", "tfoot"):
            self._section = tag
        elif tag == "tr":
            self._cells = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if self._ids and self._ids[-1][0] == tag:
            _, ident, text = self._ids.pop()
            self.texts[ident] = "".join(text).strip()
        if tag in ("td", "th") and self._cell is not None and self._cells is not None:
            self._cells.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._cells is not None and self._table is not None:
            if self._section == "thead":
                self._headers = self._cells
            elif len(self._cells) == len(self._headers):  # not a "(none)" row
                row = dict(zip(self._headers, self._cells, strict=True))
                if self._section == "tfoot":
                    self.footers[self._table] = row
                else:
                    self.tables[self._table].append(row)
            self._cells = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, _, text in self._ids:
            text.append(data)


def read_page(dom: str) -> _Tables:
    parser = _Tables()
    parser.feed(dom)
    parser.close()
    return parser


def by(rows: list[Row], column: str) -> dict[str, Row]:
    """Rows keyed by one column's text (each key once)."""
    keyed = {row[column]: row for row in rows}
    assert len(keyed) == len(rows), f"{column} repeats: {rows}"
    return keyed
