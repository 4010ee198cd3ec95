"""What the workers of one node share: created by the master before it forks."""

from __future__ import annotations

import logging
import os
import pwd
import time
import zoneinfo
from dataclasses import dataclass

from stockade.proxy.quota import QuotaCounters, prepare_database, read_usage
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.shared_table import PenaltyTable, WindowCounters

log = logging.getLogger("stockade.proxy")

PENALTY_SLOTS = 65_536


def quotas_used(config: ProxyConfig) -> bool:
    return any(plan.per_day or plan.per_month for plan in config.quotas.plans)


@dataclass
class SharedState:
    counters: WindowCounters  # rate limits
    behaviour: WindowCounters  # the anomaly rules' counters (a scan must not evict limits)
    penalties: PenaltyTable
    quotas: QuotaCounters | None

    @classmethod
    def create(cls, config: ProxyConfig) -> SharedState:
        """The tables, with stored quota usage loaded (so a restart resets nobody)."""
        quotas = None
        if quotas_used(config):
            zone = zoneinfo.ZoneInfo(config.quotas.timezone)
            quotas = QuotaCounters(2 * config.quotas.max_consumers, zone)
            path = config.quotas.database
            owner = None
            if config.user is not None and os.geteuid() == 0:
                entry = pwd.getpwnam(config.user)
                owner = (entry.pw_uid, entry.pw_gid)
            prepare_database(path, owner)
            loaded = quotas.load(read_usage(path), time.time(), time.monotonic())
            log.info("quota usage: %d counts loaded from %s", loaded, path)
        return cls(
            counters=WindowCounters(config.rate_limiting.max_keys),
            behaviour=WindowCounters(config.anomaly.max_keys if config.anomaly.rules else 1024),
            penalties=PenaltyTable(PENALTY_SLOTS),
            quotas=quotas,
        )
