"""Clusters of real nodes over a real etcd: in-process and as `dcache serve` subprocesses."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
import trio
from support import LEASE_TTL, alive, children, consecutive_free_ports, dcache_cli, http_get, serve

import dcache
from dcache.codec import ErrorCode
from dcache.localcluster import EtcdServer, free_port, wait_until_serving
from dcache.node import BoundAddresses, Node, NodeConfig
from dcache.shard import ShardMap

TIMEOUT = 30


class InProcessNode:
    def __init__(self, node: Node, bound: BoundAddresses, scope: trio.CancelScope) -> None:
        self.node = node
        self.bound = bound
        self.scope = scope

    @property
    def address(self) -> str:
        return self.bound.client_address

    def stop(self) -> None:
        self.scope.cancel()


class Withheld:
    """In place of a router's Waiting: a reply held back until ``released``
    is set, as a stopped process would hold it."""

    def __init__(self, reply: bytes | None, released: trio.Event) -> None:
        self.reply = reply
        self.released = released

    async def finish(self) -> bytes | None:
        await self.released.wait()
        return self.reply

    def owners(self) -> list[str]:
        return []

    def notify(self, done: object) -> None:
        return None  # finished by a task


async def _scoped(node: Node, *, task_status: trio.TaskStatus[InProcessNode]) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            bound = await inner.start(node.run)
            task_status.started(InProcessNode(node, bound, scope))


async def wait_for_members(nodes: list[InProcessNode], count: int) -> None:
    while not all(len(n.node.router.shard_map.members) == count for n in nodes):
        await trio.sleep(0.05)


@pytest.fixture
async def cluster(nursery: trio.Nursery, etcd_server: EtcdServer) -> AsyncIterator[list[InProcessNode]]:
    nodes = []
    for _ in range(3):
        node = Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0", etcd=etcd_server.endpoint, lease_ttl=LEASE_TTL))
        nodes.append(await nursery.start(_scoped, node))
    with trio.fail_after(TIMEOUT):
        await wait_for_members(nodes, 3)
        await wait_ready(nodes)  # (no shard on its way anywhere: no handoff or claim beside what a test does)
    yield nodes


async def test_any_node_serves_every_key(cluster: list[InProcessNode]) -> None:
    with trio.fail_after(TIMEOUT):
        clients = [await dcache.Client.connect(n.address) for n in cluster]
        keys = [f"user:{i}" for i in range(300)]
        for i, key in enumerate(keys):
            await clients[i % 3].set(key, f"value {i}")
        for client in clients:
            assert await client.mget(keys) == [f"value {i}".encode() for i in range(300)]
            for key in keys[:30]:
                assert await client.get(key) is not None
        counts = [len(n.node.store) for n in cluster]
        assert sum(counts) == 300
        assert all(c > 50 for c in counts), counts  # spread over every node
        for client in clients:
            await client.aclose()


async def test_members_and_cluster_stats(cluster: list[InProcessNode]) -> None:
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[0].address) as client:
            await client.mset({f"k{i}": "v" for i in range(90)})
            await client.mget([f"k{i}" for i in range(100)])
            view = await client.members()
        assert len(view["members"]) == 3
        assert {m["client"] for m in view["members"]} == {n.address for n in cluster}
        assert all(m["state"] == "up" for m in view["members"])
        assert sum(m["shards"] for m in view["members"]) == 8192
        assert sum(m["stats"]["keys"] for m in view["members"]) == 90
        assert sum(m["stats"]["hits"] for m in view["members"]) == 90
        assert sum(m["stats"]["misses"] for m in view["members"]) == 10
        assert view["epoch"] == cluster[0].node.router.shard_map.epoch > 0


async def test_nodes_outlive_etcd_losing_their_entries(cluster: list[InProcessNode], etcd_server: EtcdServer) -> None:
    """Entries deleted from etcd (by hand, or by a node that ran with another's
    --advertise) come back, and no node crashes, not even on a view with no
    member at all. (Entries of shards that moved meanwhile are dropped, as
    on any membership change.)"""
    import etcd3

    from dcache.membership import members_prefix

    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[0].address) as client:
            await client.mset({f"k{i}": "v" for i in range(300)})
            etcd = etcd3.client("127.0.0.1", etcd_server.client_port)
            # One node's entry, then every entry (the view is empty for a moment).
            for prefix in (members_prefix("default") + cluster[1].node.node_id, members_prefix("default")):
                deleted = await trio.to_thread.run_sync(etcd.delete_prefix, prefix)
                assert deleted.deleted >= 1
                await trio.sleep(0.5)
                await wait_for_members(cluster, 3)
            await client.mset({f"k{i}": "w" for i in range(300)})
            assert await client.mget([f"k{i}" for i in range(300)]) == [b"w"] * 300
            assert sum(len(n.node.store) for n in cluster) == 300


async def test_a_node_leaving_moves_its_shards(cluster: list[InProcessNode]) -> None:
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[0].address) as client:
            await client.mset({f"k{i}": "v" for i in range(300)})
            leaving = cluster[2]
            lost = len(leaving.node.store)
            leaving.stop()  # revokes its lease: the others see it go at once
            survivors = cluster[:2]
            await wait_for_members(survivors, 2)
            values = await client.mget([f"k{i}" for i in range(300)])
            assert values.count(None) == lost
            # Every key works again, including the departed node's shards.
            await client.mset({f"k{i}": "w" for i in range(300)})
            assert await client.mget([f"k{i}" for i in range(300)]) == [b"w"] * 300
            shard_map = survivors[0].node.router.shard_map
            assert shard_map.members == tuple(sorted(n.bound.node_id for n in survivors))


async def test_forwarded_requests_never_hop_twice(cluster: list[InProcessNode]) -> None:
    from dcache import codec, transport

    a, b, _ = cluster
    shard_map: ShardMap = a.node.router.shard_map
    key = next(f"k{i}".encode() for i in range(10000) if shard_map.owner("", f"k{i}".encode()) != a.bound.node_id)
    with trio.fail_after(TIMEOUT):
        conn = await transport.connect(a.bound.peer_address, max_message=1 << 20, default_port=0)
        await conn.send(codec.encode_frame([[0, "hello", {"version": 1, "peer": b.bound.node_id}], [1, "get", {"key": key}]]))
        replies = []
        while len(replies) < 2:
            for payload in await conn.receive():
                replies.extend(codec.decode_frame(payload, codec.Limits()))
        await conn.aclose()
    assert replies[1][1] == 1 and replies[1][2][0] == ErrorCode.MOVED
    assert replies[1][2][2]["epoch"] == shard_map.epoch


async def test_a_frozen_owner_fails_forwards_promptly_and_the_link_recovers(
    cluster: list[InProcessNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcache import peers

    monkeypatch.setattr(peers, "PING_INTERVAL", 0.1)  # how often the keep-alive task looks
    a, b, _ = cluster
    shard_map: ShardMap = a.node.router.shard_map
    key = next(f"k{i}" for i in range(10000) if shard_map.owner("", f"k{i}".encode()) == b.bound.node_id)
    thawed = trio.Event()
    place = b.node.router.place

    def frozen(session, payloads):  # type: ignore[no-untyped-def]
        reply, waiting = place(session, payloads)
        if session.peer_id:  # answers nothing to peers, as a stopped process would
            return None, Withheld(reply, thawed)
        return reply, waiting

    with trio.fail_after(TIMEOUT):
        async with dcache.connect(a.address) as client:
            await client.set(key, "before")
            monkeypatch.setattr(b.node.router, "place", frozen)
            started = trio.current_time()
            with pytest.raises(dcache.RequestError) as caught:
                await client.get(key)
            assert caught.value.code == ErrorCode.UNAVAILABLE
            # The link's keep-alive task gave up on it: no cancel scope per request.
            assert peers.REQUEST_TIMEOUT <= trio.current_time() - started < peers.REQUEST_TIMEOUT + 1
            monkeypatch.setattr(b.node.router, "place", place)
            thawed.set()
            while True:  # the link reconnects by itself
                try:
                    assert await client.get(key) == b"before"
                    break
                except dcache.RequestError as exc:
                    assert exc.code == ErrorCode.UNAVAILABLE
                    await trio.sleep(0.05)


async def test_etcd_outage_keeps_nodes_serving(nursery: trio.Nursery, etcd_server: EtcdServer) -> None:
    """An outage shorter than the lease (an etcd restart) costs no request."""
    lease_ttl = 15.0  # long enough that the lease surely outlives the outage, however slow the machine
    cluster = []
    for _ in range(3):
        node = Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0", etcd=etcd_server.endpoint, lease_ttl=lease_ttl))
        cluster.append(await nursery.start(_scoped, node))
    with trio.fail_after(TIMEOUT):
        await wait_for_members(cluster, 3)
        async with dcache.connect(cluster[1].address) as client:
            await client.mset({f"k{i}": "v" for i in range(50)})
            await trio.to_thread.run_sync(etcd_server.stop)
            await trio.sleep(1)
            # The last view stands: every key still served through any node.
            assert await client.mget([f"k{i}" for i in range(50)]) == [b"v"] * 50
            await client.set("during-outage", "yes")
            await trio.to_thread.run_sync(etcd_server.start)
            await wait_for_members(cluster, 3)
            # Registered again: the view lists all three once more.
            while len((await client.members())["members"]) != 3:
                await trio.sleep(0.1)
            assert await client.get("during-outage") == b"yes"


async def test_unreachable_etcd_at_start_fails_fast() -> None:
    node = Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0", etcd=f"http://127.0.0.1:{free_port()}"))
    from dcache.node import NodeStartError

    started = trio.current_time()
    with trio.fail_after(TIMEOUT):
        with pytest.raises(BaseException) as info:
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
    assert (
        info.group_contains(NodeStartError)
        if isinstance(info.value, BaseExceptionGroup)
        else isinstance(info.value, NodeStartError)
    )
    assert trio.current_time() - started < 10


# -- subprocesses ---------------------------------------------------------------


def test_kill_9_a_node_and_the_survivors_recover(etcd_server: EtcdServer) -> None:
    nodes = [serve(etcd_server.endpoint) for _ in range(3)]
    try:
        for _, client, _ in nodes:
            assert wait_until_serving(client, 15)
        deadline = time.monotonic() + 15
        while json.loads(dcache_cli("members", "--json", "--server", nodes[0][1]).stdout)["members"].__len__() != 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with dcache.SyncClient(nodes[0][1]) as c:
            c.mset({f"k{i}": "v" for i in range(100)})
        victim = nodes[2][0]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        # Within lease TTL + 2 s every get and set through the survivors works.
        recovered = None
        while time.monotonic() - killed_at < LEASE_TTL + 2:
            try:
                for _, client, _ in nodes[:2]:
                    with dcache.SyncClient(client, timeout=2) as c:
                        c.mset({f"k{i}": "after" for i in range(100)})
                        assert c.mget([f"k{i}" for i in range(100)]) == [b"after"] * 100
                recovered = time.monotonic() - killed_at
                break
            except dcache.RequestError as exc:
                assert exc.code == ErrorCode.UNAVAILABLE
                time.sleep(0.1)
        assert recovered is not None, "survivors did not recover within lease TTL + 2 s"
        r = dcache_cli("members", "--json", "--server", nodes[1][1])
        assert len(json.loads(r.stdout)["members"]) == 2
        r = dcache_cli("stats", "--cluster", "--json", "--server", nodes[0][1])
        stats = json.loads(r.stdout)
        assert stats["total"]["keys"] == sum(n["keys"] for n in stats["nodes"])
    finally:
        for proc, _, _ in nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in nodes:
            proc.wait(10)
    # Survivors stopped cleanly on SIGTERM.
    assert [p.returncode for p, _, _ in nodes[:2]] == [0, 0]


def test_serve_with_unreachable_etcd_is_a_clear_error() -> None:
    started = time.monotonic()
    r = dcache_cli(
        "serve", "--etcd", f"http://127.0.0.1:{free_port()}", "--listen", "127.0.0.1:0", "--client-listen", "127.0.0.1:0"
    )
    assert r.returncode == 2
    assert b"Traceback" not in r.stderr and b"etcd" in r.stderr
    assert time.monotonic() - started < 15


def test_cluster_up_runs_etcd_and_nodes_and_stops_them() -> None:
    nodes = 2
    client, peer, metrics = (consecutive_free_ports(nodes) for _ in range(3))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcache", "cluster", "up", "--nodes", str(nodes), "--client-port", str(client),
         "--peer-port", str(peer), "--metrics-port", str(metrics), "--replicas", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        addresses = [f"localhost:{client + i}" for i in range(nodes)]
        for address in addresses:
            assert wait_until_serving(address, 30)
        deadline = time.monotonic() + 15
        while True:
            members = json.loads(dcache_cli("members", "--json", "--server", addresses[0]).stdout)["members"]
            if len(members) == nodes and all(m["state"] == "ready" for m in members):
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert all(m["shards_under_replicated"] == 0 for m in members)
        assert dcache_cli("set", "user:1001", "Alice", "--server", addresses[0]).returncode == 0
        assert dcache_cli("get", "user:1001", "--server", addresses[1]).stdout == b"Alice"
        stats = [json.loads(dcache_cli("stats", "--json", "--server", address).stdout) for address in addresses]
        assert [s["keys"] for s in stats] == [1, 1] and [s["replicas"] for s in stats] == [2, 2]  # on both nodes
        plain = dcache_cli("stats", "--server", addresses[0]).stdout
        assert b"\nreplicas\t2\n" in plain and b"\nshards_under_replicated\t0\n" in plain
        import urllib.request

        with urllib.request.urlopen(f"http://localhost:{metrics + 1}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert "dcache_members 2.0" in text and "dcache_ops_total" in text
        assert "dcache_shards_under_replicated 0.0" in text and "dcache_replicated_writes_total" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert f"localhost:{client}".encode() in out
    assert b"cluster stopped" in err
    # Every node it started is gone.
    for i in range(nodes):
        assert dcache_cli("ping", "--server", f"localhost:{client + i}", "--timeout", "1").returncode == 2


def test_cluster_up_killed_at_once_by_a_second_ctrl_c() -> None:
    nodes = 2
    client, peer = consecutive_free_ports(nodes), consecutive_free_ports(nodes)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcache", "cluster", "up", "--nodes", str(nodes), "--client-port", str(client),
         "--peer-port", str(peer), "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    started: dict[int, bytes] = {}
    try:
        for i in range(nodes):
            assert wait_until_serving(f"localhost:{client + i}", 30)
        started = children(proc.pid)
        assert len(started) == nodes + 1  # and etcd
        [stuck] = [pid for pid, cmdline in started.items() if f"localhost:{client}".encode() in cmdline.split(b"\0")]
        # A node that ignores SIGTERM (stopped here) makes the graceful stop wait; the second Ctrl-C must not.
        os.kill(stuck, signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
    finally:
        try:
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
            left = [pid for pid, cmdline in started.items() if alive(pid, cmdline)]
            for pid in left:  # never leave a stopped node behind, even on failure
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert b"cluster stopped" in err
    # Nothing it started is left: neither the stuck node, nor the other, nor etcd.
    assert left == []


async def test_a_node_whose_lease_lapsed_forgets_what_it_held(cluster: list[InProcessNode], etcd_server: EtcdServer) -> None:
    """While its lease was gone the others owned its shards and may have
    written its keys; it must not serve what it held before, even if it never
    saw a view without itself (paused, its watch events came all at once)."""
    import etcd3

    node = cluster[1].node
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[0].address) as client:
            await client.mset({f"k{i}": "old" for i in range(200)})
        assert len(node.store) > 0
        apply = node._apply_view
        node._apply_view = lambda view: apply(view) if any(m.node_id == node.node_id for m in view.members) else None  # type: ignore[method-assign]
        assert node.membership is not None and node.membership._lease is not None
        etcd = etcd3.client("127.0.0.1", etcd_server.client_port)
        await trio.to_thread.run_sync(etcd.revoke_lease, node.membership._lease.id)
        while len(node.store):
            await trio.sleep(0.05)
        await wait_for_members(cluster, 3)


async def test_a_second_node_with_the_same_advertise_address_is_refused(
    cluster: list[InProcessNode], etcd_server: EtcdServer
) -> None:
    taken = cluster[0].node.node_id
    twin = Node(
        NodeConfig(
            client_listen="127.0.0.1:0", listen="127.0.0.1:0", advertise=taken, etcd=etcd_server.endpoint, lease_ttl=LEASE_TTL
        )
    )
    with trio.fail_after(TIMEOUT):
        with pytest.raises(BaseException) as refused:  # noqa: PT011 (NodeStartError, as trio hands it on)
            async with trio.open_nursery() as nursery:
                await nursery.start(twin.run)
        assert "give each node its own --advertise address" in str(refused.value) + repr(refused.value)
        # The first node with that address is untouched.
        await wait_for_members(cluster, 3)
        async with dcache.connect(cluster[0].address) as client:
            await client.set("k", "v")
            assert await client.get("k") == b"v"


async def test_a_live_node_holding_an_advertise_address_is_told_apart_by_its_refreshed_lease(
    nursery: trio.Nursery, etcd_server: EtcdServer
) -> None:
    """The twin sees the holder's lease refreshed (every third of its TTL)
    and stops then, not after waiting out a lease as long as its own."""
    first = await nursery.start(
        _scoped, Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0", etcd=etcd_server.endpoint, lease_ttl=5))
    )
    twin = Node(
        NodeConfig(
            client_listen="127.0.0.1:0",
            listen="127.0.0.1:0",
            advertise=first.node.node_id,
            etcd=etcd_server.endpoint,
            lease_ttl=60,
        )
    )
    with trio.fail_after(TIMEOUT):
        started = trio.current_time()
        with pytest.raises(BaseException) as refused:  # noqa: PT011 (NodeStartError, as trio hands it on)
            async with trio.open_nursery() as inner:
                await inner.start(twin.run)
        assert "give each node its own --advertise address" in str(refused.value) + repr(refused.value)
        assert trio.current_time() - started < 20  # waiting out its own 60 s lease would take 61 s


async def test_a_node_restarted_at_once_takes_over_its_lapsing_entry(
    cluster: list[InProcessNode], etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A node killed without leaving restarts under the same address before its lease lapses: it waits for it, then joins."""
    caplog.set_level(logging.INFO, logger="dcache.membership")
    gone = cluster[2]
    address = gone.node.node_id
    assert gone.node.membership is not None
    gone.node.membership._lease = None  # as if killed: nobody revokes it; it lapses after its TTL, the key with it
    gone.stop()
    again = Node(
        NodeConfig(client_listen="127.0.0.1:0", listen=address, advertise=address, etcd=etcd_server.endpoint, lease_ttl=LEASE_TTL)
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(again.run)
            await wait_for_members([cluster[0], cluster[1]], 3)
            assert address in cluster[0].node.router.shard_map.members
            nursery.cancel_scope.cancel()
    assert "registered already; waiting for that entry to lapse" in caplog.text


async def test_a_node_whose_advertise_address_does_not_answer_says_so(
    nursery: trio.Nursery, etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    node = Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0", advertise=nowhere, etcd=etcd_server.endpoint))
    with trio.fail_after(TIMEOUT):
        await nursery.start(_scoped, node)
        while "which fails from here" not in caplog.text:
            await trio.sleep(0.05)
    assert nowhere in caplog.text


async def test_a_node_that_leaves_before_stopping_costs_no_request_an_error(cluster: list[InProcessNode]) -> None:
    from dcache.errors import DcacheError

    keys = [f"k{i}" for i in range(60)]
    errors: list[Exception] = []
    done = trio.Event()

    async def hammer(client: dcache.Client) -> None:
        while not done.is_set():
            for key in keys:
                try:
                    await client.set(key, "v")
                except DcacheError as exc:
                    errors.append(exc)

    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[0].address) as client, trio.open_nursery() as load:
            for _ in range(10):
                load.start_soon(hammer, client)
            await trio.sleep(0.3)
            await cluster[2].node.leave()  # what SIGTERM does before stopping
            cluster[2].stop()
            await wait_for_members(cluster[:2], 2)
            await trio.sleep(0.3)
            done.set()
    assert errors == []


async def test_cluster_client_goes_straight_to_owners(cluster: list[InProcessNode]) -> None:
    with trio.fail_after(TIMEOUT):
        async with await dcache.ClusterClient.connect(cluster[0].address) as client:
            keys = [f"direct:{i}" for i in range(200)]
            await client.mset({k: k for k in keys})
            for key in keys[:50]:
                await client.set(key, key + "!")
                assert await client.get(key) == (key + "!").encode()
            assert await client.mget(keys[50:]) == [k.encode() for k in keys[50:]]
            assert await client.mdelete(keys[:10] + ["absent"]) == 10
            assert await client.ttl(keys[20]) == float("inf")
        # Nothing needed forwarding.
        assert sum(n.node.router.counters.forwarded for n in cluster) == 0
        assert sum(len(n.node.store) for n in cluster) == 190


async def test_cluster_client_survives_a_node_leaving(cluster: list[InProcessNode]) -> None:
    with trio.fail_after(TIMEOUT):
        async with await dcache.ClusterClient.connect(cluster[0].address) as client:
            await client.mset({f"k{i}": "v" for i in range(100)})
            cluster[2].stop()
            await wait_for_members(cluster[:2], 2)
            # The old map still names the departed node; requests still succeed.
            await client.mset({f"k{i}": "w" for i in range(100)})
            assert await client.mget([f"k{i}" for i in range(100)]) == [b"w"] * 100
            await client.refresh()
            assert len(client.shard_map.members) == 2


async def test_cluster_client_replaces_a_broken_connection(cluster: list[InProcessNode]) -> None:
    from dcache.errors import ConnectionLost

    with trio.fail_after(TIMEOUT):
        async with await dcache.ClusterClient.connect(cluster[0].address) as client:
            other = cluster[1].node.node_id
            key = next(k for k in (f"k{i}" for i in range(1000)) if client.shard_map.owner("", k.encode()) == other)
            await client.set(key, "v")
            broken = client._clients[other]
            broken._channel.fail(ConnectionLost("the link broke"))  # as when that node restarts
            assert await client.get(key) == b"v"
            # A fresh connection took its place: no more detours through the seed.
            assert client._clients[other] is not broken and client._clients[other]._channel.broken is None
            forwarded = cluster[0].node.router.counters.forwarded
            for _ in range(20):
                assert await client.get(key) == b"v"
            assert cluster[0].node.router.counters.forwarded == forwarded


async def test_cluster_client_outlives_the_node_it_first_reached(cluster: list[InProcessNode]) -> None:
    with trio.fail_after(TIMEOUT):
        async with await dcache.ClusterClient.connect(cluster[0].address) as client:
            await client.mset({f"k{i}": "v" for i in range(30)})
            cluster[0].stop()
            await wait_for_members(cluster[1:], 2)
            await client.refresh()
            assert len(client.shard_map.members) == 2
            await client.mset({f"k{i}": "w" for i in range(30)})
            assert await client.mget([f"k{i}" for i in range(30)]) == [b"w"] * 30
            assert len((await client.members())["members"]) == 2


async def test_cluster_names_keep_clusters_apart(nursery: trio.Nursery, etcd_server: EtcdServer) -> None:
    def node(cluster: str) -> Node:
        return Node(
            NodeConfig(
                client_listen="127.0.0.1:0", listen="127.0.0.1:0", etcd=etcd_server.endpoint, cluster=cluster, lease_ttl=LEASE_TTL
            )
        )

    with trio.fail_after(TIMEOUT):
        blue = [await nursery.start(_scoped, node("blue")) for _ in range(2)]
        green = await nursery.start(_scoped, node("green"))
        await wait_for_members(blue, 2)
        assert green.node.router.shard_map.members == (green.bound.node_id,)
        async with dcache.connect(green.address) as client:
            await client.set("k", "green")
        async with dcache.connect(blue[0].address) as client:
            assert await client.get("k") is None
            assert len((await client.members())["members"]) == 2


async def test_metrics_endpoint(nursery: trio.Nursery, etcd_server: EtcdServer) -> None:
    node = Node(
        NodeConfig(
            client_listen="127.0.0.1:0",
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            etcd=etcd_server.endpoint,
            lease_ttl=LEASE_TTL,
        )
    )
    running = await nursery.start(_scoped, node)
    assert running.bound.metrics is not None
    host, port = running.bound.metrics
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(running.address) as client:
            await client.set("k", "v")
            await client.get("k")
            await client.get("missing")
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/plain" in head
    text = body.decode()
    for line in (
        'dcache_ops_total{op="set",result="ok"} 1.0',
        'dcache_ops_total{op="get",result="ok"} 2.0',
        "dcache_hits_total 1.0",
        "dcache_misses_total 1.0",
        "dcache_keys 1.0",
        "dcache_members 1.0",
        "dcache_forwarded_requests_total 0.0",
    ):
        assert line in text, line
    assert f"dcache_membership_epoch {float(node.router.shard_map.epoch)}" in text
    assert 'dcache_request_latency_seconds_bucket{le="+Inf"}' in text
    assert "dcache_peer_link_up" in text


async def test_probes_say_when_a_node_is_ready_and_members_shows_each_nodes_state(
    nursery: trio.Nursery, etcd_server: EtcdServer
) -> None:
    """/healthz answers while the node runs; /readyz is 200 once it serves
    its shards and 503, with why, once it is leaving; `members` shows each
    node's state as the node says it."""
    nodes = []
    for _ in range(2):
        config = NodeConfig(
            client_listen="127.0.0.1:0",
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            etcd=etcd_server.endpoint,
            lease_ttl=LEASE_TTL,
        )
        nodes.append(await nursery.start(_scoped, Node(config)))
    a, b = nodes
    assert a.bound.metrics is not None
    with trio.fail_after(TIMEOUT):
        await wait_for_members(nodes, 2)
        assert await http_get(a.bound.metrics, "/healthz") == (200, b"ok\n")
        assert (await http_get(a.bound.metrics, "/readyz"))[0] == 200
        await a.node.leave(drain=0)
        status, body = await http_get(a.bound.metrics, "/readyz")
        assert status == 503 and body.startswith(b"leaving: ")
        assert (await http_get(a.bound.metrics, "/healthz"))[0] == 200
        await wait_for_members([b], 1)
        r = await trio.to_thread.run_sync(dcache_cli, "members", "--json", "--server", b.address)
        assert r.returncode == 0, r.stderr
        [member] = json.loads(r.stdout)["members"]
        assert member["state"] == "ready"


async def test_shell_where_names_the_owner_in_a_cluster(cluster: list[InProcessNode]) -> None:
    import io

    from rich.console import Console

    from dcache.shell import ShellSession

    out = io.StringIO()
    session = ShellSession(cluster[0].address, console=Console(file=out, width=200, color_system=None), interactive=True)
    with trio.fail_after(TIMEOUT):
        assert await trio.to_thread.run_sync(session.connect)
        assert await trio.to_thread.run_sync(session.execute, "set user:1001 Alice ttl=60") == 0
        assert await trio.to_thread.run_sync(session.execute, "where user:1001") == 0
        assert await trio.to_thread.run_sync(session.execute, "stats --cluster") == 0
    owner = cluster[0].node.router.shard_map.owner("", b"user:1001")
    text = out.getvalue()
    assert f"owner         {owner}" in text
    assert "time to live" in text and ("59" in text or "60 s" in text)
    assert "total" in text  # the per-node table and its total
    assert set(session.known_addresses) == {n.address for n in cluster}
    session.close()


@pytest.mark.parametrize("endpoint", ["http://[::1", "http://]", "http://[x]:1"])
@pytest.mark.parametrize("via_env", [False, True])
def test_serve_with_a_malformed_ipv6_etcd_url_is_a_one_line_error(endpoint: str, via_env: bool) -> None:
    args = ["serve", "--listen", "127.0.0.1:0", "--client-listen", "127.0.0.1:0"]
    env = {**os.environ, "DCACHE_ETCD": endpoint} if via_env else None
    if not via_env:
        args += ["--etcd", endpoint]
    r = subprocess.run([sys.executable, "-m", "dcache", *args], capture_output=True, timeout=20, env=env)
    assert r.returncode == 2, r.stderr
    assert b"Traceback" not in r.stderr
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "etcd" in lines[0], lines


async def test_a_paused_node_never_answers_with_values_overwritten_while_it_was_out(etcd_server: EtcdServer) -> None:
    """A node stopped (SIGSTOP) until the others drop it finds, when it wakes,
    requests that queued in its sockets meanwhile. The others owned its
    shards in between and overwrote its key; it must not answer from what
    it held: each reply is the new value or `unavailable`, never the old."""
    from dcache.errors import RequestError

    nodes = [serve(etcd_server.endpoint) for _ in range(3)]
    (_, a_address, _), _, (c_proc, c_address, c_id) = nodes
    try:
        with trio.fail_after(TIMEOUT):
            for _, address, _ in nodes:
                assert await trio.to_thread.run_sync(wait_until_serving, address, 15)
            clients = [await dcache.Client.connect(address, timeout=TIMEOUT) for address in (a_address, c_address, c_address)]
            a, c_many, c_alone = clients
            while True:
                view = [await client.members() for client in (a, c_many)]
                if all(len(v["members"]) == 3 for v in view):
                    break
                await trio.sleep(0.05)
            ids = [m["node"] for m in view[0]["members"]]
            shard_map = ShardMap.build(view[0]["epoch"], ids)
            key = next(k for k in (f"k{i}" for i in range(100000)) if shard_map.owner("", k.encode()) == c_id)
            while True:  # (a member may list the view before its membership vouches for it)
                try:
                    await a.set(key, "old")
                    break
                except RequestError as exc:
                    if exc.code != "unavailable":
                        raise
                    await trio.sleep(0.05)
            assert await c_many.get(key) == b"old"

            c_proc.send_signal(signal.SIGSTOP)
            while len((await a.members())["members"]) != 2:  # its lease lapsed; the others took its shards
                await trio.sleep(0.05)
            await a.set(key, "new")

            replies: list[object] = []

            async def ask(client: dcache.Client, op: str) -> None:
                try:
                    if op == "mget":
                        [value] = await client.mget([key])
                        replies.append(value)
                    else:
                        replies.append(await client.get(key))
                except RequestError as exc:
                    replies.append(exc.code)

            async with trio.open_nursery() as nursery:
                for _ in range(5):  # frames that the woken node reads in one go
                    nursery.start_soon(ask, c_many, "get")
                nursery.start_soon(ask, c_many, "mget")
                nursery.start_soon(ask, c_alone, "get")  # alone on its connection: the short way
                await trio.testing.wait_all_tasks_blocked()  # every request written to the stopped node
                c_proc.send_signal(signal.SIGCONT)
            assert len(replies) == 7
            assert all(r in (b"new", ErrorCode.UNAVAILABLE.value) for r in replies), replies

            # It rejoins and serves again; never the old value.
            while True:
                try:
                    value = await c_alone.get(key)
                except RequestError as exc:
                    assert exc.code == ErrorCode.UNAVAILABLE
                    await trio.sleep(0.1)
                    continue
                assert value != b"old"
                break
            for client in clients:
                await client.aclose()
    finally:
        c_proc.send_signal(signal.SIGCONT)
        for proc, _, _ in nodes:
            proc.kill()
            proc.wait(10)


async def test_an_etcd_outage_longer_than_the_lease_makes_keyed_requests_unavailable(
    cluster: list[InProcessNode], etcd_server: EtcdServer
) -> None:
    """A node cut off from etcd for longer than its lease cannot tell an etcd
    outage from being cut off alone while others took its shards: it answers
    keyed requests `unavailable` (never a value it cannot vouch for) and
    serves again once etcd is back."""
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[1].address) as client:
            values: dict[str | bytes, str | bytes] = {f"k{i}": "v" for i in range(50)}
            await client.mset(values)
            await trio.to_thread.run_sync(etcd_server.stop)
            while any(trio.current_time() < n.node.router.vouched_until for n in cluster):
                await trio.sleep(0.1)
            with pytest.raises(dcache.RequestError) as refused:
                await client.get("k1")
            assert refused.value.code == ErrorCode.UNAVAILABLE and "lease" in str(refused.value)
            with pytest.raises(dcache.RequestError):
                await client.mget([f"k{i}" for i in range(50)])
            await client.ping()
            stats = await client.stats()
            assert stats["keys"] > 0 and stats["state"] == "rejoining"
            await trio.to_thread.run_sync(etcd_server.start)
            # etcd kept the leases: once refreshed, every node serves again, with what it held.
            while True:
                try:
                    assert await client.mget([f"k{i}" for i in range(50)]) == [b"v"] * 50
                    break
                except dcache.RequestError as exc:
                    assert exc.code == ErrorCode.UNAVAILABLE
                    await trio.sleep(0.1)
            await wait_for_members(cluster, 3)


