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
from dcache import codec, handoff
from dcache.errors import PeerUnavailable
from dcache.handoff import Placement, absorb
from dcache.localcluster import EtcdServer
from dcache.node import NodeStartError
from dcache.replication import ASYNC, SYNC, Replicator, held_for, take
from dcache.shard import NUM_SHARDS, ShardMap, shard_of
from dcache.store import Store

A, B, C, D = "a:1", "b:1", "c:1", "d:1"


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

    async def forward(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]:
        [(op, args)] = requests
        assert op == "copies"
        if node_id in self.down:
            raise PeerUnavailable("the link is down")
        return [(0, held_for(self.nodes[node_id].placement, self.sender.id))]

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
    assert nodes[B].placement.copies_kept == {shard: A}

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


async def test_copies_are_forgotten_and_withdrawn_when_their_node_is_no_longer_a_replica() -> None:
    """d joins and becomes the shard's replica in b's place: b forgets its
    copy, and a tells it to (should b's view skip the change, it would take
    the copy for current while a writes to d only)."""
    nodes = cluster()
    abcd = ShardMap.build(2, (A, B, C, D), 2)
    key = next(
        f"k{i}"
        for i in range(100_000)
        if ShardMap.build(1, (A, B, C), 2).replicas_of(shard_of("", f"k{i}".encode())) == (B,)
        and abcd.owner("", f"k{i}".encode()) == A
        and abcd.replicas_of(shard_of("", f"k{i}".encode())) == (D,)
    )
    shard = shard_of("", key.encode())
    assert await nodes[A].write(key, "v") is None
    assert nodes[B].placement.copies_kept == {shard: A}
    nodes[A].view(2, (A, B, C, D))  # (b has not seen d yet)
    assert nodes[B].placement.copies_kept == {} and shard in nodes[B].placement.copies_begun  # withdrawn: never served
    assert nodes[B].store.get("", key.encode()) is None
    nodes[B].view(2, (A, B, C, D))
    assert shard not in nodes[B].placement.copies_kept and shard not in nodes[B].placement.copies_begun


async def test_the_old_owner_keeps_the_copy_its_new_owner_makes_before_the_handoff_is_acknowledged() -> None:
    """b hands a shard to a, which joined; a writes at once and copies the
    shard back to b, its replica, before b reads a's acknowledgement of the
    handoff: the acknowledgement must not drop that copy."""
    nodes: dict[str, Node] = {}
    a, b = Node(A, nodes), Node(B, nodes)
    b.view(1, (B,))
    key = key_owned_by(A, B, members=(A, B))
    shard = shard_of("", key.encode())
    old = next(f"old{i}" for i in range(10**6) if shard_of("", f"old{i}".encode()) == shard)
    b.store.set("", old.encode(), b"acknowledged before the join")
    a.view(2, (A, B))
    b.view(2, (A, B))
    assert a.placement.incoming.get(shard) == B and b.placement.outgoing.get(shard) == A

    class Ack:
        def __init__(self, reply: Any) -> None:
            self.reply = reply

        async def wait(self) -> Any:
            assert await a.write(key, "new") is None  # a serves the shard now: the write is copied to b
            return self.reply

        def release(self) -> None:
            pass

    def submit(owner: str, requests: list[tuple[str, dict[str, Any]]]) -> Ack:
        [(_, args)] = requests
        return Ack([(0, absorb(a.placement, a.store, B, args, trio.current_time())[0])])

    assert await handoff._hand(b.placement, b.store, submit, A, [shard])
    assert b.placement.copies_kept.get(shard) == A
    b.view(3, (B,))  # a crashes
    assert b.placement.failed_over == 1
    assert b.store.get("", key.encode()) == b"new"
    assert b.store.get("", old.encode()) == b"acknowledged before the join"


async def test_a_restarted_owner_gets_back_the_copy_its_replica_kept() -> None:
    """a restarts with the same id before b saw it go (views are snapshots):
    fresh, it waits for its shards from b and claims them; b hands over the
    copy it kept for a, rather than saying nobody holds them."""
    nodes: dict[str, Node] = {}
    a, b = Node(A, nodes), Node(B, nodes)
    for node in (a, b):
        node.view(1, (A, B))
    for node in (a, b):
        for source, shards in node.placement.claims().items():
            node.placement.claim_answered(source, nodes[source].placement.answer_claim(node.id, shards))
    key = key_owned_by(A, B, members=(A, B))
    shard = shard_of("", key.encode())
    assert await a.write(key, "acknowledged") is None

    a2 = Node(A, nodes)  # kill -9, and started again
    a2.view(2, (A, B))
    assert a2.placement.incoming.get(shard) == B
    for source, shards in a2.placement.claims().items():
        assert a2.placement.claim_answered(source, b.placement.answer_claim(A, shards)) is False
    assert a2.placement.incoming.get(shard) == B and b.placement.outgoing.get(shard) == A  # b holds it now: it comes

    def submit(owner: str, requests: list[tuple[str, dict[str, Any]]]) -> Reply:
        [(_, args)] = requests
        return Reply([(0, absorb(a2.placement, a2.store, B, args, trio.current_time())[0])])

    assert await handoff._hand(b.placement, b.store, submit, A, [shard])
    assert a2.placement.owners[shard] == A and a2.store.get("", key.encode()) == b"acknowledged"


