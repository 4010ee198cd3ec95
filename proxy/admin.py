"""The proxy's scrape: every worker's metric files, added up (prometheus-client multiprocess)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

ADMIN_FILE = "admin.json"  # in status_dir: where the listener is, for `stockade top`


def render_workers(directory: Path) -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return generate_latest(registry)
