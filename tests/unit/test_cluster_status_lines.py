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


def test_redis_shows_the_trust_mode_and_what_was_refused() -> None:
    status = {
        **embedded_status("b"),
        "backend": "redis",
        "url": "redis://198.18.2.1:6379/0",
        "state": "connected",
        "last_error": None,
        "peers": [],
        "last_sync": None,
        "lag": None,
        "queued": 0,
        "published": 0,
        "received": 0,
        "auth": {"mode": "on", "key_id": "k2", "accepted_key_ids": ["k1", "k2"]},
        "refused": {"event": {"bad_tag": 3, "unknown_node": 1}, "record": {"bad_tag": 2}},
    }
    assert cluster_lines(status, now=100.0)[-2:] == [
        "            auth: on with key k2 (also accepting k1)",
        "            REFUSED 6 from the cluster: event bad_tag 3, event unknown_node 1, "
        "record bad_tag 2",
    ]
    status["auth"] = {"mode": "off", "key_id": None, "accepted_key_ids": []}
    status["refused"] = {}
    assert cluster_lines(status, now=100.0)[-1] == (
        "            auth: OFF (insecure_unauthenticated: anyone who can write to Redis is trusted)"
    )
