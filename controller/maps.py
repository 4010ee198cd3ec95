"""Typed access to the XDP program's maps, behind a narrow interface.

The ban store is the truth; the maps are a projection of it. Reconciling
code talks to `MapBackend`, implemented here by `BpfMaps` (the kernel) and
`DryRunMaps` (memory), so most logic is testable without a kernel.
"""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass
from typing import Any, Protocol

from stockade.controller import layout
from stockade.controller.loader import LoadedProgram
from stockade.targets import Network, is_exact


class MapFullError(RuntimeError):
    pass


@dataclass(frozen=True)
class Hits:
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class MapBan:
    expires_ns: int  # CLOCK_MONOTONIC, 0 = permanent
    hits: Hits = Hits()


@dataclass(frozen=True)
class RuntimeSettings:
    """The tunables in the config map, changeable without a reload."""

    syn_rate: int = 0  # per second per source; 0 = off
    syn_burst: int = 0
    v6_rate_prefix: int = 64
    monitor: bool = False


class MapBackend(Protocol):
    def bans(self) -> dict[Network, MapBan]: ...
    def put_ban(self, net: Network, expires_ns: int) -> None: ...
    def delete_ban(self, net: Network) -> bool: ...
    def allows(self) -> dict[Network, Hits]: ...
    def put_allow(self, net: Network) -> None: ...
    def delete_allow(self, net: Network) -> bool: ...
    def apply_settings(self, settings: RuntimeSettings) -> None: ...
    def counters(self) -> dict[str, Hits]: ...
    def counter_slots(self) -> dict[int, dict[str, Hits]]: ...


def by_reason(slots: dict[int, dict[str, Hits]]) -> dict[str, Hits]:
    """Every reason's counters summed over the interface slots (zeros included)."""
    out = {}
    for name in layout.reasons():
        hits = [row[name] for row in slots.values() if name in row]
        out[name] = Hits(sum(h.packets for h in hits), sum(h.bytes for h in hits))
    return out


def _net_from(family_v6: bool, raw: bytes, prefixlen: int) -> Network:
    if family_v6:
        return ipaddress.IPv6Network((raw, prefixlen))
    return ipaddress.IPv4Network((raw, prefixlen))


TRIES = ("ban_prefix_v4", "ban_prefix_v6", "allow_v4", "allow_v6")


def _bytes_array(arr: Any) -> bytes:
    return bytes(arr)


