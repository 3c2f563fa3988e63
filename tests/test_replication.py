"""Replicas: the owner's writes reach every replica, copies are made where
missing, and a replica serves its copy when the owner goes. First without
sockets (placements, stores and a fake link that delivers in order, on
virtual time), then nodes over a real etcd."""

from __future__ import annotations

import io
from typing import Any

import cbor2
import pytest
import trio
from support import LEASE_TTL, dcache_cli, start_node

import dcache
from dcache import codec
from dcache.errors import PeerUnavailable
from dcache.handoff import Placement
from dcache.localcluster import EtcdServer
from dcache.node import NodeStartError
from dcache.replication import ASYNC, SYNC, Replicator, take
from dcache.shard import NUM_SHARDS, ShardMap, shard_of
from dcache.store import Store

A, B, C = "a:1", "b:1", "c:1"


class Reply:
    def __init__(self, replies: list[tuple[int, Any]] | bytes | None) -> None:
        self.replies = replies

    async def wait(self) -> Any:
        await trio.sleep(0.001)  # a round trip
        if self.replies is None:
            raise PeerUnavailable("the link broke")
        return self.replies

    def release(self) -> None:
        pass


class Links:
    """Delivers replicate messages to the other node at once, in order;
    ``down`` holds the nodes whose link is down."""

    def __init__(self, sender: Node, nodes: dict[str, Node]) -> None:
        self.sender = sender
        self.nodes = nodes
        self.sessions: dict[str, object] = {}
        self.down: set[str] = set()
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def session(self, node_id: str) -> object | None:
        if node_id in self.down or node_id not in self.nodes:
            return None
        return self.sessions.setdefault(node_id, object())

    def reconnect(self, node_id: str) -> None:
        self.sessions[node_id] = object()

    def crowded(self, node_ids: Any) -> str | None:
        return None

    def submit(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> Reply:
        if node_id in self.down:
            return Reply(None)
        replies = []
        for op, args in requests:
            assert op == "replicate"
            self.sent.append((node_id, args))
            target = self.nodes[node_id]
            replies.append((0, take(target.placement, target.store, self.sender.id, args)))
        return Reply(replies)

    def submit_raw(self, node_id: str, rest: bytes) -> Reply:
        decoder = cbor2.CBORDecoder(io.BytesIO(rest))
        op, args = decoder.decode(), decoder.decode()
        reply = self.submit(node_id, [(op, args)])
        return reply if reply.replies is None else Reply(codec.encode_rest(*reply.replies[0]))


class Node:
    def __init__(self, node_id: str, nodes: dict[str, Node], copies: int = 2, mode: str = SYNC) -> None:
        self.id = node_id
        self.placement = Placement(node_id, copies)
        self.store = Store(clock=trio.current_time)
        self.links = Links(self, nodes)
        self.replicator = Replicator(self.placement, self.store, self.links, mode=mode)
        nodes[node_id] = self

    def view(self, epoch: int, members: tuple[str, ...]) -> None:
        self.placement.apply(epoch, members, members, trio.current_time())
        self.replicator.prune()

    async def write(self, key: str, value: str | None) -> str | None:
        """What the router does with a write this node owns: check, apply, send, await."""
        problem = self.replicator.check("", [key.encode()])
        if problem is not None:
            return problem
        if value is None:
            self.store.delete("", key.encode())
        else:
            self.store.set("", key.encode(), value.encode())
        replicated = self.replicator.send("", [key.encode()])
        return None if replicated is None else await replicated.wait()


def cluster(copies: int = 2, mode: str = SYNC) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for node_id in (A, B, C):
        Node(node_id, nodes, copies, mode)
    for node in nodes.values():
        node.view(1, (A, B, C))
    # Started together, each takes the others for the holders of its shards: their claims settle it.
    for _ in range(len(nodes) + 1):
        for node in nodes.values():
            for source, shards in node.placement.claims().items():
                node.placement.claim_answered(source, nodes[source].placement.answer_claim(node.id, shards))
    assert not any(node.placement.incoming for node in nodes.values())
    return nodes


def key_owned_by(owner: str, replica: str, members: tuple[str, ...] = (A, B, C), copies: int = 2) -> str:
    placed = ShardMap.build(1, members, copies)
    return next(
        f"k{i}"
        for i in range(100_000)
        if placed.owner("", f"k{i}".encode()) == owner and replica in placed.replicas_of(shard_of("", f"k{i}".encode()))
    )


async def test_a_write_reaches_its_replica_after_a_copy_of_its_shard() -> None:
    nodes = cluster()
    key = key_owned_by(A, B)
    shard = shard_of("", key.encode())
    neighbour = next(f"{key}-{i}" for i in range(100_000) if shard_of("", f"{key}-{i}".encode()) == shard)
    nodes[A].store.set("", neighbour.encode(), b"written before replication began", 60_000)
    assert await nodes[A].write(key, "v1") is None
    assert nodes[B].store.get("", key.encode()) == b"v1"
    assert nodes[B].store.get("", neighbour.encode()) == b"written before replication began"  # the shard came whole
    assert 59_000 < (nodes[B].store.ttl_ms("", neighbour.encode()) or 0) <= 60_000
    assert nodes[B].store.version("", key.encode()) == nodes[A].store.version("", key.encode())
    assert len(nodes[C].store) == 0  # not a replica of that shard
    assert nodes[B].placement.copies == {shard: A}

    sent = len(nodes[A].links.sent)
    assert await nodes[A].write(key, "v2") is None
    assert [args["begin"] for _, args in nodes[A].links.sent[sent:]] == [[]]  # copied already: only the write goes
    assert await nodes[A].write(key, None) is None
    assert nodes[B].store.get("", key.encode()) is None
    assert nodes[A].replicator.under_replicated() > 0  # (the other shards are copied by the task)


async def test_a_reconnected_link_gets_the_shard_again() -> None:
    """What went over a connection that broke may not have arrived: a copy
    counts only on the connection it was made over."""
    nodes = cluster()
    key = key_owned_by(A, B)
    assert await nodes[A].write(key, "v1") is None
    nodes[A].links.reconnect(B)
    sent = len(nodes[A].links.sent)
    assert await nodes[A].write(key, "v2") is None
    assert nodes[A].links.sent[sent][1]["begin"] == [shard_of("", key.encode())]


async def test_a_write_is_refused_while_a_replica_is_unreachable_unless_async() -> None:
    nodes = cluster()
    key = key_owned_by(A, B)
    nodes[A].links.down.add(B)
    problem = await nodes[A].write(key, "v1")
    assert problem is not None and B in problem and "unreachable" in problem
    assert nodes[A].store.get("", key.encode()) is None  # refused before it was applied

    nodes = cluster(mode=ASYNC)
    nodes[A].links.down.add(B)
    assert await nodes[A].write(key, "v1") is None
    nodes[A].links.down.clear()
    assert await nodes[A].write(key, "v2") is None  # copied whole now: the write missed is in it
    assert nodes[B].store.get("", key.encode()) == b"v2"


async def test_a_broken_link_fails_the_write_and_the_copy_is_made_again() -> None:
    nodes = cluster()
    key = key_owned_by(A, B)
    assert await nodes[A].write(key, "v1") is None
    submit = nodes[A].links.submit
    nodes[A].links.submit = lambda node_id, requests: Reply(None)  # type: ignore[method-assign]
    problem = await nodes[A].write(key, "v2")
    assert problem is not None and "did not confirm" in problem
    nodes[A].links.submit = submit  # type: ignore[method-assign]
    sent = len(nodes[A].links.sent)
    assert await nodes[A].write(key, "v3") is None
    assert nodes[A].links.sent[sent][1]["begin"] == [shard_of("", key.encode())]


async def test_a_replica_refuses_writes_of_shards_it_does_not_keep() -> None:
    """Views disagree: the sender takes this node for a replica, the node does
    not (or takes another node for the owner). The write is answered
    unavailable and nothing is kept."""
    nodes = cluster()
    key = key_owned_by(A, C)  # C is the replica, B is not
    shard = shard_of("", key.encode())
    reply = take(
        nodes[B].placement,
        nodes[B].store,
        A,
        {"entries": [["", key.encode(), b"v", 0, 1]], "begin": [shard], "done": [shard], "epoch": 1},
    )
    assert reply == {"refused": [shard]} and len(nodes[B].store) == 0
    reply = take(
        nodes[C].placement, nodes[C].store, B, {"entries": [["", key.encode(), b"v", 0, 1]], "begin": [], "done": [], "epoch": 1}
    )
    assert reply == {"refused": [shard]} and len(nodes[C].store) == 0  # B does not own it
    # A write before any copy of the shard reached C: refused too (C's copy would lack the rest of the shard).
    reply = take(
        nodes[C].placement, nodes[C].store, A, {"entries": [["", key.encode(), b"v", 0, 1]], "begin": [], "done": [], "epoch": 1}
    )
    assert reply == {"refused": [shard]} and len(nodes[C].store) == 0

    nodes[A].placement.apply(2, (A, B), (A, B), 0.0)  # A's view has left C out; B's has not: B is not a replica yet
    nodes[A].replicator.prune()
    problem = await nodes[A].write(key, "v")  # (owned by A, replica C in B's view; replica B in A's)
    assert problem is not None and "membership is changing" in problem


async def test_the_replica_serves_its_copy_when_the_owner_goes() -> None:
    nodes = cluster()
    keys = [f"k{i}" for i in range(400)]
    before, after = ShardMap.build(1, (A, B, C)), ShardMap.build(2, (B, C))
    for key in keys:
        assert await nodes[before.owner("", key.encode())].write(key, f"v-{key}") is None
    a_keys = [k for k in keys if before.owner("", k.encode()) == A]
    # A dies: B and C take its shards, each from the copy it kept.
    for node_id in (B, C):
        nodes[node_id].view(2, (B, C))
    for key in a_keys:
        new_owner = after.owner("", key.encode())
        assert nodes[new_owner].placement.owners[shard_of("", key.encode())] == new_owner
        assert nodes[new_owner].store.get("", key.encode()) == f"v-{key}".encode(), key
    copied = {shard_of("", key.encode()) for key in a_keys}  # (copied when first written; the copies task was not run)
    assert nodes[B].placement.failed_over + nodes[C].placement.failed_over == len(copied)
    emptied = {*nodes[B].placement.emptied, *nodes[C].placement.emptied}
    assert emptied == {shard for shard, owner in enumerate(before.shard_owners) if owner == A} - copied
    # What the new owners serve now is copied to their new replica (each other), within the copies task's pace.
    assert nodes[B].replicator.under_replicated() > 0


async def test_without_a_copy_a_shard_whose_owner_went_is_served_empty() -> None:
    nodes = cluster(copies=1)
    key = key_owned_by(A, B, copies=2)  # B would have been the replica
    shard = shard_of("", key.encode())
    nodes[B].store.set("", key.encode(), b"left over, stale")  # e.g. from before it was handed on
    nodes[B].view(2, (B, C))
    if nodes[B].placement.owners[shard] == B:
        assert shard in nodes[B].placement.emptied


async def test_copies_are_forgotten_when_their_owner_is_no_longer_settled() -> None:
    nodes = cluster()
    key = key_owned_by(A, B)
    shard = shard_of("", key.encode())
    assert await nodes[A].write(key, "v") is None
    assert nodes[B].placement.copies == {shard: A}
    # A is leaving (in the view, owning nothing): its shards move by handoff; B's copy gets no more writes.
    nodes[B].placement.apply(2, (A, B, C), (B, C), 0.0)
    assert shard not in nodes[B].placement.copies


async def test_the_copies_task_makes_every_missing_copy(autojump_clock: trio.testing.MockClock) -> None:
    nodes = cluster()
    placed = ShardMap.build(1, (A, B, C))
    for i in range(3000):
        key = f"bulk:{i}".encode()
        nodes[placed.owner("", key)].store.set("", key, b"x" * 100)
    async with trio.open_nursery() as nursery:
        for node in nodes.values():
            await nursery.start(node.replicator.run)
        with trio.fail_after(600):
            while any(node.replicator.under_replicated() for node in nodes.values()):
                await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert sum(len(node.store) for node in nodes.values()) == 2 * 3000  # every entry twice, on its owner and its replica
    for node in nodes.values():
        assert len(node.placement.copies) == sum(
            1 for shard in range(NUM_SHARDS) if node.id in node.placement.target.replicas_of(shard)
        )


# -- nodes over a real etcd --------------------------------------------------------------


async def test_every_entry_lives_on_two_nodes_and_survives_one_stopping(nursery: trio.Nursery, etcd_server: EtcdServer) -> None:
    scopes = []
    nodes = []
    for _ in range(3):
        scope = trio.CancelScope()

        async def run(scope: trio.CancelScope = scope, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with trio.open_nursery() as inner:
                    task_status.started(await start_node(inner, etcd=etcd_server.endpoint, lease_ttl=LEASE_TTL, replicas=2))

        nodes.append(await nursery.start(run))
        scopes.append(scope)
    with trio.fail_after(30):
        while not all(node.readiness()[0] == "ready" and len(node.router.shard_map.members) == 3 for node, _ in nodes):
            await trio.sleep(0.05)
        async with dcache.connect(nodes[0][1].client_address) as client:
            await client.mset({f"k{i}": f"v{i}" for i in range(600)})
            for i in range(600, 700):
                await client.set(f"k{i}", f"v{i}")
            await client.delete("k5")
        assert sum(len(node.store) for node, _ in nodes) == 2 * 699
        scopes[2].cancel()  # no handoff: as a crash, but its lease is revoked at once
        while any(len(node.router.shard_map.members) != 2 for node, _ in nodes[:2]):
            await trio.sleep(0.05)
        async with dcache.connect(nodes[1][1].client_address) as client:
            values = await client.mget([f"k{i}" for i in range(700)])
            assert values == [None if i == 5 else f"v{i}".encode() for i in range(700)]
            stats = await client.stats()
            assert stats["replicas"] == 2 and stats["shard_copies_held"] >= 0
        while not all(node.readiness()[0] == "ready" for node, _ in nodes[:2]):
            await trio.sleep(0.05)
        assert [len(node.store) for node, _ in nodes[:2]] == [699, 699]  # copies made again: each holds all


async def test_a_node_with_another_replica_count_refuses_to_join(nursery: trio.Nursery, etcd_server: EtcdServer) -> None:
    await start_node(nursery, etcd=etcd_server.endpoint, lease_ttl=LEASE_TTL, replicas=2)
    with pytest.RaisesGroup(
        pytest.RaisesExc(NodeStartError, match=r"cluster 'default' runs with --replicas 2 .*started with --replicas 1"),
        flatten_subgroups=True,
    ):
        await start_node(nursery, etcd=etcd_server.endpoint, lease_ttl=LEASE_TTL)
    with pytest.raises(NodeStartError, match="--replicas needs a cluster"):
        await start_node(nursery, replicas=2)
    r = await trio.to_thread.run_sync(
        dcache_cli, "serve", "--replicas", "2", "--client-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"
    )
    assert (
        r.returncode == 2
        and r.stderr == b"error: --replicas needs a cluster (--etcd): a standalone node has no other node to keep copies on\n"
    )