async def test_the_audit_finds_a_copy_whose_refusal_nobody_read() -> None:
    """A write's client went away before its replica's refusal was read: the
    owner took the copy for made. Asking the replica which copies it keeps
    corrects that."""
    nodes = cluster()
    abc, abcd = ShardMap.build(1, (A, B, C), 2), ShardMap.build(1, (A, B, C, D), 2)
    key = next(
        f"k{i}"
        for i in range(10**6)
        if abc.owner("", f"k{i}".encode()) == A
        and abc.replicas_of(shard_of("", f"k{i}".encode())) == (B,)
        and abcd.owner("", f"k{i}".encode()) == A
        and abcd.replicas_of(shard_of("", f"k{i}".encode())) == (D,)
    )
    shard = shard_of("", key.encode())
    nodes[B].view(2, (A, B, C, D))  # b takes d for the replica, a does not (d is leaving, as a saw)
    assert nodes[A].replicator.check("", [key.encode()]) is None
    nodes[A].store.set("", key.encode(), b"v")
    replicated = nodes[A].replicator.send("", [key.encode()])
    assert replicated is not None
    replicated.release()  # the client's connection closed: nobody reads b's refusal
    nodes[B].view(3, (A, B, C))
    assert shard not in nodes[A].replicator.missing().get(B, [])  # (taken for made)
    await nodes[A].replicator._audit()
    assert shard in nodes[A].replicator.missing().get(B, [])


async def test_a_lapsed_owner_copies_nothing_until_it_owns_shards_again() -> None:
    nodes = cluster()
    key = key_owned_by(A, B)
    assert await nodes[A].write(key, "acknowledged") is None
    nodes[A].store.clear()  # what Node._lapsed does
    nodes[A].placement.reset()
    nodes[A].replicator.reset()
    assert nodes[A].replicator.missing() == {} and nodes[A].replicator.replicas(shard_of("", key.encode())) == ()
    assert nodes[A].replicator.check("", [key.encode()]) is None and nodes[A].replicator.send("", [key.encode()]) is None
    assert nodes[B].store.get("", key.encode()) == b"acknowledged"


async def test_a_drained_owners_writes_reach_the_copy_of_the_node_it_hands_over_to() -> None:
    """a is leaving: b, its replica, is the shard's new owner and keeps its
    copy, which a's writes keep current until the handoff; a's drain runs
    out of time (or a is killed) before this shard: b serves its copy."""
    nodes = cluster()
    key = key_owned_by(A, B)
    shard = shard_of("", key.encode())
    assert ShardMap.build(2, (B, C), 2).owner("", key.encode()) == B
    assert await nodes[A].write(key, "before the drain") is None
    for node in nodes.values():
        node.placement.apply(2, (A, B, C), (B, C), trio.current_time())  # a is marked leaving
        node.replicator.prune()
    assert nodes[B].placement.incoming.get(shard) == A and nodes[B].placement.copies_kept.get(shard) == A
    assert nodes[A].placement.outgoing.get(shard) == B and nodes[A].replicator.replicas(shard) == (B,)
    assert await nodes[A].write(key, "during the drain") is None
    nodes[A].links.reconnect(B)  # a write that may have been lost on the way: no more writes until the handoff
    problem = await nodes[A].write(key, "after a reconnect")
    assert problem is not None and "moving" in problem
    nodes[B].view(3, (B, C))  # a is gone before it handed this shard over
    assert nodes[B].placement.owners[shard] == B and nodes[B].placement.failed_over == 1
    assert nodes[B].store.get("", key.encode()) == b"during the drain"