class BpfMaps:
    """The real backend: the pinned maps of a loaded program."""

    def __init__(self, program: LoadedProgram) -> None:
        self._t = {name: program.table(name) for name in layout.PINNED_MAPS}
        self._settings = RuntimeSettings()
        # The prefixes in each trie, read once here. A trie lookup returns
        # the longest match, not the exact key, so whether a prefix is
        # already present is answered from this set; its size is the count
        # that lets the program skip an empty trie.
        self._trie_keys: dict[str, set[Network]] = {
            name: {self._net_of(name, key) for key in self._t[name]} for name in TRIES
        }
        current = self._t["config"][ctypes.c_uint32(0)]
        self._settings = RuntimeSettings(
            syn_rate=int(current.syn_rate),
            syn_burst=int(current.syn_burst),
            v6_rate_prefix=int(current.v6_rate_prefix) or 64,
            monitor=bool(current.flags & layout.CONFIG_F_MONITOR),
        )
        self._write_config()

    # -- config -------------------------------------------------------------
    def _write_config(self) -> None:
        s = self._settings
        cfg = layout.StockadeConfig(
            syn_rate=s.syn_rate,
            syn_burst=s.syn_burst,
            v6_rate_prefix=s.v6_rate_prefix,
            flags=layout.CONFIG_F_MONITOR if s.monitor else 0,
            ban_prefix_v4_count=len(self._trie_keys["ban_prefix_v4"]),
            ban_prefix_v6_count=len(self._trie_keys["ban_prefix_v6"]),
            allow_v4_count=len(self._trie_keys["allow_v4"]),
            allow_v6_count=len(self._trie_keys["allow_v6"]),
        )
        self._t["config"][ctypes.c_uint32(0)] = cfg

    def apply_settings(self, settings: RuntimeSettings) -> None:
        self._settings = settings
        self._write_config()

    @property
    def settings(self) -> RuntimeSettings:
        return self._settings

    # -- keys ---------------------------------------------------------------
    @staticmethod
    def _ban_table_name(net: Network) -> str:
        v6 = net.version == 6
        if is_exact(net):
            return "ban_v6" if v6 else "ban_v4"
        return "ban_prefix_v6" if v6 else "ban_prefix_v4"

    def _key(self, table: str, net: Network) -> Any:
        key_type = self._t[table].Key
        raw = net.network_address.packed
        key = key_type()
        if hasattr(key, "prefixlen"):
            key.prefixlen = net.prefixlen
        ctypes.memmove(ctypes.addressof(key.addr), raw, len(raw))
        return key

    @staticmethod
    def _net_of(table: str, key: Any) -> Network:
        v6 = table.endswith("v6")
        plen = int(key.prefixlen) if hasattr(key, "prefixlen") else (128 if v6 else 32)
        return _net_from(v6, _bytes_array(key.addr), plen)

    def _exists(self, table: str, net: Network, key: Any) -> bool:
        if table in self._trie_keys:
            return net in self._trie_keys[table]
        return self._t[table].get(key) is not None

    def _insert(self, table: str, net: Network, key: Any, value: Any, is_new: bool) -> None:
        tracked = is_new and table in self._trie_keys
        if tracked:
            self._trie_keys[table].add(net)  # raise the count before the entry exists
            self._write_config()
        try:
            self._t[table][key] = value
        except Exception as exc:  # bcc raises a bare Exception with errno text
            if tracked:
                self._trie_keys[table].discard(net)
                self._write_config()
            if "No space left" in str(exc) or "E2BIG" in str(exc) or "Argument list" in str(exc):
                raise MapFullError(f"BPF map {table} is full") from exc
            raise

    def _remove(self, table: str, net: Network) -> bool:
        try:
            del self._t[table][self._key(table, net)]  # exact, also in a trie
        except KeyError:
            return False
        if table in self._trie_keys:
            self._trie_keys[table].discard(net)  # lower the count after the entry is gone
            self._write_config()
        return True

    # -- bans ---------------------------------------------------------------
    def bans(self) -> dict[Network, MapBan]:
        out: dict[Network, MapBan] = {}
        for table in ("ban_v4", "ban_v6", "ban_prefix_v4", "ban_prefix_v6"):
            for key, value in self._t[table].items():
                out[self._net_of(table, key)] = MapBan(
                    expires_ns=int(value.expires_ns),
                    hits=Hits(int(value.packets), int(value.bytes)),
                )
        return out

    def put_ban(self, net: Network, expires_ns: int) -> None:
        table = self._ban_table_name(net)
        key = self._key(table, net)
        value = layout.BanValue(expires_ns=expires_ns)
        exists = self._exists(table, net, key)
        if exists:  # keep the hit counters of an updated ban (the exact entry)
            existing = self._t[table][key]
            value.packets, value.bytes = existing.packets, existing.bytes
        self._insert(table, net, key, value, not exists)

    def delete_ban(self, net: Network) -> bool:
        table = self._ban_table_name(net)
        return self._remove(table, net)

    # -- allowlist ----------------------------------------------------------
    def allows(self) -> dict[Network, Hits]:
        out: dict[Network, Hits] = {}
        for table in ("allow_v4", "allow_v6"):
            for key, value in self._t[table].items():
                out[self._net_of(table, key)] = Hits(int(value.packets), int(value.bytes))
        return out

    def put_allow(self, net: Network) -> None:
        table = "allow_v6" if net.version == 6 else "allow_v4"
        key = self._key(table, net)
        if not self._exists(table, net, key):
            self._insert(table, net, key, layout.AllowValue(), True)

    def delete_allow(self, net: Network) -> bool:
        table = "allow_v6" if net.version == 6 else "allow_v4"
        return self._remove(table, net)

    # -- counters -----------------------------------------------------------
    def counters(self) -> dict[str, Hits]:
        """Counters by reason, all interfaces together."""
        return by_reason(self.counter_slots())

    def counter_slots(self) -> dict[int, dict[str, Hits]]:
        """Counters by interface slot (ingress ifindex % IF_SLOTS), then reason.

        Per-CPU values are summed; a slot that never counted a packet is left out.
        """
        table = self._t["counters"]
        out = {}
        for slot in range(layout.if_slots()):
            row = {}
            for name, code in layout.reasons().items():
                per_cpu = table[ctypes.c_uint32(layout.counter_index(slot, code))]
                row[name] = Hits(
                    packets=sum(int(c.packets) for c in per_cpu),
                    bytes=sum(int(c.bytes) for c in per_cpu),
                )
            if any(h.packets for h in row.values()):
                out[slot] = row
        return out

    def events_lost(self) -> int:
        return sum(int(v) for v in self._t["events_lost"][ctypes.c_uint32(0)])


class DryRunMaps:
    """In-memory backend with the same behaviour, for tests and `--dry-run` planning."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        self._bans: dict[Network, MapBan] = {}
        self._allows: dict[Network, Hits] = {}
        self.settings = RuntimeSettings()
        self.capacity = capacity
        self.writes = 0

    def bans(self) -> dict[Network, MapBan]:
        return dict(self._bans)

    def put_ban(self, net: Network, expires_ns: int) -> None:
        if net not in self._bans and len(self._bans) >= self.capacity:
            raise MapFullError("dry-run ban map is full")
        hits = self._bans[net].hits if net in self._bans else Hits()
        self._bans[net] = MapBan(expires_ns=expires_ns, hits=hits)
        self.writes += 1

    def delete_ban(self, net: Network) -> bool:
        self.writes += 1
        return self._bans.pop(net, None) is not None

    def allows(self) -> dict[Network, Hits]:
        return dict(self._allows)

    def put_allow(self, net: Network) -> None:
        self._allows.setdefault(net, Hits())
        self.writes += 1

    def delete_allow(self, net: Network) -> bool:
        self.writes += 1
        return self._allows.pop(net, None) is not None

    def apply_settings(self, settings: RuntimeSettings) -> None:
        self.settings = settings

    def counters(self) -> dict[str, Hits]:
        return by_reason(self.counter_slots())

    def counter_slots(self) -> dict[int, dict[str, Hits]]:
        return {}  # no program, no packets
