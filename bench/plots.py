"""PNG plots of the benchmark results, drawn by matplotlib's Agg renderer (no screen).

report.write_readme() calls write_plots() with the same results it turns into
tables, so the plots and bench/README.md always show the same data. A bar or
a point is a median over the rounds (or the trials), its error bar the
min-max spread. A case whose results are missing gets no plot.

matplotlib is Debian's python3-matplotlib (bench/bootstrap and
./scripts/bootstrap install it; the venv sees the system's packages).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench import report
from bench.common import Summary

DPI = 100
PANEL = (6.4, 4.4)  # inches per panel: 640 x 440 pixels at DPI
FAMILY_COLORS = {4: "tab:blue", 6: "tab:orange"}
GATEWAY_COLORS = {"stockade": "tab:blue", "HAProxy": "tab:red", "direct": "tab:gray"}
PHASE_COLORS = ("tab:green", "tab:purple")
NOTE = "median, error bars min-max over {}"


@dataclass(frozen=True)
class Plot:
    """One PNG: the results it is drawn from, its file name and what it shows."""

    case: str  # the results file's name: "xdp_cost", "flood", ...
    file: str
    title: str


def _figure(panels: int, title: str, rows: int = 1) -> tuple[Figure, list[Any]]:
    """A figure on an Agg canvas (no display, no pyplot state) and its axes."""
    fig = Figure(figsize=(PANEL[0] * panels, PANEL[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12)
    axes = fig.subplots(rows, panels, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _err(summaries: Sequence[Summary | None]) -> tuple[list[float], list[list[float]]]:
    """Medians, and matplotlib's error extents (down to the min, up to the max)."""
    medians = [s.median if s else 0.0 for s in summaries]
    down = [s.median - s.low if s else 0.0 for s in summaries]
    up = [s.high - s.median if s else 0.0 for s in summaries]
    return medians, [down, up]


def _gateway_color(name: str) -> str:
    for gateway, color in GATEWAY_COLORS.items():
        if name.startswith(gateway):
            return color
    return "tab:green"


def _barh(
    ax: Any,
    labels: Sequence[str],
    summaries: Sequence[Summary | None],
    xlabel: str,
    colors: Sequence[str] | None = None,
    digits: int = 0,
) -> None:
    """Horizontal bars, first label on top, each with its median written at its end;
    a missing value shows "n/a" where its bar would be."""
    medians, err = _err(summaries)
    ys = list(range(len(labels)))
    ax.barh(
        ys,
        medians,
        xerr=err,
        color=list(colors) if colors else [_gateway_color(label) for label in labels],
        alpha=0.85,
        capsize=3,
        error_kw={"elinewidth": 1},
    )
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    right = max((s.high for s in summaries if s), default=1.0)
    ax.set_xlim(0, right * 1.25)
    for y, summary in zip(ys, summaries, strict=True):
        if summary is None:
            ax.text(right * 0.02, y, "n/a", va="center", fontsize=8, color="0.35")
        else:
            ax.text(summary.high, y, f" {summary.median:,.{digits}f}", va="center", fontsize=7)


@dataclass(frozen=True)
class Series:
    """One bar in each group of a grouped bar chart."""

    label: str
    values: Sequence[Summary | None]  # one a group
    color: str
    missing: Sequence[str] = ()  # what to write where a value is None (default "n/a")


