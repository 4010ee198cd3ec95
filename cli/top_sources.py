"""Where `stockade top` reads: the controller (control socket) and the proxy (admin listener).

The kernel's counters and the bans come over the control socket (`stats`,
`bans`, `status`), as for `stockade stats` and `stockade bans`. The proxy's
numbers come from its Prometheus endpoint: the master writes where it
listens to proxy.status_dir/admin.json, and the scrape is already added up
across workers there. A proxy that is not running is a state to show, not
an error. What a sample holds, and the frames made of two: stockade/stats_view.py.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from stockade.admin_http import AdminError, Credentials
from stockade.protocol import CommandError
from stockade.proxy.admin import ADMIN_FILE
from stockade.proxy.settings import ProxyConfig
from stockade.stats_view import KernelSample, ProxySample, Sample, kernel_sample, parse_proxy

SCRAPE_TIMEOUT = 2.0  # a frame must not wait long for a stuck proxy


class ProxyDown(Exception):
    """The proxy cannot be scraped; the message says why, for the frame."""


def admin_url(status_dir: Path) -> str:
    """The proxy's metrics URL from admin.json; ProxyDown when it is not running."""
    path = status_dir / ADMIN_FILE
    try:
        where = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProxyDown(f"not running (no {path})") from None
    except (OSError, ValueError) as exc:
        raise ProxyDown(f"cannot read {path}: {exc}") from None
    try:
        os.kill(int(where["pid"]), 0)
    except ProcessLookupError:
        raise ProxyDown(f"not running (pid {where['pid']} in {path} is gone)") from None
    except PermissionError:
        pass  # alive, someone else's
    host = str(where["address"])
    # a wildcard listener is reached on loopback
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{int(where['port'])}/metrics"


def scrape(url: str, authorization: str | None) -> str:
    request = urllib.request.Request(url)
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT) as response:
            text: str = response.read().decode()
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 401:
            raise ProxyDown(f"{url} refused the credentials in [proxy.admin]") from None
        raise ProxyDown(f"{url} answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ProxyDown(f"not running (nothing answers at {url}: {reason})") from None
    return text


def authorization(config: ProxyConfig) -> str | None:
    """The header the admin listener wants, from the same files it reads; AdminError."""
    expected = Credentials(config.admin).expected
    return expected[0].decode("latin-1") if expected else None


def proxy_sample(config: ProxyConfig) -> tuple[ProxySample | None, str]:
    if not config.admin.enabled:
        return None, "metrics are off ([proxy.admin] enabled = false)"
    try:
        url = admin_url(config.status_dir)
        return parse_proxy(scrape(url, authorization(config))), "running"
    except ProxyDown as exc:
        return None, str(exc)
    except AdminError as exc:
        return None, str(exc)
    except ValueError as exc:  # not the exposition format
        return None, f"cannot parse the proxy's metrics: {exc}"


def take_sample(socket_path: Path, config: ProxyConfig) -> Sample:
    at = time.monotonic()
    kernel: KernelSample | None = None
    error: str | None = None
    try:
        kernel = kernel_sample(socket_path)
    except CommandError as exc:
        error = exc.message + (f"; {exc.hint}" if exc.hint else "")
    proxy, state = proxy_sample(config)
    return Sample(at, kernel, error, proxy, state)
