"""Entries move with their shards, proved under load: `dcache serve`
processes over a real etcd, writers and readers running while a node joins
and another is stopped with SIGTERM; afterwards every acknowledged write is
checked."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import trio
from support import dcache_cli, kill_all, serve

import dcache
from dcache.errors import RequestError
from dcache.localcluster import EtcdServer, free_port, wait_until_serving

TIMEOUT = 90
WRITERS = 6
READERS = 4
KEYS_PER_WRITER = 8
BULK = 20_000  # entries written before the load, so that each move carries some


class Load:
    """Writers that each own their keys and write increasing versions, and
    readers that check no read is older than a write acknowledged before it."""

    def __init__(self, clients: list[dcache.Client]) -> None:
        self.clients = clients
        self.acked: dict[str, int] = {}  # key → the newest version acknowledged
        self.tried: dict[str, int] = {}  # key → the newest version sent
        self.ops = 0
        self.errors: Counter[str] = Counter()
        self.stale: list[str] = []
        self.done = trio.Event()

    async def write(self, n: int) -> None:
        keys = [f"w{n}:{j}" for j in range(KEYS_PER_WRITER)]
        version = 0
        while not self.done.is_set():
            version += 1
            for key in keys:
                self.tried[key] = version
                try:
                    await random.choice(self.clients).set(key, str(version))
                except RequestError as exc:
                    self.errors[exc.code] += 1
                    await trio.sleep(0.01)  # as a client would, before trying again
                    continue
                self.acked[key] = version
                self.ops += 1

    async def read(self) -> None:
        while not self.done.is_set():
            if not self.acked:
                await trio.sleep(0.01)
                continue
            key = random.choice(list(self.acked))
            floor = self.acked[key]
            try:
                value = await random.choice(self.clients).get(key)
            except RequestError as exc:
                self.errors[exc.code] += 1
                await trio.sleep(0.01)
                continue
            self.ops += 1
            if value is None or int(value) < floor:
                self.stale.append(f"{key}: read {value!r} after version {floor} was acknowledged")

    def start(self, nursery: trio.Nursery) -> None:
        for n in range(WRITERS):
            nursery.start_soon(self.write, n)
        for _ in range(READERS):
            nursery.start_soon(self.read)

    async def verify(self, client: dcache.Client) -> int:
        """Read back every key written: each holds a version acknowledged or
        sent since; how many keys."""
        for key, acked in self.acked.items():
            value = await client.get(key)
            assert value is not None, f"{key}: version {acked} was acknowledged, and the key is gone"
            assert acked <= int(value) <= self.tried[key], (key, acked, value)
        return len(self.acked)


async def _load_bulk(client: dcache.Client) -> None:
    """BULK entries with an hour's TTL, written before the load so that each move carries some."""
    for start in range(0, BULK, 1000):
        await client.mset({f"bulk:{i}": f"b{i}" for i in range(start, start + 1000)}, ttl=3600)


async def _verify_bulk(client: dcache.Client) -> int:
    """Read back what :func:`_load_bulk` wrote; how many keys."""
    for start in range(0, BULK, 1000):
        keys = [f"bulk:{i}" for i in range(start, start + 1000)]
        assert await client.mget(keys) == [f"b{i}".encode() for i in range(start, start + 1000)]
    return BULK


async def _members(address: str) -> list[dict[str, object]]:
    r = await trio.to_thread.run_sync(dcache_cli, "members", "--json", "--server", address)
    return json.loads(r.stdout)["members"] if r.returncode == 0 else []  # type: ignore[no-any-return]


async def _serving(nodes: list[tuple[subprocess.Popen[bytes], str, str]]) -> None:
    for _, address, _ in nodes:
        assert await trio.to_thread.run_sync(wait_until_serving, address, 15)


async def _wait_for(address: str, count: int) -> None:
    """Until the node at ``address`` sees ``count`` members, every one ready."""
    while True:
        members = await _members(address)
        if len(members) == count and all(m["state"] == "ready" for m in members):
            return
        await trio.sleep(0.1)


