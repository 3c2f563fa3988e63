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
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from zlib import crc32

from .shard import NUM_SHARDS, shard_of

# Compact the expiry heap when stale items outnumber live TTL entries by this
# factor (an entry whose TTL changed, or that went, leaves its item behind).
# Compaction is spread out: the heap is set aside and its items moved to a
# new one a batch per sweep, so it never stalls a request (at a million
# entries, compacting at once took half a second); writes pay nothing for it.
_HEAP_SLACK = 2
_HEAP_MIN_REBUILD = 1024
# Rough per-entry overhead (the slots in the value and version dicts, key and
# value headers), so "memory" means something for many small entries.
ENTRY_OVERHEAD_BYTES = 140


@dataclass(slots=True)
class Counters:
    hits: int = 0
    misses: int = 0
    sets: int = 0
    deletes: int = 0
    expired: int = 0


class _Space:
    """One namespace's entries in one shard."""

    __slots__ = ("values", "versions", "expires")

    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.versions: dict[bytes, int] = {}
        self.expires: dict[bytes, float] = {}  # only entries with a TTL


class Store:
    """Namespaced key → value map with TTL, per-entry versions and stats.

    Entries are kept by shard (then namespace), so one shard's entries can
    be listed or dropped (to hand them to another node) without walking
    the others, and no dict grows past a shard's share: when a dict runs
    out of room Python rebuilds it whole, which for one dict of a million
    entries took 150-650 ms; a shard's holds about 1/8192 of them.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._shards: dict[int, dict[str, _Space]] = {}  # shard → ns → entries
        self._namespaces: dict[str, int] = {}  # ns → how many keys
        self._expiry_heap: list[tuple[float, str, bytes]] = []
        self._compacting: list[tuple[float, str, bytes]] = []  # an older heap, its live items moving over
        self._ttl_entries = 0
        self._version = 0
        self._bytes = 0
        self._keys = 0
        self.counters = Counters()

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
                    return value
                self._remove(ns, space, key)
                self.counters.expired += 1
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
        return space.values[key], ttl_ms, space.versions[key]

    def version(self, ns: str, key: bytes) -> int | None:
        space = self._live(ns, key)
        return None if space is None else space.versions[key]

    def __len__(self) -> int:
        return self._keys

    # -- writes ----------------------------------------------------------------

    def set(self, ns: str, key: bytes, value: bytes, ttl_ms: int = 0) -> int:
        """Store ``value``; ``ttl_ms`` 0 means no expiry. Returns the new version."""
        shard = crc32(ns.encode() + b"\0" + key if ns else key) % NUM_SHARDS
        spaces = self._shards.get(shard)
        if spaces is None:
            spaces = self._shards[shard] = {}
        space = spaces.get(ns)
        if space is None:
            space = spaces[ns] = _Space()
        self._version += 1
        values = space.values
        old = values.get(key)
        values[key] = value
        space.versions[key] = self._version
        if old is None:
            self._keys += 1
            self._bytes += len(key) + len(value)
            self._namespaces[ns] = self._namespaces.get(ns, 0) + 1
        else:
            self._bytes += len(value) - len(old)
        expires = space.expires
        previous = expires.pop(key, 0.0) if expires else 0.0
        if previous:
            self._ttl_entries -= 1
        if ttl_ms:
            self._ttl_entries += 1
            expires_at = self._clock() + ttl_ms / 1000
            expires[key] = expires_at
            if expires_at != previous:  # else the heap already has this item
                heap = self._expiry_heap
                heapq.heappush(heap, (expires_at, ns, key))
                if not self._compacting and len(heap) >= _HEAP_MIN_REBUILD and len(heap) > _HEAP_SLACK * self._ttl_entries:
                    self._compacting, self._expiry_heap = heap, []
        self.counters.sets += 1
        return self._version

    def delete(self, ns: str, key: bytes) -> bool:
        space = self._live(ns, key)
        if space is None:
            return False
        self._remove(ns, space, key)
        self.counters.deletes += 1
        return True

    def sweep(self, limit: int = 1000) -> int:
        """Drop up to ``limit`` expired entries; return how many were dropped.

        Returns ``limit`` when there may be more to do right away (dropping,
        or compacting the expiry heap: up to ``limit`` items moved per call).
        """
        if self._compacting and self._compact(limit) == limit:
            return limit
        now = self._clock()
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
        return limit if examined == limit else dropped

    def next_expiry(self) -> float | None:
        """When the earliest TTL runs out (clock time), or None if nothing expires."""
        tops = [heap[0][0] for heap in (self._expiry_heap, self._compacting) if heap]
        return min(tops) if tops else None

    # -- stats -----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {
            "hits": c.hits,
            "misses": c.misses,
            "sets": c.sets,
            "deletes": c.deletes,
            "expired": c.expired,
            "keys": self._keys,
            "namespaces": len(self._namespaces),
            "data_bytes": self._bytes,
            "memory_bytes": self._bytes + self._keys * ENTRY_OVERHEAD_BYTES,
        }

    # -- internals -------------------------------------------------------------

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
        return True

    def _remove(self, ns: str, space: _Space, key: bytes) -> None:
        value = space.values.pop(key)
        del space.versions[key]
        if space.expires and space.expires.pop(key, None) is not None:
            self._ttl_entries -= 1
        if not space.values:
            shard = shard_of(ns, key)
            spaces = self._shards[shard]
            del spaces[ns]
            if not spaces:
                del self._shards[shard]
        self._keys -= 1
        self._bytes -= len(key) + len(value)
        left = self._namespaces[ns] - 1
        if left:
            self._namespaces[ns] = left
        else:
            del self._namespaces[ns]

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

    def keys(self, ns: str) -> list[bytes]:
        """A snapshot of the keys in ``ns`` (expired ones included)."""
        return [key for spaces in self._shards.values() if ns in spaces for key in spaces[ns].values]

    def clear(self) -> int:
        """Drop every entry without counting deletes (they may be stale); how many there were.
        Versions keep counting up."""
        dropped = self._keys
        self._shards = {}
        self._namespaces = {}
        self._expiry_heap = []
        self._compacting = []
        self._ttl_entries = self._bytes = self._keys = 0
        return dropped

    def discard(self, ns: str, key: bytes) -> bool:
        """Drop an entry without counting a delete (it moved to another node)."""
        space = self._space(ns, key)
        if space is None or key not in space.values:
            return False
        self._remove(ns, space, key)
        return True

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
        for ns, space in self._shards.get(shard, {}).items():
            versions, expires = space.versions, space.expires
            for key, value in space.values.items():
                expires_at = expires.get(key)
                if expires_at is None:
                    yield ns, key, value, 0, versions[key]
                elif expires_at > now:
                    yield ns, key, value, max(1, math.ceil((expires_at - now) * 1000)), versions[key]

    def drop_shard(self, shard: int) -> int:
        """Drop every entry of ``shard`` without counting deletes (it moved
        to another node); how many there were."""
        spaces = self._shards.pop(shard, None)
        if spaces is None:
            return 0
        dropped = 0
        for ns, space in spaces.items():
            count = len(space.values)
            dropped += count
            self._bytes -= sum(len(key) + len(value) for key, value in space.values.items())
            self._ttl_entries -= len(space.expires)
            left = self._namespaces[ns] - count
            if left:
                self._namespaces[ns] = left
            else:
                del self._namespaces[ns]
        self._keys -= dropped
        return dropped

    def absorb(self, entries: Iterable[tuple[str, bytes, bytes, int, int]]) -> int:
        """Take entries handed over by another node, as :meth:`shard_entries`
        gives them: each keeps its version (this store's versions continue
        above it, so a key's version never goes back) and its remaining TTL,
        and replaces what is here. Returns how many were taken."""
        taken = 0
        for ns, key, value, ttl_ms, version in entries:
            self.set(ns, key, value, ttl_ms)
            self.counters.sets -= 1  # not a client's write
            space = self._space(ns, key)
            assert space is not None
            space.versions[key] = version
            if version > self._version:
                self._version = version
            taken += 1
        return taken
