"""The store against a plain dict over random sequences of operations (hypothesis stateful).

The model keeps what the store should hold, entry by entry, and the counters
it should show. Expiry is modelled as the store documents it: an entry past
its deadline reads as missing at once, but is dropped (and counted as
expired) only when an operation touches it or :meth:`Store.sweep` reaches
it; until then it still counts in ``len(store)`` and ``keys``.

Time is exact: the mock clock moves in steps of 1/8 s and TTLs are
multiples of 125 ms, so every deadline and remaining TTL is a float without
rounding error and an entry expires exactly at its deadline.

Three stores: without a limit, compressing values of 64 bytes or more, and
with a memory limit small enough that most writes evict (lru, lfu) or are
refused (noeviction). With a limit the model cannot know which entry goes,
so it takes the store's word for what was evicted, and checks that only
evictions made entries vanish (as many as ``evicted`` counts), that nothing
else changed, and that a refused write changed nothing at all.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dcache.shard import shard_of
from dcache.store import NotAnInteger, OutOfMemory, Store

TICK_S = 0.125  # the clock's step: 1/8 s, exact in binary
TICK_MS = 125
START = 1000.0
MAX_INT64 = 2**63 - 1
MIN_INT64 = -(2**63)
COMPRESS_MIN = 64
# With a limit of 6,000 bytes the store holds 3 to 5 entries: a new entry
# may cost up to 1,127 bytes of overhead (see store.py) besides its key and value.
MAX_BYTES = 6000

NS_NAMES = ("", "a", "b")
NAMESPACES = st.sampled_from(NS_NAMES)
# b"a\x00k0" in the default namespace falls in the same shard as b"k0" in "a":
# the shard's namespaces must still keep them apart.
KEYS = st.sampled_from([b"k0", b"k1", b"k2", b"\x00\xff", b"a\x00k0"])
TTLS_TICKS = range(1, 25)
TTLS = st.one_of(st.just(0), st.sampled_from(TTLS_TICKS).map(lambda n: n * TICK_MS))
INTEGERS = st.one_of(
    st.integers(-1000, 1000),
    st.sampled_from([MAX_INT64, MAX_INT64 - 1, MIN_INT64, MIN_INT64 + 1]),
).map(lambda n: b"%d" % n)
NOT_INTEGERS = st.sampled_from([b"", b"abc", b" 1", b"1 ", b"01", b"+1", b"-0", b"1_000", b"1.5", b"\xff", b"%d" % 2**63])
SHORT_VALUES = st.one_of(st.binary(max_size=20), INTEGERS, NOT_INTEGERS)
# Long values: a unit of at most 8 bytes repeated (zstd takes 64 such bytes
# down to 23 or less) or random bytes (which never shrink by the 1/16 the
# store asks of compression); sizes around COMPRESS_MIN.
REPEATED = st.builds(
    lambda unit, size: (unit * size)[:size], st.binary(min_size=1, max_size=8), st.sampled_from([63, 64, 65, 200, 3000])
)
RANDOM = st.builds(
    lambda size, seed: random.Random(seed).randbytes(size), st.sampled_from([63, 64, 65, 500]), st.integers(0, 2**32)
)
LONG_VALUES = st.one_of(REPEATED, RANDOM)
ADVANCE = st.integers(1, 16)  # ticks
REFUSED = object()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True, slots=True)
class Entry:
    value: bytes
    version: int
    deadline: float | None  # clock time; None: no TTL


def as_integer(value: bytes) -> int | None:
    """What incr counts from: canonical decimal text of a signed 64-bit integer."""
    try:
        number = int(value)
    except ValueError:
        return None
    return number if b"%d" % number == value and MIN_INT64 <= number <= MAX_INT64 else None


class StoreModel(RuleBasedStateMachine):
    """A store without a memory limit, against the model."""

    options: dict[str, Any] = {}

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.store = Store(self.clock, **self.options)
        # Entries the store still holds, expired or not (see the module's docstring).
        self.held: dict[tuple[str, bytes], Entry] = {}
        self.counts = {"hits": 0, "misses": 0, "sets": 0, "deletes": 0, "expired": 0, "evicted": 0}
        self.top_version = 0

    # -- the model's bookkeeping ----------------------------------------------------

    def deadline(self, ttl_ms: int) -> float | None:
        return self.clock.now + ttl_ms / 1000 if ttl_ms else None

    def live(self, ns: str, key: bytes) -> Entry | None:
        """The entry as the store sees it when an operation touches it: an expired one is dropped then."""
        entry = self.held.get((ns, key))
        if entry is not None and entry.deadline is not None and entry.deadline <= self.clock.now:
            del self.held[(ns, key)]
            self.counts["expired"] += 1
            return None
        return entry

    def new_version(self, version: int | None) -> int:
        """Every write that changes an entry gives a version above all before it."""
        assert version is not None and version > self.top_version
        self.top_version = version
        return version

    def wrote(self, ns: str, key: bytes, value: bytes, version: int | None, ttl_ms: int) -> None:
        self.held[(ns, key)] = Entry(value, self.new_version(version), self.deadline(ttl_ms))
        self.counts["sets"] += 1

    def read(self, entry: Entry | None) -> None:
        self.counts["hits" if entry is not None else "misses"] += 1

    def write(self, call: Callable[[], Any], ns: str, key: bytes, *, touches: bool = True) -> tuple[Any, Entry | None]:
        """Run a write: its result (REFUSED for OutOfMemory) and the entry it
        found, as the store saw it (``touches``: it looks the key up first,
        dropping it if expired)."""
        memory = self.store.memory()
        try:
            result = call()
        except OutOfMemory:
            result = REFUSED
        held = len(self.held)
        entry = self.live(ns, key) if touches else self.held.get((ns, key))
        if result is REFUSED:
            # Only a store at its limit that evicts nothing refuses; nothing
            # changed but the drop of an expired entry it looked up.
            assert self.store.max_bytes and self.store.eviction == "noeviction"
            if len(self.held) == held:
                assert self.store.memory() == memory
            event("refused")
        return result, entry

    def peek(self, ns: str, key: bytes) -> Entry | None:
        """The entry if it is there and has not expired, changing nothing."""
        entry = self.held.get((ns, key))
        return None if entry is None or (entry.deadline is not None and entry.deadline <= self.clock.now) else entry

    def remaining_ms(self, entry: Entry) -> int:
        assert entry.deadline is not None
        return round((entry.deadline - self.clock.now) * 1000)  # (a multiple of 125: exact)

    def live_entries(self) -> dict[tuple[str, bytes], Entry]:
        now = self.clock.now
        return {k: e for k, e in self.held.items() if e.deadline is None or e.deadline > now}

    def compressed(self, value: bytes) -> bool:
        """Whether the store keeps ``value`` compressed (see REPEATED and RANDOM)."""
        compress_min = self.store.compress_min
        return bool(compress_min) and len(value) >= compress_min and len(set(value)) <= 8

    def settle_evictions(self) -> None:
        """Take the store's word for which entries it evicted: the ones gone
        from it are as many as it counts as evicted, or one fewer when a
        write evicted the very key it then wrote."""
        evicted = self.store.counters.evicted - self.counts["evicted"]
        if not evicted:
            return
        assert self.store.max_bytes and self.store.eviction != "noeviction"
        there = {(ns, key) for ns in NS_NAMES for key in self.store.keys(ns)}
        gone = [k for k in self.held if k not in there]
        assert evicted - len(gone) in (0, 1), (evicted, gone)
        for k in gone:
            del self.held[k]
        self.counts["evicted"] += evicted

    # -- writes -------------------------------------------------------------------

    @rule(ns=NAMESPACES, key=KEYS, value=SHORT_VALUES, ttl=TTLS)
    def set(self, ns: str, key: bytes, value: bytes, ttl: int) -> None:
        # (an expired entry written over is replaced: not counted as expired)
        version, _ = self.write(lambda: self.store.set(ns, key, value, ttl), ns, key, touches=False)
        if version is not REFUSED:
            self.wrote(ns, key, value, version, ttl)

    @rule(ns=NAMESPACES, key=KEYS, value=SHORT_VALUES, ttl=TTLS)
    def add(self, ns: str, key: bytes, value: bytes, ttl: int) -> None:
        version, entry = self.write(lambda: self.store.add(ns, key, value, ttl), ns, key)
        if entry is not None:
            assert version is None
        elif version is not REFUSED:
            self.wrote(ns, key, value, version, ttl)

    @rule(ns=NAMESPACES, key=KEYS, value=SHORT_VALUES, ttl=TTLS)
    def replace(self, ns: str, key: bytes, value: bytes, ttl: int) -> None:
        version, entry = self.write(lambda: self.store.replace(ns, key, value, ttl), ns, key)
        if entry is None:
            assert version is None
        elif version is not REFUSED:
            self.wrote(ns, key, value, version, ttl)

    @rule(ns=NAMESPACES, key=KEYS, value=SHORT_VALUES, ttl=TTLS)
    def cas_with_the_current_version(self, ns: str, key: bytes, value: bytes, ttl: int) -> None:
        held = self.held.get((ns, key))
        given = held.version if held is not None else self.top_version  # (an expired entry's version is not current)
        result, entry = self.write(lambda: self.store.cas(ns, key, value, given, ttl), ns, key)
        if entry is None:
            assert result == (False, None)
        elif result is not REFUSED:
            stored, version = result
            assert stored is True
            self.wrote(ns, key, value, version, ttl)

    @rule(ns=NAMESPACES, key=KEYS, value=SHORT_VALUES, ttl=TTLS, back=st.integers(1, 3))
    def cas_with_a_stale_version(self, ns: str, key: bytes, value: bytes, ttl: int, back: int) -> None:
        held = self.held.get((ns, key))
        stale = max(0, (held.version if held is not None else self.top_version) - back)
        result, entry = self.write(lambda: self.store.cas(ns, key, value, stale, ttl), ns, key)
        assert result == (False, None if entry is None else entry.version)

    @rule(ns=NAMESPACES, key=KEYS, by=st.one_of(st.integers(-5, 5), st.sampled_from([MAX_INT64, MIN_INT64])))
    def incr(self, ns: str, key: bytes, by: int) -> None:
        seen = self.peek(ns, key)
        number = 0 if seen is None else as_integer(seen.value)
        if number is None or not MIN_INT64 <= number + by <= MAX_INT64:
            with pytest.raises(NotAnInteger):
                self.store.incr(ns, key, by)
            self.live(ns, key)  # nothing changed but the drop of an expired entry (the invariants check it)
            return
        result, entry = self.write(lambda: self.store.incr(ns, key, by), ns, key)
        if result is REFUSED:
            return
        assert result == number + by
        version = self.store.version(ns, key)  # (counts nothing)
        # The entry keeps its deadline, to the tick.
        self.held[(ns, key)] = Entry(b"%d" % result, self.new_version(version), None if entry is None else entry.deadline)
        self.counts["sets"] += 1

    @rule(ns=NAMESPACES, key=KEYS, ttl=TTLS)
    def expire(self, ns: str, key: bytes, ttl: int) -> None:
        """A new TTL (0: persist): a new version, no value written."""
        done, entry = self.write(lambda: self.store.expire(ns, key, ttl), ns, key)
        assert done is (entry is not None)
        if entry is not None:
            version = self.store.version(ns, key)
            if version is None:  # (evicted right after, at the limit: a TTL costs memory; settled below)
                assert self.store.counters.evicted > self.counts["evicted"]
                return
            self.held[(ns, key)] = dataclasses.replace(entry, version=self.new_version(version), deadline=self.deadline(ttl))

    @rule(ns=NAMESPACES, key=KEYS)
    def persist(self, ns: str, key: bytes) -> None:
        self.expire(ns, key, 0)

    @rule(ns=NAMESPACES, key=KEYS)
    def delete(self, ns: str, key: bytes) -> None:
        done, entry = self.write(lambda: self.store.delete(ns, key), ns, key)
        assert done is (entry is not None)
        if entry is not None:
            del self.held[(ns, key)]
            self.counts["deletes"] += 1

    @rule(ns=NAMESPACES, key=KEYS)
    def getdel(self, ns: str, key: bytes) -> None:
        value, entry = self.write(lambda: self.store.getdel(ns, key), ns, key)
        self.read(entry)
        if entry is None:
            assert value is None
        else:
            assert value == entry.value
            del self.held[(ns, key)]
            self.counts["deletes"] += 1

    # -- reads --------------------------------------------------------------------

    @rule(ns=NAMESPACES, key=KEYS)
    def get(self, ns: str, key: bytes) -> None:
        value = self.store.get(ns, key)
        entry = self.live(ns, key)
        self.read(entry)
        assert value == (None if entry is None else entry.value)

    @rule(ns=NAMESPACES, keys=st.lists(KEYS, max_size=6))
    def get_many(self, ns: str, keys: list[bytes]) -> None:
        """As a node answers mget: a get per key, repeats included."""
        values = [self.store.get(ns, key) for key in keys]
        expected = []
        for key in keys:
            entry = self.live(ns, key)
            self.read(entry)
            expected.append(None if entry is None else entry.value)
        assert values == expected

    @rule(ns=NAMESPACES, key=KEYS)
    def ttl_ms(self, ns: str, key: bytes) -> None:
        ttl = self.store.ttl_ms(ns, key)
        entry = self.live(ns, key)
        if entry is None:
            assert ttl is None
        else:
            assert ttl == (-1 if entry.deadline is None else self.remaining_ms(entry))

    @rule(ns=NAMESPACES, key=KEYS)
    def meta(self, ns: str, key: bytes) -> None:
        meta = self.store.meta(ns, key)
        entry = self.live(ns, key)
        self.read(entry)
        if entry is None:
            assert meta is None
        else:
            assert meta == (entry.value, entry.version, -1 if entry.deadline is None else self.remaining_ms(entry))

    # -- time ---------------------------------------------------------------------

    @rule(ticks=ADVANCE)
    def advance(self, ticks: int) -> None:
        self.clock.now += ticks * TICK_S

    @rule(pick=st.integers(0, 14), ticks=st.integers(0, 2), read=st.sampled_from(["get", "meta", "ttl_ms", "incr", None]))
    def advance_to_a_deadline(self, pick: int, ticks: int, read: str | None) -> None:
        """The clock exactly on an entry's deadline (when it expires) or ``ticks`` before it, and maybe a read of it then."""
        ahead = sorted((e.deadline, k) for k, e in self.held.items() if e.deadline is not None and e.deadline > self.clock.now)
        if not ahead:
            return
        deadline, (ns, key) = ahead[pick % len(ahead)]
        self.clock.now = max(self.clock.now, deadline - ticks * TICK_S)
        if read == "incr":
            self.incr(ns, key, 1)
        elif read is not None:
            getattr(self, read)(ns, key)

    @rule(limit=st.sampled_from([1, 2, 1000]))
    def sweep(self, limit: int) -> None:
        """Sweep until nothing is due: every expired entry goes, and only those."""
        for _ in range(1000):
            if self.store.sweep(limit) < limit:
                break
        else:
            raise AssertionError("sweep() never finished")
        due = [k for k, e in self.held.items() if e.deadline is not None and e.deadline <= self.clock.now]
        for k in due:
            del self.held[k]
        self.counts["expired"] += len(due)
        assert len(self.store) == len(self.held) == len(self.live_entries())

    @rule()
    def empty_out(self) -> None:
        """Delete every entry and sweep once every deadline ever set is past:
        nothing is left to account for."""
        for ns, key in list(self.held):
            self.delete(ns, key)
        self.advance(max(TTLS_TICKS))
        self.sweep(1000)
        assert len(self.store) == 0 and self.store.next_expiry() is None
        assert self.store.memory() == 0

    # -- what must hold after every step -----------------------------------------------

    @invariant()
    def agrees_with_the_model(self) -> None:
        """Checked without touching an entry (which would drop an expired one)."""
        self.settle_evictions()
        store = self.store
        for ns in NS_NAMES:
            assert sorted(store.keys(ns)) == sorted(key for n, key in self.held if n == ns)
        assert len(store) == len(self.held)
        assert sorted(store.shards()) == sorted({shard_of(ns, key) for ns, key in self.held})
        live = {}
        for shard in store.shards():
            for ns, key, value, ttl_ms, version in store.shard_entries(shard):
                assert (ns, key) not in live
                live[(ns, key)] = (value, ttl_ms, version)
        assert live == {
            k: (e.value, 0 if e.deadline is None else self.remaining_ms(e), e.version) for k, e in self.live_entries().items()
        }

        stats = store.stats()
        assert {name: stats[name] for name in self.counts} == self.counts
        assert stats["keys"] == len(self.held)
        assert stats["namespaces"] == len({ns for ns, _ in self.held})
        compressed = {k for k, e in self.held.items() if self.compressed(e.value)}
        assert stats["compressed_values"] == len(compressed)
        assert (stats["compressed_values"] == 0) is (stats["compression_saved_bytes"] == 0)
        # Compressed, a value's data_bytes are what it takes; with the bytes saved, what was written.
        written = sum(len(k) + len(e.value) for (_, k), e in self.held.items())
        assert stats["data_bytes"] + stats["compression_saved_bytes"] == written
        for ns in NS_NAMES:
            mine = {key: e for (n, key), e in self.held.items() if n == ns}
            ns_stats = store.namespace_stats(ns)
            assert ns_stats["keys"] == len(mine)
            if not any((ns, key) in compressed for key in mine):
                assert ns_stats["data_bytes"] == sum(len(key) + len(e.value) for key, e in mine.items())
        if store.max_bytes and store.eviction != "noeviction":
            assert store.memory() <= store.max_bytes
        if not self.held and store.next_expiry() is None:
            assert store.memory() == 0  # (the estimate keeps no trace of what went)


