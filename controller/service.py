"""What the controller does with bans and the allowlist.

Order of every change: validate, then write the store, then project into
the maps; a failure anywhere leaves both as they were. The store is the
truth: `reconcile` makes the maps match it, and runs at start.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import re
import sqlite3
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from stockade.clock import Clock
from stockade.controller.maps import Hits, MapBackend, MapBan, MapFullError
from stockade.controller.store import SOURCES, Allow, Ban, BanEvent, BanStore
from stockade.durations import DurationError, format_duration, parse_duration
from stockade.protocol import BAD_INPUT, MAX_BATCH, NOT_FOUND, RUNTIME, CommandError
from stockade.targets import (
    Network,
    PrefixFloor,
    TargetError,
    covers,
    format_target,
    is_exact,
    parse_target,
)

log = logging.getLogger(__name__)

MAX_TTL = 10 * 365 * 86400
MAX_REASON = 200
DEFAULT_HISTORY_RETENTION = 30 * 86400.0
# rule.ban: the escalation defaults (fail2ban's bantime.increment) and limits.
DEFAULT_FACTOR = 2.0
DEFAULT_MAX_TTL = 86400.0
DEFAULT_MEMORY = 7 * 86400.0
MAX_DETAILS = 4096  # bytes of the details object as compact JSON
RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
HISTORY_SHOWN = 50  # events `explain` returns
# Expiries recomputed from the wall clock differ by the time between two
# readings; closer than this counts as the same.
EXPIRY_TOLERANCE_NS = 1_000_000_000
# A ban put back into the store from the kernel maps (`rebuild_from_maps`): the
# maps hold a target and an expiry, nothing more.
REBUILT_REASON = "rebuilt-from-kernel"
REBUILT_SOURCE = "kernel"
UNENFORCED_LOGGED = 5  # targets named in the log line about bans that do not fit


@dataclass(frozen=True)
class RemovalGuard:
    """How many of the kernel's bans one reconcile may lift without being told."""

    max_share: float = 0.5  # of the active bans in the maps; 1.0 = no limit
    allowance: int = 10  # lifting this many is always allowed

    def refuses(self, lifting: int, in_kernel: int) -> bool:
        return lifting > self.allowance and lifting > self.max_share * in_kernel


class BanLossRefused(RuntimeError):
    """A reconcile would lift more of the kernel's bans than its guard allows; nothing changed."""

    def __init__(self, lifting: int, in_kernel: int, guard: RemovalGuard) -> None:
        super().__init__(
            f"reconciling would lift {lifting} of the {in_kernel} bans in the kernel "
            f"(more than {guard.max_share:.0%} and more than {guard.allowance})"
        )
        self.lifting = lifting
        self.in_kernel = in_kernel
        self.guard = guard


@dataclass(frozen=True)
class BanPlan:
    """The bans side of a reconcile, read before anything changes."""

    want: dict[Network, int]  # active store bans -> kernel expiry (ns), store order
    have: dict[Network, MapBan]  # what the maps hold
    lifting: int  # active kernel bans the store does not want
    in_kernel: int  # active kernel bans


def kernel_active(entry: MapBan, monotonic_ns: int) -> bool:
    """Whether the kernel still drops with this entry (it ignores an expired one)."""
    return entry.expires_ns == 0 or entry.expires_ns > monotonic_ns


@dataclass(frozen=True)
class ReconcileReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class BanChange:
    """A ban set or lifted by a command on this node (what cluster mode publishes)."""

    action: str  # "ban" or "unban"
    target: Network
    ban: Ban | None = None  # the ban as set, for "ban"


# A ban from another node created further in the future than this is refused.
REMOTE_CLOCK_SKEW = 60.0


class RemoteBanRefused(ValueError):
    """A ban from another node that a ban made here could not be (check_remote_ban)."""

    def __init__(self, message: str, allowlisted: bool = False) -> None:
        super().__init__(message)
        self.allowlisted = allowlisted


def _target(text: str) -> Network:
    try:
        net = parse_target(text)
    except TargetError as exc:
        raise CommandError(BAD_INPUT, str(exc)) from None
    if net.version == 4 and ":" in text:  # IPv4-mapped IPv6: say what it became
        log.info("%s is IPv4-mapped IPv6: taken as %s", text, format_target(net))
    return net


def _reason(text: str | None, default: str) -> str:
    if text is None:
        return default
    if len(text) > MAX_REASON:
        raise CommandError(BAD_INPUT, f"reason is {len(text)} characters; at most {MAX_REASON}")
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        raise CommandError(BAD_INPUT, "reason must not contain control characters")
    return text.strip() or default


def _kind(net: Network) -> str:
    return "exact" if is_exact(net) else "prefix"


def _sort_key(net: Network) -> tuple[int, int, int]:
    return net.version, int(net.network_address), net.prefixlen


def _duration(name: str, text: str | None, default: float) -> float:
    if text is None:
        return default
    try:
        return parse_duration(text, maximum=MAX_TTL)
    except DurationError as exc:
        raise CommandError(BAD_INPUT, f"{name}: {exc}") from None


def _rule_name(text: str) -> str:
    if not RULE_NAME.fullmatch(text):
        raise CommandError(
            BAD_INPUT,
            f"invalid rule name {text[:80]!r}: use letters, digits, _ . : - "
            "(at most 64 characters, starting with a letter or digit)",
        )
    return text


def _factor(value: float | None) -> float:
    if value is None:
        return DEFAULT_FACTOR
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError(BAD_INPUT, "factor must be a number")
    if not math.isfinite(value) or value < 1:
        raise CommandError(BAD_INPUT, f"factor must be a finite number of at least 1, got {value}")
    return float(value)


