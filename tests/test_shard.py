"""Placement: stable across processes, even, and minimal movement on membership changes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcache import shard as shard_module
from dcache.shard import NUM_SHARDS, ShardMap, key_hash, owners, rank, shard_of

KEYS = [f"user:{i}".encode() for i in range(300)] + [os.urandom(12) for _ in range(50)]


def test_pinned_values() -> None:
    # A change of hash function would silently reshuffle every cluster's data: pin it.
    assert [shard_of("", k) for k in (b"user:1001", b"session:abc", b"a")] == [1909, 7881, 7747]
    assert key_hash("", b"a") == 0xE8B7BE43  # CRC-32 of "a"
    assert shard_of("", b"a") == 0xE8B7BE43 % NUM_SHARDS
    assert shard_of("ns", b"a") == key_hash("", b"ns\0a") % NUM_SHARDS


def test_pinned_placement() -> None:
    # Every node and cluster-aware client must place alike, whatever its version: pin owners too.
    placed = ShardMap.build(1, ["a:1", "b:1", "c:1"])
    assert [placed.owner_of_shard(s) for s in (0, 1, 2, 100, 8191)] == ["b:1", "b:1", "b:1", "c:1", "a:1"]
    assert [placed.shards_owned(m) for m in ("a:1", "b:1", "c:1")] == [2698, 2740, 2754]


def test_stable_across_processes_with_other_hash_seeds() -> None:
    keys = [k.hex() for k in KEYS]
    members = ["a:1", "b:1", "c:1"]
    code = (
        "import json, sys; from dcache.shard import shard_of, ShardMap; keys, members = json.load(sys.stdin); "
        "m = ShardMap.build(7, members); "
        "print(json.dumps([[shard_of('', bytes.fromhex(k)), m.owner('', bytes.fromhex(k))] for k in keys]))"
    )
    here = ShardMap.build(7, members)
    expected = [[shard_of("", bytes.fromhex(k)), here.owner("", bytes.fromhex(k))] for k in keys]
    for seed in ("1", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps([keys, members]),
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
        ).stdout
        assert json.loads(out) == expected


def test_keys_spread_evenly_over_shards() -> None:
    rng = random.Random(1)
    counts = Counter(shard_of("", f"key:{rng.getrandbits(48)}".encode()) for _ in range(200_000))
    # ~24.4 keys per shard; with a uniform hash the emptiest and fullest stay within a few sigma.
    assert len(counts) == NUM_SHARDS
    assert min(counts.values()) >= 5 and max(counts.values()) <= 55
    sequential = Counter(shard_of("", f"user:{i}".encode()) // 1024 for i in range(80_000))
    assert max(sequential.values()) / min(sequential.values()) < 1.1


def test_shards_spread_evenly_over_members() -> None:
    for n in (3, 5):
        members = [f"10.0.0.{i}:47000" for i in range(n)]
        counts = Counter(owners(members))
        expected = NUM_SHARDS / n
        assert all(abs(c - expected) / expected < 0.06 for c in counts.values()), counts


def test_adding_a_member_moves_only_its_share_to_it() -> None:
    before = owners(["a:1", "b:1", "c:1"])
    after = owners(["a:1", "b:1", "c:1", "d:1"])
    moved = [s for s in range(NUM_SHARDS) if before[s] != after[s]]
    assert all(after[s] == "d:1" for s in moved)
    assert abs(len(moved) - NUM_SHARDS / 4) / (NUM_SHARDS / 4) < 0.06


def test_removing_a_member_moves_only_its_shards() -> None:
    before = owners(["a:1", "b:1", "c:1"])
    after = owners(["a:1", "c:1"])
    for s in range(NUM_SHARDS):
        if before[s] != "b:1":
            assert after[s] == before[s]
        else:
            assert after[s] in ("a:1", "c:1")


def test_shard_map_is_order_independent_and_ranks_owner_first() -> None:
    one = ShardMap.build(3, ["c:1", "a:1", "b:1", "a:1"])
    two = ShardMap.build(3, ["b:1", "c:1", "a:1"])
    assert one == two and one.members == ("a:1", "b:1", "c:1")
    for shard in range(0, NUM_SHARDS, 97):
        assert rank(shard, one.members)[0] == one.owner_of_shard(shard)
    assert sum(one.shards_owned(m) for m in one.members) == NUM_SHARDS
    groups = one.group_by_owner("", KEYS)
    assert sorted(i for positions in groups.values() for i in positions) == list(range(len(KEYS)))
    for owner, positions in groups.items():
        assert all(one.owner("", KEYS[i]) == owner for i in positions)
    assert ShardMap.build(0, []).shard_owners == ()


def test_sans_io_cores_import_no_io_layer() -> None:
    code = (
        "import sys; import dcache.codec, dcache.wsframe, dcache.shard, dcache.store; "
        "print(sorted(m for m in ('trio', 'socket', 'dcache.transport', 'dcache.node') if m in sys.modules))"
    )
    # dcache/__init__ imports the client (and so trio) for the public API; load the cores without it.
    loader = (
        "import importlib.util, sys, types, pathlib; "
        "pkg = types.ModuleType('dcache'); pkg.__path__ = [str(pathlib.Path('dcache').resolve())]; "
        "pkg.__version__ = '0'; sys.modules['dcache'] = pkg; "
    )
    out = subprocess.run(
        [sys.executable, "-c", loader + code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.stdout.strip() == "[]"


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.sets(st.sampled_from(["a:1", "b:1", "c:1", "d:1", "e:1", "10.0.0.1:47000"]), max_size=5), min_size=1, max_size=4),
    st.sampled_from([1, 2, 3]),
)
def test_a_changed_map_is_the_map_built_afresh(views: list[set[str]], copies: int) -> None:
    """Whatever joins and leaves, in whatever steps: a map changed step by
    step places every shard, and its replicas, exactly as a map built for
    the last view."""
    placed = ShardMap.build(0, [], copies)
    for epoch, members in enumerate(views, 1):
        placed = placed.changed(epoch, members)
        built = ShardMap.build(epoch, members, copies)
        assert placed == built and placed.weights == built.weights and placed.ranked_weights == built.ranked_weights


def test_replicas_are_the_members_ranked_next() -> None:
    members = ["a:1", "b:1", "c:1", "d:1"]
    for copies in (2, 3):
        placed = ShardMap.build(1, members, copies)
        assert placed.shard_owners == ShardMap.build(1, members).shard_owners
        for shard in (0, 1, 4097, NUM_SHARDS - 1):
            ranked = rank(shard, members)
            assert placed.owner_of_shard(shard) == ranked[0]
            assert placed.replicas_of(shard) == tuple(ranked[1:copies])
    assert ShardMap.build(1, ["a:1"], 3).replicas_of(5) == ()  # fewer members than copies
    assert ShardMap.build(1, members).replicas_of(5) == ()


def test_a_change_weighs_only_what_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A view change at 50 members weighs the member that joined, or each
    member for the shards of the one that left: never all 50 for all shards."""
    members = [f"10.0.0.{i}:47000" for i in range(50)]
    placed = ShardMap.build(1, members)
    weighed: list[str] = []
    weigher = shard_module._weigher

    def counted(member: str):  # type: ignore[no-untyped-def]
        weighed.append(member)
        return weigher(member)

    monkeypatch.setattr(shard_module, "_weigher", counted)
    joined = placed.changed(2, [*members, "10.0.1.1:47000"])
    assert weighed == ["10.0.1.1:47000"]
    weighed.clear()
    left = joined.changed(3, members[1:] + ["10.0.1.1:47000"])
    assert len(weighed) == 50  # one keyed state per remaining member, for the leaver's shards only
    assert left == ShardMap.build(3, members[1:] + ["10.0.1.1:47000"])
    assert joined == ShardMap.build(2, [*members, "10.0.1.1:47000"])
