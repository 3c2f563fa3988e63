"""The in-memory store of one node: entries, TTL, versions and counters.

Sans-IO: time comes from the injected ``clock`` (seconds, monotonic), so the
node passes ``trio.current_time`` and tests pass a mock clock.

Expiry works two ways, as in Redis: lazily (an expired entry is dropped when
it is touched) and actively (:meth:`Store.sweep` drops a bounded number of
expired entries per call, so keys nobody reads again do not hold memory).

An entry is not an object: each namespace of each shard keeps its values,
versions and deadlines in three dicts keyed by key (deadlines only for
entries with a TTL). A dict holding only bytes, ints and floats is left
alone by Python's cyclic garbage collector, however large, so a full
collection costs the same at a million entries as at none; with an object
per entry it walked every one (about 330 ms at a million, a stall for
every client).

With a memory limit (``max_bytes``), a write that would take the store past
it first evicts entries chosen by sampling, as Redis does: candidates from
a few random shards, of which the least recently (``lru``) or least
frequently (``lfu``) used goes; with ``noeviction`` the write is refused
(:class:`OutOfMemory`) and nothing changes. Values of ``compress_min`` bytes
or more are kept compressed with zstd when that saves space.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from zlib import crc32

from .shard import NUM_SHARDS, shard_of

# Compact the expiry heap when stale items outnumber live TTL entries by this
# factor (an entry whose TTL changed, or that went, leaves its item behind).
# Compaction is spread out: the heap is set aside and its items moved to a
# new one a batch per sweep, so it never stalls a request (at a million
# entries, compacting at once took half a second); writes pay nothing for it.
_HEAP_SLACK = 2
_HEAP_MIN_REBUILD = 1024
# What an entry costs besides its key's and value's bytes, measured with
# tracemalloc on CPython 3.11 (tests/test_store.py checks the estimate stays
# within 15 %): the two bytes objects' headers, the slots of the value and
# version dicts, the version's int; a TTL adds its deadline (a float and a
# slot) and an item of the expiry heap; a memory limit adds the key's use
# (a slot, and for lru an int); a compressed value, its original size. Each
# namespace in each shard costs a few small dicts as well.
ENTRY_OVERHEAD_BYTES = 175
TTL_OVERHEAD_BYTES = 60
HEAP_ITEM_BYTES = 72
USE_OVERHEAD_BYTES = {"lru": 70, "lfu": 40, "noeviction": 0}
# A store that evicts keeps losing a key and gaining one in each shard's
# dicts, and each time one grows Python sizes it for three times its keys:
# they settle at about twice the room of dicts filled once (measured: 170-180
# bytes an entry more, at 100-byte and 1 KiB values alike).
EVICTING_SLACK_BYTES = 175
PACKED_OVERHEAD_BYTES = 60
SPACE_OVERHEAD_BYTES = 750  # a namespace's dicts in one shard

EVICTION_POLICIES = ("lru", "lfu", "noeviction")
# Candidates looked at to choose an entry to evict, each from a random shard:
# with lru its least recently used entry (each namespace of a shard keeps its
# entries' uses in the order of last use), with lfu the least used of
# SAMPLE_SPAN entries from a random place in it. Redis looks at 5
# random keys, as many as we look at shards (a shard's least used is a better
# candidate than a random key, and no worse when shards hold one key each).
EVICTION_SAMPLES = 5
SAMPLE_SPAN = 8
EVICTION_POOL = 16  # the best candidates kept from one eviction's samples for the next
SAMPLE_MISSES = 64  # samples of a shard emptied since the list of shards was made, before it is made again
SAMPLE_REFRESH = 4096  # samples before the list of shards is made again anyway
EVICT_BATCH = 256  # evictions one write may make; the sweep makes the rest
# LFU as in Redis: an 8-bit counter, incremented with probability 1 / ((c -
# LFU_INIT) * LFU_LOG_FACTOR + 1), decremented once per LFU_DECAY_S unused;
# a new key starts at LFU_INIT so that it is not the first to go.
LFU_INIT = 5
LFU_LOG_FACTOR = 10
LFU_DECAY_S = 60.0
# A value is kept compressed only if that saves at least 1/COMPRESS_GAIN of it.
COMPRESS_GAIN = 16
DEFAULT_COMPRESS_MIN = 1024

MAX_INCR = 2**63 - 1  # counters are signed 64-bit, as in Redis
MIN_INCR = -(2**63)


class StoreError(Exception):
    """A write the store refuses; nothing changed. ``code`` is the wire error code."""

    code = ""


class OutOfMemory(StoreError):
    code = "out_of_memory"


class NotAnInteger(StoreError):
    code = "not_integer"


@dataclass(slots=True)
class Counters:
    hits: int = 0
    misses: int = 0
    sets: int = 0
    deletes: int = 0
    expired: int = 0
    evicted: int = 0


class _Space:
    """One namespace's entries in one shard."""

    __slots__ = ("values", "versions", "expires", "used", "packed")

    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.versions: dict[bytes, int] = {}
        self.expires: dict[bytes, float] = {}  # only entries with a TTL
        self.used: dict[bytes, int] = {}  # with a memory limit: last use (lru) or use counter (lfu)
        self.packed: dict[bytes, int] = {}  # compressed values: their size before