async def test_a_hung_owner_holds_up_no_other_request_on_a_shared_connection(etcd_server: EtcdServer) -> None:
    """One node is stopped (SIGSTOP). A connection to another node shared by
    many tasks keeps serving the keys that node owns at once, while the
    requests for the stopped node's keys wait out the peer timeout."""
    nodes = [serve(etcd_server.endpoint, "--lease-ttl", "60") for _ in range(2)]  # the stopped node stays in the view
    try:
        for _, client, _ in nodes:
            assert await trio.to_thread.run_sync(wait_until_serving, client, 15)
        deadline = trio.current_time() + 15
        while (
            len(
                json.loads((await trio.to_thread.run_sync(dcache_cli, "members", "--json", "--server", nodes[0][1])).stdout)[
                    "members"
                ]
            )
            != 2
        ):
            assert trio.current_time() < deadline
            await trio.sleep(0.1)
        with trio.fail_after(TIMEOUT):
            async with dcache.connect(nodes[0][1]) as cache:
                view = await cache.members()
                shard_map = ShardMap.build(view["epoch"], [m["node"] for m in view["members"]])
                here = cache.server_info["node"]
                keys = [f"k{i}" for i in range(200)]
                local = [k for k in keys if shard_map.owner("", k.encode()) == here]
                away = [k for k in keys if shard_map.owner("", k.encode()) != here]
                await cache.mset({k: "v" for k in keys})
                hung = nodes[1][0]
                hung.send_signal(signal.SIGSTOP)
                finished: dict[str, float] = {}

                async def ask_away(key: str) -> None:
                    with pytest.raises(dcache.RequestError) as caught:
                        await cache.get(key)
                    assert caught.value.code == ErrorCode.UNAVAILABLE
                    finished.setdefault("away", trio.current_time())

                async def ask_here(task: int) -> None:
                    for key in local[task::4]:
                        assert await cache.get(key) == b"v"
                    finished[f"here{task}"] = trio.current_time()

                async with trio.open_nursery() as nursery:
                    for key in away[:5]:
                        nursery.start_soon(ask_away, key)
                    await trio.sleep(0.2)  # those are out, waiting for the stopped node
                    for task in range(4):
                        nursery.start_soon(ask_here, task)
                assert max(v for k, v in finished.items() if k.startswith("here")) < finished["away"]
    finally:
        for proc, _, _ in nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(10)