async def test_with_three_copies_two_crashes_in_a_row_lose_nothing() -> None:
    nodes = cluster(copies=3)
    placed = ShardMap.build(1, (A, B, C), 3)
    key = next(
        f"k{i}"
        for i in range(10**5)
        if placed.owner("", f"k{i}".encode()) == A and placed.replicas_of(shard_of("", f"k{i}".encode())) == (B, C)
    )
    shard = shard_of("", key.encode())
    assert await nodes[A].write(key, "acknowledged by three nodes") is None
    for n in (B, C):
        nodes[n].view(2, (B, C))  # a dies: b serves its copy; c keeps its own, for b now
    assert nodes[C].placement.copies_kept.get(shard) == B
    nodes[C].view(3, (C,))  # b dies before it copied the shard to c again
    assert nodes[C].placement.owners[shard] == C and shard not in nodes[C].placement.emptied
    assert nodes[C].store.get("", key.encode()) == b"acknowledged by three nodes"


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
        assert len(node.placement.copies_kept) == sum(
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


async def _drain_view(nodes: dict[str, Node]) -> None:
    for node in nodes.values():
        node.placement.apply(2, (A, B, C), (B, C), trio.current_time())  # a is marked leaving
        node.replicator.prune()


async def test_a_drain_keeps_the_new_owners_copy_current_across_a_link_blip() -> None:
    """The a→b link is down as the drain begins: a still counts b's copy
    (from before) as the one its writes of the moving shard must reach."""
    nodes = cluster()
    a, b = nodes[A], nodes[B]
    key = key_owned_by(A, B)
    shard = shard_of("", key.encode())
    assert await a.write(key, "old") is None
    a.links.down.add(B)
    await _drain_view(nodes)
    assert a.replicator.replicas(shard) == (B,)
    assert await a.write(key, None) is not None  # refused while b is out of reach: b's copy would miss it
    a.links.down.clear()
    assert await a.write(key, None) is None  # (the same connection: b's copy is current)
    b.view(3, (B, C))  # a's drain runs out of time, or a is killed
    assert b.placement.failed_over == 1 and b.store.get("", key.encode()) is None


async def test_a_drain_refuses_writes_its_new_owners_copy_may_miss() -> None:
    """The link reconnected just before the drain: what went over the old
    connection may be lost, so the moving shard's writes are refused until
    the handoff; b's copy holds every acknowledged write."""
    nodes = cluster()
    a, b = nodes[A], nodes[B]
    key = key_owned_by(A, B)
    assert await a.write(key, "v1") is None
    a.links.reconnect(B)
    await _drain_view(nodes)
    problem = await a.write(key, "v2")
    assert problem is not None and "moving" in problem
    b.view(3, (B, C))
    assert b.placement.failed_over == 1 and b.store.get("", key.encode()) == b"v1"


async def test_a_copy_the_holder_stops_keeping_current_is_withdrawn_not_served() -> None:
    """--replication async: a write of the moving shard is dropped (the link
    was crowded). a stops sending the shard's writes to b and tells b to
    drop its copy: b never serves a copy that misses acknowledged writes."""
    nodes = cluster(mode=ASYNC)
    a, b = nodes[A], nodes[B]
    backlog, unread = trio.open_memory_channel[Any](4096)  # (what Replicator.run sets up)
    a.replicator._backlog = backlog
    key = key_owned_by(A, B)
    shard = shard_of("", key.encode())
    assert await a.write(key, "v1") is None
    await _drain_view(nodes)
    a.links.crowded = lambda ids: B  # type: ignore[method-assign]
    assert await a.write(key, "written while crowded") is None
    assert a.replicator.replicas(shard) == () and shard not in b.placement.copies_kept
    assert b.store.get("", key.encode()) is None  # (withdrawn)
    b.view(3, (B, C))
    assert b.placement.failed_over == 0


async def test_a_drain_hands_a_current_copy_over_without_its_entries() -> None:
    nodes = cluster()
    a, b = nodes[A], nodes[B]
    key = key_owned_by(A, B)
    shard = shard_of("", key.encode())
    for i in range(20):
        assert await a.write(f"{key}-{i}", "x" * 1000) is None
    assert await a.write(key, "v") is None
    await _drain_view(nodes)
    handed: list[dict[str, Any]] = []

    def submit(owner: str, requests: list[tuple[str, dict[str, Any]]]) -> Reply:
        [(_, args)] = requests
        handed.append(args)
        return Reply([(0, absorb(b.placement, b.store, A, args, trio.current_time())[0])])

    assert await handoff._hand(a.placement, a.store, submit, B, [shard], a.replicator)
    assert [(m.get("kept"), m["entries"], m["begin"]) for m in handed] == [([shard], [], [])]
    assert b.placement.owners[shard] == B and b.store.get("", key.encode()) == b"v"


async def test_a_refused_write_is_not_acknowledged_when_the_owner_lapses_before_the_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = cluster()
    a = nodes[A]
    key = key_owned_by(A, B)
    assert await a.write(key, "v1") is None
    for n in (B, C):
        nodes[n].view(2, (B, C))  # a was stopped longer than its lease
    a.store.set("", key.encode(), b"v2")
    replicated = a.replicator.send("", [key.encode()])  # b refuses it: it owns the shard now
    assert replicated is not None

    async def lapse() -> None:
        await trio.sleep(0.003)  # after the refusal, before the retry
        a.store.clear()
        a.placement.reset()
        a.replicator.reset()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lapse)
        assert await replicated.wait() is not None
