"""The controller's Prometheus metrics: the kernel's counters and the bans, read at scrape time.

Nothing is counted twice: the XDP program's per-CPU counters are summed
when Prometheus asks, the active bans are read from the store, and only
what exists nowhere else (ban events since start, SYN-rate events) is
kept in memory. All of it is read on the controller's one worker thread,
which owns the maps and the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from stockade.controller.maps import Hits

# What each reason does to the packet (in monitor mode nothing is dropped;
# stockade_xdp_monitor_mode says so).
VERDICTS = {"drop_ban": "drop", "drop_rate": "drop"}


@dataclass
class Snapshot:
    counters: dict[str, dict[str, Hits]]  # interface label -> reason -> hits (ifslots.py)
    bans: dict[tuple[str, str, str], int]  # (source, kind, family) -> active bans
    allows: int
    events: dict[tuple[str, str], int]  # (action, source) -> since start
    syn_events: int
    events_lost: int
    monitor: bool
    interfaces: list[tuple[str, str, bool]] = field(default_factory=list)  # name, mode, ours
    cluster: dict[str, Any] | None = None  # ClusterSync.status() in cluster mode
    not_in_kernel: int = 0  # active bans in the store that are not in the maps
    map_fill: dict[str, tuple[int, int]] = field(default_factory=dict)  # map -> (entries, max)


class ControllerCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.snapshot()
        packets = CounterMetricFamily(
            "stockade_xdp_packets",
            "Packets the XDP program saw, by reason, verdict and ingress interface "
            '(interfaces sharing a counters slot are one label, "eth0+eth1").',
            labels=["reason", "verdict", "interface"],
        )
        octets = CounterMetricFamily(
            "stockade_xdp_bytes",
            "Bytes the XDP program saw, by reason, verdict and ingress interface.",
            labels=["reason", "verdict", "interface"],
        )
        for interface, row in sorted(s.counters.items()):
            for reason, hits in sorted(row.items()):
                verdict = VERDICTS.get(reason, "pass")
                packets.add_metric([reason, verdict, interface], hits.packets)
                octets.add_metric([reason, verdict, interface], hits.bytes)
        yield packets
        yield octets
        bans = GaugeMetricFamily(
            "stockade_bans_active",
            "Bans in force, by who set them (cli, rule, proxy, cluster), kind and family.",
            labels=["source", "kind", "family"],
        )
        for (source, kind, family), count in sorted(s.bans.items()):
            bans.add_metric([source, kind, family], count)
        yield bans
        yield GaugeMetricFamily(
            "stockade_bans_not_in_kernel",
            "Bans in the store that are not in the kernel maps (a map was full): their packets "
            "pass. The sweep puts them in as room appears.",
            value=s.not_in_kernel,
        )
        entries = GaugeMetricFamily(
            "stockade_map_entries", "Entries in each ban and allow map.", labels=["map"]
        )
        capacity = GaugeMetricFamily(
            "stockade_map_max_entries",
            "The size of each ban and allow map (xdp.max_bans_v4, ...).",
            labels=["map"],
        )
        fill = GaugeMetricFamily(
            "stockade_map_fill_ratio",
            "Entries / max_entries of each ban and allow map; at 1 a new ban cannot go in.",
            labels=["map"],
        )
        for name, (count, size) in sorted(s.map_fill.items()):
            entries.add_metric([name], count)
            capacity.add_metric([name], size)
            fill.add_metric([name], count / size if size else 0.0)
        yield entries
        yield capacity
        yield fill
        yield GaugeMetricFamily(
            "stockade_allowlist_entries", "Allowlist entries in the kernel.", value=s.allows
        )
        events = CounterMetricFamily(
            "stockade_ban_events",
            "Bans set, lifted and expired since the controller started, by who set them.",
            labels=["action", "source"],
        )
        for (action, source), count in sorted(s.events.items()):
            events.add_metric([action, source], count)
        yield events
        yield CounterMetricFamily(
            "stockade_syn_rate_events",
            "Sources reported by the kernel for going over the SYN rate (at most one a second "
            "each).",
            value=s.syn_events,
        )
        yield CounterMetricFamily(
            "stockade_ringbuf_events_lost",
            "Events the kernel could not put on the ring buffer (it was full).",
            value=s.events_lost,
        )
        yield GaugeMetricFamily(
            "stockade_xdp_monitor_mode",
            "1 when the program only counts (monitor mode), 0 when it enforces.",
            value=1 if s.monitor else 0,
        )
        attached = GaugeMetricFamily(
            "stockade_xdp_attached",
            "1 when our program is attached to the interface, by interface and mode.",
            labels=["interface", "mode"],
        )
        for name, mode, ours in s.interfaces:
            attached.add_metric([name, mode], 1 if ours else 0)
        yield attached
        if s.cluster is not None:
            yield from _cluster(s.cluster)


def _cluster(c: dict[str, Any]) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """Cluster mode: whether Redis is reachable, the peers, the queue and the lag."""
    yield GaugeMetricFamily(
        "stockade_cluster_degraded",
        "1 while Redis is unreachable: bans are enforced locally and this node's changes queued.",
        value=0 if c["state"] == "connected" else 1,
    )
    yield GaugeMetricFamily(
        "stockade_cluster_peers",
        "Other nodes whose heartbeat was seen recently.",
        value=sum(1 for p in c["peers"] if p["alive"]),
    )
    yield GaugeMetricFamily(
        "stockade_cluster_queued_events",
        "Ban events made here and not yet in Redis (replayed when it returns).",
        value=c["queued"],
    )
    if c["last_sync"] is not None:
        yield GaugeMetricFamily(
            "stockade_cluster_last_sync_timestamp_seconds",
            "When this node last exchanged data with Redis.",
            value=c["last_sync"],
        )
    if c["lag"] is not None:
        yield GaugeMetricFamily(
            "stockade_cluster_lag_seconds",
            "From another node publishing a ban event to its being applied here (the last one).",
            value=c["lag"],
        )
    events = CounterMetricFamily(
        "stockade_cluster_events",
        "Ban events published by this node and received from others since start.",
        labels=["direction"],
    )
    events.add_metric(["published"], c["published"])
    events.add_metric(["received"], c["received"])
    yield events
    refused = CounterMetricFamily(
        "stockade_cluster_refused",
        "What this node read from Redis and refused (nothing of it was applied), by kind "
        "(event, record, tombstone, heartbeat) and reason (unsigned, bad_tag, unknown_key, "
        "unknown_node, replayed, malformed, invalid, allowlisted, not_accepted).",
        labels=["kind", "reason"],
    )
    for kind, reasons in sorted(c.get("refused", {}).items()):
        for reason, count in sorted(reasons.items()):
            refused.add_metric([kind, reason], count)
    yield refused
    yield CounterMetricFamily(
        "stockade_cluster_unsigned_accepted",
        "Unsigned events and records applied because cluster.auth.accept_unsigned is on "
        "(a migration); 0 once every node signs.",
        value=c.get("unsigned_accepted", 0),
    )
    yield CounterMetricFamily(
        "stockade_cluster_record_losses",
        "Times Redis was found to have lost the shared ban record (a new epoch): each time "
        "this node published every ban it has again.",
        value=c.get("record_losses", 0),
    )


def render(snapshot: Callable[[], Snapshot], extra: CollectorRegistry | None = None) -> bytes:
    registry = CollectorRegistry()
    registry.register(ControllerCollector(snapshot))
    text = generate_latest(registry)
    return text + (generate_latest(extra) if extra is not None else b"")