async def test_a_client_gone_before_its_reply_leaves_nothing_held_on_peer_links(cluster: list[InProcessNode]) -> None:
    """A frame with a key of this node and a key of another, from a client
    that resets the connection at once: the reply to the first cannot be
    sent, and the request handed to the other node's link must still be
    released (else the link counts it in flight for good, and stops pinging)."""
    import struct

    from dcache import protocol, transport

    a, b = cluster[0], cluster[1]
    shard_map = a.node.router.shard_map
    mine = next(f"L{i}".encode() for i in range(10000) if shard_map.owner("", f"L{i}".encode()) == a.node.node_id)
    theirs = next(f"R{i}".encode() for i in range(10000) if shard_map.owner("", f"R{i}".encode()) == b.node.node_id)
    with trio.fail_after(TIMEOUT):
        for _ in range(10):
            conn = await transport.connect(a.address, max_message=1 << 20, default_port=0)
            assert isinstance(conn.proto, protocol.ClientConnection)
            await conn.send_raw(conn.proto.request_frame([[0, "hello", protocol.hello_args("test")]]))
            await conn.receive()
            first = conn.proto.new_rids(2)
            sock = transport.plain_socket(conn.stream)
            assert sock is not None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
            sock.send(conn.proto.request_frame([[first, "get", {"key": mine}], [first + 1, "get", {"key": theirs}]]))
            await conn.stream.aclose()
            await trio.sleep(0.05)
        link = a.node.peers._links[b.node.node_id]
        while link.in_flight or (link.channel is not None and link.channel.in_flight):
            await trio.sleep(0.05)  # (on the code before the fix: for ever)