class CompressingStoreModel(StoreModel):
    """With ``compress_min``: long values, some kept compressed, read back byte for byte."""

    options = {"compress_min": COMPRESS_MIN}

    @rule(ns=NAMESPACES, key=KEYS, value=LONG_VALUES, ttl=TTLS)
    def set_long(self, ns: str, key: bytes, value: bytes, ttl: int) -> None:
        self.set(ns, key, value, ttl)

    @rule(ns=NAMESPACES, key=KEYS, value=LONG_VALUES, ttl=TTLS)
    def add_or_replace_long(self, ns: str, key: bytes, value: bytes, ttl: int) -> None:
        self.add(ns, key, value, ttl)
        self.replace(ns, key, value, ttl)

    @rule(ns=NAMESPACES, key=KEYS, value=LONG_VALUES)
    def cas_long(self, ns: str, key: bytes, value: bytes) -> None:
        self.cas_with_the_current_version(ns, key, value, 0)


class LimitedStoreModel(StoreModel):
    """At a memory limit of a few entries, with each eviction policy."""

    @rule(ns=NAMESPACES, key=KEYS, value=RANDOM, ttl=TTLS)
    def set_long(self, ns: str, key: bytes, value: bytes, ttl: int) -> None:
        self.set(ns, key, value, ttl)


class LruStoreModel(LimitedStoreModel):
    options = {"max_bytes": MAX_BYTES, "eviction": "lru"}


class LfuStoreModel(LimitedStoreModel):
    options = {"max_bytes": MAX_BYTES, "eviction": "lfu"}


class NoEvictionStoreModel(LimitedStoreModel):
    options = {"max_bytes": MAX_BYTES, "eviction": "noeviction"}


SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestStoreModel = StoreModel.TestCase
TestCompressingStoreModel = CompressingStoreModel.TestCase
TestLruStoreModel = LruStoreModel.TestCase
TestLfuStoreModel = LfuStoreModel.TestCase
TestNoEvictionStoreModel = NoEvictionStoreModel.TestCase
TestStoreModel.settings = TestCompressingStoreModel.settings = SETTINGS
TestLruStoreModel.settings = TestLfuStoreModel.settings = TestNoEvictionStoreModel.settings = SETTINGS
