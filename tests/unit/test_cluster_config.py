"""[cluster]: parsing, errors that name the key, scopes that need a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stockade.cluster_settings import ClusterConfig, redact
from stockade.config import ConfigError, parse_config


def cluster(**keys: Any) -> dict[str, Any]:
    auth = {"key_file": "/etc/stockade/cluster.key"}  # read by the controller, not here
    return {
        "cluster": {"backend": "redis", "url": "redis://198.18.2.1:6379/0", "auth": auth, **keys}
    }


def test_embedded_by_default_and_nothing_needed() -> None:
    config = parse_config({})
    assert config.cluster.backend == "embedded" and not config.cluster.enabled
    assert config.proxy.cluster == config.cluster  # the workers see the same section


def test_redis_backend_with_every_key(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    config = parse_config(
        cluster(
            url="rediss://198.18.2.1:6380/2",
            password_file=str(secret),
            node="edge-1",
            key_prefix="prod:",
            timeout="250ms",
            retry_interval="2s",
            heartbeat="500ms",
            expected_nodes=3,
            on_redis_down="closed",
            queue_max=5000,
            stream_max=20000,
            tls={"ca_file": "/etc/ca.pem", "check_hostname": False},
        )
    ).cluster
    assert config.enabled and config.password == "s3cret" and config.node == "edge-1"
    assert (config.timeout, config.retry_interval, config.heartbeat) == (0.25, 2.0, 0.5)
    assert config.expected_nodes == 3 and config.on_redis_down == "closed"
    assert config.tls.ca_file == Path("/etc/ca.pem") and not config.tls.check_hostname


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"url": ""}, "cluster.url: required"),
        ({"url": "http://x"}, "cluster.url: scheme 'http'"),
        ({"url": "unix://relative.sock"}, "absolute socket path"),
        ({"url": "redis://h:99999/0"}, "invalid port"),
        ({"url": "redis://h/db"}, "database number"),
        ({"backend": "etcd"}, "cluster.backend: 'etcd'"),
        ({"node": "bad name"}, "cluster.node"),
        ({"on_redis_down": "ignore"}, "cluster.on_redis_down: 'ignore'"),
        ({"timeout": "30s"}, "cluster.timeout: at most 10s"),
        ({"expected_nodes": 0}, "cluster.expected_nodes: 0 is out of range"),
        ({"tls": {"ca_file": "/ca.pem"}}, "the url is not rediss://"),
        ({"tls": {"cert_file": "/c.pem"}}, "both cert_file and key_file"),
        ({"passwrod_file": "/x"}, "did you mean cluster.password_file?"),
        ({"password_file": "/nonexistent/pw"}, "cluster.password_file: cannot read"),
    ],
)
def test_errors_name_the_key(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        parse_config(cluster(**keys))


def test_unknown_section_suggests_cluster() -> None:
    with pytest.raises(ConfigError, match=r"did you mean \[cluster\]"):
        parse_config({"clustre": {}})


PROXY_SCOPES = {
    "rate_limiting": {"limits": {"global": {"rate": "100/min", "scope": "cluster"}}},
    "quotas": {"scope": "cluster"},
    "anomaly": {
        "rules": [{"name": "s", "when": "requests > 5 in 1m", "action": "deny", "scope": "cluster"}]
    },
}


@pytest.mark.parametrize("part", sorted(PROXY_SCOPES))
def test_cluster_scope_needs_a_cluster(part: str) -> None:
    proxy = {part: PROXY_SCOPES[part]}
    with pytest.raises(ConfigError, match='needs \\[cluster\\] backend = "redis"'):
        parse_config({"proxy": proxy})
    config = parse_config({"proxy": proxy, **cluster()})  # with one, it is accepted
    assert config.proxy.cluster.enabled


def test_scope_values_are_checked() -> None:
    limits = {"limits": {"l": {"rate": "1/s", "scope": "global"}}}
    with pytest.raises(ConfigError, match="scope: 'global'; use local or cluster"):
        parse_config({"proxy": {"rate_limiting": limits}, **cluster()})
    agents = {"rules": [{"name": "ua", "user_agents": True, "action": "deny", "scope": "cluster"}]}
    with pytest.raises(ConfigError, match="User-Agent rule counts nothing"):
        parse_config({"proxy": {"anomaly": agents}, **cluster()})
    conns = {
        "rules": [
            {"name": "c", "when": "new_connections > 9 in 1m", "action": "deny", "scope": "cluster"}
        ]
    }
    with pytest.raises(ConfigError, match="new_connections is counted per node only"):
        parse_config({"proxy": {"anomaly": conns}, **cluster()})


def test_passwords_never_shown() -> None:
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("unix:///run/r.sock?password=pw&db=1") == "unix:///run/r.sock?password=***&db=1"
    assert ClusterConfig(url="redis://u:x@h/0").shown_url() == "redis://u:***@h/0"