def _keys_of(node: InProcessNode, shard_map: ShardMap, prefix: str, count: int) -> list[str]:
    return [k for k in (f"{prefix}{i}" for i in range(100_000)) if shard_map.owner("", k.encode()) == node.node.node_id][:count]


async def test_a_lone_forwarded_request_is_completed_by_the_reactor_without_a_task(
    cluster: list[InProcessNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keyed request alone in its frame, for another node's key: the
    reactor sends it on the peer link and writes the owner's reply when it
    reads it, with no task of its own (a task per forwarded request costs a
    wake-up each); nothing stays held on the link afterwards."""
    a, b, _ = cluster
    tasks = 0
    send_later = a.node.reactor._send_later

    async def counted(*args):  # type: ignore[no-untyped-def]
        nonlocal tasks
        tasks += 1
        await send_later(*args)

    monkeypatch.setattr(a.node.reactor, "_send_later", counted)
    keys = _keys_of(b, a.node.router.shard_map, "t", 20)
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(a.address) as client:
            for i, key in enumerate(keys):
                await client.set(key, f"v{i}")
            assert [await client.get(key) for key in keys] == [f"v{i}".encode() for i in range(len(keys))]
        link = a.node.peers._links[b.node.node_id]
        assert link.in_flight == 0 and link.channel is not None and link.channel.in_flight == 0
    assert tasks == 0
    assert link.forwarded >= 2 * len(keys)


async def test_a_relayed_request_the_owner_bounces_as_moved_is_retried(
    cluster: list[InProcessNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner answers a relayed request with `moved` (its view is newer):
    the reply is not passed on as it came, the request is placed again."""
    from dcache import codec

    a, b, _ = cluster
    [key] = _keys_of(b, a.node.router.shard_map, "m", 1)
    place = b.node.router.place
    bounced = []

    def moving_once(session, payloads):  # type: ignore[no-untyped-def]
        if session.peer_id and not bounced:
            [message] = codec.decode_frame(payloads[0], codec.Limits())
            bounced.append(message[0])
            return codec.encode_frame([b.node.router._moved(message[0], a.node.node_id)]), None
        return place(session, payloads)

    with trio.fail_after(TIMEOUT):
        async with dcache.connect(a.address) as client:
            await client.set(key, "kept")
            monkeypatch.setattr(b.node.router, "place", moving_once)
            assert await client.get(key) == b"kept"
    assert len(bounced) == 1
    assert a.node.router.counters.moved_retries >= 1


async def test_relayed_requests_waiting_when_the_link_breaks_are_answered(cluster: list[InProcessNode]) -> None:
    """Relayed requests are out on a peer link when it breaks (its socket is
    reset): each client gets an answer (`unavailable`, or the value if the
    link came back in time), none hangs, and the link holds nothing."""
    import struct

    a, b, _ = cluster
    keys = _keys_of(b, a.node.router.shard_map, "x", 8)
    withheld = trio.Event()
    place = b.node.router.place

    def holding(session, payloads):  # type: ignore[no-untyped-def]
        reply, waiting = place(session, payloads)
        if session.peer_id:
            return None, Withheld(reply, withheld)
        return reply, waiting

    with trio.fail_after(TIMEOUT):
        async with dcache.connect(a.address) as setter:
            for key in keys:
                await setter.set(key, "v")
        b.node.router.place = holding  # type: ignore[method-assign]
        outcomes: list[object] = []

        async def ask(key: str) -> None:
            async with dcache.connect(a.address) as client:
                try:
                    outcomes.append(await client.get(key))
                except dcache.RequestError as exc:
                    outcomes.append(exc.code)

        async with trio.open_nursery() as asking:
            for key in keys:
                asking.start_soon(ask, key)
            link = a.node.peers._links[b.node.node_id]
            while link.in_flight < len(keys):
                await trio.sleep(0.01)
            channel = link.channel
            assert channel is not None
            sock = transport_socket(channel)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RDWR)  # the link breaks under the waiting requests
        b.node.router.place = place  # type: ignore[method-assign]
        withheld.set()
        assert len(outcomes) == len(keys)
        assert all(o in (b"v", ErrorCode.UNAVAILABLE) for o in outcomes), outcomes
        while link.in_flight:
            await trio.sleep(0.01)


def transport_socket(channel: object) -> socket.socket:
    from dcache import transport

    sock = transport.plain_socket(channel._conn.stream)  # type: ignore[attr-defined]
    assert sock is not None
    return sock


async def _start_node(nursery: trio.Nursery, etcd_server: EtcdServer, **options: object) -> InProcessNode:
    config = NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0", etcd=etcd_server.endpoint, lease_ttl=LEASE_TTL)
    node: InProcessNode = await nursery.start(_scoped, Node(dataclasses.replace(config, **options)))  # type: ignore[arg-type]
    return node


async def wait_ready(nodes: list[InProcessNode]) -> None:
    """Until every node is ready and has nothing left to hand over (the old
    owner drops a shard's entries when the new one has acknowledged them)."""
    while not all(
        n.node.readiness()[0] == "ready" and not (n.node.placement.outgoing or n.node.placement.sending) for n in nodes
    ):
        await trio.sleep(0.02)


async def test_entries_move_to_a_joining_node(nursery: trio.Nursery, etcd_server: EtcdServer) -> None:
    """A node that joins takes over its shards with their entries and TTLs:
    every key reads back, from every node, as before the join."""
    nodes = [await _start_node(nursery, etcd_server) for _ in range(2)]
    with trio.fail_after(TIMEOUT):
        await wait_for_members(nodes, 2)
        await wait_ready(nodes)
        async with dcache.connect(nodes[0].address) as client:
            await client.mset({f"k{i}": f"v{i}" for i in range(2000)})
            await client.set("short", "x", ttl=30)
            nodes.append(await _start_node(nursery, etcd_server))
            await wait_for_members(nodes, 3)
            await wait_ready(nodes)
            assert len(nodes[2].node.store) > 300  # its share came with its shards
            assert sum(len(n.node.store) for n in nodes) == 2001  # and left the others
            for n in nodes:
                async with dcache.connect(n.address) as each:
                    assert await each.mget([f"k{i}" for i in range(2000)]) == [f"v{i}".encode() for i in range(2000)]
                    assert 25 < await each.ttl("short") <= 30


async def test_a_drain_goes_on_when_the_client_that_asked_goes_away(nursery: trio.Nursery, etcd_server: EtcdServer) -> None:
    """The client of `drain` hangs up at once (Ctrl-C, a short --timeout):
    the node still hands everything over, leaves and stops (it stopped half
    way, marked leaving for good: found by review)."""
    nodes = [await _start_node(nursery, etcd_server) for _ in range(2)]
    with trio.fail_after(TIMEOUT):
        await wait_for_members(nodes, 2)
        await wait_ready(nodes)
        async with dcache.connect(nodes[0].address) as client:
            await client.mset({f"k{i}": "v" for i in range(2000)})
        async with dcache.connect(nodes[1].address) as leaving:
            with trio.move_on_after(0.005):
                await leaving.drain()
        await wait_for_members(nodes[:1], 1)
        assert len(nodes[0].node.store) == 2000


async def test_scan_lists_every_key_once_across_the_cluster(cluster: list[InProcessNode]) -> None:
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[0].address) as client:
            users = {f"user:{i}".encode() for i in range(1500)}
            await client.mset({key: b"v" for key in users}, ns="app")
            await client.mset({f"order:{i}": b"v" for i in range(500)}, ns="app")
            await client.mset({f"user:{i}": b"v" for i in range(40)})  # another namespace
            listed = [key async for key in client.scan("user:", ns="app", page=7)]
            assert len(listed) == len(users) and set(listed) == users  # each once, from every node
            assert len([key async for key in client.scan(ns="app", page=1000)]) == 2000
            assert {key async for key in client.scan("user:1", ns="app")} == {k for k in users if k.startswith(b"user:1")}
            assert len([key async for key in client.scan()]) == 40
            keys, cursor = await client.scan_page(ns="app", limit=10)
            assert len(keys) == 10 and cursor is not None
            rest = [key async for key in client.scan(ns="app")]
            assert set(keys) <= set(rest)
        assert all(len(n.node.store) > 0 for n in cluster)  # (the keys were spread)


