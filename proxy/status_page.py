"""The status page on the proxy's admin listener, like HAProxy's stats page.

One HTML page, rendered here from the numbers `/metrics` serves (the
workers' metric files, added up) and the controller's (packets by reason
and the bans, over the control socket with a short timeout), through the
arithmetic `stockade top` uses (stockade/stats_view.py). No script and no
external asset (the Content-Security-Policy forbids both); a meta refresh
reloads it. Rates are over the time since an earlier view (the page keeps
a few samples); the first view has totals only, and latency over
everything the proxy has seen. Every string from the config, a client or
the controller is HTML-escaped on its way into the page.
"""

from __future__ import annotations

import html
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stockade.admin_http import Page
from stockade.protocol import CommandError
from stockade.proxy.admin import render_workers
from stockade.stats_view import (
    STATUS_CLASSES,
    BanRow,
    Frame,
    KernelSample,
    ProxyFrame,
    RouteRow,
    Sample,
    build,
    expires,
    interface,
    kernel_sample,
    latency,
    parse_proxy,
    per_second,
)

PATHS = ("/status", "/")
REFRESH = 5  # seconds between reloads; ?refresh=N picks another, 0 stops
MAX_REFRESH = 3600
CONTROL_TIMEOUT = 1.0  # a stuck controller must not hold the page (or the listener's thread)
MIN_WINDOW = 1.0  # a baseline closer than this makes noisy rates: an older one is used
MAX_WINDOW = 300.0  # rates over more than five minutes say little about now
HISTORY = 16  # samples kept for baselines (several browsers may be watching)

HEADERS = (
    ("Cache-Control", "no-store"),
    # inline style only: no script, no image, no font, nothing from elsewhere
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)


def status_pages(metrics_dir: Path, control_socket: Path, version: str) -> dict[str, Page]:
    """The page for the proxy master's admin listener, at each of PATHS."""
    page = StatusPage(
        lambda: render_workers(metrics_dir),
        lambda: kernel_sample(control_socket, CONTROL_TIMEOUT),
        version,
    ).page()
    return {path: page for path in PATHS}


