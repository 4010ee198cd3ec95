"""Fixed-size hash tables in shared memory, exact across the workers of one node.

Why shared memory: a `100/min` limit must hold whichever worker the kernel
hands a client's connections to. The master creates the tables before it
forks, so every worker maps the same pages (MAP_SHARED); a key lives in one
group of GROUP slots, and one lock per group (a POSIX semaphore, well under a
microsecond uncontended) makes each read-modify-write atomic across processes.

Every slot starts with the key's 16-byte digest and the monotonic time (ns)
after which the slot holds nothing live, so any table can reuse stale slots
the same way. Keys are hashed, never stored: a table of client IPs or tokens
holds no readable identifiers.
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
from multiprocessing.synchronize import Lock

GROUP = 8  # slots probed per key
LOCKS = 64  # lock stripes; groups share them round-robin
DIGEST = 16
EMPTY = bytes(DIGEST)


def digest(key: str) -> bytes:
    value = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=DIGEST).digest()
    return value if value != EMPTY else b"\x01" + value[1:]  # all-zero marks an empty slot


class SlotTable:
    """The slot store: find (or claim) the slot of a key under its group's lock.

    Slot layout, in 8-byte words: [0-1] digest, [2] expires_ns (0 = empty),
    then the subclass's fields from word 3 on.
    """

    def __init__(self, capacity: int, slot_words: int, evict_live: bool) -> None:
        if capacity < GROUP:
            raise ValueError(f"capacity must be at least {GROUP}")
        self.groups = capacity // GROUP
        self.capacity = self.groups * GROUP
        self.slot_bytes = slot_words * 8
        self.evict_live = evict_live
        self.memory = mmap.mmap(-1, self.capacity * self.slot_bytes)  # anonymous, MAP_SHARED
        self.quads = memoryview(self.memory).cast("q")
        self.words = memoryview(self.memory).cast("I")  # 32-bit view for counters
        context = multiprocessing.get_context("fork")
        self.locks: list[Lock] = [context.Lock() for _ in range(min(LOCKS, self.groups))]
        self.evictions = 0  # per process: live keys pushed out because a group was full

    def locate(self, key: bytes) -> tuple[int, Lock]:
        group = int.from_bytes(key[:8], "little") % self.groups
        return group, self.locks[group % len(self.locks)]

    def find(self, key: bytes, group: int, now_ns: int, claim: bool) -> tuple[int, bool]:
        """The key's slot offset in bytes and whether it is new (-1 when none).

        Call with the group's lock held. A new slot is the first empty or
        stale one, else (if evict_live) the one closest to expiring; its
        fields are zeroed and the caller fills them.
        """
        mem, quads, size = self.memory, self.quads, self.slot_bytes
        first = group * GROUP * size
        free = -1
        oldest, oldest_expiry = -1, 0
        for offset in range(first, first + GROUP * size, size):
            if mem[offset : offset + DIGEST] == key:
                if quads[offset // 8 + 2] > now_ns:
                    return offset, False
                free = offset  # our own slot, gone stale: reuse it
                break
            expires = quads[offset // 8 + 2]
            if expires <= now_ns:
                if free < 0:
                    free = offset
            elif oldest < 0 or expires < oldest_expiry:
                oldest, oldest_expiry = offset, expires
        if not claim:
            return -1, False
        if free < 0:
            if not self.evict_live:
                return -1, False
            free = oldest
            self.evictions += 1
        mem[free : free + size] = bytes(size)
        mem[free : free + DIGEST] = key
        return free, True


class WindowCounters:
    """Sliding-window counters: how many events per key in the last `window` seconds.

    Each window is cut into BUCKETS sub-windows and a slot keeps BUCKETS + 1
    of them; the total counts every bucket that overlaps the last window, so
    it never under-counts (a limit is never exceeded in any rolling window)
    and over-counts by at most one bucket (1/BUCKETS of a window: a client
    hammering a limit gets between 95% and 100% of it, never more).
    """

    BUCKETS = 20
    RING = BUCKETS + 1
    # words: digest(2) expires(1) last_bucket(1), then RING 32-bit counters
    SLOT_WORDS = 4 + (RING + 1) // 2

    def __init__(self, capacity: int) -> None:
        self.table = SlotTable(capacity, self.SLOT_WORDS, evict_live=True)

    def update(
        self, key: bytes, window: float, now: float, amount: int = 1, limit: int | None = None
    ) -> tuple[bool, int, float]:
        """Add `amount` unless that would take the total over `limit`.

        Returns (added, total in the window afterwards, seconds): when refused,
        the seconds until enough of the window has passed for `amount` to fit
        (Retry-After); when added, the seconds until the oldest counted event
        leaves the window (RateLimit-Reset).
        """
        width = window / self.BUCKETS
        current = int(now / width)
        now_ns = int(now * 1e9)
        table = self.table
        group, lock = table.locate(key)
        with lock:
            offset, new = table.find(key, group, now_ns, claim=amount > 0)
            if offset < 0:
                return True, 0, 0.0
            quads, words = table.quads, table.words
            base_quad = offset // 8
            counters = offset // 4 + 8
            if new:
                last = current
            else:
                last = quads[base_quad + 3] - 1
                if current - last >= self.RING:
                    table.memory[counters * 4 : (counters + self.RING) * 4] = bytes(4 * self.RING)
                elif current > last:
                    for bucket in range(last + 1, current + 1):
                        words[counters + bucket % self.RING] = 0
                else:
                    current = last  # a caller with a slightly older clock reading
            total = sum(words[counters : counters + self.RING])
            if limit is not None and total + amount > limit:
                return (
                    False,
                    total,
                    self._wait(words, counters, current, total + amount - limit, width, now),
                )
            if amount:
                words[counters + current % self.RING] += amount
                total += amount
                quads[base_quad + 3] = current + 1
                quads[base_quad + 2] = int((current + self.RING) * width * 1e9)
            raw = table.memory[counters * 4 : (counters + self.RING) * 4]
        return True, total, self._oldest_leaves(raw, current, width, now)

    def _oldest_leaves(self, raw: bytes, current: int, width: float, now: float) -> float:
        """Seconds until the oldest counted event leaves the window (on every allowed
        request, so found with bytes operations in C rather than a Python loop)."""
        split = 4 * ((current + 1) % self.RING)  # the ring, oldest bucket first
        ordered = raw[split:] + raw[:split]
        zeros = len(ordered) - len(ordered.lstrip(b"\0"))
        oldest = current - self.BUCKETS + zeros // 4
        return max(0.0, (oldest + self.RING) * width - now)

    def _wait(
        self, words: memoryview, counters: int, current: int, need: int, width: float, now: float
    ) -> float:
        """Seconds until `need` counted events have left the window."""
        released = 0
        for bucket in range(current - self.BUCKETS, current + 1):
            released += words[counters + bucket % self.RING]
            if released >= need:
                return max(0.0, (bucket + self.RING) * width - now)
        return width * self.RING

    def total(self, key: bytes, window: float, now: float) -> int:
        return self.update(key, window, now, amount=0)[1]

    def clear(self, key: bytes) -> None:
        """Forget the key's counts (its slot becomes free)."""
        table = self.table
        group, lock = table.locate(key)
        with lock:
            offset, _ = table.find(key, group, 0, claim=False)
            if offset >= 0:
                table.memory[offset : offset + table.slot_bytes] = bytes(table.slot_bytes)