async def test_flush_and_namespace_stats_reach_every_node(cluster: list[InProcessNode]) -> None:
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[1].address) as client:
            await client.mset({f"k{i}": b"12345" for i in range(300)}, ns="app")
            await client.mset({f"k{i}": b"v" for i in range(100)}, ns="other")
            found = await client.namespace_stats("app")
            assert found["keys"] == 300 and found["data_bytes"] == sum(len(f"k{i}") + 5 for i in range(300))
            assert set(found["nodes"]) == {n.bound.node_id for n in cluster}
            assert sum(n["keys"] for n in found["nodes"].values()) == 300
            assert await client.flush("app") == 300
            assert (await client.namespace_stats("app"))["keys"] == 0
            assert await client.get("k1", ns="other") == b"v"  # another namespace is kept
            assert await client.flush_all() == 100
            assert sum(len(n.node.store) for n in cluster) == 0


async def test_a_watch_sees_every_change_once_from_every_node(cluster: list[InProcessNode]) -> None:
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[0].address) as watcher, dcache.connect(cluster[1].address) as writer:
            events, cursor = await watcher.watch_page(prefix="w:")  # from now
            assert events == []
            keys = [f"w:{i}".encode() for i in range(60)]
            await writer.mset({key: b"v" for key in keys})
            await writer.set("elsewhere", b"v")
            await writer.mdelete(keys[:10])
            await writer.set("w:short", b"v", ttl=0.2)
            owners = {cluster[0].node.router.shard_map.owner("", key) for key in keys}
            assert len(owners) == 3  # (changes on every node)
            seen: list[tuple[str, bytes]] = []
            while ("expire", b"w:short") not in seen:
                events, cursor = await watcher.watch_page(cursor, prefix="w:")
                seen.extend((event.kind, event.key) for event in events)
            assert sorted(key for kind, key in seen if kind == "set") == sorted([*keys, b"w:short"])  # each once
            assert sorted(key for kind, key in seen if kind == "delete") == sorted(keys[:10])
            assert {event.node for event in events} <= {n.bound.node_id for n in cluster}


