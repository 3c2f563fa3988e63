"""The operations beyond get, set and delete (getmeta, add, replace, cas,
incr/decr, getdel, expire, persist), end to end: through a node that does not
own the key and through ClusterClient in a 3-node cluster over a real etcd,
under concurrent writers, refused with ``not_integer``, and from the one-shot
CLI against a `dcache serve` process, with and without a memory limit."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from support import LEASE_TTL, ServeProcess, start_node

import dcache
from dcache.client import MAX_INCR, CasResult, Entry, Operations
from dcache.localcluster import EtcdServer
from dcache.node import BoundAddresses, Node

TIMEOUT = 30  # seconds, for any one test's I/O
CLI_TIMEOUT = 20  # seconds, for one `dcache` command
MIN_INT64 = -(2**63)


# -- a 3-node cluster in this process -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    node: Node
    bound: BoundAddresses

    @property
    def node_id(self) -> str:
        return self.bound.node_id

    @property
    def address(self) -> str:
        return self.bound.client_address

    def entry(self, ns: str, key: bytes) -> tuple[bytes, int, int] | None:
        """What this node's store holds for ``key``: (value, remaining TTL in
        ms or 0 for none, version), or None; counts no hit."""
        return self.node.store.entry(ns, key)


def _settled(members: list[Member]) -> bool:
    return all(
        len(m.node.router.shard_map.members) == len(members)
        and m.node.readiness()[0] == "ready"
        and not (m.node.placement.outgoing or m.node.placement.sending)
        for m in members
    )


@pytest.fixture
async def cluster(nursery: trio.Nursery, etcd_server: EtcdServer) -> list[Member]:
    """Three nodes over etcd, each owning its shards with none on the move."""
    with trio.fail_after(TIMEOUT):
        members = [Member(*await start_node(nursery, etcd=etcd_server.endpoint, lease_ttl=LEASE_TTL)) for _ in range(3)]
        while not _settled(members):
            await trio.sleep(0.02)
    return members


def owned_elsewhere(cluster: list[Member], via: Member, ns: str, name: str) -> tuple[bytes, Member]:
    """A key named after ``name`` that a node other than ``via`` owns (by
    every node's shard map), and its owner."""
    by_id = {m.node_id: m for m in cluster}
    for i in itertools.count():
        key = f"{name}:{i}".encode()
        owners = {m.node.router.shard_map.owner(ns, key) for m in cluster}
        assert len(owners) == 1, owners  # (the nodes agree)
        [owner] = owners
        if owner != via.node_id:
            return key, by_id[owner]
    raise AssertionError("unreachable")


def forwarded(cluster: list[Member]) -> list[int]:
    return [m.node.router.counters.forwarded for m in cluster]


def ttl_within(ttl_ms: int, seconds: float, since: float) -> bool:
    """Whether ``ttl_ms`` left is what a TTL of ``seconds`` given no earlier
    than ``since`` (trio's clock, which the nodes in this process share) can
    have left now."""
    return seconds * 1000 - (trio.current_time() - since) * 1000 - 1 <= ttl_ms <= seconds * 1000


# -- every operation through a node that does not own the key -----------------------------


async def exercise(client: Operations, cluster: list[Member], via: Member, ns: str) -> int:
    """Every new operation on keys ``via`` does not own (keys of their own),
    each checked against what the owner's store holds afterwards; how many
    keyed requests were sent."""
    sent = 0

    async def call(method: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal sent
        sent += 1
        return await getattr(client, method)(*args, ns=ns, **kwargs)

    key, owner = owned_elsewhere(cluster, via, ns, f"{ns}entry{via.node_id}")
    assert via.entry(ns, key) is None and owner.entry(ns, key) is None

    # add: only where the key is missing
    v1 = await call("add", key, b"one")
    assert type(v1) is int
    assert owner.entry(ns, key) == (b"one", 0, v1)
    assert await call("add", key, b"again") is None
    assert owner.entry(ns, key) == (b"one", 0, v1)

    assert await call("get_meta", key) == Entry(b"one", v1, math.inf)

    # replace: only where the key is there
    missing, missing_owner = owned_elsewhere(cluster, via, ns, f"{ns}missing{via.node_id}")
    assert await call("replace", missing, b"x") is None
    assert missing_owner.entry(ns, missing) is None
    since = trio.current_time()
    v2 = await call("replace", key, b"two", ttl=60)
    assert v2 > v1
    value, ttl_ms, version = owner.entry(ns, key)  # type: ignore[misc]
    assert (value, version) == (b"two", v2) and ttl_within(ttl_ms, 60, since)
    meta = await call("get_meta", key)
    assert (meta.value, meta.version) == (b"two", v2) and ttl_within(round(meta.ttl * 1000), 60, since)

    # cas: only at the version given
    assert await call("cas", key, b"three", version=v1) == CasResult(False, v2)
    assert owner.entry(ns, key)[::2] == (b"two", v2)  # type: ignore[index]
    stored = await call("cas", key, b"three", version=v2)
    assert stored.stored and stored.version > v2
    assert owner.entry(ns, key) == (b"three", 0, stored.version)  # (as a set without ttl: no TTL)
    assert await call("cas", missing, b"x", version=v2) == CasResult(False, None)
    assert missing_owner.entry(ns, missing) is None

    # expire and persist: True where the key is there; a new version each
    since = trio.current_time()
    assert await call("expire", key, 30) is True
    value, ttl_ms, v3 = owner.entry(ns, key)  # type: ignore[misc]
    assert value == b"three" and v3 > stored.version and ttl_within(ttl_ms, 30, since)
    assert await call("persist", key) is True
    value, ttl_ms, v4 = owner.entry(ns, key)  # type: ignore[misc]
    assert (value, ttl_ms) == (b"three", 0) and v4 > v3
    assert await call("get_meta", key) == Entry(b"three", v4, math.inf)
    assert await call("expire", missing, 30) is False
    assert await call("persist", missing) is False
    assert missing_owner.entry(ns, missing) is None

    # getdel: the value, once
    assert await call("getdel", key) == b"three"
    assert owner.entry(ns, key) is None
    assert await call("getdel", key) is None
    assert await call("get_meta", key) is None

    # incr and decr: a missing key counts as 0; the entry keeps its TTL
    counter, counter_owner = owned_elsewhere(cluster, via, ns, f"{ns}counter{via.node_id}")
    assert await call("incr", counter) == 1
    assert await call("incr", counter, 41) == 42
    assert await call("decr", counter, 2) == 40
    assert await call("decr", counter) == 39
    assert await call("incr", counter, -50) == -11
    assert counter_owner.entry(ns, counter)[:2] == (b"-11", 0)  # type: ignore[index]
    assert await call("expire", counter, 60) is True
    _, ttl_before, version_before = counter_owner.entry(ns, counter)  # type: ignore[misc]
    assert await call("incr", counter, 11) == 0
    value, ttl_after, version_after = counter_owner.entry(ns, counter)  # type: ignore[misc]
    assert value == b"0" and 0 < ttl_after <= ttl_before and version_after > version_before

    # the connected node kept none of it
    for k in (key, missing, counter):
        assert via.entry(ns, k) is None
    return sent


@pytest.mark.parametrize("ns", ["", "tenant"])
async def test_each_operation_through_a_node_that_does_not_own_the_key(cluster: list[Member], ns: str) -> None:
    with trio.fail_after(TIMEOUT):
        for via in cluster:
            before = forwarded(cluster)
            async with dcache.connect(via.address) as client:
                sent = await exercise(client, cluster, via, ns)
            after = forwarded(cluster)
            # Every request was forwarded once, by the node it reached, and by no other.
            assert [a - b for a, b in zip(after, before)] == [sent if m is via else 0 for m in cluster]


async def test_each_operation_through_a_cluster_client(cluster: list[Member]) -> None:
    """The same through ClusterClient seeded with a node that owns none of
    the keys: each request goes straight to the owner, so none is forwarded."""
    with trio.fail_after(TIMEOUT):
        for via, ns in zip(cluster, ("", "tenant", "")):
            before = forwarded(cluster)
            async with await dcache.ClusterClient.connect(via.address) as client:
                await exercise(client, cluster, via, ns)
            assert forwarded(cluster) == before


# -- errors --------------------------------------------------------------------------------


NOT_INTEGERS = [b"hello", b"1.5", b"", b" 7", b"7 ", b"1e3", b"12abc", b"+5", b"0x10", b"1_000", "٣".encode()]


async def test_incr_on_what_is_not_a_64_bit_integer_is_refused_and_changes_nothing(cluster: list[Member]) -> None:
    via = cluster[0]
    key, owner = owned_elsewhere(cluster, via, "", "notint")
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(via.address) as client:

            async def refused(method: str, by: int, value: bytes, *, ttl: float | None = None) -> None:
                await client.set(key, value, ttl=ttl)
                before = owner.entry("", key)
                with pytest.raises(dcache.RequestError) as info:
                    await getattr(client, method)(key, by)
                assert info.value.code == "not_integer", (value, info.value)
                assert owner.entry("", key) == before, value  # value, TTL and version

            for value in NOT_INTEGERS:
                await refused("incr", 1, value)
            await refused("incr", 1, b"5" * 3000)  # (kept compressed)
            await refused("incr", 1, b"%d" % MAX_INCR)
            await refused("incr", MAX_INCR, b"1", ttl=60)
            await refused("decr", 1, b"%d" % MIN_INT64)
            await refused("decr", MAX_INCR, b"-2")

            # The edges themselves are fine.
            await client.set(key, b"-1")
            assert await client.incr(key, MAX_INCR) == MAX_INCR - 1
            assert await client.incr(key) == MAX_INCR
            assert await client.decr(key, MAX_INCR) == 0
            assert await client.decr(key, MAX_INCR) == -MAX_INCR
            assert await client.decr(key) == MIN_INT64
            assert owner.entry("", key)[0] == b"%d" % MIN_INT64  # type: ignore[index]
            with pytest.raises(ValueError):  # (beyond 64 bits: refused before it is sent)
                await client.incr(key, MAX_INCR + 1)
            assert owner.entry("", key)[0] == b"%d" % MIN_INT64  # type: ignore[index]


# -- races ---------------------------------------------------------------------------------


async def test_concurrent_incr_through_every_node_loses_no_increment(cluster: list[Member]) -> None:
    tasks, each = 50, 4
    key, owner = owned_elsewhere(cluster, cluster[0], "", "hits")
    results: list[int] = []
    with trio.fail_after(TIMEOUT):
        clients = [await dcache.Client.connect(m.address) for m in cluster]
        try:

            async def count(client: dcache.Client) -> None:
                for _ in range(each):
                    results.append(await client.incr(key))

            async with trio.open_nursery() as nursery:
                for i in range(tasks):
                    nursery.start_soon(count, clients[i % len(clients)])
            assert await clients[1].get(key) == b"%d" % (tasks * each)
        finally:
            for client in clients:
                await client.aclose()
    assert sorted(results) == list(range(1, tasks * each + 1))  # each increment saw its own total
    assert owner.entry("", key)[:2] == (b"%d" % (tasks * each), 0)  # type: ignore[index]


async def test_concurrent_cas_has_one_winner_per_version(cluster: list[Member]) -> None:
    """Tasks on every node loop get_meta → cas(value + 1) until each has won
    ``rounds`` times. Every version read is won from exactly once, the wins
    chain each version to the next, and no increment is lost."""
    tasks, rounds = 30, 3
    key, owner = owned_elsewhere(cluster, cluster[0], "", "cas")
    read: set[int] = set()
    wins: list[tuple[int, int, int]] = []  # (version read, version written, value written)
    with trio.fail_after(TIMEOUT):
        clients = [await dcache.Client.connect(m.address) for m in cluster]
        try:
            initial = await clients[0].set(key, b"0")

            async def bump(client: dcache.Client) -> None:
                won = 0
                while won < rounds:
                    entry = await client.get_meta(key)
                    read.add(entry.version)
                    value = int(entry.value) + 1
                    result = await client.cas(key, b"%d" % value, version=entry.version)
                    if result.stored:
                        wins.append((entry.version, result.version, value))
                        won += 1
                    else:
                        assert result.version is not None and result.version > entry.version

            async with trio.open_nursery() as nursery:
                for i in range(tasks):
                    nursery.start_soon(bump, clients[i % len(clients)])
            final = await clients[2].get_meta(key)
        finally:
            for client in clients:
                await client.aclose()
    total = tasks * rounds
    assert len(wins) == total
    assert sorted(value for _, _, value in wins) == list(range(1, total + 1))
    won_from = sorted(old for old, _, _ in wins)
    written = sorted(new for _, new, _ in wins)
    assert won_from == [initial, *written[:-1]]  # one winner per version, each win from the last
    assert read == set(won_from)
    assert final == Entry(b"%d" % total, written[-1], math.inf)
    assert owner.entry("", key) == (b"%d" % total, 0, written[-1])


# -- the CLI against `dcache serve` ----------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    served = ServeProcess()
    yield served
    served.stop()


def ok(r: subprocess.CompletedProcess[bytes], stdout: bytes) -> None:
    assert (r.returncode, r.stdout, r.stderr) == (0, stdout, b""), r


def found_nothing(r: subprocess.CompletedProcess[bytes], note: bytes) -> None:
    assert (r.returncode, r.stdout, r.stderr) == (1, b"", note), r


def version_of(server: ServeProcess, key: str) -> int:
    r = server.cli("get", key, "--json")
    assert r.returncode == 0, r
    version = json.loads(r.stdout)["version"]
    assert type(version) is int
    return version


def test_cli_add_replace_getdel(server: ServeProcess) -> None:
    found_nothing(server.cli("replace", "cli:ar", "x"), b"cli:ar: not found; not stored\n")
    found_nothing(server.cli("get", "cli:ar"), b"cli:ar: not found\n")
    ok(server.cli("add", "cli:ar", "first"), b"OK\n")
    found_nothing(server.cli("add", "cli:ar", "second"), b"cli:ar: exists; not stored\n")
    ok(server.cli("get", "cli:ar"), b"first")
    ok(server.cli("replace", "cli:ar", "-", stdin=b"from stdin"), b"OK\n")
    ok(server.cli("get", "cli:ar"), b"from stdin")
    r = server.cli("replace", "cli:ar", "third", "--ttl", "60", "--json")
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data == {"key": "cli:ar", "stored": True, "version": data["version"], "ttl": 60.0}
    assert data["version"] == version_of(server, "cli:ar")
    r = server.cli("add", "cli:ar", "again", "--json")
    assert (r.returncode, json.loads(r.stdout)) == (1, {"key": "cli:ar", "stored": False})
    ok(server.cli("getdel", "cli:ar"), b"third")
    found_nothing(server.cli("getdel", "cli:ar"), b"cli:ar: not found\n")
    found_nothing(server.cli("get", "cli:ar"), b"cli:ar: not found\n")
    ok(server.cli("set", "cli:gd", "bye"), b"OK\n")
    r = server.cli("getdel", "cli:gd", "--json")
    assert (r.returncode, json.loads(r.stdout)) == (0, {"key": "cli:gd", "found": True, "value": "bye"})


def test_cli_get_meta_and_json(server: ServeProcess) -> None:
    ok(server.cli("set", "cli:meta", "héllo"), b"OK\n")
    version = version_of(server, "cli:meta")
    ok(server.cli("get", "cli:meta", "--meta"), f'value\t"héllo"\nversion\t{version}\nttl\tno ttl\n'.encode())
    r = server.cli("get", "cli:meta", "--json")
    assert (r.returncode, json.loads(r.stdout)) == (
        0,
        {"key": "cli:meta", "found": True, "value": "héllo", "version": version, "ttl": None},
    )
    started = time.monotonic()
    ok(server.cli("set", "cli:meta", "-", "--ttl", "60", stdin=b"\xff\x00"), b"OK\n")
    r = server.cli("get", "cli:meta", "--meta", "--json")
    elapsed = time.monotonic() - started
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data == {
        "key": "cli:meta",
        "found": True,
        "value_base64": "/wA=",
        "version": version + 1,
        "ttl": data["ttl"],
    }
    assert 60 - elapsed - 0.001 <= data["ttl"] <= 60
    r = server.cli("get", "cli:meta", "--meta")
    assert r.returncode == 0 and r.stdout.startswith(b"value\tb'\\xff\\x00'\nversion\t%d\nttl\t" % (version + 1)), r
    found_nothing(server.cli("get", "cli:nothing", "--meta"), b"cli:nothing: not found\n")
    r = server.cli("get", "cli:nothing", "--json")
    assert (r.returncode, json.loads(r.stdout)) == (1, {"key": "cli:nothing", "found": False})


def test_cli_incr_decr(server: ServeProcess) -> None:
    ok(server.cli("incr", "cli:n"), b"1\n")
    ok(server.cli("incr", "cli:n", "41"), b"42\n")
    ok(server.cli("decr", "cli:n"), b"41\n")
    ok(server.cli("decr", "cli:n", "50"), b"-9\n")
    ok(server.cli("incr", "cli:n", "--", "-1"), b"-10\n")
    r = server.cli("incr", "cli:n", "3", "--json")
    assert (r.returncode, json.loads(r.stdout)) == (0, {"key": "cli:n", "value": -7})
    ok(server.cli("get", "cli:n"), b"-7")
    ok(server.cli("set", "cli:word", "hello"), b"OK\n")
    r = server.cli("incr", "cli:word")
    assert (r.returncode, r.stdout) == (3, b"")
    assert r.stderr.startswith(b"error: not_integer: ") and r.stderr.count(b"\n") == 1, r.stderr
    ok(server.cli("get", "cli:word"), b"hello")
    ok(server.cli("set", "cli:max", str(MAX_INCR)), b"OK\n")
    r = server.cli("incr", "cli:max", "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["error"] == "not_integer", r
    ok(server.cli("get", "cli:max"), str(MAX_INCR).encode())
    r = server.cli("incr", "cli:n", "1.5")
    assert (r.returncode, r.stdout) == (2, b"") and b"Traceback" not in r.stderr, r
    ok(server.cli("get", "cli:n"), b"-7")


def test_cli_cas(server: ServeProcess) -> None:
    ok(server.cli("set", "cli:cas", "a"), b"OK\n")
    version = version_of(server, "cli:cas")
    ok(server.cli("cas", "cli:cas", "b", "--version", str(version)), f"OK (version {version + 1})\n".encode())
    found_nothing(
        server.cli("cas", "cli:cas", "c", "--version", str(version)),
        f"cli:cas: changed since version {version} (its version is now {version + 1}); not stored\n".encode(),
    )
    ok(server.cli("get", "cli:cas"), b"b")
    r = server.cli("cas", "cli:cas", "c", "--version", str(version), "--json")
    assert (r.returncode, json.loads(r.stdout)) == (1, {"key": "cli:cas", "stored": False, "version": version + 1})
    r = server.cli("cas", "cli:cas", "--version", str(version + 1), "--json", stdin=b"d")
    assert (r.returncode, json.loads(r.stdout)) == (0, {"key": "cli:cas", "stored": True, "version": version + 2})
    ok(server.cli("get", "cli:cas"), b"d")
    found_nothing(
        server.cli("cas", "cli:nocas", "x", "--version", "1"),
        b"cli:nocas: changed since version 1 (it is missing); not stored\n",
    )
    r = server.cli("cas", "cli:cas", "x")  # (no --version)
    assert (r.returncode, r.stdout) == (2, b"") and b"--version" in r.stderr and b"Traceback" not in r.stderr, r
    ok(server.cli("get", "cli:cas"), b"d")


def test_cli_expire_and_persist(server: ServeProcess) -> None:
    ok(server.cli("set", "cli:exp", "v"), b"OK\n")
    # Read back at once (not by one more command, whose start-up may take a
    # good part of half a second), then given longer for the commands below.
    with dcache.SyncClient(server.client_address, timeout=CLI_TIMEOUT) as client:
        started = time.monotonic()
        ok(server.cli("expire", "cli:exp", "0.5"), b"OK\n")
        entry = client.get_meta("cli:exp")
        elapsed = time.monotonic() - started
        assert entry is not None and 0.5 - elapsed - 0.001 <= entry.ttl <= 0.5, (entry, elapsed)  # half a second, not 0 or 1
        assert client.expire("cli:exp", 60) is True
    ok(server.cli("persist", "cli:exp"), b"OK\n")
    ok(server.cli("ttl", "cli:exp"), b"no ttl\n")
    r = server.cli("expire", "cli:exp", "90", "--json")
    assert (r.returncode, json.loads(r.stdout)) == (0, {"key": "cli:exp", "found": True, "ttl": 90.0})
    r = server.cli("persist", "cli:exp", "--json")
    assert (r.returncode, json.loads(r.stdout)) == (0, {"key": "cli:exp", "found": True, "ttl": None})
    found_nothing(server.cli("expire", "cli:noexp", "5"), b"cli:noexp: not found\n")
    found_nothing(server.cli("persist", "cli:noexp"), b"cli:noexp: not found\n")
    for bad in ("0", "-1", "nan", "soon"):
        r = server.cli("expire", "cli:exp", bad)
        assert (r.returncode, r.stdout) == (2, b"") and b"Traceback" not in r.stderr, (bad, r)
    ok(server.cli("ttl", "cli:exp"), b"no ttl\n")


def test_cli_mset_and_mget(server: ServeProcess) -> None:
    ok(server.cli("mset", "cli:m1", "one", "cli:m2", "two"), b"OK (2 set)\n")
    ok(server.cli("mget", "cli:m1", "cli:m2"), b'cli:m1\t"one"\ncli:m2\t"two"\n')
    r = server.cli("mget", "cli:m1", "cli:m0", "cli:m2")
    assert (r.returncode, r.stdout, r.stderr) == (1, b'cli:m1\t"one"\ncli:m0\t(missing)\ncli:m2\t"two"\n', b"cli:m0: not found\n")
    r = server.cli("mget", "cli:m1", "cli:m0", "cli:m9", "--json")
    assert (r.returncode, json.loads(r.stdout)) == (
        1,
        {
            "values": [
                {"key": "cli:m1", "found": True, "value": "one"},
                {"key": "cli:m0", "found": False},
                {"key": "cli:m9", "found": False},
            ],
            "missing": ["cli:m0", "cli:m9"],
        },
    )
    assert r.stderr == b""  # (the JSON says it)
    r = server.cli("mget", "cli:m0", "cli:m1", "cli:m9")
    assert (r.returncode, r.stderr) == (1, b"2 of 3 keys not found\n")
    started = time.monotonic()
    r = server.cli("mset", "cli:m3", "three", "cli:m4", "four", "--ttl", "60", "--json")
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data == {"keys": ["cli:m3", "cli:m4"], "versions": data["versions"], "ttl": 60.0}
    assert data["versions"] == [version_of(server, "cli:m3"), version_of(server, "cli:m4")]
    r = server.cli("get", "cli:m4", "--json")
    assert 60 - (time.monotonic() - started) - 0.001 <= json.loads(r.stdout)["ttl"] <= 60
    # An odd number of words: a usage error, and nothing stored.
    r = server.cli("mset", "cli:odd1", "a", "cli:odd2")
    assert (r.returncode, r.stdout) == (2, b""), r
    assert r.stderr == b"error: mset takes pairs: KEY VALUE [KEY VALUE ...]\n"
    found_nothing(server.cli("get", "cli:odd1"), b"cli:odd1: not found\n")


# -- a memory limit ----------------------------------------------------------------------


def test_noeviction_refuses_a_write_past_the_limit() -> None:
    """1 MiB holds five values of 200,000 random (incompressible) bytes with
    their overhead, not six; the sixth is refused and stored nothing."""
    served = ServeProcess("--max-memory", "1MiB", "--eviction", "noeviction")
    try:
        values = [os.urandom(200_000) for _ in range(6)]
        for i, value in enumerate(values[:5]):
            ok(served.cli("set", f"fill:{i}", stdin=value), b"OK\n")
        r = served.cli("set", "fill:5", stdin=values[5])
        assert (r.returncode, r.stdout) == (3, b""), r
        assert r.stderr.startswith(b"error: out_of_memory: ") and r.stderr.count(b"\n") == 1, r.stderr
        r = served.cli("incr", "fill:counter")  # (a small write still fits)
        assert r.returncode == 0, r
        found_nothing(served.cli("get", "fill:5"), b"fill:5: not found\n")
        ok(served.cli("get", "fill:0"), values[0])
        stats = json.loads(served.cli("stats", "--json").stdout)
        assert (stats["keys"], stats["evicted"], stats["eviction"]) == (6, 0, "noeviction")
        assert stats["memory_bytes"] <= stats["max_memory_bytes"] == 2**20
    finally:
        served.stop()


def test_lru_takes_far_more_than_fits_and_stays_within_the_limit() -> None:
    served = ServeProcess("--max-memory", "1MiB")
    try:
        written = 0
        for batch in range(8):  # 4 MiB of random hex (compressed to no less than half)
            words = [w for i in range(50) for w in (f"lru:{batch}:{i}", os.urandom(5243).hex())]
            ok(served.cli("mset", *words), b"OK (50 set)\n")
            written += 50
        ok(served.cli("set", "lru:last", "x"), b"OK\n")
        stats = json.loads(served.cli("stats", "--json").stdout)
        assert (stats["max_memory_bytes"], stats["eviction"]) == (2**20, "lru")
        assert stats["evicted"] > 0 and stats["keys"] + stats["evicted"] == written + 1, stats
        assert stats["memory_bytes"] <= stats["max_memory_bytes"], stats
        ok(served.cli("get", "lru:last"), b"x")  # (what came last is still there)
    finally:
        served.stop()


def test_mset_of_compressible_values_that_fit_is_taken_as_set_takes_them() -> None:
    served = ServeProcess("--max-memory", "1MiB")
    try:
        ok(served.cli("set", "zeros", stdin=b"0" * 2_000_000), b"OK\n")  # twice the limit, kept compressed
        words = [w for i in range(40) for w in (f"z:{i}", "0" * 30_000)]  # 1.2 MB before compression, ~40 KB after
        ok(served.cli("mset", *words), b"OK (40 set)\n")
        stats = json.loads(served.cli("stats", "--json").stdout)
        assert (stats["keys"], stats["evicted"], stats["compressed_values"]) == (41, 0, 41)
    finally:
        served.stop()