class StatusPage:
    """Samples on each view and renders a frame against an earlier one."""

    def __init__(
        self,
        scrape: Callable[[], bytes],
        kernel: Callable[[], KernelSample],
        version: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.scrape = scrape  # the proxy's exposition, as /metrics serves it
        self.kernel = kernel  # raises CommandError when the controller is away
        self.version = version
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()  # the listener serves views on several threads
        self._history: deque[Sample] = deque(maxlen=HISTORY)

    def page(self) -> Page:
        return Page(self.render, "text/html; charset=utf-8", HEADERS)

    def sample(self) -> Sample:
        at = self.clock()
        kernel: KernelSample | None = None
        error: str | None = None
        try:
            kernel = self.kernel()
        except CommandError as exc:
            error = exc.message + (f"; {exc.hint}" if exc.hint else "")
        try:
            proxy = parse_proxy(self.scrape().decode())
        except ValueError as exc:  # not the exposition format
            return Sample(at, kernel, error, None, f"cannot read the metrics: {exc}")
        return Sample(at, kernel, error, proxy, "running")

    def _baseline(self, now: float) -> Sample | None:
        """The newest kept sample that is old enough, and not too old, to compare with."""
        for sample in reversed(self._history):
            if MIN_WINDOW <= now - sample.at <= MAX_WINDOW:
                return sample
        return None

    def render(self, query: str) -> bytes:
        refresh = refresh_seconds(query)
        cur = self.sample()
        with self._lock:
            base = self._baseline(cur.at)
            self._history.append(cur)
        frame = build(cur, base, since_start=True)
        return render_html(frame, self.version, self.wall(), refresh).encode()


def refresh_seconds(query: str) -> int:
    """?refresh=N (0 stops); anything else gives the default."""
    values = urllib.parse.parse_qs(query).get("refresh", [])
    # isascii: str.isdigit() is also true for other scripts' digits and for "²",
    # which int() refuses; the length keeps int() off a huge string
    text = values[0] if len(values) == 1 else ""
    if text.isascii() and text.isdigit() and len(text) <= 6 and int(text) <= MAX_REFRESH:
        return int(text)
    return REFRESH


# -- HTML ---------------------------------------------------------------------------
def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class Cell:
    """A table cell: its text (escaped when drawn) and a class from this module."""

    text: str
    css: str = ""


CellLike = Cell | str | int


def _cell(value: CellLike, numeric: bool) -> str:
    cell = value if isinstance(value, Cell) else Cell(str(value))
    classes = " ".join(c for c in ("num" if numeric else "", cell.css) if c)
    attr = f' class="{classes}"' if classes else ""
    return f"<td{attr}>{esc(cell.text)}</td>"


# right-aligned, in tabular figures; every other column is text
NUMERIC = frozenset(
    {"packets", "bytes", "pkt/s", "req/s", "requests", *STATUS_CLASSES, "p50", "p99", "in flight"}
)


NUM = ' class="num"'


def table(
    ident: str,
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[CellLike]],
    *,
    footer: Sequence[CellLike] | None = None,
    empty: str = "(none)",
) -> str:
    """A titled table with the id `ident` (tests find the numbers by it)."""
    numeric = [c in NUMERIC for c in columns]
    head = "".join(
        f'<th{NUM if n else ""} scope="col">{esc(c)}</th>'
        for c, n in zip(columns, numeric, strict=True)
    )

    def tr(row: Sequence[CellLike]) -> str:
        cells = (_cell(v, n) for v, n in zip(row, numeric, strict=True))
        return "<tr>" + "".join(cells) + "</tr>"

    body = "".join(tr(row) for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(columns)}" class="none">{esc(empty)}</td></tr>'
    foot = f"<tfoot>{tr(footer)}</tfoot>" if footer is not None else ""
    return (
        f'<div><h3 id="{ident}-title">{esc(title)}</h3>'
        f'<table id="{ident}" aria-labelledby="{ident}-title">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>{foot}</table></div>"
    )


def _reasons(frame: Frame) -> str:
    rows = [
        (
            r.reason,
            Cell(r.verdict, "drop" if r.verdict == "drop" and r.packets else ""),
            str(r.packets),
            str(r.bytes),
            per_second(r.packets_per_second),
        )
        for r in frame.reasons
    ]
    columns = ("reason", "verdict", "packets", "bytes", "pkt/s")
    return table("reasons", "Packets by reason", columns, rows)


def _bans(ident: str, title: str, bans: list[BanRow]) -> str:
    rows = [
        (
            b.target,
            b.source,
            str(b.packets),
            per_second(b.packets_per_second),
            expires(b.expires_in),
            b.reason,
        )
        for b in bans
    ]
    columns = ("target", "source", "packets", "pkt/s", "expires", "reason")
    return table(ident, title, columns, rows)


def _route_cells(r: RouteRow) -> list[CellLike]:
    cells: list[CellLike] = [r.route, per_second(r.requests_per_second), str(r.requests)]
    for cls in STATUS_CLASSES:
        count = r.statuses.get(cls, 0)
        cells.append(Cell(str(count), "err" if cls == "5xx" and count else ""))
    return [*cells, latency(r.p50), latency(r.p99)]


def _proxy(p: ProxyFrame, latency_over: str) -> str:
    routes = table(
        "routes",
        f"Requests by route (latency {latency_over})",
        ("route", "req/s", "requests", *STATUS_CLASSES, "p50", "p99"),
        [_route_cells(r) for r in p.routes],
        footer=_route_cells(p.overall),
        empty="(no request yet)",
    )
    decisions = table(
        "decisions",
        "Requests by decision",
        ("decision", "req/s", "requests"),
        [
            (
                Cell(d.decision, "refused" if d.decision != "allowed" and d.requests else ""),
                per_second(d.requests_per_second),
                str(d.requests),
            )
            for d in p.decisions
        ],
        empty="(no request yet)",
    )
    upstreams = table(
        "upstreams",
        "Upstream servers",
        ("pool", "server", "state", "in flight"),
        [
            (u.pool, u.server, Cell("UP", "up") if u.up else Cell("DOWN", "down"), str(u.in_flight))
            for u in p.upstreams
        ],
        empty="(none yet)",
    )
    return routes + decisions + upstreams


