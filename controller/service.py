"""What the controller does with bans and the allowlist.

Order of every change: validate, then write the store, then project into
the maps; a failure anywhere leaves both as they were. The store is the
truth: `reconcile` makes the maps match it, and runs at start.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import sqlite3
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from stockade.clock import Clock
from stockade.controller.maps import Hits, MapBackend, MapBan, MapFullError
from stockade.controller.store import SOURCES, Allow, Ban, BanEvent, BanStore
from stockade.durations import DurationError, format_duration, parse_duration
from stockade.protocol import BAD_INPUT, NOT_FOUND, RUNTIME, CommandError
from stockade.targets import (
    Network,
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


def _target(text: str) -> Network:
    try:
        return parse_target(text)
    except TargetError as exc:
        raise CommandError(BAD_INPUT, str(exc)) from None


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


class BanService:
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

    def reconcile(self) -> ReconcileReport:
        """Make the maps equal the store (allowlist first, so nothing wanted is dropped)."""
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

        now = self.clock.wall()
        want_bans = {
            b.target: self._mono_expiry(b.expires) for b in self.store.bans() if b.active(now)
        }
        have_bans = self.maps.bans()
        for net, expires_ns in want_bans.items():
            current = have_bans.get(net)
            if current is not None and self._same_expiry(current, expires_ns):
                continue
            try:
                self.maps.put_ban(net, expires_ns)
            except MapFullError as exc:
                failed += 1
                log.error("cannot project ban %s: %s", format_target(net), exc)
                continue
            if current is None:
                added += 1
            else:
                updated += 1
        for net in set(have_bans) - set(want_bans):
            self.maps.delete_ban(net)
            removed += 1
        return ReconcileReport(added, updated, removed, failed)

    @staticmethod
    def _same_expiry(current: MapBan, expires_ns: int) -> bool:
        if (current.expires_ns == 0) != (expires_ns == 0):
            return False
        return abs(current.expires_ns - expires_ns) < EXPIRY_TOLERANCE_NS

    def sweep(self) -> list[Network]:
        """Remove expired bans from the store and the maps (the kernel already ignores them).

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
        return [b.target for b in expired]

    # -- changes from the cluster (never published again) -----------------------
    def apply_remote(self, ban: Ban) -> bool:
        """Set a ban that another node made; False when this exact ban is in force already."""
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
        return previous, existed or in_map

    def active_bans(self) -> list[Ban]:
        now = self.clock.wall()
        return [ban for ban in self.store.bans() if ban.active(now)]

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
    ) -> dict[str, Any]:
        net = _target(target)
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

    def _ban_json(self, ban: Ban, hits: Hits | None) -> dict[str, Any]:
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
        verdict = "allowlisted" if allowed_by else "banned" if bans else "not_banned"
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
            self._ban_json(ban, in_maps[ban.target].hits if ban.target in in_maps else None)
            for ban in self.store.bans()
            if ban.active(now)
        ]

    def allow_add(self, target: str, reason: str | None = None) -> dict[str, Any]:
        net = _target(target)
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
