"""A `dcache serve` process at --max-memory: its RSS stays within a measured
margin of the limit while ten times the limit is written, and its stats say
so (the estimate within the limit, the evictions counted exactly). And the
estimate behind the limit against what Python allocates, once the store
evicts."""

from __future__ import annotations

import itertools
import os
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from support import ServeProcess

import dcache
from dcache.shard import shard_of
from dcache.store import Store

MiB = 1 << 20
LIMIT = 32 * MiB
WRITTEN = 10 * LIMIT  # bytes of keys and values written in all
VALUE_BYTES = 1024
BATCH_BYTES = 1 * MiB  # per mset (bigger batches only raise the node's transient buffers)
RSS_EVERY = 32  # batches between two readings of the node's RSS while writing
# What the node's RSS may grow by over its idle RSS, as a multiple of the
# limit. Measured on CPython 3.11 (2 cores), writing 320 MiB of random
# values at a 32 MiB limit in 1 MiB batches: the idle node takes 34.0-34.4
# MiB; with 1 KiB values it ends at 70.9 MiB with lru (growth 1.15x the
# limit) and 71.6 MiB with lfu (1.17x). Before the estimate counted the
# dicts' slack under eviction (see the last test) it grew 1.27-1.32x, and
# 1.70-1.80x with 100-byte values. The growth levels off by 5x written and
# stays flat to 30x; the highest reading while writing is the last. The
# limit bounds the estimate, which leaves out the allocator's slack and the
# buffers of the request in flight. 100-byte values take over a minute to
# write 10x the limit, too long for the suite: only 1 KiB values are tested,
# with room for a busy machine.
RSS_GROWTH_FACTOR = 2.0
START_TIMEOUT = 15  # s, for the node to listen
RUN_TIMEOUT = 120  # s, for all the writes: a stuck node fails the test (they take 13-20 s)
CLIENT_TIMEOUT = 30  # s, for one request


def batches(value_bytes: int) -> Iterator[list[tuple[bytes, bytes]]]:
    """Distinct keys with random values (they do not compress), BATCH_BYTES
    a batch, until WRITTEN bytes of keys and values. A value is a slice of a
    random pool: as random as os.urandom's, at a fraction of the cost."""
    pool = os.urandom(8 * MiB)
    span = len(pool) - value_bytes
    count = BATCH_BYTES // (value_bytes + 14)
    written = first = 0
    while written < WRITTEN:
        starts = [(i, i * 7919 * value_bytes % span) for i in range(first, first + count)]
        batch = [(b"key:%010d" % i, pool[start : start + value_bytes]) for i, start in starts]
        first += count
        written += sum(len(key) + len(value) for key, value in batch)
        yield batch


@dataclass(frozen=True, slots=True)
class Run:
    """What writing ten times the limit to one node showed."""

    eviction: str
    idle_rss: int
    highest_rss: int  # the highest reading while writing, and at the end
    entries: int
    stats: dict[str, Any]  # at the end
    last: list[tuple[bytes, bytes]]  # the last batch written
    found: list[bytes | None]  # its values, read back

    @property
    def growth(self) -> float:
        """The RSS grown over the idle node's, as a multiple of the limit."""
        return (self.highest_rss - self.idle_rss) / LIMIT


def write_ten_times_the_limit(eviction: str) -> Run:
    with ServeProcess("--max-memory", f"{LIMIT // MiB}MiB", "--eviction", eviction, start_timeout=START_TIMEOUT) as node:
        with dcache.SyncClient(node.client_address, timeout=CLIENT_TIMEOUT) as client:
            idle = client.stats()
            assert (idle["max_memory_bytes"], idle["eviction"], idle["keys"]) == (LIMIT, eviction, 0)
            deadline = time.monotonic() + RUN_TIMEOUT
            highest = idle["process_memory_bytes"]
            entries = 0
            for n, batch in enumerate(batches(VALUE_BYTES), 1):
                assert len(client.mset(batch)) == len(batch)
                entries += len(batch)
                if n % RSS_EVERY == 0:
                    highest = max(highest, client.stats()["process_memory_bytes"])
                assert time.monotonic() < deadline, f"{eviction}: {entries:,} entries written in {RUN_TIMEOUT} s"
            stats = client.stats()
            found = client.mget([key for key, _ in batch])
    highest = max(highest, stats["process_memory_bytes"])
    return Run(eviction, idle["process_memory_bytes"], highest, entries, stats, batch, found)


def test_rss_stays_within_a_margin_of_the_limit_while_ten_times_it_is_written() -> None:
    # A node per policy, written at once: each node's RSS is its own, and the
    # two take 17 s together rather than 36 s one after the other.
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(write_ten_times_the_limit, ["lru", "lfu"]))
    for run in runs:
        stats = run.stats
        assert LIMIT - 16 * 1024 < stats["memory_bytes"] <= LIMIT, run.eviction  # (within an entry's room of it)
        assert 0 < stats["evicted"] == run.entries - stats["keys"], run.eviction  # (every key distinct, none deleted)
        assert (stats["sets"], stats["compressed_values"]) == (run.entries, 0), run.eviction
        assert stats["data_bytes"] == stats["keys"] * (14 + VALUE_BYTES), run.eviction
        assert all(value is None or value == written for value, (_, written) in zip(run.found, run.last)), run.eviction
    assert all(run.growth <= RSS_GROWTH_FACTOR for run in runs), [
        f"{run.eviction}: RSS {run.idle_rss / MiB:.1f} MiB idle, {run.highest_rss / MiB:.1f} MiB at most, "
        f"grown by {run.growth:.2f} times the limit"
        for run in runs
    ]


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_the_memory_estimate_stays_close_to_what_python_allocates_once_the_store_evicts(eviction: str) -> None:
    """As test_store checks for a store filled once, at the limit: 3 MiB of
    100-byte values written into 1 MiB. The keys fall in 128 of the shards,
    so that each namespace of a shard holds as many entries as a node's
    do at a 32 MiB limit (about 10 to 20), at a 32nd of the cost."""
    limit = 1 * MiB
    value_bytes = 100
    count = 3 * limit // (14 + value_bytes)
    numbers = list(itertools.islice((i for i in itertools.count() if shard_of("", b"key:%010d" % i) < 128), count))
    pool = os.urandom(64 * value_bytes)
    store = Store(time.monotonic, max_bytes=limit, eviction=eviction)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in numbers:  # (each key made here, so that those the store keeps count and those it drops are freed)
            store.set("", b"key:%010d" % i, pool[i % 64 * value_bytes : (i % 64 + 1) * value_bytes])
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert store.counters.evicted > 2 * len(store)  # (churned: most entries written were evicted)
    # (0.96x when written once, 1.36x here, before the estimate counted the dicts' slack under eviction)
    assert 0.85 < used / store.memory() < 1.15, used / store.memory()