def _details(value: dict[str, Any] | None) -> str | None:
    """The details object as the compact JSON text that is stored."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CommandError(BAD_INPUT, "details must be a JSON object")
    try:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CommandError(BAD_INPUT, f"details cannot be stored as JSON: {exc}") from None
    if len(text) > MAX_DETAILS:  # ASCII: json.dumps escapes the rest
        raise CommandError(
            BAD_INPUT,
            f"details is {len(text)} bytes as JSON; at most {MAX_DETAILS}",
            "send the counters that fired the rule, not the requests",
        )
    return text


def escalated_ttl(base: float, factor: float, earlier: int, longest: float) -> float:
    """fail2ban's bantime.increment: base x factor^earlier, never above `longest`."""
    try:
        return min(longest, base * factor**earlier)
    except OverflowError:
        return longest


@dataclass(frozen=True)
class BatchBan:
    entry: int  # position in the batch, from 1 across its chunks
    net: Network
    seconds: float | None  # None = permanent
    reason: str


@dataclass
class StagedBatch:
    """A batch whose chunks are arriving: what parsed, and what was refused (and why)."""

    command: str  # "ban.batch" or "unban.batch"
    entries: int = 0
    bans: list[BatchBan] = field(default_factory=list)  # ban.batch
    targets: list[tuple[int, Network]] = field(default_factory=list)  # unban.batch
    refused: list[dict[str, Any]] = field(default_factory=list)

    def refuse(self, entry: int, target: Any, error: str) -> None:
        shown = target[:80] if isinstance(target, str) else None
        self.refused.append({"entry": entry, "target": shown, "error": error})


class StagingBudget:
    """How many entries all connections together may hold staged: a batch is kept in
    memory until its commit, so many connections must not stage many batches."""

    def __init__(self, limit: int = MAX_BATCH) -> None:
        self.limit = limit
        self.used = 0


class BatchSession:
    """What one control connection has staged: at most one batch at a time.

    Closing the connection drops it (drop()), so an abandoned batch changes
    nothing. A chunk that is refused fails its whole batch: the chunks after it,
    up to and including the one with commit, are refused too (a client may send
    them all before it reads a reply), and the batch after that starts afresh.
    Used on the controller's worker thread only.
    """

    def __init__(self, budget: StagingBudget | None = None) -> None:
        self.staged: StagedBatch | None = None
        self.budget = budget or StagingBudget()
        self._held = 0  # entries of the budget this session holds
        self.failed: CommandError | None = None  # why the batch being sent was refused

    def drop(self) -> None:
        """Forget what is staged and give its entries back to the budget."""
        self.budget.used -= self._held
        self._held = 0
        self.staged = None

    def stage(self, command: str, count: int, commit: bool = False) -> StagedBatch:
        """The batch to add `count` entries to; CommandError (and the batch failed)
        when they do not fit, or after an earlier chunk of it failed."""
        if self.failed is not None:
            first = self.failed
            if commit:  # the end of the failed batch: the next one starts afresh
                self.failed = None
            raise CommandError(
                first.kind, f"{first.message} (an earlier chunk of this batch)", first.hint
            )
        try:
            return self._stage(command, count)
        except CommandError as exc:
            if not commit:
                self.failed = exc
            raise

    def _stage(self, command: str, count: int) -> StagedBatch:
        staged = self.staged
        if staged is not None and staged.command != command:
            self.drop()
            raise CommandError(
                BAD_INPUT,
                f"{command} while a {staged.command} is being staged on this connection; "
                "both dropped, nothing was changed",
                "send one batch at a time, its last chunk with commit",
            )
        if staged is None:
            staged = self.staged = StagedBatch(command)
        if staged.entries + count > MAX_BATCH:
            self.drop()
            raise CommandError(
                BAD_INPUT,
                f"{command}: more than {MAX_BATCH} entries in one batch; nothing was changed",
                "split the file and send the parts one after the other",
            )
        if self.budget.used + count > self.budget.limit:
            others = self.budget.used - self._held
            self.drop()
            raise CommandError(
                RUNTIME,
                f"{command}: other connections hold {others} staged entries and at most "
                f"{self.budget.limit} are staged at once; nothing was changed",
                "retry when their batches are done",
            )
        self.budget.used += count
        self._held += count
        return staged


class _AllowIndex:
    """Which allowlist entry or management network covers a target, by key lookups:
    one per distinct prefix length in the allowlist, not one per entry."""

    def __init__(self, entries: Iterable[tuple[Network, str]]) -> None:
        self._tables: dict[tuple[int, int], dict[int, tuple[Network, str]]] = {}
        for net, what in entries:
            shift = net.max_prefixlen - net.prefixlen
            table = self._tables.setdefault((net.version, net.prefixlen), {})
            table.setdefault(int(net.network_address) >> shift, (net, what))
        self._lengths = sorted(self._tables)

    def covering(self, net: Network) -> tuple[Network, str] | None:
        address = int(net.network_address)
        for version, length in self._lengths:
            if version != net.version or length > net.prefixlen:
                continue
            found = self._tables[(version, length)].get(address >> (net.max_prefixlen - length))
            if found is not None:
                return found
        return None


def _reason_filter(text: str | None) -> str | None:
    if text is None:
        return None
    if not text.strip():
        raise CommandError(BAD_INPUT, "the text to match must not be empty")
    _reason(text, "")  # the same limits as a reason: length, no control characters
    return text.casefold()


# A batch repeats a few TTLs and reasons over and over: each is checked once.
def _batch_duration(text: str) -> float:
    if len(text) > 64:  # no TTL needs that much text: never kept in the cache
        return _duration("ttl", text, 0.0)
    return _cached_duration(text)


@functools.lru_cache(maxsize=1024)
def _cached_duration(text: str) -> float:
    return _duration("ttl", text, 0.0)


@functools.lru_cache(maxsize=1024)
def _batch_reason(text: str | None) -> str:
    return _reason(text, "manual ban")


def _batch_target(text: str) -> Network:
    """As _target, without a log line per entry."""
    try:
        return parse_target(text)
    except TargetError as exc:
        raise CommandError(BAD_INPUT, str(exc)) from None