class Store:
    """Namespaced key → value map with TTL, per-entry versions and stats.

    Entries are kept by shard (then namespace), so one shard's entries can
    be listed or dropped (to hand them to another node) without walking
    the others, and no dict grows past a shard's share: when a dict runs
    out of room Python rebuilds it whole, which for one dict of a million
    entries took 150-650 ms; a shard's holds about 1/8192 of them.

    Every write that changes an entry gives it a new version, above every
    version this store has given or taken.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        max_bytes: int = 0,
        eviction: str = "lru",
        compress_min: int = 0,
    ) -> None:
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {', '.join(EVICTION_POLICIES)}, not {eviction!r}")
        self._clock = clock
        self._shards: dict[int, dict[str, _Space]] = {}  # shard → ns → entries
        self._namespaces: dict[str, int] = {}  # ns → how many keys
        self._ns_bytes: dict[str, int] = {}  # ns → bytes of its keys and values
        self._expiry_heap: list[tuple[float, str, bytes]] = []
        self._compacting: list[tuple[float, str, bytes]] = []  # an older heap, its live items moving over
        self._ttl_entries = 0
        self._version = 0
        self._bytes = 0
        self._keys = 0
        self.counters = Counters()
        self.max_bytes = max_bytes
        self.eviction = eviction
        # Uses are tracked only where they choose what to evict.
        self._tracking = bool(max_bytes) and eviction != "noeviction"
        self._entry_bytes = ENTRY_OVERHEAD_BYTES + (USE_OVERHEAD_BYTES[eviction] + EVICTING_SLACK_BYTES if self._tracking else 0)
        self._spaces = 0  # (namespace, shard) pairs holding entries
        self._lfu = eviction == "lfu"
        self._tick = 0  # lru: uses so far
        self._period = 0  # lfu: decay periods so far (kept by sweep)
        self._sample_shards: list[int] = []  # shards with entries, to sample (rebuilt now and then)
        self._sample_misses = 0
        self._sampled = 0  # samples taken since the list of shards was made
        self._pool: list[tuple[int, str, bytes]] = []  # eviction candidates, least used first
        self._rng = random.Random()
        # Called with ("set" | "delete" | "expire" | "evict", ns, key) for each
        # such change a client's request or time makes (not for entries moved
        # between nodes), while a node has watchers.
        self.on_change: Callable[[str, str, bytes], None] | None = None
        self.compress_min = compress_min
        self._packed = 0  # values kept compressed
        self._saved = 0  # bytes their compression saves
        self._compress: Callable[[bytes], bytes] | None = None
        self._decompress: Callable[[bytes], bytes] = _no_codec
        if compress_min:
            import zstandard  # (loaded only by a node that compresses)

            self._compress = zstandard.ZstdCompressor(level=1).compress
            self._decompress = zstandard.ZstdDecompressor().decompress

    # -- reads -----------------------------------------------------------------

    def get(self, ns: str, key: bytes) -> bytes | None:
        spaces = self._shards.get(crc32(ns.encode() + b"\0" + key if ns else key) % NUM_SHARDS)  # (shard_of, inlined)
        space = None if spaces is None else spaces.get(ns)
        if space is not None:
            value = space.values.get(key)
            if value is not None:
                expires = space.expires
                if not expires or (expires_at := expires.get(key)) is None or expires_at > self._clock():
                    self.counters.hits += 1
                    if self._tracking:
                        self._use(space.used, key)
                    if space.packed and key in space.packed:
                        return self._decompress(value)
                    return value
                self._remove(ns, space, key)
                self.counters.expired += 1
                if self.on_change is not None:
                    self.on_change("expire", ns, key)
        self.counters.misses += 1
        return None

    def ttl_ms(self, ns: str, key: bytes) -> int | None:
        """Remaining TTL in ms, -1 for an entry without TTL, None if missing."""
        space = self._live(ns, key)
        if space is None:
            return None
        expires_at = space.expires.get(key)
        if expires_at is None:
            return -1
        return max(0, round((expires_at - self._clock()) * 1000))

    def entry(self, ns: str, key: bytes) -> tuple[bytes, int, int] | None:
        """``key``'s value, remaining TTL in ms (0 for none) and version, as
        :meth:`shard_entries` gives them; None if missing. Counts no hit."""
        space = self._live(ns, key)
        if space is None:
            return None
        expires_at = space.expires.get(key)
        ttl_ms = 0 if expires_at is None else max(1, math.ceil((expires_at - self._clock()) * 1000))
        return self._value_of(space, key), ttl_ms, space.versions[key]

    def meta(self, ns: str, key: bytes) -> tuple[bytes, int, int] | None:
        """``key``'s value, version and remaining TTL in ms (-1 for none), as
        a read (a hit or a miss); None if missing."""
        space = self._live(ns, key)
        if space is None:
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        if self._tracking:
            self._use(space.used, key)
        expires_at = space.expires.get(key)
        ttl_ms = -1 if expires_at is None else max(0, round((expires_at - self._clock()) * 1000))
        return self._value_of(space, key), space.versions[key], ttl_ms

    def version(self, ns: str, key: bytes) -> int | None:
        space = self._live(ns, key)
        return None if space is None else space.versions[key]

    def __len__(self) -> int:
        return self._keys

    # -- writes ----------------------------------------------------------------

    def set(self, ns: str, key: bytes, value: bytes, ttl_ms: int = 0) -> int:
        """Store ``value``; ``ttl_ms`` 0 means no expiry. Returns the new version.
        Raises :class:`OutOfMemory` (changing nothing) if it does not fit."""
        return self._put(ns, key, value, ttl_ms, room=True)

    def add(self, ns: str, key: bytes, value: bytes, ttl_ms: int = 0) -> int | None:
        """:meth:`set` if ``key`` is missing; None (and nothing done) if it is there."""
        if self._live(ns, key) is not None:
            return None
        return self._put(ns, key, value, ttl_ms, room=True)

    def replace(self, ns: str, key: bytes, value: bytes, ttl_ms: int = 0) -> int | None:
        """:meth:`set` if ``key`` is there; None (and nothing done) if it is missing."""
        if self._live(ns, key) is None:
            return None
        return self._put(ns, key, value, ttl_ms, room=True)

    def cas(self, ns: str, key: bytes, value: bytes, version: int, ttl_ms: int = 0) -> tuple[bool, int | None]:
        """:meth:`set` if ``key``'s version is still ``version``: (True, the new
        version); else (False, its version now, None if it is missing)."""
        current = self.version(ns, key)
        if current != version:
            return False, current
        return True, self._put(ns, key, value, ttl_ms, room=True)

    def incr(self, ns: str, key: bytes, by: int) -> int:
        """Add ``by`` to the integer stored at ``key`` (decimal text; a missing
        key counts as 0) and return the sum; the entry keeps its TTL. Raises
        :class:`NotAnInteger` for any other value, or a sum outside 64 bits."""
        space = self._live(ns, key)
        number = 0
        keep_ms = 0
        if space is not None:
            number = _integer(self._value_of(space, key))
            expires_at = space.expires.get(key)
            if expires_at is not None:
                keep_ms = max(1, math.ceil((expires_at - self._clock()) * 1000))
        number += by
        if not MIN_INCR <= number <= MAX_INCR:
            raise NotAnInteger("the result would not fit in a signed 64-bit integer")
        self._put(ns, key, b"%d" % number, keep_ms, room=True, deadline=True)
        return number

    def getdel(self, ns: str, key: bytes) -> bytes | None:
        """Remove ``key`` and return the value it had; None if it was missing."""
        space = self._live(ns, key)
        if space is None:
            self.counters.misses += 1
            return None
        value = self._value_of(space, key)
        self._remove(ns, space, key)
        self.counters.hits += 1
        self.counters.deletes += 1
        if self.on_change is not None:
            self.on_change("delete", ns, key)
        return value

    def expire(self, ns: str, key: bytes, ttl_ms: int) -> bool:
        """Give ``key`` ``ttl_ms`` more to live (0: no expiry) and a new
        version; False if it is missing."""
        space = self._live(ns, key)
        if space is None:
            return False
        self._put(ns, key, space.values[key], ttl_ms, room=False, event=None, packed=space.packed.get(key, 0))
        self.counters.sets -= 1  # (not a value written)
        return True

    def delete(self, ns: str, key: bytes) -> bool:
        space = self._live(ns, key)
        if space is None:
            return False
        self._remove(ns, space, key)
        self.counters.deletes += 1
        if self.on_change is not None:
            self.on_change("delete", ns, key)
        return True

    def set_many(self, ns: str, items: Iterable[tuple[bytes, bytes]], ttl_ms: int = 0) -> list[int]:
        """:meth:`set` for each (key, value), taken whole or not at all: it
        raises :class:`OutOfMemory` before the first write if they cannot
        all be taken. Returns their versions."""
        prepared = [(key, *self._packing(value)) for key, value in items]
        if self.max_bytes and prepared:
            sizes = [len(key) + len(value) for key, value, _ in prepared]
            if self._tracking:  # (each write evicts as it needs: only one that could never fit is refused)
                self._make_room(max(sizes), evict=False)
            else:
                self._make_room(sum(sizes) + (len(sizes) - 1) * self._room_per_entry, what="these writes")
        # (checked: the writes themselves may not refuse, or the batch would be taken in part)
        return [self._put(ns, key, value, ttl_ms, room=False, packed=packed) for key, value, packed in prepared]

    def sweep(self, limit: int = 1000) -> int:
        """Drop up to ``limit`` expired entries; return how many were dropped.

        Returns ``limit`` when there may be more to do right away (dropping,
        compacting the expiry heap: up to ``limit`` items moved per call, or
        evicting what a large write left over the memory limit).
        """
        if self._compacting and self._compact(limit) == limit:
            return limit
        if self._tracking and self.memory() > self.max_bytes and self._evict_over(0) == EVICT_BATCH:
            return limit  # (a large write went over the limit: evicting the rest, a batch per call)
        now = self._clock()
        if self._lfu:
            self._period = int(now // LFU_DECAY_S)
        heap = self._expiry_heap
        dropped = 0
        examined = 0
        while heap and heap[0][0] <= now and examined < limit:
            expires_at, ns, key = heapq.heappop(heap)
            examined += 1
            space = self._space(ns, key)
            # A stale item: the key was deleted, or set again with another TTL.
            if space is not None and space.expires.get(key) == expires_at:
                self._remove(ns, space, key)
                self.counters.expired += 1
                dropped += 1
                if self.on_change is not None:
                    self.on_change("expire", ns, key)
        return limit if examined == limit else dropped

    def next_expiry(self) -> float | None:
        """When the earliest TTL runs out (clock time), or None if nothing expires."""
        tops = [heap[0][0] for heap in (self._expiry_heap, self._compacting) if heap]
        return min(tops) if tops else None

    # -- stats -----------------------------------------------------------------

    def memory(self) -> int:
        """The estimated bytes the entries take (see :data:`ENTRY_OVERHEAD_BYTES`)."""
        return (
            self._bytes
            + self._keys * self._entry_bytes
            + self._spaces * SPACE_OVERHEAD_BYTES
            + self._ttl_entries * TTL_OVERHEAD_BYTES
            + (len(self._expiry_heap) + len(self._compacting)) * HEAP_ITEM_BYTES
            + self._packed * PACKED_OVERHEAD_BYTES
        )

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "hits": c.hits,
            "misses": c.misses,
            "sets": c.sets,
            "deletes": c.deletes,
            "expired": c.expired,
            "evicted": c.evicted,
            "keys": self._keys,
            "namespaces": len(self._namespaces),
            "data_bytes": self._bytes,
            "memory_bytes": self.memory(),
            "max_memory_bytes": self.max_bytes,
            "eviction": self.eviction,
            "compressed_values": self._packed,
            "compression_saved_bytes": self._saved,
        }

    # -- internals -------------------------------------------------------------

    def _packing(self, value: bytes) -> tuple[bytes, int]:
        """``value`` as it is to be stored, and the size it was if that is compressed (else 0)."""
        if self._compress is not None and len(value) >= self.compress_min:
            squeezed = self._compress(value)
            if len(squeezed) <= len(value) - len(value) // COMPRESS_GAIN:
                # A copy: zstandard's result keeps the allocation of the worst case (the size of the input).
                return bytes(memoryview(squeezed)), len(value)
        return value, 0

    def _put(
        self,
        ns: str,
        key: bytes,
        value: bytes,
        ttl_ms: int,
        *,
        room: bool,
        event: str | None = "set",
        deadline: bool = False,
        packed: int | None = None,
    ) -> int:
        """Store an entry. ``room``: a client's write, refused if it does not
        fit and the policy does not evict; else it is taken, evicting others
        if the policy allows. ``event``: what watchers are told (None:
        nothing, for entries moved between nodes). ``packed``: None to
        compress ``value`` if that pays, else the size it was compressed
        from (0: it is not)."""
        if packed is None:
            value, packed = self._packing(value)
        if self.max_bytes:
            if room:
                self._make_room(len(key) + len(value))
        shard = crc32(ns.encode() + b"\0" + key if ns else key) % NUM_SHARDS
        spaces = self._shards.get(shard)
        if spaces is None:
            spaces = self._shards[shard] = {}
        space = spaces.get(ns)
        if space is None:
            space = spaces[ns] = _Space()
            self._spaces += 1
        self._version += 1
        values = space.values
        old = values.get(key)
        values[key] = value
        space.versions[key] = self._version
        if old is None:
            self._keys += 1
            self._bytes += len(key) + len(value)
            self._namespaces[ns] = self._namespaces.get(ns, 0) + 1
            self._ns_bytes[ns] = self._ns_bytes.get(ns, 0) + len(key) + len(value)
        else:
            self._bytes += len(value) - len(old)
            self._ns_bytes[ns] += len(value) - len(old)
            if space.packed:
                was = space.packed.pop(key, 0)
                if was:
                    self._packed -= 1
                    self._saved -= was - len(old)
        if packed:
            space.packed[key] = packed
            self._packed += 1
            self._saved += packed - len(value)
        if self._tracking:
            if old is not None:
                self._use(space.used, key)
            elif self._lfu:
                space.used[key] = self._period << 8 | LFU_INIT
            else:
                self._tick += 1
                space.used[key] = self._tick
        expires = space.expires
        previous = expires.pop(key, 0.0) if expires else 0.0
        if previous:
            self._ttl_entries -= 1
        if ttl_ms:
            self._ttl_entries += 1
            expires_at = self._clock() + ttl_ms / 1000
            if deadline and previous and expires_at > previous:
                expires_at = previous  # (keeping a TTL: not one ms later for the rounding)
            expires[key] = expires_at
            if expires_at != previous:  # else the heap already has this item
                heap = self._expiry_heap
                heapq.heappush(heap, (expires_at, ns, key))
                if not self._compacting and len(heap) >= _HEAP_MIN_REBUILD and len(heap) > _HEAP_SLACK * self._ttl_entries:
                    self._compacting, self._expiry_heap = heap, []
        self.counters.sets += 1
        if event is not None and self.on_change is not None:
            self.on_change(event, ns, key)
        if self.max_bytes and not room and self._tracking:
            self._evict_over(0)
        return self._version

    @property
    def _room_per_entry(self) -> int:
        """At most what a new entry costs besides its key and value."""
        packed = PACKED_OVERHEAD_BYTES if self._compress is not None else 0
        return self._entry_bytes + TTL_OVERHEAD_BYTES + HEAP_ITEM_BYTES + SPACE_OVERHEAD_BYTES + packed

    def _make_room(self, size: int, *, evict: bool = True, what: str = "") -> None:
        """Evict until ``size`` more bytes (plus an entry's overhead) fit, or
        raise OutOfMemory if they cannot: the policy keeps everything, or
        ``size`` alone is more than the limit. ``evict``: False to check only
        that they could be made to fit."""
        needed = size + self._room_per_entry
        if self._tracking and needed > self.max_bytes:
            raise OutOfMemory(f"an entry of {size:,} bytes cannot fit in the node's memory limit ({self.max_bytes:,} bytes)")
        if self.memory() + needed <= self.max_bytes:
            return
        if not self._tracking:
            writes = f"; {what} take {size:,} bytes" if what else ""
            raise OutOfMemory(
                f"the node is at its memory limit ({self.max_bytes:,} bytes) and evicts nothing (--eviction noeviction){writes}"
            )
        if evict:
            self._evict_over(needed)

    def _evict_over(self, needed: int, budget: int = EVICT_BATCH) -> int:
        """Evict entries until ``needed`` more bytes fit within the limit, at
        most ``budget`` of them (a write of a large value among small ones
        would otherwise evict for seconds: :meth:`sweep` goes on with the
        rest); how many were evicted."""
        evicted = 0
        while evicted < budget and self._keys and self.memory() + needed > self.max_bytes:
            self._evict_one()
            evicted += 1
        return evicted

    def _evict_one(self) -> None:
        """Evict the least used of the entries sampled now and the best
        candidates kept from earlier samples (Redis's eviction pool: with it,
        five samples per eviction come close to exact LRU)."""
        shards, random, pool, lfu = self._shards, self._rng.random, self._pool, self._lfu
        for _ in range(EVICTION_SAMPLES):
            choices = self._sample_shards
            if not choices or self._sampled > SAMPLE_REFRESH:  # (shards filled since it was made are in it again)
                choices = self._sample_shards = list(shards)
                self._sampled = 0
            self._sampled += 1
            spaces = shards.get(choices[int(random() * len(choices))])
            if spaces is None:  # (it went since the list was made, which is rebuilt after a few such)
                self._sample_misses += 1
                if self._sample_misses > SAMPLE_MISSES:
                    self._sample_shards, self._sample_misses = [], 0
                continue
            ns, space = next(iter(spaces.items())) if len(spaces) == 1 else list(spaces.items())[int(random() * len(spaces))]
            used = space.used
            if not lfu:  # (a space's uses are in the order of last use: its first is its least recently used)
                key = next(iter(used))
                pool.append((used[key], ns, key))
            else:
                start = int(random() * max(0, len(used) - SAMPLE_SPAN))  # (not always the first: those may all be hot)
                window = itertools.islice(used.items(), start, start + SAMPLE_SPAN)
                key, mark = min(window, key=lambda item: self._decayed(item[1]))
                pool.append((self._decayed(mark), ns, key))
        pool.sort()
        del pool[EVICTION_POOL:]
        victim = None
        while pool and victim is None:
            score, ns, key = pool.pop(0)
            victim = self._space(ns, key)
            if victim is not None and not (key in victim.values and self._score(victim.used.get(key, 0)) == score):
                victim = None  # (it went, or was used since it was sampled)
        if victim is None:  # (every sample missed: take any entry)
            ns, victim = next(iter(next(iter(shards.values())).items()))
            key = next(iter(victim.values))
        self._remove(ns, victim, key)
        self.counters.evicted += 1
        if self.on_change is not None:
            self.on_change("evict", ns, key)

    def _use(self, used: dict[bytes, int], key: bytes) -> None:
        """Note a use of ``key`` for eviction's choice."""
        if not self._lfu:
            self._tick += 1
            del used[key]  # (to the end: a space's uses stay in the order of last use)
            used[key] = self._tick
            return
        mark = used.get(key, LFU_INIT)
        counter = self._decayed(mark)
        if counter < 255:
            base = counter - LFU_INIT
            if base <= 0 or self._rng.random() * (base * LFU_LOG_FACTOR + 1) < 1:
                counter += 1
        used[key] = self._period << 8 | counter

    def _decayed(self, mark: int) -> int:
        """An LFU mark's counter after the decay since it was made."""
        return max(0, (mark & 255) - (self._period - (mark >> 8)))

    def _score(self, mark: int) -> int:
        """How much an entry was used: the lower, the sooner it is evicted."""
        return self._decayed(mark) if self._lfu else mark

    def _value_of(self, space: _Space, key: bytes) -> bytes:
        value = space.values[key]
        return self._decompress(value) if space.packed and key in space.packed else value

    def _space(self, ns: str, key: bytes) -> _Space | None:
        """The entries of ``key``'s shard and namespace, if any."""
        spaces = self._shards.get(shard_of(ns, key))
        return None if spaces is None else spaces.get(ns)

    def _live(self, ns: str, key: bytes) -> _Space | None:
        """The entries holding ``key``, if they hold it and it has not expired."""
        space = self._space(ns, key)
        if space is None or key not in space.values:
            return None
        if space.expires and self._expired(ns, space, key):
            return None
        return space

    def _expired(self, ns: str, space: _Space, key: bytes) -> bool:
        """Whether ``key`` (held) is past its deadline; if so it is dropped."""
        expires_at = space.expires.get(key)
        if expires_at is None or expires_at > self._clock():
            return False
        self._remove(ns, space, key)
        self.counters.expired += 1
        if self.on_change is not None:
            self.on_change("expire", ns, key)
        return True

    def _remove(self, ns: str, space: _Space, key: bytes) -> None:
        value = space.values.pop(key)
        del space.versions[key]
        if space.expires and space.expires.pop(key, None) is not None:
            self._ttl_entries -= 1
        if space.used:
            space.used.pop(key, None)
        if space.packed:
            was = space.packed.pop(key, 0)
            if was:
                self._packed -= 1
                self._saved -= was - len(value)
        if not space.values:
            shard = shard_of(ns, key)
            spaces = self._shards[shard]
            del spaces[ns]
            self._spaces -= 1
            if not spaces:
                del self._shards[shard]
        self._keys -= 1
        self._bytes -= len(key) + len(value)
        self._ns_left(ns, 1, len(key) + len(value))

    def _ns_left(self, ns: str, count: int, size: int) -> None:
        """``count`` entries of ``size`` bytes of ``ns`` went."""
        left = self._namespaces[ns] - count
        if left:
            self._namespaces[ns] = left
            self._ns_bytes[ns] -= size
        else:
            del self._namespaces[ns]
            del self._ns_bytes[ns]

    def _compact(self, count: int) -> int:
        """Move up to ``count`` items of the heap set aside to the heap in use,
        soonest first, dropping the stale ones; how many were taken."""
        old, heap = self._compacting, self._expiry_heap
        taken = min(count, len(old))
        for _ in range(taken):
            item = heapq.heappop(old)
            space = self._space(item[1], item[2])
            if space is not None and space.expires.get(item[2]) == item[0]:
                heapq.heappush(heap, item)
        return taken

    # -- bulk access for the node's upkeep ----------------------------------------

    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def namespace_stats(self, ns: str) -> dict[str, int]:
        """How many keys ``ns`` has here and the bytes of their keys and values (expired ones included)."""
        return {"keys": self._namespaces.get(ns, 0), "data_bytes": self._ns_bytes.get(ns, 0)}

    def keys(self, ns: str) -> list[bytes]:
        """A snapshot of the keys in ``ns`` (expired ones included)."""
        return [key for spaces in self._shards.values() if ns in spaces for key in spaces[ns].values]

    def clear(self) -> int:
        """Drop every entry without counting deletes (they may be stale); how many there were.
        Versions keep counting up."""
        dropped = self._keys
        self._shards = {}
        self._namespaces = {}
        self._ns_bytes = {}
        self._expiry_heap = []
        self._compacting = []
        self._sample_shards = []
        self._pool = []
        self._ttl_entries = self._bytes = self._keys = self._packed = self._saved = self._spaces = 0
        return dropped

    def discard(self, ns: str, key: bytes) -> bool:
        """Drop an entry without counting a delete (it moved to another node)."""
        space = self._space(ns, key)
        if space is None or key not in space.values:
            return False
        self._remove(ns, space, key)
        return True

    def scan(
        self, shards: Iterable[int], ns: str, prefix: bytes, after: bytes | None, limit: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Live keys of ``ns`` that start with ``prefix`` in ``shards``, in
        the order of the shards given and by key within a shard, as (shard,
        key): in the first shard only keys after ``after`` (None: all); at
        most ``limit`` keys and, past ``max_bytes`` of keys, no more."""
        found: list[tuple[int, bytes]] = []
        size = 0
        now = self._clock()
        for i, shard in enumerate(shards):
            space = self._shards.get(shard, {}).get(ns)
            if space is None:
                continue
            expires = space.expires
            keys = sorted(
                key for key in space.values if key.startswith(prefix) and (not expires or expires.get(key, math.inf) > now)
            )
            if i == 0 and after is not None:
                keys = keys[bisect.bisect_right(keys, after) :]
            for key in keys:
                found.append((shard, key))
                size += len(key)
                if len(found) >= limit or size >= max_bytes:
                    return found
        return found

    # -- by shard, to hand entries to another node ---------------------------------

    def shards(self) -> list[int]:
        """The shards holding at least one entry (expired ones included)."""
        return list(self._shards)

    def shard_size(self, shard: int) -> int:
        """How many entries ``shard`` holds (expired ones included)."""
        return sum(len(space.values) for space in self._shards.get(shard, {}).values())

    def shard_entries(self, shard: int) -> Iterator[tuple[str, bytes, bytes, int, int]]:
        """The live entries of ``shard`` as (ns, key, value, remaining TTL in
        ms or 0 for none, version); expired ones are skipped. Read it to the
        end before the store changes."""
        now = self._clock()
        decompress = self._decompress
        for ns, space in self._shards.get(shard, {}).items():
            versions, expires, packed = space.versions, space.expires, space.packed
            for key, value in space.values.items():
                if packed and key in packed:
                    value = decompress(value)
                expires_at = expires.get(key)
                if expires_at is None:
                    yield ns, key, value, 0, versions[key]
                elif expires_at > now:
                    yield ns, key, value, max(1, math.ceil((expires_at - now) * 1000)), versions[key]

    def drop_shard(self, shard: int) -> int:
        """Drop every entry of ``shard`` without counting deletes (it moved
        to another node); how many there were."""
        spaces = self._shards.pop(shard, None)
        return 0 if spaces is None else sum(self._drop_space(ns, space) for ns, space in spaces.items())

    def flush(self, ns: str | None) -> int:
        """Drop every entry of namespace ``ns`` (None: of every namespace)
        without counting deletes; how many there were."""
        if ns is None:
            return self.clear()
        dropped = 0
        for shard, spaces in list(self._shards.items()):
            space = spaces.pop(ns, None)
            if space is not None:
                dropped += self._drop_space(ns, space)
                if not spaces:
                    del self._shards[shard]
        return dropped

    def _drop_space(self, ns: str, space: _Space) -> int:
        """Account for the entries of ``space`` (of ``ns``), taken out of its shard."""
        count = len(space.values)
        size = sum(len(key) + len(value) for key, value in space.values.items())
        self._spaces -= 1
        self._keys -= count
        self._bytes -= size
        self._ttl_entries -= len(space.expires)
        if space.packed:
            self._packed -= len(space.packed)
            self._saved -= sum(was - len(space.values[key]) for key, was in space.packed.items())
        self._ns_left(ns, count, size)
        return count

    def absorb(self, entries: Iterable[tuple[str, bytes, bytes, int, int]]) -> int:
        """Take entries handed over by another node, as :meth:`shard_entries`
        gives them: each keeps its version (this store's versions continue
        above it, so a key's version never goes back) and its remaining TTL,
        and replaces what is here. They are taken even at the memory limit
        (others are evicted for them if the policy allows). Returns how many
        were taken."""
        taken = 0
        for ns, key, value, ttl_ms, version in entries:
            self._put(ns, key, value, ttl_ms, room=False, event=None)
            self.counters.sets -= 1  # not a client's write
            if version > self._version:  # (even if it is evicted at once: versions never go back)
                self._version = version
            space = self._space(ns, key)
            if space is None or key not in space.values:  # (evicted at once to make room for the next)
                continue
            space.versions[key] = version
            taken += 1
        return taken


def _no_codec(value: bytes) -> bytes:
    raise AssertionError("a compressed value in a store that does not compress")


def _integer(value: bytes) -> int:
    """The signed 64-bit integer a value holds as decimal text (``-12``), else NotAnInteger."""
    try:
        number = int(value) if len(value) <= 20 else None
    except ValueError:
        number = None
    if number is None or b"%d" % number != value or not MIN_INCR <= number <= MAX_INCR:
        shown = value[:40].decode("utf-8", "backslashreplace") + ("…" if len(value) > 40 else "")
        raise NotAnInteger(f"the value is not a 64-bit integer: {shown!r}")
    return number