@pytest.mark.parametrize("replicas", [1, 2])
async def test_no_acknowledged_write_is_lost_while_a_node_joins_and_another_leaves(
    etcd_server: EtcdServer, replicas: int
) -> None:
    nodes = [serve(etcd_server.endpoint, "--replicas", str(replicas)) for _ in range(3)]
    try:
        await _serving(nodes)
        with trio.fail_after(TIMEOUT):
            await _wait_for(nodes[0][1], 3)
            # The load goes through the two nodes that stay; every request
            # whose key moves is forwarded to the nodes that join and leave.
            async with dcache.connect(nodes[0][1]) as first, dcache.connect(nodes[1][1]) as second:
                await _load_bulk(first)
                load = Load([first, second])
                async with trio.open_nursery() as nursery:
                    load.start(nursery)
                    await trio.sleep(1.0)
                    ops_before = load.ops

                    started = time.monotonic()
                    nodes.append(serve(etcd_server.endpoint, "--replicas", str(replicas)))
                    await _wait_for(nodes[0][1], 4)
                    joined_in = time.monotonic() - started
                    await trio.sleep(1.0)

                    leaving = nodes[2][0]
                    started = time.monotonic()
                    leaving.send_signal(signal.SIGTERM)
                    status = await trio.to_thread.run_sync(leaving.wait, 30)
                    left_in = time.monotonic() - started
                    await _wait_for(nodes[0][1], 3)
                    await trio.sleep(1.0)
                    load.done.set()
                assert status == 0

                verified = await load.verify(first) + await _verify_bulk(second)
                assert 3500 < await second.ttl("bulk:7") <= 3600  # the TTL moved with it
        print(
            f"\nrebalance under load, --replicas {replicas}: {load.ops} ops ({ops_before} before the join), "
            f"errors {dict(load.errors) or 'none'}, {verified} keys verified, "
            f"a fourth node ready in {joined_in:.2f} s, a node stopped by SIGTERM gone in {left_in:.2f} s"
        )
        assert load.stale == []
        assert set(load.errors) <= {"unavailable"}, load.errors
        assert verified == WRITERS * KEYS_PER_WRITER + BULK
    finally:
        kill_all(nodes)


async def test_no_acknowledged_write_is_lost_when_a_node_is_killed_with_two_replicas(etcd_server: EtcdServer) -> None:
    """kill -9 of one node of three under load, with --replicas 2: its
    shards are served at once by their replicas when its lease lapses, and
    every acknowledged write is there afterwards."""
    nodes = [serve(etcd_server.endpoint, "--replicas", "2") for _ in range(3)]
    try:
        await _serving(nodes)
        with trio.fail_after(TIMEOUT):
            await _wait_for(nodes[0][1], 3)
            async with dcache.connect(nodes[0][1]) as first, dcache.connect(nodes[1][1]) as second:
                await _load_bulk(first)
                load = Load([first, second])
                async with trio.open_nursery() as nursery:
                    load.start(nursery)
                    await trio.sleep(1.0)
                    ops_before = load.ops
                    started = time.monotonic()
                    nodes[2][0].kill()
                    await _wait_for(nodes[0][1], 2)  # (ready: the copies are made again, on the two left)
                    ready_in = time.monotonic() - started
                    await trio.sleep(1.0)
                    load.done.set()
                verified = await load.verify(first) + await _verify_bulk(second)
                stats = [(await client.stats()) for client in (first, second)]
        print(
            f"\nkill -9 under load, --replicas 2: {load.ops} ops ({ops_before} before the kill), "
            f"errors {dict(load.errors) or 'none'}, {verified} keys verified, "
            f"shards served from copies {sum(s['shards_failed_over'] for s in stats)}, "
            f"both nodes left ready with every copy made again {ready_in:.2f} s after the kill"
        )
        assert load.stale == []
        assert set(load.errors) <= {"unavailable"}, load.errors
        assert verified == WRITERS * KEYS_PER_WRITER + BULK
    finally:
        kill_all(nodes)


async def test_a_hung_replica_costs_writes_an_error_not_their_copy(etcd_server: EtcdServer) -> None:
    """SIGSTOP of one node of three under load, with --replicas 2: writes of
    the shards it owns or keeps copies of are refused (unavailable) until
    its lease lapses, never acknowledged without their copy; the others go
    on. It comes back (SIGCONT), drops what it held, rejoins and gets its
    shards and copies again. Then the node that owned most keys meanwhile is
    killed with -9: every acknowledged write is still there."""
    nodes = [serve(etcd_server.endpoint, "--replicas", "2") for _ in range(3)]
    try:
        await _serving(nodes)
        with trio.fail_after(TIMEOUT):
            await _wait_for(nodes[0][1], 3)
            async with dcache.connect(nodes[0][1]) as first, dcache.connect(nodes[1][1]) as second:
                load = Load([first, second])
                async with trio.open_nursery() as nursery:
                    load.start(nursery)
                    await trio.sleep(1.0)
                    hung = nodes[2][0]
                    hung.send_signal(signal.SIGSTOP)
                    await trio.sleep(3 * 2.0)  # three leases
                    ops_while_hung = load.ops
                    hung.send_signal(signal.SIGCONT)
                    started = time.monotonic()
                    await _wait_for(nodes[0][1], 3)
                    back_in = time.monotonic() - started
                    await trio.sleep(1.0)
                    hung.kill()  # it got its shards back, and their copies were made: nothing may be lost
                    await _wait_for(nodes[0][1], 2)
                    await trio.sleep(0.5)
                    load.done.set()
                verified = await load.verify(first)
        print(
            f"\na hung replica, --replicas 2: {load.ops} ops ({ops_while_hung} by the end of the pause), "
            f"errors {dict(load.errors) or 'none'}, {verified} keys verified after a kill -9 that followed, "
            f"every node ready {back_in:.2f} s after SIGCONT"
        )
        assert load.stale == []
        assert set(load.errors) <= {"unavailable"}, load.errors
        assert verified == WRITERS * KEYS_PER_WRITER
    finally:
        for proc, _, _ in nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        kill_all(nodes)


