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
    for i in range(20_000):
        clock.now += 0.001  # a new expiry each time: stale items pile up until compaction
        store.set("", b"hot", b"v", ttl_ms=60_000)
        store.set("", b"other", b"v", ttl_ms=60_000)
        if i % 100 == 0:
            store.sweep()  # as the node does, every 0.1 s
    assert len(store._expiry_heap) + len(store._compacting) <= 2 * 1024 + 200  # compacted as it goes
    while store.sweep() == 1000:
        pass
    assert len(store._expiry_heap) + len(store._compacting) <= 1024
    clock.now += 61
    assert store.sweep() == 2 and len(store) == 0


def test_compacting_the_expiry_heap_expires_what_is_due_and_keeps_every_deadline(store: Store, clock: Clock) -> None:
    compacting = 0
    for ttl in (1000, 1500, 2000):  # stale items pile up: compaction starts
        for i in range(3000):
            store.set("", b"k%d" % i, b"v", ttl_ms=ttl + i)
            compacting += bool(store._compacting)
            if i % 500 == 0:
                store.sweep(100)
    assert compacting > 100
    clock.now += 2.5
    while store.sweep(100) == 100:
        pass
    assert not store._compacting and len(store) == 3000 - 501
    assert store.ttl_ms("", b"k2999") == 2499 and store.next_expiry() == pytest.approx(clock.now + 0.001)


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


def _shard_contents(store: Store) -> dict[tuple[str, bytes], bytes]:
    return {(ns, key): value for shard in store.shards() for ns, key, value, _, _ in store.shard_entries(shard)}


def test_a_shards_entries_are_listed_with_remaining_ttl_and_version(store: Store, clock: Clock) -> None:
    from dcache.shard import shard_of

    v = store.set("", b"a", b"1", ttl_ms=10_000)
    store.set("users", b"a", b"2")
    store.set("", b"gone", b"3", ttl_ms=100)
    clock.now += 2
    shard = shard_of("", b"a")
    assert [e for e in store.shard_entries(shard) if e[1] == b"a"] == [("", b"a", b"1", 8000, v)]
    assert all(e[1] != b"gone" for s in store.shards() for e in store.shard_entries(s))  # expired: not listed
    assert store.drop_shard(shard_of("users", b"a")) >= 1
    assert store.get("users", b"a") is None and store.counters.deletes == 0


def test_absorbed_entries_keep_their_version_and_ttl_and_versions_go_on_above(store: Store, clock: Clock) -> None:
    store.set("", b"mine", b"x")
    assert store.absorb([("", b"k", b"v", 5000, 900), ("ns", b"p", b"w", 0, 3)]) == 2
    assert store.get("", b"k") == b"v" and store.version("", b"k") == 900
    assert store.ttl_ms("", b"k") == 5000 and store.ttl_ms("ns", b"p") == -1
    assert store.set("", b"k", b"v2") > 900  # a key's version never goes back
    assert store.stats()["sets"] == 2  # entries handed over are not clients' writes
    clock.now += 6
    assert store.get("", b"k") == b"v2"


def test_the_shard_index_holds_exactly_the_live_entries() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    keys = st.sampled_from([b"a", b"b", b"c", b"d", b"e"])
    ops = st.lists(
        st.one_of(
            st.tuples(st.just("set"), st.sampled_from(["", "n"]), keys, st.sampled_from([0, 1000])),
            st.tuples(st.just("delete"), st.sampled_from(["", "n"]), keys, st.just(0)),
            st.tuples(st.just("tick"), st.just(""), keys, st.just(0)),
            st.tuples(st.just("drop"), st.sampled_from(["", "n"]), keys, st.just(0)),
        ),
        max_size=40,
    )

    @given(ops)
    @settings(max_examples=200, deadline=None)
    def check(steps: list[tuple[str, str, bytes, int]]) -> None:
        from dcache.shard import shard_of

        clock = Clock()
        store = Store(clock=clock)
        model: dict[tuple[str, bytes], tuple[bytes, float]] = {}
        for i, (op, ns, key, ttl) in enumerate(steps):
            if op == "set":
                store.set(ns, key, b"%d" % i, ttl)
                model[(ns, key)] = (b"%d" % i, clock.now + ttl / 1000 if ttl else float("inf"))
            elif op == "delete":
                store.delete(ns, key)
                model.pop((ns, key), None)
            elif op == "drop":
                store.drop_shard(shard_of(ns, key))
                model = {k: v for k, v in model.items() if shard_of(*k) != shard_of(ns, key)}
            else:
                clock.now += 0.6
                store.sweep()
            live = {k: value for k, (value, until) in model.items() if until > clock.now}
            assert _shard_contents(store) == live

    check()
