"""The shipped example config is valid and says what the defaults are."""

from __future__ import annotations

from pathlib import Path

from stockade.config import load_config
from stockade.proxy.settings import ProxyConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stockade.toml"


def test_example_config_parses() -> None:
    config = load_config(EXAMPLE)
    assert config.xdp.interfaces == ("eth0",)
    assert [listener.port for listener in config.proxy.listeners] == [443, 80]
    assert config.proxy.listeners[1].redirect_to_https == 443
    assert config.proxy.pool("api").health.path == "/health"
    assert config.proxy.routes[0].max_body_size == 10 * 1024 * 1024


def test_example_limits_are_the_defaults() -> None:
    example, default = load_config(EXAMPLE).proxy, ProxyConfig()
    for name in (
        "max_header_size",
        "max_headers",
        "max_url_length",
        "header_timeout",
        "body_idle_timeout",
        "keepalive_timeout",
        "max_connections",
        "drain_timeout",
    ):
        assert getattr(example, name) == getattr(default, name), name
