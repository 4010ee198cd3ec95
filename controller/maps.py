"""Typed access to the XDP program's maps, behind a narrow interface.

The ban store is the truth; the maps are a projection of it. Reconciling
code talks to `MapBackend`, implemented here by `BpfMaps` (the kernel) and
`DryRunMaps` (memory), so most logic is testable without a kernel.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from stockade.controller import layout, libbpf
from stockade.controller.loader import LoadedProgram
from stockade.targets import Network, is_exact


class MapFullError(RuntimeError):
    pass


# What a ban entry held before a batch wrote or deleted it (None: absent), so the
# batch can be undone: restore_bans() puts these back.
Undo = list[tuple[Network, "MapBan | None"]]
BATCH_CHUNK = 16_384  # elements per BPF_MAP_*_BATCH system call
_FULL_ERRNOS = (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)
_NO_BATCH_ERRNOS = (errno.EINVAL, errno.ENOTSUP, 524)  # 524: the kernel's ENOTSUPP


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
    def put_bans(self, entries: Sequence[tuple[Network, int]]) -> Undo: ...
    def delete_bans(self, nets: Sequence[Network]) -> Undo: ...
    def restore_bans(self, undo: Undo) -> None: ...
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


def _fill_key(key: Any, net: Network) -> None:
    """Write `net` into a map key (an exact address, or an LPM trie's prefix and address)."""
    raw = net.network_address.packed
    if hasattr(key, "prefixlen"):
        key.prefixlen = net.prefixlen
    ctypes.memmove(ctypes.addressof(key.addr), raw, len(raw))


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
        key = self._t[table].Key()
        _fill_key(key, net)
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

    # -- many bans at once --------------------------------------------------
    def put_bans(self, entries: Sequence[tuple[Network, int]]) -> Undo:
        """Write many bans (target, expiry ns) with BPF_MAP_UPDATE_BATCH, all or none.

        Hit counters of entries that exist are kept. On any failure what was
        written is undone before the error is raised (MapFullError when a map
        is full). Returns what each entry held before, for restore_bans.
        """
        undo: Undo = []
        try:
            for table, items in self._by_table(entries).items():
                self._put_table(table, items, undo)
        except BaseException:
            self.restore_bans(undo)
            raise
        return undo

    def delete_bans(self, nets: Sequence[Network]) -> Undo:
        """Delete many bans (absent ones are skipped); returns what they held."""
        undo: Undo = []
        for table, items in self._by_table([(net, 0) for net in nets]).items():
            t = self._t[table]
            trie = self._trie_keys.get(table)
            present = []
            value = t.Leaf()
            for net, _ in items:
                key = self._key(table, net)
                if (trie is None or net in trie) and libbpf.map_lookup(t.map_fd, key, value):
                    hits = Hits(int(value.packets), int(value.bytes))
                    undo.append((net, MapBan(int(value.expires_ns), hits)))
                    present.append(key)
            for start in range(0, len(present), BATCH_CHUNK):
                chunk = present[start : start + BATCH_CHUNK]
                keys = (t.Key * len(chunk))(*chunk)
                try:
                    libbpf.map_delete_batch(t.map_fd, keys)
                except libbpf.BatchError:
                    for key in chunk[:]:  # no batch support, or a key gone meanwhile
                        t.pop(key, None)
            if table in self._trie_keys:  # lower the count after the entries are gone
                self._trie_keys[table].difference_update(net for net, _ in items)
                self._write_config()
        return undo

    def restore_bans(self, undo: Undo) -> None:
        """Put back what a batch changed: delete what was absent, rewrite what was there."""
        for net, previous in reversed(undo):
            if previous is None:
                self.delete_ban(net)
            else:
                self.put_ban(net, previous.expires_ns)

    def _by_table(
        self, entries: Sequence[tuple[Network, int]]
    ) -> dict[str, list[tuple[Network, int]]]:
        tables: dict[str, list[tuple[Network, int]]] = {}
        for net, expires_ns in entries:
            tables.setdefault(self._ban_table_name(net), []).append((net, expires_ns))
        return tables

    def _put_table(self, table: str, items: list[tuple[Network, int]], undo: Undo) -> None:
        t = self._t[table]
        keys = (t.Key * len(items))()
        values = (t.Leaf * len(items))()
        trie = self._trie_keys.get(table)
        added: list[Network] = []
        for i, (net, expires_ns) in enumerate(items):
            key, value = keys[i], values[i]  # views into the arrays: filled in place
            _fill_key(key, net)
            # an existing entry is read into its value slot, so its hit counters are kept;
            # a trie answers the longest match, so only a prefix known to be there is read
            if (trie is None or net in trie) and libbpf.map_lookup(t.map_fd, key, value):
                undo.append((net, MapBan(int(value.expires_ns))))
            else:
                undo.append((net, None))
                added.append(net)
            value.expires_ns = expires_ns
        tracked = table in self._trie_keys and bool(added)
        if tracked:  # raise the count before the entries exist
            self._trie_keys[table].update(added)
            self._write_config()
        try:
            for start in range(0, len(items), BATCH_CHUNK):
                end = min(start + BATCH_CHUNK, len(items))
                self._update_batch(table, keys, values, start, end)
        except BaseException:
            if tracked:
                self._trie_keys[table].difference_update(added)
                self._write_config()
            raise

    def _update_batch(self, table: str, keys: Any, values: Any, start: int, end: int) -> None:
        t = self._t[table]
        size = end - start
        chunk_keys = (t.Key * size).from_buffer(keys, start * ctypes.sizeof(t.Key))
        chunk_values = (t.Leaf * size).from_buffer(values, start * ctypes.sizeof(t.Leaf))
        try:
            libbpf.map_update_batch(t.map_fd, chunk_keys, chunk_values)
            return
        except libbpf.BatchError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise MapFullError(f"BPF map {table} is full") from exc
            if exc.errno not in _NO_BATCH_ERRNOS:
                raise
        for i in range(size):  # this kernel or map type has no batch update
            try:
                t[chunk_keys[i]] = chunk_values[i]
            except Exception as exc:  # bcc raises a bare Exception with errno text
                if "No space left" in str(exc) or "Argument list" in str(exc):
                    raise MapFullError(f"BPF map {table} is full") from exc
                raise

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

    def put_bans(self, entries: Sequence[tuple[Network, int]]) -> Undo:
        added = {net for net, _ in entries if net not in self._bans}
        if len(self._bans) + len(added) > self.capacity:
            raise MapFullError("dry-run ban map is full")
        undo: Undo = [(net, self._bans.get(net)) for net, _ in entries]
        for net, expires_ns in entries:
            self.put_ban(net, expires_ns)
        return undo

    def delete_bans(self, nets: Sequence[Network]) -> Undo:
        undo: Undo = [(net, self._bans[net]) for net in nets if net in self._bans]
        for net in nets:
            self.delete_ban(net)
        return undo

    def restore_bans(self, undo: Undo) -> None:
        for net, previous in reversed(undo):
            if previous is None:
                self._bans.pop(net, None)
            else:
                self._bans[net] = previous

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