async def test_a_slow_watcher_is_told_it_lagged_and_costs_the_node_nothing(cluster: list[InProcessNode]) -> None:
    for n in cluster:
        n.node.events._max_events = 50
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[2].address) as client:
            _, cursor = await client.watch_page()
            await client.mset({f"k{i}": b"v" for i in range(600)})  # ~200 per node, its log keeps 50
            events, cursor = await client.watch_page(cursor)
            lagged = [event for event in events if event.kind == "lagged"]
            assert {event.node for event in lagged} == {n.bound.node_id for n in cluster}
            shown = [event for event in events if event.kind == "set"]
            assert sum(event.missed for event in lagged) + len(shown) == 600
            assert all(len(n.node.events._events) <= 50 for n in cluster)
            await client.set("k-after", b"v")
            events, _ = await client.watch_page(cursor)
            assert [(e.kind, e.key) for e in events] == [("set", b"k-after")]  # on from where it is


async def test_a_watcher_is_told_when_its_node_restarted(nursery: trio.Nursery) -> None:
    port = free_port()
    config = NodeConfig(client_listen=f"127.0.0.1:{port}", listen=f"127.0.0.1:{free_port()}")
    with trio.fail_after(TIMEOUT):
        first = await nursery.start(_scoped, Node(config))
        client = await dcache.Client.connect(first.address)
        _, cursor = await client.watch_page()
        first.stop()
        await nursery.start(_scoped, Node(config))  # the same node id, a new incarnation
        while True:
            try:
                events, cursor = await client.watch_page(cursor)
                break
            except dcache.DcacheError:  # (the client reconnects on the next request)
                await trio.sleep(0.05)
        assert [event.kind for event in events] == ["restarted"]
        await client.set("k", b"v")
        events, _ = await client.watch_page(cursor)
        assert [(e.kind, e.key) for e in events] == [("set", b"k")]
        await client.aclose()