def _grouped_bars(
    ax: Any, groups: Sequence[str], series: Sequence[Series], ylabel: str, digits: int = 0
) -> None:
    """Bars side by side in each group, one per series; each median written above its
    error bar, and where a series has no value, its `missing` text."""
    width = 0.8 / len(series)
    present = [v for one in series for v in one.values if v]
    top = max((v.high for v in present), default=1.0)
    floor = min((v.low for v in present), default=1.0) if ax.get_yscale() == "log" else 0.0
    for i, one in enumerate(series):
        medians, err = _err(one.values)
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))]
        ax.bar(
            xs, medians, width, yerr=err, capsize=3, color=one.color, alpha=0.85, label=one.label
        )
        missing = list(one.missing) or ["n/a"] * len(groups)
        for x, value, absent in zip(xs, one.values, missing, strict=True):
            text, y = (
                (absent, floor) if value is None else (f"{value.median:,.{digits}f}", value.high)
            )
            ax.text(x, y, text, ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if ax.get_yscale() == "log":
        ax.set_ylim(top=top * 2.5)  # room for the labels above the bars
    else:
        ax.set_ylim(0, top * 1.35)


def _strip(ax: Any, labels: Sequence[str], values: Sequence[Sequence[float]], ylabel: str) -> None:
    """Every sample as a dot, spread sideways, with the median and min-max beside them."""
    for x, samples in enumerate(values):
        if not samples:
            ax.text(x, 0, "n/a", ha="center", fontsize=8)
            continue
        n = len(samples)
        offsets = [(i / max(n - 1, 1) - 0.5) * 0.3 for i in range(n)]
        ax.scatter([x - 0.1 + o for o in offsets], sorted(samples), s=8, alpha=0.5)
        summary = Summary.of(samples)
        medians, err = _err([summary])
        ax.errorbar([x + 0.25], medians, yerr=err, fmt="D", color="black", capsize=4, ms=5)
        ax.text(x + 0.32, summary.median, f"{summary.median:.1f}", va="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.2)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)


def _variant_panels(
    axes: Sequence[Any], table: report.L7Table, names: Sequence[str], rounds: int
) -> None:
    """requests/s and p99 of each variant of an L7 bench, side by side."""
    _barh(axes[0], names, [table.rps(n) for n in names], "requests/s")
    axes[0].set_title(f"requests/s ({NOTE.format(f'{rounds} rounds')})", fontsize=9)
    _barh(axes[1], names, [table.p99_ms(n) for n in names], "p99 latency, ms", digits=2)
    axes[1].set_title("p99 latency", fontsize=9)


# --- one figure per case ------------------------------------------------------------


def plot_xdp_cost(results: dict[str, Any]) -> Figure:
    t = report.CostTable(results)
    counts: list[int] = results["counts"]
    fig, axes = _figure(2, "Case 1: XDP cost per packet vs number of bans (BPF_PROG_TEST_RUN)")
    series = [
        ("stockade", "exact", "-", "o"),
        ("stockade", "prefix", "-", "s"),
        ("xdp-filter", "exact", "--", "^"),
        ("xdp-filter ip", "exact", ":", "v"),
    ]
    for ax, packet in zip(axes, ("pass", "banned"), strict=True):
        for program, table, style, marker in series:
            for family in (4, 6):
                points = [(n, t.get(program, table, family, n, packet)) for n in counts]
                present = [(n, s) for n, s in points if s is not None]
                if not present:
                    continue
                medians, err = _err([s for _, s in present])
                ax.errorbar(
                    [n for n, _ in present],
                    medians,
                    yerr=err,
                    linestyle=style,
                    marker=marker,
                    color=FAMILY_COLORS[family],
                    capsize=3,
                    label=f"{program}, IPv{family} {table}",
                )
        ax.set_xscale("log")
        ax.set_xticks(counts, [f"{n:,}" for n in counts])
        ax.set_xlabel("bans in the map")
        ax.set_ylabel("ns per packet")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.4)  # room for the legend above the lines
        ax.grid(alpha=0.3)
        ax.set_title(
            f"{packet} packet ({NOTE.format(str(results['rounds']) + ' rounds')})", fontsize=9
        )
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    return fig


def plot_flood(results: dict[str, Any]) -> Figure:
    ft = report.FloodTable(results)
    names = [v["name"] for v in results["variants"]]
    kernel = {
        v["name"]: Summary.of(
            [
                report._per_mpkt(s, "softirq_s") + report._per_mpkt(s, "system_s")
                for s in v["samples"]
            ]
        )
        for v in results["variants"]
    }
    colors = ["tab:green" if n.startswith("XDP") else "tab:gray" for n in names]
    fig, axes = _figure(2, "Case 2: receiver CPU under a veth flood, per filter")
    _barh(axes[0], names, [ft.softirq[n] for n in names], "softirq ms per Mpkt", colors)
    axes[0].set_title(
        f"the receiver: softirq of the sending CPU, {results['packets']:,} packets per flood "
        f"({NOTE.format(str(results['rounds']) + ' rounds')})",
        fontsize=9,
    )
    _barh(axes[1], names, [kernel[n] for n in names], "system + softirq ms per Mpkt", colors)
    axes[1].set_title("sender and receiver: system + softirq of that CPU", fontsize=9)
    return fig


def plot_l7(results: dict[str, Any]) -> Figure:
    t = report.L7Table(results)
    measured = {workload for _, workload in report._l7_kinds(results).values()}
    workloads = [w for w in report.L7_WORKLOADS if w in measured]
    direct_rps, direct_p99 = t.rps(report.DIRECT), t.p99_ms(report.DIRECT)
    direct = ""
    if direct_rps and direct_p99:
        direct = (
            f" (direct, no proxy: {direct_rps.median:,.0f} requests/s, "
            f"p99 {direct_p99.median:.2f} ms)"
        )
    fig, axes = _figure(2, f"Case 3: L7 gateway per workload, stockade vs HAProxy{direct}")
    gateways = (
        (report.STOCKADE_N, "tab:blue"),
        (report.STOCKADE_1, "lightsteelblue"),
        (report.HAPROXY, "tab:red"),
    )
    for ax, value, ylabel, digits in (
        (axes[0], t.rps, "requests/s", 0),
        (axes[1], t.p99_ms, "p99 latency, ms", 2),
    ):
        series = []
        for gateway, color in gateways:
            names = [report.l7_variant(gateway, w) for w in workloads]
            missing = [
                "no WAF" if gateway == report.HAPROXY and w == report.L7_WAF else ""
                for w in workloads
            ]
            series.append(Series(gateway, [value(n) for n in names], color, missing))
        _grouped_bars(ax, workloads, series, ylabel, digits)
    rounds = results["rounds"]
    axes[0].set_title(f"requests/s ({NOTE.format(f'{rounds} rounds')})", fontsize=9)
    axes[1].set_title("p99 latency", fontsize=9)
    return fig


def plot_jwt(results: dict[str, Any]) -> Figure:
    t = report.JwtTable(results)
    fig, axes = _figure(2, "Case 4: JWT auth (RS256), stockade vs HAProxy's jwt_verify")
    _variant_panels(axes, t, list(t.samples), results["rounds"])
    return fig


def plot_limits(results: dict[str, Any]) -> Figure:
    t = report.LimitsTable(results)
    fig, axes = _figure(2, "Case 5: three rate limits, stockade vs HAProxy stick tables")
    _variant_panels(axes, t, list(t.samples), results["rounds"])
    return fig


def plot_escalation(results: dict[str, Any]) -> Figure:
    et = report.EscalationTables(results)
    fig, axes = _figure(2, "Case 6: rule fire to kernel drop, and goodput under a flood")
    keys = ("fire_to_drop", "fire_to_ban", "ban_to_drop")
    labels = {
        "fire_to_drop": "rule fires ->\nfirst dropped SYN",
        "fire_to_ban": "rule fires ->\nban stored",
        "ban_to_drop": "ban stored ->\nfirst dropped SYN",
    }
    _strip(axes[0], [labels[k] for k in keys], [et.latency(k) for k in keys], "ms")
    axes[0].set_title(
        f"{len(et.valid)} trials, target p99 < {report.ESC_LATENCY_TARGET_MS:.0f} ms "
        "(dots: trials; diamond: median, bar: min-max)",
        fontsize=9,
    )
    gateways = [v["name"] for v in results["goodput"]["variants"]]
    _grouped_bars(
        axes[1],
        gateways,
        [
            Series(label, [et.rps(g, phase) for g in gateways], color)
            for (phase, label), color in zip(
                (("baseline", "no attack"), ("attack", "under attack")), PHASE_COLORS, strict=True
            )
        ],
        "legitimate requests/s (2xx)",
    )
    ax = axes[1]
    rounds = results["goodput"]["rounds"]
    ax.set_title(f"a legitimate client's goodput ({NOTE.format(f'{rounds} rounds')})", fontsize=9)
    return fig


def plot_waf(results: dict[str, Any]) -> Figure:
    fig, axes = _figure(2, "Case 7: the WAF per mode")
    ax = axes[0]
    modes = list(results["micro"]["samples"])  # whichever modes the bench timed
    ax.set_yscale("log")
    _grouped_bars(
        ax,
        modes,
        [
            Series(f"{mix} mix", [report._waf_micro(results, mode, mix) for mode in modes], color)
            for mix, color in zip(report.WAF_MIXES, PHASE_COLORS, strict=True)
        ],
        "µs per request (log scale)",
    )
    rounds = results["micro"]["rounds"]
    ax.set_title(f"evaluation alone ({NOTE.format(f'{rounds} rounds')})", fontsize=9)
    gateway = results["gateway"]
    t = report.L7Table(gateway)
    names = list(t.samples)
    _barh(axes[1], names, [t.rps(n) for n in names], "requests/s", ["tab:blue"] * len(names))
    axes[1].set_title(
        f"the gateway, {gateway['workers']} workers "
        f"({NOTE.format(str(gateway['rounds']) + ' rounds')})",
        fontsize=9,
    )
    return fig


def plot_cluster(results: dict[str, Any]) -> Figure:
    fig, axes = _figure(2, "Case 8: cluster mode (Redis)")
    names: list[str] = []
    values: list[list[float]] = []
    for mode, samples in report._cluster_by_auth(results).items():
        names += [f"dropped on another\n(auth {mode})", f"applied on the\nnode asked (auth {mode})"]
        values += [
            [s["drop_ms"] for s in samples if s["drop_ms"] is not None],
            [s["ack_ms"] for s in samples],
        ]
    _strip(axes[0], names, values, "ms")
    axes[0].set_title(
        f"ban propagation, {results['propagation']['trials']} trials, target p99 < 1 s "
        "(dots: samples; diamond: median, bar: min-max)",
        fontsize=9,
    )
    throughput = results["throughput"]
    t = report.L7Table(throughput)
    names = list(t.samples)
    _barh(axes[1], names, [t.rps(n) for n in names], "requests/s", ["tab:blue"] * len(names))
    rounds = throughput["rounds"]
    axes[1].set_title(
        f"a limit counted locally or in Redis ({NOTE.format(f'{rounds} rounds')})", fontsize=9
    )
    return fig


def plot_bulk(results: dict[str, Any]) -> Figure:
    t = report.BulkTable(results)
    fig, axes = _figure(2, f"Case 9: {t.count:,} bans from a file, and a packet's cost")
    samples = results["samples"]
    _strip(
        axes[0],
        ["stockade ban --file", "unban.all (API)"],
        [[s["load_s"] for s in samples], [s["unload_s"] for s in samples]],
        "seconds, the whole command",
    )
    axes[0].axhline(report.BULK_LOAD_TARGET_S, color="tab:red", linestyle="--", linewidth=1)
    axes[0].set_title(
        f"target: load in under {report.BULK_LOAD_TARGET_S:.0f} s (dashed); "
        f"{len(samples)} rounds (dots: samples; diamond: median, bar: min-max)",
        fontsize=9,
    )
    _grouped_bars(
        axes[1],
        t.packets,
        [
            Series("one ban", [t.baseline[p] for p in t.packets], "tab:gray"),
            Series(f"{t.count:,} bans", [t.loaded[p] for p in t.packets], "tab:blue"),
        ],
        "ns per packet (BPF_PROG_TEST_RUN)",
    )
    axes[1].set_title(f"a packet's cost ({NOTE.format(f'{len(samples)} rounds')})", fontsize=9)
    return fig


PLOTS: tuple[tuple[Plot, Callable[[dict[str, Any]], Figure]], ...] = (
    (Plot("xdp_cost", "xdp_cost.png", "XDP ns per packet vs bans"), plot_xdp_cost),
    (Plot("flood", "flood.png", "receiver CPU per Mpkt per filter"), plot_flood),
    (Plot("l7", "l7.png", "L7 requests/s and p99 per variant"), plot_l7),
    (Plot("jwt", "jwt.png", "JWT requests/s and p99 per variant"), plot_jwt),
    (Plot("limits", "limits.png", "rate limits requests/s and p99 per variant"), plot_limits),
    (
        Plot("escalation", "escalation.png", "rule fire to drop latency and goodput under flood"),
        plot_escalation,
    ),
    (Plot("waf", "waf.png", "WAF cost per mode"), plot_waf),
    (Plot("cluster", "cluster.png", "cluster ban propagation and limits"), plot_cluster),
    (Plot("bulk", "bulk.png", "bulk ban load time and packet cost"), plot_bulk),
)


def write_plots(results: Mapping[str, dict[str, Any] | None], out_dir: Path) -> list[Plot]:
    """Draw the plot of every case with results into out_dir; the plots drawn."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for plot, draw in PLOTS:
        data = results.get(plot.case)
        if data is None:
            continue
        fig = draw(data)
        fig.savefig(out_dir / plot.file, dpi=DPI, metadata={"Software": None})
        made.append(plot)
    return made