class PenaltyTable:
    """Sources currently denied, tarpitted or banned by a rule, until a deadline."""

    SLOT_WORDS = 4  # digest(2) expires(1) action+rule(1)

    def __init__(self, capacity: int) -> None:
        self.table = SlotTable(capacity, self.SLOT_WORDS, evict_live=True)

    def get(self, key: bytes, now: float) -> tuple[int, int] | None:
        """(action, rule index) of a live penalty, or None."""
        table = self.table
        group, lock = table.locate(key)
        with lock:
            offset, _ = table.find(key, group, int(now * 1e9), claim=False)
            if offset < 0:
                return None
            packed = table.quads[offset // 8 + 3]
        return packed >> 16, packed & 0xFFFF

    def raise_to(self, key: bytes, action: int, rule: int, until: float, now: float) -> bool:
        """Record a penalty unless one as strong is live already; True if this call set it.

        Actions are numbered weakest first. Workers can fire the same rule for
        the same source at once; only the one that sets the penalty acts on it
        (so a ban is pushed once), and a weaker rule never masks a stronger one.
        """
        table = self.table
        group, lock = table.locate(key)
        with lock:
            offset, new = table.find(key, group, int(now * 1e9), claim=True)
            if offset < 0:
                return False
            if not new and table.quads[offset // 8 + 3] >> 16 >= action:
                return False
            table.quads[offset // 8 + 3] = (action << 16) | (rule & 0xFFFF)
            table.quads[offset // 8 + 2] = int(until * 1e9)
            return True

    def replace(self, key: bytes, action: int, rule: int, until: float) -> None:
        """Overwrite whatever penalty the key has."""
        table = self.table
        group, lock = table.locate(key)
        with lock:
            offset, _ = table.find(key, group, 0, claim=True)
            if offset >= 0:
                table.quads[offset // 8 + 3] = (action << 16) | (rule & 0xFFFF)
                table.quads[offset // 8 + 2] = int(until * 1e9)
