"""The in-memory store of one node: entries, TTL, versions and counters.

Sans-IO: time comes from the injected ``clock`` (seconds, monotonic), so the
node passes ``trio.current_time`` and tests pass a mock clock.

Expiry works two ways, as in Redis: lazily (an expired entry is dropped when
it is touched) and actively (:meth:`Store.sweep` drops a bounded number of
expired entries per call, so keys nobody reads again do not hold memory).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .shard import NUM_SHARDS, key_hash

# Rebuild the expiry heap when stale items outnumber live TTL entries by this
# factor (an entry whose TTL changed leaves its old heap item behind).
_HEAP_SLACK = 2
_HEAP_MIN_REBUILD = 1024
# Rough per-entry overhead (dict slot, entry object, key and value headers,
# the shard index's slot), so "memory" means something for many small entries.
ENTRY_OVERHEAD_BYTES = 192


class Entry:
    __slots__ = ("value", "expires_at", "version")

    def __init__(self, value: bytes, expires_at: float, version: int) -> None:
        self.value = value
        self.expires_at = expires_at  # 0.0 means no TTL
        self.version = version


@dataclass(slots=True)
class Counters:
    hits: int = 0
    misses: int = 0
    sets: int = 0
    deletes: int = 0
    expired: int = 0


class Store:
    """Namespaced key → value map with TTL, per-entry versions and stats.

    Keys are also indexed by shard, so one shard's entries can be listed
    (to hand them to another node) without walking the others: the index
    is touched when a key comes or goes, not when it is read or rewritten.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._spaces: dict[str, dict[bytes, Entry]] = {}
        self._shards: dict[int, dict[str, set[bytes]]] = {}  # shard → ns → keys
        self._expiry_heap: list[tuple[float, str, bytes]] = []
        self._ttl_entries = 0
        self._version = 0
        self._bytes = 0
        self._keys = 0
        self.counters = Counters()

    # -- reads -----------------------------------------------------------------

    def get(self, ns: str, key: bytes) -> bytes | None:
        entry = self._live(ns, key)
        if entry is None:
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        return entry.value

    def ttl_ms(self, ns: str, key: bytes) -> int | None:
        """Remaining TTL in ms, -1 for an entry without TTL, None if missing."""
        entry = self._live(ns, key)
        if entry is None:
            return None
        if not entry.expires_at:
            return -1
        return max(0, round((entry.expires_at - self._clock()) * 1000))

    def version(self, ns: str, key: bytes) -> int | None:
        entry = self._live(ns, key)
        return None if entry is None else entry.version

    def __len__(self) -> int:
        return self._keys

    # -- writes ----------------------------------------------------------------

    def set(self, ns: str, key: bytes, value: bytes, ttl_ms: int = 0) -> int:
        """Store ``value``; ``ttl_ms`` 0 means no expiry. Returns the new version."""
        space = self._spaces.get(ns)
        if space is None:
            space = self._spaces[ns] = {}
        self._version += 1
        expires_at = self._clock() + ttl_ms / 1000 if ttl_ms else 0.0
        old = space.get(key)
        previous_expiry = 0.0
        if old is None:
            self._keys += 1
            self._bytes += len(key) + len(value)
            space[key] = Entry(value, expires_at, self._version)
            self._index(ns, key)
        else:
            self._bytes += len(value) - len(old.value)
            previous_expiry = old.expires_at
            if previous_expiry:
                self._ttl_entries -= 1
            old.value = value
            old.expires_at = expires_at
            old.version = self._version
        if expires_at:
            self._ttl_entries += 1
            if expires_at != previous_expiry:  # else the heap already has this item
                heapq.heappush(self._expiry_heap, (expires_at, ns, key))
                self._maybe_rebuild_heap()
        self.counters.sets += 1
        return self._version

    def delete(self, ns: str, key: bytes) -> bool:
        entry = self._live(ns, key)
        if entry is None:
            return False
        self._remove(ns, key, entry)
        self.counters.deletes += 1
        return True

    def sweep(self, limit: int = 1000) -> int:
        """Drop up to ``limit`` expired entries; return how many were dropped.

        Returns ``limit`` when there may be more to do right away.
        """
        now = self._clock()
        heap = self._expiry_heap
        dropped = 0
        examined = 0
        while heap and heap[0][0] <= now and examined < limit:
            expires_at, ns, key = heapq.heappop(heap)
            examined += 1
            entry = self._spaces.get(ns, {}).get(key)
            # A stale item: the key was deleted, or set again with another TTL.
            if entry is not None and entry.expires_at == expires_at:
                self._remove(ns, key, entry)
                self.counters.expired += 1
                dropped += 1
        return limit if examined == limit else dropped

    def next_expiry(self) -> float | None:
        """When the earliest TTL runs out (clock time), or None if nothing expires."""
        return self._expiry_heap[0][0] if self._expiry_heap else None

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
            "namespaces": len(self._spaces),
            "data_bytes": self._bytes,
            "memory_bytes": self._bytes + self._keys * ENTRY_OVERHEAD_BYTES,
        }

    # -- internals -------------------------------------------------------------

    def _live(self, ns: str, key: bytes) -> Entry | None:
        space = self._spaces.get(ns)
        if space is None:
            return None
        entry = space.get(key)
        if entry is None:
            return None
        if entry.expires_at and entry.expires_at <= self._clock():
            self._remove(ns, key, entry)
            self.counters.expired += 1
            return None
        return entry

    def _index(self, ns: str, key: bytes) -> None:
        shard = key_hash(ns, key) % NUM_SHARDS
        spaces = self._shards.get(shard)
        if spaces is None:
            spaces = self._shards[shard] = {}
        keys = spaces.get(ns)
        if keys is None:
            spaces[ns] = {key}
        else:
            keys.add(key)

    def _remove(self, ns: str, key: bytes, entry: Entry) -> None:
        space = self._spaces[ns]
        del space[key]
        if not space:
            del self._spaces[ns]
        shard = key_hash(ns, key) % NUM_SHARDS
        spaces = self._shards[shard]
        keys = spaces[ns]
        keys.discard(key)
        if not keys:
            del spaces[ns]
            if not spaces:
                del self._shards[shard]
        self._keys -= 1
        self._bytes -= len(key) + len(entry.value)
        if entry.expires_at:
            self._ttl_entries -= 1

    def _maybe_rebuild_heap(self) -> None:
        heap = self._expiry_heap
        if len(heap) < _HEAP_MIN_REBUILD or len(heap) <= _HEAP_SLACK * self._ttl_entries:
            return
        spaces = self._spaces
        live = []
        seen = set()
        for item in heap:
            entry = spaces.get(item[1], {}).get(item[2])
            if entry is not None and entry.expires_at == item[0] and item not in seen:
                seen.add(item)
                live.append(item)
        heapq.heapify(live)
        self._expiry_heap = live

    # -- bulk access for the node's upkeep ----------------------------------------

    def namespaces(self) -> list[str]:
        return list(self._spaces)

    def keys(self, ns: str) -> list[bytes]:
        """A snapshot of the keys in ``ns`` (expired ones included)."""
        return list(self._spaces.get(ns, ()))

    def clear(self) -> int:
        """Drop every entry without counting deletes (they may be stale); how many there were.
        Versions keep counting up."""
        dropped = self._keys
        self._spaces = {}
        self._shards = {}
        self._expiry_heap = []
        self._ttl_entries = self._bytes = self._keys = 0
        return dropped

    def discard(self, ns: str, key: bytes) -> bool:
        """Drop an entry without counting a delete (it moved to another node)."""
        entry = self._spaces.get(ns, {}).get(key)
        if entry is None:
            return False
        self._remove(ns, key, entry)
        return True

    # -- by shard, to hand entries to another node ---------------------------------

    def shards(self) -> list[int]:
        """The shards holding at least one entry (expired ones included)."""
        return list(self._shards)

    def shard_entries(self, shard: int) -> Iterator[tuple[str, bytes, bytes, int, int]]:
        """The live entries of ``shard`` as (ns, key, value, remaining TTL in
        ms or 0 for none, version); expired ones are skipped. Read it to the
        end before the store changes."""
        now = self._clock()
        spaces = self._spaces
        for ns, keys in self._shards.get(shard, {}).items():
            space = spaces[ns]
            for key in keys:
                entry = space[key]
                if not entry.expires_at:
                    yield ns, key, entry.value, 0, entry.version
                elif entry.expires_at > now:
                    yield ns, key, entry.value, max(1, math.ceil((entry.expires_at - now) * 1000)), entry.version

    def drop_shard(self, shard: int) -> int:
        """Drop every entry of ``shard`` without counting deletes (it moved
        to another node); how many there were."""
        dropped = 0
        for ns, keys in list(self._shards.get(shard, {}).items()):
            space = self._spaces[ns]
            for key in list(keys):
                self._remove(ns, key, space[key])
                dropped += 1
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
            entry = self._spaces[ns][key]
            if version > self._version:
                self._version = version
            entry.version = version
            taken += 1
        return taken
