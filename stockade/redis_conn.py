"""A Redis client made from [cluster]: every call bounded by a timeout, never retried blindly.

Shared by the controller (ban sync) and the proxy's workers (cluster counters).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError

from stockade.cluster_settings import ClusterConfig

__all__ = [
    "ClusterAuthError",
    "RedisError",
    "check_credentials",
    "connect",
    "describe_error",
    "is_auth_error",
]

log = logging.getLogger("stockade.cluster")


class ClusterAuthError(RuntimeError):
    """Redis refused our credentials: a configuration error, not an outage."""


def connect(config: ClusterConfig, read_timeout: float | None = None) -> aioredis.Redis:
    """A client for config.url; `read_timeout` replaces the timeout for blocking reads."""
    kwargs: dict[str, Any] = {
        "socket_timeout": read_timeout if read_timeout is not None else config.timeout,
        "socket_connect_timeout": config.timeout,
        "retry_on_timeout": False,
        "retry": None,  # a failed call fails at once: the caller falls back or queues
        "health_check_interval": 0,
        "protocol": 2,
        "decode_responses": True,
        "client_name": f"stockade-{config.node}",
    }
    if config.password is not None:
        kwargs["password"] = config.password
    if config.url.startswith("rediss://"):
        tls = config.tls
        kwargs["ssl_ca_certs"] = str(tls.ca_file) if tls.ca_file else None
        kwargs["ssl_certfile"] = str(tls.cert_file) if tls.cert_file else None
        kwargs["ssl_keyfile"] = str(tls.key_file) if tls.key_file else None
        kwargs["ssl_check_hostname"] = tls.check_hostname
    client: aioredis.Redis = aioredis.Redis.from_url(config.url, **kwargs)
    return client


# What Redis says to a client with a wrong or missing password (redis-py wraps some of
# these in a plain ConnectionError while connecting).
_AUTH_TEXTS = (
    "WRONGPASS",
    "NOAUTH",
    "NOPERM",
    "invalid username-password",
    "Authentication required",
    "HELLO must be called with the client already authenticated",
)


def is_auth_error(exc: BaseException) -> bool:
    if isinstance(exc, AuthenticationError):
        return True
    text = str(exc)
    return isinstance(exc, RedisError) and any(t in text for t in _AUTH_TEXTS)


def describe_error(exc: BaseException) -> str:
    """One line: what went wrong talking to Redis."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def check_credentials(config: ClusterConfig) -> str | None:
    """At start, before anything changes (controller, proxy master): a password Redis
    refuses is an error message; an unreachable Redis is only logged (both go on
    without it until it answers)."""

    async def ping() -> str | None:
        client = connect(config)
        try:
            async with asyncio.timeout(config.timeout * 2):
                await client.ping()
        except Exception as exc:
            if is_auth_error(exc):
                return (
                    f"cluster.url: Redis at {config.shown_url()} refused the password "
                    f"({describe_error(exc)}); check the password in cluster.url or "
                    "cluster.password_file"
                )
            log.warning(
                "cluster: Redis at %s unreachable at start (%s); going on without it "
                "until it answers",
                config.shown_url(),
                describe_error(exc),
            )
        finally:
            await client.aclose()
        return None

    return asyncio.run(ping())