def _active_in(stored: dict[str, float | None], text: str, now: float) -> bool:
    """Whether `stored` (target text -> expiry) holds an active ban on target `text`."""
    if text not in stored:
        return False
    expires = stored[text]
    return expires is None or expires > now


def _entry_target(raw: Any) -> Any:
    return raw.get("target") if isinstance(raw, dict) else None


def _batch_refused(staged: StagedBatch, refused: list[dict[str, Any]], what: str) -> CommandError:
    kinds = {r.get("kind", BAD_INPUT) for r in refused}
    first = refused[0]
    shown = f" ({first['target']})" if first.get("target") else ""
    return CommandError(
        NOT_FOUND if kinds == {NOT_FOUND} else BAD_INPUT,
        f"{len(refused)} of {staged.entries} entries refused, nothing was {what}; "
        f"entry {first['entry']}{shown}: {first['error']}",
        "fix or remove them and send the batch again (-v lists every one)",
        [{k: v for k, v in r.items() if k != "kind"} for r in refused],
    )


class BanService:
    # The broadest prefix a ban or an allow may have without force (xdp.min_prefix_*);
    # rule bans and cluster bans never have force.
    prefix_floor: PrefixFloor = PrefixFloor()

    def __init__(
        self,
        store: BanStore,
        maps: MapBackend,
        clock: Clock,
        management_networks: Iterable[Network] = (),
        history_retention: float = DEFAULT_HISTORY_RETENTION,
    ) -> None:
        self.store = store
        self.maps = maps
        self.clock = clock
        self.management = tuple(management_networks)
        # (action, source) -> count since start, for metrics: bans set, lifted, expired
        self.events: collections.Counter[tuple[str, str]] = collections.Counter()
        self.history_retention = history_retention
        # Called (on the worker thread) after a command changed a ban: cluster mode
        # publishes it. Changes that came from the cluster never call it, so nothing echoes.
        self.on_change: Callable[[BanChange], None] | None = None
        # Store bans that are not in the kernel (their map was full), oldest first,
        # with why; the sweep retries them. Kept up to date by every write here.
        self.unenforced: dict[Network, str] = {}

    def _changed(self, change: BanChange) -> None:
        if self.on_change is not None:
            try:
                self.on_change(change)
            except Exception:  # the ban is in force here whatever the publisher does
                log.exception("cannot hand %s of %s to the cluster", change.action, change.target)

    # -- projection ---------------------------------------------------------
    def _mono_expiry(self, expires: float | None) -> int:
        """Wall-clock expiry -> CLOCK_MONOTONIC ns for the kernel; 0 = never."""
        if expires is None:
            return 0
        left_ns = int((expires - self.clock.wall()) * 1e9)
        return max(1, self.clock.monotonic_ns() + left_ns)

    def _desired_allows(self) -> set[Network]:
        return {a.target for a in self.store.allows()} | set(self.management)

    def plan_bans(self) -> BanPlan:
        """What a reconcile would do to the bans, without doing it."""
        now = self.clock.wall()
        want = {b.target: self._mono_expiry(b.expires) for b in self.store.bans() if b.active(now)}
        have = self.maps.bans()
        mono = self.clock.monotonic_ns()
        active = [net for net, entry in have.items() if kernel_active(entry, mono)]
        lifting = sum(1 for net in active if net not in want)
        return BanPlan(want, have, lifting, len(active))

    def check_removals(self, guard: RemovalGuard) -> BanPlan:
        """The plan, or BanLossRefused when it lifts more than `guard` allows."""
        plan = self.plan_bans()
        if guard.refuses(plan.lifting, plan.in_kernel):
            raise BanLossRefused(plan.lifting, plan.in_kernel, guard)
        return plan

    def reconcile(self, guard: RemovalGuard | None = None) -> ReconcileReport:
        """Make the maps equal the store (allowlist first, so nothing wanted is dropped).

        With a guard, a reconcile that would lift more of the kernel's bans
        than it allows raises BanLossRefused before changing anything. A ban
        that does not fit in its map stays in the store, in `unenforced`.
        """
        plan = self.plan_bans() if guard is None else self.check_removals(guard)
        added = updated = removed = failed = 0
        want_allows = self._desired_allows()
        have_allows = self.maps.allows()
        for net in sorted(want_allows - set(have_allows), key=str):
            try:
                self.maps.put_allow(net)
                added += 1
            except MapFullError as exc:
                failed += 1
                log.error("cannot project allow %s: %s", format_target(net), exc)
        for net in set(have_allows) - want_allows:
            self.maps.delete_allow(net)
            removed += 1

        want_bans, have_bans = plan.want, plan.have
        # Lift first: a smaller map then has room for more of the wanted bans.
        for net in set(have_bans) - set(want_bans):
            self.maps.delete_ban(net)
            removed += 1
        unenforced: dict[Network, str] = {}
        for net, expires_ns in want_bans.items():
            current = have_bans.get(net)
            if current is not None and self._same_expiry(current, expires_ns):
                continue
            try:
                self.maps.put_ban(net, expires_ns)
            except MapFullError as exc:
                failed += 1
                unenforced[net] = str(exc)
                continue
            if current is None:
                added += 1
            else:
                updated += 1
        self.unenforced = unenforced
        self._log_unenforced()
        return ReconcileReport(added, updated, removed, failed)

    def _log_unenforced(self) -> None:
        if not self.unenforced:
            return
        reasons = sorted(set(self.unenforced.values()))
        named = ", ".join(format_target(n) for n in list(self.unenforced)[:UNENFORCED_LOGGED])
        more = len(self.unenforced) - UNENFORCED_LOGGED
        log.error(
            "%d bans are in the store but NOT in the kernel (%s): %s%s; their packets pass. "
            "Raise xdp.max_bans_v4/max_bans_v6/max_prefix_bans (the maps must be recreated), "
            "or lift stale bans; the sweep puts them in as room appears",
            len(self.unenforced),
            "; ".join(reasons),
            named,
            f" and {more} more" if more > 0 else "",
        )

    def retry_unenforced(self) -> list[Network]:
        """Put bans that did not fit into the maps, oldest first; returns those placed.

        A map that is still full is not tried again in the same round, so a
        long queue costs one failed write per map per sweep.
        """
        if not self.unenforced:
            return []
        now = self.clock.wall()
        full: set[tuple[bool, int]] = set()  # (exact, IP version): one map each
        placed = []
        for net in list(self.unenforced):
            group = (is_exact(net), net.version)
            if group in full:
                continue
            ban = self.store.get_ban(net)
            if ban is None or not ban.active(now):
                del self.unenforced[net]
                continue
            try:
                self.maps.put_ban(net, self._mono_expiry(ban.expires))
            except MapFullError as exc:
                full.add(group)
                self.unenforced[net] = str(exc)
                continue
            del self.unenforced[net]
            placed.append(net)
        if placed:
            log.info(
                "%d bans that did not fit are in the kernel now (%s%s); %d still wait",
                len(placed),
                ", ".join(format_target(n) for n in placed[:UNENFORCED_LOGGED]),
                ", ..." if len(placed) > UNENFORCED_LOGGED else "",
                len(self.unenforced),
            )
        return placed

    def rebuild_from_maps(self) -> int:
        """Add every active kernel ban the store lacks to the store; returns how many.

        The maps hold only a target, a monotonic expiry and hit counters: the
        reason is REBUILT_REASON, the source REBUILT_SOURCE, the expiry the
        kernel's converted to wall-clock time, and what the map held is kept
        in the ban's details. One transaction: all of them or none.
        """
        now = self.clock.wall()
        mono = self.clock.monotonic_ns()
        stored = {b.target for b in self.store.bans() if b.active(now)}
        rebuilt = []
        for net, entry in sorted(self.maps.bans().items(), key=lambda item: _sort_key(item[0])):
            if net in stored or not kernel_active(entry, mono):
                continue
            expires = None if entry.expires_ns == 0 else now + (entry.expires_ns - mono) / 1e9
            details = json.dumps(
                {
                    "rebuilt_from_kernel": {
                        "at": now,
                        "expires_ns": entry.expires_ns,
                        "packets": entry.hits.packets,
                        "bytes": entry.hits.bytes,
                    }
                },
                separators=(",", ":"),
                sort_keys=True,
            )
            ban = Ban(net, REBUILT_REASON, REBUILT_SOURCE, now, expires, None, details)
            rebuilt.append(ban)
        with self.store.transaction():
            for ban in rebuilt:
                self.store.put_ban(ban)
                self.store.add_event(BanEvent.of_ban(ban, "ban", now))
        return len(rebuilt)

    @staticmethod
    def _same_expiry(current: MapBan, expires_ns: int) -> bool:
        if (current.expires_ns == 0) != (expires_ns == 0):
            return False
        return abs(current.expires_ns - expires_ns) < EXPIRY_TOLERANCE_NS

    def sweep(self) -> list[Network]:
        """Remove expired bans from the store and the maps (the kernel already ignores them),
        then retry the bans that did not fit in the maps.

        Each removal is recorded as an "expire" event dated at the ban's expiry;
        events older than the history retention are forgotten.
        """
        now = self.clock.wall()
        expired = self.store.expired_bans(now)
        for ban in expired:
            assert ban.expires is not None
            with self.store.transaction():
                self.store.delete_ban(ban.target)
                self.store.add_event(BanEvent.of_ban(ban, "expire", ban.expires))
            self.events[("expire", ban.source)] += 1
            self.maps.delete_ban(ban.target)
            log.info("ban on %s expired", format_target(ban.target))
        pruned = self.store.prune_events(now - self.history_retention)
        if pruned:
            log.debug("forgot %d ban events older than the history retention", pruned)
        self.retry_unenforced()
        return [b.target for b in expired]

    # -- changes from the cluster (never published again) -----------------------
    def check_remote_ban(self, ban: Ban) -> None:
        """A ban another node made, as its setter made it (reason, source, rule and details
        of the origin), passes the checks one made here gets: the prefix floor (never
        forced), the allowlist and management networks, the TTL, the reason, the rule
        name and the details. RemoteBanRefused says which failed. (Cluster mode calls it
        before apply_remote and counts what it refuses.)"""
        net = ban.target
        if self.prefix_floor.too_broad(net):
            raise RemoteBanRefused(self.prefix_floor.refusal(net, "ban"))
        covering = self._allow_covering(net)
        if covering is not None:
            allow, what = covering
            raise RemoteBanRefused(
                f"{format_target(net)} is inside {format_target(allow)}, {what}", allowlisted=True
            )
        if ban.source not in (*SOURCES, REBUILT_SOURCE) or ban.source == "cluster":
            raise RemoteBanRefused(f"unknown ban source {ban.source[:20]!r}")
        now = self.clock.wall()
        if not math.isfinite(ban.created) or ban.created > now + REMOTE_CLOCK_SKEW:
            raise RemoteBanRefused("created in the future (are the nodes' clocks in sync?)")
        if ban.expires is not None and not 0 < ban.expires - ban.created <= MAX_TTL:
            raise RemoteBanRefused(
                f"a TTL of {ban.expires - ban.created:.0f}s is outside (0, {MAX_TTL}s]"
            )
        try:
            if not ban.reason or ban.reason != _reason(ban.reason, ""):
                raise RemoteBanRefused("an empty reason, or one with surrounding whitespace")
            if ban.rule is not None:
                _rule_name(ban.rule)
            _details(None if ban.details is None else json.loads(ban.details))
        except CommandError as exc:
            raise RemoteBanRefused(exc.message) from None
        except ValueError:
            raise RemoteBanRefused("details are not JSON") from None

    def apply_remote(self, ban: Ban) -> bool:
        """Set a ban that another node made; False when this exact ban is in force already,
        or when it is broader than this node's minimum prefix (never forced here)."""
        if self.prefix_floor.too_broad(ban.target):
            log.error(
                "not applying the cluster's ban: %s; lower the minimum on this node if you mean it",
                self.prefix_floor.refusal(ban.target, "ban"),
            )
            return False
        current = self.store.get_ban(ban.target)
        if (
            current is not None
            and current.created == ban.created
            and current.expires == ban.expires
        ):
            return False
        if not ban.active(self.clock.wall()):
            return self.remove_remote(ban.target)
        try:
            with self.store.transaction():
                self.store.put_ban(ban)
                self.store.add_event(BanEvent.of_ban(ban, "ban", ban.created))
                self.maps.put_ban(ban.target, self._mono_expiry(ban.expires))
        except MapFullError as exc:
            log.error("cannot apply the cluster's ban of %s: %s", format_target(ban.target), exc)
            return False
        self.unenforced.pop(ban.target, None)
        self.events[("ban", ban.source)] += 1
        return True

    def remove_remote(self, net: Network) -> bool:
        """Lift a ban that another node lifted; False when it was not banned here."""
        previous, removed = self._remove(net)
        if previous is not None:
            self.events[("unban", previous.source)] += 1
        return removed

    def _remove(self, net: Network) -> tuple[Ban | None, bool]:
        """Delete a ban from the store (with its unban event) and the map, in one
        transaction: the ban as it was, and whether either held it."""
        with self.store.transaction():
            previous = self.store.get_ban(net)
            existed = self.store.delete_ban(net)
            if previous is not None:
                self.store.add_event(BanEvent.of_ban(previous, "unban", self.clock.wall()))
            in_map = self.maps.delete_ban(net)
        self.unenforced.pop(net, None)
        return previous, existed or in_map

    def active_bans(self) -> list[Ban]:
        now = self.clock.wall()
        return [ban for ban in self.store.bans() if ban.active(now)]

    def _check_floor(self, net: Network, what: str, force: bool, forcible: bool = True) -> None:
        """Refuse a prefix broader than the minimum, unless forced (where force exists)."""
        if force or not self.prefix_floor.too_broad(net):
            return
        raise CommandError(
            BAD_INPUT,
            self.prefix_floor.refusal(net, what),
            "add --force if you mean it"
            if forcible
            else "a rule ban is never that broad; check what the proxy sends",
        )

    # -- allowlist checks ---------------------------------------------------
    def _allow_covering(self, net: Network) -> tuple[Network, str] | None:
        for allow in self.management:
            if covers(allow, net):
                return allow, "a management network in the config"
        for entry in self.store.allows():
            if covers(entry.target, net):
                return entry.target, "in the allowlist"
        return None

    # -- commands -----------------------------------------------------------
    def ban(
        self,
        target: str,
        ttl: str | None = None,
        reason: str | None = None,
        source: str | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        net = _target(target)
        self._check_floor(net, "ban", force)
        seconds: float | None = None
        if ttl is not None:
            try:
                seconds = parse_duration(ttl, maximum=MAX_TTL)
            except DurationError as exc:
                raise CommandError(BAD_INPUT, str(exc)) from None
        why = _reason(reason, "manual ban")
        origin = source or "cli"
        if origin not in SOURCES:
            raise CommandError(BAD_INPUT, f"source must be one of {', '.join(SOURCES)}")
        covering = self._allow_covering(net)
        if covering is not None:
            allow, what = covering
            raise CommandError(
                BAD_INPUT,
                f"refusing to ban {format_target(net)}: it is inside {format_target(allow)}, "
                f"{what}, and allowlisted traffic always passes",
                f"remove it with `stockade allow remove {format_target(allow)}` first"
                if what == "in the allowlist"
                else "edit xdp.management_networks in the config",
            )

        now = self.clock.wall()
        ban = Ban(net, why, origin, now, None if seconds is None else now + seconds)
        status = self._write_ban(ban)
        log.info(
            "ban %s %s (%s, %s, ttl %s)",
            status,
            format_target(net),
            why,
            origin,
            "permanent" if seconds is None else format_duration(seconds),
        )
        return {**self._ban_json(ban, None), "status": status}

    def _write_ban(self, ban: Ban) -> str:
        """Store `ban` with its history event, then project it; "added" or "updated"."""
        net = ban.target
        previous = self.store.get_ban(net)
        try:
            with self.store.transaction():
                self.store.put_ban(ban)
                self.store.add_event(BanEvent.of_ban(ban, "ban", ban.created))
                self.maps.put_ban(net, self._mono_expiry(ban.expires))
        except MapFullError as exc:
            raise CommandError(
                RUNTIME,
                f"cannot ban {format_target(net)}: {exc}",
                "raise xdp.max_bans_v4/v6 or max_prefix_bans in the config, or unban stale entries",
            ) from None
        except sqlite3.Error as exc:
            self._restore_map(net, previous)
            raise CommandError(RUNTIME, f"ban store error: {exc}", "check disk space") from None
        self.unenforced.pop(net, None)  # in the map now
        self.events[("ban", ban.source)] += 1
        self._changed(BanChange("ban", net, ban))
        return "updated" if previous is not None and previous.active(ban.created) else "added"

    def rule_ban(
        self,
        target: str,
        ttl: str,
        rule: str,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        factor: float | None = None,
        max_ttl: str | None = None,
        memory: str | None = None,
    ) -> dict[str, Any]:
        """A ban asked for by a proxy rule, longer for each earlier rule ban within `memory`.

        Never bans inside the allowlist (a reply, not an error: the proxy acts
        on it) and never shortens a ban that already covers the target.
        """
        net = _target(target)
        self._check_floor(net, "ban", force=False, forcible=False)
        base = _duration("ttl", ttl, 0.0)
        longest = _duration("max_ttl", max_ttl, DEFAULT_MAX_TTL)
        window = _duration("memory", memory, DEFAULT_MEMORY)
        name = _rule_name(rule)
        why = _reason(reason, f"rule {name}")
        growth = _factor(factor)
        recorded = _details(details)
        if longest < base:
            raise CommandError(
                BAD_INPUT,
                f"max_ttl ({format_duration(longest)}) is shorter than ttl "
                f"({format_duration(base)})",
                "raise max_ttl or lower ttl",
            )
        shown = format_target(net)
        covering = self._allow_covering(net)
        if covering is not None:
            allow, what = covering
            log.warning(
                "rule %s asked to ban %s, which is inside %s, %s: not banned "
                "(allowlisted traffic always passes)",
                name,
                shown,
                format_target(allow),
                what,
            )
            return {
                "status": "allowlisted",
                "target": shown,
                "allowed_by": format_target(allow),
                "rule": name,
            }

        now = self.clock.wall()
        earlier = self.store.count_events(net, "ban", "rule", now - window)
        seconds = escalated_ttl(base, growth, earlier, longest)
        for ban in self.store.covering_bans(net):
            if ban.active(now) and (ban.expires is None or ban.expires >= now + seconds):
                log.info(
                    "rule %s asked to ban %s for %s; %s is already banned longer, kept",
                    name,
                    shown,
                    format_duration(seconds),
                    format_target(ban.target),
                )
                return {
                    "status": "already_banned",
                    "target": shown,
                    "banned_by": format_target(ban.target),
                    "expires": ban.expires,
                    "rule": name,
                }
        ban = Ban(net, why, "rule", now, now + seconds, name, recorded)
        status = self._write_ban(ban)
        log.info(
            "rule %s banned %s for %s (offence %d within %s; %s)",
            name,
            shown,
            format_duration(seconds),
            earlier + 1,
            format_duration(window),
            why,
        )
        return {
            **self._ban_json(ban, None),
            "status": status,
            "ttl": seconds,
            "offence": earlier + 1,
            "rule": name,
            "details": details,
        }

    def _restore_map(self, net: Network, previous: Ban | None) -> None:
        if previous is None or not previous.active(self.clock.wall()):
            self.maps.delete_ban(net)
        else:
            self.maps.put_ban(net, self._mono_expiry(previous.expires))
            self.unenforced.pop(net, None)  # the new ban's entry, now the old one's

    def unban(self, target: str) -> dict[str, Any]:
        net = _target(target)
        previous, removed = self._remove(net)
        if not removed:
            raise CommandError(
                NOT_FOUND, f"{format_target(net)} is not banned", "list bans with `stockade bans`"
            )
        self.events[("unban", previous.source if previous is not None else "cli")] += 1
        self._changed(BanChange("unban", net))
        log.info("unban %s", format_target(net))
        return {"target": format_target(net), "status": "removed"}

    def _ban_json(self, ban: Ban, hits: Hits | None, in_kernel: bool = True) -> dict[str, Any]:
        now = self.clock.wall()
        return {
            "target": format_target(ban.target),
            "kind": _kind(ban.target),
            "family": f"ipv{ban.target.version}",
            "reason": ban.reason,
            "source": ban.source,
            "created": ban.created,
            "expires": ban.expires,
            "ttl_remaining": None if ban.expires is None else max(0.0, ban.expires - now),
            "packets": hits.packets if hits else 0,
            "bytes": hits.bytes if hits else 0,
            "in_kernel": in_kernel,
        }

    def explain(self, target: str) -> dict[str, Any]:
        """Why `target` is or is not dropped, from the store (the truth the maps follow)."""
        net = _target(target)
        now = self.clock.wall()
        bans = [
            {
                "target": format_target(ban.target),
                "match": "exact" if ban.target == net else "prefix",
                "reason": ban.reason,
                "source": ban.source,
                "rule": ban.rule,
                "created": ban.created,
                "expires": ban.expires,
                "ttl_remaining": None if ban.expires is None else max(0.0, ban.expires - now),
                "details": None if ban.details is None else json.loads(ban.details),
                "in_kernel": ban.target not in self.unenforced,
            }
            for ban in self.store.covering_bans(net)
            if ban.active(now)
        ]
        allowed_by = [
            {"target": format_target(m), "source": "config", "reason": "management network"}
            for m in self.management
            if covers(m, net)
        ]
        allowed_by += [
            {"target": format_target(a.target), "source": "cli", "reason": a.reason}
            for a in self.store.allows()
            if covers(a.target, net) and a.target not in self.management
        ]
        history = [
            {
                "at": e.at,
                "action": e.action,
                "source": e.source,
                "reason": e.reason,
                "ttl": e.ttl,
                "rule": e.rule,
                "details": None if e.details is None else json.loads(e.details),
            }
            for e in self.store.events(net, HISTORY_SHOWN)
        ]
        if allowed_by:
            verdict = "allowlisted"
        elif any(b["in_kernel"] for b in bans):
            verdict = "banned"
        else:  # a ban the kernel does not hold drops nothing
            verdict = "not_in_kernel" if bans else "not_banned"
        return {
            "target": format_target(net),
            "kind": _kind(net),
            "family": f"ipv{net.version}",
            "verdict": verdict,
            "bans": bans,
            "allowed_by": allowed_by,
            "history": history,
        }

    def list_bans(self) -> list[dict[str, Any]]:
        now = self.clock.wall()
        in_maps = self.maps.bans()
        return [
            self._ban_json(
                ban,
                in_maps[ban.target].hits if ban.target in in_maps else None,
                in_kernel=ban.target in in_maps,
            )
            for ban in self.store.bans()
            if ban.active(now)
        ]

    def allow_add(
        self, target: str, reason: str | None = None, force: bool = False
    ) -> dict[str, Any]:
        net = _target(target)
        self._check_floor(net, "allow", force)
        why = _reason(reason, "manual allow")
        if net in self.management:
            raise CommandError(
                BAD_INPUT,
                f"{format_target(net)} is already allowed as a management network in the config",
                "nothing to do",
            )
        existed = any(a.target == net for a in self.store.allows())
        allow = Allow(net, why, self.clock.wall())
        try:
            with self.store.transaction():
                self.store.put_allow(allow)
                self.maps.put_allow(net)
        except MapFullError as exc:
            raise CommandError(
                RUNTIME, f"cannot allow {format_target(net)}: {exc}", "raise xdp.max_allow"
            ) from None
        shadowed = [format_target(b.target) for b in self.store.bans() if covers(net, b.target)]
        log.info("allow %s (%s)", format_target(net), why)
        status = "updated" if existed else "added"
        return {"target": format_target(net), "status": status, "shadowed_bans": shadowed}

    def allow_remove(self, target: str) -> dict[str, Any]:
        net = _target(target)
        if net in self.management:
            raise CommandError(
                BAD_INPUT,
                f"{format_target(net)} is a management network from the config and stays allowed",
                "edit xdp.management_networks in the config to change it",
            )
        with self.store.transaction():
            existed = self.store.delete_allow(net)
            if existed:
                self.maps.delete_allow(net)
        if not existed:
            raise CommandError(
                NOT_FOUND,
                f"{format_target(net)} is not in the allowlist",
                "list it with `stockade allow list`",
            )
        log.info("allow removed %s", format_target(net))
        return {"target": format_target(net), "status": "removed"}

    def allow_list(self) -> list[dict[str, Any]]:
        hits = self.maps.allows()
        rows = [
            {
                "target": format_target(net),
                "reason": "management network (config)",
                "source": "config",
                "packets": hits.get(net, Hits()).packets,
                "bytes": hits.get(net, Hits()).bytes,
            }
            for net in self.management
        ]
        rows += [
            {
                "target": format_target(a.target),
                "reason": a.reason,
                "source": "cli",
                "packets": hits.get(a.target, Hits()).packets,
                "bytes": hits.get(a.target, Hits()).bytes,
            }
            for a in self.store.allows()
            if a.target not in self.management
        ]
        return rows

    def stats(self) -> dict[str, Any]:
        counters = self.maps.counters()
        return {
            "reasons": {
                name: {"packets": h.packets, "bytes": h.bytes} for name, h in counters.items()
            },
            "total_packets": sum(h.packets for h in counters.values()),
        }

    # -- many bans at once ------------------------------------------------------
    def list_bans_filtered(
        self, source: str | None = None, text: str | None = None
    ) -> list[dict[str, Any]]:
        """`bans --source S --filter TEXT`: TEXT is matched in the target or reason, any case."""
        wanted = _reason_filter(text)
        if source is not None:
            self._known_source(source)
        rows = self.list_bans()
        return [
            row
            for row in rows
            if (source is None or row["source"] == source)
            and (
                wanted is None
                or wanted in row["target"].casefold()
                or wanted in row["reason"].casefold()
            )
        ]

    def _known_source(self, source: str) -> None:
        if source in SOURCES:
            return
        stored = {origin for _, origin, _ in self.store.ban_sources()}
        if source not in stored:
            raise CommandError(
                BAD_INPUT,
                f"unknown source {source[:40]!r}; the sources are "
                f"{', '.join(sorted(set(SOURCES) | stored))}",
            )

    def ban_batch(
        self,
        session: BatchSession,
        entries: list[Any],
        commit: bool = False,
        force: bool = False,
    ) -> dict[str, Any]:
        """Stage one chunk of a batch of bans; on `commit`, apply the whole batch or nothing."""
        staged = session.stage("ban.batch", len(entries), commit)
        for raw in entries:
            staged.entries += 1
            try:
                staged.bans.append(self._batch_ban(staged.entries, raw))
            except CommandError as exc:
                staged.refuse(staged.entries, _entry_target(raw), exc.message)
        if not commit:
            return {"status": "staged", "staged": staged.entries, "refused": len(staged.refused)}
        session.drop()
        return self._commit_bans(staged, force)

    @staticmethod
    def _batch_ban(entry: int, raw: Any) -> BatchBan:
        if not isinstance(raw, dict):
            raise CommandError(BAD_INPUT, "an entry must be an object {target, ttl, reason}")
        unknown = sorted(set(raw) - {"target", "ttl", "reason"})
        if unknown:
            raise CommandError(BAD_INPUT, f"unknown field {unknown[0][:40]!r}")
        target, ttl, reason = raw.get("target"), raw.get("ttl"), raw.get("reason")
        if not isinstance(target, str):
            raise CommandError(BAD_INPUT, "target must be a string")
        if ttl is not None and not isinstance(ttl, str):
            raise CommandError(BAD_INPUT, "ttl must be a string such as 1h")
        if reason is not None and not isinstance(reason, str):
            raise CommandError(BAD_INPUT, "reason must be a string")
        net = _batch_target(target)
        seconds = None if ttl is None else _batch_duration(ttl)
        return BatchBan(entry, net, seconds, _batch_reason(reason))

    def _commit_bans(self, staged: StagedBatch, force: bool) -> dict[str, Any]:
        latest = {item.net: item for item in staged.bans}  # a later line wins
        refused = list(staged.refused)
        index = _AllowIndex(
            [(m, "a management network in the config") for m in self.management]
            + [(a.target, "in the allowlist") for a in self.store.allows()]
        )
        for net, item in latest.items():
            shown = format_target(net)
            if not force and self.prefix_floor.too_broad(net):
                refused.append(
                    {
                        "entry": item.entry,
                        "target": shown,
                        "error": self.prefix_floor.refusal(net, "ban") + "; add --force",
                    }
                )
                continue
            covering = index.covering(net)
            if covering is not None:
                allow, what = covering
                refused.append(
                    {
                        "entry": item.entry,
                        "target": shown,
                        "error": f"inside {format_target(allow)}, {what}, which always passes",
                    }
                )
        if refused:
            refused.sort(key=lambda r: int(r["entry"]))
            log.warning("batch ban refused: %d of %d entries", len(refused), staged.entries)
            raise _batch_refused(staged, refused, "banned")
        now = self.clock.wall()
        bans = [
            Ban(net, item.reason, "cli", now, None if item.seconds is None else now + item.seconds)
            for net, item in latest.items()
        ]
        texts = [format_target(ban.target) for ban in bans]
        stored = self.store.ban_expiries()
        updated = sum(1 for text in texts if _active_in(stored, text, now))
        undo = None
        try:
            with self.store.transaction():
                self.store.put_bans(bans, texts, now)
                undo = self.maps.put_bans([(b.target, self._mono_expiry(b.expires)) for b in bans])
        except MapFullError as exc:
            raise CommandError(
                RUNTIME,
                f"cannot ban the batch of {len(bans)}: {exc}; nothing was banned",
                "raise xdp.max_bans_v4/v6 or max_prefix_bans in the config, or unban stale entries",
            ) from None
        except sqlite3.Error as exc:
            if undo is not None:
                self.maps.restore_bans(undo)
            raise CommandError(
                RUNTIME, f"ban store error: {exc}; nothing was banned", "check disk space"
            ) from None
        for ban in bans:
            if self.unenforced:  # (a dict lookup hashes the network: not for nothing)
                self.unenforced.pop(ban.target, None)
            if self.on_change is not None:
                self._changed(BanChange("ban", ban.target, ban))
        self.events[("ban", "cli")] += len(bans)
        log.info(
            "batch ban of %d targets: %d added, %d updated (%d entries)",
            len(bans),
            len(bans) - updated,
            updated,
            staged.entries,
        )
        return {
            "status": "banned",
            "entries": staged.entries,
            "targets": len(bans),
            "added": len(bans) - updated,
            "updated": updated,
        }

    def unban_batch(
        self, session: BatchSession, entries: list[Any], commit: bool = False
    ) -> dict[str, Any]:
        """Stage one chunk of targets to unban; on `commit`, lift all of them or none."""
        staged = session.stage("unban.batch", len(entries), commit)
        for raw in entries:
            staged.entries += 1
            target = raw.get("target") if isinstance(raw, dict) else None
            try:
                if not isinstance(raw, dict) or set(raw) != {"target"}:
                    raise CommandError(BAD_INPUT, "an entry must be an object {target}")
                if not isinstance(target, str):
                    raise CommandError(BAD_INPUT, "target must be a string")
                staged.targets.append((staged.entries, _batch_target(target)))
            except CommandError as exc:
                staged.refuse(staged.entries, target, exc.message)
        if not commit:
            return {"status": "staged", "staged": staged.entries, "refused": len(staged.refused)}
        session.drop()
        latest = {net: entry for entry, net in staged.targets}
        refused = list(staged.refused)
        stored = self.store.ban_expiries()
        in_maps: set[Network] | None = None
        for net, entry in latest.items():
            if format_target(net) in stored:
                continue
            if in_maps is None:  # read once, and only when some target is not in the store
                in_maps = set(self.maps.bans())
            if net not in in_maps:
                refused.append(
                    {
                        "entry": entry,
                        "target": format_target(net),
                        "error": "not banned",
                        "kind": NOT_FOUND,
                    }
                )
        if refused:
            refused.sort(key=lambda r: int(r["entry"]))
            raise _batch_refused(staged, refused, "unbanned")
        removed = self._remove_many(list(latest), [format_target(net) for net in latest])
        log.info("batch unban of %d targets (%d entries)", removed, staged.entries)
        return {"status": "removed", "entries": staged.entries, "targets": removed}

    def unban_all(
        self, source: str | None = None, reason_match: str | None = None, force: bool = False
    ) -> dict[str, Any]:
        """Lift every ban that matches the filters; with none, every ban (needs force)."""
        wanted = _reason_filter(reason_match)
        if source is not None:
            self._known_source(source)
        matching = [
            target
            for target, origin, reason in self.store.ban_sources()
            if (source is None or origin == source)
            and (wanted is None or wanted in reason.casefold())
        ]
        if source is None and wanted is None and not force:
            raise CommandError(
                BAD_INPUT,
                f"unban --all without --source or --reason-match lifts every ban "
                f"({len(matching)}); nothing was changed",
                "add --force if you mean it",
            )
        removed = (
            self._remove_many([parse_target(t) for t in matching], matching) if matching else 0
        )
        log.info(
            "unban --all%s%s: %d bans lifted",
            f" --source {source}" if source is not None else "",
            f" --reason-match {reason_match!r}" if reason_match is not None else "",
            removed,
        )
        return {
            "status": "removed",
            "count": removed,
            "source": source,
            "reason_match": reason_match,
        }

    def _remove_many(self, nets: list[Network], texts: list[str]) -> int:
        """Delete bans (`texts`: the canonical text of each of `nets`) from the store, with
        unban events, and the maps, in one transaction; all of them or none. Returns how
        many were removed."""
        undo = None
        try:
            with self.store.transaction():
                lifted = self.store.lift_bans(texts, self.clock.wall())
                undo = self.maps.delete_bans(nets)
        except sqlite3.Error as exc:
            if undo is not None:
                self.maps.restore_bans(undo)
            raise CommandError(
                RUNTIME, f"ban store error: {exc}; nothing was unbanned", "check disk space"
            ) from None
        for net, text in zip(nets, texts, strict=True):
            if self.unenforced:
                self.unenforced.pop(net, None)
            self.events[("unban", lifted.get(text, "cli"))] += 1
            if self.on_change is not None:
                self._changed(BanChange("unban", net))
        return len(nets)