def _controller(frame: Frame) -> str:
    c = frame.controller
    if c is None:
        return f'<p id="controller" class="down">controller: {esc(frame.controller_error)}</p>'
    mode = (
        '<span class="warn">MONITOR (nothing dropped)</span>'
        if c["monitor"]
        else '<span class="up">enforcing</span>'
    )
    ifaces = ", ".join(interface(i) for i in c["interfaces"]) or "none"
    return (
        f'<p id="controller">controller: pid {esc(c["pid"])}, version {esc(c["version"])}, '
        f"{mode}; interfaces: {esc(ifaces)}; bans: {esc(c['bans'])}</p>"
    )


def render_html(frame: Frame, version: str, now: float, refresh: int) -> str:
    generated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    if frame.interval is not None:
        rates = f"rates over the last {frame.interval:.1f} s"
        latency_over = f"p50/p99 over the last {frame.interval:.1f} s"
    else:
        rates = "rates from the next view on"
        latency_over = "p50/p99 since the proxy started"
    if refresh:
        meta = f'<meta http-equiv="refresh" content="{refresh}">'
        reload = f'refreshes every {refresh} s (<a href="?refresh=0">stop</a>)'
    else:
        meta = ""
        reload = f'not refreshing (<a href="?refresh={REFRESH}">refresh every {REFRESH} s</a>)'
    kernel = ""
    if frame.controller is not None:
        kernel = (
            _reasons(frame)
            + _bans("bans-top", "Bans: top by hits", frame.top_bans)
            + _bans("bans-expiring", "Bans: expiring soonest", frame.expiring)
        )
    if frame.proxy is not None:
        proxy_line = f"proxy: running, {frame.proxy.in_flight} requests in flight"
        proxy = f'<p id="proxy">{esc(proxy_line)}</p>'
        proxy += f'<div class="row">{_proxy(frame.proxy, latency_over)}</div>'
    else:
        proxy = f'<p id="proxy" class="down">proxy: {esc(frame.proxy_state)}</p>'
    parts = [
        f'<section><h2>Kernel (XDP)</h2>{_controller(frame)}<div class="row">{kernel}</div>'
        "</section>",
        f"<section><h2>Proxy</h2>{proxy}</section>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'{meta}<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>stockade status</title><style>{STYLE}</style></head><body>"
        f'<header><h1>stockade status</h1><p class="meta">version {esc(version)} · '
        f'generated <time datetime="{generated}">{generated}</time> · {esc(rates)} · '
        f"{reload}</p></header><main>{''.join(parts)}</main></body></html>\n"
    )


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#1d2530;background:#fafbfc}
h1{font-size:1.4em;margin:0}.meta{color:#5a6573;margin:.2em 0 1em}
h2{font-size:1.15em;margin:1.2em 0 .3em;padding-bottom:.2em;border-bottom:1px solid #d8dee6}
h3{font-size:1em;margin:.9em 0 .35em}section>p{margin:.3em 0}
.row{display:flex;flex-wrap:wrap;gap:0 2.5em;align-items:flex-start}
table{border-collapse:collapse;background:#fff;box-shadow:0 0 0 1px #d8dee6}
th,td{padding:.25em .7em;text-align:left;white-space:nowrap}
th{background:#eef1f5;font-weight:600}
tbody tr:nth-child(even){background:#f6f8fa}
tfoot td{font-weight:600;border-top:1px solid #c5ccd6}
.num{text-align:right;font-variant-numeric:tabular-nums}
.none{color:#8a94a2;font-style:italic}
.up{color:#17803d;font-weight:600}.down{color:#c0262d;font-weight:600}
.drop,.err{color:#c0262d;font-weight:600}.refused,.warn{color:#a35f00;font-weight:600}
"""