def test_drain_hands_a_nodes_entries_over_and_stops_it(etcd_server: EtcdServer) -> None:
    """`dcache drain HOST:PORT`: the node hands every shard over, says what
    it moved, leaves and exits; every key reads back from the others."""
    nodes = [serve(etcd_server.endpoint) for _ in range(3)]
    try:
        for _, address, _ in nodes:
            assert wait_until_serving(address, 15)
        deadline = time.monotonic() + 15
        while (
            len(json.loads(dcache_cli("members", "--json", "--server", nodes[0][1]).stdout or b'{"members": []}')["members"]) != 3
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with dcache.SyncClient(nodes[0][1]) as client:
            client.mset({f"k{i}": f"v{i}" for i in range(3000)})
            r = dcache_cli("drain", nodes[2][1], "--json")
            assert r.returncode == 0, r.stderr
            report = json.loads(r.stdout)
            assert report["shards_moved"] > 2000 and report["entries_moved"] > 500, report
            assert report["entries_left_behind"] == 0
            assert nodes[2][0].wait(15) == 0
            assert client.mget([f"k{i}" for i in range(3000)]) == [f"v{i}".encode() for i in range(3000)]
        r = dcache_cli("drain", f"127.0.0.1:{free_port()}")
        assert r.returncode == 2 and r.stderr.startswith(b"error: cannot connect")  # nothing there: a clear error
    finally:
        kill_all(nodes)


def test_drain_refuses_a_standalone_node() -> None:
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcache", "serve", "--client-listen", address, "--listen", f"127.0.0.1:{free_port()}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until_serving(address, 15)
        r = dcache_cli("drain", address)
        assert r.returncode == 3 and b"standalone" in r.stderr, r.stderr
        assert dcache_cli("ping", "--server", address).returncode == 0  # and it serves on
    finally:
        proc.kill()
        proc.wait(10)


async def test_no_acknowledged_write_is_lost_while_etcd_is_stopped_for_ten_seconds(etcd_server: EtcdServer) -> None:
    """etcd stopped for 10 s (five leases long) under the same load: keyed
    requests may be refused as unavailable meanwhile, never answered with an
    older value, and every acknowledged write is there afterwards."""
    nodes = [serve(etcd_server.endpoint) for _ in range(3)]
    try:
        await _serving(nodes)
        with trio.fail_after(TIMEOUT):
            await _wait_for(nodes[0][1], 3)
            async with dcache.connect(nodes[0][1]) as first, dcache.connect(nodes[1][1]) as second:
                load = Load([first, second])
                async with trio.open_nursery() as nursery:
                    load.start(nursery)
                    await trio.sleep(1.0)
                    await trio.to_thread.run_sync(etcd_server.stop)
                    await trio.sleep(10)
                    ops_during = load.ops
                    await trio.to_thread.run_sync(etcd_server.start)
                    started = time.monotonic()
                    await _wait_for(nodes[0][1], 3)
                    back_in = time.monotonic() - started
                    while True:  # until writes are taken again
                        before = load.ops
                        await trio.sleep(0.5)
                        if load.ops > before + 100:
                            break
                    load.done.set()
                verified = await load.verify(first)
        print(
            f"\netcd stopped for 10 s under load: {load.ops} ops ({ops_during} by the end of the outage), "
            f"errors {dict(load.errors) or 'none'}, {verified} keys verified, every node ready {back_in:.2f} s after etcd was back"
        )
        assert load.stale == []
        assert set(load.errors) <= {"unavailable"}, load.errors
        assert verified == WRITERS * KEYS_PER_WRITER
    finally:
        kill_all(nodes)
