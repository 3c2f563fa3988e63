"""The store on virtual time: TTL, sweeping, versions, namespaces and counters."""

from __future__ import annotations

import pytest

from dcache.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> Store:
    return Store(clock=clock)


def test_get_set_delete(store: Store) -> None:
    assert store.get("", b"k") is None
    v1 = store.set("", b"k", b"v1")
    assert store.get("", b"k") == b"v1"
    v2 = store.set("", b"k", b"v2")
    assert v2 > v1 and store.version("", b"k") == v2
    assert store.delete("", b"k") is True
    assert store.delete("", b"k") is False
    assert store.get("", b"k") is None and store.version("", b"k") is None
    assert len(store) == 0


def test_namespaces_are_isolated(store: Store) -> None:
    store.set("", b"k", b"default")
    store.set("a", b"k", b"in a")
    assert store.get("a", b"k") == b"in a" and store.get("", b"k") == b"default" and store.get("b", b"k") is None
    store.delete("a", b"k")
    assert store.namespaces() == [""]
    assert store.stats()["namespaces"] == 1


def test_ttl_expires_lazily(store: Store, clock: Clock) -> None:
    store.set("", b"k", b"v", ttl_ms=1500)
    assert store.ttl_ms("", b"k") == 1500
    clock.now += 1.499
    assert store.get("", b"k") == b"v"
    assert store.ttl_ms("", b"k") == 1
    clock.now += 0.001
    assert store.get("", b"k") is None
    assert store.ttl_ms("", b"k") is None
    s = store.stats()
    assert (s["expired"], s["keys"], s["hits"], s["misses"]) == (1, 0, 1, 1)


def test_ttl_reset_and_removed_by_set(store: Store, clock: Clock) -> None:
    store.set("", b"k", b"v", ttl_ms=1000)
    clock.now += 0.9
    store.set("", b"k", b"v", ttl_ms=1000)  # extends
    clock.now += 0.9
    assert store.get("", b"k") == b"v"
    store.set("", b"k", b"v")  # no TTL any more
    assert store.ttl_ms("", b"k") == -1
    clock.now += 100
    assert store.sweep() == 0
    assert store.get("", b"k") == b"v"


def test_sweep_is_bounded_and_reclaims_unread_keys(store: Store, clock: Clock) -> None:
    for i in range(2500):
        store.set("", f"k{i}".encode(), b"v", ttl_ms=1000)
    store.set("", b"keep", b"v")
    assert store.next_expiry() == pytest.approx(clock.now + 1)
    assert store.sweep(limit=1000) == 0  # nothing due yet
    clock.now += 1
    assert store.sweep(limit=1000) == 1000  # more to do
    assert store.sweep(limit=1000) == 1000
    assert store.sweep(limit=1000) == 500
    assert len(store) == 1 and store.stats()["expired"] == 2500
    assert store.next_expiry() is None


def test_stale_heap_items_never_drop_live_entries(store: Store, clock: Clock) -> None:
    store.set("", b"a", b"1", ttl_ms=1000)
    store.set("", b"a", b"2", ttl_ms=5000)  # the 1 s item is now stale
    store.set("", b"b", b"1", ttl_ms=1000)
    store.delete("", b"b")
    store.set("", b"b", b"2")  # recreated without TTL
    clock.now += 2
    assert store.sweep() == 0
    assert store.get("", b"a") == b"2" and store.get("", b"b") == b"2"


def test_expiry_heap_stays_bounded_under_rewrites(store: Store, clock: Clock) -> None:
    for _ in range(20_000):
        store.set("", b"hot", b"v", ttl_ms=60_000)  # same instant: one heap item
    assert len(store._expiry_heap) == 1
    for _ in range(20_000):
        clock.now += 0.001  # a new expiry each time: stale items pile up until compaction
        store.set("", b"hot", b"v", ttl_ms=60_000)
        store.set("", b"other", b"v", ttl_ms=60_000)
    assert len(store._expiry_heap) <= 1024 + 2
    clock.now += 61
    assert store.sweep() == 2 and len(store) == 0


def test_counters_and_memory(store: Store) -> None:
    store.set("", b"ab", b"xyz")
    store.set("", b"ab", b"x")
    store.set("n", b"c", b"12345")
    store.get("", b"ab")
    store.get("", b"zz")
    store.delete("n", b"c")
    s = store.stats()
    assert (s["sets"], s["hits"], s["misses"], s["deletes"], s["keys"]) == (3, 1, 1, 1, 1)
    assert s["data_bytes"] == len(b"ab") + len(b"x")
    assert s["memory_bytes"] > s["data_bytes"]


def test_discard_and_keys_for_upkeep(store: Store) -> None:
    store.set("", b"a", b"1", ttl_ms=10)
    store.set("", b"b", b"2")
    assert sorted(store.keys("")) == [b"a", b"b"]
    assert store.discard("", b"a") is True and store.discard("", b"a") is False
    s = store.stats()
    assert s["deletes"] == 0 and s["keys"] == 1


def test_clear_forgets_everything_and_counts_on() -> None:
    now = [0.0]
    store = Store(clock=lambda: now[0])
    store.set("", b"a", b"1")
    store.set("ns", b"b", b"2", ttl_ms=1000)
    before = store.set("", b"c", b"3")
    assert store.clear() == 3
    assert len(store) == 0 and store.get("", b"a") is None and store.get("ns", b"b") is None
    assert store.namespaces() == [] and store.sweep(10) == 0
    assert store.set("", b"a", b"4") > before  # versions never go back
    assert len(store) == 1
