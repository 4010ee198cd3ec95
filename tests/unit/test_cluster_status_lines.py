"""The cluster lines of `stockade status`."""

from __future__ import annotations

from stockade.cli.cluster_status import cluster_lines
from stockade.controller.cluster import embedded_status


def test_embedded_says_off() -> None:
    assert cluster_lines(embedded_status("a")) == [
        "cluster:    off (this node alone: SQLite and local counters)"
    ]


def test_redis_shows_state_peers_sync_lag_and_queue() -> None:
    status = {
        **embedded_status("b"),
        "backend": "redis",
        "url": "redis://:***@198.18.2.1:6379/0",
        "state": "degraded",
        "last_error": "Connection refused",
        "peers": [
            {"node": "a", "alive": True, "last_seen": 99.0, "lag": None},
            {"node": "c", "alive": False, "last_seen": 10.0, "lag": None},
        ],
        "last_sync": 97.5,
        "lag": 0.0042,
        "queued": 3,
        "published": 5,
        "received": 7,
    }
    assert cluster_lines(status, now=100.0) == [
        "cluster:    node b, DEGRADED to redis://:***@198.18.2.1:6379/0",
        "            last error: Connection refused",
        "            peers: a (not seen lately: c)",
        "            last sync 2.5s ago, lag 4 ms, 3 events queued, 5 published, 7 received",
    ]
