"""Drawing a `stockade top` frame with rich: tables with colour on a terminal, plain text
(no escape codes, no box lines) for scripts."""

from __future__ import annotations

from rich import box
from rich.columns import Columns
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from stockade.stats_view import (
    BanRow,
    Frame,
    ProxyFrame,
    RouteRow,
    expires,
    interface,
    latency,
    per_second,
)

# every other column is a number, right-aligned
TEXT_COLUMNS = frozenset(
    {
        *("reason", "verdict", "target", "source", "expires"),
        *("route", "decision", "pool", "server", "state"),
    }
)


class View:
    def __init__(self, plain: bool) -> None:
        self.plain = plain

    def table(self, *columns: str) -> Table:
        t = Table(
            box=None if self.plain else box.SIMPLE_HEAD,
            show_edge=False,
            header_style="bold",
            pad_edge=False,
        )
        for name in columns:
            t.add_column(name, justify="left" if name in TEXT_COLUMNS else "right")
        return t

    def block(self, title: str, table: Table) -> Group:
        """A blank line, the title on a line of its own (never wrapped), the table."""
        return Group(Text(), Text(title, style="bold"), table)

    def render(self, frame: Frame) -> RenderableType:
        kernel: list[Group] = []
        if frame.controller is not None:
            kernel += [self.reasons(frame), self.bans("bans: top by hits", frame.top_bans)]
            kernel.append(self.bans("bans: expiring soonest", frame.expiring))
        proxy = self.proxy(frame.proxy) if frame.proxy is not None else []
        if self.plain:  # one table after the other: easy to read in a script
            return Group(self.header(frame), *kernel, *proxy)
        # on a screen, side by side as far as its width allows
        return Group(
            self.header(frame), Columns(kernel, padding=(0, 3)), Columns(proxy, padding=(0, 3))
        )

    def header(self, frame: Frame) -> Text:
        text = Text()
        over = f"rates over {frame.interval:.1f}s" if frame.interval else "first sample"
        text.append(f"stockade top ({over}", style="bold")
        text.append(")\n" if self.plain else "; q quits)\n", style="bold")
        c = frame.controller
        if c is None:
            text.append(f"controller: {frame.controller_error}\n", style="bold red")
        else:
            mode = "MONITOR (nothing dropped)" if c["monitor"] else "enforcing"
            ifaces = ", ".join(interface(i) for i in c["interfaces"])
            text.append(f"controller: pid {c['pid']}, version {c['version']}, ")
            text.append(mode, style="yellow" if c["monitor"] else "green")
            text.append(f"; interfaces: {ifaces or 'none'}; bans: {c['bans']}\n")
        if frame.proxy is not None:
            text.append(f"proxy: running, {frame.proxy.in_flight} requests in flight")
        else:
            text.append(f"proxy: {frame.proxy_state}", style="yellow")
        return text

    def reasons(self, frame: Frame) -> Group:
        t = self.table("reason", "verdict", "pkt/s", "packets", "bytes")
        for r in frame.reasons:
            style = "red" if r.verdict == "drop" and r.packets else None
            t.add_row(
                r.reason,
                r.verdict,
                per_second(r.packets_per_second),
                str(r.packets),
                str(r.bytes),
                style=style,
            )
        return self.block("kernel: packets by reason", t)

    def bans(self, title: str, rows: list[BanRow]) -> Group:
        t = self.table("target", "source", "pkt/s", "packets", "expires", "reason")
        for b in rows:
            t.add_row(
                b.target,
                b.source,
                per_second(b.packets_per_second),
                str(b.packets),
                expires(b.expires_in),
                b.reason,
            )
        if not rows:
            t.add_row("(none)", "", "", "", "", "")
        return self.block(title, t)

    def proxy(self, p: ProxyFrame) -> list[Group]:
        routes = self.table(
            "route", "req/s", "requests", "2xx", "3xx", "4xx", "5xx", "p50", "p99"
        )
        for r in p.routes:
            routes.add_row(*self.route_cells(r), end_section=r is p.routes[-1])
        routes.add_row(*self.route_cells(p.overall), style="bold")
        decisions = self.table("decision", "req/s", "requests")
        for d in p.decisions:
            refused = d.decision != "allowed" and d.requests > 0
            decisions.add_row(
                d.decision,
                per_second(d.requests_per_second),
                str(d.requests),
                style="yellow" if refused else None,
            )
        upstreams = self.table("pool", "server", "state", "in flight")
        for u in p.upstreams:
            state = Text("UP", style="green") if u.up else Text("DOWN", style="bold red")
            upstreams.add_row(u.pool, u.server, state, str(u.in_flight))
        if not p.upstreams:
            upstreams.add_row("(none yet)", "", "", "")
        return [
            self.block("proxy: requests by route", routes),
            self.block("proxy: requests by decision", decisions),
            self.block("proxy: upstream servers", upstreams),
        ]

    def route_cells(self, r: RouteRow) -> list[str]:
        return [
            r.route,
            per_second(r.requests_per_second),
            str(r.requests),
            *(str(r.statuses.get(cls, 0)) for cls in ("2xx", "3xx", "4xx", "5xx")),
            latency(r.p50),
            latency(r.p99),
        ]