async def test_a_watch_goes_on_across_a_restart_of_its_node(nursery: trio.Nursery) -> None:
    port = free_port()
    config = NodeConfig(client_listen=f"127.0.0.1:{port}", listen=f"127.0.0.1:{free_port()}")
    seen: list[tuple[str, bytes]] = []
    with trio.fail_after(TIMEOUT):
        node = await nursery.start(_scoped, Node(config))
        client = await dcache.Client.connect(node.address)
        writer = await dcache.Client.connect(node.address)

        async def watch(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            async for event in client.watch("k"):
                seen.append((event.kind, event.key))

        async with trio.open_nursery() as watching:
            await watching.start(watch)
            while ("set", b"k1") not in seen:  # (the watch starts from its first request)
                await writer.set("k1", b"v")
                await trio.sleep(0.05)
            node.stop()
            await nursery.start(_scoped, Node(config))
            while ("set", b"k2") not in seen:
                try:
                    await writer.set("k2", b"v")
                except dcache.DcacheError:
                    pass
                await trio.sleep(0.05)
            watching.cancel_scope.cancel()
        assert ("restarted", b"") in seen and seen.index(("restarted", b"")) < seen.index(("set", b"k2"))
        await client.aclose()
        await writer.aclose()


async def test_watchers_on_a_node_share_one_request_per_member(cluster: list[InProcessNode]) -> None:
    """Hundreds of watchers of one prefix on a node cost each peer one request
    at a time (each watch request its own made a peer hold hundreds, and
    the forwards on that link waited behind them)."""
    a, b, _ = cluster
    with trio.fail_after(TIMEOUT):
        clients = [await dcache.Client.connect(a.address) for _ in range(4)]
        before = b.node.router.counters.ops.get(("events", "ok"), 0)

        async def watcher(client: dcache.Client) -> None:
            _, cursor = await client.watch_page(prefix="nothing:")
            for _ in range(3):
                _, cursor = await client.watch_page(cursor, prefix="nothing:", wait=0.5)

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(watcher, clients[i % 4])
        elapsed = trio.current_time() - started
        polls = b.node.router.counters.ops.get(("events", "ok"), 0) - before
        assert polls <= 2 + elapsed / 0.9, (polls, elapsed)  # one at a time, each held up to a second
        for client in clients:
            await client.aclose()


async def test_a_watcher_of_keys_nobody_writes_is_not_told_it_lagged(cluster: list[InProcessNode]) -> None:
    for n in cluster:
        n.node.events._max_events = 100
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[0].address) as client:
            _, cursor = await client.watch_page(prefix="quiet:")
            for start in range(0, 3000, 100):  # many events, none for it, while the feed waits on each member
                await client.mset({f"busy:{i}": b"v" for i in range(start, start + 100)})
            events, _ = await client.watch_page(cursor, prefix="quiet:")
            assert events == []  # (the log was trimmed past where the wait began: it was told it lost events)


async def test_a_watcher_slower_than_its_feed_is_told_how_many_it_missed(
    cluster: list[InProcessNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcache import watching

    monkeypatch.setattr(watching, "FEED_EVENTS", 40)  # what the node serving it keeps per member
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(cluster[0].address) as client:
            _, cursor = await client.watch_page(prefix="s:")
            await client.mset({f"s:{i}": b"v" for i in range(600)})
            got: list[dcache.WatchEvent] = []
            while sum(e.missed for e in got) + sum(e.kind == "set" for e in got) < 600:
                events, cursor = await client.watch_page(cursor, prefix="s:")
                got.extend(events)
            assert sum(e.missed for e in got) + sum(e.kind == "set" for e in got) == 600
            assert any(e.kind == "lagged" and e.missed > 0 for e in got)
            assert all(len(m.seqs) <= 40 for feed in cluster[0].node.watch_hub.feeds.values() for m in feed.members.values())
